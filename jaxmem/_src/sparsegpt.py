"""SparseGPT: one-shot pruning that compensates removed weights with calibration data.

Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot". For a kernel ``W`` (``y = x @ W``, shape ``(in, out)``: the paper's weight rows are
the columns here) and ``H = X^T X`` over calibration inputs ``X``, the input rows are visited
in order. A row's pruned entries (and, with ``bits``, the rounding error of its kept ones) are
removed by the Optimal Brain Surgeon update (Hassibi & Stork 1993) restricted to the rows not
yet visited, ``dW_F = -(w_p / [H_F^-1]_pp) [H_F^-1]_{F,p}``, which the upper Cholesky factor of
``H^-1`` gives for all rows at once (:func:`jaxmem._src.gptq.inverse_cholesky`, shared with
GPTQ). The mask is chosen adaptively: per output column, within each block of ``block_size``
input rows when the sweep reaches the block (or per group of ``m`` rows for N:M), pruning the
entries of smallest ``w^2 / U_jj^2`` (``U_jj^2 = [H_F^-1]_jj``) from the weights as already
compensated by the rows before.

With ``bits`` the kept weights are quantized in the same sweep (the paper's joint
sparsify + quantize, GPTQ's update for the kept entries): symmetric scales per output column
and group of ``group_size`` input rows, each fixed from its group's pruned, compensated weights
when the sweep reaches the group. The result is then an ordinary :class:`jaxmem.QArray` in the
layout of :func:`jaxmem.quantize_weights` whose pruned entries are integer 0, which
:func:`jaxmem.sparsify` packs.

:func:`prune_sparsegpt` is the param transform (``{kernel_path: X^T X}``, e.g. from
:func:`jaxmem.input_hessians`). The per-kernel solve runs on the host in float64 numpy
(outside ``jit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base
from jaxmem._src.gptq import _check_damp, damped_problem, inverse_cholesky
from jaxmem._src.pruning import check_nm, check_prunable, check_sparsity, default_prune_where
from jaxmem._src.qarray import QArray, check_bits, default_pack_axis, pack_ints


def check_n_m(n_m: Any, name: str) -> tuple[int, int] | None:
  """Validates ``n_m``: None or a pair ``(n, m)`` keeping ``n`` of every ``m`` inputs."""
  if n_m is None:
    return None
  if isinstance(n_m, (str, bytes)) or not isinstance(n_m, tuple | list) or len(n_m) != 2:
    raise TypeError(
        f"{name}: n_m must be None or a pair (n, m) keeping n of every m consecutive inputs "
        f"(e.g. (2, 4) for 2:4 sparsity), got {n_m!r}."
    )
  check_nm(n_m[0], n_m[1], name)
  return int(n_m[0]), int(n_m[1])


def _prune_counts(sparsity: float, start: int, end: int) -> int:
  """Entries to prune among rows ``[start, end)``: cumulative rounding, so every column loses
  exactly ``round(sparsity * in)`` entries however the rows are split into blocks."""
  rnd = lambda x: int(np.floor(sparsity * x + 0.5))
  return rnd(end) - rnd(start)


def keep_ranked(scores: np.ndarray, num_prune: int) -> np.ndarray:
  """Per column (axis 0), False at the ``num_prune`` smallest scores; ties prune the earlier row.

  The numpy twin of :func:`jaxmem._src.pruning.keep_largest` along axis 0.
  """
  order = np.argsort(scores, axis=0, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(scores.shape[0])[:, None], axis=0)
  return rank >= num_prune


def nm_keep(scores: np.ndarray, n: int, m: int) -> np.ndarray:
  """``n`` of every ``m`` consecutive rows kept per column (largest scores), numpy.

  Same rule as :func:`jaxmem.ops.nm_mask` along axis 0 (rows divisible by ``m``): within a
  group the ``m - n`` smallest are pruned, ties pruning the earlier row.
  """
  rows, cols = scores.shape
  g = scores.reshape(rows // m, m, cols)
  order = np.argsort(g, axis=1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(m)[None, :, None], axis=1)
  return (rank >= m - n).reshape(rows, cols)


def _check_args(name, sparsity, n_m, bits, group_size, damp):
  sparsity = check_sparsity(sparsity, name)
  n_m = check_n_m(n_m, name)
  if bits is not None:
    check_bits(bits, name)
  base.check_group_size(name, group_size)
  if group_size is not None and bits is None:
    raise ValueError(
        f"{name}: group_size={group_size} without bits; group_size sets the quantization "
        "groups of the joint sparsify + quantize mode, so pass bits (e.g. bits=4) too, or "
        "leave group_size unset."
    )
  _check_damp(damp, name)
  return sparsity, n_m


def _solve(w, h, sparsity, n_m, bits, group_size, block_size):
  """The SparseGPT sweep over one damped problem: (float kernel, or (int codes, scales))."""
  n_in, n_out = w.shape
  u = inverse_cholesky(h)
  g = (group_size or n_in) if bits else None
  if bits:  # a mask is chosen for whole scale groups, so each scale sees its group pruned
    block = max(g, (block_size // g) * g) if g < n_in else block_size
    sel = g if n_m else (block if g < n_in else n_in)
  elif n_m:  # blocks hold whole N:M groups
    block = max(n_m[1], (block_size // n_m[1]) * n_m[1])
    sel = n_m[1]
  else:
    block = sel = block_size
  qmax = 2 ** (bits - 1) - 1 if bits else 0
  tiny = np.finfo(np.float32).tiny
  keep = np.zeros((n_in, n_out), bool)
  out = np.zeros((n_in, n_out), np.int8 if bits else np.float64)
  scales = np.zeros((n_in // g, n_out)) if bits else None
  diag = np.diag(u)
  for b0 in range(0, n_in, block):
    b1 = min(b0 + block, n_in)
    wb = w[b0:b1].copy()
    errs = np.zeros_like(wb)
    for i in range(b1 - b0):
      r = b0 + i
      if r % sel == 0:  # choose the mask of rows [r, e) from the weights compensated so far
        e = min(r + sel, n_in)
        cur = wb[i : e - b0] if e <= b1 else w[r:e]  # past the block only at r == b0 == 0
        score = cur**2 / diag[r:e, None] ** 2
        if n_m:
          keep[r:e] = nm_keep(score, *n_m)
        else:
          keep[r:e] = keep_ranked(score, _prune_counts(sparsity, r, e))
      if bits:
        if r % g == 0:
          rows = (wb[i : i + g] if r + g <= b1 else w[r : r + g]) * keep[r : r + g]
          # float32 (as stored), so the compensated error is that of the stored value
          scales[r // g] = np.maximum(np.abs(rows).max(axis=0) / qmax, tiny).astype(np.float32)
        s = scales[r // g]
        qi = np.clip(np.round(wb[i] / s), -qmax, qmax) * keep[r]
        out[r] = qi
        new = qi * s
      else:
        new = wb[i] * keep[r]
        out[r] = new
      err = (wb[i] - new) / u[r, r]
      wb[i:] -= np.outer(u[r, r:b1], err)
      errs[i] = err
    w[b1:] -= u[b0:b1, b1:].T @ errs
  return (out, scales) if bits else out


_pack = jax.jit(pack_ints, static_argnums=(1, 2))  # one compiled call, not one per op


def _qarray(q: np.ndarray, scale: np.ndarray, bits: int, dtype, grouped: bool) -> QArray:
  """A QArray ``(*lead, in, out)`` in :func:`jaxmem.quantize_weights`'s layout for kernels."""
  shape, ndim = q.shape, q.ndim
  caxes = tuple(range(ndim - 2)) + (ndim - 1,)
  axis = default_pack_axis(shape, bits, caxes, ndim - 2 if grouped else None) if bits <= 4 else None
  qvalue = jnp.asarray(q) if axis is None else _pack(jnp.asarray(q), bits, axis)
  return QArray(
      qvalue=qvalue, scale=jnp.asarray(scale.astype(np.float32)), bits=bits,
      dtype=np.dtype(dtype), pack_axis=None if axis is None else axis - ndim,
  )


