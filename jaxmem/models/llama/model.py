"""A Llama decoder (Linen) with scan over layers, grouped-query attention and a KV cache.

The architecture of Llama 2/3 and SmolLM2: pre-norm blocks of RMSNorm, causal
grouped-query self-attention with rotary position embeddings (RoPE), RMSNorm and a
SwiGLU MLP; a final RMSNorm and an output head tied to the token embedding; no biases.
The ``config.n_layers`` blocks are one ``nn.scan`` (params stacked on axis 0), so the
params tree is::

  embed/embedding                     [V, D]
  layers/attn_norm/scale              [L, D]
  layers/attn/{q,k,v,o}/kernel        [L, D, Hq*hd], [L, D, Hkv*hd] (k, v), [L, Hq*hd, D] (o)
  layers/mlp_norm/scale               [L, D]
  layers/mlp/{gate,up,down}/kernel    [L, D, F] (gate, up), [L, F, D] (down)
  final_norm/scale                    [D]

Every matrix is a Flax ``Dense`` kernel (``(in, out)`` layout) or the ``Embed`` table, so
:func:`jaxmem.apply` runs the model on compressed params (e.g.
``jaxmem.quantize_int8(stack_axes={r"layers/.*": 1})``): each scanned layer runs the
integer kernels on its own slice of the stacked QArrays.

RoPE follows the Hugging Face Llama convention ("rotate half"): within each head, feature
``i`` and feature ``i + hd/2`` form a pair rotated by ``position * theta**(-2i/hd)``. A
checkpoint in llama.cpp's (GGUF) layout, which interleaves the pairs ``(2i, 2i+1)`` in the
rows of the q/k weights, must be permuted to this layout on load.

Decoding uses a :class:`KVCache` of fixed shape (made by :func:`init_cache`; optionally int8
keys/values with per-token, per-head scales). :func:`prefill`, :func:`decode_step` and
:func:`generate` run under ``jax.jit`` and through :func:`jaxmem.apply`, so float and
compressed params both work.

Example (shapes only, through ``jax.eval_shape``; drop it to run for real):
  >>> import jax, jax.numpy as jnp, jaxmem
  >>> from jaxmem.models.llama import model as llama
  >>> cfg = llama.LlamaConfig.tiny()
  >>> net = llama.Llama(cfg)
  >>> prompt = jnp.array([[1, 2, 3, 4]], jnp.int32)
  >>> params = jax.eval_shape(net.init, jax.random.key(0), prompt)['params']
  >>> jax.eval_shape(net.apply, {'params': params}, prompt).shape  # plain forward: logits
  (1, 4, 97)
  >>> tx = jaxmem.quantize_int8(stack_axes={r"layers/.*": 1})  # per-layer scales
  >>> run = lambda p: llama.generate(net, {'params': jaxmem.transform(tx, p)}, prompt, 3)
  >>> jax.eval_shape(run, params).shape  # int8 weights, greedy, 3 new tokens
  (1, 3)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxmem

KV_BITS = (None, 8)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a Llama model (hashable: a static Linen attribute).

  Attributes:
    vocab_size: number of tokens ``V``.
    dim: model width ``D``.
    n_layers: number of blocks ``L``.
    n_heads: query heads ``Hq``.
    n_kv_heads: key/value heads ``Hkv`` (grouped-query attention: ``Hq % Hkv == 0``; each
      group of ``Hq // Hkv`` consecutive query heads shares one key/value head).
    head_dim: features per head ``hd`` (even, for RoPE).
    ffn_dim: hidden width ``F`` of the SwiGLU MLP.
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon.
    max_seq_len: longest context (the largest ``max_len`` of :func:`init_cache`).
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 2048

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "ffn_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LlamaConfig: {name} must be a positive int, got {value!r}.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"LlamaConfig: n_heads={self.n_heads} must be a multiple of "
          f"n_kv_heads={self.n_kv_heads} (grouped-query attention)."
      )
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even (RoPE pairs).")

  @classmethod
  def smollm2_135m(cls) -> LlamaConfig:
    """SmolLM2-135M: 30 blocks, width 576, 9/3 heads of 64, FFN 1536, vocab 49152."""
    return cls(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
               ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192)

  @classmethod
  def tiny(cls) -> LlamaConfig:
    """A 2-block model for tests and examples: width 64, 4/2 heads of 16, vocab 97."""
    return cls(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
               ffn_dim=128, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=64)


class KVCache(NamedTuple):
  """Keys and values of every layer, of fixed shape (a pytree: pass it through ``jit``).

  Slots ``[0, length)`` along ``T_max`` hold the keys/values of the tokens seen so far
  (the same number for every batch row); later slots are unwritten and masked. Keys are
  stored after RoPE. Made by :func:`init_cache`; the model returns an updated copy.

  Attributes:
    k: ``[L, B, T_max, Hkv, hd]`` keys, float (``dtype``) or int8 (``kv_bits=8``).
    v: ``[L, B, T_max, Hkv, hd]`` values, like ``k``.
    k_scale: ``[L, B, T_max, Hkv, 1]`` float32 scales of the int8 keys (one per token and
      head: ``k ≈ k_int8 * k_scale``), or None for a float cache.
    v_scale: like ``k_scale``, for the values.
    length: ``[]`` int32, the number of written slots (the next token's position).
  """

  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None
  v_scale: jax.Array | None
  length: jax.Array

  @property
  def max_len(self) -> int:
    """``T_max``, the number of slots."""
    return int(self.k.shape[2])

  @property
  def kv_bits(self) -> int | None:
    """8 for an int8 cache, None for a float one."""
    return None if self.k_scale is None else 8


def init_cache(config: LlamaConfig, batch: int, max_len: int, *, kv_bits: int | None = None,
               dtype: Any = jnp.float32) -> KVCache:
  """An empty :class:`KVCache` (``length == 0``) for ``batch`` sequences of ``max_len`` slots.

  Args:
    config: the model's sizes.
    batch: batch size ``B``.
    max_len: slots per sequence ``T_max`` (prompt plus generated tokens), at most
      ``config.max_seq_len``.
    kv_bits: None for float keys/values (``dtype``); 8 for int8 keys/values with a float32
      scale per token and head (symmetric absmax / 127, round to nearest), dequantized on
      read: ``(hd + 4) / (4 hd)`` of the float32 bytes (0.27x at ``hd = 64``).
    dtype: the float cache's dtype (ignored for ``kv_bits=8``).

  Returns:
    The cache, zeros.

  Raises:
    ValueError: a non-positive ``batch``/``max_len``, ``max_len > config.max_seq_len`` or
      an unsupported ``kv_bits``.

  Example:
    >>> from jaxmem.models.llama import model as llama
    >>> cache = llama.init_cache(llama.LlamaConfig.tiny(), 2, 16, kv_bits=8)
    >>> cache.k.shape, cache.k.dtype, cache.k_scale.shape, int(cache.length)
    ((2, 2, 16, 2, 16), dtype('int8'), (2, 2, 16, 2, 1), 0)
  """
  _check_cache_args("init_cache", config, batch, max_len, kv_bits)
  shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
  length = jnp.zeros([], jnp.int32)
  if kv_bits is None:
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), None, None, length)
  scale_shape = shape[:-1] + (1,)
  return KVCache(
      jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
      jnp.zeros(scale_shape, jnp.float32), jnp.zeros(scale_shape, jnp.float32), length,
  )


def param_shapes(config: LlamaConfig) -> dict:
  """The params tree of ``Llama(config)`` as ``jax.ShapeDtypeStruct`` leaves (nothing runs).

  For loaders: every converted checkpoint must have exactly these paths and shapes.

  Example:
    >>> from jaxmem.models.llama import model as llama
    >>> shapes = llama.param_shapes(llama.LlamaConfig.smollm2_135m())
    >>> shapes['layers']['attn']['k']['kernel'].shape, shapes['embed']['embedding'].shape
    ((30, 576, 192), (49152, 576))
  """
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(Llama(config).init, jax.random.key(0), tokens)["params"]


def _check_cache_args(caller: str, config: LlamaConfig, batch, max_len, kv_bits) -> None:
  for name, value in (("batch", batch), ("max_len", max_len)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{caller}: {name} must be a positive int, got {value!r}.")
  if max_len > config.max_seq_len:
    raise ValueError(
        f"{caller}: max_len={max_len} exceeds the model's context "
        f"config.max_seq_len={config.max_seq_len}; use a shorter prompt or fewer new tokens."
    )
  if kv_bits not in KV_BITS:
    raise ValueError(f"{caller}: kv_bits must be None (float) or 8 (int8), got {kv_bits!r}.")


# ----------------------------------------------------------------------------- math


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)``, each ``[T, head_dim]`` float32, for integer ``positions`` ``[T]``.

  The Hugging Face Llama tables: ``inv_freq[i] = theta**(-2i/hd)`` (float32), angles
  ``positions * inv_freq`` repeated twice along features (``[a, a]``).
  """
  exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / np.float32(theta) ** exponent).astype(np.float32)
  angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``[B, T, H, hd]`` by the tables of :func:`rope_tables` (rotate half).

  Pairs ``(x[i], x[i + hd/2])`` turn by the angle of frequency ``i``:
  ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x[hd/2:], x[:hd/2]]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxmem.models.llama import model as llama
    >>> cos, sin = llama.rope_tables(jnp.arange(3), 4, 10000.0)
    >>> x = jnp.ones((1, 3, 1, 4))
    >>> bool(jnp.allclose(llama.apply_rope(x, cos, sin)[0, 0], x[0, 0]))  # position 0
    True
  """
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int8 keys/values ``[..., hd]`` and their float32 scales ``[..., 1]`` (absmax / 127).

  Symmetric, round to nearest; an all-zero vector gets scale 0 (it dequantizes to 0).
  """
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  q = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
  return q, scale


