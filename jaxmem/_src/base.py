"""The param-transform protocol, composition and path-based leaf selection.

A *param transform* is a pair of pure functions, in the spirit of optax's
``GradientTransformation``::

    init(params) -> state
    update(params, state) -> (new_params, new_state)

Leaf types may change (a float kernel becomes a :class:`jaxmem.QArray`). Both
functions run under ``jax.jit`` and ``jax.eval_shape``: anything that picks a
code path or a shape is closed over (static), anything numeric is a leaf.

Which leaves a transform touches is chosen by ``where``:

* ``None``: the transform's own default (documented per factory);
* a regex string, or a sequence of them, matched with ``re.fullmatch`` against
  the leaf's ``a/b/kernel`` path; every pattern must match at least one leaf;
* a predicate ``(path: str, leaf) -> bool``.

Integer and bool leaves are never touched: a regex that selects one is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Where = None | str | Sequence[str] | Callable[[str, Any], bool]


class Compressed:
  """Marker base class for jaxmem's compressed leaf types (QArray, SparseArray, ...).

  Compressed values are pytree nodes (their arrays are leaves), but path
  selection treats each one as a single leaf named by its parameter path.

  Subclasses expose ``shape`` and ``dtype`` (the logical dense array's) and
  ``materialize()``, which rebuilds the dense float array (meant to run inside a
  jitted function, so no dense copy is kept between calls).
  """

  __slots__ = ()

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Real storage bytes: the sum over the value's arrays (values, indices, scales)."""
    return sum(
        math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(self)
    )

  def materialize(self):
    raise NotImplementedError(f"{type(self).__name__} does not implement materialize().")


def is_compressed(x: Any) -> bool:
  """True for jaxmem's compressed leaf types."""
  return isinstance(x, Compressed)


class EmptyState(NamedTuple):
  """State of a transform that keeps none."""


class ParamTransform(NamedTuple):
  """A pure transform over a parameter pytree.

  Attributes:
    init: ``params -> state``.
    update: ``(params, state) -> (new_params, new_state)``.
  """

  init: Callable[[PyTree], PyTree]
  update: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]


def transform(tx: ParamTransform, params: PyTree) -> PyTree:
  """Runs a param transform once (``init`` then ``update``) and returns the new params.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), params)
    >>> type(q['dense']['kernel']).__name__
    'QArray'
  """
  new_params, _ = tx.update(params, tx.init(params))
  return new_params


# ----------------------------------------------------------------------------- paths


