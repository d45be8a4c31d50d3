"""Fully sharded data parallelism (ZeRO-3): params, gradients and optimizer state sharded.

Rajbhandari, Rasley, Ruwase & He (2020), "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models" (SC20): with ``N`` data-parallel devices, each device keeps ``1/N`` of the
params, of the gradients and of the optimizer state (stage 3), gathers a layer's full
weights just before using them and reduce-scatters its gradients right after; Zhao et al.
(2023), "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (VLDB) describe
the same schedule. Here the schedule is not written by hand: the step is one ``jax.jit``
whose inputs and outputs carry the shardings, and XLA's SPMD partitioner (Xu et al. (2021),
"GSPMD: General and Scalable Parallelization for ML Computation Graphs") inserts the
all-gathers and reduce-scatters. Under scan over layers (``nn.scan``, ``lax.scan``,
:func:`jaxmem.scan_layers`) the gathered weights of one layer live inside the loop body, so
they are not kept across layers; with a remat policy the backward pass gathers them again.

* :func:`jaxmem.fsdp_specs` gives the ``PartitionSpec`` tree of a params tree (or any tree): each
  leaf with at least ``min_size`` values is sharded over the mesh axis on its largest
  axis that the axis size divides; smaller leaves, and leaves with no divisible axis, are
  replicated; ``rules={regex: spec}`` override leaves by path. A :class:`jaxmem.QArray`
  gets the specs of its values, scales and zero points from a float spec, as
  :func:`jaxmem.partition_specs` maps them.
* :func:`jaxmem.fsdp_state_specs` shards an optimizer state like the params its leaves mirror
  (optax states hold param-shaped trees under ``mu``, ``nu``, ...).
* :func:`jaxmem.fsdp_train_step` builds an :class:`jaxmem.distributed.FSDPTrainStep`:
  :func:`jaxmem.train_step` (microbatches, bf16 compute, frozen compressed leaves) under
  ``jit`` with those shardings, the batch sharded on its leading axis over every mesh axis
  (a 2-D ``data`` x ``fsdp`` mesh: batch over both, params over ``fsdp``), the state donated.

The math is the single-device full-batch step's: sharding changes where values live, not
what they are (sums run in another order, so results agree to float rounding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmem._src import base
from jaxmem._src import remat as remat_lib
from jaxmem._src import sharding as sharding_lib
from jaxmem._src import train as train_lib
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import QArray
from jaxmem._src.sparse import SparseArray

PyTree = Any
Axis = str | Sequence[str]
DEFAULT_MIN_SIZE = 2**14


# ----------------------------------------------------------------------------- checks


def _axis_entry(mesh: Mesh, axis: Axis, name: str) -> tuple[Any, int]:
  """The spec entry for ``axis`` (a name or a tuple of names) and its number of shards."""
  if not isinstance(mesh, Mesh):
    raise TypeError(
        f"{name}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; build one with "
        "Mesh(np.array(jax.devices()), ('fsdp',)) or jaxmem.distributed.mesh_from_axes."
    )
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  if not names or not all(isinstance(a, str) for a in names):
    raise TypeError(f"{name}: axis must be a mesh axis name or a tuple of names, got {axis!r}.")
  for a in names:
    if a not in mesh.shape:
      raise ValueError(
          f"{name}: axis {a!r} is not an axis of the mesh {dict(mesh.shape)}; name one of "
          f"{tuple(mesh.axis_names)}."
      )
  size = math.prod(mesh.shape[a] for a in names)
  return (names[0] if len(names) == 1 else names), size


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec) or x is None


def _fits(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> bool:
  entries = list(spec)
  if len(entries) > len(shape):
    return False
  for n, e in zip(shape, entries):
    if e is None:
      continue
    names = e if isinstance(e, tuple) else (e,)
    if any(a not in mesh.shape for a in names) or n % math.prod(mesh.shape[a] for a in names):
      return False
  return True


# ----------------------------------------------------------------------------- specs


def _candidates(shape: Sequence[int], entry: Any, n: int) -> list[PartitionSpec]:
  """Specs putting ``entry`` on each axis ``n`` divides, the largest axis first (then the first
  of equal ones)."""
  out = []
  for a in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
    if shape[a] % n == 0:
      out.append(PartitionSpec(*[entry if b == a else None for b in range(len(shape))]))
  return out


def _array_default(x: Any, entry: Any, n: int, min_size: int) -> PartitionSpec:
  shape = tuple(getattr(x, "shape", ()))
  if not shape or math.prod(shape) < min_size:
    return PartitionSpec()
  return next(iter(_candidates(shape, entry, n)), PartitionSpec())


def _qarray_default(q: QArray, path: str, mesh: Mesh, entry: Any, n: int, min_size: int):
  if q.shape and math.prod(q.shape) >= min_size:
    for spec in _candidates(q.shape, entry, n):
      try:  # values, scales (groups) and packed bytes must all divide
        return sharding_lib._qarray_specs(q, spec, path, mesh)
      except ValueError:
        continue
  return sharding_lib._qarray_specs(q, PartitionSpec(), path, None)


def _default_spec(path: str, x: Any, mesh: Mesh, entry: Any, n: int, min_size: int) -> Any:
  """The default spec of one leaf (a QArray or other compressed value: a tree of specs)."""
  if isinstance(x, QArray):
    return _qarray_default(x, path, mesh, entry, n, min_size)
  if isinstance(x, SparseArray):
    return jax.tree.map(lambda _: PartitionSpec(), x)  # flat values + index: replicated
  if tree_lib.is_compressed(x):  # e.g. a LoRA kernel or a blockwise optimizer moment
    return jax.tree.map(
        lambda y: _default_spec(path, y, mesh, entry, n, min_size), x,
        is_leaf=lambda y: y is not x and isinstance(y, QArray),
    )
  return _array_default(x, entry, n, min_size)


def _given_spec(path: str, x: Any, spec: PartitionSpec, mesh: Mesh, name: str) -> Any:
  """A float spec given for one leaf, checked against the mesh and mapped onto compressed."""
  if isinstance(x, QArray):
    try:
      return sharding_lib._qarray_specs(x, spec, path, mesh)
    except ValueError as e:
      raise ValueError(f"{name}: the spec {spec} for '{path}' does not fit: {e}") from None
  if tree_lib.is_compressed(x):  # the spec applies to the arrays of the value's rank
    return jax.tree.map(
        lambda y: (_given_spec(path, y, spec, mesh, name) if isinstance(y, QArray)
                   else spec if len(y.shape) == len(x.shape) and _fits(spec, y.shape, mesh)
                   else PartitionSpec()),
        x, is_leaf=lambda y: y is not x and isinstance(y, QArray),
    )
  shape = tuple(getattr(x, "shape", ()))
  if not _fits(spec, shape, mesh):
    raise ValueError(
        f"{name}: the spec {spec} for '{path}' does not fit its shape {shape} on the mesh "
        f"{dict(mesh.shape)}: it needs at most {len(shape)} entries, mesh axes that exist and "
        "sizes the mesh axes divide. Give another spec or None (replicated)."
    )
  return spec


def _check_rules(rules: Any, name: str) -> tuple[tree_lib.PathRules, list[Any]]:
  """The compiled rule regexes and their specs; a TypeError/ValueError for a bad rule."""
  if rules is not None and not isinstance(rules, Mapping):
    raise TypeError(
        f"{name}: rules must be a dict {{regex: PartitionSpec or None}}, got "
        f"{type(rules).__name__}."
    )
  rules = dict(rules or {})
  for pattern, spec in rules.items():
    if not _is_spec(spec):
      raise TypeError(
          f"{name}: rules[{pattern!r}] is a {type(spec).__name__}; give a PartitionSpec "
          "(e.g. P(None, 'fsdp')) or None (replicated)."
      )
  return tree_lib.PathRules(list(rules), name, "rule"), list(rules.values())


def fsdp_specs(
    tree: PyTree,
    mesh: Mesh,
    axis: Axis = "fsdp",
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    rules: Mapping[str, PartitionSpec | None] | None = None,
) -> PyTree:
  """The FSDP ``PartitionSpec`` tree of ``tree``: large leaves sharded on their largest axis.

  Default, per leaf: with at least ``min_size`` values, the leaf is sharded over ``axis``
  on its largest axis whose size the axis size divides (the first of equal ones); smaller
  leaves, and leaves with no such axis, are replicated. A :class:`jaxmem.QArray` is
  sharded on the largest logical axis on which its values, scales and packed bytes all
  divide (specs mapped as :func:`jaxmem.partition_specs` does); a
  :class:`jaxmem.SparseArray` is replicated; other compressed values (LoRA kernels,
  blockwise optimizer moments) get the default on each of their arrays.

  Args:
    tree: params (float, ``QArray`` and other compressed leaves), concrete or abstract
      (``jax.ShapeDtypeStruct``); any pytree of arrays works.
    mesh: the device mesh.
    axis: the mesh axis (or tuple of axes) params are sharded over.
    min_size: leaves with fewer values are replicated (biases, norms).
    rules: ``{regex: PartitionSpec or None}``, ``re.fullmatch``'ed on ``a/b/kernel`` paths,
      first match wins; the leaf gets that float spec (None: replicated). A rule that
      matches no leaf is an error.

  Returns:
    A tree of the structure of ``tree``: a ``PartitionSpec`` per array leaf (a QArray of
    specs for a QArray, ...), for ``NamedSharding(mesh, spec)``.

  Raises:
    TypeError: ``mesh`` is not a ``Mesh``, or ``axis`` is not a name (or names).
    ValueError: ``axis`` is not a mesh axis, ``min_size`` < 0, a rule is not a valid regex,
      matches no leaf, or its spec does not fit its leaf (rank, mesh axes, divisibility).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from jaxmem._src.fsdp import fsdp_specs
    >>> mesh = Mesh(np.array(jax.devices()), ('fsdp',))
    >>> params = {'w': jnp.zeros((8, 4096)), 'b': jnp.zeros(4096), 'emb': jnp.zeros((512, 64))}
    >>> specs = fsdp_specs(params, mesh, rules={'emb': None})
    >>> specs['w'] == P(None, 'fsdp'), specs['b'] == P(), specs['emb'] == P()
    (True, True, True)
  """
  name = "fsdp_specs"
  entry, n = _axis_entry(mesh, axis, name)
  base.check_int(name, "min_size", min_size, minimum=0)
  matcher, specs = _check_rules(rules, name)
  used = []

  def one(path, x):
    i = matcher.first(path)
    if i is None:
      return _default_spec(path, x, mesh, entry, n, min_size)
    used.append(i)
    spec = specs[i] if specs[i] is not None else PartitionSpec()
    return _given_spec(path, x, spec, mesh, f"{name}: rules[{matcher.patterns[i]!r}]")

  out = tree_lib.map_with_path(one, tree)
  matcher.check_used(used, tree)
  return out


def _float_spec(spec: Any) -> PartitionSpec | None:
  """The float param's spec behind a spec tree of :func:`jaxmem.fsdp_specs` (None: not one)."""
  if isinstance(spec, PartitionSpec):
    return spec
  if spec is None:
    return PartitionSpec()
  if isinstance(spec, QArray):
    return spec.qvalue
  return None


