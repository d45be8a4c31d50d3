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

Non-finite weights: the quantizers and pruners take ``check_finite=True`` (the default)
and raise a ``ValueError`` naming the leaf's path when a selected leaf holds NaN or Inf
(see ``jaxmem._src.base.require_finite``): at once on concrete params, and inside
``jax.jit`` when the compiled function runs (there the error reaches you as a
``jax.errors.JaxRuntimeError`` whose text holds the same message, raised by the call or
by ``block_until_ready``).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import tree as tree_lib
from jaxmem._src.tree import is_compressed, is_float_leaf, leaves_with_paths, map_with_path

PyTree = Any
Where = None | str | Sequence[str] | Callable[[str, Any], bool]


class EmptyState(NamedTuple):
  """State of a transform that keeps none."""


class ParamTransform(NamedTuple):
  """A pure transform over a parameter pytree.

  Attributes:
    init: ``params -> state``.
    update: ``(params, state) -> (new_params, new_state)``.
    init_update: optional ``params -> (new_params, new_state)``, equal to
      ``update(params, init(params))`` but cheaper: combinators whose ``init`` must run
      their stages' updates (:func:`chain`, so that each stage's ``init`` sees the previous
      stage's output) provide it, and :func:`transform` uses it, so every stage runs once.
  """

  init: Callable[[PyTree], PyTree]
  update: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]
  init_update: Callable[[PyTree], tuple[PyTree, PyTree]] | None = None


def init_and_update(tx: ParamTransform, params: PyTree) -> tuple[PyTree, PyTree]:
  """``tx.update(params, tx.init(params))``, each stage running once (see ``init_update``)."""
  if tx.init_update is not None:
    return tx.init_update(params)
  return tx.update(params, tx.init(params))


def transform(tx: ParamTransform, params: PyTree) -> PyTree:
  """Runs a param transform once (``init`` then ``update``) and returns the new params.

  Args:
    tx: the transform, e.g. ``jaxmem.quantize_int8()``.
    params: the params pytree: Linen ``variables['params']``, an NNX
      ``nnx.state(model, nnx.Param)`` or any pytree of arrays (not a module).

  Raises:
    TypeError: ``tx`` is not a :class:`ParamTransform` (e.g. the arguments are swapped),
      or ``params`` is a Flax module rather than its params.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), params)
    >>> type(q['dense']['kernel']).__name__
    'QArray'
  """
  if not isinstance(tx, ParamTransform):
    if isinstance(params, ParamTransform):
      raise TypeError(
          f"transform: the arguments are swapped (got a {type(tx).__name__} first and the "
          "ParamTransform second); call jaxmem.transform(tx, params), e.g. "
          "jaxmem.transform(jaxmem.quantize_int8(), params)."
      )
    hint = (
        " It looks like an optax transformation (jaxmem.gradual_prune / keep_masks are): "
        "use it in optax.chain with an optimizer instead."
        if hasattr(tx, "init") and hasattr(tx, "update") else ""
    )
    raise TypeError(
        f"transform: the first argument must be a jaxmem.ParamTransform (e.g. "
        f"jaxmem.quantize_int8()), got {type(tx).__name__}; call "
        f"jaxmem.transform(tx, params).{hint}"
    )
  check_params(params, "transform")
  new_params, _ = init_and_update(tx, params)
  return new_params


def check_params(params: PyTree, name: str) -> None:
  """Raises a TypeError when ``params`` is a Flax module (or a transform), not a params pytree."""
  nnx = sys.modules.get("flax.nnx")
  linen = sys.modules.get("flax.linen")
  if nnx is not None and isinstance(params, nnx.Module):
    raise TypeError(
        f"{name}: got an nnx.Module ({type(params).__name__}), not its params. Transform the "
        "params state and run the model on it: state = nnx.state(model, nnx.Param); "
        "q = jaxmem.transform(tx, state); y = jaxmem.apply(model, q, x)."
    )
  if linen is not None and isinstance(params, linen.Module):
    raise TypeError(
        f"{name}: got a flax.linen Module ({type(params).__name__}), not its params. Pass "
        "params = model.init(rng, x)['params'] and run the model with "
        "jaxmem.apply(model, {'params': q}, x)."
    )
  if isinstance(params, ParamTransform):
    raise TypeError(
        f"{name}: got a ParamTransform where the params go; call jaxmem.transform(tx, params)."
    )


