"""The byte-level BPE tokenizer stored in a GGUF file's metadata, as a ``tokenizers.Tokenizer``.

SmolLM2's file states ``tokenizer.ggml.model = gpt2`` (byte-level BPE: GPT-2's byte to
unicode alphabet, vocabulary ``tokenizer.ggml.tokens``, ranked ``tokenizer.ggml.merges``)
and ``tokenizer.ggml.pre = smollm``. The ``smollm`` pre-tokenizer, the one the model was
trained with (the original ``tokenizer.json``: ``Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)]``, and llama.cpp's ``smollm``), first
isolates every numeric character, then splits each stretch between them with GPT-2's regex
(:data:`GPT2_SPLIT`). :func:`load_tokenizer` builds it by default.

The Hugging Face ``transformers`` GGUF conversion (5.x) ignores ``pre = smollm`` and uses
GPT-2's split alone (``load_tokenizer(pre="gpt2")`` reproduces it). The two differ where
whitespace or a space precedes a number: ``"\\n\\n2."`` is ``ĊĊ 2 .`` with the digit
isolation (the run of newlines ends its stretch) and ``Ċ Ċ 2 .`` without, ``"  2"`` is
``ĠĠ 2`` versus ``Ġ Ġ 2``, ``" ½"`` is ``Ġ Â½`` versus ``ĠÂ ½``. On the SmolLM2 evaluation
text (:mod:`jaxmem.models.llama.data`) that is 88 places, 45,679 tokens versus 45,769 (mostly
numbered lists; the first at token 7,236); ordinary prose without such numbers gives the same
ids. Both decode back to the text.

Tokens the file marks as control (type 3: ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, ...) are special tokens, matched whole in the text; user-defined ones
(type 4) are added tokens. No BOS is added unless the file's ``add_bos_token`` says so
(SmolLM2's does not).

Example:
  >>> from jaxmem.models.llama import tokenizer
  >>> tok = tokenizer.load_tokenizer()
  >>> ids = tokenizer.encode("<|im_start|>user\\nHello, world!<|im_end|>", tok)
  >>> ids
  [1, 4093, 198, 19556, 28, 905, 17, 2]
  >>> tokenizer.decode(ids, tok)
  '<|im_start|>user\\nHello, world!<|im_end|>'
"""

from __future__ import annotations

import functools
import os
from typing import Any

from jaxmem.models.llama import gguf as _gguf

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
# GPT-2's pre-tokenizer split (the one tokenizers' ByteLevel(use_regex=True) applies).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# ``tokenizer.ggml.pre`` values this module builds, and what they split before byte-level BPE.
PRE_TOKENIZERS = {
    "smollm": "each digit isolated, then GPT-2's regex",
    "gpt2": "GPT-2's regex",
    "default": "GPT-2's regex",
}


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (bytes that print stay themselves)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


def tokenizer_metadata(path: str | os.PathLike | _gguf.GGUFFile | None = None) -> dict[str, Any]:
  """The tokenizer fields of a GGUF file: ``model``, ``pre``, ``tokens``, ``token_types``,
  ``merges``, ``bos_id``, ``eos_id``, ``unk_id``, ``pad_id`` (None when absent),
  ``add_bos``, ``add_eos`` and ``chat_template``.

  Raises:
    ValueError: the file has no tokenizer vocabulary.
  """
  f = _gguf._as_file(path)
  md = f.metadata
  tokens = md.get("tokenizer.ggml.tokens")
  if not tokens:
    raise ValueError(f"{f.path}: no tokenizer vocabulary (tokenizer.ggml.tokens).")
  types = md.get("tokenizer.ggml.token_type")

  def opt_int(key):
    v = md.get(f"tokenizer.ggml.{key}")
    return None if v is None else int(v)

  return dict(
      model=md.get("tokenizer.ggml.model"),
      pre=md.get("tokenizer.ggml.pre", "default"),
      tokens=list(tokens),
      token_types=[1] * len(tokens) if types is None else [int(t) for t in types],
      merges=list(md.get("tokenizer.ggml.merges") or []),
      bos_id=opt_int("bos_token_id"),
      eos_id=opt_int("eos_token_id"),
      unk_id=opt_int("unknown_token_id"),
      pad_id=opt_int("padding_token_id"),
      add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
      add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
      chat_template=md.get("tokenizer.chat_template"),
      path=f.path,
  )


