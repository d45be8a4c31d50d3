"""The quantized array: a pytree of integer values and float scales. Pure array math, no Flax.

Invariants of a :class:`QArray` ``q`` of logical shape ``S``:

* ``q.qvalue`` holds integers in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (symmetric,
  so ``-2**(bits-1)`` is never used). Unpacked it is ``int8`` of shape ``S``; packed
  (``bits <= 4``) it is a flat ``uint8`` vector holding ``8 // bits`` values per
  byte (3-bit values use 4 bits) and the real byte count is ``q.qvalue.nbytes``.
* ``q.scale`` is float32. Without groups its shape is ``S`` with a 1 on every axis
  not in ``channel_axes``. With ``group_size = g`` along ``group_axis = a``, its
  shape is ``S`` with axis ``a`` replaced by the two axes ``(S[a] // g, 1)``.
* ``dequantize(q) = qvalue * scale`` (broadcast in the grouped shape), cast to ``q.dtype``.
* ``|x - dequantize(quantize(x))| <= scale / 2`` elementwise (round to nearest).

Everything that picks a shape or code path (bits, axes, group size, packing,
logical shape, dtype) is static pytree metadata; ``qvalue`` and ``scale`` are leaves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src.base import Compressed, check_bool, check_group_size, require_finite

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: int, name: str) -> None:
  """Raises a ValueError unless ``bits`` is an int in :data:`SUPPORTED_BITS`."""
  if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or bits not in SUPPORTED_BITS:
    raise ValueError(f"{name}: bits={bits!r} is not supported; use one of {SUPPORTED_BITS}.")


def scalar_group_error(path: str, group_size: int) -> ValueError:
  """The error for group-wise scales on a 0-d leaf."""
  return ValueError(
      f"quantize '{path}': the leaf is 0-d (a scalar), so it has no axis to split into groups "
      f"of group_size={group_size}. Leave it out with `where`, or quantize it in a separate "
      "transform with group_size=None."
  )


def _values_per_byte(bits: int) -> int:
  return 4 if bits == 2 else 2 if bits <= 4 else 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray(Compressed):
  """A symmetric, integer-quantized array (see the module docstring for invariants).

  Attributes:
    qvalue: int8 values of the logical shape, or packed uint8 (``packed=True``).
    scale: float32 scales (see module docstring for the shape).
    bits: bit width, 2..8.
    shape: logical shape.
    dtype: dtype ``dequantize`` returns (the original float dtype).
    channel_axes: axes that keep their own scale (per-channel); ``()`` is per-tensor.
    group_size: contiguous group length along ``group_axis``, or None.
    group_axis: the axis split into groups (the input/contracting axis).
    packed: whether ``qvalue`` packs several values per byte.
    act_bits: if set, layers running this weight also quantize their input
      activations dynamically (per row/token) to this many bits and use an integer
      matmul (W8A8); None means weight-only.
  """

  qvalue: jax.Array
  scale: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  channel_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  group_axis: int = dataclasses.field(default=0, metadata=dict(static=True))
  packed: bool = dataclasses.field(default=False, metadata=dict(static=True))
  act_bits: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  _dense_hint = "jaxmem.dequantize(w)"  # for Compressed's "not an array" TypeError

  def dequantize(self) -> jax.Array:
    return dequantize(self)

  def materialize(self) -> jax.Array:
    return dequantize(self)

  def __repr__(self) -> str:
    g = f", group_size={self.group_size}" if self.group_size else ""
    return (
        f"QArray(shape={self.shape}, bits={self.bits}, channel_axes={self.channel_axes}{g}, "
        f"packed={self.packed}, act_bits={self.act_bits}, dtype={np.dtype(self.dtype).name})"
    )


def _norm_axes(axes: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what}: axis {a} is out of range for a {ndim}-d array.")
    out.append(a % ndim)
  return tuple(sorted(set(out)))


def grouped_shape(shape: tuple[int, ...], group_size: int | None, group_axis: int):
  """The shape in which values and scales broadcast: ``group_axis`` split in (n/g, g)."""
  if group_size is None:
    return shape
  a = group_axis
  return shape[:a] + (shape[a] // group_size, group_size) + shape[a + 1 :]


def pack(values: jax.Array, bits: int) -> jax.Array:
  """Packs int8 values of ``bits`` (<= 4) bits, ``8 // bits`` per byte, into flat uint8.

  Example:
    >>> import jax.numpy as jnp
    >>> v = jnp.array([-7, 7, 0, 3], jnp.int8)
    >>> bool((unpack(pack(v, 4), 4, v.shape) == v).all())
    True
  """
  per = _values_per_byte(bits)
  width = 8 // per
  flat = values.reshape(-1).astype(jnp.uint8) & jnp.uint8((1 << width) - 1)
  pad = (-flat.size) % per
  if pad:
    flat = jnp.concatenate([flat, jnp.zeros((pad,), jnp.uint8)])
  flat = flat.reshape(-1, per)
  out = jnp.zeros(flat.shape[:1], jnp.uint8)
  for i in range(per):
    out = out | (flat[:, i] << jnp.uint8(i * width))
  return out


def unpack(packed: jax.Array, bits: int, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack`: flat uint8 -> int8 values of ``shape`` (sign-extended)."""
  per = _values_per_byte(bits)
  width = 8 // per
  parts = []
  for i in range(per):
    # Move field i to the top bits, reinterpret as int8, arithmetic-shift down: sign extension.
    top = (packed << jnp.uint8(8 - width * (i + 1))).astype(jnp.uint8)
    parts.append(jax.lax.bitcast_convert_type(top, jnp.int8) >> (8 - width))
  flat = jnp.stack(parts, axis=-1).reshape(-1)
  n = math.prod(shape)
  return flat[:n].reshape(shape)


