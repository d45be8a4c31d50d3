"""The SmolLM2 evaluation text, the test prompts and the evaluation windows (stdlib only).

The evaluation text is real English prose that ships with Python: the interactive-help topics
of ``pydoc_data.topics`` (the Python Language Reference sections that ``help("with")`` prints).
That dict changes between Python releases, so the text uses only the :data:`TOPICS` whose text is
identical in Python 3.11.7 and 3.12.1 (63 of the 79 topics; 188,642 characters), in sorted key
order. Each topic's lines lose their trailing whitespace, leading and trailing blank lines are
dropped, runs of blank lines become one, and the topics are joined by one blank line.
Indentation inside a line is kept (the grammar rules and code examples use it). The result is
fixed by :data:`EVAL_TEXT_SHA256`; :func:`eval_text` raises if the running Python's topics
would give a different text, rather than evaluate on something else. With the SmolLM2 tokenizer
it is about 45k tokens.

:data:`PROMPTS` are short, varied inputs for comparing next-token logits with the reference
implementation; :func:`windows` cuts the fixed evaluation windows out of a token sequence.

This module imports nothing outside the standard library at module level, so the reference
script (``scripts/make_smollm2_reference.py``, run under PyTorch in a separate environment)
loads it by file path.

Example:
  >>> from jaxmem.models.llama import data
  >>> data.eval_text()[:23]
  'The "assert" statement\\n'
  >>> len(data.PROMPTS) >= 16
  True
"""

from __future__ import annotations

import functools
import hashlib

# The pydoc topics whose text is the same in Python 3.11.7 and 3.12.1, in sorted order.
TOPICS: tuple[str, ...] = (
  "assert", "assignment", "atom-identifiers", "atom-literals", "attribute-references",
  "augassign", "await", "binary", "bitwise", "bltin-code-objects", "bltin-ellipsis-object",
  "bltin-null-object", "bltin-type-objects", "booleans", "break", "callable-types", "calls",
  "comparisons", "context-managers", "continue", "conversions", "customization", "del", "dict",
  "dynamic-features", "else", "exceptions", "exprlists", "floating", "for", "formatstrings",
  "global", "id-classes", "if", "imaginary", "import", "in", "integers", "lambda", "lists",
  "nonlocal", "numbers", "numeric-types", "objects", "operator-summary", "pass", "power",
  "raise", "return", "sequence-types", "shifting", "slicings", "subscriptions", "truth",
  "typesfunctions", "typesmethods", "typesmodules", "typesseq", "typesseq-mutable", "unary",
  "while", "with", "yield",
)  # fmt: skip

# sha256 of eval_text().encode("utf-8").
EVAL_TEXT_SHA256 = "8d73fe91de0dc9b279518307305227df79bbf20fa7054f5d897c8e441c5d02e3"

EVAL_TEXT_DESCRIPTION = (
  "pydoc_data.topics: the 63 topics identical in Python 3.11.7 and 3.12.1, sorted by key; "
  "lines right-stripped, blank-line runs collapsed to one, topics joined by a blank line"
)

WINDOW_LENGTH = 512  # tokens per evaluation window
N_WINDOWS = 32  # windows the reference fixture scores


def _normalize(text: str) -> str:
  out: list[str] = []
  for line in text.splitlines():
    line = line.rstrip()
    if line or (out and out[-1]):
      out.append(line)
  while out and not out[-1]:
    out.pop()
  return "\n".join(out)


def build_eval_text(topics: dict[str, str]) -> str:
  """The evaluation text built from a ``{topic: text}`` dict (all of :data:`TOPICS` in it).

  Example:
    >>> build_eval_text({k: " x  \\n\\n\\n  y\\n" for k in TOPICS})[:10]
    ' x\\n\\n  y\\n\\n '
  """
  return "\n\n".join(_normalize(topics[k]) for k in TOPICS)


@functools.lru_cache(maxsize=2)
def eval_text(verify: bool = True) -> str:
  """The fixed evaluation text (see the module docstring), the same string on every run.

  Args:
    verify: raise :class:`ValueError` when the running Python's ``pydoc_data.topics`` do not
      give the text recorded in :data:`EVAL_TEXT_SHA256` (a Python release that edited one of
      the topics). Pass ``False`` to get that other text anyway.

  Example:
    >>> text = eval_text()
    >>> len(text)
    188688
    >>> text.count("\\n\\n\\n")
    0
  """
  from pydoc_data.topics import topics

  missing = [k for k in TOPICS if k not in topics]
  if missing:
    raise ValueError(f"pydoc_data.topics lacks topics {missing}")
  text = build_eval_text(topics)
  digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
  if verify and digest != EVAL_TEXT_SHA256:
    raise ValueError(
      f"this Python's pydoc_data.topics give a different evaluation text (sha256 {digest}, "
      f"expected {EVAL_TEXT_SHA256}); it was fixed on Python 3.11.7/3.12.1. "
      "Pass verify=False to evaluate on it anyway (numbers will not match the fixture)."
    )
  return text


# Varied on purpose: plain English, a question, code, numbers, other scripts and emoji, the
# chat template (ChatML, as SmolLM2-Instruct was tuned on), a long paragraph, leading spaces,
# a single character, markup and repeated text. Every prompt has at least one token.
PROMPTS: tuple[str, ...] = (
  "The capital of France is",
  "What is the boiling point of water at sea level?",
  "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
  "1, 2, 3, 4, 5, 6, 7, 8,",
  "Once upon a time, in a small village by the sea, there lived",
  "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
  (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"
  ),
  "Café, naïve, résumé, jalapeño — and the Straße in München.",
  "東京は日本の首都です。大阪は",
  "Москва — столица России, а Париж —",
  "I love this so much! 😀🎉👍",
  "    Leading spaces and a trailing space ",
  "a",
  "SELECT name, age FROM users WHERE age > 21 ORDER BY",
  '{"name": "Ada Lovelace", "born": 1815, "fields": ["mathematics",',
  "<html>\n  <body>\n    <h1>Hello</h1>\n  </",
  (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert "
    "light energy into chemical energy. During this process, carbon dioxide and water are "
    "combined, using the energy of sunlight captured by chlorophyll, to make glucose and "
    "release oxygen as a by-product. The glucose is then used by the plant for growth and "
    "energy, while the oxygen is released into the atmosphere, where it is breathed by animals "
    "and people. Without photosynthesis, life on Earth as we know it would not be possible, "
    "because"
  ),
  "The the the the the the the the the the",
)


def windows(ids, length: int = WINDOW_LENGTH, n: int | None = None) -> list:
  """The evaluation windows: consecutive, non-overlapping ``length``-token slices from the start.

  A trailing partial window is dropped. Each window is scored on its own (no context from the
  previous one): the next-token loss of its positions ``1 .. length - 1``.

  Args:
    ids: a token-id sequence (list, tuple or 1-D array; slices keep its type).
    length: tokens per window.
    n: how many windows; ``None`` for all full windows. Asking for more than ``ids`` holds
      raises :class:`ValueError`.

  Example:
    >>> windows(list(range(10)), length=4)
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> windows(list(range(10)), length=3, n=2)
    [[0, 1, 2], [3, 4, 5]]
  """
  if length < 2:
    raise ValueError(f"length must be >= 2, got {length}")
  available = len(ids) // length
  if n is None:
    n = available
  if n < 0 or n > available:
    raise ValueError(f"{len(ids)} tokens hold {available} windows of {length}, asked for {n}")
  return [ids[i * length : (i + 1) * length] for i in range(n)]
