"""Param transforms that quantize float leaves into :class:`jaxmem.QArray`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from jaxmem._src import base
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import (
    QArray,
    check_act_bits,
    check_bits,
    check_rotate,
    check_scale_dtype,
    quantize,
    rotate_for_quantize,
    rotation_for,
    scalar_group_error,
)


def default_quant_where(path: str, x) -> bool:
  """Default selection: non-empty leaves named ``kernel`` or ``embedding`` with ndim >= 2.

  Empty leaves (a zero in the shape) hold nothing to quantize, so they stay as they are;
  selecting one explicitly with ``where`` is an error naming its path.
  """
  name = path.rsplit("/", 1)[-1]
  shape = tuple(getattr(x, "shape", ()))
  return name in ("kernel", "embedding") and len(shape) >= 2 and math.prod(shape) > 0


def default_channel_axes(path: str, ndim: int, stack: int = 0) -> tuple[int, ...]:
  """Per output feature (last axis of a kernel; the row of an embedding), per stacked layer.

  ``stack`` leading axes are a stack of layers (scan over layers): they keep their own
  scales too, so each layer's slice is the QArray of that layer alone.
  """
  lead = tuple(range(stack))
  if ndim <= stack:
    return lead[:ndim]
  if _is_embedding(path):
    return lead + (stack,)
  return lead + (ndim - 1,)


def _is_embedding(path: str) -> bool:
  return path.rsplit("/", 1)[-1] == "embedding"


StackAxes = int | Mapping[str, int]


class StackRules(NamedTuple):
  """``stack_axes={regex: n}`` compiled: the rules and each rule's number of stack axes."""

  rules: tree_lib.PathRules
  counts: tuple[int, ...]


def check_stack_axes(name: str, stack_axes: Any) -> StackRules | int:
  """Validates ``stack_axes`` (an int, or ``{regex: int}``); returns it compiled."""
  if isinstance(stack_axes, Mapping):
    for k, v in stack_axes.items():
      base.check_int(name, f"stack_axes[{k!r}]", v, minimum=0)
    rules = tree_lib.PathRules(list(stack_axes), name, "stack_axes rule")
    return StackRules(rules, tuple(int(v) for v in stack_axes.values()))
  base.check_int(name, "stack_axes", stack_axes, minimum=0)
  return int(stack_axes)


def stack_of(rules: StackRules | int, path: str) -> int:
  """The number of leading stack axes of the leaf at ``path`` (first fullmatching rule)."""
  if isinstance(rules, int):
    return rules
  i = rules.rules.first(path)
  return 0 if i is None else rules.counts[i]


def check_stack_rules_used(params, where: base.Where, rules: StackRules | int, name: str) -> None:
  """Raises a ValueError naming the first ``stack_axes`` rule that no selected leaf takes.

  A leaf takes the first rule that fullmatches its path; only paths are read, so this runs
  on abstract params and in ``init`` too.
  """
  if isinstance(rules, int):
    return
  mask = base.select(params, where, default=default_quant_where, name=name)
  flat = zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(mask))
  selected = [p for (p, _), m in flat if m]
  rules.rules.check_used(
      [rules.rules.first(p) for p in selected], selected, of="selected leaf",
      why="a leaf takes the first rule that fullmatches its path, e.g. r'layers/.*'; remove "
      "the rule or fix it",
  )


