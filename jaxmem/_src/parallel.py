"""Data parallelism for pmap-style per-replica steps.

:func:`jaxmem.data_parallel` runs any per-replica step written in pmap style (an axis name,
``lax.pmean`` where replicas must agree) on several devices, with ``jax.shard_map`` over a
``Mesh`` (default) or ``jax.pmap``, donating the state buffers. :func:`jaxmem.train_step`
builds such a step from a loss (``axis_name=`` names the axis of its ``pmean``).

Under ``shard_map`` the step runs with ``check_vma=False``: each replica then sees its
own (unsummed) gradients exactly as under ``pmap``, so ``lax.pmean(grads, axis)`` is the
full-batch gradient. (With ``check_vma=True``, the gradient w.r.t. a replicated input is
already summed over the axis and a ``pmean`` of it is ``N`` times too large.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmem._src import tree as tree_lib

PyTree = Any
BACKENDS = ("shard_map", "pmap")


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


def _array_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, array)]`` down to the arrays inside compressed values (``w/qvalue``)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tree_lib.path_str(p), x) for p, x in flat]


class DataParallel:
  """A per-replica step run data-parallel; build it with :func:`jaxmem.data_parallel`.

  Calling it takes the state in *replicated form* (from :meth:`replicate`, or a previous
  call's output) and global batches (the per-process batch with several processes), and
  returns outputs in replicated form; :meth:`unreplicate` gives plain values.

  The arguments in ``donate_argnums`` (default: the state) are *donated*: a call
  consumes their buffers, so always continue with the state it returns. Passing a
  consumed state again raises a ``ValueError`` naming the leaf (checked before
  dispatch), and so does, on the pmap backend, a non-batch argument without the
  leading device axis of :meth:`replicate`.

  Attributes:
    backend: ``"shard_map"`` or ``"pmap"``.
    axis_name: the axis the step's collectives use.
    mesh: the 1-d device mesh (also used by the pmap backend to place replicas).
    num_devices: replicas in total (over all processes).
  """

  def __init__(self, step, *, axis_name, backend, mesh, batch_argnums, donate_argnums):
    self.step = step
    self.axis_name = axis_name
    self.backend = backend
    self.mesh = mesh
    self.batch_argnums = batch_argnums
    self.donate_argnums = donate_argnums
    self.num_devices = mesh.devices.size
    self._local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    self._fns: dict[int, Callable[..., Any]] = {}

  # ------------------------------------------------------------------ placement
  def _multi(self) -> bool:
    return jax.process_count() > 1

  def replicate(self, tree: PyTree) -> PyTree:
    """Places a copy of ``tree`` on every device (every process passes the same values)."""
    if self.backend == "shard_map":
      sharding = NamedSharding(self.mesh, PartitionSpec())
      if self._multi():
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
        )
      # A copy: the step donates the state, which must not delete the caller's arrays.
      # (jax.device_put may reuse the caller's buffer on the first device.)
      return jax.jit(lambda t: t, out_shardings=sharding)(tree)
    n = len(self._local_devices)

    def stack(x):
      if self._multi():
        return np.stack([np.asarray(x)] * n)
      x = jnp.asarray(x)
      shards = [jax.device_put(x[None], d) for d in self._local_devices]
      return jax.make_array_from_single_device_arrays(
          (n,) + x.shape, NamedSharding(self.mesh, PartitionSpec(self.axis_name)), shards
      )

    return jax.tree.map(stack, tree)

  def unreplicate(self, tree: PyTree) -> PyTree:
    """The value held by this process's first replica, as a plain (single-device) array."""
    if self.backend == "pmap":
      return jax.tree.map(lambda x: x.addressable_data(0)[0] if hasattr(x, "addressable_data")
                          else x[0], tree)
    return jax.tree.map(
        lambda x: x.addressable_data(0) if hasattr(x, "addressable_data") else x, tree
    )

  def _check_batch(self, i: int, batch: PyTree) -> None:
    n = len(self._local_devices)
    for path, x in tree_lib.leaves_with_paths(batch):
      size = x.shape[0] if getattr(x, "ndim", 0) else None
      if size is None or size % n:
        raise ValueError(
            f"data_parallel: argument {i} leaf '{path or 'batch'}' has leading size "
            f"{size if size is not None else 'none (a scalar)'}, not divisible by the "
            f"{n} local devices; use a batch size that is a multiple of {n} (per process), "
            "or drop the last partial batch."
        )

  def shard_batch(self, batch: PyTree, argnum: int = 1) -> PyTree:
    """Splits a (per-process) batch over the devices on its leading axis."""
    self._check_batch(argnum, batch)
    if self.backend == "pmap":
      n = len(self._local_devices)
      return jax.tree.map(lambda x: jnp.reshape(x, (n, x.shape[0] // n) + x.shape[1:]), batch)
    sharding = NamedSharding(self.mesh, PartitionSpec(self.axis_name))
    if self._multi():
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
      )
    return jax.device_put(batch, sharding)

  # ------------------------------------------------------------------ running
  def _build(self, nargs: int) -> Callable[..., Any]:
    if self.backend == "pmap":
      return jax.pmap(
          self.step,
          axis_name=self.axis_name,
          devices=self._local_devices if not self._multi() else None,
          donate_argnums=self.donate_argnums,
      )
    rep, shard = PartitionSpec(), PartitionSpec(self.axis_name)
    in_specs = tuple(shard if i in self.batch_argnums else rep for i in range(nargs))
    fn = jax.shard_map(
        self.step, mesh=self.mesh, in_specs=in_specs, out_specs=rep, check_vma=False
    )
    return jax.jit(fn, donate_argnums=self.donate_argnums)

  def _check_alive(self, i: int, arg: PyTree) -> None:
    """A clear error for an argument whose buffers a previous call consumed (donated)."""
    for path, x in _array_leaves(arg):
      if isinstance(x, jax.Array) and x.is_deleted():
        donated = i in self.donate_argnums
        why = (
            f"the previous call donated argument {i} (donate_argnums={self.donate_argnums}): "
            "its buffers were reused for the outputs"
            if donated else "it was deleted or donated elsewhere"
        )
        raise ValueError(
            f"data_parallel: argument {i} leaf '{path or 'arg'}' has been deleted: {why}. "
            "Pass the state the previous call returned (`state, metrics = dp(state, batch)`), "
            "or a fresh dp.replicate(...) copy; to keep inputs alive, build the step with "
            "data_parallel(..., donate_argnums=())."
        )

  def _check_replicated(self, i: int, arg: PyTree) -> None:
    """pmap maps every argument over its leading axis: non-batch ones must be stacked."""
    n = len(self._local_devices)
    for path, x in _array_leaves(arg):
      size = x.shape[0] if getattr(x, "ndim", 0) else None
      if size != n:
        raise ValueError(
            f"data_parallel(backend='pmap'): argument {i} leaf '{path or 'arg'}' has leading "
            f"size {size if size is not None else 'none (a scalar)'}, but non-batch "
            f"arguments take one copy per device: a leading axis of size {n} (the local "
            "device count). Pass dp.replicate(state) (a previous call's returned state is "
            "already replicated), or list the argument in batch_argnums if it is data."
        )

  def _prepare(self, args: tuple) -> tuple:
    out = []
    for i, a in enumerate(args):
      self._check_alive(i, a)
      if i in self.batch_argnums:
        out.append(self.shard_batch(a, i))
      else:
        if self.backend == "pmap":
          self._check_replicated(i, a)
        out.append(a)
    return tuple(out)

  def __call__(self, *args):
    fn = self._fns.get(len(args))
    if fn is None:
      fn = self._fns[len(args)] = self._build(len(args))
    return fn(*self._prepare(args))

  def lower(self, *args):
    """``jit``-lowers the data-parallel step (for ``compile().memory_analysis()``)."""
    fn = self._fns.get(len(args)) or self._build(len(args))
    self._fns[len(args)] = fn
    return fn.lower(*self._prepare(args))


def data_parallel(
    step: Callable[..., Any],
    *,
    axis_name: str = "batch",
    backend: str = "shard_map",
    devices: Sequence[jax.Device] | None = None,
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (1,),
    donate_argnums: int | Sequence[int] = (0,),
) -> DataParallel:
  """Runs a pmap-style per-replica ``step`` data-parallel over devices.

  The step is written for one replica: it sees its slice of each batch argument and a
  full copy of every other argument, and uses ``lax.pmean(x, axis_name)`` wherever the
  replicas must agree (gradients, metrics). Every output must be replicated (the same on
  all replicas). Use :func:`jaxmem.train_step` to build such a step from a loss; its
  extra arguments (e.g. a teacher's params) are replicated like the state.

  Args:
    step: per-replica function.
    axis_name: the name the step's collectives use.
    backend: ``"shard_map"`` (default; ``jax.shard_map`` over a 1-d ``Mesh`` under
      ``jit``) or ``"pmap"`` (``jax.pmap``, in maintenance mode in JAX).
    devices: devices to use (default: all, over all processes).
    mesh: a 1-d ``Mesh`` whose single axis is ``axis_name`` (instead of ``devices``).
    batch_argnums: arguments split over devices on their leading axis.
    donate_argnums: arguments whose buffers the outputs may reuse (default: the state,
      argument 0): each call consumes them, so continue with the returned state. Pass
      ``()`` to keep the inputs alive (at the cost of a second copy of the state).

  Raises:
    ValueError: unknown backend, a mesh with another axis, or (when called) a batch leaf
      whose leading size does not divide by the device count, an argument already
      consumed by a previous call (donated), or (pmap backend) a non-batch argument that
      is not in replicated form (leading axis = local device count).

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> def step(w, x):
    ...   g = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)
    ...   g = jax.lax.pmean(g, 'batch')
    ...   return w - 0.1 * g, g
    >>> dp = jaxmem.data_parallel(step, devices=jax.devices()[:1])
    >>> w, g = dp(dp.replicate(jnp.ones((3, 1))), jnp.ones((4, 3)))
    >>> dp.unreplicate(g).shape
    (3, 1)
  """
  if backend not in BACKENDS:
    raise ValueError(f"data_parallel: backend={backend!r}; use one of {BACKENDS}.")
  if mesh is not None:
    if devices is not None:
      raise ValueError("data_parallel: pass `mesh` or `devices`, not both.")
    if mesh.axis_names != (axis_name,):
      raise ValueError(
          f"data_parallel: mesh axes {mesh.axis_names} must be exactly ({axis_name!r},); "
          f"build it as Mesh(np.array(devices), ({axis_name!r},))."
      )
  else:
    devs = list(devices) if devices is not None else jax.devices()
    if not devs:
      raise ValueError("data_parallel: `devices` is empty.")
    mesh = Mesh(np.array(devs), (axis_name,))
  return DataParallel(
      step,
      axis_name=axis_name,
      backend=backend,
      mesh=mesh,
      batch_argnums=_as_tuple(batch_argnums),
      donate_argnums=_as_tuple(donate_argnums),
  )


def mesh_from_axes(
    axes: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    *,
    batch_size: int | None = None,
    batch_axis: str = "data",
) -> Mesh:
  """A ``Mesh`` over ``devices`` (default: all) from ``{axis_name: size}``; one size may be -1.

  With ``batch_size``, also checks that it divides over the ``batch_axis`` devices.

  Example:
    >>> import jax, jaxmem
    >>> mesh = jaxmem.distributed.mesh_from_axes({'data': -1})
    >>> mesh.shape['data'] == jax.device_count()
    True
  """
  devs = list(devices) if devices is not None else jax.devices()
  sizes = list(axes.values())
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh_from_axes: {dict(axes)} has more than one -1 size.")
  known = int(np.prod([s for s in sizes if s != -1]))
  sizes = [len(devs) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devs):
    raise ValueError(
        f"mesh_from_axes: {dict(axes)} does not cover the {len(devs)} devices; give sizes whose "
        "product is the device count, or -1 for one axis."
    )
  mesh = Mesh(np.array(devs).reshape(sizes), tuple(axes))
  if batch_size is not None and batch_size % mesh.shape[batch_axis]:
    raise ValueError(
        f"mesh_from_axes: batch_size={batch_size} does not divide over the "
        f"{mesh.shape[batch_axis]} devices of axis {batch_axis!r}; pick a multiple."
    )
  return mesh