def check_bool(name: str, **values: Any) -> None:
  """Raises a TypeError unless every keyword value is a real bool (not ``'yes'``, not 1)."""
  for arg, v in values.items():
    if not isinstance(v, (bool, np.bool_)):
      raise TypeError(f"{name}: {arg} must be True or False, got {v!r}.")


def check_int(name: str, arg: str, v: Any, *, minimum: int | None = None) -> None:
  """Raises a TypeError unless ``v`` is an int (not a bool), a ValueError if below ``minimum``."""
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
    raise TypeError(f"{name}: {arg} must be an int, got {v!r}.")
  if minimum is not None and v < minimum:
    raise ValueError(f"{name}: {arg}={v}; it must be >= {minimum}.")


def check_axes(name: str, arg: str, axes: Any) -> None:
  """Raises a TypeError unless ``axes`` is None or a sequence of ints."""
  if axes is None:
    return
  if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence) or any(
      isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) for a in axes
  ):
    raise TypeError(f"{name}: {arg} must be a sequence of ints (e.g. (-1,)) or None, got {axes!r}.")


def check_group_size(name: str, group_size: Any) -> None:
  """Validates a group size: None (per channel) or a positive int."""
  if group_size is None:
    return
  if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, (int, np.integer)):
    raise TypeError(
        f"{name}: group_size must be a positive int (e.g. 64) or None, got {group_size!r}."
    )
  if group_size <= 0:
    raise ValueError(
        f"{name}: group_size={group_size}; it is the number of consecutive inputs sharing a "
        "scale, so pass a positive int dividing the kernels' input size (e.g. 32, 64, 128), "
        "or None for one scale per output channel."
    )


# ----------------------------------------------------------------------------- finite check


def _all_finite(x: Any):
  if isinstance(x, np.ndarray):
    return np.isfinite(x).all()
  return jnp.isfinite(x).all()


def _nonfinite_message(name, path, source, what, reason, fix, traced):
  if traced:  # only a flag came back from the device
    count, where = "", (
        " Found while the traced (jitted) transform ran; check_finite=False turns the check off."
    )
  else:
    bad = np.count_nonzero(~np.isfinite(np.asarray(source)))
    count, where = f" ({bad} of {math.prod(source.shape)} entries)", ""
  return f"{name} '{path}': {what} holds NaN or Inf{count}{reason}; {fix}.{where}"


def _raise_nonfinite(name, paths, what, reason, fix, ok):
  """Host side of the traced check (a ``jax.debug.callback``); under vmap once per example."""
  ok = np.asarray(ok).reshape(-1, len(paths)).all(axis=0)
  for path, leaf_ok in zip(paths, ok):
    if not leaf_ok:
      raise ValueError(_nonfinite_message(name, path, None, what, reason, fix, True))