def fsdp_state_specs(
    opt_state: PyTree,
    param_specs: PyTree,
    mesh: Mesh,
    axis: Axis = "fsdp",
    *,
    min_size: int = DEFAULT_MIN_SIZE,
) -> PyTree:
  """Specs of an optimizer state: leaves mirroring a param get the param's spec.

  Optax states keep param-shaped trees inside (``ScaleByAdamState.mu`` and ``nu``, a
  trace, a ``MaskedState``'s inner state), so a state leaf at path ``.../mu/layers/kernel``
  mirrors the param ``layers/kernel``. Such a leaf (the longest param path that ends its
  path) gets that param's spec when the spec fits it: a ``QArray`` state leaf mapped through
  :func:`jaxmem.partition_specs`; a blockwise-quantized moment (``BlockQArray``, whose
  codes and block scales keep the param's rank and leading axes) gets the spec on each of
  its arrays the spec fits, the others replicated. Every other leaf (step counts, leaves
  the spec does not fit) gets :func:`jaxmem.fsdp_specs`' default. A param a rule replicated keeps
  its moments replicated too.

  Args:
    opt_state: the optimizer state (``StepState.opt_state``), concrete or abstract.
    param_specs: the params' specs (from :func:`jaxmem.fsdp_specs`; the same paths as the params).
    mesh, axis, min_size: as for :func:`jaxmem.fsdp_specs` (for the default).

  Returns:
    The spec tree of ``opt_state``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from jaxmem._src.fsdp import fsdp_specs, fsdp_state_specs
    >>> mesh = Mesh(np.array(jax.devices()), ('fsdp',))
    >>> params = {'w': jnp.zeros((64, 512)), 'v': jnp.zeros((64, 512))}
    >>> pspecs = fsdp_specs(params, mesh, rules={'v': P('fsdp', None)})
    >>> adam = optax.adam(1e-3).init(params)
    >>> sspecs = fsdp_state_specs(adam, pspecs, mesh)
    >>> sspecs[0].count == P(), sspecs[0].mu['w'] == P(None, 'fsdp')
    (True, True)
    >>> sspecs[0].nu['v'] == P('fsdp', None)  # the rule's spec, mirrored
    True
  """
  name = "fsdp_state_specs"
  entry, n = _axis_entry(mesh, axis, name)
  base.check_int(name, "min_size", min_size, minimum=0)
  flat = jax.tree_util.tree_flatten_with_path(
      param_specs, is_leaf=lambda s: _is_spec(s) or tree_lib.is_compressed(s)
  )[0]
  by_path = {tree_lib.path_str(p): s for p, s in flat}

  def mirrored(path: str) -> PartitionSpec | None:
    parts = path.split("/")
    for k in range(len(parts)):  # the longest param path ending this path
      suffix = "/".join(parts[k:])
      if suffix in by_path:
        return _float_spec(by_path[suffix])
    return None

  def one(path, x):
    spec = mirrored(path)
    if spec is not None and not isinstance(x, SparseArray):
      try:
        return _given_spec(path, x, spec, mesh, name)
      except ValueError:
        pass  # a leaf of another shape at a param's path: the default below
    return _default_spec(path, x, mesh, entry, n, min_size)

  return tree_lib.map_with_path(one, opt_state)


