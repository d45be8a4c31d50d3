"""Wanda: pruning by weights and activations, one shot, no weight update.

Sun, Liu, Bair & Kolter (2024), "A Simple and Effective Pruning Approach for Large Language
Models". A weight's score is its magnitude times the L2 norm of the input feature it
multiplies over calibration rows, ``|W_ij| * ||X_i||`` (``y = x @ W``, ``W`` of shape
``(in, out)``), and weights are compared per output: within each column of the kernel, over
the input axis. Each column keeps its ``1 - sparsity`` highest-scoring weights (or ``n`` of
every ``m`` consecutive inputs for N:M); nothing else changes.

:func:`wanda_mask` is the array function (``jax.numpy``, jittable); :func:`prune_wanda` the
param transform over ``{kernel_path: act_norm}``, where ``act_norm = sqrt(sum_rows x^2)`` of
the layer's inputs, shape ``(in,)`` (``sqrt(diag(X^T X))`` of :func:`jaxmem.input_hessians`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base
from jaxmem._src.pruning import check_sparsity, nm_mask, num_pruned
from jaxmem._src.sparsegpt import (
    check_n_m,
    check_stats_mapping,
    check_stats_shape,
    stats_transform,
)


def _check_act_norm(w, act_norm, path: str, name: str) -> jax.Array:
  a = jnp.asarray(act_norm)
  want = tuple(w.shape[:-1])
  if tuple(a.shape) != want:
    raise ValueError(
        f"{name} '{path}': act_norm of shape {tuple(a.shape)} does not match the kernel of "
        f"shape {tuple(w.shape)}; expected {want}: the L2 norm of each input feature over the "
        "calibration rows (one row per stacked layer)."
    )
  return _check_norm_values(a, path, name)


def _check_norm_values(a, path: str, name: str) -> jax.Array:
  """Float, and (concrete norms) finite and >= 0."""
  a = jnp.asarray(a)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(f"{name} '{path}': act_norm dtype is {a.dtype}; pass float norms.")
  if not isinstance(a, jax.core.Tracer):  # checked on the host (also while tracing a jit)
    an = np.asarray(a)
    base.require_finite(
        [(path, an)], name, what="its act_norm",
        fix="collect it again from finite calibration inputs",
    )
    if (an < 0).any():
      raise ValueError(
          f"{name} '{path}': act_norm has negative entries; it is an L2 norm "
          "sqrt(sum_rows x^2), >= 0."
      )
  return a


def wanda_mask(
    w: jax.Array,
    act_norm: jax.Array,
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    path: str = "kernel",
) -> jax.Array:
  """Wanda keep-mask of a kernel ``(..., in, out)``: per output column, the top-scoring inputs.

  The score is ``|w[..., i, j]| * act_norm[..., i]``. Each column keeps all but
  ``round(sparsity * in)`` entries; ties prune the earlier input first (the rule of
  :func:`jaxmem.ops.magnitude_mask`). With ``n_m = (n, m)`` it keeps ``n`` of every ``m``
  consecutive inputs per column (the convention of :func:`jaxmem.ops.nm_mask`). Leading axes
  (stacked layers) are independent. Jittable (``sparsity`` and ``n_m`` are static).

  Args:
    w: float kernel ``(..., in, out)``.
    act_norm: ``(..., in)``, the L2 norm over calibration rows of each input feature.
    sparsity: fraction of each column pruned, in [0, 1) (not used with ``n_m``).
    n_m: ``(n, m)`` N:M pattern along the input axis (``m`` dividing ``in``), or None.
    path: the leaf's path, for error messages.

  Returns:
    bool mask of ``w``'s shape, True = kept.

  Raises:
    ValueError: sparsity outside [0, 1), a bad ``n_m``, mismatched shapes, and (concrete
      inputs) NaN/Inf or a negative norm, naming ``path``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[4., 1.], [-1., 2.], [2., -3.], [1., 1.]])
    >>> wanda_mask(w, jnp.array([1., 10., 1., 1.]), 0.5).astype(int).tolist()
    [[1, 0], [1, 1], [0, 1], [0, 0]]
  """
  name = "wanda"
  sparsity = check_sparsity(sparsity, name)
  n_m = check_n_m(n_m, name)
  w = jnp.asarray(w)
  if w.ndim < 2:
    raise ValueError(f"{name} '{path}': needs an (..., in, out) kernel, got shape {w.shape}.")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{name} '{path}': dtype {w.dtype} is not float; only floats are pruned.")
  a = _check_act_norm(w, act_norm, path, name)
  if not isinstance(w, jax.core.Tracer):
    base.require_finite([(path, np.asarray(w))], name, what="the kernel",
                        reason=", so its ranking is undefined")
  return _keep(w, a, sparsity, n_m, path, name)


def _keep(w, a, sparsity, n_m, path, name) -> jax.Array:
  """The mask of validated inputs."""
  n_in = w.shape[-2]
  score = jnp.abs(w).astype(jnp.float32) * a.astype(jnp.float32)[..., :, None]
  if n_m:
    if n_in % n_m[1]:
      raise ValueError(
          f"{name} '{path}': {n_in} inputs are not divisible by m={n_m[1]} of n_m={n_m}; pick "
          f"an m dividing {n_in}, or prune unstructured (n_m=None)."
      )
    return nm_mask(score, *n_m, axis=-2, path=path)
  order = jnp.argsort(score, axis=-2, stable=True)
  rank = jnp.argsort(order, axis=-2, stable=True)  # inverse permutation: rank in the column
  return rank >= num_pruned(sparsity, n_in)


def prune_wanda(
    act_norms: Mapping[str, Any],
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    where: base.Where = None,
    check_finite: bool = True,
) -> base.ParamTransform:
  """One-shot Wanda pruning of the kernels that have activation norms (no weight update).

  Each selected kernel (default: ``kernel`` leaves with ndim >= 2) whose path is in
  ``act_norms`` is multiplied by its :func:`jaxmem.ops.wanda_mask`; selected kernels without
  norms are untouched. A stacked ``[L, in, out]`` kernel takes stacked ``[L, in]`` norms.
  Runs under ``jit``. Follow it with :func:`jaxmem.sparsify` in :func:`jaxmem.chain` for
  packed storage.

  Args:
    act_norms: ``{kernel_path: act_norm}`` with ``act_norm = sqrt(sum_rows x^2)`` of the
      layer's inputs (``(in,)``, or ``(L, in)`` for a stacked kernel).
    sparsity: fraction of each output column pruned, in [0, 1) (not used with ``n_m``).
    n_m: ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs.
    where: leaves that may be pruned; default: ``kernel`` leaves with ndim >= 2.
    check_finite: a pruned kernel holding NaN/Inf is an error naming it, under ``jit`` too
      (see :func:`jaxmem.magnitude_prune`); the norms are always checked.

  Raises:
    ValueError: bad arguments (here); norms for paths that are not selected leaves, norms of
      the wrong shape, NaN/Inf or negative norms (at init/update, naming the path).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'dense': {'kernel': jnp.arange(1., 9.).reshape(4, 2)}}
    >>> norms = {'dense/kernel': jnp.array([8., 1., 1., 1.])}
    >>> jaxmem.transform(prune_wanda(norms, 0.5), params)['dense']['kernel'].tolist()
    [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [7.0, 8.0]]
  """
  name = "prune_wanda"
  check_stats_mapping(act_norms, name, "act_norms")
  sparsity = check_sparsity(sparsity, name)
  n_m = check_n_m(n_m, name)
  base.check_where(where, name)
  base.check_bool(name, check_finite=check_finite)
  for p, a in act_norms.items():  # concrete norms are checked here, once
    if not isinstance(a, jax.core.Tracer):
      _check_norm_values(a, p, name)

  def fn(path, x, a):
    check_stats_shape(name, path, x, np.shape(a), 1, "its act_norm")
    a = _check_act_norm(x, a, path, name)
    if check_finite:
      base.require_finite([(path, x)], name, reason=", so its ranking is undefined")
    keep = _keep(x, a, sparsity, n_m, path, name)
    return jnp.where(keep, x, jnp.zeros((), x.dtype))

  return stats_transform(name, act_norms, where, fn, concrete=False)
