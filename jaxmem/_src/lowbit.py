"""Sub-byte weight quantization presets with group-wise scales (int4 packed two per byte).

Both are :func:`jaxmem.quantize_weights` with group-wise defaults; the per-leaf layout
(which axis is grouped, packed and kept per channel, after any stacked layer axes) is
:func:`jaxmem._src.quantize.leaf_layout`, shared with quantization-aware training
(:mod:`jaxmem._src.qat`), whose ``convert`` must give exactly the weights the fake-quant
model trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxmem._src import base
from jaxmem._src.qarray import check_bits
from jaxmem._src.quantize import StackAxes, leaf_layout, weights_transform

__all__ = ["check_bits", "leaf_layout", "quantize_grouped", "quantize_int4"]


def quantize_grouped(
    bits: int,
    group_size: int | None = 64,
    where: base.Where = None,
    *,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    stack_axes: StackAxes = 0,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Weight-only symmetric quantization to ``bits`` with group-wise scales.

  :func:`jaxmem.quantize_weights` with ``group_size=64`` by default. Values of 4 bits or
  fewer are packed (two per byte for 3-4 bits, four for 2 bits) along the group axis, so
  :func:`jaxmem.memory_report` counts real bytes. Kernels are grouped along their input
  axis and embedding tables along their feature axis.

  Args:
    bits: 2..8.
    group_size: group length (e.g. 32/64/128), or None for per-channel scales.
    where: leaves to quantize; default: ``kernel``/``embedding`` leaves with ndim >= 2.
    group_axis: override the per-leaf group axis.
    channel_axes: override the per-leaf channel axes.
    per_tensor: no per-channel scales (one per group, or per tensor without groups).
    stack_axes: leading layer axes (scan over layers), see :func:`jaxmem.quantize_weights`.
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf,
      under ``jit`` too (see :func:`jaxmem.quantize_weights`).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'kernel': jnp.ones((128, 8))}
    >>> q = jaxmem.transform(jaxmem.quantize_grouped(2, group_size=32), params)['kernel']
    >>> q.qvalue.dtype, q.qvalue.shape, q.scale.shape
    (dtype('uint8'), (32, 8), (4, 8))
  """
  return weights_transform(
      "quantize_grouped", bits, where, group_size=group_size, group_axis=group_axis,
      channel_axes=channel_axes, per_tensor=per_tensor, stack_axes=stack_axes,
      check_finite=check_finite,
  )


def quantize_int4(
    group_size: int | None = 64,
    where: base.Where = None,
    *,
    stack_axes: StackAxes = 0,
    symmetric: bool = True,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Weight-only int4 PTQ with group-wise scales, packed two values per byte.

  A kernel ``(in, out)`` gets one float32 scale per ``group_size`` inputs and output
  feature: ``in * out / 2`` bytes of values plus ``4 * in * out / group_size`` bytes of
  scales (0.156x of float32 at ``group_size=64``; asymmetric adds as many bytes of zero
  points). Under :func:`jaxmem.apply` the values are unpacked inside the jitted function
  (per layer, inside a scan over layers).

  Args:
    group_size: 32/64/128..., or None for one scale per output channel.
    where: leaves to quantize; default: ``kernel``/``embedding`` leaves with ndim >= 2.
    stack_axes: leading layer axes (scan over layers), see :func:`jaxmem.quantize_weights`.
    symmetric: False for asymmetric int4 (a zero point per group, as GGUF ``Q4_1``).
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf,
      under ``jit`` too (see :func:`jaxmem.quantize_weights`).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'dense': {'kernel': jnp.ones((128, 16)), 'bias': jnp.zeros(16)}}
    >>> q = jaxmem.transform(jaxmem.quantize_int4(group_size=64), params)
    >>> q['dense']['kernel'].qvalue.nbytes, q['dense']['kernel'].scale.shape
    (1024, (2, 16))
  """
  return weights_transform(
      "quantize_int4", 4, where, group_size=group_size, stack_axes=stack_axes,
      symmetric=symmetric, check_finite=check_finite,
  )
