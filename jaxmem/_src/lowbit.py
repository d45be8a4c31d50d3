"""Sub-byte weight quantization presets with group-wise scales (int4 packed two per byte).

Both are :func:`jaxmem.quantize_weights` with group-wise defaults; the per-leaf layout
(which axis is grouped, packed and kept per channel, after any stacked layer axes) is
:func:`jaxmem._src.quantize.leaf_layout`, shared with quantization-aware training
(:mod:`jaxmem._src.qat`), whose ``convert`` must give exactly the weights the fake-quant
model trained with.
"""

from __future__ import annotations

from jaxmem._src import base
from jaxmem._src.qarray import check_bits
from jaxmem._src.quantize import StackAxes, leaf_layout, weights_transform

__all__ = ["check_bits", "leaf_layout", "quantize_int4"]


def quantize_int4(
    group_size: int | None = 64,
    where: base.Where = None,
    *,
    stack_axes: StackAxes = 0,
    symmetric: bool = True,
    scale_dtype=None,
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
    scale_dtype: float16 or bfloat16 to store the scales (and zero points) in half
      precision: 2 bytes each instead of 4 (at groups of 32, 4.5 bits a weight instead of
      5); None: float32.
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
      symmetric=symmetric, scale_dtype=scale_dtype, check_finite=check_finite,
  )
