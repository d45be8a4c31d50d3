"""AWQ and SmoothQuant: activation-aware per-input-channel scales, folded into the preceding op.

Xiao, Lin, Seznec, Wu, Demouth & Han (2023), "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models"; Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan &
Han (2024), "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration".

Both rest on one identity. For a kernel ``W`` of shape ``(in, out)`` (``y = x @ W``) and a
positive scale ``s`` per input channel::

    y = (x / s) @ (diag(s) W)

The kernel's input rows are multiplied by ``s`` and ``1 / s`` is folded into whatever produced
``x``: an RMSNorm/LayerNorm scale vector (and a LayerNorm's bias) is divided by ``s``, or a
previous kernel whose output columns feed ``x`` linearly (``up`` in ``silu(gate) * up``, ``v``
before the attention output projection) has those columns and its bias divided by ``s``. The
float function is unchanged up to float rounding; what changes is which side of the matmul
carries the channel's magnitude when it is quantized.

* :func:`jaxmem.ops.smoothquant_scales` (SmoothQuant): move activation outliers into the weights,
  ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``, so that per-token int8 activations
  (W8A8) lose less.
* :func:`jaxmem.ops.awq_scales` (AWQ): protect the weights of salient input channels (large mean
  ``|x_j|``) from weight-only rounding: ``s = mean|X|**alpha``, ``alpha`` searched on a grid to
  minimize the exact squared output error over the calibration rows, computed from
  ``H = X^T X`` alone; optionally followed by AWQ's clip search (shrink each group's max).
* :func:`jaxmem.fold_input_scales`: the param transform applying scales to a params tree.

Calibration statistics arrive as plain arrays per kernel input: ``act_absmax = max_rows |x_j|``,
``act_mean_abs = mean_rows |x_j|`` and ``hessian = X^T X`` (as :func:`jaxmem.input_hessians`
collects for GPTQ).
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import check_bits, dequantize, quantize

# AWQ's clip search: each group's max |w| shrunk to these fractions (1.0 = no clipping).
_CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))  # 1.0, 0.95, ..., 0.55
# Gauss-Seidel passes over the groups of the clip search (each never raises the error).
_CLIP_PASSES = 2
# act_mean_abs is floored at this fraction of its max before the power (dead channels).
_MEAN_FLOOR = 1e-6


# ----------------------------------------------------------------------------- helpers


def _check_real(name: str, arg: str, v: Any, lo: float, hi: float, *, lo_open: bool = False):
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name}: {arg} must be a real number, got {v!r}.")
  v = float(v)
  ok = (lo < v if lo_open else lo <= v) and v <= hi
  if not ok:
    left = "(" if lo_open else "["
    raise ValueError(f"{name}: {arg}={v}; it must be in {left}{lo}, {hi}].")
  return v


def _concrete(name: str, what: str, x: Any) -> np.ndarray:
  """``x`` as a float32 numpy array; a traced value is a ValueError (host-side calibration)."""
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
        f"{name}: {what} is traced (inside jax.jit/vmap); the scale search runs on concrete "
        "calibration arrays on the host. Call it outside jit."
    )
  if tree_lib.is_compressed(x):
    raise ValueError(
        f"{name}: {what} is a {type(x).__name__}; scales are computed from (and folded into) "
        "float weights, before quantizing."
    )
  a = np.asarray(x)
  if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
    raise TypeError(f"{name}: {what} must be a numeric array, got dtype {a.dtype}.")
  return a.astype(np.float32)


def _kernel_items(name: str, kernels: Any) -> tuple[str, list[str], list[Any]]:
  """``(container kind, names, arrays)`` of one kernel, a sequence of them or a mapping."""
  if isinstance(kernels, Mapping):
    if not kernels:
      raise ValueError(f"{name}: kernels is an empty mapping; pass the kernels sharing the input.")
    return "map", [str(k) for k in kernels], list(kernels.values())
  if isinstance(kernels, (list, tuple)):
    if not kernels:
      raise ValueError(f"{name}: kernels is empty; pass the kernels sharing the input.")
    return "seq", [f"kernels[{i}]" for i in range(len(kernels))], list(kernels)
  return "one", ["kernel"], [kernels]


def _rebuild(kind: str, names: Sequence[str], arrays: Sequence[Any], like: Any) -> Any:
  if kind == "map":
    return dict(zip(like, arrays))
  if kind == "seq":
    return type(like)(arrays) if isinstance(like, tuple) else list(arrays)
  return arrays[0]


def _require_finite(name: str, what: str, a: np.ndarray, fix: str) -> None:
  bad = int(np.count_nonzero(~np.isfinite(a)))
  if bad:
    raise ValueError(f"{name}: {what} holds NaN or Inf ({bad} of {a.size} entries); {fix}.")


# ----------------------------------------------------------------------------- SmoothQuant


def smoothquant_scales(
    act_absmax: Any, kernels: Any, alpha: float = 0.5, *, eps: float = 1e-5
) -> jax.Array:
  """SmoothQuant's per-input-channel scales: ``max|X_j|**alpha / max|W_j|**(1 - alpha)``.

  The max over weights runs over every kernel sharing this input (e.g. q, k and v after one
  norm) and all their output columns. After folding (:func:`jaxmem.fold_input_scales`), channel
  ``j``'s activations are ``X_j / s_j`` and its weights ``s_j W_j``; with ``alpha = 0.5``
  both have the same max magnitude ``sqrt(max|X_j| max|W_j|)``, so per-token int8
  activations and per-channel int8 weights share the outlier's range.

  Zeros are guarded: both statistics are floored at ``eps`` before the powers, and a channel
  whose activation max is 0 (never active) or whose weights are all 0 gets ``s = 1`` (there
  is nothing to move), so every scale is finite and positive.

  Args:
    act_absmax: ``(*stack, in)`` per-channel max ``|x|`` over the calibration rows.
    kernels: a kernel ``(*stack, in, ...out)``, or a sequence / mapping of kernels sharing this
      input (leading axes equal to ``act_absmax``'s shape).
    alpha: migration strength in ``[0, 1]``: 0 leaves activations alone (``s`` only from the
      weights), 1 moves all of the activation range into the weights.
    eps: floor of both statistics (> 0).

  Returns:
    float32 ``s`` of ``act_absmax``'s shape.

  Raises:
    ValueError: shapes that do not line up (naming the kernel), negative or non-finite
      statistics or weights, ``alpha`` outside ``[0, 1]``, ``eps <= 0``.
    TypeError: a non-numeric ``alpha``/``eps``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, -1.0], [4.0, 0.5]])      # max |W_j|: 1, 4
    >>> smoothquant_scales(jnp.array([4.0, 1.0]), w)  # sqrt(4 / 1), sqrt(1 / 4)
    Array([2. , 0.5], dtype=float32)
  """
  name = "smoothquant_scales"
  alpha = _check_real(name, "alpha", alpha, 0.0, 1.0)
  eps = _check_real(name, "eps", eps, 0.0, math.inf, lo_open=True)
  _, names, arrays = _kernel_items(name, kernels)
  a = jnp.asarray(act_absmax)
  if a.ndim == 0:
    raise ValueError(f"{name}: act_absmax is a scalar; pass one max |x| per input channel (in,).")
  if not isinstance(act_absmax, jax.core.Tracer):
    an = np.asarray(act_absmax, np.float64)
    _require_finite(name, "act_absmax", an, "collect it from finite calibration activations")
    if (an < 0).any():
      raise ValueError(
          f"{name}: act_absmax has {int((an < 0).sum())} negative entries; it is max |x| per "
          "channel, so every entry is >= 0."
      )
  ks = []
  for n, k in zip(names, arrays):
    if tree_lib.is_compressed(k):
      raise ValueError(
          f"{name}: {n} is a {type(k).__name__}; compute the scales from the float kernels, "
          "fold them, then quantize."
      )
    k = jnp.asarray(k)
    if k.ndim <= a.ndim or tuple(k.shape[: a.ndim]) != tuple(a.shape):
      raise ValueError(
          f"{name}: {n} has shape {tuple(k.shape)}, but act_absmax has shape {tuple(a.shape)}; "
          "a kernel's leading axes are (*stack, in) = act_absmax's shape, then its outputs."
      )
    if not isinstance(k, jax.core.Tracer):
      _require_finite(name, n, np.asarray(k), "fix the weights")
    ks.append(k)
  return _smooth(a, tuple(ks), jnp.float32(alpha), jnp.float32(eps))


@jax.jit
def _smooth(a, ks, alpha, eps):
  """:func:`jaxmem.ops.smoothquant_scales`' arithmetic, one compiled call."""
  wmax = None
  for k in ks:
    m = jnp.max(jnp.abs(k.astype(jnp.float32)), axis=tuple(range(a.ndim, k.ndim)))
    wmax = m if wmax is None else jnp.maximum(wmax, m)
  a = a.astype(jnp.float32)
  s = jnp.maximum(a, eps) ** alpha / jnp.maximum(wmax, eps) ** (1.0 - alpha)
  return jnp.where((a > 0) & (wmax > 0), s, 1.0).astype(jnp.float32)


