"""Partition specs for compressed param trees: a float param's spec onto every compressed leaf.

A Flax model's params come with a ``PartitionSpec`` per leaf (from logical axis rules,
``nn.get_partition_spec``, or written by hand). After quantization a kernel is a
:class:`jaxmem.QArray` whose leaves all keep the param's rank (see
:mod:`jaxmem._src.qarray`), so the float spec carries over axis by axis:

* ``qvalue`` takes the param's spec as it is (a packed axis is sharded like the param's
  axis: a shard then holds whole bytes of consecutive values when ``8 // bits`` divides
  the shard);
* ``scale`` and ``offset`` take the spec on the axes where they have more than one entry
  (channels, groups, stacked layers) and are replicated on the axes where one scale is
  shared;
* a :class:`jaxmem.SparseArray` (flat ``nnz`` values and an encoded index) is replicated.

Pure functions of the trees; nothing here touches devices unless a ``mesh`` is given to
check divisibility.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import QArray, values_per_byte

PyTree = Any


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec) or x is None


def _spec_entries(spec: PartitionSpec | None, ndim: int, path: str) -> list[Any]:
  entries = list(spec) if spec is not None else []
  if len(entries) > ndim:
    raise ValueError(
        f"partition_specs: the spec {spec} at '{path}' has {len(entries)} entries, but the "
        f"param has {ndim} axes. Give the float param's own spec (one entry per axis)."
    )
  return entries + [None] * (ndim - len(entries))


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  size = 1
  for n in names:
    if n not in mesh.shape:
      raise ValueError(f"partition_specs: mesh axis {n!r} is not in the mesh {dict(mesh.shape)}.")
    size *= mesh.shape[n]
  return size


def _check_divides(mesh, path: str, leaf: str, shape, entries) -> None:
  for a, (n, e) in enumerate(zip(shape, entries, strict=True)):
    k = _axis_size(mesh, e)
    if n % k:
      raise ValueError(
          f"partition_specs: '{path}' {leaf} has {n} entries on axis {a}, which mesh axis "
          f"{e!r} of size {k} does not divide. Shard another axis of this param, use a "
          "group size (or packing) that leaves a multiple of the mesh size per axis, or "
          "replicate it (None in its spec)."
      )


def _qarray_specs(q: QArray, spec, path: str, mesh) -> QArray:
  entries = _spec_entries(spec, len(q.shape), path)
  qspec = PartitionSpec(*entries)

  def small(x):  # replicated where one value is shared along the axis
    e = [en if x.shape[a] > 1 else None for a, en in enumerate(entries)]
    return PartitionSpec(*e)

  out = dataclasses.replace(
      q, qvalue=qspec, scale=small(q.scale),
      offset=None if q.offset is None else small(q.offset),
  )
  if mesh is not None:
    if q.packed:
      a = q.pack_axis % len(q.shape)
      k = _axis_size(mesh, entries[a])
      per = values_per_byte(q.bits)
      if q.shape[a] % (k * per):
        raise ValueError(
            f"partition_specs: '{path}' packs {per} values per byte along axis {a} "
            f"({q.shape[a]} values), and {k} shards of it do not hold whole bytes; shard "
            "another axis or pick a mesh axis size dividing "
            f"{q.shape[a] // per}."
        )
    _check_divides(mesh, path, "qvalue", q.qvalue.shape, entries)
    _check_divides(mesh, path, "scale", q.scale.shape, list(out.scale))
  return out


def partition_specs(compressed: PyTree, float_specs: PyTree, *, mesh=None) -> PyTree:
  """The ``PartitionSpec`` tree of a compressed param tree, from its float params' specs.

  Args:
    compressed: params after jaxmem transforms (QArray/SparseArray leaves, float leaves),
      concrete or abstract (``jax.eval_shape``).
    float_specs: the float params' specs, same structure as the float params: one
      ``PartitionSpec`` (or None: replicated) per param.
    mesh: optional ``jax.sharding.Mesh``; if given, every sharded axis (of values,
      scales, zero points) is checked to be divisible by its mesh axes, and packed axes to
      split into whole bytes.

  Returns:
    A tree of the structure of ``compressed``: a QArray of specs for each QArray
    (``qvalue``/``scale``/``offset`` specs), a SparseArray of replicated specs, the float
    spec for plain leaves (``PartitionSpec()`` where it was None). Turn it into shardings with
    ``jax.tree.map(lambda s: NamedSharding(mesh, s), specs)`` and place params with
    ``jax.device_put(compressed, shardings)``.

  Raises:
    ValueError: the trees' paths differ, a spec has more entries than its param has
      axes, or (with ``mesh``) an axis does not divide.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {'up': {'kernel': jnp.ones((8, 16))}, 'down': {'kernel': jnp.ones((16, 8))}}
    >>> q = jaxmem.transform(jaxmem.quantize_int4(group_size=4), params)
    >>> specs = jaxmem.partition_specs(q, {'up': {'kernel': P(None, 'model')},
    ...                                    'down': {'kernel': P('model', None)}})
    >>> up, down = specs['up']['kernel'], specs['down']['kernel']
    >>> (up.qvalue, up.scale) == (P(None, 'model'), P(None, 'model'))  # column-parallel
    True
    >>> (down.qvalue, down.scale) == (P('model', None), P('model', None))  # row-parallel
    True
  """
  spec_paths = dict(
      (tree_lib.path_str(p), s)
      for p, s in jax.tree_util.tree_flatten_with_path(float_specs, is_leaf=_is_spec)[0]
  )
  leaf_paths = [p for p, _ in tree_lib.leaves_with_paths(compressed)]
  missing = [p for p in leaf_paths if p not in spec_paths]
  extra = sorted(set(spec_paths) - set(leaf_paths))
  if missing or extra:
    what = (f"has no spec for '{missing[0]}'" if missing
            else f"has a spec for '{extra[0]}', which the params do not have")
    raise ValueError(
        f"partition_specs: float_specs {what} ({len(missing)} params without a spec, "
        f"{len(extra)} specs without a param). Pass the specs of the float params these "
        "compressed params were made from (same paths)."
    )

  def one(path, x):
    spec = spec_paths[path]
    if isinstance(x, QArray):
      return _qarray_specs(x, spec, path, mesh)
    if tree_lib.is_compressed(x):
      return jax.tree.map(lambda _: PartitionSpec(), x)
    if mesh is not None and hasattr(x, "shape"):
      _check_divides(mesh, path, "array", tuple(x.shape), _spec_entries(spec, len(x.shape), path))
    return PartitionSpec() if spec is None else spec

  return tree_lib.map_with_path(one, compressed)