def _out_dtype(w) -> np.dtype:
  """The input's float dtype (float64 only with x64 enabled), else float32."""
  dt = np.dtype(getattr(w, "dtype", np.float32))
  return np.dtype(jax.dtypes.canonicalize_dtype(dt)) if jnp.issubdtype(dt, jnp.floating) else (
      np.dtype(np.float32))


def sparsegpt_kernel(
    w: Any,
    hessian: Any,
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    path: str = "kernel",
) -> jax.Array | QArray:
  """SparseGPT-prunes one ``(in, out)`` kernel given ``hessian = X^T X`` (``(in, in)``).

  Every output column loses exactly ``round(sparsity * in)`` entries (unstructured), or keeps
  ``n`` of every ``m`` consecutive inputs (``n_m``), chosen adaptively per block of
  ``block_size`` input rows (per group of ``m`` rows for N:M) from the weights compensated so
  far, scored by ``w^2 / [H_F^-1]_jj``; the remaining weights absorb the error by the OBS
  update (module docstring).

  Args:
    w: float kernel ``(in, out)``.
    hessian: ``(in, in)`` positive semi-definite, ``X^T X`` of the layer inputs.
    sparsity: fraction of each column pruned, in [0, 1) (not used with ``n_m``).
    n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs per column (2:4 is
      ``(2, 4)``, the convention of :func:`jaxmem.ops.nm_mask`); ``m`` must divide ``in``.
    bits: quantize the kept weights in the same sweep (2..8); None keeps floats.
    group_size: with ``bits``: input rows per scale (dividing ``in``), or None for one
      scale per output column. The mask of each scale group is chosen when the sweep reaches
      it, all of its rows at once (with N:M the ``m``-groups of a scale group are then chosen
      together, so ``m`` must divide ``group_size``; with ``group_size=None`` the whole
      column's mask is chosen at the start).
    damp: added to the Hessian's diagonal, as a fraction of its mean.
    block_size: rows per mask-selection block and lazy update (a multiple of ``group_size``
      or ``m`` is used).
    path: for error messages.

  Returns:
    The pruned float kernel (the input's float dtype) with exact zeros, or with ``bits`` a
    :class:`jaxmem.QArray` in the layout of ``quantize_weights(bits, group_size=...)``
    whose pruned entries are integer 0.

  Raises:
    ValueError: sparsity outside [0, 1), a bad ``n_m``/``bits``/``group_size``/``damp``, a
      Hessian of the wrong shape, ``m`` or ``group_size`` not dividing ``in``, NaN/Inf in the
      kernel or Hessian, naming ``path``.

  Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.normal(size=(128, 16)) @ rng.normal(size=(16, 16)), rng.normal(size=(16, 4))
    >>> ws = np.asarray(sparsegpt_kernel(w, x.T @ x, 0.5))
    >>> (ws == 0).sum(axis=0).tolist()
    [8, 8, 8, 8]
    >>> q = sparsegpt_kernel(w, x.T @ x, n_m=(2, 4), bits=4, group_size=8)
    >>> q.scale.shape, bool((q.dequantize().reshape(4, 4, 4) != 0).sum(1).max() <= 2)
    ((2, 4), True)
  """
  name = "sparsegpt_kernel"
  sparsity, n_m = _check_args(name, sparsity, n_m, bits, group_size, damp)
  base.check_int(name, "block_size", block_size, minimum=1)
  res = _kernel(w, hessian, sparsity, n_m, bits, group_size, damp, block_size, path)
  return _result([res], (), bits, group_size, w)


