"""Sub-byte weight quantization with group-wise scales (int4 packed two per byte, int2 four).

The array math lives in :mod:`jaxmem._src.qarray`; this module chooses, per leaf, which
axes keep their own scale and which axis is split into groups, so that the same choice
is shared by post-training quantization (:func:`quantize_int4`, :func:`quantize_grouped`)
and by quantization-aware training (:mod:`jaxmem._src.qat`), whose ``convert`` must give
exactly the weights the fake-quant model trained with.

Per-leaf layout (defaults):

* a ``kernel`` of shape ``(in, ..., out)``: one scale per output feature (last axis)
  and, with ``group_size = g``, per contiguous group of ``g`` inputs along axis 0;
* an ``embedding`` table ``(vocab, features)``: one scale per row (token) and, with
  ``group_size``, per group of ``g`` features along axis 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxmem._src import base
from jaxmem._src.qarray import QArray, check_bits, quantize, scalar_group_error
from jaxmem._src.quantize import default_channel_axes, quantizing_leafwise


def _is_embedding(path: str) -> bool:
  return path.rsplit("/", 1)[-1] == "embedding"


def leaf_layout(
    path: str,
    x: Any,
    *,
    group_size: int | None,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
) -> dict[str, Any]:
  """The ``quantize`` keyword arguments (axes and groups) used for one leaf.

  Args:
    path: the leaf's ``a/b/kernel`` path (its last name picks kernel vs embedding defaults).
    x: the leaf (only its shape is read).
    group_size: contiguous group length, or None for per-channel scales.
    group_axis: axis split into groups; default 0 for kernels (their input axis) and the
      last axis for embedding tables.
    channel_axes: axes with their own scale; default per output feature / per token row.
    per_tensor: one scale per tensor (per group, if ``group_size`` is set).

  Returns:
    ``dict(channel_axes=..., group_size=..., group_axis=...)``.

  Raises:
    ValueError: the group axis is not divisible by ``group_size``, or a 0-d leaf gets
      groups (naming the leaf).
  """
  base.check_group_size(f"quantize '{path}'", group_size)
  ndim = len(x.shape)
  if per_tensor or ndim == 0:  # a scalar has one scale
    axes: tuple[int, ...] = ()
  elif channel_axes is not None:
    axes = tuple(a % ndim for a in channel_axes)
  else:
    axes = default_channel_axes(path, ndim)
  if group_size is None:
    return dict(channel_axes=axes, group_size=None, group_axis=0)
  if ndim == 0:
    raise scalar_group_error(path, group_size)
  if group_axis is None:
    group_axis = ndim - 1 if _is_embedding(path) else 0
  group_axis %= ndim
  axes = tuple(a for a in axes if a != group_axis)
  n = x.shape[group_axis]
  if n % group_size:
    raise ValueError(
        f"quantize '{path}': axis {group_axis} of shape {tuple(x.shape)} has {n} elements, not "
        f"divisible by group_size={group_size}. Pick a divisor of {n}, or leave this leaf out "
        "(`where`) and quantize it per channel (group_size=None) in a separate transform."
    )
  return dict(channel_axes=axes, group_size=group_size, group_axis=group_axis)


def quantize_grouped(
    bits: int,
    group_size: int | None = 64,
    where: base.Where = None,
    *,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Weight-only symmetric quantization to ``bits`` with group-wise scales.

  Values of 4 bits or fewer are packed (two per byte for 3-4 bits, four for 2 bits), so
  :func:`jaxmem.memory_report` counts real bytes. Kernels are grouped along their input
  axis (0) and embedding tables along their feature axis (see the module docstring).

  Args:
    bits: 2..8.
    group_size: group length (e.g. 32/64/128), or None for per-channel scales.
    where: leaves to quantize; default: ``kernel``/``embedding`` leaves with ndim >= 2.
    group_axis: override the per-leaf group axis.
    channel_axes: override the per-leaf channel axes.
    per_tensor: no per-channel scales (one per group, or per tensor without groups).
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf,
      under ``jit`` too (see :func:`jaxmem.quantize_weights`).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'kernel': jnp.ones((128, 8))}
    >>> q = jaxmem.transform(jaxmem.quantize_grouped(2, group_size=32), params)['kernel']
    >>> q.qvalue.dtype, q.qvalue.shape, q.scale.shape
    (dtype('uint8'), (256,), (4, 1, 8))
  """
  return grouped_transform(
      "quantize_grouped", bits, group_size, where, group_axis=group_axis,
      channel_axes=channel_axes, per_tensor=per_tensor, check_finite=check_finite,
  )


def grouped_transform(
    factory: str,
    bits: int,
    group_size: int | None,
    where: base.Where,
    *,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    check_finite: bool = True,
) -> base.ParamTransform:
  """:func:`quantize_grouped`, with its arguments validated in the name of ``factory``."""
  check_bits(bits, factory)
  base.check_group_size(factory, group_size)
  if group_axis is not None:
    base.check_int(factory, "group_axis", group_axis)
  base.check_axes(factory, "channel_axes", channel_axes)
  base.check_bool(factory, per_tensor=per_tensor, check_finite=check_finite)
  base.check_where(where, factory)

  def fn(path: str, x: Any) -> QArray:
    if isinstance(x, base.Compressed):
      raise ValueError(
          f"quantize '{path}': the leaf is already a {type(x).__name__}; each leaf is quantized "
          "once. Put quantization last in `chain`, or exclude the leaf with `where`."
      )
    layout = leaf_layout(
        path,
        x,
        group_size=group_size,
        group_axis=group_axis,
        channel_axes=channel_axes,
        per_tensor=per_tensor,
    )
    return quantize(x, bits, path=path, check_finite=False, **layout)  # scales checked

  name = f"quantize_int{bits}" if factory == "quantize_grouped" else factory
  return quantizing_leafwise(fn, where, name=name, check_finite=check_finite)


def quantize_int4(
    group_size: int | None = 64, where: base.Where = None, *, check_finite: bool = True
) -> base.ParamTransform:
  """Weight-only int4 PTQ with group-wise scales, packed two values per byte.

  A kernel ``(in, out)`` gets one float32 scale per ``group_size`` inputs and output
  feature: ``in * out / 2`` bytes of values plus ``4 * in * out / group_size`` bytes of
  scales (0.156x of float32 at ``group_size=64``). Under :func:`jaxmem.apply` the values
  are unpacked and dequantized inside the jitted function.

  Args:
    group_size: 32/64/128..., or None for one scale per output channel.
    where: leaves to quantize; default: ``kernel``/``embedding`` leaves with ndim >= 2.
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf,
      under ``jit`` too (see :func:`jaxmem.quantize_weights`).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'dense': {'kernel': jnp.ones((128, 16)), 'bias': jnp.zeros(16)}}
    >>> q = jaxmem.transform(jaxmem.quantize_int4(group_size=64), params)
    >>> q['dense']['kernel'].qvalue.nbytes, q['dense']['kernel'].scale.shape
    (1024, (2, 1, 16))
  """
  return grouped_transform("quantize_int4", 4, group_size, where, check_finite=check_finite)