def _overflow_message(t: int, length: int, t_max: int) -> str:
  return (
      f"Llama: {t} new tokens at cache length {length} need {length + t} slots, but the "
      f"KV cache holds max_len={t_max}; make the cache larger (init_cache(..., max_len="
      f"{length + t})) or feed fewer tokens."
  )


def _raise_if_overflow(t: int, t_max: int, length) -> None:
  """Host side of the traced length check (a ``jax.debug.callback``)."""
  n = int(np.asarray(length))
  if n + t > t_max:
    raise ValueError(_overflow_message(t, n, t_max))


def check_fits(cache: KVCache, t: int, *, check_traced: bool = True) -> bool:
  """Raises a ValueError when ``t`` new tokens do not fit in ``cache``.

  ``t > max_len`` is caught from the shapes. A concrete ``cache.length`` is checked at
  once; a traced one (under ``jit``) by a ``jax.debug.callback`` when the function runs if
  ``check_traced`` (the error then arrives wrapped in a ``jax.errors.JaxRuntimeError``).

  Returns:
    True if the check is complete now (the length was concrete).
  """
  t_max = cache.max_len
  if t > t_max:
    raise ValueError(
        f"Llama: {t} new tokens do not fit in a KV cache of max_len={t_max} (at any length); "
        f"make the cache larger (init_cache(..., max_len={t})) or feed fewer tokens."
    )
  if not isinstance(cache.length, jax.core.Tracer):
    n = int(np.asarray(cache.length))
    if n + t > t_max:
      raise ValueError(_overflow_message(t, n, t_max))
    return True
  if check_traced:
    jax.debug.callback(functools.partial(_raise_if_overflow, t, t_max), cache.length)
  return False


