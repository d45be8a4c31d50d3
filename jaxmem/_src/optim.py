"""8-bit and 4-bit blockwise-quantized optimizer states as optax transformations.

Adam keeps two float32 moments per parameter, 8 bytes per weight: twice the params. Following
Dettmers, Lewis, Shleifer and Zettlemoyer (2022), "8-bit Optimizers via Block-wise
Quantization" (ICLR 2022), the moments of large leaves are stored as :class:`jaxmem.BlockQArray`:
each row of the leaf's last axis cut into blocks (at most ``block_size`` values, see below),
each block divided by its absolute maximum (one float32 per block) and every value rounded to
the nearest entry of a fixed non-linear code of ``2**bits`` values. Each update decodes the
moments, updates them in float32 exactly as the float optimizer does, computes the step from
those float32 moments and re-encodes them. Small leaves (fewer than ``min_size`` values:
biases, norms) keep float32 moments.

**The codes** (:func:`dynamic_code`) follow the paper's dynamic tree quantization: after a
sign bit, the number of leading zero bits ``e`` is a decimal exponent, the first one bit
ends it, and the ``F`` bits after it are a linear fraction, so a code value is
``± 10**-e * (0.1 + 0.9 * k / 2**F)``, ``k = 1 .. 2**F`` (right end points of ``2**F`` equal
bins of ``(0.1, 1]``). Small magnitudes get few fraction bits and large ones many, which
keeps the relative error about constant over ``bits - 1`` decades.

* ``dynamic_signed`` (first moments): ``e = 0 .. bits-2`` with ``F = bits-2-e``, mirrored,
  plus 0 and one spare code (the pattern that would be ``-0``) used for the next decade's
  top value ``+10**-(bits-1)``. Contains 0 and ±1 exactly; 256 values for 8 bits, 16 for 4.
* ``dynamic_unsigned`` (second moments, never negative): the paper's *dynamic quantization*,
  the sign bit reused as one more fraction bit (``F = bits-1-e``, ``e = 0 .. bits-2``) plus
  the two values ``{0.55, 1} * 10**-(bits-1)`` where the all-zero exponent pattern was. It has
  **no zero**: a second moment that rounds to 0 while its first moment does not gives an
  update of ``m / eps``, the *zero-point problem* of Li, Chen and Zhu (2023), "Memory
  Efficient Optimizers with 4-bit States" (NeurIPS 2023). Here the smallest value is
  ``5.5e-8`` (8 bits) or ``5.5e-4`` (4 bits) of the block's maximum, so a tiny second moment
  rounds up (a smaller, safe step). A block of zeros still decodes to zeros (its maximum is 0).

Every value is rounded to the nearest code after dividing by its block's maximum, so
``|x - decode(encode(x))| <= max_gap / 2 * absmax`` per block, ``max_gap`` the largest gap
between consecutive code values (the block maximum itself is exact: ±1 is a code).

**Storage** of a :class:`jaxmem.BlockQArray` of shape ``[..., d]``: blocks run along the last axis
only, so the leading axes stay the param's. The block length ``b`` (:func:`row_block`) is a
divisor of ``d`` of at most ``block_size`` -- preferring one that leaves ``d / b`` a
multiple of 8, so that a last axis split over 2, 4 or 8 devices splits between blocks --
and ``d`` is zero-padded to a multiple of ``block_size`` only when no divisor of at least
``block_size / 4`` exists. ``codes`` is uint8 ``[..., d_pad]`` (8 bits) or ``[..., d_pad /
2]`` (4 bits, two codes per byte, the first in the low nibble) and ``absmax`` float32
``[..., d_pad / b]``. Both have the param's rank and leading axes, so a moment shards with
its param's ``PartitionSpec`` (:func:`jaxmem.fsdp_state_specs`). Bytes per value: ``1 + 4 /
b`` (8 bits), so an 8-bit Adam state is ``2 * (1 + 4/256) / 8 = 0.254x`` of the float32 one
at ``b = 256``. The type is a registered pytree dataclass (arrays are leaves,
``shape``/``dtype``/``code``/``bits`` static): it runs under ``jit`` and is saved and
restored by :class:`jaxmem.CheckpointManager` as ``jaxmem.BlockQArray``.

Transformations: :func:`scale_by_adam_8bit` (state :class:`ScaleByAdam8bitState`),
:func:`adam_8bit`, :func:`adamw_8bit`, :func:`scale_by_lion_8bit` and :func:`lion_8bit` (Chen
et al. (2023), "Symbolic Discovery of Optimization Algorithms"), each built like its optax
namesake (``optax.chain`` of the scaling, ``optax.add_decayed_weights`` and
``optax.scale_by_learning_rate``); ``bits=4`` gives the 4-bit variant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmem._src.base import check_int
from jaxmem._src.tree import Compressed, is_compressed, path_str

PyTree = Any
CODES = ("dynamic_signed", "dynamic_unsigned")
OPTIM_BITS = (4, 8)


# ----------------------------------------------------------------------------- codes


@functools.cache
def _code(bits: int, signed: bool) -> np.ndarray:
  """The sorted float32 code table (read-only, cached)."""
  mags = []
  fixed = 0 if signed else 1  # the unsigned code reuses the sign bit as a fraction bit
  for e in range(bits - 1):
    f = bits - 2 - e + fixed
    k = np.arange(1, 2**f + 1, dtype=np.float64)
    mags.append(10.0**-e * (0.1 + 0.9 * k / 2**f))
  mags = np.concatenate(mags)
  low = 10.0 ** -(bits - 1)
  if signed:
    values = np.concatenate([-mags, [0.0, low], mags])
  else:
    values = np.concatenate([[0.55 * low, low], mags])
  table = np.sort(values).astype(np.float32)
  assert table.size == 2**bits and np.all(np.diff(table) > 0)
  table.flags.writeable = False
  return table


def _check_bits(name: str, bits: Any) -> None:
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"{name}: bits must be an int, 8 or 4, got {bits!r}.")
  if bits not in OPTIM_BITS:
    raise ValueError(
        f"{name}: bits={bits}; block-quantized optimizer states support 8 bits (256 code "
        "values) and 4 bits (16 values, two per byte). Use bits=8 (or bits=4)."
    )


def _check_block_size(name: str, block_size: Any, bits: int) -> None:
  check_int(name, "block_size", block_size, minimum=1)
  if bits == 4 and block_size % 2:
    raise ValueError(
        f"{name}: block_size={block_size} is odd; 4-bit codes are packed two per byte within a "
        "block, so use an even block size (e.g. 256)."
    )


def _code_name(name: str, code: Any) -> bool:
  """Whether ``code`` (a code name) is the signed one; raises for an unknown name."""
  if code not in CODES:
    raise ValueError(f"{name}: code={code!r}; use one of {CODES}.")
  return code == "dynamic_signed"


def dynamic_code(bits: int = 8, signed: bool = True) -> np.ndarray:
  """The sorted code table of ``2**bits`` float32 values in ``[-1, 1]`` (module docstring).

  Args:
    bits: 8 (256 values) or 4 (16 values).
    signed: True: ``dynamic_signed`` (first moments; holds 0 and ±1); False:
      ``dynamic_unsigned`` (second moments; positive, largest value 1, no zero).

  Returns:
    A new float32 numpy array, strictly increasing.

  Raises:
    TypeError, ValueError: ``bits`` is not 8 or 4, or ``signed`` is not a bool.

  Example:
    >>> import jax.numpy as jnp
    >>> t = dynamic_code(4)
    >>> t.size, float(t[0]), float(t[-1]), 0.0 in t
    (16, -1.0, 1.0, True)
    >>> float(dynamic_code(8, signed=False).min()) == float(jnp.float32(5.5e-8))
    True
  """
  _check_bits("dynamic_code", bits)
  if not isinstance(signed, (bool, np.bool_)):
    raise TypeError(f"dynamic_code: signed must be True or False, got {signed!r}.")
  return _code(int(bits), bool(signed)).copy()


def max_code_gap(bits: int = 8, signed: bool = True) -> float:
  """The largest gap between consecutive code values: the error bound is half of it.

  Example:
    >>> round(max_code_gap(8), 6), round(max_code_gap(8, signed=False), 6)
    (0.014063, 0.007031)
  """
  return float(np.diff(dynamic_code(bits, signed)).max())


# ----------------------------------------------------------------------------- the leaf type


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockQArray(Compressed):
  """A blockwise-quantized array with a dynamic code (layout: module docstring).

  Attributes:
    codes: uint8 ``[..., d_pad]`` code indices (8 bits), or ``[..., d_pad // 2]`` with two
      4-bit indices per byte (first in the low nibble); ``...`` the leading axes of ``shape``.
    absmax: float32 ``[..., n_blocks]``, each block's largest magnitude (its scale).
    shape: the logical shape (static).
    dtype: the dtype :meth:`materialize` returns (static).
    code: ``'dynamic_signed'`` or ``'dynamic_unsigned'`` (static).
    bits: 8 or 4 (static).

  Derived: ``block_size`` (the block length ``b``), ``signed``; ``nbytes`` (real storage,
  from :class:`Compressed`).

  Example:
    >>> import jax.numpy as jnp
    >>> q = block_quantize(jnp.linspace(-1.0, 1.0, 1000), block_size=256)
    >>> q.codes.shape, q.absmax.shape, q.block_size, q.nbytes
    ((1000,), (4,), 250, 1016)
    >>> bool(jnp.abs(q.materialize() - jnp.linspace(-1.0, 1.0, 1000)).max() < 0.01)
    True
    >>> m = block_quantize(jnp.ones((30, 576, 1536)))  # rows of 1536: 8 blocks of 192
    >>> m.codes.shape, m.absmax.shape, m.block_size
    ((30, 576, 1536), (30, 576, 8), 192)
  """

  codes: jax.Array
  absmax: jax.Array
  shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(default=np.dtype(np.float32), metadata=dict(static=True))
  code: str = dataclasses.field(default="dynamic_signed", metadata=dict(static=True))
  bits: int = dataclasses.field(default=8, metadata=dict(static=True))

  _dense_hint = "w.materialize()"

  def __post_init__(self):
    # Static fields only (the leaves may be specs, shapes or None inside tree operations);
    # this also rejects an edited checkpoint layout at restore.
    if self.code not in CODES or self.bits not in OPTIM_BITS or isinstance(self.bits, bool):
      raise ValueError(
          f"BlockQArray: code={self.code!r}, bits={self.bits!r}; use a code of {CODES} and "
          f"bits in {OPTIM_BITS}."
      )
    if not isinstance(self.shape, tuple) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
        for d in self.shape
    ):
      raise ValueError(f"BlockQArray: shape={self.shape!r} must be a tuple of ints >= 0.")

  @property
  def signed(self) -> bool:
    return self.code == "dynamic_signed"

  @property
  def block_size(self) -> int:
    return self.codes.shape[-1] * (8 // self.bits) // self.absmax.shape[-1]

  def materialize(self) -> jax.Array:
    """The dense array (see :func:`jaxmem.optim.block_dequantize`)."""
    return block_dequantize(self)

  def __repr__(self) -> str:
    if not all(hasattr(x, "shape") for x in (self.codes, self.absmax)):
      return (f"BlockQArray(codes={self.codes!r}, absmax={self.absmax!r}, shape={self.shape}, "
              f"code={self.code!r}, bits={self.bits})")
    return (f"BlockQArray(shape={self.shape}, code={self.code!r}, bits={self.bits}, "
            f"block_size={self.block_size}, dtype={np.dtype(self.dtype).name})")


def block_quantize(
    x: jax.Array, *, bits: int = 8, signed: bool = True, block_size: int = 256
) -> BlockQArray:
  """Blockwise quantization with the dynamic code: nearest code after dividing by each absmax.

  Pure ``jax.numpy`` (runs under ``jit``). Each row of ``x``'s last axis is cut into blocks
  of :func:`row_block` values (a 0-d ``x`` is one row of one value); a block of zeros has
  ``absmax`` 0.

  Args:
    x: a float array (any shape; NaN/Inf make their block's decoded values NaN).
    bits: 8 or 4.
    signed: the code (see :func:`dynamic_code`); use False only for values >= 0 (negative
      values then round to the smallest positive code).
    block_size: the most values per block (even for 4 bits); see :func:`row_block`.

  Returns:
    A :class:`jaxmem.BlockQArray` with ``|x - materialize()| <= max_code_gap / 2 * absmax``
    per block.

  Raises:
    TypeError, ValueError: bad ``bits``/``block_size``/``signed``, or ``x`` is not float.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([0.5, -2.0, 0.0, 1e-3])
    >>> q = block_quantize(x, block_size=2)
    >>> q.codes.dtype, q.block_size, q.absmax.tolist() == [2.0, float(jnp.float32(1e-3))]
    (dtype('uint8'), 2, True)
    >>> y = q.materialize()
    >>> float(y[1]), float(y[3]) == float(x[3]), bool(abs(y[0] - 0.5) <= max_code_gap() / 2 * 2.0)
    (-2.0, True, True)
  """
  name = "block_quantize"
  _check_bits(name, bits)
  _check_block_size(name, block_size, bits)
  if not isinstance(signed, (bool, np.bool_)):
    raise TypeError(f"{name}: signed must be True or False, got {signed!r}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: x must be a float array, got dtype {x.dtype}.")
  shape = tuple(int(d) for d in x.shape) or (1,)
  return _encode(x, int(bits), bool(signed), row_block(shape[-1], int(block_size), int(bits)))


def row_block(d: int, block_size: int = 256, bits: int = 8) -> int:
  """The block length along a last axis of ``d`` values (module docstring, "Storage").

  The largest divisor ``b <= block_size`` of ``d`` with ``b >= block_size / 2`` and ``d / b``
  a multiple of 8; else the largest divisor ``>= block_size / 4``; else ``min(block_size,
  d)`` (rounded up to even for 4 bits), the last block of each row zero-padded. 4-bit blocks
  are even.

  Example:
    >>> row_block(1536), row_block(576), row_block(49152), row_block(1021), row_block(10)
    (192, 192, 256, 256, 10)
  """
  def ok(b):
    return d % b == 0 and (bits == 8 or b % 2 == 0)

  top = min(block_size, d)
  for b in range(top, max(1, block_size // 2) - 1, -1):
    if ok(b) and (d // b) % 8 == 0:
      return b
  for b in range(top, max(1, block_size // 4) - 1, -1):
    if ok(b):
      return b
  return top + (top % 2 if bits == 4 else 0)


@functools.cache
def _bucket_table(bits: int, signed: bool):
  """A lookup table for the nearest code of a magnitude ``a`` in ``[0, 1]`` from its bits.

  The table ``t`` searched is the code's values >= 0. Buckets are ranges of float32 bit
  patterns of equal leading bits (``a``'s bits shifted right by ``shift``), fine enough that
  each holds at most one midpoint between consecutive values of ``t`` (checked here); the
  buckets below the smallest midpoint's are merged into bucket 0. For each bucket: ``cand``,
  the number of midpoints below its start, and ``mid``, the next midpoint (``inf`` if none),
  so the nearest index (ties to the lower value) is ``cand + (a > mid)``.
  """
  t = _code(bits, signed)
  t = t[t >= 0].astype(np.float64)
  mids = ((t[1:] + t[:-1]) / 2).astype(np.float32)
  for keep in range(1, 16):  # mantissa bits kept
    shift = 23 - keep
    key = lambda v, shift=shift: int(np.asarray(v, np.float32).view(np.int32) >> shift)
    base, n = key(mids[0] / 2), key(1.0) - key(mids[0] / 2) + 1
    lo = ((np.arange(n) + base) << shift).astype(np.int32).view(np.float32).copy()
    lo[0] = 0.0
    cand = np.searchsorted(mids, lo)
    inside = np.searchsorted(mids, np.append(lo[1:], np.inf)) - cand
    if inside.max() <= 1:
      mid = np.append(mids, np.inf).astype(np.float32)[cand]
      return shift, base, n, cand.astype(np.int32), mid, float(mids[0])
  raise AssertionError("no bucket size separates the code's midpoints")  # pragma: no cover


def _nearest_magnitude(a: jax.Array, bits: int, signed: bool) -> jax.Array:
  """Index of the nearest code value >= 0 to ``a >= 0`` (int32; see :func:`_bucket_table`)."""
  shift, base, n, cand, mid, _ = _bucket_table(bits, signed)
  key = jax.lax.bitcast_convert_type(a, jnp.int32) >> shift
  b = jnp.clip(key - base, 0, n - 1)
  return jnp.take(jnp.asarray(cand), b) + (a > jnp.take(jnp.asarray(mid), b)).astype(jnp.int32)


def _nearest(y: jax.Array, bits: int, signed: bool) -> jax.Array:
  """uint8 index of the code value nearest to ``y`` (ties: the lower magnitude).

  Two small gathers per value (:func:`_bucket_table`) instead of a binary search. Signed:
  the positive half is ``[0, spare, mags...]``, the negative one ``-[0, mags...]`` (no
  spare), so a negative value's index among ``[0, mags...]`` is read off the positive one.
  """
  if not signed:
    return _nearest_magnitude(y, bits, False).astype(jnp.uint8)
  zero = 2 ** (bits - 1) - 1  # index of 0 in the signed table
  a = jnp.abs(y)
  pos = _nearest_magnitude(a, bits, True)  # in [0, spare, mags...]
  below_first = a <= jnp.float32(float(_code(bits, True)[zero + 2]) / 2)  # nearer 0 than mags[0]
  neg = jnp.where(pos >= 2, pos - 1, jnp.where((pos == 1) & ~below_first, 1, 0))
  return jnp.where(y < 0, zero - neg, zero + pos).astype(jnp.uint8)


def _rows(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
  """(leading axes, last axis) of a moment's shape (a 0-d one is one row of one value)."""
  shape = shape or (1,)
  return shape[:-1], shape[-1]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _encode(x: jax.Array, bits: int, signed: bool, block: int) -> BlockQArray:
  """:func:`block_quantize` after its checks, with the exact block length ``block``."""
  shape = tuple(int(d) for d in x.shape)
  lead, d = _rows(shape)
  n_blocks = -(-d // block)
  rows = x.reshape(lead + (d,)).astype(jnp.float32)
  if n_blocks * block != d:
    rows = jnp.pad(rows, [(0, 0)] * len(lead) + [(0, n_blocks * block - d)])
  blocks = rows.reshape(lead + (n_blocks, block))
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  scale = jnp.where(absmax > 0, absmax, jnp.float32(1.0))
  codes = _nearest(blocks / scale[..., None], bits, signed)
  if bits == 4:
    codes = codes[..., 0::2] | (codes[..., 1::2] << jnp.uint8(4))
  return BlockQArray(codes.reshape(lead + (-1,)), absmax, shape=shape, dtype=np.dtype(x.dtype),
                     code=CODES[0] if signed else CODES[1], bits=bits)


def block_codes(q: BlockQArray) -> jax.Array:
  """The code indices of ``q`` as uint8 ``[..., d_pad]`` (4-bit ones unpacked)."""
  if q.bits == 8:
    return q.codes
  lo, hi = q.codes & jnp.uint8(15), q.codes >> jnp.uint8(4)
  return jnp.stack([lo, hi], axis=-1).reshape(q.codes.shape[:-1] + (-1,))


def block_dequantize(q: BlockQArray) -> jax.Array:
  """The dense array of a :class:`~jaxmem.BlockQArray`: ``table[code] * absmax``, cropped, reshaped.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> block_dequantize(block_quantize(x, signed=False, block_size=4)).shape
    (2, 3)
  """
  if not isinstance(q, BlockQArray):
    raise TypeError(f"block_dequantize: expected a BlockQArray, got {type(q).__name__}.")
  _code_name("block_dequantize", q.code)
  return _decode(q)


@jax.jit
def _decode(q: BlockQArray) -> jax.Array:
  table = jnp.asarray(_code(q.bits, q.signed))
  lead, d = _rows(q.shape)
  n_blocks = q.absmax.shape[-1]
  codes = block_codes(q).astype(jnp.int32).reshape(lead + (n_blocks, q.block_size))
  values = (jnp.take(table, codes) * q.absmax[..., None]).reshape(lead + (-1,))
  return values[..., :d].reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------- argument checks


def _check_real(name: str, arg: str, v: Any, *, lo: float, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = True) -> None:
  """A real number (or 0-d array; traced ones unchecked) in the given range."""
  if isinstance(v, (bool, np.bool_)) or not (
      isinstance(v, (int, float, np.integer, np.floating))
      or (hasattr(v, "dtype") and hasattr(v, "shape") and v.shape == ()
          and jnp.issubdtype(v.dtype, jnp.number))
  ):
    raise TypeError(f"{name}: {arg} must be a real number, got {v!r}.")
  if isinstance(v, jax.core.Tracer):
    return
  f = float(v)
  below = f <= lo if lo_open else f < lo
  above = hi is not None and (f >= hi if hi_open else f > hi)
  if not math.isfinite(f) or below or above:
    top = "inf" if hi is None else hi
    rng = f"{'(' if lo_open else '['}{lo}, {top}{')' if hi_open else ']'}"
    raise ValueError(f"{name}: {arg}={v!r}; it must be finite and in {rng}.")


def _check_rate(name: str, learning_rate: Any) -> None:
  if callable(learning_rate):
    return
  try:
    _check_real(name, "learning_rate", learning_rate, lo=0.0, hi=None)
  except TypeError:
    raise TypeError(
        f"{name}: learning_rate must be a number or an optax schedule (step -> rate), got "
        f"{learning_rate!r}."
    ) from None


def _check_layout(name: str, bits: Any, block_size: Any, min_size: Any) -> None:
  _check_bits(name, bits)
  _check_block_size(name, block_size, bits)
  check_int(name, "min_size", min_size, minimum=0)


# ----------------------------------------------------------------------------- moments


def _init_moment(name: str, params: PyTree, signed: bool, bits: int, block_size: int,
                 min_size: int) -> PyTree:
  """Zero moments: a BlockQArray for leaves of >= ``min_size`` values, else float32."""

  def one(path, p):
    where = path_str(path)
    if is_compressed(p):
      raise TypeError(
          f"{name}: leaf '{where}' is a compressed {type(p).__name__}, which has no gradient; "
          "train only the float leaves (jaxmem.train_step and jaxmem.init_step_state leave "
          "compressed leaves out), or pass its dense float array."
      )
    dtype = getattr(p, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{name}: leaf '{where}' has dtype {dtype or type(p).__name__}; optimizer states are "
          "kept for float leaves only. Leave integer/bool leaves out of the optimized tree "
          "(e.g. jaxmem.train_step(..., trainable=...) or optax.masked)."
      )
    shape = tuple(int(d) for d in p.shape)
    if math.prod(shape) >= min_size:
      q = _zeros(shape, bits, signed, row_block(_rows(shape)[1], block_size, bits))
      if q.nbytes < 2 * math.prod(shape):  # not for rows too short to amortize their scales
        return q
    return jnp.zeros(p.shape, jnp.float32)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_compressed)


def _zeros(shape: tuple[int, ...], bits: int, signed: bool, block: int) -> BlockQArray:
  """``block_quantize(zeros(shape))`` without running it: every code the one of 0.

  (The unsigned code has no 0; its smallest value times an absmax of 0 decodes to 0.)
  """
  lead, d = _rows(shape)
  n_blocks = -(-d // block)
  zero = int(np.searchsorted(_code(bits, signed), 0.0)) if signed else 0
  byte = zero | (zero << 4) if bits == 4 else zero
  codes = jnp.full(lead + (n_blocks * block * bits // 8,), byte, jnp.uint8)
  return BlockQArray(codes, jnp.zeros(lead + (n_blocks,), jnp.float32), shape=shape,
                     dtype=np.dtype(np.float32), code=CODES[0] if signed else CODES[1], bits=bits)


def _leaves(name: str, updates: PyTree, *moments: PyTree):
  """(treedef, paths, grads, [moment leaves...]) with shapes checked."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
  paths = [path_str(p) for p, _ in flat]
  out = []
  for moment in moments:
    try:
      leaves = treedef.flatten_up_to(moment)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"{name}: the updates tree does not match the optimizer state's ({e}). Initialize "
          "the optimizer on params of the same structure as the gradients."
      ) from None
    for path, (_, g), m in zip(paths, flat, leaves):
      if tuple(m.shape) != tuple(g.shape):
        raise ValueError(
            f"{name}: update '{path}' has shape {tuple(g.shape)} but its optimizer state has "
            f"shape {tuple(m.shape)}; initialize the optimizer on these params."
        )
    out.append(leaves)
  return treedef, [g for _, g in flat], out


def _dense(m) -> jax.Array:
  return block_dequantize(m) if isinstance(m, BlockQArray) else m


def _like(m, x: jax.Array):
  """``x`` (float32) stored like ``m``: re-encoded for a BlockQArray, float32 otherwise."""
  if isinstance(m, BlockQArray):
    return _encode(x, m.bits, m.signed, m.block_size)
  return x.astype(m.dtype)


def _parts(m):
  return (m.codes, m.absmax) if isinstance(m, BlockQArray) else m


def _rebuilt(m, parts, shape):
  """``parts`` (from :func:`_parts`) as a value like ``m`` of logical ``shape``."""
  if isinstance(m, BlockQArray):
    return dataclasses.replace(m, codes=parts[0], absmax=parts[1], shape=shape)
  return parts


def _per_leaf(fn, g: jax.Array, *moments):
  """``fn(g, *moments) -> (update, *new_moments)`` on one leaf.

  A leaf of rank >= 3 with quantized moments (stacked layers ``[L, ...]``) is updated one
  slice of its leading axis at a time, in a loop that writes each slice's update over the
  gradient's and each slice's codes over the old ones (in place), so only one layer's
  decoded float32 moments are ever live and no second leaf-sized buffer is made. Blocks
  never cross rows, so the result is the same bits as one whole-leaf update.
  """
  if g.ndim < 3 or g.shape[0] < 2 or not any(isinstance(m, BlockQArray) for m in moments):
    return fn(g, *moments)

  def body(i, carry):
    u, parts = carry
    out = fn(u[i], *(_rebuilt(m, jax.tree.map(lambda a: a[i], p), m.shape[1:])
                     for m, p in zip(moments, parts)))
    parts = [jax.tree.map(lambda a, b: a.at[i].set(b), p, _parts(n))
             for p, n in zip(parts, out[1:])]
    return u.at[i].set(out[0].astype(u.dtype)), parts

  u, parts = jax.lax.fori_loop(0, g.shape[0], body, (g, [_parts(m) for m in moments]))
  return (u, *(_rebuilt(m, p, m.shape) for m, p in zip(moments, parts)))


def _map_leaves(fn, treedef, grads, *moments):
  """``(updates, *new_moments)`` trees of :func:`_per_leaf` ``(fn, g, *m)`` on every leaf."""
  outs = [_per_leaf(fn, g, *ms) for g, *ms in zip(grads, *moments)]
  return tuple(jax.tree.unflatten(treedef, list(col)) for col in zip(*outs))


def _with_rate(name: str, scaling, learning_rate, weight_decay=None, mask=None):
  """``optax.chain(scaling[, add_decayed_weights], scale_by_learning_rate)``, as optax builds
  ``adam``/``adamw``/``lion``, after checking the rate and the decay."""
  _check_rate(name, learning_rate)
  parts = [scaling]
  if weight_decay is not None:
    _check_real(name, "weight_decay", weight_decay, lo=0.0)
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------- Adam


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  Attributes:
    count: ``[] int32``, updates so far.
    mu: first moments, the params' structure: a ``dynamic_signed`` :class:`jaxmem.BlockQArray`
      per leaf of >= ``min_size`` values, float32 arrays for the others.
    nu: second moments, likewise with ``dynamic_unsigned`` codes.
  """

  count: jax.Array
  mu: PyTree
  nu: PyTree


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    bits: int = 8,
    block_size: int = 256,
    min_size: int = 4096,
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with block-quantized moments (8 or 4 bits) for large leaves.

  Each update decodes the moments, updates them in float32 (``mu = b1 mu + (1-b1) g``,
  ``nu = b2 nu + (1-b2) g**2``), returns ``mu_hat / (sqrt(nu_hat) + eps)`` computed from
  those float32 moments (bias-corrected as optax does) and re-encodes them
  (:func:`block_quantize`). Leaves of rank >= 3 (stacked layers) are updated one slice of
  their leading axis at a time, so the decoded float32 moments live for one layer only.
  Leaves with fewer than ``min_size`` values keep float32
  moments, so the first update equals optax's exactly and later ones differ by the moments'
  rounding (``<= max_code_gap / 2 * absmax`` per block and step).

  Args:
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    eps: added to ``sqrt(nu_hat)``, > 0.
    bits: 8 (default) or 4.
    block_size: values per quantization block (default 256; even for 4 bits).
    min_size: leaves with at least this many values get quantized moments (default 4096).

  Returns:
    An optax ``GradientTransformation`` whose state is a :class:`ScaleByAdam8bitState`.

  Raises:
    TypeError, ValueError: an argument of the wrong type or range (at build time); a
      compressed or non-float leaf in the params (at ``init``); gradients whose tree or
      shapes differ from the state's (at ``update``).

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_adam_8bit(min_size=1000)
    >>> params = {'w': jnp.ones((64, 32)), 'b': jnp.zeros(32)}
    >>> state = tx.init(params)
    >>> type(state.mu['w']).__name__, type(state.mu['b']).__name__
    ('BlockQArray', 'ArrayImpl')
    >>> updates, state = tx.update({'w': jnp.full((64, 32), 0.5), 'b': jnp.ones(32)}, state)
    >>> round(float(updates['w'][0, 0]), 4), int(state.count)
    (1.0, 1)
  """
  name = "scale_by_adam_8bit"
  _check_real(name, "b1", b1, lo=0.0, hi=1.0)
  _check_real(name, "b2", b2, lo=0.0, hi=1.0)
  _check_real(name, "eps", eps, lo=0.0, lo_open=True)
  _check_layout(name, bits, block_size, min_size)

  def init_fn(params):
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=_init_moment(name, params, True, bits, block_size, min_size),
        nu=_init_moment(name, params, False, bits, block_size, min_size),
    )

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, ScaleByAdam8bitState):
      raise TypeError(f"{name}: state is a {type(state).__name__}, not a ScaleByAdam8bitState.")
    treedef, grads, (mus, nus) = _leaves(name, updates, state.mu, state.nu)
    count = optax.safe_increment(state.count)
    bc1 = 1 - b1**count
    bc2 = 1 - b2**count

    def leaf(g, m, v):
      g32 = g.astype(jnp.float32)
      m32 = (1 - b1) * g32 + b1 * _dense(m)
      v32 = (1 - b2) * (g32**2) + b2 * _dense(v)
      u = (m32 / bc1.astype(jnp.float32)) / (jnp.sqrt(v32 / bc2.astype(jnp.float32)) + eps)
      return u.astype(g.dtype), _like(m, m32), _like(v, v32)

    updates, mu, nu = _map_leaves(leaf, treedef, grads, mus, nus)
    return updates, ScaleByAdam8bitState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adam_8bit(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    bits: int = 8,
    block_size: int = 256,
    min_size: int = 4096,
) -> optax.GradientTransformation:
  """Adam with block-quantized moments: :func:`scale_by_adam_8bit` then the learning rate.

  Args:
    learning_rate: a number > = 0 or an optax schedule.
    b1, b2, eps, bits, block_size, min_size: see :func:`scale_by_adam_8bit`.

  Returns:
    ``optax.chain(scale_by_adam_8bit(...), optax.scale_by_learning_rate(learning_rate))``.

  Raises:
    TypeError, ValueError: as :func:`scale_by_adam_8bit`, or a bad ``learning_rate``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.ones(8192)}
    >>> tx = adam_8bit(1e-2)
    >>> updates, _ = tx.update({'w': jnp.ones(8192)}, tx.init(params))
    >>> round(float(optax.apply_updates(params, updates)['w'][0]), 6)
    0.99
  """
  return _with_rate(
      "adam_8bit",
      scale_by_adam_8bit(b1, b2, eps, bits=bits, block_size=block_size, min_size=min_size),
      learning_rate)


def adamw_8bit(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    bits: int = 8,
    block_size: int = 256,
    min_size: int = 4096,
    mask: Any = None,
) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) with block-quantized moments, built like ``optax.adamw``.

  Args:
    learning_rate: a number >= 0 or an optax schedule.
    b1, b2, eps: see :func:`scale_by_adam_8bit`.
    weight_decay: decoupled weight decay rate (>= 0), applied before the learning rate.
    bits: 8 (default) or 4 (``adamw_8bit(..., bits=4)`` is the 4-bit variant).
    block_size, min_size: see :func:`scale_by_adam_8bit`.
    mask: which leaves are decayed (``optax.add_decayed_weights``'s ``mask``).

  Returns:
    ``optax.chain(scale_by_adam_8bit(...), optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate))``.

  Raises:
    TypeError, ValueError: as :func:`scale_by_adam_8bit`, or a bad ``learning_rate`` or
      ``weight_decay``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxmem
    >>> params = {'w': jnp.ones((32, 256))}
    >>> tx8, tx32 = adamw_8bit(1e-3), optax.adamw(1e-3)
    >>> s8, s32 = tx8.init(params), tx32.init(params)
    >>> round(jaxmem.tree_bytes(s8) / jaxmem.tree_bytes(s32), 3)
    0.254
    >>> step = jax.jit(tx8.update)
    >>> updates, s8 = step({'w': jnp.ones((32, 256))}, s8, params)
    >>> round(float(updates['w'][0, 0]), 7)
    -0.0010001
  """
  return _with_rate(
      "adamw_8bit",
      scale_by_adam_8bit(b1, b2, eps, bits=bits, block_size=block_size, min_size=min_size),
      learning_rate, weight_decay, mask)


# ----------------------------------------------------------------------------- Lion


class ScaleByLion8bitState(NamedTuple):
  """State of :func:`scale_by_lion_8bit`: ``count`` and the momentum ``mu`` (like Adam's)."""

  count: jax.Array
  mu: PyTree


def scale_by_lion_8bit(
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    bits: int = 8,
    block_size: int = 256,
    min_size: int = 4096,
) -> optax.GradientTransformation:
  """``optax.scale_by_lion`` with a block-quantized momentum for large leaves.

  The update is ``sign((1-b1) g + b1 mu)`` from the decoded momentum; then
  ``mu = (1-b2) g + b2 mu`` is re-encoded (``dynamic_signed``).

  Args:
    b1: interpolation of the update, in ``[0, 1)``.
    b2: momentum decay, in ``[0, 1)``.
    bits, block_size, min_size: see :func:`scale_by_adam_8bit`.

  Returns:
    An optax ``GradientTransformation`` whose state is a :class:`ScaleByLion8bitState`.

  Raises:
    TypeError, ValueError: as :func:`scale_by_adam_8bit`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_lion_8bit()
    >>> state = tx.init({'w': jnp.zeros(5000)})
    >>> updates, state = tx.update({'w': -jnp.ones(5000)}, state)
    >>> float(updates['w'][0]), type(state.mu['w']).__name__
    (-1.0, 'BlockQArray')
  """
  name = "scale_by_lion_8bit"
  _check_real(name, "b1", b1, lo=0.0, hi=1.0)
  _check_real(name, "b2", b2, lo=0.0, hi=1.0)
  _check_layout(name, bits, block_size, min_size)

  def init_fn(params):
    return ScaleByLion8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=_init_moment(name, params, True, bits, block_size, min_size),
    )

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, ScaleByLion8bitState):
      raise TypeError(f"{name}: state is a {type(state).__name__}, not a ScaleByLion8bitState.")
    treedef, grads, (mus,) = _leaves(name, updates, state.mu)

    def leaf(g, m):
      g32, m32 = g.astype(jnp.float32), _dense(m)
      return (jnp.sign((1.0 - b1) * g32 + b1 * m32).astype(g.dtype),
              _like(m, (1 - b2) * g32 + b2 * m32))

    updates, mu = _map_leaves(leaf, treedef, grads, mus)
    return updates, ScaleByLion8bitState(count=optax.safe_increment(state.count), mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def lion_8bit(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    *,
    bits: int = 8,
    block_size: int = 256,
    min_size: int = 4096,
    mask: Any = None,
) -> optax.GradientTransformation:
  """Lion with a block-quantized momentum, built like ``optax.lion``.

  Args:
    learning_rate: a number >= 0 or an optax schedule.
    b1, b2, bits, block_size, min_size: see :func:`scale_by_lion_8bit`.
    weight_decay: decoupled weight decay rate (>= 0).
    mask: which leaves are decayed (``optax.add_decayed_weights``'s ``mask``).

  Returns:
    ``optax.chain(scale_by_lion_8bit(...), optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate))``.

  Raises:
    TypeError, ValueError: as :func:`scale_by_lion_8bit`, or a bad ``learning_rate`` or
      ``weight_decay``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = lion_8bit(1e-3, weight_decay=0.0)
    >>> params = {'w': jnp.ones(4096)}
    >>> updates, _ = tx.update({'w': jnp.ones(4096)}, tx.init(params), params)
    >>> float(updates['w'][0]) == float(jnp.float32(-1e-3))
    True
  """
  return _with_rate(
      "lion_8bit", scale_by_lion_8bit(b1, b2, bits=bits, block_size=block_size,
                                      min_size=min_size),
      learning_rate, weight_decay, mask)
