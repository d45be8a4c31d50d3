"""The MiniLM evaluation and calibration sentences: real English text shipped with scikit-learn.

The pool is the sentences of scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``)
and of the docstrings of its public functions and classes, deduplicated and put in a fixed
pseudo-random order (seed :data:`EVAL_SEED`). It depends on the installed scikit-learn version
only through which sentences exist. :func:`eval_sentences` takes a prefix of the pool,
:func:`calibration_sentences` its end, so choices made from calibration data never see an
evaluation sentence.

Example:
  >>> from jaxmem.models.minilm import data
  >>> len(data.eval_sentences(8))
  8
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

import numpy as np

EVAL_SEED = 0
CALIBRATION_GAP = 1024  # calibration sentences never overlap eval_sentences(CALIBRATION_GAP)


def _clean_rst(text: str) -> str:
  """Inline reST/Sphinx markup to plain text."""
  text = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", text)  # `label <url>`_
  text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)  # :func:`name`
  text = re.sub(r"\[\d+\]_", "", text)  # citations [1]_
  return " ".join(text.replace("``", "").replace("**", "").replace("`", "").split())


def _split_sentences(paragraph: str) -> list[str]:
  return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)


def _keep(s: str) -> bool:
  words = s.split()
  return (
    6 <= len(words) <= 60
    and s[0].isupper()
    and s[-1] in ".!?"
    and not s.endswith("::")
    and "http" not in s
    and "=" not in s
  )


def _descr_sentences(root: pathlib.Path) -> list[str]:
  out = []
  for f in sorted((root / "datasets" / "descr").glob("*.rst")):
    for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")):
      lines = [line.strip() for line in para.splitlines() if line.strip()]
      if not lines or any(line.startswith(("..", "=", ":", "|", "-", "*", "+")) for line in lines):
        continue  # directives, tables, field lists, bullet lists, headings
      out += _split_sentences(_clean_rst(" ".join(lines)))
  return out


def _docstring_sentences(root: pathlib.Path) -> list[str]:
  out = []
  files = sorted(
    p
    for p in root.rglob("*.py")
    if "tests" not in p.parts and not any(d.startswith("_") for d in p.relative_to(root).parts[:-1])
  )
  for f in files:
    tree = ast.parse(f.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
        continue
      doc = ast.get_docstring(node)
      if not doc:
        continue
      for para in re.split(r"\n\s*\n", doc)[:2]:  # summary and first description paragraph
        if re.search(r"^\s*(-{3,}|\.\.|>>>)", para, re.M):
          continue  # a numpydoc section, directive or doctest
        out += _split_sentences(_clean_rst(para))
  return out


@functools.cache
def _sentence_pool() -> tuple[str, ...]:
  import sklearn

  root = pathlib.Path(sklearn.__file__).parent
  seen, pool = set(), []
  for s in _descr_sentences(root) + _docstring_sentences(root):
    if _keep(s) and s not in seen:
      seen.add(s)
      pool.append(s)
  order = np.random.default_rng(EVAL_SEED).permutation(len(pool))
  return tuple(pool[i] for i in order)


def eval_sentences(n: int | None = 512) -> list[str]:
  """The first ``n`` sentences of the evaluation set (all of them for None).

  Real sentences from scikit-learn's dataset descriptions and public docstrings (about 2,000),
  in a fixed order, so any ``n`` gives the same prefix. Reused by jaxmem's benchmarks.

  Raises:
    ValueError: if more sentences are asked for than the installed scikit-learn has.

  Example:
    >>> s = eval_sentences(3)
    >>> len(s), all(isinstance(x, str) and x for x in s)
    (3, True)
  """
  pool = _sentence_pool()
  if n is None:
    return list(pool)
  if n > len(pool):
    raise ValueError(f"eval_sentences: asked for {n}, but only {len(pool)} exist; ask for fewer.")
  return list(pool[:n])


def calibration_sentences(n: int = 128) -> list[str]:
  """``n`` sentences from the end of the pool, disjoint from ``eval_sentences(1024)``.

  For choices made from data (the sensitivity pass, GPTQ Hessians), so the evaluation set
  stays unseen.

  Raises:
    ValueError: if ``n`` would reach into the first 1024 sentences.

  Example:
    >>> not set(calibration_sentences(4)) & set(eval_sentences(1024))
    True
  """
  pool = _sentence_pool()
  if n > len(pool) - CALIBRATION_GAP:
    raise ValueError(
        f"calibration_sentences: at most {len(pool) - CALIBRATION_GAP} exist; ask for fewer."
    )
  return list(pool[len(pool) - n :])
