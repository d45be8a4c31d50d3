"""One-shot magnitude pruning (unstructured and N:M) and the transform to packed sparse storage.

Masks are bool arrays (True = kept). Magnitude pruning removes exactly
``round(sparsity * size)`` entries with the smallest ``|w|`` (Han et al. 2015,
"Learning both Weights and Connections for Efficient Neural Networks"); among
equal magnitudes the entry that comes first (lower flat index; for the global
scope, earlier leaf in tree order first) is pruned first, so results are
deterministic. N:M pruning keeps the ``n`` largest of every ``m`` consecutive
entries along the input axis (Mishra et al. 2021, "Accelerating Sparse Deep
Neural Networks"), with the same tie rule.

A masks pytree has the params' structure, with a bool array at each pruned leaf
and ``None`` at the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import check_bits
from jaxmem._src.sparse import ENCODINGS, SparseArray, sparse_pack

PyTree = Any
SCOPES = ("layer", "global")


def default_prune_where(path: str, x) -> bool:
  """Default selection: leaves named ``kernel`` with ndim >= 2 (biases and norms stay dense)."""
  return path.rsplit("/", 1)[-1] == "kernel" and len(getattr(x, "shape", ())) >= 2


def check_sparsity(sparsity: float, name: str) -> float:
  """Validates a target sparsity in [0, 1)."""
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)):
    raise TypeError(f"{name}: sparsity must be a float in [0, 1), got {sparsity!r}.")
  if not 0.0 <= float(sparsity) < 1.0 or math.isnan(float(sparsity)):
    raise ValueError(
        f"{name}: sparsity={sparsity} is outside [0, 1); it is the fraction of entries set to "
        "zero (0.9 keeps 10%)."
    )
  return float(sparsity)


def check_prunable(path: str, x, name: str) -> None:
  """Raises a ValueError naming ``path`` when ``x`` is not a float array that can be pruned."""
  if isinstance(x, tree_lib.Compressed):
    raise ValueError(
        f"{name} '{path}': the leaf is already a {type(x).__name__}; pruning works on float "
        "weights. Prune first, then quantize or pack: e.g. jaxmem.chain(jaxmem.magnitude_prune("
        "0.9), jaxmem.quantize_int8()) or jaxmem.chain(jaxmem.magnitude_prune(0.9), "
        "jaxmem.sparsify(bits=8))."
    )
  if not tree_lib.is_float_leaf(x):
    raise ValueError(
        f"{name} '{path}': dtype {getattr(x, 'dtype', type(x).__name__)} is not float; only float "
        "leaves are pruned. Exclude it with `where`."
    )


RANKING = ", so its magnitude ranking is undefined (NaN would rank largest and be kept)"


MASK_FIX = "fix the params, or give this leaf a None mask"


def check_finite_leaves(items: Sequence[tuple[str, Any]], name: str, *, masks: bool = False):
  """NaN/Inf in leaves to be pruned is an error naming the path, under ``jit`` too.

  ``masks``: the leaves come with given masks (nothing is ranked; the fix is a None mask).
  """
  if masks:
    base.require_finite(items, name, fix=MASK_FIX)
  else:
    base.require_finite(items, name, reason=RANKING)


def num_pruned(sparsity, size: int):
  """``round(sparsity * size)``: how many entries a target sparsity removes (traceable)."""
  if isinstance(sparsity, (int, float)):
    return int(math.floor(sparsity * size + 0.5))
  return jnp.floor(sparsity * size + 0.5).astype(jnp.int32)


def keep_largest(scores: jax.Array, num_prune) -> jax.Array:
  """Bool mask of a flat score vector: False at the ``num_prune`` smallest scores.

  Ties go by position: the earlier entry is pruned first. ``num_prune`` may be traced.

  Example:
    >>> import jax.numpy as jnp
    >>> keep_largest(jnp.array([3., 1., 1., 2.]), 2).tolist()
    [True, False, False, True]
  """
  n = scores.shape[0]
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank >= num_prune


def magnitude_mask(x: jax.Array, sparsity: float) -> jax.Array:
  """Keep-mask pruning exactly ``round(sparsity * x.size)`` smallest-magnitude entries of ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> magnitude_mask(jnp.array([[0.1, -3.], [2., -0.5]]), 0.5).tolist()
    [[False, True], [True, False]]
  """
  check_sparsity(sparsity, "magnitude_mask")
  scores = jnp.abs(x).astype(jnp.float32).reshape(-1)
  return keep_largest(scores, num_pruned(sparsity, x.size)).reshape(x.shape)


def nm_mask(x: jax.Array, n: int, m: int, *, axis: int = -2, pad: bool = False,
            path: str = "array") -> jax.Array:
  """Keep-mask with ``n`` of every ``m`` consecutive entries along ``axis`` (largest ``|x|``).

  Args:
    x: array with at least one dimension.
    n: entries kept per group.
    m: group length (2:4 is ``n=2, m=4``).
    axis: the grouped axis; default -2, the input axis of ``(..., in, out)`` kernels
      (1-d arrays use axis 0).
    pad: if the axis length is not divisible by ``m``, treat the last group as padded
      with zeros (it keeps ``min(n, its length)`` entries); False raises instead.
    path: the leaf's path, for error messages.

  Example:
    >>> import jax.numpy as jnp
    >>> nm_mask(jnp.array([[1.], [-4.], [3.], [2.]]), 2, 4)[:, 0].tolist()
    [False, True, True, False]
  """
  check_nm(n, m, "nm_mask")
  if x.ndim == 0:
    raise ValueError(f"nm_prune '{path}': a scalar has no axis to group; exclude it with `where`.")
  ax = (axis if x.ndim >= 2 else 0) if axis == -2 else axis
  if not -x.ndim <= ax < x.ndim:
    raise ValueError(f"nm_prune '{path}': axis {axis} is out of range for shape {x.shape}.")
  ax %= x.ndim
  length = x.shape[ax]
  rem = length % m
  if rem and not pad:
    raise ValueError(
        f"nm_prune '{path}': axis {ax} has {length} entries, not divisible by m={m}. Pass "
        f"pad=True (the last group of {rem} keeps min(n, {rem})) or exclude the leaf with `where`."
    )
  scores = jnp.moveaxis(jnp.abs(x).astype(jnp.float32), ax, -1)
  lead = scores.shape[:-1]
  if rem:  # padding scores below every real |x|, so padding is pruned first
    fill = jnp.full(lead + (m - rem,), -1.0, jnp.float32)
    scores = jnp.concatenate([scores, fill], axis=-1)
  groups = scores.reshape(lead + (-1, m))
  order = jnp.argsort(groups, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)  # inverse permutation: rank within the group
  keep = (rank >= m - n).reshape(lead + (-1,))[..., :length]
  return jnp.moveaxis(keep, -1, ax)


def check_nm(n: int, m: int, name: str) -> None:
  """Validates N:M parameters (1 <= n < m)."""
  for v, what in ((n, "n"), (m, "m")):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise TypeError(f"{name}: {what} must be an int, got {v!r}.")
  if m < 1:
    raise ValueError(f"{name}: m={m} < 1; m is the group length (2:4 sparsity is n=2, m=4).")
  if not 1 <= n < m:
    raise ValueError(
        f"{name}: n={n}, m={m}; need 1 <= n < m (n entries are kept in every group of m)."
    )


def _check_scope(scope: str, name: str) -> None:
  if scope not in SCOPES:
    raise ValueError(
        f"{name}: scope={scope!r}; use 'layer' (per leaf) or 'global' (one threshold)."
    )


def _selected(params: PyTree, where: base.Where, name: str) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` of the selected leaves, validated as prunable."""
  sel = base.select(params, where, default=default_prune_where, name=name)
  chosen = [
      (p, x) for (p, x), s in zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(sel)) if s
  ]
  for p, x in chosen:
    check_prunable(p, x, name)
  return chosen


