"""The quantized array: a pytree of integer values and float scales. Pure array math, no Flax.

Invariants of a :class:`QArray` ``q`` of logical shape ``S`` (``q.shape``):

* **Every array leaf has the rank of ``S`` and keeps its leading axes.** Slicing all
  leaves along a leading axis (``lax.scan``, ``nn.scan``/``nnx.scan``, ``vmap`` or
  indexing ``q[i]`` over a stacked ``[L, ...]`` param) gives a valid QArray of one slice,
  and stacking QArrays of equal layout (``jax.tree.map(jnp.stack, ...)``) gives the
  stacked one. Nothing static states a shape: ``q.shape`` is derived from the leaves, and
  the one static axis (``pack_axis``) is counted from the end, so removing or adding
  leading axes keeps it true.
* ``q.qvalue`` holds integers of ``bits`` bits as ``int8``: symmetric values in
  ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, asymmetric codes in
  ``[-2**(bits-1), 2**(bits-1) - 1]``. Unpacked it has shape ``S``. Packed
  (``pack_axis`` set, ``bits <= 4``) it is ``uint8`` with ``8 // bits`` values per byte
  (3-bit values use 4 bits) *along that one axis*: adjacent values ``k*per .. k*per+per-1``
  of the axis share byte ``k``, so its length is ``S[pack_axis] // per`` and the other
  axes are untouched. A shard of the packed axis holds a contiguous range of values.
* ``q.scale`` is float32, float16 or bfloat16 (:data:`SCALE_DTYPES`; half precision
  halves the scales' bytes, see ``quantize(scale_dtype=)``) of the same rank as ``S``.
  Products and ``dequantize`` compute in float32 from it. Along each axis its length ``s``
  divides ``S[a]``, and the value at index ``i`` uses ``scale[i // (S[a] // s)]``: length
  1 is a scale shared along the axis, ``S[a]`` is one scale per index (a *channel* axis),
  anything between is *groups* of ``S[a] // s`` consecutive indices. Scales, offsets and
  values therefore shard along every axis their float param does (the group size, and
  the packing factor on the packed axis, dividing the shard).
* ``q.offset`` is None (symmetric) or of the scale's dtype and shape (asymmetric, a
  per-group zero point): ``dequantize(q) = qvalue * scale + offset``, broadcast by
  blocks as above, cast to ``q.dtype``. GGUF ``Q4_1``'s ``d * code + m`` is
  ``qvalue = code - 8``, ``scale = d``, ``offset = m + 8 d``.
* ``|x - dequantize(quantize(x))| <= scale / 2`` elementwise (round to nearest), up to
  float32 rounding (with a half-precision asymmetric ``scale_dtype``, up to the rounding
  of the offset too).
* ``q.rotation`` is None, or ``(axis, block)`` (the axis counted from the end): the values
  quantize ``hadamard(x, axis, block)``, ``x`` rotated by an orthonormal Walsh-Hadamard
  matrix in consecutive blocks of ``block`` (a power of two) along that axis, and
  ``dequantize`` rotates back, so it still approximates ``x``. Products contract the
  rotated axis with an activation rotated the same way (``(a R)(R w) = a w``: ``R`` is
  symmetric and its own inverse), which spreads activation outliers over each block
  before W8A8 rounds them (QuaRot, Ashkboos et al. 2024, with block-diagonal rotations
  applied at run time). Scales and the bound above hold in the rotated basis.

Static pytree metadata: ``bits``, ``dtype``, ``pack_axis``, ``act_bits`` and ``rotation``.

**Why the activation policy (``act_bits``) stays on the weight.** It is the recipe's
decision, made with the weights (W8A8 needs scales that are 1 on the contracted axes,
SmoothQuant-style recipes fold activation scales into the weight, QAT trains for one
policy), so it travels with them through ``chain``, checkpoints and
:func:`jaxmem.apply` without a separate rule table that can drift from the params.
Switching a layer's policy does not re-quantize it: :func:`jaxmem.set_act_bits` rewrites
only this static field (the integer values and scales are shared, not recomputed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src.base import check_bool, check_group_size, require_finite
from jaxmem._src.tree import Compressed

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def check_scale_dtype(scale_dtype, name: str) -> np.dtype:
  """``scale_dtype`` as a numpy dtype; a ValueError unless it is one of :data:`SCALE_DTYPES`."""
  try:
    dt = np.dtype(scale_dtype)
  except TypeError:
    dt = None
  if dt not in SCALE_DTYPES or isinstance(scale_dtype, bool):
    raise ValueError(
        f"{name}: scale_dtype={scale_dtype!r}; use float32 (default), float16 or bfloat16.")
  return dt


def check_bits(bits: int, name: str) -> None:
  """Raises a ValueError unless ``bits`` is an int in :data:`SUPPORTED_BITS`."""
  if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or bits not in SUPPORTED_BITS:
    raise ValueError(f"{name}: bits={bits!r} is not supported; use one of {SUPPORTED_BITS}.")


def check_act_bits(act_bits, name: str) -> None:
  """Raises a ValueError unless ``act_bits`` is 8, 16 or None."""
  if act_bits not in (None, 8, 16) or isinstance(act_bits, bool):
    raise ValueError(
        f"{name}: act_bits={act_bits!r}; use 8 (int8 activations per token, W8A8), 16 "
        "(bfloat16 activations, W8A16) or None (weight-only, float activations)."
    )


def scalar_group_error(path: str, group_size: int) -> ValueError:
  """The error for group-wise scales on a 0-d leaf."""
  return ValueError(
      f"quantize '{path}': the leaf is 0-d (a scalar), so it has no axis to split into groups "
      f"of group_size={group_size}. Leave it out with `where`, or quantize it in a separate "
      "transform with group_size=None."
  )


def values_per_byte(bits: int) -> int:
  """How many ``bits``-bit values one packed byte holds (4, 2, or 1 for bits > 4)."""
  return 4 if bits == 2 else 2 if bits <= 4 else 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray(Compressed):
  """An integer-quantized array, symmetric or asymmetric (invariants: module docstring).

  Attributes:
    qvalue: int8 values of the logical shape, or uint8 packed along ``pack_axis``.
    scale: float32/float16/bfloat16 scales of the values' rank (block-broadcast, see the
      module docstring).
    offset: None (symmetric) or zero points of the scale's dtype and shape (asymmetric).
    bits: bit width, 2..8.
    dtype: dtype ``dequantize`` returns (the original float dtype).
    pack_axis: the (negative) axis packed ``8 // bits`` values per byte, or None.
    act_bits: how layers running this weight treat their input: 8 = dynamic int8 per
      token and an integer matmul (W8A8), 16 = bfloat16 activations (W8A16), None =
      weight-only (see the module docstring for why this lives on the weight).
    rotation: None, or ``(axis, block)``: the values are of the weight rotated by
      block Walsh-Hadamard matrices along ``axis`` (negative; see the module docstring).

  Derived (from the leaves, so true for every slice): ``shape``, ``packed``,
  ``symmetric``, ``block_shape``, ``channel_axes``, ``group_axis``, ``group_size``.
  """

  qvalue: jax.Array
  scale: jax.Array
  offset: jax.Array | None = None
  bits: int = dataclasses.field(default=8, metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(default=np.dtype(np.float32), metadata=dict(static=True))
  pack_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  act_bits: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  rotation: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))

  _dense_hint = "jaxmem.ops.dequantize(w)"  # for Compressed's "not an array" TypeError

  def __post_init__(self):
    # Static metadata only (leaves may be tracers or specs): a rotation read from a file is
    # validated before any product builds its matrix.
    r = self.rotation
    if r is not None and not (
        isinstance(r, tuple) and len(r) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in r)
        and r[0] < 0 and r[1] >= 2 and not r[1] & (r[1] - 1)):
      raise ValueError(f"QArray: rotation={r!r}; expected None or (negative axis, power-of-two "
                       "block), e.g. (-2, 64).")

  @property
  def shape(self) -> tuple[int, ...]:
    shape = list(self.qvalue.shape)
    if self.pack_axis is not None:
      shape[self.pack_axis] *= values_per_byte(self.bits)
    return tuple(shape)

  @property
  def packed(self) -> bool:
    return self.pack_axis is not None

  @property
  def symmetric(self) -> bool:
    return self.offset is None

  @property
  def block_shape(self) -> tuple[int, ...]:
    """Per axis, how many consecutive values share one scale (1 for a channel axis)."""
    return tuple(n // max(s, 1) for n, s in zip(self.shape, self.scale.shape, strict=True))

  @property
  def channel_axes(self) -> tuple[int, ...]:
    """Axes (of length > 1) with one scale per index."""
    return tuple(a for a, (n, b) in enumerate(zip(self.shape, self.block_shape)) if b == 1 < n)

  @property
  def group_axis(self) -> int | None:
    """The axis split into groups (1 < group size < its length), or None."""
    axes = [a for a, (n, b) in enumerate(zip(self.shape, self.block_shape)) if 1 < b < n]
    return axes[0] if axes else None

  @property
  def group_size(self) -> int | None:
    a = self.group_axis
    return None if a is None else self.block_shape[a]

  def __getitem__(self, index) -> QArray:
    """Slices leading axes: ``q[i]`` of a stacked ``[L, ...]`` QArray is layer ``i``'s QArray.

    ``index`` is an int, a slice, or a tuple of them over leading axes that are neither
    packed nor grouped (every leaf is indexed alike; a scale shared along an axis is kept).
    """
    idx = index if isinstance(index, tuple) else (index,)
    ndim = len(self.shape)
    bad = len(idx) >= ndim or any(
        not isinstance(i, (int, np.integer, slice)) or isinstance(i, bool) for i in idx
    )
    if not bad:
      blocks = self.block_shape
      pack = None if self.pack_axis is None else self.pack_axis % ndim
      rot = None if self.rotation is None else self.rotation[0] % ndim
      bad = any(a in (pack, rot) or 1 < blocks[a] < self.shape[a] for a in range(len(idx)))
    if bad:  # the generic "not an array" hint, then what slicing a QArray does support
      raise TypeError(
          f"{self._not_an_array(f'indexing (w[{index!r}])')} A QArray of shape {self.shape} "
          "slices only by ints and slices over its leading axes that are neither packed, "
          "grouped nor rotated, keeping at least one axis (e.g. q[i] for layer i of a stacked "
          "[L, ...] QArray); for other indexing dequantize inside the jitted function."
      )

    def take(x):
      if x is None:
        return None
      sub = tuple(
          i if x.shape[a] > 1 or self.shape[a] == 1 else (0 if isinstance(i, (int, np.integer))
                                                            else slice(None))
          for a, i in enumerate(idx)
      )
      return x[sub]

    return dataclasses.replace(
        self, qvalue=self.qvalue[idx], scale=take(self.scale), offset=take(self.offset)
    )

  def dequantize(self) -> jax.Array:
    return dequantize(self)

  def materialize(self) -> jax.Array:
    return dequantize(self)

  def __repr__(self) -> str:
    if not all(hasattr(x, "shape") for x in (self.qvalue, self.scale)):
      # A QArray-shaped tree of other things (PartitionSpecs, shardings, shapes).
      return (f"QArray(qvalue={self.qvalue!r}, scale={self.scale!r}, offset={self.offset!r}, "
              f"bits={self.bits}, pack_axis={self.pack_axis}, act_bits={self.act_bits}, "
              f"rotation={self.rotation})")
    g = f", group_size={self.group_size}" if self.group_size else ""
    sym = "" if self.symmetric else ", asymmetric"
    rot = "" if self.rotation is None else f", rotation={self.rotation}"
    return (
        f"QArray(shape={self.shape}, bits={self.bits}, channel_axes={self.channel_axes}{g}"
        f"{sym}, pack_axis={self.pack_axis}, act_bits={self.act_bits}{rot}, "
        f"dtype={np.dtype(self.dtype).name})"
    )


def _norm_axes(axes: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what}: axis {a} is out of range for a {ndim}-d array.")
    out.append(a % ndim)
  return tuple(sorted(set(out)))


def pack_ints(values: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Packs int8 values of ``bits`` (<= 4) bits along ``axis``, ``8 // bits`` per byte.

  Adjacent values of the axis share a byte (the first in the low bits); the axis is
  zero-padded to a multiple of the packing factor and the other axes are kept.

  Example:
    >>> import jax.numpy as jnp
    >>> v = jnp.array([[-7, 7, 0, 3]], jnp.int8)
    >>> p = pack_ints(v, 4)
    >>> p.shape, bool((unpack_ints(p, 4) == v).all())
    ((1, 2), True)
  """
  per = values_per_byte(bits)
  width = 8 // per
  values = jnp.asarray(values)
  axis = axis % values.ndim
  v = jnp.moveaxis(values, axis, -1).astype(jnp.uint8) & jnp.uint8((1 << width) - 1)
  pad = (-v.shape[-1]) % per
  if pad:
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
  v = v.reshape(v.shape[:-1] + (v.shape[-1] // per, per))
  out = v[..., 0]
  for i in range(1, per):
    out = out | (v[..., i] << jnp.uint8(i * width))
  return jnp.moveaxis(out, -1, axis)


def unpack_ints(packed: jax.Array, bits: int, axis: int = -1, size: int | None = None) -> jax.Array:
  """Inverse of :func:`pack_ints`: uint8 -> sign-extended int8 values along ``axis``.

  ``size`` trims the unpacked axis to its length before padding (default: all values).
  """
  per = values_per_byte(bits)
  width = 8 // per
  axis = axis % packed.ndim
  p = jnp.moveaxis(packed, axis, -1)
  parts = []
  for i in range(per):
    # Move field i to the top bits, reinterpret as int8, arithmetic-shift down: sign extension.
    top = (p << jnp.uint8(8 - width * (i + 1))).astype(jnp.uint8)
    parts.append(jax.lax.bitcast_convert_type(top, jnp.int8) >> (8 - width))
  v = jnp.stack(parts, axis=-1).reshape(p.shape[:-1] + (p.shape[-1] * per,))
  if size is not None and size != v.shape[-1]:
    v = v[..., :size]
  return jnp.moveaxis(v, -1, axis)


def _blocked_shapes(shape, sshape):
  """Shapes in which values (first) and scales (second) broadcast by blocks."""
  vshape, bshape = [], []
  for n, s in zip(shape, sshape, strict=True):
    if 1 < s < n:
      vshape += [s, n // s]
      bshape += [s, 1]
    else:
      vshape.append(n)
      bshape.append(s)
  return tuple(vshape), tuple(bshape)


def expand_blocks(s: jax.Array, shape: Sequence[int]) -> jax.Array:
  """A block-broadcast scale (or offset) ``s`` repeated to ``shape`` where it is grouped.

  Axes of length 1 stay 1 (they broadcast); a grouped axis is repeated to full length.
  """
  for a, (n, m) in enumerate(zip(shape, s.shape, strict=True)):
    if 1 < m < n:
      s = jnp.repeat(s, n // m, axis=a)
  return s


def default_pack_axis(
    shape: Sequence[int], bits: int, channel_axes: Sequence[int], group_axis: int | None
) -> int | None:
  """Where :func:`quantize` packs sub-byte values by default (the one rule for all callers).

  The group axis when grouped, else the first axis that is not a channel axis (a
  kernel's input axis, an embedding's feature axis), provided the packing factor divides
  it; else the last axis past 0 that it divides (axis 0 only for a 1-d array); else None
  (one int8 per value).
  """
  ndim, per = len(shape), values_per_byte(bits)
  if not ndim:
    return None
  preferred = group_axis if group_axis is not None else next(
      (a for a in range(ndim) if a not in channel_axes), None)
  cands = ([preferred] if preferred is not None else []) + list(range(ndim - 1, 0, -1))
  if ndim == 1:
    cands.append(0)
  return next((a for a in cands if shape[a] % per == 0), None)


def hadamard_matrix(block: int) -> np.ndarray:
  """The orthonormal Sylvester Walsh-Hadamard matrix of size ``block`` (a power of two),
  float32: symmetric, and its own inverse.

  Example:
    >>> (hadamard_matrix(2) * 2**0.5).round().tolist()
    [[1.0, 1.0], [1.0, -1.0]]
  """
  check_rotate(block, "hadamard_matrix")
  h = np.ones((1, 1))
  while h.shape[0] < block:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(block)).astype(np.float32)


def hadamard(x: jax.Array, axis: int, block: int) -> jax.Array:
  """``x`` rotated by :func:`hadamard_matrix` ``(block)`` in consecutive blocks along
  ``axis`` (float32, at full precision on every backend). Applying it twice gives ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> bool(jnp.allclose(hadamard(hadamard(x, -1, 4), -1, 4), x, atol=1e-5))
    True
  """
  h = jnp.asarray(hadamard_matrix(block))
  axis = axis % x.ndim
  n = x.shape[axis]
  if n % block:
    raise ValueError(f"hadamard: axis {axis} of length {n} is not divisible by block={block}.")
  xb = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  xb = xb.reshape(xb.shape[:-1] + (n // block, block))
  y = jnp.einsum("...j,jk->...k", xb, h, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y.reshape(y.shape[:-2] + (n,)), -1, axis)


def check_rotate(block, what: str) -> None:
  """Raises a ValueError unless ``block`` (a ``rotate=`` argument) is None or a power of two."""
  if block is not None and (isinstance(block, bool) or not isinstance(block, int | np.integer)
                            or block < 2 or block & (block - 1)):
    raise ValueError(f"{what}: rotate={block!r}; use a power of two >= 2 (e.g. 64), or None.")


def rotation_for(
    shape: Sequence[int], block, axis: int | None, channel_axes: Sequence[int], path: str
) -> tuple[int, int]:
  """The ``(axis from the end, block)`` of a rotation of a leaf of ``shape`` (validated).

  ``axis`` None picks the first axis that is not a channel axis and that ``block``
  divides (a kernel's input axis: ``in`` of ``[in, out]`` and ``[in, heads, head_dim]``,
  ``head_dim`` of ``[heads, head_dim, out]`` when ``block`` does not divide ``heads``), else
  the first that is not a channel axis. Raises a ValueError naming ``path`` when the block
  is not a power of two, no axis is left, or the block does not divide the axis (the
  message names a block that does).
  """
  what = f"quantize '{path}'"
  ndim = len(shape)
  check_rotate(block, what)
  if axis is None:
    free = [a for a in range(ndim) if a not in {c % ndim for c in channel_axes}]
    if not free:
      raise ValueError(
          f"{what}: rotate={block} needs an axis that is not a channel axis (the contracted "
          f"input axis), but shape {tuple(shape)} has channel axes {tuple(channel_axes)}.")
    axis = next((a for a in free if shape[a] % block == 0), free[0])
  axis = _norm_axes((axis,), ndim, what)[0]
  n = shape[axis]
  if n % block:
    fits = 1 << ((n & -n).bit_length() - 1)  # the largest power of two dividing n
    fix = f"rotate={min(fits, block)}" if fits >= 2 else "rotate=None (odd length)"
    raise ValueError(
        f"{what}: rotate={block} does not divide axis {axis} of length {n}; use {fix}.")
  return axis - ndim, int(block)


def rotate_for_quantize(x: jax.Array, rotation: tuple[int, int] | None) -> jax.Array:
  """``x`` in the basis a QArray with ``rotation`` quantizes (``x`` itself for None)."""
  return x if rotation is None else hadamard(x, *rotation).astype(x.dtype)


def quantize(
    x: jax.Array,
    bits: int = 8,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    group_size: int | None = None,
    group_axis: int = 0,
    symmetric: bool = True,
    pack_bits: bool | None = None,
    pack_axis: int | None = None,
    act_bits: int | None = None,
    rotate: int | None = None,
    rotate_axis: int | None = None,
    scale_dtype=jnp.float32,
    path: str = "array",
    check_finite: bool = True,
) -> QArray:
  """Round-to-nearest quantization, symmetric or asymmetric, per channel or group-wise.

  Args:
    x: float array.
    bits: 2..8.
    channel_axes: axes that keep their own scale; ``(-1,)`` (default) is per output
      feature for ``(in, out)`` kernels; ``()`` or None is per-tensor. For a stacked
      ``[L, ...]`` param include axis 0 (each layer its own scales) so that slices of the
      QArray are the per-layer QArrays.
    group_size: if set, scales also vary along ``group_axis`` in contiguous groups of
      this many elements (group-wise quantization; the axis must be divisible).
    group_axis: the axis split into groups (the input dimension of a kernel).
    symmetric: True: ``qvalue * scale`` with a scale from the max magnitude; False:
      ``qvalue * scale + offset`` from each block's min and max (a zero point per group).
    pack_bits: pack ``8 // bits`` values per byte; default: True for bits <= 4 when an
      axis is divisible by the packing factor (else values stay one int8 each).
    pack_axis: the axis to pack along; default: ``group_axis`` when grouped, else the
      first axis that is not a channel axis, else the last divisible one.
    act_bits: how layers running this weight treat their input at run time: 8 = dynamic
      int8 per token (W8A8), 16 = rounded to bfloat16 (W8A16: integer weights are exact
      in bf16, products accumulate in f32); None: weight-only, float activations.
    rotate: quantize ``x`` rotated by Walsh-Hadamard blocks of this size (a power of two)
      along ``rotate_axis``; products then rotate their activations the same way (see
      the module docstring). None: no rotation.
    rotate_axis: the rotated axis; default: the first axis that is not a channel axis and
      that ``rotate`` divides (a kernel's input axis), else the first that is not a channel
      axis.
    scale_dtype: the dtype the scales (and offsets) are stored in: float32, or float16 /
      bfloat16 for half their bytes (group-wise int4 at groups of 32: 4.5 bits a weight
      instead of 5). A half-precision scale is rounded up, so no value clips, and the
      integer values are rounded with the stored scale: the bound below still holds.
    path: the leaf's path, for error messages.
    check_finite: raise a ValueError naming ``path`` when a concrete ``x`` holds NaN/Inf.
      This array function does not check traced values (it runs inside QAT training
      steps); the param transforms (:func:`jaxmem.quantize_int8` and the others) check
      under ``jit`` too, see their ``check_finite``.

  Raises:
    ValueError: unsupported ``bits``/``act_bits``/``group_size``, an empty ``x``, NaN/Inf
      in a concrete ``x``, an already-quantized ``x``, or a packing that cannot be done,
      naming ``path``.

  Example:
    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([[1.0, -2.0], [0.5, 4.0]]))
    >>> q.qvalue.tolist(), q.scale.shape
    ([[127, -64], [64, 127]], (1, 2))
    >>> a = quantize(jnp.array([[0.0, 1.0, 2.0, 3.0]]), 2, channel_axes=(0,), symmetric=False)
    >>> dequantize(a).tolist(), a.qvalue.shape
    ([[0.0, 1.0, 2.0, 3.0]], (1, 1))
  """
  what = f"quantize '{path}'"
  check_bits(bits, what)
  sdt = check_scale_dtype(scale_dtype, what)
  check_group_size(what, group_size)
  check_bool(what, check_finite=check_finite, symmetric=symmetric)
  check_act_bits(act_bits, what)
  if isinstance(x, QArray):
    raise ValueError(
        f"{what}: the leaf is already a QArray; quantize float params once "
        "(dequantize first to re-quantize at another width)."
    )
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{what}: dtype {x.dtype} is not float; only floats quantize.")
  if x.size == 0:
    raise ValueError(
        f"{what}: the leaf is empty (shape {tuple(x.shape)}): there is nothing to "
        "quantize and no scale to compute. Leave it out with `where` (the default selections "
        "skip empty leaves)."
    )
  if check_finite and not isinstance(x, jax.core.Tracer):
    require_finite([(path, x)], "quantize")
  ndim, shape = x.ndim, tuple(x.shape)
  # A scalar has one scale whatever channel_axes says.
  caxes = _norm_axes(channel_axes or (), ndim, what) if ndim else ()
  if group_size is not None:
    if ndim == 0:
      raise scalar_group_error(path, group_size)
    group_axis = group_axis % ndim
    if group_axis in caxes:
      raise ValueError(f"{what}: group_axis {group_axis} is also a channel axis.")
    n = shape[group_axis]
    if n % group_size:
      raise ValueError(
          f"{what}: axis {group_axis} has {n} elements, not divisible by "
          f"group_size={group_size}; pick a divisor of {n} or group_size=None (per-channel)."
      )
  rotation = None if rotate is None else rotation_for(shape, rotate, rotate_axis, caxes, path)
  x = rotate_for_quantize(x, rotation)
  # Scale length per axis: full on channel axes, n/g on the group axis, 1 elsewhere.
  sshape = tuple(
      n if a in caxes else n // group_size if (group_size and a == group_axis) else 1
      for a, n in enumerate(shape)
  )
  vshape, bshape = _blocked_shapes(shape, sshape)
  xb = x.astype(jnp.float32).reshape(vshape)
  red = tuple(i for i, (v, b) in enumerate(zip(vshape, bshape)) if b == 1 and v != 1)
  # Floor at the smallest normal of the scale dtype: all-zero blocks get q = 0 (not NaN),
  # and a scale never flushes to zero on backends without denormals.
  tiny = jnp.finfo(sdt).tiny.astype(np.float32)
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    amax = jnp.max(jnp.abs(xb), axis=red, keepdims=True) if red else jnp.abs(xb)
    scale = _stored_scale(jnp.maximum(amax / qmax, tiny), sdt)
    q = jnp.clip(jnp.round(xb / scale), -qmax, qmax)
    offset = None
  else:
    levels = 2**bits - 1
    lo = jnp.min(xb, axis=red, keepdims=True) if red else xb
    hi = jnp.max(xb, axis=red, keepdims=True) if red else xb
    scale = _stored_scale(jnp.maximum((hi - lo) / levels, tiny), sdt)
    half = 2 ** (bits - 1)
    offset = lo + half * scale
    if sdt == np.float32:
      q = jnp.clip(jnp.round((xb - lo) / scale), 0, levels) - half
    else:  # round with the stored (rounded) zero point
      offset = offset.astype(sdt).astype(jnp.float32)
      q = jnp.clip(jnp.round((xb - offset) / scale), -half, half - 1)
    offset = offset.reshape(sshape)
  if sdt != np.float32 and not isinstance(scale, jax.core.Tracer) and not bool(
      jnp.isfinite(scale).all()):
    raise ValueError(
        f"{what}: a scale overflows {sdt.name} (|x| up to {float(jnp.max(jnp.abs(xb))):.4g}); "
        "use scale_dtype=bfloat16 (float32's range) or float32.")
  q = q.astype(jnp.int8).reshape(shape)
  per = values_per_byte(bits)
  if pack_bits and bits > 4:
    raise ValueError(f"{what}: packing needs bits <= 4 (got {bits}).")
  axis = None
  if (pack_bits is None and bits <= 4) or pack_bits:
    if pack_axis is not None:
      pack_axis = _norm_axes((pack_axis,), ndim, what)[0] if ndim else None
      axis = pack_axis if ndim and shape[pack_axis] % per == 0 else None
    else:
      axis = default_pack_axis(shape, bits, caxes, group_axis if group_size else None)
    if axis is None and (pack_bits or pack_axis is not None):
      raise ValueError(
          f"{what}: cannot pack {bits}-bit values {per} per byte along "
          f"{'axis ' + str(pack_axis) if pack_axis is not None else 'any axis'} of shape "
          f"{shape}: the axis length must be divisible by {per}. Pick another pack_axis, "
          "or pack_bits=False (one int8 per value)."
      )
  qvalue = pack_ints(q, bits, axis) if axis is not None else q
  return QArray(
      qvalue=qvalue,
      scale=scale.reshape(sshape).astype(sdt),
      offset=None if offset is None else offset.astype(sdt),
      bits=bits,
      dtype=np.dtype(x.dtype),
      pack_axis=None if axis is None else axis - ndim,
      act_bits=act_bits,
      rotation=rotation,
  )


def _stored_scale(scale: jax.Array, dtype: np.dtype) -> jax.Array:
  """``scale`` (float32) as ``dtype`` stores it, rounded up (back in float32): the values
  are then rounded with the stored scale, which is never below the one that fits them."""
  if dtype == np.float32:
    return scale
  down = scale.astype(dtype)
  up = jnp.where(down.astype(jnp.float32) < scale, jnp.nextafter(down, jnp.inf), down)
  return up.astype(jnp.float32)


def int_values(q: QArray) -> jax.Array:
  """The int8 values in the logical shape (unpacking if needed)."""
  if q.packed:
    return unpack_ints(q.qvalue, q.bits, q.pack_axis)
  return q.qvalue


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """``qvalue * scale (+ offset)`` in the logical shape, as ``dtype`` (default: q.dtype)."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}.")
  shape = q.shape
  vshape, bshape = _blocked_shapes(shape, q.scale.shape)
  out = int_values(q).reshape(vshape).astype(jnp.float32) * q.scale.reshape(bshape).astype(
      jnp.float32)
  if q.offset is not None:
    out = out + q.offset.reshape(bshape).astype(jnp.float32)
  out = out.reshape(shape)
  if q.rotation is not None:
    out = hadamard(out, *q.rotation)
  return out.astype(dtype or q.dtype)


def set_act_bits(q: QArray, act_bits: int | None) -> QArray:
  """The same QArray (shared leaves, nothing re-quantized) run with another activation policy."""
  check_act_bits(act_bits, "set_act_bits")
  return dataclasses.replace(q, act_bits=act_bits)