# ----------------------------------------------------------------------------- AWQ


def _rtn_layout(group_size: int | None) -> dict[str, Any]:
  """jaxmem.quantize_weights' kernel layout: per output column, groups along the inputs."""
  return dict(channel_axes=(1,), group_size=group_size, group_axis=0)


def _rtn(w: jax.Array, bits: int, group_size: int | None) -> jax.Array:
  """Dequantized symmetric round-to-nearest of an ``(in, out)`` kernel (traceable)."""
  q = quantize(w, bits, pack_bits=False, check_finite=False, **_rtn_layout(group_size))
  return dequantize(q, jnp.float32)


def _hmm(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _output_error(ws, h, s, deq):
  """``sum_k tr(E_k^T H E_k)``, ``E_k = W_k - diag(1/s) deq(diag(s) W_k)``."""
  col = s[:, None]
  total = jnp.zeros((), jnp.float32)
  for w in ws:
    e = w - deq(w * col) / col
    total = total + jnp.sum(e * _hmm(h, e))
  return total


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "quantize_fn"))
def _grid_errors(ws, h, scales, *, bits, group_size, quantize_fn):
  """The output error of every candidate scale (rows of ``scales``), one compiled loop."""
  if quantize_fn is None:
    deq = functools.partial(_rtn, bits=bits, group_size=group_size)
  else:
    def deq(x):
      out = jnp.asarray(quantize_fn(x)).astype(jnp.float32)
      if out.shape != x.shape:
        raise ValueError(
            f"awq_scales: quantize_fn returned shape {tuple(out.shape)} for a kernel of shape "
            f"{tuple(x.shape)}; it must return the dequantized kernel, same shape."
        )
      return out

  return jax.lax.map(lambda s: _output_error(ws, h, s, deq), scales)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "passes"))
