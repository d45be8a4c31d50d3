"""chex-based assertions for unit-testing param transforms (yours and jaxmem's).

Example:
  >>> import jax.numpy as jnp, jaxmem
  >>> from jaxmem import testing
  >>> params = {'dense': {'kernel': jnp.linspace(-1, 1, 64).reshape(8, 8), 'bias': jnp.ones(8)}}
  >>> tx = jaxmem.quantize_int8()
  >>> testing.assert_transform_pure(tx, params)
  >>> testing.assert_eval_shape_matches(tx, params)
  >>> testing.assert_quantized_within_bound(jaxmem.transform(tx, params), params)
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import QArray, dequantize, expand_blocks

__all__ = [
    "assert_eval_shape_matches",
    "assert_finite",
    "assert_quantized_within_bound",
    "assert_transform_pure",
    "assert_trees_equal",
]


def _as_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_trees_equal(a: Any, b: Any, *, rtol: float = 0.0, atol: float = 0.0) -> None:
  """Same structure (compressed values included), dtypes, shapes and values (within tolerance)."""
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_dtypes(a, b)
  chex.assert_trees_all_equal_shapes(a, b)
  if rtol == 0.0 and atol == 0.0:
    chex.assert_trees_all_equal(a, b)
  else:
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def assert_transform_pure(
    tx: base.ParamTransform, params: Any, *, rtol: float = 1e-6, atol: float = 1e-6
) -> None:
  """The transform is pure: jit == eager, inputs unchanged, and two runs agree exactly.

  Raises:
    AssertionError: naming what differs.
  """
  before = _as_numpy(params)
  eager = base.transform(tx, params)
  again = base.transform(tx, params)
  jitted = jax.jit(lambda p: base.transform(tx, p))(params)
  try:
    assert_trees_equal(before, _as_numpy(params))
  except AssertionError as e:
    raise AssertionError(f"the transform changed its input params in place: {e}") from e
  try:
    assert_trees_equal(eager, again)
  except AssertionError as e:
    raise AssertionError(f"the transform is not deterministic (two eager runs differ): {e}") from e
  try:
    assert_trees_equal(eager, jitted, rtol=rtol, atol=atol)
  except AssertionError as e:
    raise AssertionError(f"jit and eager results differ: {e}") from e


def assert_eval_shape_matches(tx: base.ParamTransform, params: Any) -> None:
  """``jax.eval_shape`` of the transform gives the structure, shapes and dtypes of its result.

  This is what a restore target (e.g. for Orbax) is built from.
  """
  abstract = jax.eval_shape(lambda p: base.transform(tx, p), params)
  concrete = base.transform(tx, params)
  chex.assert_trees_all_equal_structs(abstract, concrete)
  for (path, a), (_, c) in zip(
      jax.tree_util.tree_flatten_with_path(abstract)[0],
      jax.tree_util.tree_flatten_with_path(concrete)[0],
  ):
    if tuple(a.shape) != tuple(c.shape) or a.dtype != c.dtype:
      raise AssertionError(
          f"eval_shape disagrees at {tree_lib.path_str(path)}: abstract {a.shape} {a.dtype}, "
          f"concrete {c.shape} {c.dtype}"
      )


def assert_quantized_within_bound(qparams: Any, params: Any, *, slack: float = 1e-6) -> None:
  """Every QArray leaf of ``qparams`` reconstructs the matching float leaf within ``scale / 2``.

  Args:
    qparams: the transformed tree.
    params: the float tree it came from (same structure, float arrays where qparams has QArrays).
    slack: relative float-rounding slack added to the bound.
  """
  base.check_same_structure(qparams, params, "qparams", "params")
  n = 0
  pairs = zip(tree_lib.leaves_with_paths(qparams), tree_lib.leaves_with_paths(params))
  for (path, q), (_, x) in pairs:
    if not isinstance(q, QArray):
      continue
    n += 1
    x = np.asarray(x, np.float32)
    d = np.asarray(dequantize(q, jnp.float32))
    s = np.broadcast_to(np.asarray(expand_blocks(q.scale, q.shape)), q.shape)
    bound = s / 2 + slack * np.maximum(np.abs(x), s)
    err = np.abs(x - d)
    if not (err <= bound).all():
      i = np.unravel_index(np.argmax(err - bound), err.shape)
      raise AssertionError(
          f"{path}: |x - dequantize(q)| = {err[i]:.3g} exceeds scale/2 = {s[i] / 2:.3g} at {i}"
      )
  if n == 0:
    raise AssertionError("qparams holds no QArray leaf: nothing was quantized.")


def assert_finite(tree: Any) -> None:
  """No NaN or Inf in any float leaf (compressed values: in their float arrays)."""
  for path, x in tree_lib.leaves_with_paths(tree):
    for leaf in jax.tree.leaves(x):
      if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all()):
        raise AssertionError(f"{path}: holds NaN or Inf")
