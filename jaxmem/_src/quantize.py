"""Param transforms that quantize float leaves into :class:`jaxmem.QArray`."""

from __future__ import annotations

from collections.abc import Sequence

from jaxmem._src import base
from jaxmem._src.qarray import QArray, quantize


def default_quant_where(path: str, x) -> bool:
  """Default selection: leaves named ``kernel`` or ``embedding`` with ndim >= 2."""
  name = path.rsplit("/", 1)[-1]
  return name in ("kernel", "embedding") and len(getattr(x, "shape", ())) >= 2


def default_channel_axes(path: str, ndim: int) -> tuple[int, ...]:
  """Per output feature: the last axis of a kernel; the row (token) of an embedding table."""
  if path.rsplit("/", 1)[-1] == "embedding":
    return (0,)
  return (ndim - 1,) if ndim else ()


def quantize_weights(
    bits: int = 8,
    where: base.Where = None,
    *,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    group_size: int | None = None,
    group_axis: int = 0,
    pack_bits: bool | None = None,
    act_bits: int | None = None,
) -> base.ParamTransform:
  """Symmetric weight quantization of the selected leaves (the general factory).

  Args:
    bits: 2..8.
    where: leaves to quantize; default: ``kernel``/``embedding`` leaves with ndim >= 2.
    channel_axes: axes keeping their own scale; default per output feature (last axis of
      a kernel, axis 0 of an embedding table).
    per_tensor: one scale per tensor (overrides ``channel_axes``).
    group_size: group-wise scales along ``group_axis`` (the input axis), e.g. 64.
    group_axis: axis split into groups.
    pack_bits: pack sub-byte values (default: True for bits <= 4).
    act_bits: 8 for dynamic activation quantization at run time (W8A8); 16 for bfloat16
      activations (W8A16, see :func:`jaxmem.quantized_dot_general`); None: weight-only.

  Raises:
    ValueError: (at init/update) on an already-quantized leaf, NaN/Inf, unsupported bits,
      a pattern matching nothing, with the leaf's path.
  """

  def fn(path, x):
    if isinstance(x, base.Compressed):
      raise ValueError(
          f"quantize '{path}': the leaf is already a {type(x).__name__}; leaves are quantized "
          "once, from float. The order that works is prune -> quantize -> pack, e.g. "
          "chain(magnitude_prune(0.9), quantize_int8(), sparsify()); or exclude the leaf with "
          "`where`."
      )
    axes = () if per_tensor else (
        tuple(channel_axes) if channel_axes is not None else default_channel_axes(path, x.ndim)
    )
    return quantize(
        x,
        bits,
        channel_axes=axes,
        group_size=group_size,
        group_axis=group_axis,
        pack_bits=pack_bits,
        act_bits=act_bits,
        path=path,
    )

  return base.leafwise(fn, where, default=default_quant_where, name=f"quantize_int{bits}")


def quantize_int8(
    where: base.Where = None,
    *,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
) -> base.ParamTransform:
  """Weight-only int8 PTQ: float kernels become int8 :class:`QArray` (no float copy kept).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((8, 4))})
    >>> q['kernel'].qvalue.dtype, q['kernel'].scale.shape
    (dtype('int8'), (1, 4))
  """
  return quantize_weights(8, where, channel_axes=channel_axes, per_tensor=per_tensor)


def quantize_dynamic_int8(
    where: base.Where = None,
    *,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
) -> base.ParamTransform:
  """Dynamic W8A8: int8 weights, and layers quantize activations per row at run time.

  Under :func:`jaxmem.apply`, a Dense/DenseGeneral/Einsum/Conv layer whose kernel
  came from this transform runs an ``int8 x int8 -> int32`` ``lax.dot_general`` and
  rescales the result. Embedding tables selected here are gathered weight-only.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_dynamic_int8(), {'kernel': jnp.ones((8, 4))})
    >>> q['kernel'].act_bits
    8
  """
  return quantize_weights(
      8, where, channel_axes=channel_axes, per_tensor=per_tensor, act_bits=8
  )


def dequantize_params(where: base.Where = None) -> base.ParamTransform:
  """Turns selected QArray leaves back into float arrays (e.g. to re-quantize)."""

  def fn(path, x):
    return x.dequantize() if isinstance(x, QArray) else x

  return base.leafwise(
      fn, where, default=lambda p, x: isinstance(x, QArray), name="dequantize_params"
  )