def require_finite(
    items: Sequence[tuple[str, Any] | tuple[str, Any, Any]],
    name: str,
    *,
    what: str = "the tensor",
    reason: str = "",
    fix: str = "fix the params, or exclude this leaf with `where`",
) -> None:
  """Raises a ValueError naming the first ``(path, leaf)`` of ``items`` holding NaN or Inf.

  Concrete arrays are checked at once. Traced arrays (under ``jit``, ``vmap``, ``grad``)
  are checked when the traced function runs: one ``jax.debug.callback`` for all of them,
  carrying the paths, raises the ValueError on the host. Under ``jax.jit`` that error
  reaches the caller wrapped in a ``jax.errors.JaxRuntimeError`` whose text holds this
  message, raised by the call (CPU) or at the latest by ``block_until_ready`` (async
  backends), so no result of that call can be read. Abstract leaves
  (``jax.ShapeDtypeStruct``, ``jax.eval_shape``) and non-float leaves are skipped.

  Cost: one ``isfinite`` reduction over each checked array and, under ``jit``, one host
  callback per call (a small device-to-host sync). The quantizers check their scales
  instead of the weights (a NaN/Inf weight makes the max-abs of its scale group, so the
  scale, NaN/Inf), which costs next to nothing; the pruners read each pruned weight once
  more. Turn it off with the transforms' ``check_finite=False``, e.g. in a function
  exported with ``jax.export`` (host callbacks do not serialize).

  Args:
    items: ``(path, leaf)`` pairs, or ``(path, proxy, leaf)`` triples where ``proxy`` is
      non-finite exactly when ``leaf`` is (e.g. its scales) and is checked instead; the
      message counts the entries of ``leaf``.
    name: the transform's name, for the message.
    what: what the leaf is, for the message.
    reason: why non-finite values are a problem here (appended after the count).
    fix: how to fix the call.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> require_finite([('dense/kernel', jnp.array([1.0, jnp.nan]))], 'quantize_int8')
    Traceback (most recent call last):
    ...
    ValueError: quantize_int8 'dense/kernel': the tensor holds NaN or Inf (1 of 2 entries)...
  """
  concrete, traced = [], []
  for path, x, *source in items:
    if not is_float_leaf(x):
      continue
    if isinstance(x, jax.core.Tracer):
      traced.append((path, x))
    elif isinstance(x, (jax.Array, np.ndarray)):
      concrete.append((path, x, source[0] if source else x))
  if concrete:
    oks = jax.device_get([_all_finite(x) for _, x, _ in concrete])
    for (path, _, src), ok in zip(concrete, oks):
      if not ok:
        raise ValueError(_nonfinite_message(name, path, src, what, reason, fix, False))
  if traced:
    ok = jnp.stack([_all_finite(x) for _, x in traced])
    paths = tuple(p for p, _ in traced)
    jax.debug.callback(functools.partial(_raise_nonfinite, name, paths, what, reason, fix), ok)


# ----------------------------------------------------------------------------- paths


def _patterns(where: Where, name: str) -> tree_lib.PathRules | None:
  """The rules of ``where`` (None for None or a predicate), validating its type."""
  if where is None or callable(where):
    return None
  if isinstance(where, str):
    return tree_lib.PathRules([where], name)
  if isinstance(where, bytes) or not isinstance(where, Sequence):
    raise TypeError(
        f"{name}: `where` must be None, a regex string, a sequence of them or a predicate "
        f"(path, leaf) -> bool; got {type(where).__name__}."
    )
  if not where:
    raise ValueError(f"{name}: `where` is an empty list of patterns; pass None for the default.")
  return tree_lib.PathRules(list(where), name)