def _key_str(k: Any) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """``a/b/kernel`` for a jax key path; NNX's trailing ``.value`` is dropped."""
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` in tree order; compressed values count as single leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
  return [(path_str(p), x) for p, x in flat]


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
  """``jax.tree.map`` whose function also gets the ``a/b/kernel`` path."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest, is_leaf=is_compressed
  )


def is_float_leaf(x: Any) -> bool:
  """True for float arrays (concrete or abstract); False for ints, bools, compressed values."""
  if is_compressed(x) or x is None:
    return False
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _describe_paths(tree: PyTree, limit: int = 12) -> str:
  paths = [p for p, _ in leaves_with_paths(tree)]
  more = f" ... (+{len(paths) - limit} more)" if len(paths) > limit else ""
  return ", ".join(paths[:limit]) + more


def select(
    tree: PyTree,
    where: Where,
    *,
    default: Callable[[str, Any], bool] | None = None,
    name: str = "transform",
) -> PyTree:
  """Returns a bool pytree (same structure) saying which leaves ``where`` selects.

  Args:
    tree: params.
    where: ``None`` (use ``default``), regex(es) fullmatched on the path, or a
      predicate ``(path, leaf) -> bool``.
    default: predicate used when ``where`` is None; defaults to "float leaves".
    name: the transform's name, for error messages.

  Raises:
    ValueError: a regex matches no leaf, or selects an integer/bool leaf.
  """
  items = leaves_with_paths(tree)
  if where is None:
    pred = default or (lambda p, x: is_float_leaf(x))
    chosen = [bool(pred(p, x)) and (is_float_leaf(x) or is_compressed(x)) for p, x in items]
  elif callable(where):
    chosen = [bool(where(p, x)) and (is_float_leaf(x) or is_compressed(x)) for p, x in items]
  else:
    patterns = [where] if isinstance(where, str) else list(where)
    if not patterns:
      raise ValueError(f"{name}: `where` is an empty list of patterns; pass None for the default.")
    compiled = [re.compile(p) for p in patterns]
    chosen = []
    hits = [0] * len(compiled)
    for p, x in items:
      hit = False
      for i, rx in enumerate(compiled):
        if rx.fullmatch(p):
          hits[i] += 1
          hit = True
      if hit and not (is_float_leaf(x) or is_compressed(x)):
        raise ValueError(
            f"{name}: pattern selects leaf '{p}' of dtype {getattr(x, 'dtype', type(x))}; "
            "only float leaves can be transformed. Narrow the pattern to exclude it."
        )
      chosen.append(hit)
    for rx, n in zip(compiled, hits):
      if n == 0:
        raise ValueError(
            f"{name}: pattern {rx.pattern!r} matches no leaf (patterns are re.fullmatch'ed on "
            f"'a/b/kernel' paths). Paths are: {_describe_paths(tree)}"
        )
  treedef = jax.tree.structure(tree, is_leaf=is_compressed)
  return jax.tree.unflatten(treedef, chosen)


def _hole(tree: PyTree, mask: PyTree) -> PyTree:
  """Replaces unselected leaves by None (an empty pytree node)."""
  return jax.tree.map(lambda x, m: x if m else None, tree, mask, is_leaf=is_compressed)


def _fill(sub: PyTree, tree: PyTree, mask: PyTree) -> PyTree:
  """Inverse of ``_hole``: selected leaves come from ``sub``, the rest from ``tree``."""
  treedef = jax.tree.structure(tree, is_leaf=is_compressed)
  flat_tree = treedef.flatten_up_to(tree)
  flat_mask = treedef.flatten_up_to(mask)
  flat_sub = treedef.flatten_up_to(sub)
  return jax.tree.unflatten(
      treedef, [s if m else t for s, t, m in zip(flat_sub, flat_tree, flat_mask)]
  )


def leafwise(
    fn: Callable[[str, Any], Any],
    where: Where = None,
    *,
    default: Callable[[str, Any], bool] | None = None,
    name: str = "leafwise",
) -> ParamTransform:
  """A stateless transform applying ``fn(path, leaf)`` to each selected leaf.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> half = jaxmem.leafwise(lambda path, x: x / 2, where='.*kernel')
    >>> jaxmem.transform(half, {'kernel': jnp.ones(2), 'bias': jnp.ones(2)})['kernel']
    Array([0.5, 0.5], dtype=float32)
  """

  def init(params):
    select(params, where, default=default, name=name)  # validate rules early
    return EmptyState()

  def update(params, state):
    mask = select(params, where, default=default, name=name)
    new = map_with_path(lambda p, x, m: fn(p, x) if m else x, params, mask)
    return new, state

  return ParamTransform(init, update)


def masked(tx: ParamTransform, where: Where, *, name: str = "masked") -> ParamTransform:
  """Applies ``tx`` to the selected leaves only; the others pass through unchanged.

  ``tx`` sees the params with unselected leaves replaced by ``None``.
  """

  def init(params):
    mask = select(params, where, name=name)
    return tx.init(_hole(params, mask))

  def update(params, state):
    mask = select(params, where, name=name)
    sub, state = tx.update(_hole(params, mask), state)
    return _fill(sub, params, mask), state

  return ParamTransform(init, update)


def chain(*txs: ParamTransform) -> ParamTransform:
  """Composes transforms left to right; the state is the tuple of their states.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> tx = jaxmem.chain(jaxmem.magnitude_prune(0.5), jaxmem.quantize_int8())
    >>> q = jaxmem.transform(tx, {'kernel': jnp.arange(1., 9.).reshape(4, 2)})
    >>> type(q['kernel']).__name__
    'QArray'
  """
  for i, t in enumerate(txs):
    if not isinstance(t, ParamTransform):
      raise TypeError(f"chain: argument {i} is {type(t).__name__}, not a ParamTransform.")

  def init(params):
    states = []
    for t in txs:
      s = t.init(params)
      params, _ = t.update(params, s)  # later inits see earlier transforms' outputs
      states.append(s)
    return tuple(states)

  def update(params, state):
    if len(state) != len(txs):
      raise ValueError(f"chain: state has {len(state)} entries for {len(txs)} transforms.")
    new_states = []
    for t, s in zip(txs, state):
      params, s = t.update(params, s)
      new_states.append(s)
    return params, tuple(new_states)

  return ParamTransform(init, update)


def partition(
    rules: Sequence[tuple[str, ParamTransform | None]], *, name: str = "partition"
) -> ParamTransform:
  """Routes each leaf to the transform of the first rule whose regex fullmatches its path.

  ``None`` as a rule's transform keeps the matched leaves as they are (use it to
  exempt layers). Leaves that match no rule are kept too. Every rule must be the
  first match of at least one leaf, so a typo in a pattern is an error, not a
  silent no-op. Integer/bool leaves are never routed.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'embed': {'embedding': jnp.ones((8, 4))}, 'out': {'kernel': jnp.ones((4, 2))}}
    >>> tx = jaxmem.partition([('embed/.*', None), ('.*kernel', jaxmem.quantize_int8())])
    >>> q = jaxmem.transform(tx, params)
    >>> type(q['embed']['embedding']).__name__, type(q['out']['kernel']).__name__
    ('ArrayImpl', 'QArray')
  """
  compiled = [(re.compile(p), t) for p, t in rules]

  def labels(params):
    items = leaves_with_paths(params)
    out, counts = [], [0] * len(compiled)
    for p, x in items:
      label = -1
      if is_float_leaf(x) or is_compressed(x):
        for i, (rx, _) in enumerate(compiled):
          if rx.fullmatch(p):
            label = i
            counts[i] += 1
            break
      out.append(label)
    for (rx, _), n in zip(compiled, counts):
      if n == 0:
        raise ValueError(
            f"{name}: rule {rx.pattern!r} is the first match of no float leaf (an earlier rule "
            f"may shadow it, or it has a typo). Paths are: {_describe_paths(params)}"
        )
    treedef = jax.tree.structure(params, is_leaf=is_compressed)
    return jax.tree.unflatten(treedef, out)

  def masks(params):
    lab = labels(params)
    return [jax.tree.map(lambda lab_i, i=i: lab_i == i, lab) for i in range(len(compiled))]

  def init(params):
    return tuple(
        t.init(_hole(params, m)) if t is not None else EmptyState()
        for (_, t), m in zip(compiled, masks(params))
    )

  def update(params, state):
    ms = masks(params)
    new_states = []
    out = params
    for (_, t), m, s in zip(compiled, ms, state):
      if t is None:
        new_states.append(s)
        continue
      sub, s = t.update(_hole(params, m), s)
      out = _fill(sub, out, m)
      new_states.append(s)
    return out, tuple(new_states)

  return ParamTransform(init, update)


def check_same_structure(a: PyTree, b: PyTree, what_a: str, what_b: str) -> None:
  """Raises a ValueError naming the first differing path when two trees differ in structure."""
  pa = [p for p, _ in leaves_with_paths(a)]
  pb = [p for p, _ in leaves_with_paths(b)]
  if pa == pb:
    return
  sa, sb = set(pa), set(pb)
  only_a = sorted(sa - sb)[:5]
  only_b = sorted(sb - sa)[:5]
  raise ValueError(
      f"{what_a} and {what_b} have different tree structures: only in {what_a}: {only_a}; "
      f"only in {what_b}: {only_b}. Build {what_b} from the same params "
      "(e.g. with jax.tree.map over them)."
  )