def _clip_search(w, h, s, *, bits, group_size, passes):
  """AWQ's clip search on ``diag(s) W``, exact in the H-weighted error.

  Each group (of each output column) gets a clip ratio ``r``: its weights are clamped to
  ``+-r max|w|`` before rounding. The error ``tr(E^T H E)`` couples groups through H, so the
  groups are visited in turn (Gauss-Seidel): group ``G``'s ratio minimizes the exact error
  given the others, ``e_G^T H_GG e_G + 2 e_G^T (H E - H_:G e_G)_G`` per column, then ``H E``
  is updated. Every step keeps or lowers the error, so the result is never worse than
  unclipped rounding (ratio 1.0, the start).

  Returns ``(ratio index per group and column, clipped scaled kernel, error)``.
  """
  n_in, n_out = w.shape
  g = group_size or n_in
  ng = n_in // g
  ratios = jnp.asarray(_CLIP_RATIOS, jnp.float32)
  col = s[:, None]
  sw = w * col
  amax = jnp.max(jnp.abs(sw.reshape(ng, g, n_out)), axis=1)  # (ng, out)

  def candidates(i):
    """``E_G`` of group ``i`` for every ratio: ``(ratios, g, out)``."""
    rows = jax.lax.dynamic_slice(sw, (i * g, 0), (g, n_out))
    w_rows = jax.lax.dynamic_slice(w, (i * g, 0), (g, n_out))
    s_rows = jax.lax.dynamic_slice(col, (i * g, 0), (g, 1))
    lim = amax[i]

    def one(r):
      bound = jnp.broadcast_to((r * lim)[None, :], rows.shape)
      return w_rows - _rtn(jnp.clip(rows, -bound, bound), bits, None) / s_rows

    return jax.vmap(one)(ratios)

  e0 = w - _rtn(sw, bits, group_size) / col
  he0 = _hmm(h, e0)

  def step(k, carry):
    e, he, choice = carry
    i = k % ng
    cand = candidates(i)
    h_gg = jax.lax.dynamic_slice(h, (i * g, i * g), (g, g))
    h_g = jax.lax.dynamic_slice(h, (0, i * g), (n_in, g))
    e_g = jax.lax.dynamic_slice(e, (i * g, 0), (g, n_out))
    cross = jax.lax.dynamic_slice(he, (i * g, 0), (g, n_out)) - _hmm(h_gg, e_g)
    hc = jnp.einsum("ab,rbc->rac", h_gg, cand, precision=jax.lax.Precision.HIGHEST)
    cost = jnp.sum(cand * hc, axis=1) + 2.0 * jnp.sum(cand * cross[None], axis=1)  # (r, out)
    best = jnp.argmin(cost, axis=0)
    new_g = jnp.take_along_axis(cand, best[None, None, :], axis=0)[0]
    he = he + _hmm(h_g, new_g - e_g)
    e = jax.lax.dynamic_update_slice(e, new_g, (i * g, 0))
    choice = jax.lax.dynamic_update_slice(choice, best[None, :].astype(jnp.int32), (i, 0))
    return e, he, choice

  choice0 = jnp.zeros((ng, n_out), jnp.int32)
  e, _, choice = jax.lax.fori_loop(0, passes * ng, step, (e0, he0, choice0))
  bound = jnp.repeat(ratios[choice] * amax, g, axis=0)  # (in, out)
  clipped = jnp.clip(sw, -bound, bound)
  err = jnp.sum(e * _hmm(h, e))
  return choice, clipped, err