def _masks_tree(params: PyTree, masks_by_path: dict[str, jax.Array]) -> PyTree:
  return tree_lib.map_with_path(lambda p, x: masks_by_path.get(p), params)


def global_masks(leaves: Sequence[jax.Array], num_prune) -> list[jax.Array]:
  """Keep-masks with one magnitude threshold over all ``leaves`` (``num_prune`` in total)."""
  if not leaves:
    return []
  scores = jnp.concatenate([jnp.abs(x).astype(jnp.float32).reshape(-1) for x in leaves])
  keep = keep_largest(scores, num_prune)
  out, start = [], 0
  for x in leaves:
    out.append(keep[start : start + x.size].reshape(x.shape))
    start += x.size
  return out


def magnitude_masks(
    params: PyTree,
    sparsity: float,
    where: base.Where = None,
    *,
    scope: str = "layer",
    check_finite: bool = True,
) -> PyTree:
  """Keep-masks of magnitude pruning (``None`` at leaves that are not pruned).

  Args:
    params: the params pytree.
    sparsity: fraction of entries to remove, in [0, 1).
    where: leaves to prune; default: ``kernel`` leaves with ndim >= 2.
    scope: ``'layer'``: each leaf loses ``round(sparsity * size)`` entries;
      ``'global'``: one threshold over all selected leaves, which together lose
      ``round(sparsity * total)`` entries.
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf
      (its ranking is undefined), under ``jit`` too (see :func:`jaxmem.magnitude_prune`).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'a': {'kernel': jnp.array([[1., 2.], [3., 4.]])},
    ...           'b': {'kernel': jnp.full((2, 2), 9.)}}
    >>> m = jaxmem.sparsity.magnitude_masks(params, 0.5, scope='global')
    >>> int(m['a']['kernel'].sum()), int(m['b']['kernel'].sum())
    (0, 4)
  """
  name = "magnitude_prune"
  sparsity = check_sparsity(sparsity, name)
  _check_scope(scope, name)
  base.check_bool(name, check_finite=check_finite)
  chosen = _selected(params, where, name)
  if check_finite:
    check_finite_leaves(chosen, name)
  if scope == "layer":
    by_path = {p: magnitude_mask(x, sparsity) for p, x in chosen}
  else:
    total = sum(int(x.size) for _, x in chosen)
    ms = global_masks([x for _, x in chosen], num_pruned(sparsity, total))
    by_path = {p: mk for (p, _), mk in zip(chosen, ms)}
  return _masks_tree(params, by_path)