# ----------------------------------------------------------------------------- modules


class LlamaAttention(nn.Module):
  """Causal grouped-query self-attention with RoPE and an optional per-layer cache.

  ``__call__(x, cos, sin, mask, layer_cache=None, length=None)``: ``x`` ``[B, T, D]``,
  ``cos``/``sin`` ``[T, hd]`` (:func:`rope_tables` at the tokens' positions), ``mask``
  ``[T, S]`` bool (True: query may attend key slot). Without a cache ``S = T`` (keys are
  this call's tokens); with ``layer_cache = (k, v, k_scale, v_scale)`` of one layer
  (``[B, T_max, Hkv, hd]``, scales ``[B, T_max, Hkv, 1]`` or None) the new keys/values are
  written at slots ``[length, length + T)`` and the queries attend all ``S = T_max`` slots
  read back (dequantized for int8). Returns ``(out [B, T, D], new layer_cache or None)``.
  """

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache=None, length=None):
    cfg = self.config
    b, t, _ = x.shape
    hq, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    q = dense(hq * hd, name="q")(x).reshape(b, t, hq, hd)
    k = dense(hkv * hd, name="k")(x).reshape(b, t, hkv, hd)
    v = dense(hkv * hd, name="v")(x).reshape(b, t, hkv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if layer_cache is None:
      keys, values = k, v
    else:
      ck, cv, ks, vs = layer_cache
      start = (0, length, 0, 0)
      if ks is None:
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
        keys, values = ck.astype(self.dtype), cv.astype(self.dtype)
      else:
        kq, kscale = quantize_kv(k)
        vq, vscale = quantize_kv(v)
        ck = jax.lax.dynamic_update_slice(ck, kq, start)
        cv = jax.lax.dynamic_update_slice(cv, vq, start)
        ks = jax.lax.dynamic_update_slice(ks, kscale, start)
        vs = jax.lax.dynamic_update_slice(vs, vscale, start)
        keys = (ck.astype(jnp.float32) * ks).astype(self.dtype)
        values = (cv.astype(jnp.float32) * vs).astype(self.dtype)
      layer_cache = (ck, cv, ks, vs)
    # Query head h uses key/value head h // (hq // hkv): group the query heads.
    q = q.reshape(b, t, hkv, hq // hkv, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, keys).astype(jnp.float32)
    logits = logits / np.float32(np.sqrt(hd))
    logits = jnp.where(mask[None, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, hq * hd)
    return dense(cfg.dim, name="o")(ctx), layer_cache


class LlamaMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    gate = dense(self.config.ffn_dim, name="gate")(x)
    up = dense(self.config.ffn_dim, name="up")(x)
    return dense(self.config.dim, name="down")(jax.nn.silu(gate) * up)


class LlamaBlock(nn.Module):
  """One pre-norm block, in ``nn.scan`` form: ``(x, layer_cache, ...) -> (x, layer_cache)``."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, layer_cache, cos, sin, mask, length):
    cfg = self.config
    h = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=self.dtype, name="attn_norm")(x)
    h, layer_cache = LlamaAttention(cfg, self.dtype, name="attn")(
        h, cos, sin, mask, layer_cache, length)
    x = x + h
    h = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=self.dtype, name="mlp_norm")(x)
    x = x + LlamaMLP(cfg, self.dtype, name="mlp")(h)
    return x, layer_cache


class Llama(nn.Module):
  """The Llama decoder: embedding, ``n_layers`` scanned blocks, final RMSNorm, tied head.

  ``apply(variables, tokens)`` returns logits ``[B, T, V]`` (float32) of a causal forward
  pass over int ``tokens`` ``[B, T]`` at positions ``0..T-1`` (perplexity).
  ``apply(variables, tokens, cache=cache)`` returns ``(logits, new_cache)``: the tokens
  sit at positions ``cache.length + [0, T)``, their keys/values are written there, and
  they attend every earlier slot (unwritten slots are masked); ``new_cache.length`` grows
  by ``T``. All rows of a batch share one length (same-length prompts). Tokens that do not
  fit (``length + T > max_len``) raise a ValueError (see :func:`check_fits`; pass
  ``check_length=False`` to skip the traced check once you have checked the lengths).
  ``last_only=True`` computes the head for the last position only (logits ``[B, 1, V]``):
  a prompt's prefill then skips ``T - 1`` rows of the ``[D, V]`` head.

  Attributes:
    config: sizes.
    dtype: compute dtype of the layers (params stay float32; logits are float32).

  Example:
    >>> import functools, jax, jax.numpy as jnp
    >>> from jaxmem.models.llama import model as llama
    >>> cfg = llama.LlamaConfig.tiny()
    >>> net = llama.Llama(cfg)
    >>> tokens = jnp.array([[5, 6, 7]], jnp.int32)
    >>> variables = jax.eval_shape(net.init, jax.random.key(0), tokens)  # shapes only
    >>> cache = llama.init_cache(cfg, 1, 8)
    >>> logits, cache = jax.eval_shape(functools.partial(net.apply, cache=cache), variables, tokens)
    >>> logits.shape, cache.k.shape
    ((1, 3, 97), (2, 1, 8, 2, 16))
  """

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, cache: KVCache | None = None, *, check_length: bool = True,
               last_only: bool = False):
    cfg = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"Llama: tokens must be an int array [batch, seq], got {tokens.dtype}"
          f"{list(tokens.shape)}."
      )
    b, t = tokens.shape
    if cache is None:
      positions = jnp.arange(t, dtype=jnp.int32)
      slots = positions
      layer_caches, length = None, None
    else:
      _check_cache(cfg, cache, b)
      check_fits(cache, t, check_traced=check_length)
      length = cache.length.astype(jnp.int32)
      positions = length + jnp.arange(t, dtype=jnp.int32)
      slots = jnp.arange(cache.max_len, dtype=jnp.int32)
      layer_caches = (cache.k, cache.v, cache.k_scale, cache.v_scale)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = slots[None, :] <= positions[:, None]  # causal; later (unwritten) slots masked
    embed = nn.Embed(cfg.vocab_size, cfg.dim, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="embed")
    x = embed(tokens)
    stack = nn.scan(
        LlamaBlock,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
    )
    x, layer_caches = stack(cfg, self.dtype, name="layers")(
        x, layer_caches, cos, sin, mask, length)
    if last_only:
      x = x[:, -1:]
    x = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=self.dtype, name="final_norm")(x)
    logits = embed.attend(x).astype(jnp.float32)
    if cache is None:
      return logits
    k, v, ks, vs = layer_caches
    return logits, KVCache(k, v, ks, vs, length + t)


def _check_cache(cfg: LlamaConfig, cache: KVCache, batch: int) -> None:
  if not isinstance(cache, KVCache):
    raise TypeError(f"Llama: cache must be a KVCache (init_cache), got {type(cache).__name__}.")
  want = (cfg.n_layers, batch, cache.max_len, cfg.n_kv_heads, cfg.head_dim)
  if tuple(cache.k.shape) != want or tuple(cache.v.shape) != want:
    raise ValueError(
        f"Llama: the KV cache has k/v shapes {tuple(cache.k.shape)}/{tuple(cache.v.shape)}, "
        f"this model and batch need {want} [layers, batch, max_len, kv_heads, head_dim]; "
        f"make it with init_cache(config, {batch}, max_len)."
    )


# ----------------------------------------------------------------------------- generation


@functools.partial(jax.jit, static_argnames=("model", "check_length", "last_only"))
def _prefill(model, variables, tokens, cache, check_length, last_only=False):
  return jaxmem.apply(model, variables, tokens, cache=cache, check_length=check_length,
                      last_only=last_only)


def prefill(model: Llama, variables, tokens: jax.Array, cache: KVCache, *,
            last_only: bool = False):
  """Runs a prompt ``[B, T]`` through the model (jitted), writing it into ``cache``.

  Args:
    model: the :class:`Llama`.
    variables: ``{'params': params}``, float or compressed (run by :func:`jaxmem.apply`).
    tokens: int ``[B, T]``, every row ``T`` tokens long.
    cache: a :class:`KVCache` from :func:`init_cache` (or a previous call).
    last_only: return the last position's logits only (``[B, 1, V]``).

  Returns:
    ``(logits [B, T, V], new_cache)``.

  Raises:
    ValueError: the tokens do not fit in the cache (``length + T > max_len``).
  """
  checked = check_fits(cache, tokens.shape[1], check_traced=False)
  return _prefill(model, variables, jnp.asarray(tokens), cache, not checked, last_only)


def decode_step(model: Llama, variables, token: jax.Array, cache: KVCache):
  """One decoding step (jitted): the next token of each row ``[B]`` at ``cache.length``.

  Args:
    model: the :class:`Llama`.
    variables: ``{'params': params}``, float or compressed.
    token: int ``[B]``.
    cache: the cache after the previous tokens.

  Returns:
    ``(logits [B, V], new_cache)``.

  Raises:
    ValueError: the cache is full.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxmem.models.llama import model as llama
    >>> cfg = llama.LlamaConfig.tiny()
    >>> net = llama.Llama(cfg)
    >>> variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    >>> step = lambda v, c: llama.decode_step(net, v, jnp.array([3, 4]), c)
    >>> logits, cache = jax.eval_shape(step, variables, llama.init_cache(cfg, 2, 4))
    >>> logits.shape, cache.length.shape
    ((2, 97), ())
  """
  token = jnp.asarray(token)
  if token.ndim != 1:
    raise ValueError(f"decode_step: token must be [batch], got shape {tuple(token.shape)}.")
  logits, cache = prefill(model, variables, token[:, None], cache)
  return logits[:, 0], cache


def _sample(logits, key, temperature):
  """Argmax where ``temperature == 0``, else a draw from ``softmax(logits / temperature)``.

  Both are computed (a draw over ``[B, V]`` costs next to nothing beside the model), so
  greedy and sampled generation share one compilation.
  """
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, jnp.float32(1e-6))
  drawn = jax.random.categorical(key, scaled, axis=-1)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "kv_bits", "max_len"))
def _generate(model, variables, prompt, temperature, key, *, max_new_tokens, kv_bits, max_len):
  cache = init_cache(model.config, prompt.shape[0], max_len, kv_bits=kv_bits)
  logits, cache = jaxmem.apply(model, variables, prompt, cache=cache, check_length=False,
                               last_only=True)
  keys = jax.random.split(key, max_new_tokens)
  first = _sample(logits[:, -1], keys[0], temperature)

  def step(carry, step_key):
    cache, token = carry
    logits, cache = jaxmem.apply(model, variables, token[:, None], cache=cache,
                                 check_length=False)
    nxt = _sample(logits[:, 0], step_key, temperature)
    return (cache, nxt), nxt

  _, rest = jax.lax.scan(step, (cache, first), keys[1:])
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: Llama, variables, prompt_ids: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None, kv_bits: int | None = None,
             max_len: int | None = None) -> jax.Array:
  """Greedy or sampled continuation of ``prompt_ids`` ``[B, P]``, all under one ``jax.jit``.

  Prefills the prompt into a fresh :class:`KVCache`, then feeds each new token back in a
  ``lax.scan``. Every row has the same prompt length ``P`` (no padding); there is no
  stop token: cut each row after its first end-of-sequence token yourself. One
  compilation per (model, params structure, shapes, ``max_new_tokens``, ``kv_bits``,
  ``max_len``); the temperature is a traced value (greedy and sampling share it).

  Args:
    model: the :class:`Llama`.
    variables: ``{'params': params}``, float or compressed (run by :func:`jaxmem.apply`).
    prompt_ids: int ``[B, P]``, ``P >= 1``.
    max_new_tokens: how many tokens to generate (>= 0).
    temperature: 0 for greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
    rng: a ``jax.random.key``, required when ``temperature > 0``.
    kv_bits: the cache's ``kv_bits`` (None: float32; 8: int8, see :func:`init_cache`).
    max_len: the cache's slots; default ``P + max_new_tokens``. It needs at least
      ``P + max_new_tokens - 1`` (the last token is not fed back).

  Returns:
    The new tokens, int32 ``[B, max_new_tokens]`` (the prompt is not repeated).

  Raises:
    ValueError: a bad prompt shape, negative ``max_new_tokens`` or ``temperature``, a
      missing ``rng`` for sampling, or a ``max_len`` too small for the prompt and tokens.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxmem.models.llama import model as llama
    >>> cfg = llama.LlamaConfig.tiny()
    >>> net = llama.Llama(cfg)
    >>> variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    >>> prompt = jnp.array([[1, 2], [3, 4]], jnp.int32)
    >>> sample = lambda v: llama.generate(net, v, prompt, 2, temperature=0.8, rng=jax.random.key(1),
    ...                                   kv_bits=8)
    >>> out = jax.eval_shape(sample, variables)  # shapes only; call sample(variables) to run
    >>> out.shape, out.dtype
    ((2, 2), dtype('int32'))
  """
  prompt_ids = jnp.asarray(prompt_ids)
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or not jnp.issubdtype(
      prompt_ids.dtype, jnp.integer):
    raise ValueError(
        f"generate: prompt_ids must be int [batch, prompt_len >= 1], got {prompt_ids.dtype}"
        f"{list(prompt_ids.shape)}."
    )
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or (
      max_new_tokens < 0):
    raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
  temperature = float(temperature)
  if not temperature >= 0.0:
    raise ValueError(f"generate: temperature must be >= 0 (0: greedy), got {temperature}.")
  if temperature > 0.0 and rng is None:
    raise ValueError("generate: sampling (temperature > 0) needs rng=jax.random.key(seed).")
  b, p = prompt_ids.shape
  if max_new_tokens == 0:
    return jnp.zeros((b, 0), jnp.int32)
  need = p + max_new_tokens - 1
  if max_len is None:
    max_len = p + max_new_tokens
  if max_len < need:
    raise ValueError(
        f"generate: a prompt of {p} tokens and {max_new_tokens} new tokens need "
        f"max_len >= {need} cache slots, got max_len={max_len}."
    )
  _check_cache_args("generate", model.config, b, max_len, kv_bits)
  key = rng if rng is not None else jax.random.key(0)
  return _generate(
      model, variables, prompt_ids.astype(jnp.int32), jnp.float32(temperature), key,
      max_new_tokens=max_new_tokens, kv_bits=kv_bits, max_len=max_len,
  )