def leaf_layout(
    path: str,
    x: Any,
    *,
    group_size: int | None,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    stack: int = 0,
) -> dict[str, Any]:
  """The ``quantize`` keyword arguments (axes and groups) used for one leaf.

  Per-leaf defaults, after ``stack`` leading layer axes (which always keep their own
  scales, so the QArray slices per layer):

  * a ``kernel`` ``(*stack, in, ..., out)``: one scale per output feature (last axis);
    with ``group_size = g``, per contiguous group of ``g`` along the input axis (the
    first after the stack), which is also the axis sub-byte values pack along;
  * an ``embedding`` table ``(*stack, vocab, features)``: one scale per row (token);
    with ``group_size``, groups along the feature axis; values pack along features, so
    a gathered row is whole bytes.

  Args:
    path: the leaf's ``a/b/kernel`` path (its last name picks kernel vs embedding defaults).
    x: the leaf (only its shape is read).
    group_size: contiguous group length, or None for per-channel scales.
    group_axis: axis split into groups (overrides the default above).
    channel_axes: axes with their own scale (overrides the default; the stack axes are
      added).
    per_tensor: one scale per tensor (per layer of a stack; per group if grouped).
    stack: leading axes that stack layers.

  Returns:
    ``dict(channel_axes=..., group_size=..., group_axis=...)``; :func:`jaxmem.ops.quantize`
    then packs sub-byte values along the group axis, else the first axis that is not a
    channel axis (the input axis of a kernel, the feature axis of an embedding).

  Raises:
    ValueError: the group axis is not divisible by ``group_size``, a 0-d leaf gets
      groups, or more stack axes than the leaf has (naming the leaf).
  """
  base.check_group_size(f"quantize '{path}'", group_size)
  shape = tuple(x.shape)
  ndim = len(shape)
  if stack and stack >= ndim:
    raise ValueError(
        f"quantize '{path}': stack_axes={stack} leading layer axes, but the leaf has shape "
        f"{shape}; a stacked leaf needs at least one axis past the stack. Fix the stack_axes "
        "rule for this path."
    )
  lead = tuple(range(stack))
  if per_tensor or ndim == 0:  # a scalar has one scale
    axes: tuple[int, ...] = lead[:ndim]
  elif channel_axes is not None:
    axes = tuple(sorted(set(lead) | {a % ndim for a in channel_axes}))
  else:
    axes = default_channel_axes(path, ndim, stack)
  emb = _is_embedding(path)
  if group_size is None:
    return dict(channel_axes=axes, group_size=None, group_axis=0)
  if ndim == 0:
    raise scalar_group_error(path, group_size)
  if group_axis is None:
    group_axis = ndim - 1 if emb else stack
  group_axis %= ndim
  axes = tuple(a for a in axes if a != group_axis)
  n = shape[group_axis]
  if n % group_size:
    hint = (
        " If axis 0 stacks layers (scan over layers), say so with stack_axes=1 (or "
        "{r'layers/.*': 1}) and the input axis after it is grouped."
        if not stack and ndim >= 3 and group_axis == 0 else ""
    )
    raise ValueError(
        f"quantize '{path}': axis {group_axis} of shape {shape} has {n} elements, not "
        f"divisible by group_size={group_size}. Pick a divisor of {n}, or leave this leaf out "
        f"(`where`) and quantize it per channel (group_size=None) in a separate transform.{hint}"
    )
  return dict(channel_axes=axes, group_size=group_size, group_axis=group_axis)