def build_tokenizer(meta: dict[str, Any]):
  """A ``tokenizers.Tokenizer`` from :func:`tokenizer_metadata`'s dict.

  Raises:
    ValueError: a tokenizer model other than ``gpt2`` (byte-level BPE), a ``pre`` outside
      :data:`PRE_TOKENIZERS` (naming it), or a vocabulary with repeated tokens.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  where = meta.get("path", "GGUF file")
  if meta["model"] != "gpt2":
    raise ValueError(f"{where}: tokenizer.ggml.model {meta['model']!r} is not supported; only "
                     "'gpt2' (byte-level BPE) is.")
  pre = meta["pre"]
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"{where}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; "
                     f"supported: {sorted(PRE_TOKENIZERS)}.")
  alphabet = set(_byte_alphabet().values())
  spell = _byte_alphabet()
  tokens = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))
            for t in meta["tokens"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"{where}: the vocabulary repeats {len(tokens) - len(vocab)} tokens.")
  merges = []
  for m in meta["merges"]:
    a, sep, b = m.partition(" ")
    if not sep or not a or not b:
      raise ValueError(f"{where}: merge {m!r} is not two tokens separated by one space.")
    merges.append((a, b))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                             continuing_subword_prefix="", end_of_word_suffix=""))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  specials = [AddedToken(t, special=True, normalized=False)
              for t, ty in zip(tokens, meta["token_types"]) if ty == CONTROL]
  if specials:
    tok.add_special_tokens(specials)
  user = [AddedToken(t, special=False, normalized=False)
          for t, ty in zip(tokens, meta["token_types"]) if ty == USER_DEFINED]
  if user:
    tok.add_tokens(user)
  bos, eos = meta["bos_id"], meta["eos_id"]
  if (meta["add_bos"] and bos is not None) or (meta["add_eos"] and eos is not None):
    pre_ = [(tokens[bos], bos)] if meta["add_bos"] and bos is not None else []
    post = [(tokens[eos], eos)] if meta["add_eos"] and eos is not None else []
    head = "".join(f"{t}:0 " for t, _ in pre_)
    tail = "".join(f" {t}:0" for t, _ in post)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail} $B:1{tail}",
        special_tokens=sorted(set(pre_ + post), key=lambda x: x[1]))
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


def load_tokenizer(path: str | os.PathLike | _gguf.GGUFFile | None = None, *,
                   pre: str | None = None):
  """The ``tokenizers.Tokenizer`` of a GGUF file (default: SmolLM2-135M-Instruct's).

  ``pre`` overrides the file's ``tokenizer.ggml.pre`` (a key of :data:`PRE_TOKENIZERS`):
  ``"gpt2"`` reproduces the Hugging Face ``transformers`` GGUF conversion, which ignores
  ``smollm``'s digit isolation (they differ where whitespace precedes a number: module
  docstring).

  ``tok.encode(text).ids`` are the model's token ids (no BOS for SmolLM2);
  ``tok.decode(ids, skip_special_tokens=False)`` inverts it. The BOS/EOS ids and the chat
  template are in :func:`tokenizer_metadata` (SmolLM2: BOS 1 ``<|im_start|>``, EOS 2
  ``<|im_end|>``).

  Raises:
    ValueError: see :func:`build_tokenizer`.
  """
  meta = tokenizer_metadata(path)
  return build_tokenizer(meta if pre is None else dict(meta, pre=pre))


@functools.cache
def default_tokenizer():
  """SmolLM2-135M-Instruct's tokenizer, built once per process."""
  return load_tokenizer()


def encode(text: str, tokenizer=None) -> list[int]:
  """Token ids of ``text`` (special-token strings such as ``<|im_start|>`` map to their ids;
  no BOS added). ``tokenizer`` None: :func:`default_tokenizer`."""
  tok = default_tokenizer() if tokenizer is None else tokenizer
  return tok.encode(text, add_special_tokens=True).ids


def decode(ids, tokenizer=None) -> str:
  """The text of token ids, special tokens included (the inverse of :func:`encode`)."""
  tok = default_tokenizer() if tokenizer is None else tokenizer
  return tok.decode([int(i) for i in ids], skip_special_tokens=False)
