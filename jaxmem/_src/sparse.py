"""The packed sparse array: nonzero values plus a compressed index. Pure array math, no Flax.

A :class:`jaxmem.SparseArray` ``s`` of logical shape ``S`` (``n = prod(S)`` elements) stores:

* ``s.values``: the ``nnz`` kept entries in C (row-major) order. Float values keep the
  original dtype. Quantized values (``bits`` set) are int8, or flat uint8 holding
  ``8 // bits`` values per byte when ``packed`` (see :func:`jaxmem.ops.pack_ints`), with
  ``s.scale`` float32 in the block-broadcast layout of :class:`jaxmem.QArray`: of the
  rank of ``S``, and along each axis of length ``n`` its length ``c`` divides ``n`` and
  index ``i`` uses ``scale[i // (n // c)]`` (``c = n`` on a channel axis, ``c = 1`` where
  one scale is shared, anything between for groups, e.g. ``(in // 64, out)`` for int4
  groups of 64 inputs of an ``(in, out)`` kernel), so ``value = int_value * scale``
  broadcast by blocks.
* ``s.index``: uint8, which flat positions the values sit at, in one of two encodings:

  - ``'bitmask'``: one bit per element, packed 8 per byte (big-endian bit order),
    ``ceil(n / 8)`` bytes.
  - ``'rice'``: the gaps between consecutive kept positions (the relative indices of
    Deep Compression, Han et al. 2016), Golomb-Rice coded with parameter ``rice_k``:
    gap ``g`` becomes ``g >> rice_k`` in unary (that many 1 bits then a 0 bit) and
    ``g & (2**rice_k - 1)`` in ``rice_k`` plain bits. The unary stream
    (``unary_bits`` bits, padded to whole bytes) comes first, then the
    ``nnz * rice_k`` remainder bits. A 10%-dense random mask costs ~0.48 bits per
    element this way (the entropy bound is 0.47), against 1 bit for the bitmask.

Decoding is parallel (a prefix sum and a scatter), so :meth:`SparseArray.materialize`
runs under ``jax.jit``: everything that fixes a shape (``nnz``, ``unary_bits``,
``rice_k``, the encoding, the logical shape) is static pytree metadata, and only
``values``, ``index`` and ``scale`` are array leaves, so :func:`jaxmem.memory_report`
counts exactly the bytes stored. Packing reads concrete values (``nnz`` must be
known), so :func:`sparse_pack` runs outside ``jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src.qarray import (
    QArray,
    _blocked_shapes,
    _norm_axes,
    int_values,
    pack_ints,
    quantize,
    unpack_ints,
)
from jaxmem._src.tree import Compressed

ENCODINGS = ("auto", "bitmask", "rice")
_MAX_RICE_K = 24


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseArray(Compressed):
  """A packed sparse array (see the module docstring for the layout and invariants).

  Attributes:
    values: the kept entries in row-major order: float ``[nnz]`` of ``dtype``; int8
      ``[nnz]`` when ``bits`` is set; packed uint8 when ``packed``.
    index: uint8 encoding of the kept positions (``encoding``).
    scale: float32 scales when ``bits`` is set (block-broadcast: per channel, shared, or
      per group along an axis, as a QArray's), else None.
    shape: logical shape.
    dtype: dtype of the dense array :meth:`materialize` returns.
    nnz: number of stored entries.
    encoding: ``'bitmask'`` or ``'rice'``.
    rice_k: Golomb-Rice parameter (``'rice'`` only, else 0).
    unary_bits: length in bits of the unary stream (``'rice'`` only, else 0).
    bits: bit width of quantized values, or None for float values.
    channel_axes: axes of ``shape`` with their own scale (quantized values only); a
      grouped axis (``group_axis``) is derived from ``scale``'s shape.
    packed: whether quantized values are packed several per byte (``bits <= 4``).
  """

  values: jax.Array
  index: jax.Array
  scale: jax.Array | None
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  nnz: int = dataclasses.field(metadata=dict(static=True))
  encoding: str = dataclasses.field(metadata=dict(static=True))
  rice_k: int = dataclasses.field(default=0, metadata=dict(static=True))
  unary_bits: int = dataclasses.field(default=0, metadata=dict(static=True))
  bits: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  channel_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  packed: bool = dataclasses.field(default=False, metadata=dict(static=True))

  _dense_hint = "jaxmem.ops.sparse_unpack(w)"  # for Compressed's "not an array" TypeError

  @property
  def density(self) -> float:
    """``nnz / size``."""
    return self.nnz / max(self.size, 1)

  @property
  def group_axis(self) -> int | None:
    """The axis whose scales are per group of consecutive indices (quantized values), or None."""
    if self.scale is None or not hasattr(self.scale, "shape"):
      return None
    axes = [a for a, (n, c) in enumerate(zip(self.shape, self.scale.shape)) if 1 < c < n]
    return axes[0] if axes else None

  @property
  def group_size(self) -> int | None:
    """Consecutive indices of ``group_axis`` sharing a scale, or None."""
    a = self.group_axis
    return None if a is None else self.shape[a] // self.scale.shape[a]

  def materialize(self) -> jax.Array:
    """The dense array (jit-able; see :func:`jaxmem.ops.sparse_unpack`)."""
    return sparse_unpack(self)

  def __repr__(self) -> str:
    kind = "float" if self.bits is None else f"int{self.bits}" + ("/packed" if self.packed else "")
    if self.bits is not None and self.group_size:
      kind += f"/group_size={self.group_size}"
    return (
        f"SparseArray(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f}, "
        f"values={kind}, encoding={self.encoding!r}, dtype={np.dtype(self.dtype).name})"
    )


# ----------------------------------------------------------------------------- encoding (host)


def _rice_bytes(gaps: np.ndarray, k: int) -> int:
  """Bytes of the Rice code of ``gaps`` with parameter ``k`` (two byte-padded streams)."""
  unary = int((gaps >> k).sum()) + int(gaps.size)
  return -(-unary // 8) + -(-(int(gaps.size) * k) // 8)


def best_rice_k(gaps: np.ndarray) -> int:
  """The Rice parameter that minimizes the coded bytes of ``gaps`` (exact search)."""
  if gaps.size == 0:
    return 0
  best_k, best = 0, None
  for k in range(_MAX_RICE_K + 1):
    b = _rice_bytes(gaps, k)
    if best is None or b < best:
      best_k, best = k, b
    if (int(gaps.max()) >> k) == 0:  # larger k only adds remainder bits
      break
  return best_k


def rice_encode(positions: np.ndarray, k: int) -> tuple[np.ndarray, int]:
  """Rice-codes the gaps of sorted flat ``positions``; returns (uint8 bytes, unary length)."""
  positions = np.asarray(positions, np.int64)
  gaps = np.diff(positions, prepend=-1) - 1
  q = gaps >> k
  unary_len = int(q.sum()) + positions.size
  unary = np.ones(unary_len, np.uint8)
  unary[np.cumsum(q + 1) - 1] = 0  # each gap's terminating 0 bit
  r = (gaps & ((1 << k) - 1)) if k else np.zeros_like(gaps)
  rem = ((r[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
  return np.concatenate([np.packbits(unary), np.packbits(rem)]), unary_len


def _rice_decode(index: jax.Array, nnz: int, k: int, unary_bits: int) -> jax.Array:
  """Flat int32 positions from a Rice-coded index (jit-able; all sizes static)."""
  ubytes = -(-unary_bits // 8)
  ubits = jnp.unpackbits(index[:ubytes])[:unary_bits]
  (terminators,) = jnp.nonzero(ubits == 0, size=nnz)
  i = jnp.arange(nnz, dtype=jnp.int32)
  qsum = terminators.astype(jnp.int32) - i  # sum of quotients up to and including i
  if k:
    rbits = jnp.unpackbits(index[ubytes:])[: nnz * k].reshape(nnz, k).astype(jnp.int32)
    r = rbits @ (jnp.int32(1) << jnp.arange(k - 1, -1, -1, dtype=jnp.int32))
    rsum = jnp.cumsum(r)
  else:
    rsum = jnp.zeros((nnz,), jnp.int32)
  # position_i = sum_{j <= i} (gap_j + 1) - 1 with gap_j = q_j * 2**k + r_j.
  return qsum * (1 << k) + rsum + i


# ----------------------------------------------------------------------------- pack / unpack


def sparse_pack(
    x,
    *,
    mask=None,
    bits: int | None = None,
    channel_axes: Sequence[int] | None = (-1,),
    encoding: str = "auto",
    path: str = "array",
) -> SparseArray:
  """Packs an array into a :class:`jaxmem.SparseArray` (runs outside ``jit``: ``nnz`` is static).

  Args:
    x: a float array, or a symmetric :class:`jaxmem.QArray` (per channel, per tensor or
      group-wise, stacked or not): its integer values and its scales (in the QArray's
      block-broadcast layout) are stored as they are, so ``materialize()`` equals its
      ``dequantize()`` exactly.
    mask: bool array of ``x``'s shape saying which entries to store; default: the
      nonzero entries (for a QArray, the nonzero integer values).
    bits: quantize the stored float values to this many bits (2..8) with symmetric
      per-channel scales (as :func:`jaxmem.ops.quantize`); None keeps float values.
    channel_axes: axes with their own scale when ``bits`` is set; default: the last
      axis (per output feature of an ``(in, out)`` kernel); ``()`` is per-tensor.
    encoding: ``'bitmask'``, ``'rice'`` or ``'auto'`` (the smaller of the two).
    path: the leaf's path, for error messages.

  Returns:
    The packed array; ``sparse_unpack(sparse_pack(x))`` equals ``x`` exactly for float
    values (a ``-0.0`` comes back as ``0.0``).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0., 1.5], [0., 0.], [-2., 0.]])
    >>> s = sparse_pack(x)
    >>> s.nnz, s.values.tolist(), bool((s.materialize() == x).all())
    (2, [1.5, -2.0], True)
  """
  if isinstance(x, SparseArray):
    raise ValueError(f"sparse_pack '{path}': the leaf is already a SparseArray.")
  if encoding not in ENCODINGS:
    raise ValueError(f"sparse_pack '{path}': encoding={encoding!r}; use one of {ENCODINGS}.")
  if isinstance(x, Compressed) and not isinstance(x, QArray):
    raise ValueError(
        f"sparse_pack '{path}': cannot pack a {type(x).__name__}; pack float arrays or QArrays."
    )
  arrays = [x.qvalue, x.scale] if isinstance(x, QArray) else [x]
  if mask is not None:
    arrays.append(mask)
  if any(isinstance(a, jax.core.Tracer) for a in arrays):
    raise ValueError(
        f"sparse_pack '{path}': got a traced value. The number of stored entries is static "
        "metadata, so packing needs concrete arrays: call it outside jax.jit (materialize() "
        "is the part that runs under jit)."
    )
  if isinstance(x, QArray):
    return _pack_qarray(x, mask, bits, encoding, path)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"sparse_pack '{path}': dtype {x.dtype} is not float; only float leaves are packed."
    )
  if x.size >= 2**31:
    raise ValueError(f"sparse_pack '{path}': {x.size} elements exceed int32 positions.")
  xn = np.asarray(x)
  keep = _host_mask(mask, xn != 0, x.shape, path)
  positions, common = _index_fields(keep, x.shape, x.dtype, encoding)
  if bits is None:
    return SparseArray(values=jnp.asarray(xn.reshape(-1)[positions]), scale=None, **common)
  axes = _norm_axes(channel_axes or (), x.ndim, f"sparse_pack '{path}'")
  # Only kept entries matter: zero the others so they do not widen the scales.
  q = quantize(jnp.where(jnp.asarray(keep), x, 0), bits, channel_axes=axes, pack_bits=False,
               path=path)
  return _quantized(np.asarray(q.qvalue), q.scale, positions, bits, axes, common)


def _index_fields(keep: np.ndarray, shape, dtype, encoding) -> tuple[np.ndarray, dict]:
  """Kept positions, and the SparseArray fields describing them (index, shape, nnz, ...)."""
  positions = np.flatnonzero(keep)
  index, enc, k, ulen = _encode(positions, int(np.prod(shape, dtype=np.int64)), encoding)
  return positions, dict(
      index=jnp.asarray(index), shape=tuple(shape), dtype=np.dtype(dtype),
      nnz=int(positions.size), encoding=enc, rice_k=k, unary_bits=ulen,
  )


def _host_mask(mask, default: np.ndarray, shape, path: str) -> np.ndarray:
  if mask is None:
    return default
  m = np.asarray(mask)
  if m.shape != tuple(shape):
    raise ValueError(f"sparse_pack '{path}': mask shape {m.shape} != array shape {tuple(shape)}.")
  if m.dtype != np.bool_:
    raise ValueError(f"sparse_pack '{path}': mask dtype is {m.dtype}; pass a bool array.")
  return m


# Host-side packing runs these as one compiled call each (not one dispatch per jnp op).
_int_values = jax.jit(int_values)
_pack_flat = jax.jit(pack_ints, static_argnums=1)


def _pack_qarray(x: QArray, mask, bits, encoding, path) -> SparseArray:
  if bits is not None and bits != x.bits:
    raise ValueError(
        f"sparse_pack '{path}': the leaf is a {x.bits}-bit QArray but bits={bits}; leave bits "
        "unset (the QArray's values are stored as they are)."
    )
  if x.rotation is not None:
    raise ValueError(
        f"sparse_pack '{path}': the QArray is rotated (rotation={x.rotation}), so its zeros "
        "are not the weight's zeros; prune and pack before rotating, or quantize without "
        "rotate."
    )
  if not x.symmetric:
    raise ValueError(
        f"sparse_pack '{path}': the QArray is asymmetric (a zero point per group), so its "
        "integer 0 is not the value 0 and no entry can be dropped; quantize symmetrically "
        "(symmetric=True, the default) before packing sparse."
    )
  qv = np.asarray(_int_values(x))
  keep = _host_mask(mask, qv != 0, x.shape, path)
  positions, common = _index_fields(keep, x.shape, x.dtype, encoding)
  return _quantized(qv, x.scale, positions, x.bits, tuple(x.channel_axes), common)


def _quantized(qv: np.ndarray, scale, positions, bits, axes, common) -> SparseArray:
  vals = jnp.asarray(qv.reshape(-1)[positions].astype(np.int8))
  packed = bits <= 4
  if packed:
    vals = _pack_flat(vals, bits)
  return SparseArray(
      values=vals, scale=jnp.asarray(scale, jnp.float32), bits=bits, channel_axes=axes,
      packed=packed, **common,
  )


def _encode(positions: np.ndarray, n: int, encoding: str):
  """Chooses and builds the index: (uint8 bytes, encoding, rice_k, unary_bits)."""
  if encoding in ("rice", "auto"):
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    k = best_rice_k(gaps)
    if encoding == "rice" or _rice_bytes(gaps, k) < -(-n // 8):
      index, ulen = rice_encode(positions, k)
      return index, "rice", k, ulen
  bitmask = np.zeros(n, np.uint8)
  bitmask[positions] = 1
  return np.packbits(bitmask), "bitmask", 0, 0


def _positions_dense(s: SparseArray, vals: jax.Array) -> jax.Array:
  """Places the ``nnz`` values of ``vals`` into a dense flat array."""
  n = s.size
  if s.nnz == 0:
    return jnp.zeros((n,), vals.dtype)
  if s.encoding == "bitmask":
    bits = jnp.unpackbits(s.index)[:n].astype(jnp.int32)
    slot = jnp.clip(jnp.cumsum(bits) - 1, 0, s.nnz - 1)
    return jnp.where(bits.astype(bool), vals[slot], jnp.zeros((), vals.dtype))
  pos = _rice_decode(s.index, s.nnz, s.rice_k, s.unary_bits)
  return jnp.zeros((n,), vals.dtype).at[pos].set(vals, indices_are_sorted=True, unique_indices=True)


def sparse_unpack(s: SparseArray, dtype=None) -> jax.Array:
  """The dense array of a :class:`~jaxmem.SparseArray` (jit-able), as ``dtype`` (default: its own).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> s = sparse_pack(jnp.array([0., 3., 0., 0., -1.]), encoding='rice')
    >>> jax.jit(sparse_unpack)(s).tolist()
    [0.0, 3.0, 0.0, 0.0, -1.0]
  """
  if not isinstance(s, SparseArray):
    raise TypeError(f"sparse_unpack expects a SparseArray, got {type(s).__name__}.")
  dtype = dtype or s.dtype
  if s.bits is None:
    return _positions_dense(s, s.values).reshape(s.shape).astype(dtype)
  ints = unpack_ints(s.values, s.bits, -1, size=s.nnz) if s.packed else s.values
  vshape, bshape = _blocked_shapes(s.shape, s.scale.shape)  # the QArray's block broadcast
  dense = _positions_dense(s, ints.astype(jnp.float32)).reshape(vshape)
  return (dense * s.scale.reshape(bshape)).reshape(s.shape).astype(dtype)


def sparse_int_values(s: SparseArray) -> jax.Array:
  """The dense int8 values of a quantized :class:`jaxmem.SparseArray` (jit-able)."""
  if s.bits is None:
    raise ValueError("sparse_int_values: the SparseArray holds float values (bits=None).")
  ints = unpack_ints(s.values, s.bits, -1, size=s.nnz) if s.packed else s.values
  return _positions_dense(s, ints.astype(jnp.int8)).reshape(s.shape)