def nm_masks(
    params: PyTree,
    n: int,
    m: int,
    where: base.Where = None,
    *,
    axis: int = -2,
    pad: bool = False,
    check_finite: bool = True,
) -> PyTree:
  """Keep-masks of N:M pruning along the input axis (``None`` at leaves that are not pruned).

  Arguments as :func:`jaxmem.nm_prune`.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> m = jaxmem.sparsity.nm_masks({'kernel': jnp.arange(8.).reshape(4, 2)}, 2, 4)
    >>> m['kernel'][:, 0].tolist()
    [False, False, True, True]
  """
  name = "nm_prune"
  check_nm(n, m, name)
  base.check_bool(name, pad=pad, check_finite=check_finite)
  chosen = _selected(params, where, name)
  if check_finite:
    check_finite_leaves(chosen, name)
  by_path = {p: nm_mask(x, n, m, axis=axis, pad=pad, path=p) for p, x in chosen}
  return _masks_tree(params, by_path)


def _paths_with_none(tree: PyTree) -> list[str]:
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or tree_lib.is_compressed(x)
  )
  return [tree_lib.path_str(p) for p, _ in flat]


def structure_error(name: str, params: PyTree, other: PyTree, what: str, fix: str) -> ValueError:
  """A ValueError naming the paths where ``other`` and ``params`` differ."""
  pa, pb = _paths_with_none(params), _paths_with_none(other)
  only_a = sorted(set(pa) - set(pb))[:5]
  only_b = sorted(set(pb) - set(pa))[:5]
  return ValueError(
      f"{name}: {what} do not have the params' tree structure: only in params: {only_a}; "
      f"only in {what}: {only_b}. {fix}"
  )


def flatten_masks(params: PyTree, masks: PyTree, name: str) -> list[tuple[str, Any, Any]]:
  """``[(path, leaf, mask or None)]``, checking that ``masks`` matches ``params`` leaf by leaf."""
  treedef = jax.tree.structure(params, is_leaf=tree_lib.is_compressed)
  try:
    flat_masks = treedef.flatten_up_to(masks)
  except (ValueError, TypeError):
    raise structure_error(
        name, params, masks, "masks",
        "Build them from the same params (jaxmem.sparsity.magnitude_masks / nm_masks); None "
        "marks a "
        "leaf that is not pruned.",
    ) from None
  out = []
  for (p, x), mk in zip(tree_lib.leaves_with_paths(params), flat_masks):
    if mk is not None:
      if jax.tree.structure(mk).num_leaves != 1 or not hasattr(mk, "shape"):
        raise ValueError(f"{name} '{p}': the mask is a {type(mk).__name__}, not a bool array.")
      if tuple(mk.shape) != tuple(getattr(x, "shape", ())):
        raise ValueError(
            f"{name} '{p}': mask shape {tuple(mk.shape)} does not match the leaf's shape "
            f"{tuple(getattr(x, 'shape', ()))}."
        )
      if mk.dtype != jnp.bool_:
        raise ValueError(f"{name} '{p}': mask dtype is {mk.dtype}; masks are bool (True = kept).")
    out.append((p, x, mk))
  return out


