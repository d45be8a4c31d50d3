"""Mixed precision under a byte budget, from a measured per-leaf sensitivity.

Two steps, both on concrete param trees of the same structure (outside ``jit``):

* :func:`leaf_sensitivity`: how much a metric (e.g. ``1 - cosine`` to the float model on
  calibration data) grows when only one leaf is taken from a compressed tree and every
  other leaf stays as in the reference tree;
* :func:`allocate_bits`: starts from the low-precision tree and moves the leaves whose
  sensitivity per extra byte is highest to the high-precision tree (greedy knapsack), as
  long as the whole tree's real bytes (:func:`jaxmem.tree_bytes`) stay within a budget.

Example:
  >>> import jax.numpy as jnp, jaxmem
  >>> params = {'a': {'kernel': jnp.linspace(-1, 1, 64 * 8).reshape(64, 8)},
  ...           'b': {'kernel': jnp.linspace(-1, 1, 64 * 8).reshape(64, 8) ** 3}}
  >>> low = jaxmem.transform(jaxmem.quantize_int4(64), params)
  >>> high = jaxmem.transform(jaxmem.quantize_int8(), params)
  >>> def err(p):  # squared weight error; use a model metric on calibration data in practice
  ...   w = lambda x: x.materialize() if jaxmem.is_compressed(x) else x
  ...   return float(sum(jnp.sum((w(p[k]['kernel']) - params[k]['kernel']) ** 2) for k in 'ab'))
  >>> sens = jaxmem.memory.leaf_sensitivity(err, params, low)
  >>> sorted(sens)
  ['a/kernel', 'b/kernel']
  >>> budget = jaxmem.tree_bytes(low) + 300
  >>> mixed, chosen = jaxmem.memory.allocate_bits(low, high, sens, budget)
  >>> chosen, jaxmem.tree_bytes(mixed) <= budget
  (['a/kernel'], True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jaxmem._src import tree as tree_lib
from jaxmem._src.memory import tree_bytes


def _leaves(tree) -> dict[str, Any]:
  return dict(tree_lib.leaves_with_paths(tree))


def mix_leaves(base_tree, other, paths: Iterable[str]):
  """``base_tree`` with the leaves at ``paths`` taken from ``other`` (same structure)."""
  paths = set(paths)
  theirs = _leaves(other)
  unknown = sorted(paths - set(theirs))
  if unknown:
    raise ValueError(f"mix_leaves: no leaf at {unknown[:5]}; paths look like {list(theirs)[:3]}.")
  mine = _leaves(base_tree)
  if list(mine) != list(theirs):
    raise ValueError(
        "mix_leaves: the trees differ in structure (first differing leaf: "
        f"{next((a for a, b in zip(mine, theirs) if a != b), 'a missing leaf')})."
    )
  return tree_lib.map_with_path(lambda p, x: theirs[p] if p in paths else x, base_tree)


def leaf_sensitivity(
    metric: Callable[[Any], float],
    reference,
    compressed,
    paths: Iterable[str] | None = None,
    *,
    materialize: bool = True,
) -> dict[str, float]:
  """``metric(reference with one leaf from compressed) - metric(reference)``, per leaf.

  Args:
    metric: param tree -> float, lower is better (e.g. ``1 - mean cosine`` to the float
      model on calibration batches; never the evaluation data).
    reference: the float params.
    compressed: the same tree, compressed (e.g. by :func:`jaxmem.quantize_int4`).
    paths: the leaves to measure; default: every leaf that differs between the trees.
    materialize: swap in each compressed leaf as its float reconstruction
      (``materialize()``), so every call sees the reference's tree structure and a jitted
      metric compiles once (the values are the compressed leaf's, the integer kernels
      are not exercised). False: swap in the compressed leaf itself.

  Returns:
    ``{path: increase of the metric}`` (one ``metric`` call per path, plus one).
  """
  ref = _leaves(reference)
  if paths is None:
    paths = [p for p, x in tree_lib.leaves_with_paths(compressed) if x is not ref.get(p)]
  if materialize:  # same tree structure every call: a jitted metric compiles once
    compressed = tree_lib.map_with_path(
        lambda p, x: x.materialize().astype(ref[p].dtype)
        if tree_lib.is_compressed(x) and p in ref and not tree_lib.is_compressed(ref[p]) else x,
        compressed,
    )
  base_value = float(metric(reference))
  return {
      p: float(metric(mix_leaves(reference, compressed, [p]))) - base_value for p in paths
  }


def allocate_bits(
    low,
    high,
    sensitivity: Mapping[str, float],
    budget_bytes: int,
) -> tuple[Any, list[str]]:
  """Moves the most sensitive leaves of ``low`` to ``high`` while the tree fits a budget.

  Leaves are taken in decreasing ``sensitivity / extra bytes`` (extra bytes = real bytes
  of the ``high`` leaf minus the ``low`` one); a leaf that would exceed the budget is
  skipped and smaller ones are still tried.

  Args:
    low: the low-precision tree (e.g. int4).
    high: the same tree at higher precision (e.g. int8).
    sensitivity: ``{path: gain}``, e.g. from :func:`leaf_sensitivity` on ``low``.
    budget_bytes: the most bytes the whole mixed tree may take.

  Returns:
    ``(mixed tree, upgraded paths in the order chosen)``.

  Raises:
    ValueError: ``low`` alone exceeds the budget, or a path is not a leaf.
  """
  lo, hi = _leaves(low), _leaves(high)
  total = tree_bytes(low)
  if total > budget_bytes:
    raise ValueError(
        f"allocate_bits: the low-precision tree alone takes {total:,} bytes, over the "
        f"budget of {budget_bytes:,}; lower the precision or raise the budget."
    )
  unknown = sorted(set(sensitivity) - set(lo))
  if unknown:
    raise ValueError(f"allocate_bits: sensitivity names {unknown[:5]}, not leaves of `low`.")
  extra = {p: tree_bytes(hi[p]) - tree_bytes(lo[p]) for p in sensitivity}
  ranked = sorted(
      (p for p in sensitivity if sensitivity[p] > 0 and extra[p] > 0),
      key=lambda p: -sensitivity[p] / extra[p],
  )
  chosen = []
  for p in ranked:
    if total + extra[p] <= budget_bytes:
      chosen.append(p)
      total += extra[p]
  return mix_leaves(low, high, chosen), chosen