def check_where(where: Where, name: str) -> None:
  """Validates ``where`` when a transform is built (type, and every regex compiles)."""
  _patterns(where, name)


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
    ValueError: a regex is invalid, matches no leaf, or selects an integer/bool leaf.
    TypeError: ``tree`` is a Flax module instead of its params.
  """
  check_params(tree, name)
  compiled = _patterns(where, name)
  items = leaves_with_paths(tree)
  if where is None:
    pred = default or (lambda p, x: is_float_leaf(x))
    chosen = [bool(pred(p, x)) and (is_float_leaf(x) or is_compressed(x)) for p, x in items]
  elif compiled is None:
    chosen = [bool(where(p, x)) and (is_float_leaf(x) or is_compressed(x)) for p, x in items]
  else:
    chosen, used = [], set()
    for p, x in items:
      hits = compiled.matching(p)
      if hits and not (is_float_leaf(x) or is_compressed(x)):
        raise ValueError(
            f"{name}: pattern selects leaf '{p}' of dtype {getattr(x, 'dtype', type(x))}; "
            "only float leaves can be transformed. Narrow the pattern to exclude it."
        )
      used.update(hits)
      chosen.append(bool(hits))
    compiled.check_used(used, [p for p, _ in items])
  treedef = jax.tree.structure(tree, is_leaf=is_compressed)
  return jax.tree.unflatten(treedef, chosen)


def checked(tx: ParamTransform, check: Callable[[PyTree], None]) -> ParamTransform:
  """``tx`` whose ``init`` and ``update`` first run ``check(params)`` (argument checks that
  need the params, e.g. that every rule or statistic names a selected leaf)."""

  def init(params):
    check(params)
    return tx.init(params)

  def update(params, state):
    check(params)
    return tx.update(params, state)

  return ParamTransform(init, update)


def check_keys_selected(params: PyTree, keys, where: Where, *, default, name: str,
                        what: str) -> None:
  """Raises a ValueError when ``keys`` (paths of per-leaf inputs such as calibration
  statistics) name leaves that ``where`` (else ``default``) does not select in ``params``."""
  sel = select(params, where, default=default, name=name)
  chosen = {p for (p, _), m in zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(sel))
            if m}
  unused = sorted(set(keys) - chosen)
  if unused:
    raise ValueError(
        f"{name}: {what} given for {unused[:5]}, which are not selected leaves of the params; "
        "check `where` and their paths (e.g. 'layers_0/kernel')."
    )


def _scoped(name: str, kind: str, scope: str, route: str, sub: PyTree, fn: Callable, *args: Any):
  """``fn(sub, *args)``; an inner ``where`` matching nothing is re-raised as scoped to ``sub``.

  ``kind`` is the combinator (``"partition"``), ``scope`` what routed ``sub``
  (``"rule 'a/.*'"``), ``route`` how to route another leaf there.
  """
  try:
    return fn(sub, *args)
  except tree_lib.NoMatchError as e:
    raise ValueError(
        f"{name}: {scope} routes only the leaves [{tree_lib.describe_paths(sub)}] to its "
        "transform, "
        f"so that transform's own `where` is scoped to them: {e.name}'s pattern "
        f"{e.pattern!r} matches none of them. {route}, or apply that transform outside "
        f"{kind}, e.g. jaxmem.chain(jaxmem.{kind}(...), tx), where its `where` sees the "
        "whole tree."
    ) from None


def leafwise(
    fn: Callable[[str, Any], Any],
    where: Where = None,
    *,
    default: Callable[[str, Any], bool] | None = None,
    name: str = "leafwise",
    check_finite: bool = False,
) -> ParamTransform:
  """A stateless transform applying ``fn(path, leaf)`` to each selected leaf.

  Args:
    fn: ``(path, leaf) -> new leaf``.
    where: leaves to transform (see the module docstring); None: ``default``.
    default: the selection used when ``where`` is None; default: float leaves.
    name: the transform's name, for error messages.
    check_finite: first check the selected float leaves for NaN/Inf, also under ``jit``
      (see ``jaxmem._src.base.require_finite``).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> half = jaxmem.leafwise(lambda path, x: x / 2, where='.*kernel')
    >>> jaxmem.transform(half, {'kernel': jnp.ones(2), 'bias': jnp.ones(2)})['kernel']
    Array([0.5, 0.5], dtype=float32)
  """

  check_where(where, name)
  check_bool(name, check_finite=check_finite)

  def init(params):
    select(params, where, default=default, name=name)  # validate rules early
    return EmptyState()

  def update(params, state):
    mask = select(params, where, default=default, name=name)
    if check_finite:
      flat_mask = jax.tree.leaves(mask)
      require_finite([i for i, m in zip(leaves_with_paths(params), flat_mask) if m], name)
    new = map_with_path(lambda p, x, m: fn(p, x) if m else x, params, mask)
    return new, state

  return ParamTransform(init, update)


def masked(tx: ParamTransform, where: Where, *, name: str = "masked") -> ParamTransform:
  """Applies ``tx`` to the selected leaves only; the others pass through unchanged.

  ``tx`` sees the params with unselected leaves replaced by ``None``, so its own
  ``where`` is matched against the selected leaves only.
  """
  if not isinstance(tx, ParamTransform):
    raise TypeError(f"{name}: tx is a {type(tx).__name__}, not a ParamTransform.")
  check_where(where, name)
  scope = f"`where` {where!r}" if isinstance(where, str) else "`where`"
  route = "Select the leaf with masked's own `where` instead"

  def init(params):
    mask = select(params, where, name=name)
    sub = tree_lib.hole(params, mask)
    return MaskedState(_scoped(name, "masked", scope, route, sub, tx.init))

  def update(params, state):
    mask = select(params, where, name=name)
    sub = tree_lib.hole(params, mask)
    inner = state.inner_state if isinstance(state, MaskedState) else state
    new, inner = _scoped(name, "masked", scope, route, sub, tx.update, inner)
    return tree_lib.fill(new, params, mask), MaskedState(inner)

  def init_update(params):
    mask = select(params, where, name=name)
    sub = tree_lib.hole(params, mask)
    new, inner = _scoped(name, "masked", scope, route, sub, functools.partial(
        init_and_update, tx))
    return tree_lib.fill(new, params, mask), MaskedState(inner)

  return ParamTransform(init, update, init_update)


class MaskedState(NamedTuple):
  """State of :func:`masked`: the inner transform's state."""

  inner_state: PyTree