def apply_masks(params: PyTree, masks: PyTree, *, check_finite: bool = True) -> PyTree:
  """Zeroes the pruned entries: ``where(mask, x, 0)`` at every leaf whose mask is not None.

  ``check_finite``: NaN/Inf in a masked leaf is an error naming its path, under ``jit`` too.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> p = {'kernel': jnp.array([[1., -2.], [3., 0.5]]), 'bias': jnp.ones(2)}
    >>> jaxmem.sparsity.apply_masks(p, jaxmem.sparsity.magnitude_masks(p, 0.5))['kernel'].tolist()
    [[0.0, -2.0], [3.0, 0.0]]
  """
  flat = flatten_masks(params, masks, "apply_masks")
  base.check_bool("apply_masks", check_finite=check_finite)
  for p, x, mk in flat:
    if mk is not None:
      check_prunable(p, x, "apply_masks")
  if check_finite:
    items = [(p, x) for p, x, mk in flat if mk is not None]
    check_finite_leaves(items, "apply_masks", masks=True)
  treedef = jax.tree.structure(params, is_leaf=tree_lib.is_compressed)
  return jax.tree.unflatten(
      treedef, [x if mk is None else jnp.where(mk, x, jnp.zeros((), x.dtype)) for _, x, mk in flat]
  )


def magnitude_prune(
    sparsity: float, where: base.Where = None, *, scope: str = "layer", check_finite: bool = True
) -> base.ParamTransform:
  """One-shot magnitude pruning: exactly ``round(sparsity * n)`` smallest weights set to zero.

  Put it before quantization or sparse packing in :func:`jaxmem.chain`; pruning a leaf
  that is already quantized is an error.

  Args:
    sparsity: fraction of entries to zero, in [0, 1).
    where: leaves to prune; default: ``kernel`` leaves with ndim >= 2.
    scope: ``'layer'`` (each leaf hits ``sparsity``) or ``'global'`` (one magnitude
      threshold over all selected leaves; the total hits ``sparsity``).
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN or
      Inf (NaN would rank largest and be kept). Concrete params are checked at once; under
      ``jax.jit`` one ``jax.debug.callback`` per call checks them when the compiled
      function runs, and the error arrives as a ``jax.errors.JaxRuntimeError`` holding the
      same text. Cost: one ``isfinite`` reduction per pruned leaf and one host callback per
      call; pass False to skip it (e.g. for ``jax.export``).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> p = {'kernel': jnp.arange(1., 9.).reshape(4, 2)}
    >>> out = jaxmem.transform(jaxmem.magnitude_prune(0.75), p)
    >>> out['kernel'].tolist()
    [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [7.0, 8.0]]
  """
  name = "magnitude_prune"
  check_sparsity(sparsity, name)
  _check_scope(scope, name)
  base.check_where(where, name)
  base.check_bool(name, check_finite=check_finite)

  def init(params):
    _selected(params, where, name)
    return base.EmptyState()

  def update(params, state):
    masks = magnitude_masks(params, sparsity, where, scope=scope, check_finite=check_finite)
    return apply_masks(params, masks, check_finite=False), state  # checked by the masks

  return base.ParamTransform(init, update)