def _kernel(w, hessian, sparsity, n_m, bits, group_size, damp, block_size, path):
  """Validated solve of one 2-d kernel: float64 kernel, or (int8 codes, scales)."""
  w64, h = damped_problem(w, hessian, damp, name="sparsegpt", path=path, group_size=group_size)
  n_in = w64.shape[0]
  if n_m and n_in % n_m[1]:
    raise ValueError(
        f"sparsegpt '{path}': {n_in} input rows are not divisible by m={n_m[1]} of "
        f"n_m={n_m}; pick an m dividing {n_in}, or prune this leaf unstructured (n_m=None)."
    )
  if n_m and bits and group_size is not None and group_size % n_m[1]:
    raise ValueError(
        f"sparsegpt '{path}': group_size={group_size} is not a multiple of m={n_m[1]}; each "
        "scale group's N:M mask is chosen with it, so pick a group size divisible by m."
    )
  return _solve(w64, h, sparsity, n_m, bits, group_size, block_size)


def _result(results, lead, bits, group_size, w):
  """Per-layer solver results stacked along ``lead`` axes: a float kernel or a QArray."""
  dtype = _out_dtype(w)
  if not bits:
    return jnp.asarray(np.stack(results).reshape(lead + results[0].shape).astype(dtype))
  q = np.stack([r[0] for r in results]).reshape(lead + results[0][0].shape)
  scales = np.stack([r[1] for r in results]).reshape(lead + results[0][1].shape)
  n_in = q.shape[-2]
  return _qarray(q, scales, bits, dtype, group_size is not None and group_size < n_in)