def _awq_one(ws, h, m, bits, group_size, alphas, clip, quantize_fn):
  """AWQ for one layer: ``(s, errors, best index, clip result or None)``."""
  m = np.maximum(m.astype(np.float64), _MEAN_FLOOR * m.max())
  cands = []
  for a in alphas:
    s = m**a
    cands.append(s / np.sqrt(s.max() * s.min()))  # alpha = 0 gives s = 1 exactly
  scales = jnp.asarray(np.stack(cands).astype(np.float32))
  wj = tuple(jnp.asarray(w) for w in ws)
  hj = jnp.asarray(h)
  errors = np.asarray(_grid_errors(
      wj, hj, scales, bits=bits, group_size=group_size, quantize_fn=quantize_fn), np.float64)
  if not np.isfinite(errors).all():
    raise ValueError(
        "awq_scales: the output error is NaN or Inf for some candidate scales; check that the "
        "Hessian is X^T X of finite activations and the weights are finite."
    )
  best = int(np.argmin(errors))  # first minimum: ties keep the smaller alpha (0 = RTN)
  s = scales[best]
  clipped = None
  if clip:
    clipped = [
        _clip_search(w, hj, s, bits=bits, group_size=group_size, passes=_CLIP_PASSES)
        for w in wj
    ]
  return s, errors, best, clipped