def quantize(
    x: jax.Array,
    bits: int = 8,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    group_size: int | None = None,
    group_axis: int = 0,
    pack_bits: bool | None = None,
    act_bits: int | None = None,
    path: str = "array",
    check_finite: bool = True,
) -> QArray:
  """Symmetric round-to-nearest quantization.

  Args:
    x: float array.
    bits: 2..8.
    channel_axes: axes that keep their own scale; ``(-1,)`` (default) is per output
      feature for ``(in, out)`` kernels; ``()`` or None is per-tensor.
    group_size: if set, scales also vary along ``group_axis`` in contiguous groups of
      this many elements (group-wise quantization; the axis must be divisible).
    group_axis: the axis split into groups (the input dimension of a kernel).
    pack_bits: pack ``8 // bits`` values per byte; default: True for bits <= 4.
    act_bits: record how layers running this weight treat their input at run time: 8 =
      dynamic int8 per token (W8A8), 16 = rounded to bfloat16 (W8A16: integer weights are
      exact in bf16, products accumulate in f32); None: weight-only, float activations.
    path: the leaf's path, for error messages.
    check_finite: raise a ValueError naming ``path`` when a concrete ``x`` holds NaN/Inf.
      This array function does not check traced values (it runs inside QAT training
      steps); the param transforms (:func:`jaxmem.quantize_int8` and the others) check
      under ``jit`` too, see their ``check_finite``.

  Raises:
    ValueError: unsupported ``bits``/``act_bits``/``group_size``, an empty ``x``, NaN/Inf
      in a concrete ``x``, or an already-quantized ``x``, naming ``path``.

  Example:
    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([[1.0, -2.0], [0.5, 4.0]]))
    >>> q.qvalue.tolist(), q.scale.shape
    ([[127, -64], [64, 127]], (1, 2))
  """
  check_bits(bits, f"quantize '{path}'")
  check_group_size(f"quantize '{path}'", group_size)
  check_bool(f"quantize '{path}'", check_finite=check_finite)
  if act_bits not in (None, 8, 16):
    raise ValueError(
        f"quantize '{path}': act_bits={act_bits}; use 8 (int8 activations per token, W8A8), "
        "16 (bfloat16 activations, W8A16) or None (weight-only, float activations)."
    )
  if isinstance(x, QArray):
    raise ValueError(
        f"quantize '{path}': the leaf is already a QArray; quantize float params once "
        "(dequantize first to re-quantize at another width)."
    )
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantize '{path}': dtype {x.dtype} is not float; only floats quantize.")
  if x.size == 0:
    raise ValueError(
        f"quantize '{path}': the leaf is empty (shape {tuple(x.shape)}): there is nothing to "
        "quantize and no scale to compute. Leave it out with `where` (the default selections "
        "skip empty leaves)."
    )
  if check_finite and not isinstance(x, jax.core.Tracer):
    require_finite([(path, x)], "quantize")
  ndim = x.ndim
  # A scalar has one scale whatever channel_axes says.
  caxes = _norm_axes(channel_axes or (), ndim, f"quantize '{path}'") if ndim else ()
  if group_size is not None:
    if ndim == 0:
      raise scalar_group_error(path, group_size)
    group_axis = group_axis % ndim
    if group_axis in caxes:
      raise ValueError(f"quantize '{path}': group_axis {group_axis} is also a channel axis.")
    n = x.shape[group_axis]
    if n % group_size:
      raise ValueError(
          f"quantize '{path}': axis {group_axis} has {n} elements, not divisible by "
          f"group_size={group_size}; pick a divisor of {n} or group_size=None (per-channel)."
      )
  gshape = grouped_shape(x.shape, group_size, group_axis)
  xg = x.astype(jnp.float32).reshape(gshape)
  # Axes of the grouped shape that are reduced (share one scale).
  if group_size is None:
    red = tuple(a for a in range(ndim) if a not in caxes)
  else:
    gmap = [a if a < group_axis else a + 1 for a in range(ndim)]  # orig axis -> grouped axis
    red = tuple(gmap[a] for a in range(ndim) if a not in caxes and a != group_axis)
    red = tuple(sorted(red + (group_axis + 1,)))
  qmax = 2 ** (bits - 1) - 1
  amax = jnp.max(jnp.abs(xg), axis=red, keepdims=True) if red else jnp.abs(xg)
  # Floor at the smallest normal float32: all-zero slices get q = 0 (not NaN), and a scale
  # never flushes to zero on backends without denormals.
  scale = jnp.maximum(amax / qmax, jnp.finfo(jnp.float32).tiny)
  q = jnp.clip(jnp.round(xg / scale), -qmax, qmax).astype(jnp.int8).reshape(x.shape)
  do_pack = bits <= 4 if pack_bits is None else pack_bits
  if do_pack and bits > 4:
    raise ValueError(f"quantize '{path}': packing needs bits <= 4 (got {bits}).")
  qvalue = pack(q, bits) if do_pack else q
  return QArray(
      qvalue=qvalue,
      scale=scale.astype(jnp.float32),
      bits=bits,
      shape=tuple(x.shape),
      dtype=np.dtype(x.dtype),
      channel_axes=caxes,
      group_size=group_size,
      group_axis=group_axis if group_size is not None else 0,
      packed=bool(do_pack),
      act_bits=act_bits,
  )


def int_values(q: QArray) -> jax.Array:
  """The int8 values in the logical shape (unpacking if needed)."""
  if q.packed:
    return unpack(q.qvalue, q.bits, q.shape)
  return q.qvalue


def dequantize(q: QArray, dtype=None) -> jax.Array:
  """``qvalue * scale`` in the logical shape, as ``dtype`` (default: the original dtype)."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}.")
  v = int_values(q).reshape(grouped_shape(q.shape, q.group_size, q.group_axis))
  out = (v.astype(jnp.float32) * q.scale).reshape(q.shape)
  return out.astype(dtype or q.dtype)