def check_stats_shape(name: str, path: str, x, shape, stat_rank: int, what: str) -> None:
  """Raises a ValueError naming ``path`` unless ``shape`` is ``(*lead, in, ...)`` of the kernel
  ``x`` (``stat_rank`` trailing axes of the input size; leading axes stacked layers)."""
  lead, n_in = tuple(x.shape[:-2]), x.shape[-2]
  want = lead + (n_in,) * stat_rank
  if tuple(shape) != want:
    raise ValueError(
        f"{name} '{path}': {what} of shape {tuple(shape)} does not match the kernel of shape "
        f"{tuple(x.shape)}; expected {want} (one per stacked layer along the leading axes, "
        "then the input size). Collect it from this layer's inputs."
    )


def stats_transform(name: str, stats: Mapping[str, Any], where: base.Where, fn, *,
                    concrete: bool) -> base.ParamTransform:
  """A leafwise transform running ``fn(path, leaf, stats[path])`` on selected leaves with stats.

  Selected leaves (default: ``kernel`` leaves, ndim >= 2) without stats are untouched; stats
  for a path that is not a selected leaf are an error. ``concrete``: the leaf must not be
  traced (host solvers).
  """

  def leaf(path, x):
    if path not in stats:
      return x
    check_prunable(path, x, name)
    if concrete and isinstance(x, jax.core.Tracer):
      raise ValueError(f"{name} '{path}': runs on concrete params, outside jax.jit.")
    if x.ndim < 2:
      raise ValueError(f"{name} '{path}': needs an (..., in, out) kernel, got {x.shape}.")
    return fn(path, x, stats[path])

  tx = base.leafwise(leaf, where, default=default_prune_where, name=name)

  def check_paths(params):
    base.check_keys_selected(params, stats, where, default=default_prune_where, name=name,
                             what="statistics")

  return base.checked(tx, check_paths)


def check_stats_mapping(stats: Any, name: str, what: str) -> None:
  if not isinstance(stats, Mapping):
    raise TypeError(
        f"{name}: {what} must be a mapping {{kernel_path: array}}, got {type(stats).__name__}."
    )


def prune_sparsegpt(
    hessians: Mapping[str, Any],
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    where: base.Where = None,
    damp: float = 0.01,
) -> base.ParamTransform:
  """One-shot SparseGPT pruning (optionally joint with quantization) of kernels with a Hessian.

  Each selected kernel (default: ``kernel`` leaves with ndim >= 2) whose path is in
  ``hessians`` is pruned by :func:`jaxmem.ops.sparsegpt_kernel`; selected kernels without a
  Hessian are untouched. A stacked ``[L, in, out]`` kernel takes stacked ``[L, in, in]``
  Hessians, solved layer by layer. Runs on concrete params (not under ``jit``). Follow it
  with :func:`jaxmem.sparsify` in :func:`jaxmem.chain` for packed storage.

  Args:
    hessians: ``{kernel_path: X^T X}``, e.g. from :func:`jaxmem.input_hessians`.
    sparsity: fraction of each output column pruned, in [0, 1) (not used with ``n_m``).
    n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs.
    bits: quantize the kept weights jointly (the kernel becomes a :class:`jaxmem.QArray`
      in the layout of ``quantize_weights(bits, group_size=group_size, stack_axes=...)``).
    group_size: with ``bits``: input rows per scale, or None (per output column).
    where: leaves that may be pruned; default: ``kernel`` leaves with ndim >= 2.
    damp: Hessian damping (fraction of the mean diagonal).

  Raises:
    ValueError: bad arguments (here); Hessians for paths that are not selected leaves, a
      Hessian of the wrong shape, NaN/Inf, traced params (at init/update, naming the path).

  Example:
    >>> import numpy as np, jax.numpy as jnp, jaxmem
    >>> x = np.random.default_rng(0).normal(size=(64, 8))
    >>> params = {'dense': {'kernel': jnp.arange(1., 33.).reshape(8, 4)}}
    >>> tx = jaxmem.chain(prune_sparsegpt({'dense/kernel': x.T @ x}, n_m=(2, 4)),
    ...                   jaxmem.sparsify())
    >>> jaxmem.transform(tx, params)['dense']['kernel'].nnz
    16
  """
  name = "prune_sparsegpt"
  check_stats_mapping(hessians, name, "hessians")
  _check_args(name, sparsity, n_m, bits, group_size, damp)
  base.check_where(where, name)

  def fn(path, x, hess):
    h = np.asarray(hess)
    check_stats_shape(name, path, x, h.shape, 2, "its Hessian")
    lead, xs = tuple(x.shape[:-2]), np.asarray(x)
    res = [_kernel(xs[i], h[i], sparsity, n_m, bits, group_size, damp, 128, path)
           for i in np.ndindex(lead)]
    return _result(res, lead, bits, group_size, x)

  return stats_transform(name, hessians, where, fn, concrete=True)
