"""HQQ: data-free asymmetric quantization whose zero points minimize an l_p reconstruction error.

Badri & Shaji (2023), "Half-Quadratic Quantization of Large Machine Learning Models". Per
group, ``W ~ s (Q - z)`` with the codes ``Q = clip(round(W / s + z), 0, 2**bits - 1)``. The
scale ``s`` stays the round-to-nearest one, ``(max - min) / (2**bits - 1)``. The zero
point ``z`` (so also the codes) is picked to minimize ``||W - s (Q_z(W) - z)||_p^p`` with
``p < 1``: a sparsity-promoting norm, so a few large (outlier) errors cost less than many
medium ones. The problem is not smooth in ``z`` (the codes round). Half-quadratic splitting
(Geman & Yang, 1995, "Nonlinear image recovery with half-quadratic regularization") adds an
error variable ``W_e`` and minimizes ``||W_e||_p^p + beta/2 ||W_e - (W - W_r)||_2^2``, with
``W_r = s (Q - z)``, by alternating

a. ``W_e = shrink_lp(W - W_r, beta)``, the generalized soft threshold
   ``sign(x) max(|x| - |x|^(p-1) / beta, 0)`` (:func:`shrink_lp`);
b. ``z = mean over the group of (Q - (W - W_e) / s)`` (closed form, ``Q`` fixed), then
   new codes ``Q = Q_z(W)``;
c. ``beta *= kappa``,

for a fixed number of iterations, starting from the round-to-nearest zero point
``z = -min / s``. Each group keeps the iterate (zero point and codes) with the smallest
``sum |W - W_r|^p``, the round-to-nearest one included. So its l_p error is never above
round-to-nearest's. Every step is ``jax.numpy``, no data is needed, and it runs under
``jax.jit``.

The zero point is stored the way :class:`jaxmem.QArray` stores an asymmetric zero point:
``qvalue = Q - 2**(bits-1)`` and ``offset = s (2**(bits-1) - z)``, so
``dequantize = qvalue * scale + offset``. The solver works in that form. Step (b) is
``offset = mean(W - W_e - s qvalue)``: it needs no division by ``s``, so all-constant
groups, whose scale is the float32 floor, stay finite. The result has exactly the layout of
:func:`jaxmem.ops.quantize` with ``symmetric=False`` (shapes of values, scales and offsets,
packing axis). Only the integer values and the offsets differ, so it runs wherever an
asymmetric QArray runs.

* :func:`jaxmem.ops.hqq_quantize`: one array;
* :func:`jaxmem.quantize_hqq`: the param transform (the per-leaf layouts and ``stack_axes`` of
  :func:`jaxmem.quantize_weights`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base
from jaxmem._src.qarray import (
    QArray,
    _blocked_shapes,
    check_act_bits,
    check_bits,
    int_values,
    pack_ints,
    quantize,
)
from jaxmem._src.quantize import StackAxes, weights_transform

_TINY = float(np.finfo(np.float32).tiny)


def _check_real(name: str, arg: str, v: Any) -> float:
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name}: {arg} must be a float, got {v!r}.")
  return float(v)


def check_hqq_args(name: str, iters: Any, p: Any, beta: Any, kappa: Any) -> None:
  """Raises a TypeError/ValueError (in the name of ``name``) for bad solver settings."""
  base.check_int(name, "iters", iters, minimum=0)
  p, beta, kappa = (_check_real(name, a, v) for a, v in (("p", p), ("beta", beta),
                                                         ("kappa", kappa)))
  if not 0.0 < p <= 1.0:
    raise ValueError(
        f"{name}: p={p}; the solver minimizes the l_p norm of the error with 0 < p <= 1 "
        "(the generalized soft threshold needs it). Pass e.g. p=0.7."
    )
  if not 0.0 < beta < math.inf:
    raise ValueError(
        f"{name}: beta={beta}; the half-quadratic penalty weight must be finite and > 0 "
        "(e.g. 10.0)."
    )
  if not 1.0 <= kappa < math.inf:
    raise ValueError(
        f"{name}: kappa={kappa}; beta is multiplied by kappa each iteration, so it must be "
        "finite and >= 1 (e.g. 1.01)."
    )


def shrink_lp(x: jax.Array, beta: float | jax.Array, p: float) -> jax.Array:
  """The generalized soft threshold ``sign(x) max(|x| - |x|^(p-1) / beta, 0)``.

  Step (a) of the solver. With ``p = 1`` it is the soft threshold at ``1 / beta``. With
  ``p < 1`` small entries go to zero and large ones keep almost all their size. Zeros stay
  zero (``|x|`` is floored at the smallest normal float32 before the negative power).

  Example:
    >>> import jax.numpy as jnp
    >>> shrink_lp(jnp.array([-2.0, 0.05, 0.0, 1.0]), 4.0, 1.0).tolist()
    [-1.75, 0.0, 0.0, 0.75]
  """
  a = jnp.abs(x)
  return jnp.sign(x) * jnp.maximum(a - jnp.maximum(a, _TINY) ** (p - 1.0) / beta, 0.0)


def encode(xb: jax.Array, scale: jax.Array, offset: jax.Array, bits: int) -> jax.Array:
  """Asymmetric codes (QArray ``qvalue``, as float) for a given scale and offset, in blocks.

  ``clip(round((x - offset) / scale), -2**(bits-1), 2**(bits-1) - 1)``, i.e.
  ``Q_z(W) - 2**(bits-1)``. ``xb``, ``scale`` and ``offset`` are in the blocked shapes
  of :func:`jaxmem._src.qarray._blocked_shapes` (same rank, scales broadcast).
  """
  half = 2 ** (bits - 1)
  return jnp.clip(jnp.round((xb - offset) / scale), -half, half - 1)


def zero_step(
    xb: jax.Array, qv: jax.Array, scale: jax.Array, offset: jax.Array,
    beta: float | jax.Array, p: float, red: Sequence[int],
) -> jax.Array:
  """Steps (a) and (b): the offset that best fits ``W - W_e`` given the codes ``qv``.

  ``W_e = shrink_lp(W - (qv * scale + offset), beta)``, then
  ``offset = mean over the group (axes red) of (W - W_e - scale * qv)``. That is
  ``z = mean(Q - (W - W_e) / s)`` in the offset form (``offset = s (2**(bits-1) - z)``).
  """
  we = shrink_lp(xb - (qv * scale + offset), beta, p)
  return jnp.mean(xb - we - scale * qv, axis=tuple(red), keepdims=True)


def _lp_error(xb, qv, scale, offset, p, red):
  return jnp.sum(jnp.abs(xb - (qv * scale + offset)) ** p, axis=tuple(red), keepdims=True)


def solve_offsets(
    xb: jax.Array, qv: jax.Array, scale: jax.Array, offset: jax.Array, *,
    bits: int, red: Sequence[int], iters: int, p: float, beta: float, kappa: float,
) -> tuple[jax.Array, jax.Array]:
  """The HQQ iterations from codes ``qv`` and ``offset``; the best codes and offsets per group.

  Arrays are in blocked shapes (values ``xb``/``qv``, scales and offsets broadcasting,
  groups reduced over ``red``). Iteration ``k`` runs :func:`zero_step` with
  ``beta * kappa**k``, then re-encodes. Each group keeps its iterate with the smallest
  ``sum |W - W_r|^p``, counting the starting one (ties keep the earlier one).
  """
  red = tuple(red)
  err0 = _lp_error(xb, qv, scale, offset, p, red)

  def body(_, carry):
    qv, off, b, best_qv, best_off, best_err = carry
    off = zero_step(xb, qv, scale, off, b, p, red)
    qv = encode(xb, scale, off, bits)
    err = _lp_error(xb, qv, scale, off, p, red)
    better = err < best_err
    return (qv, off, b * kappa, jnp.where(better, qv, best_qv),
            jnp.where(better, off, best_off), jnp.where(better, err, best_err))

  carry = (qv, offset, jnp.float32(beta), qv, offset, err0)
  carry = jax.lax.fori_loop(0, iters, body, carry)
  return carry[3], carry[4]


def hqq_quantize(
    w: jax.Array,
    bits: int = 4,
    *,
    group_size: int | None = 64,
    group_axis: int = 0,
    channel_axes: Sequence[int] | None = (-1,),
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    pack_bits: bool | None = None,
    act_bits: int | None = None,
    path: str = "array",
    check_finite: bool = True,
) -> QArray:
  """HQQ-quantizes one array: asymmetric, zero points optimized for the l_p error (no data).

  The layout (and the scales) are those of ``jaxmem.ops.quantize(w, bits, symmetric=False,
  ...)`` with the same arguments. Only the codes and the offsets (zero points) differ:
  per group, the HQQ iterate with the smallest ``sum |w - dequantize|^p``. Starting from
  round-to-nearest, that error is never larger than round-to-nearest's. Runs under
  ``jax.jit`` (pure ``jax.numpy``, a ``lax.fori_loop`` of ``iters`` steps).

  Args:
    w: float array, e.g. an ``(in, out)`` kernel.
    bits: 2..8 (4 or fewer are packed ``8 // bits`` per byte, as :func:`jaxmem.ops.quantize`).
    group_size: contiguous group length along ``group_axis``; None: one zero point per
      channel (the whole axis is the group).
    group_axis: the axis split into groups (a kernel's input axis).
    channel_axes: axes keeping their own scale and zero point (default per output feature).
    iters: solver iterations (0 gives round-to-nearest asymmetric exactly).
    p: the error norm, ``0 < p <= 1`` (0.7 in the paper; 1 is the l_1 error).
    beta: initial weight of the half-quadratic penalty.
    kappa: ``beta`` is multiplied by it each iteration (>= 1).
    pack_bits, act_bits: as :func:`jaxmem.ops.quantize`.
    path: the leaf's path, for error messages.
    check_finite: raise a ValueError naming ``path`` when a concrete ``w`` holds NaN/Inf
      (traced values are not checked here; :func:`jaxmem.quantize_hqq` checks them under ``jit``).

  Returns:
    An asymmetric :class:`jaxmem.QArray` (``offset`` set).

  Raises:
    ValueError: unsupported ``bits``, a group size not dividing the axis, ``iters < 0``,
      ``p`` outside ``(0, 1]``, ``beta <= 0``, ``kappa < 1``, an empty or already-quantized
      ``w``, NaN/Inf in a concrete ``w``, naming ``path``.
    TypeError: non-int ``iters`` or non-float ``p``/``beta``/``kappa``.

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from jaxmem._src.qarray import quantize
    >>> w = jnp.asarray(np.random.default_rng(0).standard_t(3, size=(64, 8)), jnp.float32)
    >>> q = hqq_quantize(w, 4, group_size=32)
    >>> rtn = quantize(w, 4, group_size=32, symmetric=False)
    >>> lp = lambda a: float(jnp.sum(jnp.abs(w - a.dequantize()) ** 0.7))
    >>> q.offset.shape == rtn.offset.shape == (2, 8), q.pack_axis, lp(q) < lp(rtn)
    (True, -2, True)
  """
  what = f"hqq_quantize '{path}'"
  check_bits(bits, what)
  check_hqq_args(what, iters, p, beta, kappa)
  base.check_group_size(what, group_size)
  base.check_int(what, "group_axis", group_axis)
  base.check_axes(what, "channel_axes", channel_axes)
  base.check_bool(what, check_finite=check_finite)
  if pack_bits is not None:
    base.check_bool(what, pack_bits=pack_bits)
  check_act_bits(act_bits, what)
  if check_finite and not isinstance(w, (QArray, jax.core.Tracer)):
    base.require_finite([(path, jnp.asarray(w))], "hqq_quantize")
  # One compiled program per layout (eagerly too: no op-by-op dispatch of the iterations).
  return _hqq_quantize(
      w, bits=bits, group_size=group_size, group_axis=int(group_axis),
      channel_axes=None if channel_axes is None else tuple(int(a) for a in channel_axes),
      iters=int(iters), p=float(p), beta=float(beta), kappa=float(kappa), pack_bits=pack_bits,
      act_bits=act_bits, path=path,
  )


@functools.partial(jax.jit, static_argnames=(
    "bits", "group_size", "group_axis", "channel_axes", "iters", "p", "beta", "kappa",
    "pack_bits", "act_bits", "path"))
def _hqq_quantize(
    w, *, bits, group_size, group_axis, channel_axes, iters, p, beta, kappa, pack_bits, act_bits,
    path,
) -> QArray:
  """:func:`jaxmem.ops.hqq_quantize` after its checks: round-to-nearest, then the solver."""
  rtn = quantize(
      w, bits, channel_axes=channel_axes, group_size=group_size, group_axis=group_axis,
      symmetric=False, pack_bits=pack_bits, act_bits=act_bits, path=path, check_finite=False,
  )
  if iters == 0:
    return rtn
  shape = rtn.shape
  vshape, bshape = _blocked_shapes(shape, rtn.scale.shape)
  red = tuple(i for i, (v, b) in enumerate(zip(vshape, bshape)) if b == 1 and v != 1)
  xb = jnp.asarray(w).astype(jnp.float32).reshape(vshape)
  qv, off = solve_offsets(
      xb, int_values(rtn).astype(jnp.float32).reshape(vshape), rtn.scale.reshape(bshape),
      rtn.offset.reshape(bshape), bits=bits, red=red, iters=iters, p=p, beta=beta, kappa=kappa,
  )
  q = qv.astype(jnp.int8).reshape(shape)
  qvalue = q if rtn.pack_axis is None else pack_ints(q, bits, rtn.pack_axis)
  return dataclasses.replace(rtn, qvalue=qvalue, offset=off.reshape(rtn.scale.shape))


def quantize_hqq(
    bits: int = 4,
    where: base.Where = None,
    *,
    group_size: int | None = 64,
    stack_axes: StackAxes = 0,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Data-free HQQ weight quantization of the selected leaves (asymmetric, group-wise).

  :func:`jaxmem.quantize_weights` with ``symmetric=False`` and the same per-leaf layouts
  (kernels: per output feature, groups along the input axis; embeddings: per row, groups
  along features; ``stack_axes`` leading layer axes keep their own scales). Each leaf's
  zero points are solved by :func:`jaxmem.ops.hqq_quantize` instead of taken from its
  minimum, so the result has exactly that transform's layout. Runs under ``jax.jit``.

  Args:
    bits: 2..8.
    where: leaves to quantize; default: non-empty ``kernel``/``embedding`` leaves with
      ndim >= 2.
    group_size: group-wise zero points and scales along the per-leaf group axis; None: per
      channel.
    stack_axes: leading layer axes, an int or ``{regex: int}`` (see
      :func:`jaxmem.quantize_weights`).
    iters, p, beta, kappa: solver settings (see :func:`jaxmem.ops.hqq_quantize`).
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf,
      under ``jit`` too (see :func:`jaxmem.quantize_weights` for the cost and how the
      error arrives).

  Raises:
    ValueError: bad ``bits``/``group_size``/solver settings/``where``/``stack_axes`` (here);
      a group size not dividing a leaf's group axis, an already-quantized, empty or
      non-finite leaf (at init/update, naming the leaf).

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> params = {'dense': {'kernel': jnp.arange(256.0).reshape(64, 4) ** 0.5}}
    >>> q = jax.jit(lambda p: jaxmem.transform(quantize_hqq(4, group_size=32), p))(params)
    >>> k = q['dense']['kernel']
    >>> k.bits, k.qvalue.shape, k.scale.shape, k.offset.shape
    (4, (32, 4), (2, 4), (2, 4))
  """
  name = "quantize_hqq"
  check_hqq_args(name, iters, p, beta, kappa)
  fn = functools.partial(_leaf_quantize, iters=iters, p=p, beta=beta, kappa=kappa)
  return weights_transform(
      name, bits, where, group_size=group_size, stack_axes=stack_axes, symmetric=False,
      check_finite=check_finite, quantize_fn=fn,
  )


def _leaf_quantize(x, bits, *, symmetric, iters, p, beta, kappa, **kwargs) -> QArray:
  """:func:`hqq_quantize` with :func:`jaxmem._src.quantize.weights_transform`'s arguments."""
  assert not symmetric  # quantize_hqq passes symmetric=False
  return hqq_quantize(x, bits, iters=iters, p=p, beta=beta, kappa=kappa, **kwargs)
