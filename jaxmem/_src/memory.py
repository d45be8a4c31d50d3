"""Memory accounting: real bytes per leaf path of any pytree, compressed values included."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxmem._src import tree as tree_lib


def _array_bytes(x: Any) -> int:
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    return 0
  return int(math.prod(shape)) * np.dtype(dtype).itemsize


def leaf_bytes(x: Any) -> int:
  """Real storage bytes of one leaf: an array, or a compressed value (all its arrays)."""
  return sum(_array_bytes(a) for a in jax.tree.leaves(x))


def dense_bytes(x: Any) -> int:
  """Bytes the leaf would take as a dense array of its logical shape and dtype."""
  return _array_bytes(x)


_SHORT_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def storage_dtypes(x: Any) -> str:
  """The dtypes a leaf is stored in, e.g. ``'int8+f32'`` for int8 values with f32 scales."""
  names = []
  for a in jax.tree.leaves(x):
    dtype = getattr(a, "dtype", None)
    if dtype is not None:
      name = np.dtype(dtype).name
      name = _SHORT_DTYPES.get(name, name)
      if name not in names:
        names.append(name)
  return "+".join(names) or "-"


@dataclasses.dataclass(frozen=True)
class MemoryRow:
  """One leaf: its path, kind (``array``, ``int8``, ``int4/packed``, ``SparseArray``, ...),
  logical shape and dtype (what the model sees), the dtypes its arrays are stored in, and bytes
  (real, and dense in the logical dtype)."""

  path: str
  kind: str
  shape: tuple[int, ...]
  dtype: str
  storage: str
  bytes: int
  dense_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes per leaf and totals. ``str(report)`` is a readable table.

  Attributes:
    rows: one :class:`MemoryRow` per leaf (compressed values count as one leaf).
    total_bytes: real storage of the tree.
    dense_total_bytes: the same tree with every leaf dense in its original dtype.
  """

  rows: tuple[MemoryRow, ...]

  @property
  def total_bytes(self) -> int:
    return sum(r.bytes for r in self.rows)

  @property
  def dense_total_bytes(self) -> int:
    return sum(r.dense_bytes for r in self.rows)

  @property
  def ratio(self) -> float:
    """``total_bytes / dense_total_bytes`` (compression ratio vs the float tree)."""
    return self.total_bytes / max(self.dense_total_bytes, 1)

  def as_dict(self) -> dict[str, int]:
    return {r.path: r.bytes for r in self.rows}

  def table(self, max_rows: int | None = 40) -> str:
    rows = list(self.rows)
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max_rows]
    w = max([len("path")] + [len(r.path) for r in shown])
    s = max([len("storage")] + [len(r.storage) for r in shown])
    lines = [f"{'path':<{w}}  {'kind':<11} {'shape':<18} {'dtype':<8} {'storage':<{s}} "
             f"{'bytes':>12} {'ratio':>6}"]
    for r in shown:
      ratio = r.bytes / r.dense_bytes if r.dense_bytes else 1.0
      lines.append(
          f"{r.path:<{w}}  {r.kind:<11} {str(r.shape):<18} {r.dtype:<8} {r.storage:<{s}} "
          f"{r.bytes:>12,} {ratio:>6.3f}"
      )
    if len(shown) < len(rows):
      lines.append(f"... {len(rows) - len(shown)} more leaves")
    lines.append(
        f"{'total':<{w}}  {'':<11} {'':<18} {'':<8} {'':<{s}} {self.total_bytes:>12,} "
        f"{self.ratio:>6.3f}"
        f"   (dense: {self.dense_total_bytes:,} bytes)"
    )
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def memory_report(tree: Any) -> MemoryReport:
  """Bytes of every leaf of ``tree`` (concrete or abstract, e.g. from ``jax.eval_shape``).

  Each row shows the leaf's logical dtype (what the model computes with) next to the dtypes it
  is stored in: an int8 kernel reads ``dtype float32, storage int8+f32`` (int8 values, f32
  scales).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> params = {'kernel': jnp.ones((256, 256)), 'bias': jnp.zeros(256)}
    >>> r = jaxmem.memory_report(jaxmem.transform(jaxmem.quantize_int8(), params))
    >>> r.total_bytes, r.dense_total_bytes
    (67584, 263168)
    >>> [(row.path, row.kind, row.dtype, row.storage) for row in r.rows]
    [('bias', 'array', 'float32', 'f32'), ('kernel', 'int8', 'float32', 'int8+f32')]
  """
  rows = []
  for path, x in tree_lib.leaves_with_paths(tree):
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    kind = type(x).__name__ if tree_lib.is_compressed(x) else "array"
    if kind == "QArray":
      kind = f"int{x.bits}" + ("/packed" if x.packed else "")
    rows.append(
        MemoryRow(
            path=path,
            kind=kind,
            shape=shape,
            dtype=np.dtype(dtype).name if dtype is not None else type(x).__name__,
            storage=storage_dtypes(x),
            bytes=leaf_bytes(x),
            dense_bytes=dense_bytes(x),
        )
    )
  return MemoryReport(tuple(rows))


def tree_bytes(tree: Any) -> int:
  """Total real storage bytes of a pytree (compressed values by their real storage)."""
  return sum(leaf_bytes(x) for x in jax.tree.leaves(tree, is_leaf=tree_lib.is_compressed))
