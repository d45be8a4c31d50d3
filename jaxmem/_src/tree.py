"""Pytrees of params: compressed leaves, ``a/b/kernel`` paths and path rules.

Everything in jaxmem that names a leaf, a Flax module or a checkpoint entry spells its
path the same way, with :func:`path_str`: keys joined by ``/`` (dict keys, attribute names,
sequence indices), NNX's trailing ``.value`` dropped. A Linen module's ``module.path``
plus the param's name gives the same string as the param's key path in
``variables['params']``, so one regex selects both.

Every regex over those paths goes through :class:`PathRules`: patterns are
``re.fullmatch``'ed, the first matching rule wins where rules route leaves, and a rule
that matches nothing is a ``ValueError`` naming the rule and the paths there are (a typo
in a rule is an error, never a silent no-op).

Compressed values (:class:`Compressed`: :class:`jaxmem.QArray`, :class:`jaxmem.SparseArray`)
are pytree nodes whose arrays are leaves; the helpers here treat each one as a single leaf.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _array_op(symbol: str):
  """A Compressed operator method that raises the "not an array" TypeError."""

  def op(self, *args):
    raise self._not_an_array(f"`{symbol}`")

  return op


class Compressed:
  """Marker base class for jaxmem's compressed leaf types (QArray, SparseArray, ...).

  Compressed values are pytree nodes (their arrays are leaves), but path
  selection treats each one as a single leaf named by its parameter path.

  Subclasses expose ``shape`` and ``dtype`` (the logical dense array's) and
  ``materialize()``, which rebuilds the dense float array (meant to run inside a
  jitted function, so no dense copy is kept between calls).
  """

  __slots__ = ()
  _dense_hint = "w.materialize()"  # how to get the dense array, for error messages

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Real storage bytes, the sum over the value's arrays (values, indices, scales)."""
    return sum(
        math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(self)
    )

  def materialize(self):
    raise NotImplementedError(f"{type(self).__name__} does not implement materialize().")

  # A compressed value is not an array: array operations raise a TypeError saying what to
  # call instead (numpy's ufuncs and binary operators defer here through __array_ufunc__).
  __array_ufunc__ = None

  def _not_an_array(self, op: str) -> TypeError:
    return TypeError(
        f"{op}: a jaxmem.{type(self).__name__} is a compressed parameter, not an array, so "
        "array operations do not run on it. Run a Flax model on compressed params with "
        "jaxmem.apply(model, variables, *inputs); multiply a raw array by it with "
        "jaxmem.ops.quantized_dot_general(x, w, dimension_numbers) (or "
        "jaxmem.ops.quantized_einsum); "
        f"or get the dense float array with {self._dense_hint}."
    )

  def __jax_array__(self):
    raise self._not_an_array("a jax.numpy operation (x @ w, jnp.dot, jnp.asarray, ...)")

  def __array__(self, dtype=None, copy=None):
    raise self._not_an_array("np.asarray")

  def __getitem__(self, index):
    raise self._not_an_array("indexing (w[...])")

  __matmul__ = __rmatmul__ = _array_op("@")
  __add__ = __radd__ = _array_op("+")
  __sub__ = __rsub__ = _array_op("-")
  __mul__ = __rmul__ = _array_op("*")
  __truediv__ = __rtruediv__ = _array_op("/")
  __floordiv__ = __rfloordiv__ = _array_op("//")
  __pow__ = __rpow__ = _array_op("**")
  __neg__ = _array_op("unary -")
  __abs__ = _array_op("abs()")


def is_compressed(x: Any) -> bool:
  """True for jaxmem's compressed leaf types."""
  return isinstance(x, Compressed)


def is_float_leaf(x: Any) -> bool:
  """True for float arrays (concrete or abstract); False for ints, bools, compressed values."""
  if is_compressed(x) or x is None:
    return False
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


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
  """The ``a/b/kernel`` spelling of a path, the one jaxmem uses everywhere.

  Args:
    path: a jax key path (from ``jax.tree_util.tree_flatten_with_path``), or any sequence
      of names and indices, e.g. a Linen ``module.path + ('kernel',)``. NNX's trailing
      ``.value`` attribute is dropped, so an ``nnx.State`` and its pure dict agree.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> params = {'layers': [{'kernel': jnp.ones(2)}]}
    >>> [jaxmem.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ['layers/0/kernel']
    >>> jaxmem.path_str(('encoder', 'Dense_0', 'kernel'))
    'encoder/Dense_0/kernel'
  """
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def join_path(prefix: str, key: Any) -> str:
  """``prefix/key`` (just ``key`` at the root): :func:`path_str` built one key at a time."""
  return f"{prefix}/{_key_str(key)}" if prefix else _key_str(key)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` in tree order; compressed values count as single leaves.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> [p for p, _ in jaxmem.leaves_with_paths({'b': jnp.ones(1), 'a': {'w': jnp.ones(1)}})]
    ['a/w', 'b']
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
  return [(path_str(p), x) for p, x in flat]


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
  """``jax.tree.map`` whose function also gets the ``a/b/kernel`` path.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> jaxmem.map_with_path(lambda p, x: p, {'dense': {'kernel': jnp.ones(1)}})
    {'dense': {'kernel': 'dense/kernel'}}
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest, is_leaf=is_compressed
  )


def describe_paths(tree_or_paths: PyTree | Sequence[str], limit: int = 12) -> str:
  """The first ``limit`` paths of a tree (or a list of paths), for error messages."""
  if isinstance(tree_or_paths, list) and all(isinstance(p, str) for p in tree_or_paths):
    paths = tree_or_paths
  else:
    paths = [p for p, _ in leaves_with_paths(tree_or_paths)]
  more = f" ... (+{len(paths) - limit} more)" if len(paths) > limit else ""
  return ", ".join(paths[:limit]) + more


# ----------------------------------------------------------------------------- rules


class NoMatchError(ValueError):
  """A path rule matched nothing. ``name``/``pattern``/``paths`` let callers re-scope it."""

  def __init__(self, message: str, name: str, pattern: str, paths: str):
    super().__init__(message)
    self.name, self.pattern, self.paths = name, pattern, paths


class PathRules:
  """Regexes ``re.fullmatch``'ed on ``a/b/kernel`` paths; a rule that matches nothing is an error.

  The one rule matcher of jaxmem: ``where=`` selections, :func:`jaxmem.partition` rules,
  ``stack_axes={regex: n}``, calibration and QAT module filters all use it, so every one
  compiles its patterns at build time (a bad regex is a ``ValueError`` then), matches the
  same way, and reports an unused rule the same way (:meth:`check_used`).

  Args:
    patterns: regex strings.
    name: the caller's name, for error messages (``'quantize_int8'``).
    what: what a pattern is called there (``'`where` pattern'``, ``'rule'``).

  Example:
    >>> from jaxmem._src.tree import PathRules
    >>> rules = PathRules([r'.*/kernel', r'embed/.*'], 'example')
    >>> rules.first('dense/kernel'), rules.first('dense/bias')
    (0, None)
    >>> try:
    ...   rules.check_used([0], ['dense/kernel', 'dense/bias'])
    ... except ValueError as e:
    ...   print(str(e).split(' (')[0])
    example: `where` pattern 'embed/.*' matches no leaf
  """

  def __init__(self, patterns: Sequence[str], name: str, what: str = "`where` pattern"):
    self.name, self.what = name, what
    compiled = []
    for p in patterns:
      if not isinstance(p, str):
        raise TypeError(f"{name}: {what}s must be regex strings, got {p!r}.")
      try:
        compiled.append(re.compile(p))
      except re.error as e:
        raise ValueError(
            f"{name}: {what} {p!r} is not a valid regular expression ({e}). Patterns "
            "are re.fullmatch'ed on 'a/b/kernel' paths, e.g. r'.*/kernel' or r'Dense_0/.*'; "
            "escape literal brackets and dots with a backslash."
        ) from None
    self.compiled = tuple(compiled)

  @property
  def patterns(self) -> tuple[str, ...]:
    return tuple(rx.pattern for rx in self.compiled)

  def __len__(self) -> int:
    return len(self.compiled)

  def matching(self, path: str) -> list[int]:
    """Indices of every rule that fullmatches ``path``."""
    return [i for i, rx in enumerate(self.compiled) if rx.fullmatch(path)]

  def first(self, path: str) -> int | None:
    """Index of the first rule that fullmatches ``path`` (None: no rule does)."""
    return next((i for i, rx in enumerate(self.compiled) if rx.fullmatch(path)), None)

  def any(self, path: str) -> bool:
    return any(rx.fullmatch(path) for rx in self.compiled)

  def check_used(
      self,
      used: Iterable[int | None],
      paths: PyTree | Sequence[str],
      *,
      of: str = "leaf",
      why: str = "patterns are re.fullmatch'ed on 'a/b/kernel' paths",
  ) -> None:
    """Raises :class:`NoMatchError` for the first rule whose index is not in ``used``.

    Args:
      used: indices of the rules that matched something (``None`` entries are ignored).
      paths: the tree (or list of paths) the rules ran on, listed in the error.
      of: what a rule should have matched (``'leaf'``, ``'selected leaf'``, ``'Dense
        kernel'``).
      why: the parenthesized explanation after "matches no ...".
    """
    seen = set(used)
    for i, rx in enumerate(self.compiled):
      if i not in seen:
        listed = describe_paths(paths)
        raise NoMatchError(
            f"{self.name}: {self.what} {rx.pattern!r} matches no {of} ({why}). "
            f"Paths are: {listed}",
            self.name, rx.pattern, listed,
        )


# ----------------------------------------------------------------------------- sub-trees


def hole(tree: PyTree, mask: PyTree) -> PyTree:
  """The selected part of ``tree``: unselected leaves become ``None`` (an empty pytree node).

  ``mask`` is a bool pytree of the same structure (compressed values count as one leaf),
  e.g. from :func:`jaxmem.select`. The result has the same structure with holes, so a
  transform or an optimizer can run on the selected leaves only (``None`` leaves have no
  state and no updates); :func:`fill` puts its output back.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxmem._src.tree import hole, fill
    >>> tree, mask = {'a': jnp.ones(1), 'b': jnp.zeros(1)}, {'a': True, 'b': False}
    >>> hole(tree, mask)['b'] is None
    True
    >>> out = fill({'a': jnp.full(1, 7.0), 'b': None}, tree, mask)
    >>> float(out['a'][0]), float(out['b'][0])
    (7.0, 0.0)
  """
  return jax.tree.map(lambda x, m: x if m else None, tree, mask, is_leaf=is_compressed)


def fill(sub: PyTree, tree: PyTree, mask: PyTree) -> PyTree:
  """Inverse of :func:`hole`: selected leaves come from ``sub``, the rest from ``tree``."""
  treedef = jax.tree.structure(tree, is_leaf=is_compressed)
  flat_tree = treedef.flatten_up_to(tree)
  flat_mask = treedef.flatten_up_to(mask)
  flat_sub = treedef.flatten_up_to(sub)
  return jax.tree.unflatten(
      treedef, [s if m else t for s, t, m in zip(flat_sub, flat_tree, flat_mask)]
  )