# ----------------------------------------------------------------------------- the step


def _shardings(mesh: Mesh, specs: PyTree) -> PyTree:
  return jax.tree.map(
      lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
  )


def _global(x: Any, sharding: NamedSharding) -> Any:
  """With several processes, a process-local full value as a global array (else ``x``)."""
  if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return x
  host = np.asarray(x)  # every process holds the same full value
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


class FSDPTrainStep:
  """:func:`jaxmem.train_step` fully sharded under ``jit``; built by :func:`jaxmem.fsdp_train_step`.

  Use :meth:`init` for the sharded state, then ``state, metrics = step(state, batch,
  *args)``. A call donates the state (continue with the one it returns). The batch is
  split over the devices on its leading axis: pass the global batch in one process, or
  each process's share (its devices' rows, in order) with several processes; ``args``
  (e.g. a frozen teacher's params) keep their own shardings (place them with
  :func:`jaxmem.fsdp_specs` too, or leave them replicated).

  Attributes:
    mesh: the device mesh.
    axis: the mesh axis (or axes) the params, gradients and optimizer state are sharded
      over.
    batch_axes: the mesh axes the batch's leading axis is split over.
    batch_sharding: the batch leaves' ``NamedSharding``.
    step: the per-step function ``(state, batch, *args) -> (state, metrics)`` being jitted.
    offload: the state parts kept in ``pinned_host`` memory between steps (``()``: none).
  """

  def __init__(self, step, optimizer, mesh, axis, batch_axes, min_size, rules, trainable,
               offload=()):
    self.step = step
    self.offload = tuple(offload)
    self.optimizer = optimizer
    self.mesh = mesh
    self.axis = axis
    self.batch_axes = batch_axes
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
    self._batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    self._min_size = min_size
    self._rules = rules
    self._trainable = trainable
    self._fns: dict[Any, Callable[..., Any]] = {}

  # ------------------------------------------------------------------ specs and placement
  def state_specs(self, state: train_lib.StepState) -> train_lib.StepState:
    """The :class:`jaxmem.StepState` of specs: params by :func:`jaxmem.fsdp_specs`, optimizer state
    by :func:`jaxmem.fsdp_state_specs`, the step count replicated (concrete or abstract state)."""
    if not isinstance(state, train_lib.StepState):
      raise TypeError(
          f"FSDPTrainStep: state is a {type(state).__name__}, not a jaxmem.StepState; build it "
          "with step.init(params) and continue with the state each call returns."
      )
    pspecs = fsdp_specs(state.params, self.mesh, self.axis, min_size=self._min_size,
                        rules=self._rules)
    ospecs = fsdp_state_specs(state.opt_state, pspecs, self.mesh, self.axis,
                              min_size=self._min_size)
    return train_lib.StepState(PartitionSpec(), pspecs, ospecs)

  def state_shardings(self, state: train_lib.StepState) -> train_lib.StepState:
    """:meth:`state_specs` as ``NamedSharding`` s on :attr:`mesh`; the parts in
    :attr:`offload` in ``pinned_host`` memory."""
    return self._placed(_shardings(self.mesh, self.state_specs(state)), "pinned_host")

  def _placed(self, shardings: train_lib.StepState, kind: str) -> train_lib.StepState:
    """``shardings`` with the :attr:`offload` parts in memory ``kind``."""
    moved = {
        part: jax.tree.map(lambda s: s.with_memory_kind(kind), getattr(shardings, part))
        for part in self.offload
    }
    return shardings._replace(**moved)

  def _run(self, host: train_lib.StepState, device: train_lib.StepState):
    """The step with the offloaded parts copied to device memory first and back after."""
    if not self.offload:
      return self.step
    parts = self.offload

    def run(state, batch, *args):
      state = state._replace(**{p: jax.device_put(getattr(state, p), getattr(device, p))
                                for p in parts})
      new, metrics = self.step(state, batch, *args)
      new = new._replace(**{p: jax.device_put(getattr(new, p), getattr(host, p))
                            for p in parts})
      return new, metrics

    return run

  def abstract_state(self, params: PyTree) -> train_lib.StepState:
    """The state :meth:`init` would build, as ``jax.ShapeDtypeStruct`` s with shardings.

    Nothing is computed or placed: lower the step on it (:meth:`lower`) to read the
    per-device memory of a model too large to materialize.
    """
    state = jax.eval_shape(
        functools.partial(train_lib.init_step_state, optimizer=self.optimizer,
                          trainable=self._trainable), params)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, self.state_shardings(state),
    )

  def init(self, params: PyTree) -> train_lib.StepState:
    """The sharded state at step 0: params copied onto their shards, optimizer state built
    sharded (each process passes the same full params)."""
    abstract = jax.eval_shape(
        functools.partial(train_lib.init_step_state, optimizer=self.optimizer,
                          trainable=self._trainable), params)
    sh = self.state_shardings(abstract)
    init = jax.jit(  # outputs are new buffers: the caller's params are never donated
        functools.partial(train_lib.init_step_state, optimizer=self.optimizer,
                          trainable=self._trainable),
        out_shardings=sh,
    )
    return init(jax.tree.map(_global, params, sh.params))

  def shard_batch(self, batch: PyTree) -> PyTree:
    """The batch as global arrays split over :attr:`batch_axes` on the leading axis."""
    procs = jax.process_count()
    for path, x in tree_lib.leaves_with_paths(batch):
      global_leaf = isinstance(x, jax.Array) and not x.is_fully_addressable
      size = x.shape[0] if getattr(x, "ndim", 0) else None
      total = None if size is None else size * (1 if procs == 1 or global_leaf else procs)
      if total is None or total % self._batch_shards:
        raise ValueError(
            f"FSDPTrainStep: batch leaf '{path or 'batch'}' has leading size "
            f"{size if size is not None else 'none (a scalar)'}"
            f"{'' if procs == 1 else ' in this process'}, which does not split over the "
            f"{self._batch_shards} devices of mesh axes {self.batch_axes}; use a global batch "
            f"size that is a multiple of {self._batch_shards}, or pass per-example-free "
            "values as extra step arguments."
        )
    if procs == 1:
      return jax.device_put(batch, self.batch_sharding)
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) and not x.is_fully_addressable
        else jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        batch,
    )

  # ------------------------------------------------------------------ running
  def _jitted(self, state: train_lib.StepState, nargs: int) -> Callable[..., Any]:
    leaves, treedef = jax.tree.flatten(state)
    key = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves), nargs)
    fn = self._fns.get(key)
    if fn is None:
      sh = self.state_shardings(state)
      rep = NamedSharding(self.mesh, PartitionSpec())
      fn = self._fns[key] = jax.jit(
          self._run(sh, self._placed(sh, "device")),
          in_shardings=(sh, self.batch_sharding) + (None,) * nargs,
          out_shardings=(sh, rep),
          donate_argnums=0,
      )
    return fn

  def _check_alive(self, state: train_lib.StepState) -> None:
    for p, x in jax.tree_util.tree_flatten_with_path(state)[0]:
      if isinstance(x, jax.Array) and x.is_deleted():
        raise ValueError(
            f"FSDPTrainStep: state leaf '{tree_lib.path_str(p)}' has been deleted: a previous "
            "call donated the state (its buffers hold the new state). Continue with the state "
            "each call returns (`state, metrics = step(state, batch)`), or build a fresh one "
            "with step.init(params)."
        )

  def __call__(self, state: train_lib.StepState, batch: PyTree, *args: Any):
    if not isinstance(state, train_lib.StepState):
      self.state_specs(state)  # raises the TypeError
    self._check_alive(state)
    return self._jitted(state, len(args))(state, self.shard_batch(batch), *args)

  def trace(self, state: train_lib.StepState, batch: PyTree, *args: Any):
    """``jit``-traces the step as it runs (offload copies included; concrete or abstract
    arguments): ``.jaxpr`` is its jaxpr, ``.lower()`` lowers it."""
    if not isinstance(state, train_lib.StepState):
      self.state_specs(state)
    return self._jitted(state, len(args)).trace(state, batch, *args)

  def lower(self, state: train_lib.StepState, batch: PyTree, *args: Any):
    """``jit``-lowers the step (concrete or abstract arguments: :meth:`abstract_state` and
    ``jax.ShapeDtypeStruct`` batch leaves) for ``.compile().memory_analysis()``."""
    return self.trace(state, batch, *args).lower()