def awq_scales(
    kernels: Any,
    hessian: Any,
    act_mean_abs: Any,
    bits: int = 4,
    *,
    group_size: int | None = 128,
    grid: int = 20,
    clip: bool = True,
    quantize_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
  """AWQ's activation-aware scales: grid search of ``s = mean|X|**alpha`` on the output error.

  For each ``alpha`` in ``{0, 1/grid, ..., (grid-1)/grid}``, ``s = m**alpha`` with ``m =
  act_mean_abs`` (floored at ``1e-6 * max(m)``), normalized by ``sqrt(max(s) min(s))`` (so the
  scales straddle 1). Its error is the exact squared output error over the calibration rows,
  summed over the kernels sharing this input::

      sum_k tr(E_k^T H E_k),   E_k = W_k - diag(1/s) deq(Q(diag(s) W_k)),   H = X^T X

  which is ``sum_k ||X W_k - (X / s) deq(Q(diag(s) W_k))||^2`` computed without the rows. The
  minimum wins; ``alpha = 0`` is ``s = 1``, plain round-to-nearest (RTN), so the chosen
  error is never above RTN's. ``Q`` is jaxmem's symmetric group-wise RTN in the layout of
  ``jaxmem.quantize_weights(bits, group_size=group_size)`` (per output column, groups of
  ``group_size`` consecutive inputs).

  With ``clip``, AWQ's clip search follows on ``diag(s) W``: each group's (per output
  column) max ``|w|`` is shrunk to a ratio in ``1.0, 0.95, ..., 0.55``, picked to minimize
  the same H-weighted error (groups visited in turn, exact given the others; never worse
  than no clipping). The clipped kernels come back in ``info['kernels']`` in the unscaled
  space: put them into the params, then fold ``s`` (:func:`jaxmem.fold_input_scales`) and quantize
  with ``jaxmem.quantize_weights(bits, group_size=group_size)``.

  Runs on concrete arrays (not under ``jit``); the search itself is one compiled call.

  Args:
    kernels: an ``(in, out)`` kernel, or a sequence / mapping of kernels sharing this input
      (e.g. q, k, v). Leading stack axes (``(*stack, in, out)``, with ``hessian``
      ``(*stack, in, in)`` and ``act_mean_abs`` ``(*stack, in)``) are searched per layer.
    hessian: ``X^T X`` of this input over the calibration rows, ``(in, in)``.
    act_mean_abs: ``mean_rows |x_j|``, ``(in,)``.
    bits: 2..8.
    group_size: inputs per scale group (must divide ``in``), or None for per-channel.
    grid: number of alpha candidates (>= 1; 1 is RTN alone).
    clip: run the clip search.
    quantize_fn: a custom quantizer ``w (in, out) -> dequantized w`` used instead of jaxmem's
      RTN in the alpha search; it runs under ``jax.jit`` (jax.numpy, e.g.
      ``lambda w: jaxmem.ops.quantize(w, 4, symmetric=False).dequantize()``). The clip search
      needs the built-in one, so pass ``clip=False`` with it.

  Returns:
    ``(s, info)``: float32 scales ``(*stack, in)``, and a dict with ``alphas`` (the grid),
    ``errors`` (the output error per alpha, ``(*stack, grid)``), ``alpha`` (the chosen one),
    ``rtn_error`` (``errors`` at alpha 0), ``scaled_error`` (at the chosen alpha),
    ``error`` (after the clip search; ``scaled_error`` without it), ``clip_ratios`` (per
    kernel, the ratio per group and column, ``(*stack, in // group_size, out)``; None without
    clip) and ``kernels`` (the clipped kernels, unscaled, in the container given; the
    originals without clip). Per-layer entries are stacked along the stack axes.

  Raises:
    ValueError: ``group_size`` does not divide ``in`` (naming both), shapes that do not line
      up, NaN/Inf in any input, negative ``act_mean_abs`` or all zeros, traced inputs, a bad
      ``bits``/``grid``, ``quantize_fn`` with ``clip=True``.
    TypeError: non-int ``grid``/``group_size``, non-bool ``clip``, non-callable
      ``quantize_fn``.

  Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 8)) * np.array([20.0] + [1.0] * 7)  # one outlier channel
    >>> w = rng.normal(size=(8, 4))
    >>> s, info = awq_scales(w, x.T @ x, np.abs(x).mean(0), 3, group_size=8, grid=4)
    >>> s.shape, info['errors'].shape, bool(info['error'] <= info['rtn_error'])
    ((8,), (4,), True)
  """
  name = "awq_scales"
  check_bits(bits, name)
  base.check_group_size(name, group_size)
  base.check_int(name, "grid", grid, minimum=1)
  base.check_bool(name, clip=clip)
  if quantize_fn is not None:
    if not callable(quantize_fn):
      raise TypeError(f"{name}: quantize_fn must be a function w -> dequantized w, or None.")
    if clip:
      raise ValueError(
          f"{name}: the clip search uses jaxmem's group-wise round-to-nearest, not quantize_fn; "
          "pass clip=False with a custom quantize_fn."
      )
  kind, names, arrays = _kernel_items(name, kernels)
  h = _concrete(name, "hessian", hessian)
  m = _concrete(name, "act_mean_abs", act_mean_abs)
  if m.ndim == 0:
    raise ValueError(f"{name}: act_mean_abs is a scalar; pass mean |x_j| per input channel (in,).")
  lead, n_in = m.shape[:-1], m.shape[-1]
  if h.shape != lead + (n_in, n_in):
    raise ValueError(
        f"{name}: hessian has shape {h.shape}, act_mean_abs {m.shape}; the Hessian of this input "
        f"is X^T X, shape {lead + (n_in, n_in)}."
    )
  ws = []
  for n, k in zip(names, arrays):
    w = _concrete(name, n, k)
    if w.ndim != len(lead) + 2 or w.shape[:-1] != m.shape:
      raise ValueError(
          f"{name}: {n} has shape {w.shape}, but act_mean_abs has shape {m.shape}; a kernel is "
          f"(*stack, in, out) = {m.shape + ('out',)}."
      )
    if w.shape[-1] == 0:
      raise ValueError(f"{name}: {n} has no output columns (shape {w.shape}).")
    _require_finite(name, n, w, "fix the weights")
    ws.append(w)
  if group_size is not None and n_in % group_size:
    raise ValueError(
        f"{name}: group_size={group_size} does not divide the kernels' input size {n_in}; pick "
        f"a divisor of {n_in} (the group size jaxmem.quantize_weights will use), or None for one "
        "scale per output column."
    )
  fix = "collect it again from finite calibration activations"
  _require_finite(name, "hessian", h, fix)
  _require_finite(name, "act_mean_abs", m, fix)
  if (m < 0).any():
    raise ValueError(
        f"{name}: act_mean_abs has {int((m < 0).sum())} negative entries; it is mean |x_j| over "
        "the calibration rows, so every entry is >= 0."
    )
  alphas = np.arange(grid, dtype=np.float64) / grid
  outs = []
  for idx in np.ndindex(*lead):
    mi = m[idx]
    if not mi.max() > 0:
      where = f" (layer {idx})" if lead else ""
      raise ValueError(
          f"{name}: act_mean_abs is all zeros{where}: no calibration activation reached this "
          "input; collect statistics from real inputs."
      )
    outs.append(_awq_one(
        [w[idx] for w in ws], h[idx], mi, bits, group_size, alphas, clip, quantize_fn))

  def stack(xs):
    return np.stack([np.asarray(x) for x in xs]).reshape(lead + np.shape(xs[0]))

  s = jnp.asarray(stack([o[0] for o in outs]))
  errors = stack([o[1] for o in outs])
  best = stack([o[2] for o in outs]).astype(np.int64)
  scaled_error = np.take_along_axis(errors, best[..., None], axis=-1)[..., 0]
  info: dict[str, Any] = dict(
      alphas=alphas,
      errors=errors,
      alpha=alphas[best] if lead else float(alphas[best]),
      rtn_error=errors[..., 0] if lead else float(errors[0]),
      scaled_error=scaled_error if lead else float(scaled_error),
  )
  if clip:
    ratios = np.asarray(_CLIP_RATIOS)
    err = stack([sum(float(c[2]) for c in o[3]) for o in outs])
    info["error"] = err if lead else float(err)
    info["clip_ratios"] = _rebuild(kind, names, [
        ratios[stack([o[3][i][0] for o in outs])] for i in range(len(ws))], kernels)
    # Unscaled clipped kernels: diag(1/s) clip(diag(s) W).
    col = np.asarray(s)[..., None]
    clipped = [stack([o[3][i][1] for o in outs]) / col for i in range(len(ws))]
    info["kernels"] = _rebuild(kind, names, [jnp.asarray(c) for c in clipped], kernels)
  else:
    info["error"] = info["scaled_error"]
    info["clip_ratios"] = None
    info["kernels"] = kernels
  return s, info


# ----------------------------------------------------------------------------- folding


class InputScale(NamedTuple):
  """One input's scales and where they fold (an entry of :func:`jaxmem.fold_input_scales`).

  Attributes:
    scale: ``(*stack, in)`` positive scales (from :func:`jaxmem.ops.smoothquant_scales` or
      :func:`jaxmem.ops.awq_scales`); leading stack axes for params stacked by a scan over layers.
    kernels: path(s) of the kernels reading this input (``'layers/q/kernel'``); their input
      rows (the axis after the stack) are multiplied by ``scale``. Their leading axes are
      ``scale``'s shape.
    producer: path of what produced the input: a norm's scale vector (``producer_kind=
      'norm'``, shape = ``scale``'s), divided by ``scale``; or a kernel whose output columns
      (last axis, length ``in``) feed the input linearly (``'kernel'``), those columns
      divided by ``scale``.
    producer_kind: ``'norm'`` or ``'kernel'``.
    producer_bias: path of the producer's bias (a LayerNorm's or the producer kernel's),
      divided by ``scale`` too; None (default): the sibling ``bias`` of ``producer``
      (``'attn_norm/scale'`` -> ``'attn_norm/bias'``) when the params have one.
  """

  scale: Any
  kernels: str | Sequence[str]
  producer: str
  producer_kind: str = "norm"
  producer_bias: str | None = None


_KINDS = ("norm", "kernel")


def _check_fold(i: int, fold: Any) -> InputScale:
  name = "fold_input_scales"
  if not isinstance(fold, InputScale):
    if not isinstance(fold, (tuple, list)) or not 3 <= len(fold) <= 5:
      raise TypeError(
          f"{name}: fold {i} is {fold!r}; each fold is an InputScale(scale, kernels, producer, "
          "producer_kind='norm', producer_bias=None) or a tuple of those fields."
      )
    fold = InputScale(*fold)
  kernels = (fold.kernels,) if isinstance(fold.kernels, str) else fold.kernels
  if isinstance(kernels, (bytes, Mapping)) or not isinstance(kernels, Sequence) or not kernels or \
      not all(isinstance(k, str) for k in kernels):
    raise TypeError(
        f"{name}: fold {i}: kernels must be a path string or a non-empty sequence of them "
        f"(e.g. ['layers/q/kernel', 'layers/k/kernel']), got {fold.kernels!r}."
    )
  if not isinstance(fold.producer, str):
    raise TypeError(f"{name}: fold {i}: producer must be a path string, got {fold.producer!r}.")
  if fold.producer_bias is not None and not isinstance(fold.producer_bias, str):
    raise TypeError(
        f"{name}: fold {i}: producer_bias must be a path string or None, got "
        f"{fold.producer_bias!r}."
    )
  if fold.producer_kind not in _KINDS:
    raise ValueError(
        f"{name}: fold {i}: producer_kind={fold.producer_kind!r}; use 'norm' (a norm's scale "
        "vector is divided) or 'kernel' (a kernel's output columns are divided)."
    )
  if fold.producer in kernels:
    raise ValueError(
        f"{name}: fold {i}: '{fold.producer}' is both the producer and a consumer of the input."
    )
  s = fold.scale
  if isinstance(s, jax.core.Tracer):
    raise ValueError(
        f"{name}: fold {i}'s scale is traced; compute the scales outside jit (the transform "
        "itself runs under jit on the params)."
    )
  s = np.asarray(s)
  if not np.issubdtype(s.dtype, np.floating):
    raise TypeError(f"{name}: fold {i}'s scale must be a float array, got dtype {s.dtype}.")
  if s.ndim == 0 or s.size == 0:
    raise ValueError(
        f"{name}: fold {i}'s scale has shape {s.shape}; it is one scale per input channel, "
        "(*stack, in)."
    )
  s = s.astype(np.float32)
  where = f"fold {i} ('{fold.producer}' -> {list(kernels)})"
  bad = int(np.count_nonzero(~np.isfinite(s)))
  if bad:
    raise ValueError(
        f"{name}: {where}: the scale holds NaN or Inf ({bad} of {s.size} entries); scales "
        "must be finite and > 0."
    )
  if (s <= 0).any():
    raise ValueError(
        f"{name}: {where}: the scale has {int((s <= 0).sum())} entries <= 0 (min "
        f"{float(s.min())}); scales must be finite and > 0, since x / s is folded into the "
        "producer."
    )
  return InputScale(s, tuple(kernels), fold.producer, fold.producer_kind, fold.producer_bias)


def _unknown_path(i: int, role: str, path: str, paths: list[str]) -> ValueError:
  close = difflib.get_close_matches(path, paths, n=3)
  hint = f" Did you mean {close}?" if close else ""
  return ValueError(
      f"fold_input_scales: fold {i}: {role} '{path}' is not a leaf of the params.{hint} "
      f"Paths are: {tree_lib.describe_paths(paths, limit=40)}"
  )


def _plan(folds: Sequence[InputScale], params: Any) -> list[tuple[str, np.ndarray, bool]]:
  """``[(path, scale shaped to broadcast, multiply?)]`` in order, validating paths and shapes."""
  name = "fold_input_scales"
  items = dict(tree_lib.leaves_with_paths(params))
  paths = list(items)
  ops = []

  def leaf(i, role, path):
    if path not in items:
      raise _unknown_path(i, role, path, paths)
    x = items[path]
    if tree_lib.is_compressed(x):
      raise ValueError(
          f"{name}: fold {i}: {role} '{path}' is a {type(x).__name__}; fold scales into the "
          "float params before quantizing, e.g. jaxmem.chain(fold_input_scales(folds), "
          "jaxmem.quantize_int4())."
      )
    if not tree_lib.is_float_leaf(x):
      raise ValueError(
          f"{name}: fold {i}: {role} '{path}' has dtype {getattr(x, 'dtype', type(x))}; only "
          "float leaves take scales."
      )
    return tuple(x.shape)

  for i, f in enumerate(folds):
    s, r = f.scale, f.scale.ndim
    stack, n = s.shape[:-1], s.shape[-1]
    for k in f.kernels:
      shape = leaf(i, "kernel", k)
      if len(shape) <= r or shape[:r] != s.shape:
        raise ValueError(
            f"{name}: fold {i}: kernel '{k}' has shape {shape}, but the scale has shape "
            f"{s.shape}; a consumer kernel's leading axes are (*stack, in) = the scale's shape "
            "(its input rows are multiplied)."
        )
      ops.append((k, s.reshape(s.shape + (1,) * (len(shape) - r)), True))
    shape = leaf(i, "producer", f.producer)
    if f.producer_kind == "norm":
      if shape != s.shape:
        raise ValueError(
            f"{name}: fold {i}: norm scale '{f.producer}' has shape {shape}, but the scale has "
            f"shape {s.shape}; a norm's scale vector is (*stack, in), one entry per channel."
        )
      ops.append((f.producer, s, False))
    else:
      if len(shape) < r + 1 or shape[: r - 1] != stack or shape[-1] != n:
        raise ValueError(
            f"{name}: fold {i}: producer kernel '{f.producer}' has shape {shape}, but the scale "
            f"has shape {s.shape}; its output columns (last axis) must be the {n} input "
            f"channels, after the stack axes {stack}."
        )
      ops.append((f.producer, s.reshape(stack + (1,) * (len(shape) - r) + (n,)), False))
    bias = f.producer_bias
    if bias is None:
      sibling = f.producer.rsplit("/", 1)[0] + "/bias" if "/" in f.producer else "bias"
      bias = sibling if sibling in items and sibling != f.producer else None
    if bias is not None:
      shape = leaf(i, "producer bias", bias)
      if shape != s.shape:
        raise ValueError(
            f"{name}: fold {i}: producer bias '{bias}' has shape {shape}, but the scale has "
            f"shape {s.shape}; the producer's bias is (*stack, in)."
        )
      ops.append((bias, s, False))
  return ops


def fold_input_scales(folds: Sequence[InputScale | tuple]) -> base.ParamTransform:
  """Folds per-input-channel scales into the params: ``y = (x / s) @ (diag(s) W)``.

  For each :class:`InputScale`, the consumer kernels' input rows are multiplied by ``s`` and
  ``1 / s`` goes into the producer: a norm's scale vector (and its bias) divided by ``s``, or a
  producer kernel's output columns (and its bias) divided by ``s``. The model's float function
  is unchanged up to float rounding. Scales with leading stack axes (``(L, in)``) apply per
  layer to stacked ``(L, in, out)`` kernels and ``(L, in)`` norm scales. Folds apply in order;
  a kernel may be a consumer of one fold and the producer of another (``v`` before ``o``).
  Run it before quantizing: ``jaxmem.chain(fold_input_scales(folds), jaxmem.quantize_int4())``.

  Args:
    folds: a sequence of :class:`InputScale` (or tuples ``(scale, kernels, producer,
      producer_kind='norm', producer_bias=None)``); scales are concrete arrays.

  Returns:
    A stateless :class:`jaxmem.ParamTransform` (runs under ``jit``; each leaf keeps its dtype).

  Raises:
    ValueError: non-finite or non-positive scales, a bad ``producer_kind`` (here); a path
      that is not a leaf (listing the paths there are), a shape that does not match the scale
      (naming the path), a quantized or non-float leaf (at init/update).
    TypeError: a malformed fold.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'norm': {'scale': jnp.ones(2)}, 'dense': {'kernel': jnp.ones((2, 3))}}
    >>> tx = fold_input_scales([InputScale(jnp.array([2.0, 4.0]), 'dense/kernel', 'norm/scale')])
    >>> out = jaxmem.transform(tx, params)
    >>> out['norm']['scale'].tolist(), out['dense']['kernel'][:, 0].tolist()
    ([0.5, 0.25], [2.0, 4.0])
  """
  name = "fold_input_scales"
  if isinstance(folds, (InputScale, str, bytes, Mapping)) or not isinstance(folds, Sequence):
    raise TypeError(
        f"{name}: folds must be a sequence of InputScale(scale, kernels, producer, "
        f"producer_kind) entries, got {type(folds).__name__}."
    )
  checked = tuple(_check_fold(i, f) for i, f in enumerate(folds))

  def init(params):
    base.check_params(params, name)
    _plan(checked, params)
    return base.EmptyState()

  def update(params, state):
    base.check_params(params, name)
    items = dict(tree_lib.leaves_with_paths(params))
    new: dict[str, Any] = {}
    for path, s, mul in _plan(checked, params):
      x = new.get(path, items[path])
      xf = jnp.asarray(x).astype(jnp.promote_types(x.dtype, jnp.float32))
      sj = jnp.asarray(s, xf.dtype)
      new[path] = (xf * sj if mul else xf / sj).astype(x.dtype)
    return tree_lib.map_with_path(lambda p, x: new.get(p, x), params), state

  return base.ParamTransform(init, update)