def quantize_weights(
    bits: int = 8,
    where: base.Where = None,
    *,
    group_size: int | None = None,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    stack_axes: StackAxes = 0,
    symmetric: bool = True,
    pack_bits: bool | None = None,
    act_bits: int | None = None,
    rotate: int | None = None,
    scale_dtype=None,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Weight quantization of the selected leaves: the one general factory.

  :func:`jaxmem.quantize_int8`, :func:`jaxmem.quantize_dynamic_int8` and
  :func:`jaxmem.quantize_int4` are presets of it. Each leaf gets the per-leaf layout of
  ``jaxmem._src.quantize.leaf_layout`` (kernels: per output feature, groups along the
  input axis; embeddings: per row, groups along features), after ``stack_axes`` leading
  layer axes.

  Args:
    bits: 2..8 (4 bits or fewer are packed ``8 // bits`` per byte along one axis).
    where: leaves to quantize; default: non-empty ``kernel``/``embedding`` leaves with
      ndim >= 2.
    group_size: group-wise scales (e.g. 32/64/128) along the per-leaf group axis; None:
      per channel.
    group_axis: override the per-leaf group axis.
    channel_axes: override the per-leaf channel axes (the stack axes are added).
    per_tensor: one scale per tensor (per layer of a stack, per group if grouped).
    stack_axes: how many leading axes stack layers (``nn.scan``/``nnx.scan``/``lax.scan``
      over layers): an int for every selected leaf, or ``{regex: int}`` fullmatched on
      paths (first match; unmatched leaves have none; a rule matching no selected leaf is
      an error). Stack axes keep per-layer scales, so slicing the QArray along them gives
      each layer's QArray.
    symmetric: False for asymmetric quantization (a zero point per group, see
      :func:`jaxmem.ops.quantize`); weight-only or W8A16/W8A8 through ``dot_general``/einsum.
    pack_bits: pack sub-byte values (default: True for bits <= 4 where an axis divides).
    act_bits: 8 for dynamic activation quantization at run time (W8A8); 16 for bfloat16
      activations (W8A16, see :func:`jaxmem.ops.quantized_dot_general`); None: weight-only.
    rotate: quantize each leaf rotated by orthonormal Walsh-Hadamard blocks of this size
      (a power of two) along its input axis (the first axis that is not a channel axis
      and that the block divides, see :func:`jaxmem.ops.quantize`'s ``rotate_axis``);
      layers rotate their activations the same way at run time, so the product is
      unchanged in exact arithmetic while outlier features spread over each block before
      W8A8 rounds them (:func:`jaxmem.ops.hadamard`). The block must divide the
      axis. None: no rotation.
    scale_dtype: store scales (and zero points) as float16 or bfloat16 instead of float32
      (None: float32), halving their bytes; see :func:`jaxmem.ops.quantize`.
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN or Inf
      (a single NaN would make its whole scale group NaN). Concrete params are checked at
      once; under ``jax.jit`` one ``jax.debug.callback`` per call checks them when the
      compiled function runs, and the error arrives as a ``jax.errors.JaxRuntimeError``
      holding the same text (from the call, or at the latest ``block_until_ready``). Cost:
      one ``isfinite`` reduction per quantized leaf and one host callback per call. Pass
      False to skip it, e.g. for ``jax.export`` (callbacks do not serialize).

  Raises:
    ValueError: unsupported bits/group_size/act_bits, a bad ``where``/``stack_axes`` regex
      (here); an already-quantized, empty or non-finite leaf, a group axis the group size
      does not divide, a pattern matching nothing (at init/update, with the leaf's path).
    TypeError: a non-bool flag (``per_tensor='yes'``) or non-int axes/group size.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> tx = jaxmem.quantize_weights(4, group_size=2)
    >>> q = jax.jit(lambda p: jaxmem.transform(tx, p))({'kernel': jnp.ones((4, 2))})
    >>> q['kernel'].bits, q['kernel'].scale.shape, q['kernel'].qvalue.shape
    (4, (2, 2), (2, 2))
    >>> stacked = {'layers': {'kernel': jnp.ones((3, 8, 4))}}  # 3 layers (scan over layers)
    >>> q = jaxmem.transform(jaxmem.quantize_weights(4, group_size=4, stack_axes=1), stacked)
    >>> q['layers']['kernel'].scale.shape, q['layers']['kernel'][0].shape
    ((3, 2, 4), (8, 4))
  """
  return weights_transform(
      "quantize_weights", bits, where, group_size=group_size, group_axis=group_axis,
      channel_axes=channel_axes, per_tensor=per_tensor, stack_axes=stack_axes,
      symmetric=symmetric, pack_bits=pack_bits, act_bits=act_bits, rotate=rotate,
      scale_dtype=scale_dtype, check_finite=check_finite,
  )


def weights_transform(
    factory: str,
    bits: int,
    where: base.Where,
    *,
    group_size: int | None = None,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    stack_axes: StackAxes = 0,
    symmetric: bool = True,
    pack_bits: bool | None = None,
    act_bits: int | None = None,
    rotate: int | None = None,
    scale_dtype=None,
    check_finite: bool = True,
    quantize_fn: Callable[..., QArray] = quantize,
) -> base.ParamTransform:
  """:func:`quantize_weights`, with its arguments validated in the name of ``factory``.

  ``quantize_fn`` quantizes one leaf; it takes :func:`jaxmem.ops.quantize`'s arguments
  (``x, bits, symmetric=, pack_bits=, act_bits=, path=, check_finite=`` and the leaf's
  layout) and returns a QArray of that layout, e.g. a solver choosing other integer values
  (:func:`jaxmem._src.hqq.hqq_quantize`). With ``rotate``, ``quantize_fn`` gets the
  rotated leaf and the result is marked rotated.
  """
  check_bits(bits, factory)
  base.check_group_size(factory, group_size)
  if group_axis is not None:
    base.check_int(factory, "group_axis", group_axis)
  base.check_axes(factory, "channel_axes", channel_axes)
  base.check_bool(factory, per_tensor=per_tensor, check_finite=check_finite, symmetric=symmetric)
  if pack_bits is not None:
    base.check_bool(factory, pack_bits=pack_bits)
    if pack_bits and bits > 4:
      raise ValueError(f"{factory}: pack_bits=True needs bits <= 4 (got bits={bits}).")
  check_act_bits(act_bits, factory)
  check_rotate(rotate, factory)
  extra = {}
  if scale_dtype is not None:
    if quantize_fn is not quantize:
      raise ValueError(f"{factory}: scale_dtype is not supported by this quantizer.")
    extra["scale_dtype"] = check_scale_dtype(scale_dtype, factory)
  rules = check_stack_axes(factory, stack_axes)
  base.check_where(where, factory)

  def fn(path, x):
    if isinstance(x, tree_lib.Compressed):
      raise ValueError(
          f"quantize '{path}': the leaf is already a {type(x).__name__}; leaves are quantized "
          "once, from float. The order that works is prune -> quantize -> pack, e.g. "
          "chain(magnitude_prune(0.9), quantize_int8(), sparsify()); or exclude the leaf with "
          "`where`."
      )
    layout = leaf_layout(
        path, x, group_size=group_size, group_axis=group_axis, channel_axes=channel_axes,
        per_tensor=per_tensor, stack=stack_of(rules, path),
    )
    rotation = None if rotate is None else rotation_for(
        x.shape, rotate, None, layout["channel_axes"], path)
    q = quantize_fn(
        rotate_for_quantize(x, rotation), bits, symmetric=symmetric, pack_bits=pack_bits,
        act_bits=act_bits, path=path,
        check_finite=False,  # quantizing_leafwise checks the scales
        **layout, **extra,
    )
    return q if rotation is None else dataclasses.replace(q, rotation=rotation)

  # The general factories name their transforms by the width (as before the presets merged).
  name = f"quantize_int{bits}" if factory == "quantize_weights" else factory
  tx = quantizing_leafwise(fn, where, name=name, check_finite=check_finite)
  return checking_stack_rules(tx, where, rules, name)


def checking_stack_rules(
    tx: base.ParamTransform, where: base.Where, rules: StackRules | int,
    name: str,
) -> base.ParamTransform:
  """``tx`` whose ``init`` and ``update`` first run :func:`check_stack_rules_used`."""
  if isinstance(rules, int):
    return tx
  return base.checked(tx, lambda params: check_stack_rules_used(params, where, rules, name))


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
        for (p, x), (_, q) in zip(
            tree_lib.leaves_with_paths(params), tree_lib.leaves_with_paths(new))
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
    stack_axes: StackAxes = 0,
    rotate: int | None = None,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Weight-only int8 PTQ: float kernels become int8 :class:`QArray` (no float copy kept).

  Args:
    where: leaves to quantize; default: non-empty ``kernel``/``embedding`` leaves with
      ndim >= 2.
    channel_axes: axes keeping their own scale; default per output feature.
    per_tensor: one scale per tensor (per layer of a stack).
    stack_axes: leading layer axes (scan over layers), an int or ``{regex: int}`` (see
      :func:`jaxmem.quantize_weights`).
    rotate: Walsh-Hadamard block size of a rotation of each kernel's input axis, or None
      (see :func:`jaxmem.quantize_weights`).
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
      stack_axes=stack_axes, rotate=rotate, check_finite=check_finite,
  )


def quantize_dynamic_int8(
    where: base.Where = None,
    *,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    stack_axes: StackAxes = 0,
    rotate: int | None = None,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Dynamic W8A8: int8 weights, and layers quantize activations per row at run time.

  Under :func:`jaxmem.apply`, a Dense/DenseGeneral/Einsum/Conv layer whose kernel
  came from this transform runs an ``int8 x int8 -> int32`` ``lax.dot_general`` and
  rescales the result. Embedding tables selected here are gathered weight-only.
  Arguments as :func:`jaxmem.quantize_int8`.

  ``rotate=64`` (data-free) stores each kernel rotated by 64 x 64 Walsh-Hadamard blocks
  along its input axis, and layers rotate their activations the same way before rounding
  them to int8: a feature far larger than the rest of its token no longer sets that
  token's scale alone. On SmolLM2-135M it brings W8A8's perplexity from +3.0% to +0.5%
  of fp32 (``benchmarks/RESULTS.md``); the rotation costs a ``64``-wide f32 product per
  activation.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_dynamic_int8(), {'kernel': jnp.ones((8, 4))})
    >>> q['kernel'].act_bits
    8
    >>> w = jax.random.normal(jax.random.key(0), (64, 16))
    >>> r = jaxmem.transform(jaxmem.quantize_dynamic_int8(rotate=32), {'kernel': w})['kernel']
    >>> r.rotation, bool(jnp.allclose(r.dequantize(), w, atol=0.05))
    ((-2, 32), True)
  """
  return weights_transform(
      "quantize_dynamic_int8", 8, where, channel_axes=channel_axes, per_tensor=per_tensor,
      stack_axes=stack_axes, act_bits=8, rotate=rotate, check_finite=check_finite,
  )


def dequantize_params(where: base.Where = None) -> base.ParamTransform:
  """Turns selected QArray leaves back into float arrays (e.g. to re-quantize)."""
  base.check_where(where, "dequantize_params")

  def fn(path, x):
    return x.dequantize() if isinstance(x, QArray) else x

  return base.leafwise(
      fn, where, default=lambda p, x: isinstance(x, QArray), name="dequantize_params"
  )


def set_act_bits(act_bits: int | None, where: base.Where = None) -> base.ParamTransform:
  """Switches the activation policy of selected QArray leaves without re-quantizing them.

  Only the static ``act_bits`` field changes (the integer values and scales are the same
  arrays): e.g. run layers quantized by :func:`jaxmem.quantize_int8` as W8A8 (``8``), as
  W8A16 (``16``), or back to weight-only (``None``).

  Args:
    act_bits: 8, 16 or None.
    where: leaves to change; default: every QArray leaf.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((8, 4))})
    >>> w8a8 = jaxmem.transform(jaxmem.set_act_bits(8), q)
    >>> w8a8['kernel'].act_bits, w8a8['kernel'].qvalue is q['kernel'].qvalue
    (8, True)
  """
  check_act_bits(act_bits, "set_act_bits")
  base.check_where(where, "set_act_bits")

  def fn(path, x):
    if not isinstance(x, QArray):
      raise ValueError(
          f"set_act_bits: leaf '{path}' is a {type(x).__name__}, not a QArray; select only "
          "quantized leaves (the default selection does)."
      )
    return dataclasses.replace(x, act_bits=act_bits)

  return base.leafwise(
      fn, where, default=lambda p, x: isinstance(x, QArray), name="set_act_bits"
  )