def fsdp_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: Axis = "fsdp",
    batch_axes: Axis | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    rules: Mapping[str, PartitionSpec | None] | None = None,
    microbatches: int = 1,
    compute_dtype: Any = None,
    trainable: base.Where = None,
    has_aux: bool = False,
    offload: Sequence[str] = (),
) -> FSDPTrainStep:
  """A fully sharded (ZeRO-3) train step: :func:`jaxmem.train_step` under ``jit`` with shardings.

  Params are sharded by :func:`jaxmem.fsdp_specs` (``axis``, ``min_size``, ``rules``), the
  optimizer state like the params it mirrors (:func:`jaxmem.fsdp_state_specs`), gradients come out
  of the backward pass with the params' shardings, and the batch is split on its leading
  axis over ``batch_axes``. Everything :func:`jaxmem.train_step` does carries over:
  microbatches (split ``"strided"``, so each device's rows divide evenly), a bf16
  ``compute_dtype``, frozen ``QArray``/int leaves, ``has_aux``, extra loss arguments. A
  remat policy lives in the loss (:func:`jaxmem.scan_layers`, :func:`jaxmem.remat`, or the
  model's own). No ``pmean``: the loss is the mean over the global batch.

  Args:
    loss_fn: ``(params, batch, *args) -> loss``, the mean over the batch it gets.
    optimizer: an optax transformation.
    mesh: the device mesh, e.g. ``Mesh(devices.reshape(2, 2), ('data', 'fsdp'))``.
    axis: the mesh axis (or axes) params, gradients and optimizer state are sharded over.
    batch_axes: mesh axes the batch is split over (default: every mesh axis).
    min_size, rules: see :func:`jaxmem.fsdp_specs`.
    microbatches, compute_dtype, trainable, has_aux: see :func:`jaxmem.train_step`.
    offload: parts of the state kept in host memory (``pinned_host`` memory kind) between
      steps: ``("opt_state",)`` and/or ``"params"``. The step copies them to device memory
      when it starts and back when it ends (XLA schedules the copies). It needs a backend
      whose devices have ``pinned_host`` memory (:func:`jaxmem.memory.offload_supported`).
      On CPU, host and device memory are the same RAM: the program compiles and runs the
      same, but nothing is saved, and ``memory_analysis()`` counts the host-placed
      arguments among the argument bytes.

  Returns:
    An :class:`jaxmem.distributed.FSDPTrainStep`: ``state = step.init(params)``, then
    ``state, metrics = step(state, batch)``.

  Raises:
    TypeError, ValueError: a bad mesh, axis or ``batch_axes``, or any argument
      :func:`jaxmem.train_step` rejects; when called, a batch leaf whose leading size does
      not split over the batch devices, a consumed (donated) state, or a spec that does not
      fit (see :func:`jaxmem.fsdp_specs`).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from jaxmem._src.fsdp import fsdp_train_step
    >>> mesh = Mesh(np.array(jax.devices()), ('fsdp',))
    >>> loss = lambda p, b: jnp.mean((b['x'] @ p['w'] - b['y']) ** 2)
    >>> step = fsdp_train_step(loss, optax.sgd(0.1), mesh, min_size=0)
    >>> state = step.init({'w': jnp.zeros((8, 4))})
    >>> batch = {'x': jnp.ones((8, 8)), 'y': jnp.ones((8, 4))}
    >>> state, metrics = step(state, batch)
    >>> float(metrics['loss']), state.params['w'].sharding.spec == P('fsdp', None)
    (1.0, True)
  """
  name = "fsdp_train_step"
  _axis_entry(mesh, axis, name)
  base.check_int(name, "min_size", min_size, minimum=0)
  if batch_axes is None:
    batch_axes = tuple(mesh.axis_names)
  else:
    entry, _ = _axis_entry(mesh, batch_axes, f"{name}(batch_axes=...)")
    batch_axes = entry if isinstance(entry, tuple) else (entry,)
  _check_rules(rules, name)  # bad regexes and specs fail here, before any state exists
  offload = _check_offload(offload, mesh, name)
  step = train_lib.train_step(
      loss_fn, optimizer, microbatches=microbatches, compute_dtype=compute_dtype,
      trainable=trainable, has_aux=has_aux, microbatch_layout="strided",
  )
  return FSDPTrainStep(step, optimizer, mesh, axis, batch_axes, min_size, rules, trainable,
                       offload)


OFFLOADABLE = ("opt_state", "params")


def _check_offload(offload: Any, mesh: Mesh, name: str) -> tuple[str, ...]:
  if isinstance(offload, str):
    offload = (offload,)
  if not isinstance(offload, (tuple, list)) or any(p not in OFFLOADABLE for p in offload):
    raise ValueError(
        f"{name}: offload={offload!r}; give a tuple of state parts kept in host memory "
        f"between steps, from {OFFLOADABLE} (e.g. offload=('opt_state',)), or () for none."
    )
  if offload:
    device = mesh.devices.flat[0]
    if not remat_lib.offload_supported(device):
      raise ValueError(
          f"{name}: offload={tuple(offload)} needs devices with both 'device' and "
          f"'pinned_host' memory, which {device.platform} device {device.id} does not have "
          "(jaxmem.memory.offload_supported). Use offload=() on this backend."
      )
  return tuple(dict.fromkeys(offload))


__all__ = ["FSDPTrainStep", "fsdp_specs", "fsdp_state_specs", "fsdp_train_step"]
