"""Param transforms that quantize float leaves into :class:`jaxmem.QArray`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxmem._src import base
from jaxmem._src.qarray import QArray, check_bits, quantize


def default_quant_where(path: str, x) -> bool:
  """Default selection: non-empty leaves named ``kernel`` or ``embedding`` with ndim >= 2.

  Empty leaves (a zero in the shape) hold nothing to quantize, so they stay as they are;
  selecting one explicitly with ``where`` is an error naming its path.
  """
  name = path.rsplit("/", 1)[-1]
  shape = tuple(getattr(x, "shape", ()))
  return name in ("kernel", "embedding") and len(shape) >= 2 and math.prod(shape) > 0


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
    check_finite: bool = True,
) -> base.ParamTransform:
  """Symmetric weight quantization of the selected leaves (the general factory).

  Args:
    bits: 2..8.
    where: leaves to quantize; default: non-empty ``kernel``/``embedding`` leaves with
      ndim >= 2.
    channel_axes: axes keeping their own scale; default per output feature (last axis of
      a kernel, axis 0 of an embedding table).
    per_tensor: one scale per tensor (overrides ``channel_axes``).
    group_size: group-wise scales along ``group_axis`` (the input axis), e.g. 64.
    group_axis: axis split into groups.
    pack_bits: pack sub-byte values (default: True for bits <= 4).
    act_bits: 8 for dynamic activation quantization at run time (W8A8); 16 for bfloat16
      activations (W8A16, see :func:`jaxmem.quantized_dot_general`); None: weight-only.
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN or Inf
      (a single NaN would make its whole scale group NaN). Concrete params are checked at
      once; under ``jax.jit`` one ``jax.debug.callback`` per call checks them when the
      compiled function runs, and the error arrives as a ``jax.errors.JaxRuntimeError``
      holding the same text (from the call, or at the latest ``block_until_ready``). Cost:
      one ``isfinite`` reduction per quantized leaf and one host callback per call. Pass
      False to skip it, e.g. for ``jax.export`` (callbacks do not serialize).

  Raises:
    ValueError: unsupported bits/group_size/act_bits, a bad ``where`` regex (here); an
      already-quantized, empty or non-finite leaf, a pattern matching nothing (at
      init/update, with the leaf's path).
    TypeError: a non-bool flag (``per_tensor='yes'``) or non-int axes/group size.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> tx = jaxmem.quantize_weights(4, group_size=2)
    >>> q = jax.jit(lambda p: jaxmem.transform(tx, p))({'kernel': jnp.ones((4, 2))})
    >>> q['kernel'].bits, q['kernel'].scale.shape
    (4, (2, 1, 2))
  """
  return weights_transform(
      "quantize_weights", bits, where, channel_axes=channel_axes, per_tensor=per_tensor,
      group_size=group_size, group_axis=group_axis, pack_bits=pack_bits, act_bits=act_bits,
      check_finite=check_finite,
  )


def weights_transform(
    factory: str,
    bits: int,
    where: base.Where,
    *,
    channel_axes: Sequence[int] | None,
    per_tensor: bool,
    group_size: int | None = None,
    group_axis: int = 0,
    pack_bits: bool | None = None,
    act_bits: int | None = None,
    check_finite: bool = True,
) -> base.ParamTransform:
  """:func:`quantize_weights`, with its arguments validated in the name of ``factory``."""
  check_bits(bits, factory)
  base.check_group_size(factory, group_size)
  base.check_int(factory, "group_axis", group_axis)
  base.check_axes(factory, "channel_axes", channel_axes)
  base.check_bool(factory, per_tensor=per_tensor, check_finite=check_finite)
  if pack_bits is not None:
    base.check_bool(factory, pack_bits=pack_bits)
    if pack_bits and bits > 4:
      raise ValueError(f"{factory}: pack_bits=True needs bits <= 4 (got bits={bits}).")
  if act_bits not in (None, 8, 16) or isinstance(act_bits, bool):
    raise ValueError(
        f"{factory}: act_bits={act_bits!r}; use 8 (int8 activations per token, W8A8), 16 "
        "(bfloat16 activations, W8A16) or None (weight-only)."
    )
  base.check_where(where, factory)

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
        check_finite=False,  # quantizing_leafwise checks the scales
    )

  name = f"quantize_int{bits}" if factory == "quantize_weights" else factory
  return quantizing_leafwise(fn, where, name=name, check_finite=check_finite)


def quantizing_leafwise(
    fn, where: base.Where, *, name: str, check_finite: bool
) -> base.ParamTransform:
  """:func:`jaxmem.leafwise` for quantizers (default selection: :func:`default_quant_where`).

  With ``check_finite``, a selected leaf holding NaN/Inf is a ValueError naming its path,
  also under ``jit`` (:func:`jaxmem._src.base.require_finite`). The check reads the new
  QArrays' scales, not the weights: a NaN/Inf weight makes the max-abs of its scale group,
  so that scale, NaN/Inf (``max`` propagates NaN), so it costs next to nothing.
  """
  base.check_bool(name, check_finite=check_finite)
  tx = base.leafwise(fn, where, default=default_quant_where, name=name)
  if not check_finite:
    return tx

  def update(params, state):
    new, state = tx.update(params, state)
    items = [
        (p, q.scale, x)
        for (p, x), (_, q) in zip(base.leaves_with_paths(params), base.leaves_with_paths(new))
        if isinstance(q, QArray) and q is not x
    ]
    base.require_finite(items, name)
    return new, state

  return base.ParamTransform(tx.init, update)


def quantize_int8(
    where: base.Where = None,
    *,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Weight-only int8 PTQ: float kernels become int8 :class:`QArray` (no float copy kept).

  Args:
    where: leaves to quantize; default: non-empty ``kernel``/``embedding`` leaves with
      ndim >= 2.
    channel_axes: axes keeping their own scale; default per output feature.
    per_tensor: one scale per tensor.
    check_finite: raise a ValueError naming the leaf on NaN/Inf, under ``jit`` too (see
      :func:`jaxmem.quantize_weights` for the cost and how the error arrives).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((8, 4))})
    >>> q['kernel'].qvalue.dtype, q['kernel'].scale.shape
    (dtype('int8'), (1, 4))
  """
  return weights_transform(
      "quantize_int8", 8, where, channel_axes=channel_axes, per_tensor=per_tensor,
      check_finite=check_finite,
  )


def quantize_dynamic_int8(
    where: base.Where = None,
    *,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Dynamic W8A8: int8 weights, and layers quantize activations per row at run time.

  Under :func:`jaxmem.apply`, a Dense/DenseGeneral/Einsum/Conv layer whose kernel
  came from this transform runs an ``int8 x int8 -> int32`` ``lax.dot_general`` and
  rescales the result. Embedding tables selected here are gathered weight-only.
  Arguments as :func:`jaxmem.quantize_int8`.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_dynamic_int8(), {'kernel': jnp.ones((8, 4))})
    >>> q['kernel'].act_bits
    8
  """
  return weights_transform(
      "quantize_dynamic_int8", 8, where, channel_axes=channel_axes, per_tensor=per_tensor,
      act_bits=8, check_finite=check_finite,
  )


def dequantize_params(where: base.Where = None) -> base.ParamTransform:
  """Turns selected QArray leaves back into float arrays (e.g. to re-quantize)."""
  base.check_where(where, "dequantize_params")

  def fn(path, x):
    return x.dequantize() if isinstance(x, QArray) else x

  return base.leafwise(
      fn, where, default=lambda p, x: isinstance(x, QArray), name="dequantize_params"
  )
