"""GPTQ: post-training weight quantization that compensates rounding errors with calibration data.

Frantar, Ashkboos, Hoefler & Alistarh (2023), "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers". For a kernel ``W`` (``y = x @ W``, shape ``(in, out)``)
and the Hessian of the layer's squared output error, ``H = X^T X`` over calibration inputs
``X``, the input rows of ``W`` are quantized one at a time, and each row's rounding error is
spread over the rows not yet quantized, weighted by the inverse Hessian (Optimal Brain
Surgeon, Hassibi & Stork 1993), so that ``X @ W_q`` stays close to ``X @ W``.

The result is an ordinary :class:`jaxmem.QArray` (symmetric, group-wise scales along the
input axis, packed when ``bits <= 4``): only the integer values differ from round-to-nearest,
and it runs wherever any QArray runs (:func:`jaxmem.apply`).

Two parts:

* :func:`jaxmem.input_hessians` (Flax Linen glue, in :mod:`jaxmem._src.flax.calibration`):
  runs the model on calibration batches and returns ``X^T X`` of the input of every chosen
  ``nn.Dense`` layer, keyed by its kernel's path;
* :func:`quantize_gptq`: a param transform quantizing kernels that have a Hessian by GPTQ and
  other selected leaves (e.g. embedding tables) by round-to-nearest with the same layout.

The per-kernel solve runs on the host in float64 numpy (outside ``jit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base, lowbit
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import QArray, default_pack_axis, pack_ints, quantize
from jaxmem._src.quantize import default_channel_axes, default_quant_where, quantizing_leafwise

_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _check_damp(damp: float, name: str) -> None:
  if isinstance(damp, bool) or not isinstance(damp, int | float | np.floating):
    raise TypeError(f"{name}: damp must be a float (e.g. 0.01), got {damp!r}.")
  if not 0.0 <= float(damp) < np.inf:
    raise ValueError(
        f"{name}: damp={damp}; it is added to the Hessian's diagonal as a fraction of its mean, "
        "so pass a finite value >= 0 (e.g. 0.01)."
    )


def damped_problem(
    w: Any, hessian: Any, damp: float, *, name: str, path: str, group_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Validated float64 copies of an ``(in, out)`` kernel and its damped Hessian ``X^T X``.

  Shared by GPTQ and SparseGPT (:mod:`jaxmem._src.sparsegpt`). Inputs never seen in the
  calibration data (a zero Hessian diagonal) get a unit diagonal and zero weights; then
  ``damp * mean(diag(H))`` is added to the diagonal.

  Raises:
    ValueError: a kernel that is not 2-d or is empty, a Hessian of the wrong shape, an input
      size that ``group_size`` does not divide, or NaN/Inf in either, naming ``path``.
  """
  w = np.array(w, dtype=np.float64)
  h = np.array(hessian, dtype=np.float64)
  if w.ndim != 2:
    raise ValueError(f"{name} '{path}': needs an (in, out) kernel, got shape {w.shape}.")
  n_in = w.shape[0]
  if w.size == 0:
    raise ValueError(
        f"{name} '{path}': the kernel is empty (shape {w.shape}); there is nothing to do. "
        "Leave it out with `where` and drop its Hessian."
    )
  if h.shape != (n_in, n_in):
    raise ValueError(
        f"{name} '{path}': Hessian shape {h.shape} does not match the kernel's input size "
        f"{n_in}; collect it from this layer's inputs (input_hessians)."
    )
  if group_size is not None and n_in % group_size:
    raise ValueError(
        f"{name} '{path}': {n_in} input rows are not divisible by group_size={group_size}; "
        f"pick a divisor of {n_in}, or group_size=None (one scale per output column)."
    )
  base.require_finite([(path, w)], name, what="the kernel")
  base.require_finite(
      [(path, h)], name, what="its Hessian (X^T X)",
      fix="collect it again with jaxmem.input_hessians from finite calibration inputs",
  )
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead, :] = 0.0
  h[np.diag_indices(n_in)] += damp * np.mean(np.diag(h))
  return w, h


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
  """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``).

  Row ``i`` holds the Optimal Brain Surgeon update of the rows after ``i`` once rows
  ``0..i-1`` are fixed: ``U[i, i]**2`` is ``[H_F^-1]_ii`` and ``U[i, j] / U[i, i]`` is
  ``[H_F^-1]_ij / [H_F^-1]_ii`` for the remaining rows ``F = {i, i+1, ...}``.
  """
  return np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_kernel(
    w: Any,
    hessian: Any,
    bits: int = 4,
    *,
    group_size: int | None = 64,
    damp: float = 0.01,
    act_order: bool = True,
    clip_search: bool = True,
    block_size: int = 128,
    path: str = "kernel",
) -> QArray:
  """GPTQ-quantizes one ``(in, out)`` kernel given ``hessian = X^T X`` (``(in, in)``).

  Scales are symmetric, per output column and (with ``group_size``) per group of input rows,
  each computed from the group's weights after the errors of earlier rows were compensated.

  Args:
    w: float kernel ``(in, out)``.
    hessian: ``(in, in)`` positive semi-definite, ``X^T X`` of the layer inputs.
    bits: 2..8.
    group_size: rows per group (must divide ``in``), or None for one scale per column.
    damp: added to the diagonal, as a fraction of its mean (numerical stability).
    act_order: quantize rows in order of decreasing Hessian diagonal (the most active
      inputs first, their errors compensated by the rest), with each group's scale fixed
      from the original weights ("static groups"), so the storage layout is unchanged.
    clip_search: pick each scale from a grid of clipped maxima (1.0 .. 0.7 of ``max|w|``)
      minimizing the group's squared rounding error, instead of ``max|w|`` itself.
    block_size: rows updated lazily together (a multiple of ``group_size`` is used).
    path: for error messages.

  Example:
    >>> import numpy as np, jaxmem
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.normal(size=(256, 64)), rng.normal(size=(64, 8))
    >>> q = jaxmem.ops.gptq_kernel(w, x.T @ x, 4, group_size=32)
    >>> rtn = jaxmem.ops.quantize(np.float32(w), 4, channel_axes=(1,), group_size=32)
    >>> err = lambda wq: np.linalg.norm(x @ (np.asarray(wq) - w))
    >>> bool(err(q.dequantize()) < err(rtn.dequantize()))
    True
  """
  lowbit.check_bits(bits, "gptq_kernel")
  base.check_group_size("gptq_kernel", group_size)
  base.check_bool("gptq_kernel", act_order=act_order, clip_search=clip_search)
  base.check_int("gptq_kernel", "block_size", block_size, minimum=1)
  _check_damp(damp, "gptq_kernel")
  w, h = damped_problem(w, hessian, damp, name="gptq", path=path, group_size=group_size)
  n_in, n_out = w.shape
  qmax = 2 ** (bits - 1) - 1
  g = group_size or n_in

  def scale_of(rows):
    """Per-column scale of a group of rows; with clip_search, the MSE-best clipped max."""
    amax = np.abs(rows).max(axis=0)
    best_s = np.maximum(amax / qmax, np.finfo(np.float32).tiny)
    if not clip_search:
      return best_s
    best_e = np.full(amax.shape, np.inf)
    for frac in _CLIP_GRID:
      sc = np.maximum(amax * frac / qmax, np.finfo(np.float32).tiny)
      e = ((np.clip(np.round(rows / sc), -qmax, qmax) * sc - rows) ** 2).sum(axis=0)
      better = e < best_e
      best_e, best_s = np.where(better, e, best_e), np.where(better, sc, best_s)
    return best_s

  # Row order: by decreasing Hessian diagonal (act order) with scales fixed up front from the
  # original groups, or natural order with each group's scale taken when the group starts.
  if act_order:
    order = np.argsort(-np.diag(h), kind="stable")
    scales = np.stack([scale_of(w[r : r + g]) for r in range(0, n_in, g)])
  else:
    order = np.arange(n_in)
    scales = np.zeros((n_in // g, n_out))
  w = w[order]
  h = h[np.ix_(order, order)]
  u = inverse_cholesky(h)
  if group_size is None or act_order:
    block = block_size
  else:  # blocks hold whole groups, so a group's scale sees all its compensated rows
    block = max(g, (block_size // g) * g)
  if group_size is None and not act_order:
    scales[0] = scale_of(w)
  q = np.zeros((n_in, n_out), np.int8)
  for b0 in range(0, n_in, block):
    b1 = min(b0 + block, n_in)
    wb = w[b0:b1].copy()
    errs = np.zeros_like(wb)
    for i in range(b1 - b0):
      row = order[b0 + i]
      if not act_order and group_size is not None and row % g == 0:
        scales[row // g] = scale_of(wb[i : i + g])
      s = scales[row // g]
      qi = np.clip(np.round(wb[i] / s), -qmax, qmax)
      q[row] = qi
      err = (wb[i] - qi * s) / u[b0 + i, b0 + i]
      wb[i:] -= np.outer(u[b0 + i, b0 + i : b1], err)
      errs[i] = err
    w[b1:] -= u[b0:b1, b1:].T @ errs
  qvalue = jnp.asarray(q)
  # Packed as jaxmem.ops.quantize packs this layout: along the input (group) axis, else along the
  # outputs, else (no axis divisible by the packing factor) one int8 per value.
  axis = default_pack_axis((n_in, n_out), bits, (1,), 0) if bits <= 4 else None
  pack_axis = None if axis is None else axis - 2
  if axis is not None:
    qvalue = pack_ints(qvalue, bits, axis=axis)
  scale = scales.astype(np.float32)  # (1, out), or (in/g, out) with groups
  return QArray(
      qvalue=qvalue,
      scale=jnp.asarray(scale),
      bits=bits,
      dtype=np.dtype(np.float32),
      pack_axis=pack_axis,
  )


def quantize_gptq(
    hessians: Mapping[str, Any],
    bits: int = 4,
    group_size: int | None = 64,
    where: base.Where = None,
    *,
    damp: float = 0.01,
    check_finite: bool = True,
) -> base.ParamTransform:
  """Weight-only PTQ: GPTQ for kernels with a Hessian, round-to-nearest for other leaves.

  The layout is that of :func:`jaxmem.quantize_weights` with ``group_size`` (kernels
  grouped along the input axis, embedding tables along features), so
  ``quantize_gptq({}, 4, 64)`` equals ``quantize_int4(64)``. Runs on concrete params (not
  under ``jit``).

  Args:
    hessians: ``{kernel_path: X^T X}``, e.g. from :func:`input_hessians`.
    bits: 2..8.
    group_size: input rows per scale group, or None (per output channel).
    where: leaves to quantize; default: ``kernel``/``embedding`` leaves with ndim >= 2.
    damp: Hessian damping (fraction of the mean diagonal).
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf
      (kernels solved by GPTQ and their Hessians are always checked).

  Example:
    >>> import numpy as np, jax.numpy as jnp, jaxmem
    >>> x = np.random.default_rng(0).normal(size=(64, 32))
    >>> params = {'dense': {'kernel': jnp.ones((32, 4))}}
    >>> q = jaxmem.transform(jaxmem.quantize_gptq({'dense/kernel': x.T @ x}, 4, 32), params)
    >>> q['dense']['kernel'].packed
    True
  """
  name = "quantize_gptq"
  if not isinstance(hessians, Mapping):
    raise TypeError(
        f"{name}: hessians must be a mapping {{kernel_path: X^T X}} (from jaxmem.input_hessians), "
        f"got {type(hessians).__name__}."
    )
  lowbit.check_bits(bits, name)
  base.check_group_size(name, group_size)
  _check_damp(damp, name)
  base.check_bool(name, check_finite=check_finite)
  base.check_where(where, name)

  def fn(path, x):
    if isinstance(x, tree_lib.Compressed):
      raise ValueError(f"quantize_gptq '{path}': the leaf is already a {type(x).__name__}.")
    if isinstance(x, jax.core.Tracer):
      raise ValueError(f"quantize_gptq '{path}': runs on concrete params, outside jax.jit.")
    if path in hessians:
      if x.ndim != 2 or default_channel_axes(path, x.ndim) != (1,):
        raise ValueError(f"quantize_gptq '{path}': GPTQ needs a 2-d (in, out) kernel.")
      return gptq_kernel(x, hessians[path], bits, group_size=group_size, damp=damp, path=path)
    layout = lowbit.leaf_layout(path, x, group_size=group_size)
    return quantize(x, bits, path=path, check_finite=False, **layout)  # scales checked

  tx_name = f"quantize_gptq_int{bits}"
  tx = quantizing_leafwise(fn, where, name=tx_name, check_finite=check_finite)

  def init(params):
    base.check_keys_selected(params, hessians, where, default=default_quant_where,
                             name=name, what="Hessians")
    return tx.init(params)

  return base.ParamTransform(init, tx.update)