def nm_prune(
    n: int,
    m: int,
    where: base.Where = None,
    *,
    axis: int = -2,
    pad: bool = False,
    check_finite: bool = True,
) -> base.ParamTransform:
  """One-shot N:M pruning: ``n`` of every ``m`` consecutive weights along the input axis are kept.

  Args:
    n: weights kept per group (``1 <= n < m``).
    m: group length.
    where: leaves to prune; default: ``kernel`` leaves with ndim >= 2.
    axis: the grouped axis; default -2, the input axis of Dense ``(in, out)`` and Conv
      ``(..., in, out)`` kernels.
    pad: an axis length not divisible by ``m`` is an error unless ``pad=True``, which
      treats the last, short group as zero-padded (it keeps ``min(n, length)``).
    check_finite: raise a ValueError naming the leaf when a selected leaf holds NaN/Inf,
      under ``jit`` too (see :func:`jaxmem.magnitude_prune`).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> p = {'kernel': jnp.array([[1.], [-4.], [3.], [2.]])}
    >>> jaxmem.transform(jaxmem.nm_prune(2, 4), p)['kernel'][:, 0].tolist()
    [0.0, -4.0, 3.0, 0.0]
  """
  name = "nm_prune"
  check_nm(n, m, name)
  base.check_int(name, "axis", axis)
  base.check_bool(name, pad=pad, check_finite=check_finite)
  base.check_where(where, name)

  def init(params):
    _selected(params, where, name)
    return base.EmptyState()

  def update(params, state):
    masks = nm_masks(params, n, m, where, axis=axis, pad=pad, check_finite=check_finite)
    return apply_masks(params, masks, check_finite=False), state  # checked by the masks

  return base.ParamTransform(init, update)


def sparsify(
    where: base.Where = None,
    *,
    bits: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    encoding: str = "auto",
    check_finite: bool = True,
) -> base.ParamTransform:
  """Packs the selected (pruned) leaves into :class:`jaxmem.SparseArray` storage.

  Zeros are dropped and the kept positions stored in a compressed index (bitmask or
  Rice-coded gaps, whichever is smaller). Float leaves keep float values, or int8 (or
  fewer bits) values with per-output-channel scales when ``bits`` is set. A
  :class:`jaxmem.QArray` leaf (from ``quantize_int8`` earlier in the chain) keeps its
  integer values and scales. Packing needs concrete params (outside ``jit``).

  Args:
    where: leaves to pack; default: ``kernel`` leaves with ndim >= 2 (float or QArray).
    bits: quantize float values to this many bits (2..8); None keeps them float.
    channel_axes: axes with their own scale; default: the last axis.
    per_tensor: one scale per tensor.
    encoding: ``'auto'``, ``'bitmask'`` or ``'rice'``.
    check_finite: raise a ValueError naming the leaf when a selected float leaf holds
      NaN/Inf (NaN is nonzero, so it would be stored).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> p = {'kernel': jnp.arange(1., 65.).reshape(16, 4)}
    >>> tx = jaxmem.chain(jaxmem.magnitude_prune(0.9), jaxmem.sparsify(bits=8))
    >>> s = jaxmem.transform(tx, p)['kernel']
    >>> s.nnz, s.values.dtype, bool(jnp.abs(s.materialize()[-1] - p['kernel'][-1]).max() < 0.5)
    (6, dtype('int8'), True)
  """
  name = "sparsify"
  if bits is not None:
    check_bits(bits, name)
  base.check_axes(name, "channel_axes", channel_axes)
  base.check_bool(name, per_tensor=per_tensor, check_finite=check_finite)
  if encoding not in ENCODINGS:
    raise ValueError(f"{name}: encoding={encoding!r}; use one of {ENCODINGS}.")
  base.check_where(where, name)

  def fn(path, x):
    if isinstance(x, SparseArray):
      raise ValueError(f"sparsify '{path}': the leaf is already a SparseArray; pack it once.")
    if tree_lib.is_compressed(x):
      return sparse_pack(x, encoding=encoding, path=path)
    axes = () if per_tensor else (tuple(channel_axes) if channel_axes is not None else (-1,))
    return sparse_pack(x, bits=bits, channel_axes=axes, encoding=encoding, path=path)

  return base.leafwise(
      fn, where, default=default_prune_where, name=name, check_finite=check_finite
  )


def tree_sparsity(params: PyTree, where: base.Where = None) -> float:
  """Fraction of zero entries over the selected leaves (default: ``kernel`` leaves, ndim >= 2).

  Compressed leaves count by their materialized values (a :class:`jaxmem.SparseArray`
  by its stored ``nnz``).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> jaxmem.sparsity.tree_sparsity({'kernel': jnp.array([[0., 1.], [0., 0.]])})
    0.75
  """
  sel = base.select(params, where, default=default_prune_where, name="tree_sparsity")
  zeros = total = 0
  for (_, x), s in zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(sel)):
    if not s:
      continue
    size = math.prod(x.shape)
    if isinstance(x, SparseArray):
      nz = x.nnz
    else:
      nz = int(jnp.count_nonzero(x.materialize() if tree_lib.is_compressed(x) else x))
    zeros += size - nz
    total += size
  return zeros / max(total, 1)