class PartitionState(NamedTuple):
  """State of :func:`partition`: one state per rule (``EmptyState`` for ``None`` rules)."""

  inner_states: tuple


def chain(*txs: ParamTransform) -> ParamTransform:
  """Composes transforms left to right; the state is the tuple of their states.

  ``init`` runs each stage's ``init`` on the previous stage's output, so it runs the
  stages' updates; :func:`transform` uses ``init_update`` instead, which runs each stage's
  ``init`` and ``update`` exactly once.

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

  def init_update(params):  # what transform() runs: each stage's init and update once
    states = []
    for t in txs:
      params, s = init_and_update(t, params)
      states.append(s)
    return params, tuple(states)

  return ParamTransform(init, update, init_update)


_ROUTE = "Route the leaf to this transform with the rule's own pattern instead"


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
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise TypeError(f"{name}: rules must be a list of (regex, transform or None) pairs.")
  for i, rule in enumerate(rules):
    if not (isinstance(rule, tuple | list) and len(rule) == 2) or not (
        rule[1] is None or isinstance(rule[1], ParamTransform)
    ):
      raise TypeError(
          f"{name}: rule {i} is {rule!r}; each rule is a (regex, ParamTransform or None) pair, "
          "e.g. ('.*kernel', jaxmem.quantize_int8())."
      )
  matcher = tree_lib.PathRules([p for p, _ in rules], name, what="rule pattern")
  compiled = list(zip(matcher.compiled, [t for _, t in rules]))

  def labels(params):
    items = leaves_with_paths(params)
    out = [
        matcher.first(p) if is_float_leaf(x) or is_compressed(x) else None for p, x in items
    ]
    matcher.check_used(
        out, [p for p, _ in items], of="float leaf as its first match",
        why="an earlier rule may shadow it, or it has a typo",
    )
    treedef = jax.tree.structure(params, is_leaf=is_compressed)
    return jax.tree.unflatten(treedef, [-1 if i is None else i for i in out])

  def masks(params):
    lab = labels(params)
    return [jax.tree.map(lambda lab_i, i=i: lab_i == i, lab) for i in range(len(compiled))]

  def init(params):
    states = []
    for (rx, t), m in zip(compiled, masks(params)):
      if t is None:
        states.append(EmptyState())
        continue
      sub = tree_lib.hole(params, m)
      states.append(_scoped(name, "partition", f"rule {rx.pattern!r}", _ROUTE, sub, t.init))
    return PartitionState(tuple(states))

  def run(params, state, first: bool):
    ms = masks(params)
    new_states = []
    out = params
    for (rx, t), m, s in zip(compiled, ms, state):
      if t is None:
        new_states.append(s)
        continue
      sub = tree_lib.hole(params, m)
      scope = f"rule {rx.pattern!r}"
      if first:
        new, s = _scoped(name, "partition", scope, _ROUTE, sub, functools.partial(
            init_and_update, t))
      else:
        new, s = _scoped(name, "partition", scope, _ROUTE, sub, t.update, s)
      out = tree_lib.fill(new, out, m)
      new_states.append(s)
    return out, PartitionState(tuple(new_states))

  def update(params, state):
    inner = state.inner_states if isinstance(state, PartitionState) else tuple(state)
    return run(params, inner, first=False)

  def init_update(params):
    return run(params, [EmptyState()] * len(compiled), first=True)

  return ParamTransform(init, update, init_update)


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
