"""Pruning while training, as optax transformations whose masks live in the optimizer state.

:func:`jaxmem.gradual_prune` raises sparsity along the cubic schedule of Zhu & Gupta 2017
("To prune, or not to prune: exploring the efficacy of pruning for model
compression"): at mask-update steps ``t = t0, t0 + dt, ..., t0 + n dt`` the target is

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** 3

and the mask keeps the largest-magnitude weights. :func:`jaxmem.keep_masks` trains with fixed
masks (e.g. after one-shot pruning). Both go LAST in ``optax.chain`` (after the learning
rate), because they turn the final update ``u`` of a pruned weight ``p`` into ``-p``:
after ``optax.apply_updates`` pruned weights are exactly zero after every step, and
kept weights get exactly ``p + u``. Their state is arrays only (a step counter and bool
masks shaped like the params), so checkpoints and data parallelism work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmem._src import base
from jaxmem._src import pruning as pr
from jaxmem._src import tree as tree_lib

PyTree = Any


class GradualPruneState(NamedTuple):
  """State of :func:`jaxmem.gradual_prune`."""

  count: jax.Array  # [] int32: updates applied so far (the step index of the next update)
  masks: PyTree  # bool, shaped like each pruned param (True = kept); None at other leaves


class KeepMasksState(NamedTuple):
  """State of :func:`jaxmem.keep_masks`."""

  masks: PyTree  # bool, shaped like each pruned param (True = kept); None at other leaves


def _check_schedule(final_sparsity, begin_step, end_step, update_every, initial_sparsity, name):
  pr.check_sparsity(final_sparsity, name)
  pr.check_sparsity(initial_sparsity, f"{name} (initial_sparsity)")
  ints = ((begin_step, "begin_step"), (end_step, "end_step"), (update_every, "update_every"))
  for v, what in ints:
    if isinstance(v, bool) or not isinstance(v, int):
      raise TypeError(f"{name}: {what} must be an int, got {v!r}.")
  if begin_step < 0:
    raise ValueError(f"{name}: begin_step={begin_step} < 0.")
  if end_step < begin_step:
    raise ValueError(
        f"{name}: end_step={end_step} precedes begin_step={begin_step}; the schedule ramps "
        "sparsity from begin_step to end_step, so pass end_step >= begin_step."
    )
  if update_every < 1:
    raise ValueError(f"{name}: update_every={update_every}; masks update every >= 1 steps.")
  if initial_sparsity > final_sparsity:
    raise ValueError(
        f"{name}: initial_sparsity={initial_sparsity} > final_sparsity={final_sparsity}; "
        "the schedule only increases sparsity."
    )


def sparsity_schedule(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    update_every: int = 1,
    initial_sparsity: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
  """The Zhu & Gupta 2017 cubic sparsity schedule, as a function of the step (jit-able).

  Sparsity is 0 before ``begin_step``; from there it is the cubic evaluated at the last
  mask-update step (``begin_step + j * update_every``, and ``end_step`` itself), so it is
  constant between updates and equals ``final_sparsity`` from ``end_step`` on.

  Example:
    >>> import jaxmem
    >>> s = jaxmem.sparsity.sparsity_schedule(0.8, 10, 20, update_every=5)
    >>> [round(float(s(t)), 3) for t in (0, 10, 14, 15, 20, 99)]
    [0.0, 0.0, 0.0, 0.7, 0.8, 0.8]
  """
  _check_schedule(final_sparsity, begin_step, end_step, update_every, initial_sparsity,
                  "sparsity_schedule")
  span = end_step - begin_step

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    last = begin_step + (jnp.maximum(step - begin_step, 0) // update_every) * update_every
    last = jnp.minimum(last, end_step)
    last = jnp.where(step >= end_step, end_step, last)
    if span:
      frac = 1.0 - (last - begin_step).astype(jnp.float32) / span
    else:
      frac = jnp.zeros((), jnp.float32)
    s = final_sparsity + (initial_sparsity - final_sparsity) * frac**3
    return jnp.where(step >= begin_step, s, 0.0).astype(jnp.float32)

  return schedule


def _flat(updates: PyTree, masks: PyTree, params: PyTree, name: str):
  """Flattened (paths, updates, params, masks) with structure checks naming paths."""
  if params is None:
    raise ValueError(f"{name}: update needs the params: call tx.update(grads, state, params).")
  flat = pr.flatten_masks(params, masks, name)
  treedef = jax.tree.structure(params, is_leaf=tree_lib.is_compressed)
  try:
    flat_u = treedef.flatten_up_to(updates)
  except (ValueError, TypeError):
    raise pr.structure_error(
        name, params, updates, "updates", "Pass the gradients/updates of the same params."
    ) from None
  return treedef, flat, flat_u


def _masked_updates(flat, flat_u, new_masks):
  """Updates that leave kept weights at ``p + u`` and pruned weights at exactly 0."""
  out = []
  for (_, p, _), u, mk in zip(flat, flat_u, new_masks):
    out.append(u if mk is None else jnp.where(mk, u, -p.astype(u.dtype)))
  return out


def _initial_masks(params: PyTree, where: base.Where, name: str, check_finite: bool) -> PyTree:
  selected = pr._selected(params, where, name)  # validates selection and dtypes
  if check_finite:
    pr.check_finite_leaves(selected, name)
  chosen = dict(selected)
  return tree_lib.map_with_path(
      lambda p, x: jnp.ones(x.shape, jnp.bool_) if p in chosen else None, params
  )


def gradual_prune(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    update_every: int = 100,
    initial_sparsity: float = 0.0,
    scope: str = "global",
    where: base.Where = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  """Gradual magnitude pruning (Zhu & Gupta 2017) as an optax transformation; put it last.

  At every mask-update step (see :func:`jaxmem.sparsity.sparsity_schedule`) the mask is
  recomputed from the magnitudes of the weights after the step, keeping exactly
  ``round((1 - s_t) * n)`` (per leaf for ``scope='layer'``, over all selected leaves
  for ``'global'``); pruned weights are zero and rank lowest, so masks only shrink. At
  every step the updates of pruned weights become ``-p``, so after
  ``optax.apply_updates`` they are exactly zero.

  Args:
    final_sparsity: sparsity reached at ``end_step``, in [0, 1).
    begin_step: step of the first mask update (sparsity ``initial_sparsity``).
    end_step: step of the last mask update (sparsity ``final_sparsity``); >= begin_step.
    update_every: steps between mask updates (``dt`` in the paper).
    initial_sparsity: sparsity at ``begin_step``.
    scope: ``'global'`` (one magnitude threshold over all pruned leaves) or ``'layer'``.
    where: leaves to prune; default: ``kernel`` leaves with ndim >= 2.
    check_finite: raise a ValueError naming the leaf when the weights a mask is computed
      from hold NaN or Inf (NaN would rank largest and be kept): the params at ``init``,
      and ``params + updates`` at each mask-update step, also inside a jitted train step
      (one ``jax.debug.callback`` per mask update, none at other steps; the error arrives
      as a ``jax.errors.JaxRuntimeError`` holding the same text). Pass False to skip it.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxmem
    >>> params = {'kernel': jnp.arange(1., 9.).reshape(4, 2), 'bias': jnp.ones(2)}
    >>> tx = optax.chain(optax.sgd(0.1), jaxmem.gradual_prune(0.5, 0, 2, update_every=1))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.tree.map(jnp.ones_like, params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> int((params['kernel'] == 0).sum())
    4
  """
  name = "gradual_prune"
  _check_schedule(final_sparsity, begin_step, end_step, update_every, initial_sparsity, name)
  pr._check_scope(scope, name)
  base.check_where(where, name)
  base.check_bool(name, check_finite=check_finite)
  schedule = sparsity_schedule(
      final_sparsity, begin_step, end_step, update_every=update_every,
      initial_sparsity=initial_sparsity,
  )

  def init(params):
    masks = _initial_masks(params, where, name, check_finite)
    return GradualPruneState(jnp.zeros([], jnp.int32), masks)

  def num_prune(s, n, t):
    return jnp.where(t >= end_step, pr.num_pruned(final_sparsity, n), pr.num_pruned(s, n))

  def update(updates, state, params=None):
    treedef, flat, flat_u = _flat(updates, state.masks, params, name)
    t = state.count
    sel = [i for i, (_, _, mk) in enumerate(flat) if mk is not None]
    old = [flat[i][2] for i in sel]
    cands = [
        jnp.where(flat[i][2], flat[i][1] + flat_u[i], jnp.zeros((), flat[i][1].dtype)) for i in sel
    ]
    is_update = (
        (t >= begin_step)
        & (t <= end_step)
        & (((t - begin_step) % update_every == 0) | (t == end_step))
    )
    s = schedule(t)

    def recompute(cands):
      if check_finite:
        base.require_finite(
            [(flat[i][0], c) for i, c in zip(sel, cands)], name,
            what="the leaf after this step's update (params + updates)", reason=pr.RANKING,
            fix="check the loss and learning rate (e.g. optax.clip_by_global_norm, or wrap "
            "the optimizer in optax.apply_if_finite)",
        )
      if scope == "layer":
        return [
            pr.keep_largest(jnp.abs(c).astype(jnp.float32).reshape(-1), num_prune(s, c.size, t))
            .reshape(c.shape)
            for c in cands
        ]
      total = sum(int(c.size) for c in cands)
      return pr.global_masks(cands, num_prune(s, total, t))

    new = jax.lax.cond(is_update, recompute, lambda c: old, cands) if sel else []
    new_masks = [None] * len(flat)
    for i, mk in zip(sel, new):
      new_masks[i] = mk
    out = _masked_updates(flat, flat_u, new_masks)
    masks_tree = jax.tree.unflatten(treedef, new_masks)
    return jax.tree.unflatten(treedef, out), GradualPruneState(t + 1, masks_tree)

  return optax.GradientTransformation(init, update)


def keep_masks(masks: PyTree) -> optax.GradientTransformation:
  """Trains with fixed masks (put it last in ``optax.chain``): pruned weights stay exactly 0.

  The masks are copied into the optimizer state at ``init`` (not baked into the
  compiled step). The first update also zeroes pruned weights that were not zero yet.

  Args:
    masks: keep-masks (bool, True = kept; ``None`` at leaves not pruned), e.g. from
      :func:`jaxmem.sparsity.magnitude_masks` or :func:`jaxmem.sparsity.nm_masks`.

  Example:
    >>> import jax.numpy as jnp, optax, jaxmem
    >>> params = {'kernel': jnp.array([[1., -2.], [3., 0.5]])}
    >>> masks = jaxmem.sparsity.nm_masks(params, 1, 2)
    >>> tx = optax.chain(optax.adam(1e-2), jaxmem.keep_masks(masks))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> (optax.apply_updates(params, updates)['kernel'] == 0).tolist()
    [[True, False], [False, True]]
  """
  name = "keep_masks"

  def init(params):
    flat = pr.flatten_masks(params, masks, name)
    for p, x, mk in flat:
      if mk is not None:
        pr.check_prunable(p, x, name)
    pr.check_finite_leaves([(p, x) for p, x, mk in flat if mk is not None], name, masks=True)
    treedef = jax.tree.structure(params, is_leaf=tree_lib.is_compressed)
    return KeepMasksState(jax.tree.unflatten(treedef, [jnp.asarray(mk) if mk is not None else None
                                                        for _, _, mk in flat]))

  def update(updates, state, params=None):
    treedef, flat, flat_u = _flat(updates, state.masks, params, name)
    out = _masked_updates(flat, flat_u, [mk for _, _, mk in flat])
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init, update)


def mask_sparsity(masks: PyTree) -> float:
  """Fraction of pruned entries over all masks (``None`` entries skipped).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> masks = {'kernel': jnp.array([True, False, False, False]), 'bias': None}
    >>> jaxmem.sparsity.mask_sparsity(masks)
    0.75
  """
  leaves = [m for m in jax.tree.leaves(masks) if m is not None]
  total = sum(math.prod(m.shape) for m in leaves)
  kept = sum(int(jnp.count_nonzero(m)) for m in leaves)
  return 1.0 - kept / max(total, 1)
