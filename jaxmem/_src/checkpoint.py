"""Checkpoints of anything jaxmem produces, through Orbax, with restore targets built for you.

:class:`jaxmem.CheckpointManager` wraps ``orbax.checkpoint.CheckpointManager`` (async saves,
``max_to_keep``). Each step stores two Orbax items:

* ``state``: the arrays, as a plain nested dict saved with ``StandardSave``. Every array
  keeps its dtype: a :class:`jaxmem.QArray`'s int8 (or packed uint8) ``qvalue`` stays int8
  on disk next to its float32 ``scale``; no float copy of a compressed leaf is written.
  Keys follow the tree: ``params/Dense_0/kernel/qvalue``; tuple and list entries are
  named by their index, NamedTuple and dataclass fields by their name.
* ``layout``: a JSON document (format ``"jaxmem.checkpoint/3"``) holding the full tree
  structure: container kinds (dict, list, tuple, NamedTuple, dataclass), each class by its
  *registered name* (``jaxmem.QArray``, ``optax.ScaleByAdamState``; see
  :func:`jaxmem.checkpoint.register_checkpoint_type`) with its static fields (``bits``,
  ``pack_axis``, ``act_bits``), and for each array its shape, dtype and crc32c checksum.

On restore the layout gives the abstract target, so users never hand-build one: a
checkpoint of int8 params restores as QArrays, an optimizer state as the optax
NamedTuples it was, gradual-pruning masks as the masks they were. A target can still be
given (e.g. ``abstract_target(tx, params)``); it is checked against the layout first.

What restore trusts (a checkpoint directory may come from anywhere):

* **Types come only from a registry**, looked up by name; restore never imports a module
  or resolves an attribute named in a file. It builds ``None``, ``str``, Python
  ``bool``/``int``/``float``, ``dict``, ``list``, ``tuple``, arrays of numeric dtypes, and
  the registered classes: jaxmem's compressed types (``QArray``, ``SparseArray``) and its
  NamedTuple states (transform, pruning, distillation, train states), every state
  NamedTuple defined in optax, ``collections.OrderedDict``, ``flax.core.FrozenDict``, and
  whatever you register with :func:`jaxmem.checkpoint.register_checkpoint_type`. A registered
  class is called with the fields stored in the file (NamedTuples and dataclasses: register only
  types whose constructor has no side effects). A name that is not registered, a class
  used as the wrong node kind (a NamedTuple as a dataclass), fields that differ from the
  class's, an unknown node kind or a non-numeric dtype make the step corrupt.
* **Orbax and TensorStore read the array files**: their metadata is JSON, handlers come
  from Orbax's own registry (jaxmem always passes them explicitly), and nothing is
  unpickled.

Integrity:

* Every array carries a crc32c of its bytes, dtype and shape; the layout document carries
  a crc32c of itself (canonical JSON: structure, class names, static fields, shapes,
  dtypes and the array checksums). So a flipped bit in a data file, a dtype edited from
  float32 to bfloat16, a QArray's ``bits`` edited from 8 to 4, or a removed checksum is
  caught. A checksum is not a signature: someone who can write the directory can
  recompute it. What makes a hostile checkpoint harmless is the registry above.
* Format 2 checkpoints (``"jaxmem.checkpoint/2"``) differ from format 3 only in the
  QArray layout they hold (packed values as one flat vector, grouped scales of rank + 1, a
  static logical shape): restore converts each such QArray to today's layout (the same
  integers and scales, re-packed along one axis), then places it with the target's or
  ``sharding``'s placement. Saving writes format 3.
* Format 1 checkpoints (written before the registry, ``"jaxmem.checkpoint/1"``) still
  restore (their QArrays converted as for format 2): their classes, spelled
  ``module:Qualname``, are mapped to registered classes (never imported), and each array
  is checked against its 32-bit fingerprint as before.
  Their layout has no checksum, so an edit of a static field (``bits``) or of a
  fingerprint there is not detected.
* Checksums need host bytes: each array is copied to the host once at save and at
  restore (``jax.device_get``; arrays spread over several processes are gathered with
  ``multihost_utils.process_allgather``, whole, on every host).

Safety rules:

* **No silent casts.** If the target's dtype or leaf type differs from what is on disk
  (the classic case: a float checkpoint restored into a quantized model, which Orbax would
  cast f32 -> int8 without quantizing), restore raises a ``ValueError`` naming the path and
  the fix: restore the float tree, then quantize explicitly with ``jaxmem.transform``.
* **No silently wrong params.** A step that fails to read (truncated or missing file, bad
  layout, unregistered type, checksum mismatch) raises :class:`CheckpointCorruptError`
  naming the step and the path when that step was asked for explicitly. When the
  *latest* step is requested (``step=None``), the manager falls back to the newest step
  that restores cleanly and emits a :class:`jaxmem.checkpoint.CheckpointFallbackWarning`
  naming the bad step; a later ``save`` of that step number replaces the bad one. If no
  step restores, :class:`CheckpointCorruptError` lists each step's failure.
* **One writer per directory.** A manager opened for writing holds an exclusive
  ``fcntl.flock`` on ``<directory>/.jaxmem-writer.lock`` (its pid and host written in it)
  until :meth:`CheckpointManager.close`; the OS releases it if the process dies. A second
  writer fails at once with :class:`CheckpointLockedError`. Readers take no lock:
  ``CheckpointManager(directory, read_only=True)``. In a multi-process JAX job only
  process 0 takes the lock. Not enforced on Windows nor for URL directories (``gs://``).
* **Any device count.** Arrays are restored with the sharding you pass (one
  ``jax.sharding.Sharding`` for all, or a function ``(path, ShapeDtypeStruct) -> Sharding``),
  else the target's shardings, else on the first local device. What sharding the
  checkpoint was written with does not matter.

NNX: save ``nnx.to_pure_dict(nnx.state(model))`` (plain nested dicts) and put restored
values back with ``nnx.replace_by_pure_dict``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import pkgutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import (
  QArray,
  check_bits,
  default_pack_axis,
  pack_ints,
  unpack_ints,
  values_per_byte,
)
from jaxmem._src.tree import join_path as _join

try:  # POSIX only; elsewhere the one-writer rule is not enforced (documented above).
  import fcntl
except ImportError:  # pragma: no cover (Windows)
  fcntl = None

PyTree = Any
FORMAT = "jaxmem.checkpoint/3"
FORMAT_V2 = "jaxmem.checkpoint/2"
FORMAT_V1 = "jaxmem.checkpoint/1"
_FORMATS = (FORMAT_V1, FORMAT_V2, FORMAT)

# Fields of the QArray that formats 1 and 2 wrote (before the layout that slices per layer):
# packed values as one flat uint8 vector, grouped scales of rank + 1, a static logical shape.
_LEGACY_QARRAY_FIELDS = {"qvalue", "scale", "bits", "shape", "dtype", "channel_axes",
                         "group_size", "group_axis", "packed", "act_bits"}
_LEGACY_QARRAY_REQUIRED = {"qvalue", "scale", "bits", "shape", "dtype", "channel_axes"}
LOCK_FILE = ".jaxmem-writer.lock"
_STATE = "state"
_LAYOUT = "layout"


class CheckpointCorruptError(ValueError):
  """A checkpoint step could not be read back exactly (missing/truncated file, bad bytes)."""


class CheckpointFallbackWarning(UserWarning):
  """The latest checkpoint step was unreadable; an older step was restored instead."""


class CheckpointLockedError(ValueError):
  """Another :class:`jaxmem.CheckpointManager` has the directory open for writing."""


# ----------------------------------------------------------------------------- type registry

_KIND_WORDS = {"namedtuple": "NamedTuple", "dataclass": "dataclass", "dict": "Mapping"}


@dataclasses.dataclass(frozen=True)
class _Entry:
  name: str  # the stable name written in layouts
  cls: type
  kind: str  # the layout node kind: "namedtuple", "dataclass" or "dict"


class _Registry:
  def __init__(self):
    self.lock = threading.RLock()
    self.by_name: dict[str, _Entry] = {}
    self.by_class: dict[type, _Entry] = {}
    self.legacy: dict[str, str] = {}  # format 1 spelling 'module:Qualname' -> registered name
    self.loaded = False


_REGISTRY = _Registry()

# The classes format 1 wrote for jaxmem's own types, frozen here so that those checkpoints
# keep restoring when a class moves to another module.
_V1_NAMES = {
    "jaxmem._src.qarray:QArray": "jaxmem.QArray",
    "jaxmem._src.sparse:SparseArray": "jaxmem.SparseArray",
    "jaxmem._src.base:EmptyState": "jaxmem.EmptyState",
    "jaxmem._src.gradual:GradualPruneState": "jaxmem.GradualPruneState",
    "jaxmem._src.gradual:KeepMasksState": "jaxmem.KeepMasksState",
    "jaxmem._src.parallel:TrainState": "jaxmem.StepState",
    "jaxmem._src.distill:DistillState": "jaxmem.StepState",
    "jaxmem._src.qat:QATWeights": "jaxmem.QATWeights",
}

# Registered names of jaxmem classes that were merged into another since a checkpoint recorded
# them: NamedTuples whose fields are the same set, restored by field name.
_RENAMED = {
    "jaxmem.TrainState": "jaxmem.StepState",  # fields were (params, opt_state, step)
    "jaxmem.DistillState": "jaxmem.StepState",  # fields were (step, params, opt_state)
}

# Optax namespaces whose NamedTuples are registered (each imported if it exists).
_OPTAX_NAMESPACES = (
    "optax", "optax.transforms", "optax.schedules", "optax.contrib", "optax.experimental",
    "optax.microbatching",
)
# NamedTuples that hold functions, not state.
_NOT_STATE = {("optax._src.base", "GradientTransformation"),
              ("optax._src.base", "GradientTransformationExtraArgs"),
              ("jaxmem._src.base", "ParamTransform")}


def _legacy_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _kind_of(cls: Any) -> str | None:
  """The layout node kind a class is saved as (same order as :func:`_encode`), or None."""
  if not isinstance(cls, type):
    return None
  if issubclass(cls, tuple) and hasattr(cls, "_fields"):
    return "namedtuple"
  if issubclass(cls, Mapping) and cls is not dict:
    return "dict"
  if dataclasses.is_dataclass(cls):
    return "dataclass"
  return None


def _add(cls: type, name: str) -> _Entry:
  reg = _REGISTRY
  kind = _kind_of(cls)
  if kind is None:
    raise TypeError(
        f"register_checkpoint_type: {cls!r} is not a NamedTuple class, a dataclass or a "
        "Mapping subclass; only those can be rebuilt from a checkpoint. Save its arrays in "
        "a dict instead."
    )
  if not isinstance(name, str) or not name or ":" in name or name != name.strip():
    raise ValueError(
        f"register_checkpoint_type: name {name!r} must be a non-empty string without ':' "
        "or surrounding spaces, e.g. 'my_project.EmaState'."
    )
  with reg.lock:
    old = reg.by_name.get(name)
    if old is not None and old.cls is not cls:
      if _legacy_name(old.cls) != _legacy_name(cls):
        raise ValueError(
            f"register_checkpoint_type: the name {name!r} is already registered for "
            f"{_legacy_name(old.cls)}; pass another name=... for {_legacy_name(cls)}."
        )
      del reg.by_class[old.cls]  # the same class defined again (module reload, notebook cell)
    prev = reg.by_class.get(cls)
    if prev is not None and prev.name != name:
      raise ValueError(
          f"register_checkpoint_type: {_legacy_name(cls)} is already registered as "
          f"{prev.name!r}; a class has one checkpoint name. Omit name= or pass {prev.name!r}."
      )
    entry = _Entry(name, cls, kind)
    reg.by_name[name] = entry
    reg.by_class[cls] = entry
    reg.legacy[_legacy_name(cls)] = name
    return entry


def _namedtuples(module: Any, defined_here: bool) -> list[tuple[str, type]]:
  out = []
  for attr, obj in sorted(vars(module).items()):
    if attr.startswith("_") or _kind_of(obj) != "namedtuple":
      continue
    if (obj.__module__, obj.__qualname__) in _NOT_STATE:
      continue
    if defined_here and obj.__module__ != module.__name__:
      continue
    out.append((attr, obj))
  return out


def _load_defaults() -> None:
  """Registers jaxmem's, optax's and the plain container types (once, on first use)."""
  import jaxmem._src as src

  # jaxmem: every NamedTuple state and compressed dataclass in jaxmem._src (the package's
  # own module list, not names from a file), named ``jaxmem.<Class>``.
  for info in sorted(pkgutil.iter_modules(src.__path__), key=lambda i: i.name):
    try:
      module = importlib.import_module(f"{src.__name__}.{info.name}")
    except ImportError:  # an optional dependency of that module is missing
      continue
    for attr, obj in sorted(vars(module).items()):
      if not isinstance(obj, type) or obj.__module__ != module.__name__:
        continue
      state = _kind_of(obj) == "namedtuple" and (obj.__module__, obj.__qualname__) not in _NOT_STATE
      compressed = dataclasses.is_dataclass(obj) and issubclass(obj, tree_lib.Compressed)
      if (state or compressed) and obj not in _REGISTRY.by_class:
        short = f"jaxmem.{obj.__qualname__}"
        _add(obj, short if short not in _REGISTRY.by_name else f"{module.__name__}.{attr}")
  # optax: the public namespaces first (``optax.ScaleByAdamState``), then the NamedTuples
  # of every loaded optax module that no namespace exports (``optax._src.transform.X``).
  for ns in _OPTAX_NAMESPACES:
    try:
      module = importlib.import_module(ns)
    except ImportError:
      continue
    for attr, obj in _namedtuples(module, defined_here=False):
      if obj.__module__.split(".")[0] == "optax" and obj not in _REGISTRY.by_class:
        own = getattr(module, obj.__qualname__, None) is obj
        _add(obj, f"{ns}.{obj.__qualname__ if own else attr}")
  for name in sorted(m for m in sys.modules if m.split(".")[0] == "optax"):
    module = sys.modules.get(name)
    if module is None or name.endswith("_test"):
      continue
    for _, obj in _namedtuples(module, defined_here=True):
      if obj not in _REGISTRY.by_class:
        _add(obj, f"{name}.{obj.__qualname__}")
  _add(collections.OrderedDict, "collections.OrderedDict")
  from jaxmem._src.flax import containers

  for cls, name in containers.CHECKPOINT_TYPES:
    _add(cls, name)
  for old, new in _V1_NAMES.items():
    if new in _REGISTRY.by_name:
      _REGISTRY.legacy.setdefault(old, new)


def _registry() -> _Registry:
  reg = _REGISTRY
  if not reg.loaded:
    with reg.lock:
      if not reg.loaded:
        _load_defaults()
        reg.loaded = True
  return reg


def register_checkpoint_type(cls: type, name: str | None = None) -> type:
  """Lets checkpoints save and restore ``cls`` (a NamedTuple, dataclass or Mapping subclass).

  Restore builds only registered classes, looked up by ``name`` (never by importing a name
  found in a file). jaxmem's own types, optax's states, ``OrderedDict`` and flax's
  ``FrozenDict`` are registered already; saving any other NamedTuple, registered-pytree
  dataclass or Mapping subclass raises a ``TypeError`` until it is registered. Register
  before saving and, in the restoring program, before restoring. The class is called with
  the fields stored in the checkpoint: register only types whose constructor has no side
  effects.

  Args:
    cls: the class. A dataclass must also be a pytree
      (``jax.tree_util.register_dataclass``); its non-array fields are saved in the
      layout (None, bool, int, float, str, tuples/lists of those, dtypes).
    name: the stable name written in layouts (default ``'<module>.<Qualname>'``). Pass one
      (e.g. ``'my_project.EmaState'``) so checkpoints survive moving the class.

  Returns:
    ``cls`` (so it can be used as a decorator).

  Raises:
    TypeError: ``cls`` is not a NamedTuple, dataclass or Mapping subclass.
    ValueError: ``name`` is taken by another class, or ``cls`` has another name already.

  Example:
    >>> import tempfile, typing, jax, jax.numpy as jnp, jaxmem
    >>> class EmaState(typing.NamedTuple):
    ...   ema: jax.Array
    >>> _ = jaxmem.checkpoint.register_checkpoint_type(EmaState, name='docs.EmaState')
    >>> with jaxmem.CheckpointManager(tempfile.mkdtemp(), async_save=False) as mgr:
    ...   _ = mgr.save(0, {'ema': EmaState(jnp.ones(3))})
    ...   type(mgr.restore()['ema']).__name__
    'EmaState'
  """
  _registry()
  return _add(cls, name if name is not None else f"{cls.__module__}.{cls.__qualname__}").cls


def _entry_by_name(name: str, version: str) -> _Entry | None:
  reg = _registry()
  if ":" not in name:
    return reg.by_name.get(_RENAMED.get(name, name))
  if version != FORMAT_V1:  # 'module:Qualname' is format 1's spelling only
    return None
  known = reg.legacy.get(name)
  if known is not None:
    return reg.by_name.get(known)
  # Moved since it was saved (e.g. another optax version): the one registered class of that
  # package and qualified name, if exactly one.
  module, _, qualname = name.partition(":")
  matches = {
      e.cls: e for e in reg.by_name.values()
      if e.cls.__qualname__ == qualname
      and e.cls.__module__.split(".")[0] == module.split(".")[0]
  }
  return next(iter(matches.values())) if len(matches) == 1 else None


# ----------------------------------------------------------------------------- layout


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _where(path: str) -> str:
  return f"'{path}'" if path else "the root"


def _encode_static(v: Any, path: str) -> Any:
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, tuple):
    return {"tuple": [_encode_static(a, path) for a in v]}
  if isinstance(v, list):
    return {"list": [_encode_static(a, path) for a in v]}
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return {"dtype": np.dtype(v).name}
  raise TypeError(
      f"checkpoint: static field at '{path}' has a value of type {type(v).__name__} that the "
      "layout cannot store (supported: None, bool, int, float, str, tuples/lists, dtypes). "
      "Save the array fields separately (e.g. a dict of the arrays you need)."
  )


def _decode_static(v: Any) -> Any:
  """Inverse of :func:`_encode_static` (on a value :func:`_check_static` accepted)."""
  if isinstance(v, dict):
    if "tuple" in v:
      return tuple(_decode_static(a) for a in v["tuple"])
    if "list" in v:
      return [_decode_static(a) for a in v["list"]]
    return np.dtype(v["dtype"])
  return v


def _dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _registered_name(x: Any, path: str, what: str) -> str:
  cls = type(x)
  entry = _registry().by_class.get(cls)
  if entry is None:
    raise TypeError(
        f"checkpoint: {_where(path)} is a {cls.__name__} {what} ({cls.__module__}."
        f"{cls.__qualname__}) that is not registered for checkpoints, so restore could not "
        f"rebuild it. Call jaxmem.checkpoint.register_checkpoint_type({cls.__name__}) once, in "
        "the saving "
        "and in the restoring program, or save its arrays in a plain dict."
    )
  return entry.name


def _encode(x: Any, path: str, arrays: list[tuple[str, Any]]) -> dict:
  """The layout node of ``x``; appends ``(path, array)`` for every array leaf, in order."""
  if x is None:
    return {"kind": "none"}
  if isinstance(x, str):
    return {"kind": "str", "value": x}  # kept in the layout document, not as an array
  if isinstance(x, (bool, int, float)) and not isinstance(x, np.generic):
    arrays.append((path, np.asarray(x)))
    return {"kind": "array", "python": type(x).__name__}
  if _is_array_like(x):
    arrays.append((path, x))
    return {"kind": "array"}
  if _is_namedtuple(x):
    return {
        "kind": "namedtuple",
        "class": _registered_name(x, path, "NamedTuple"),
        "items": [[f, _encode(getattr(x, f), _join(path, f), arrays)] for f in x._fields],
    }
  if isinstance(x, (tuple, list)):
    return {
        "kind": type(x).__name__ if type(x) in (tuple, list) else "tuple",
        "items": [_encode(v, _join(path, i), arrays) for i, v in enumerate(x)],
    }
  if isinstance(x, Mapping):
    items = []
    try:  # jax orders dict entries by sorted key; so does the layout.
      entries = sorted(x.items(), key=lambda kv: kv[0])
    except TypeError:
      entries = list(x.items())
    for k, v in entries:
      if not isinstance(k, (str, int)) or isinstance(k, bool):
        raise TypeError(
            f"checkpoint: dict key {k!r} at '{path}' is a {type(k).__name__}; "
            "only str and int keys can be saved. Convert the keys to strings."
        )
      if isinstance(k, str) and ("/" in k or not k):
        raise TypeError(
            f"checkpoint: dict key {k!r} at '{path}' is empty or contains '/', which the "
            "on-disk layout uses as separator. Rename the key."
        )
      items.append([k, _encode(v, _join(path, k), arrays)])
    if len({str(k) for k, _ in items}) != len(items):
      raise TypeError(
          f"checkpoint: the dict at {_where(path)} has keys that are equal as strings (e.g. "
          "1 and '1'); they would share a path on disk. Rename one of them."
      )
    node = {"kind": "dict", "items": items}
    if type(x) is not dict:
      node["class"] = _registered_name(x, path, "mapping")
    return node
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    children, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # not a registered pytree node
      raise TypeError(
          f"checkpoint: '{path}' is a {type(x).__name__} dataclass that is not a registered "
          "pytree; register it with jax.tree_util.register_dataclass or save its arrays."
      )
    name = _registered_name(x, path, "dataclass")
    data_fields = [p[0].name if isinstance(p[0], jax.tree_util.GetAttrKey) else str(p[0])
                   for p, _ in children]
    static = {}
    for f in dataclasses.fields(x):
      if f.name not in data_fields and f.init:
        static[f.name] = _encode_static(getattr(x, f.name), _join(path, f.name))
    return {
        "kind": "dataclass",
        "class": name,
        "static": static,
        "items": [[f, _encode(getattr(x, f), _join(path, f), arrays)] for f in data_fields],
    }
  raise TypeError(
      f"checkpoint: cannot save '{path}' of type {type(x).__name__}. Supported: arrays, Python "
      "scalars, strings, None, dict/list/tuple, NamedTuples (optax states), registered dataclasses "
      "(jaxmem.QArray and other compressed types). For NNX, save nnx.to_pure_dict(state)."
  )


def _array_nodes(node: dict, path: str = "") -> list[tuple[str, dict]]:
  """``[(path, array node)]`` in tree order."""
  kind = node["kind"]
  if kind == "array":
    return [(path, node)]
  if kind in ("none", "str"):
    return []
  out = []
  if kind in ("list", "tuple"):
    for i, n in enumerate(node["items"]):
      out += _array_nodes(n, _join(path, i))
  else:
    for k, n in node["items"]:
      out += _array_nodes(n, _join(path, k))
  return out


def _stored_dtype(x: Any) -> np.dtype:
  """The dtype ``x`` is written with (NumPy and Python values go through ``jnp.asarray``)."""
  if isinstance(x, (np.ndarray, np.generic)):
    return np.dtype(jax.dtypes.canonicalize_dtype(x.dtype))
  return np.dtype(x.dtype)


def _encode_with_arrays(tree: PyTree) -> tuple[dict, list[tuple[str, Any]]]:
  arrays: list[tuple[str, Any]] = []
  node = _encode(tree, "", arrays)
  for (_, x), (_, n) in zip(arrays, _array_nodes(node), strict=True):
    n["shape"] = list(x.shape)
    n["dtype"] = _dtype_name(_stored_dtype(x))
  return node, arrays


def _nest(items: list[tuple[str, Any]]) -> dict:
  """Plain nested dict from ``[('a/b/c', v)]`` (what Orbax reads and writes)."""
  out: dict = {}
  for path, v in items:
    keys = path.split("/") if path else ["_"]
    d = out
    for k in keys[:-1]:
      d = d.setdefault(k, {})
    d[keys[-1]] = v
  return out


def _flat(nested: dict, paths: list[str]) -> list[Any]:
  out = []
  for path in paths:
    d = nested
    for k in path.split("/") if path else ["_"]:
      d = d[k]
    out.append(d)
  return out


def checkpoint_layout(tree: PyTree) -> dict:
  """The JSON layout document of ``tree`` (structure, static metadata, shapes, dtypes).

  This is what :class:`jaxmem.CheckpointManager` writes next to the arrays (without the
  checksums, which need concrete values). Classes appear by their registered name
  (:func:`jaxmem.checkpoint.register_checkpoint_type`); an unregistered one is a ``TypeError``.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((4, 2))})
    >>> node = jaxmem.checkpoint.checkpoint_layout(q)['tree']['items'][0][1]
    >>> node['class'], node['static']['bits'], node['items'][0][1]['dtype']
    ('jaxmem.QArray', 8, 'int8')
  """
  node, _ = _encode_with_arrays(tree)
  return {"format": FORMAT, "tree": node}


# ----------------------------------------------------------------------------- reading a layout


class _LayoutError(Exception):
  """A layout that cannot be trusted; turned into CheckpointCorruptError with the step."""

  def __init__(self, path: str, msg: str):
    super().__init__(f"layout at '{path}' {msg}" if path else f"the layout {msg}")


def _allowed_dtypes() -> dict[str, bool]:
  """Array dtype names restore accepts -> whether format 1 could write them."""
  names = [
      "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
      "float16", "float32", "float64", "complex64", "complex128", "bfloat16",
  ]
  names += sorted(n for n in dir(jnp) if n.startswith("float8_"))
  out = {n: True for n in names if hasattr(jnp, n) or hasattr(np, n)}
  for n in ("int4", "uint4", "int2", "uint2", "float4_e2m1fn"):  # format 1 could not save these
    if hasattr(jnp, n):
      out[n] = False
  return {n: v for n, v in out.items() if np.dtype(getattr(jnp, n, n)).name == n}


_DTYPES = _allowed_dtypes()
_NODE_KEYS = {
    "none": {"kind"},
    "str": {"kind", "value"},
    "list": {"kind", "items"},
    "tuple": {"kind", "items"},
    "namedtuple": {"kind", "class", "items"},
    "dict": {"kind", "class", "items"},
    "dataclass": {"kind", "class", "static", "items"},
}
_ARRAY_KEYS = {
    FORMAT_V1: {"kind", "shape", "dtype", "python", "fingerprint"},
    FORMAT_V2: {"kind", "shape", "dtype", "python", "crc32c"},
    FORMAT: {"kind", "shape", "dtype", "python", "crc32c"},
}


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _check_static(v: Any, path: str) -> Any:
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, dict) and len(v) == 1:
    (k, inner), = v.items()
    if k in ("tuple", "list") and isinstance(inner, list):
      return {k: [_check_static(a, path) for a in inner]}
    if k == "dtype" and isinstance(inner, str) and inner in _DTYPES:
      return v
  raise _LayoutError(path, f"has a static value {v!r} that no jaxmem version writes")


def _parse_array(node: dict, path: str, version: str) -> dict:
  extra = set(node) - _ARRAY_KEYS[version]
  if extra:
    raise _LayoutError(path, f"has unexpected keys {sorted(extra)} for an array")
  shape, dtype = node.get("shape"), node.get("dtype")
  if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
    raise _LayoutError(path, f"has an invalid shape {shape!r}")
  if not isinstance(dtype, str) or dtype not in _DTYPES or (
      version == FORMAT_V1 and not _DTYPES[dtype]
  ):
    raise _LayoutError(path, f"has a dtype {dtype!r} that jaxmem never writes")
  out = {"kind": "array", "shape": shape, "dtype": dtype}
  py = node.get("python")
  if py is not None:
    if py not in ("int", "float", "bool") or shape:
      raise _LayoutError(path, f"has an invalid Python scalar type {py!r}")
    out["python"] = py
  for key in ("fingerprint", "crc32c"):
    if key in node:
      if not _is_int(node[key]) or not 0 <= node[key] < 2**32:
        raise _LayoutError(path, f"has an invalid {key} {node[key]!r}")
      out[key] = node[key]
  return out


def _resolve(name: Any, kind: str, path: str, version: str) -> _Entry:
  entry = _entry_by_name(name, version) if isinstance(name, str) else None
  if entry is None:
    raise _LayoutError(
        path,
        f"names the type {name!r}, which is not registered for checkpoints. Restore builds "
        "only registered types and imports nothing a checkpoint names. If it is a class "
        "from your own code, call jaxmem.checkpoint.register_checkpoint_type on it before "
        "restoring; "
        "otherwise the layout was edited or is corrupt",
    )
  if entry.kind != kind:
    raise _LayoutError(
        path,
        f"uses {entry.name} (a {_KIND_WORDS[entry.kind]}) as a {kind!r} node; the layout "
        "was edited or is corrupt",
    )
  return entry


def _parse_node(node: Any, path: str, version: str) -> dict:
  """A validated copy of a layout node, class names resolved to registered names."""
  if not isinstance(node, dict):
    raise _LayoutError(path, f"is a {type(node).__name__}, not a layout node")
  kind = node.get("kind")
  if kind == "array":
    return _parse_array(node, path, version)
  if not isinstance(kind, str) or kind not in _NODE_KEYS:
    raise _LayoutError(path, f"has an unknown node kind {kind!r}")
  extra = set(node) - _NODE_KEYS[kind]
  missing = _NODE_KEYS[kind] - set(node) - ({"class"} if kind == "dict" else set())
  if extra or missing:
    raise _LayoutError(path, f"is a {kind!r} node with keys {sorted(node)}")
  if kind == "none":
    return {"kind": "none"}
  if kind == "str":
    if not isinstance(node["value"], str):
      raise _LayoutError(path, "is a 'str' node without a string value")
    return {"kind": "str", "value": node["value"]}
  items = node["items"]
  if not isinstance(items, list):
    raise _LayoutError(path, "has no list of items")
  if kind in ("list", "tuple"):
    return {"kind": kind, "items": [_parse_node(n, _join(path, i), version)
                                    for i, n in enumerate(items)]}
  pairs = []
  for item in items:
    ok = isinstance(item, list) and len(item) == 2
    key = item[0] if ok else None
    if not ok or not (_is_int(key) or (isinstance(key, str) and key and "/" not in key)):
      raise _LayoutError(path, f"has an invalid entry {str(item)[:80]}")
    if kind != "dict" and not isinstance(key, str):
      raise _LayoutError(path, f"has a field named {key!r}")
    pairs.append([key, _parse_node(item[1], _join(path, key), version)])
  if len({str(k) for k, _ in pairs}) != len(pairs):
    raise _LayoutError(path, "has duplicate keys")
  out: dict = {"kind": kind}
  if kind != "dict" or "class" in node:
    entry = _resolve(node["class"], kind, path, version)
    out["class"] = entry.name
    fields = [k for k, _ in pairs]
    renamed = node["class"] in _RENAMED  # its fields are matched by name, see _reorder
    same = sorted if renamed else tuple
    if kind == "namedtuple" and same(fields) != same(entry.cls._fields):
      raise _LayoutError(
          path, f"lists the fields {fields}, but {entry.name} has {list(entry.cls._fields)}"
      )
    if renamed:
      out["renamed"] = True
    if kind == "dataclass":
      static = node["static"]
      if not isinstance(static, dict):
        raise _LayoutError(path, "has no dict of static fields")
      out["static"] = {k: _check_static(v, _join(path, k)) for k, v in static.items()}
      init = {f.name for f in dataclasses.fields(entry.cls) if f.init}
      required = {
          f.name for f in dataclasses.fields(entry.cls)
          if f.init and f.default is dataclasses.MISSING
          and f.default_factory is dataclasses.MISSING
      }
      if entry.name == "jaxmem.QArray" and version != FORMAT:  # converted in _decode
        init, required = _LEGACY_QARRAY_FIELDS, _LEGACY_QARRAY_REQUIRED
        out["legacy"] = True
      names = fields + list(static)
      if len(set(names)) != len(names) or not required <= set(names) <= init:
        raise _LayoutError(
            path, f"lists the fields {sorted(names)}, but {entry.name} takes {sorted(init)}"
        )
  out["items"] = pairs
  return out


def _canonical_json(doc: dict) -> bytes:
  return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _layout_crc32c(doc: dict) -> int:
  """crc32c of the canonical JSON of the layout document without its own checksum."""
  return google_crc32c.value(_canonical_json({k: v for k, v in doc.items() if k != "crc32c"}))


@dataclasses.dataclass(frozen=True)
class _Layout:
  version: str
  tree: dict  # validated, class names resolved to registered names
  paths: list[str]


def _reorder(node: dict) -> dict:
  """The parsed tree with each renamed NamedTuple's fields in its current class's order."""
  if node["kind"] in ("array", "none", "str"):
    return node
  items = node["items"]
  if node["kind"] in ("list", "tuple"):
    return {**node, "items": [_reorder(n) for n in items]}
  items = [[k, _reorder(n)] for k, n in items]
  if node.get("renamed"):
    by_name = dict(items)
    items = [[f, by_name[f]] for f in _registry().by_name[node["class"]].cls._fields]
  return {**node, "items": items}


def _parse_layout(doc: Any) -> _Layout:
  if not isinstance(doc, dict) or doc.get("format") not in _FORMATS:
    fmt = doc.get("format") if isinstance(doc, dict) else None
    raise _LayoutError(
        "", f"is not a jaxmem layout document (format {fmt!r}; written by another tool?). "
        "Read it with orbax.checkpoint directly"
    )
  version = doc["format"]
  allowed = {"format", "paths", "tree"} | ({"crc32c"} if version != FORMAT_V1 else set())
  if set(doc) != allowed:
    raise _LayoutError("", f"has the top-level keys {sorted(doc)}; expected {sorted(allowed)}")
  if version != FORMAT_V1 and doc["crc32c"] != _layout_crc32c(doc):
    raise _LayoutError(
        "", "does not match its crc32c checksum: the layout file was edited or is corrupt"
    )
  tree = _parse_node(doc["tree"], "", version)
  paths = [p for p, _ in _array_nodes(tree)]
  if doc["paths"] != paths:
    raise _LayoutError("", "lists array paths that differ from its tree")
  tree = _reorder(tree)
  paths = [p for p, _ in _array_nodes(tree)]
  keys = set()
  for p in paths:
    if p in keys or any(p.startswith(q + "/") for q in keys if q):
      raise _LayoutError(p, "collides with another array's path")
    keys.add(p)
  return _Layout(version, tree, paths)


def _construct(cls: type, path: str, name: str, *args: Any, **kwargs: Any) -> Any:
  try:
    return cls(*args, **kwargs)
  except Exception as e:  # whatever a registered constructor rejects
    raise _LayoutError(path, f"cannot be rebuilt as {name} ({type(e).__name__}: {e})") from e


def _decode(node: dict, path: str, arrays: Any) -> Any:
  """Inverse of :func:`_encode` on a parsed layout; consumes ``arrays`` in tree order."""
  kind = node["kind"]
  if kind == "none":
    return None
  if kind == "str":
    return node["value"]
  if kind == "array":
    x = next(arrays)
    py = node.get("python")
    if py is not None and not isinstance(x, jax.ShapeDtypeStruct):
      return {"int": int, "float": float, "bool": bool}[py](np.asarray(x).item())
    return x
  if kind in ("list", "tuple"):
    vals = [_decode(n, _join(path, i), arrays) for i, n in enumerate(node["items"])]
    return vals if kind == "list" else tuple(vals)
  vals = {k: _decode(n, _join(path, k), arrays) for k, n in node["items"]}
  if kind == "dict" and "class" not in node:
    return vals
  entry = _registry().by_name[node["class"]]
  if kind == "dict":
    return _construct(entry.cls, path, entry.name, vals)
  if kind == "dataclass":
    vals.update({k: _decode_static(v) for k, v in node["static"].items()})
  if node.get("legacy"):
    return _legacy_qarray(path, **vals)
  return _construct(entry.cls, path, entry.name, **vals)


def _placement(path: str, sds: jax.ShapeDtypeStruct, sharding, target_leaf):
  """Where an array restores: the one ``sharding``, ``sharding(path, sds)``, the target
  leaf's sharding, else None (the first local device)."""
  if isinstance(sharding, jax.sharding.Sharding):
    return sharding
  if callable(sharding):
    return sharding(path, sds)
  return getattr(target_leaf, "sharding", None)


def _has_legacy(node: dict) -> bool:
  if node.get("legacy"):
    return True
  if node["kind"] in ("list", "tuple"):
    return any(_has_legacy(n) for n in node["items"])
  if node["kind"] in ("dict", "namedtuple", "dataclass"):
    return any(_has_legacy(n) for _, n in node["items"])
  return False


def _legacy_qarray(path, qvalue, scale, bits, shape, dtype, channel_axes, group_size=None,
                   group_axis=0, packed=False, act_bits=None) -> QArray:
  """A QArray saved by formats 1/2 in today's layout (values re-packed along one axis).

  The integer values and scales are the same numbers, so it dequantizes to exactly what
  was saved. Abstract leaves (``abstract_state``) convert abstractly.
  """
  try:
    shape = tuple(int(d) for d in shape)
    check_bits(bits, "restore")
    channel = tuple(int(a) for a in channel_axes)
    n = math.prod(shape)
    per = values_per_byte(bits)
    want_q = ((-(-n // per),) if packed else shape)
    if tuple(qvalue.shape) != want_q:
      raise ValueError(f"values of shape {tuple(qvalue.shape)}, expected {want_q}")
    sshape = tuple(
        d if a in channel else d // group_size if group_size and a == group_axis else 1
        for a, d in enumerate(shape)
    )
    old_sshape = sshape if not group_size else (
        sshape[:group_axis] + (sshape[group_axis], 1) + sshape[group_axis + 1:])
    if tuple(scale.shape) != old_sshape:
      raise ValueError(f"scales of shape {tuple(scale.shape)}, expected {old_sshape}")
  except (ValueError, TypeError, ZeroDivisionError) as e:
    raise _LayoutError(path, f"is a format-1/2 QArray that does not convert ({e})") from None
  axis = None
  if packed:  # where jaxmem.ops.quantize packs this layout today
    axis = default_pack_axis(shape, bits, channel, group_axis if group_size else None)

  def convert(qvalue, scale):
    ints = unpack_ints(qvalue, bits, -1, size=n).reshape(shape) if packed else qvalue
    qv = pack_ints(ints, bits, axis) if axis is not None else ints
    return qv, scale.reshape(sshape)

  if isinstance(qvalue, jax.ShapeDtypeStruct):
    qv, sc = jax.eval_shape(convert, qvalue, scale)
  else:
    qv, sc = convert(qvalue, scale)
  return QArray(
      qvalue=qv, scale=sc, bits=bits, dtype=np.dtype(dtype),
      pack_axis=None if axis is None else axis - len(shape), act_bits=act_bits,
  )


# ----------------------------------------------------------------------------- checksums


def _host_arrays(xs: list[Any]) -> list[np.ndarray]:
  """The full arrays on this host (gathered from all processes when one spans several).

  One ``jax.device_get`` for all of them, so the device-to-host copies overlap.
  """
  from jax.experimental import multihost_utils

  xs = [
      multihost_utils.process_allgather(x, tiled=True)
      if isinstance(x, jax.Array) and not x.is_fully_addressable else x
      for x in xs
  ]
  return [np.asarray(a) for a in jax.device_get(xs)]


def _array_crc32c(a: np.ndarray) -> int:
  """crc32c of an array's dtype, shape and C-order bytes."""
  a = np.ascontiguousarray(a)
  header = f"{a.dtype.name}{list(a.shape)}".encode()
  return google_crc32c.extend(google_crc32c.value(header), a.reshape(-1).view(np.uint8))


def _fingerprint(x: jax.Array) -> jax.Array:
  """Format 1's uint32 checksum: sum of (word * odd position weight) mod 2**32.

  Only used to verify format 1 checkpoints. (It is weak: every constant array of 65536
  or more elements has the fingerprint 0, which is why format 2 uses crc32c.)
  """
  if x.dtype == jnp.bool_ or np.dtype(x.dtype).itemsize * 8 < 8:
    x = x.astype(jnp.uint8)
  bits = np.dtype(x.dtype).itemsize * 8
  if bits == 64:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    u = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits])
  u = u.reshape(-1).astype(jnp.uint32)
  w = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  u = u ^ (u >> jnp.uint32(16))
  return jnp.sum(u * w, dtype=jnp.uint32)


_fingerprints = jax.jit(lambda xs: [_fingerprint(x) for x in xs])


def abstract_target(tx: base.ParamTransform, params: PyTree) -> PyTree:
  """The abstract result of ``jaxmem.transform(tx, params)``, computed without any FLOPs.

  ``params`` may be concrete float params or their abstract form (e.g. from
  ``jax.eval_shape(model.init, ...)``). The result (``ShapeDtypeStruct`` leaves inside
  QArrays etc.) is a restore target for a checkpoint of transformed params.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> abstract = {'kernel': jax.ShapeDtypeStruct((256, 64), jnp.float32)}
    >>> t = jaxmem.checkpoint.abstract_target(jaxmem.quantize_int8(), abstract)
    >>> t['kernel'].qvalue.dtype, t['kernel'].scale.shape
    (dtype('int8'), (1, 64))
  """
  return jax.eval_shape(lambda p: base.transform(tx, p), params)


def _describe(node: dict) -> str:
  kind = node["kind"]
  if kind == "array":
    return f"{node.get('dtype')}{tuple(node.get('shape', ()))} array"
  if kind in ("dataclass", "namedtuple") or "class" in node:
    return node["class"].rsplit(".", 1)[-1]
  return kind


def _check_compatible(saved: dict, want: dict, path: str) -> None:
  """Raises a ValueError naming the first place ``want`` (the target) differs from disk."""
  where = _where(path)
  sk, wk = saved["kind"], want["kind"]
  if sk == "array" and wk == "dataclass":
    raise ValueError(
        f"restore: {where} is a {_describe(saved)} in the checkpoint but a {_describe(want)} in "
        "the target. Orbax would cast the stored values into the target's dtype without "
        "quantizing them. Restore the float tree first (target=None), then quantize "
        "explicitly: params = jaxmem.transform(jaxmem.quantize_int8(), restored_params)."
    )
  if sk == "dataclass" and wk == "array":
    raise ValueError(
        f"restore: {where} is a {_describe(saved)} in the checkpoint but a {_describe(want)} in "
        "the target. Restore with target=None to get the compressed value back, then convert "
        "explicitly (e.g. jaxmem.transform(jaxmem.dequantize_params(), restored))."
    )
  if sk != wk or saved.get("class") != want.get("class"):
    raise ValueError(
        f"restore: {where} is a {_describe(saved)} in the checkpoint but a {_describe(want)} in "
        "the target. Restore with target=None to get what was saved."
    )
  if sk == "array":
    s_dtype = _dtype_name(jax.dtypes.canonicalize_dtype(saved["dtype"]))
    if s_dtype != want["dtype"]:
      raise ValueError(
          f"restore: {where} is stored as {saved['dtype']} but the target asks for "
          f"{want['dtype']}; Orbax would cast silently. Restore with the stored dtype "
          "(target=None) and convert explicitly (astype, or a jaxmem transform)."
      )
    if list(saved["shape"]) != list(want["shape"]):
      raise ValueError(
          f"restore: {where} has shape {tuple(saved['shape'])} in the checkpoint but "
          f"{tuple(want['shape'])} in the target. Build the target from the same model config."
      )
    return
  if sk == "dataclass" and saved["static"] != want["static"]:
    raise ValueError(
        f"restore: {where} is a {_describe(saved)} with {saved['static']} in the checkpoint but "
        f"{want['static']} in the target (e.g. a different bit width). Restore with "
        "target=None, or build the target with the same transform as the saved params."
    )
  if sk in ("none", "str"):
    return
  if sk in ("list", "tuple"):
    s_items = list(enumerate(saved["items"]))
    w_items = list(enumerate(want["items"]))
  else:
    s_items, w_items = saved["items"], want["items"]
  s_keys, w_keys = [k for k, _ in s_items], [k for k, _ in w_items]
  if s_keys != w_keys:
    only_s = [k for k in s_keys if k not in w_keys][:5]
    only_w = [k for k in w_keys if k not in s_keys][:5]
    raise ValueError(
        f"restore: the target differs from the checkpoint at {where}: keys only in the "
        f"checkpoint: {only_s}; only in the target: {only_w}. Restore with target=None to "
        "see what was saved, or build the target from the same model and transforms."
    )
  for (k, s), (_, w) in zip(s_items, w_items, strict=True):
    _check_compatible(s, w, _join(path, k))


# ----------------------------------------------------------------------------- writer lock


class _WriterLock:
  """An exclusive ``flock`` on ``<directory>/.jaxmem-writer.lock`` holding the owner's pid/host."""

  def __init__(self, directory: str):
    self.path = os.path.join(directory, LOCK_FILE)
    self._fd: int | None = None
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise CheckpointLockedError(self._held_message(directory)) from None
    except BaseException:
      os.close(fd)
      raise
    os.ftruncate(fd, 0)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.write(fd, (json.dumps(info) + "\n").encode())
    self._fd = fd

  def _held_message(self, directory: str) -> str:
    try:
      with open(self.path) as f:
        info = json.loads(f.read() or "{}")
    except (OSError, ValueError):
      info = {}
    pid, host = info.get("pid", "?"), info.get("host", "?")
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    who = f"pid {pid} on host {host!r}{when}"
    if pid == os.getpid() and host == socket.gethostname():
      who = f"another CheckpointManager in this process ({who}); close() it first"
    return (
        f"CheckpointManager: {directory} is already open for writing by {who}. One writer "
        "per directory: wait for that run to finish or stop it, or write to another "
        "directory; to only read checkpoints, open it with "
        "CheckpointManager(directory, read_only=True), which takes no lock."
    )

  def release(self) -> None:
    fd, self._fd = self._fd, None
    if fd is not None:
      try:
        os.ftruncate(fd, 0)
      finally:
        os.close(fd)  # closing the descriptor releases the flock

  def __del__(self):  # a manager dropped without close() (the OS also releases it at exit)
    try:
      self.release()
    except Exception:
      pass


# ----------------------------------------------------------------------------- manager

ShardingSpec = None | jax.sharding.Sharding | Callable[[str, jax.ShapeDtypeStruct], Any]


def _tracer_type() -> type:
  tracer = getattr(jax.core, "Tracer", None)
  if tracer is None:  # pragma: no cover (if a future JAX drops the public alias)
    from jax._src import core

    tracer = core.Tracer
  return tracer


def _not_read_only_notice(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice(read_only: bool):
  """Drops the notice Orbax logs for every read-only manager (read_only is what was asked)."""
  if not read_only:
    yield
    return
  logger = logging.getLogger("absl")
  logger.addFilter(_not_read_only_notice)
  try:
    yield
  finally:
    logger.removeFilter(_not_read_only_notice)


class CheckpointManager:
  """Saves and restores pytrees of (compressed) params and training state with Orbax.

  Args:
    directory: where steps are written (``directory/<step>/{state,layout}``).
    max_to_keep: how many recent steps to keep (None keeps all).
    save_interval_steps: ``save`` only writes steps divisible by this (unless ``force``).
    async_save: write in a background thread (call :meth:`wait_until_finished` or
      :meth:`close` before reading the files from another process).
    verify: check every restored array against the checksum stored at save time (a
      missing checksum is then corrupt). Checksums are always written.
    read_only: only read: takes no lock (any number of readers, also while a writer
      runs), creates nothing, never deletes; :meth:`save` raises.

  Raises:
    CheckpointLockedError: another manager (this or another process) has ``directory``
      open for writing; the message names its pid and host.
    FileNotFoundError: ``read_only`` and ``directory`` does not exist.

  Example:
    >>> import tempfile, jax.numpy as jnp, jaxmem
    >>> params = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((8, 4))})
    >>> workdir = tempfile.mkdtemp()
    >>> with jaxmem.CheckpointManager(workdir, max_to_keep=2) as mgr:
    ...   _ = mgr.save(0, {'params': params})
    ...   mgr.wait_until_finished()
    ...   restored = mgr.restore()
    >>> restored['params']['kernel'].qvalue.dtype
    dtype('int8')
    >>> with jaxmem.CheckpointManager(workdir, read_only=True) as reader:
    ...   reader.all_steps()
    [0]
  """

  def __init__(
      self,
      directory: str,
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
      verify: bool = True,
      read_only: bool = False,
  ):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = str(directory)
    self.verify = verify
    self.read_only = bool(read_only)
    self._bad_steps: set[int] = set()
    self._max_to_keep = None if read_only else max_to_keep
    self._lock: _WriterLock | None = None
    self._closed = False
    local = "://" not in self.directory
    if read_only:
      if local and not os.path.isdir(self.directory):
        raise FileNotFoundError(
            f"CheckpointManager: {self.directory} does not exist (read_only=True creates "
            "nothing); check the path."
        )
    else:
      if local:
        os.makedirs(self.directory, exist_ok=True)
      if local and fcntl is not None and jax.process_index() == 0:
        self._lock = _WriterLock(self.directory)
    try:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self._max_to_keep,
          save_interval_steps=0 if read_only else save_interval_steps,
          enable_async_checkpointing=async_save,
          create=not read_only,
          read_only=self.read_only,
      )
      with _quiet_read_only_notice(read_only):
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _LAYOUT)
        )
    except BaseException:
      if self._lock is not None:
        self._lock.release()
      raise

  # -- context manager
  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Waits for pending saves, releases Orbax's resources and the writer lock."""
    if self._closed:
      return
    try:
      self.wait_until_finished()
      self._manager.close()
    finally:
      self._closed = True
      if self._lock is not None:
        self._lock.release()

  def wait_until_finished(self) -> None:
    """Blocks until every started save is on disk, then trims to ``max_to_keep`` steps.

    (While an async save is in flight, one extra older step stays on disk, so a
    crash mid-save always leaves ``max_to_keep`` complete steps.)
    """
    self._manager.wait_until_finished()
    if self._max_to_keep is not None and not self.read_only:
      steps = self.all_steps()
      for s in steps[: max(len(steps) - self._max_to_keep, 0)]:
        self._manager.delete(s)

  def all_steps(self) -> list[int]:
    """Completed steps, ascending (read from disk when the manager was created, then tracked).

    Steps written by another process after this manager was created are not listed;
    create a new manager to see them.
    """
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest completed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """Whether ``save(step)`` would write (interval policy, step not already saved)."""
    return not self.read_only and self._manager.should_save(step)

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Starts saving ``state`` (any pytree of arrays and compressed values) as ``step``.

    Returns True if a save was started (False when the interval policy skips ``step``).
    With ``async_save`` the arrays are copied off-device before this returns; writing
    continues in the background. Call it outside ``jax.jit``, on concrete arrays.

    Raises:
      TypeError: a node the layout cannot describe, a class that is not registered
        (:func:`jaxmem.checkpoint.register_checkpoint_type`), or a traced/abstract array;
        the message names its path.
      ValueError: ``step`` already exists (and was not found corrupt by a restore), or the
        manager is ``read_only``.
    """
    tracer = _tracer_type()
    if isinstance(step, tracer):
      raise TypeError(
          "CheckpointManager.save: `step` is a traced value (save was called inside jax.jit "
          "or another transformation). Call save outside jit, with a Python int step and "
          "concrete arrays (return the state from the jitted function, then save it)."
      )
    if self.read_only:
      raise ValueError(
          f"CheckpointManager.save: {self.directory} was opened with read_only=True. Open "
          "it without read_only to save (one writer per directory)."
      )
    step = int(step)
    node, arrays = _encode_with_arrays(state)
    for path, x in arrays:
      if isinstance(x, tracer):
        raise TypeError(
            f"CheckpointManager.save: {_where(path)} is a traced value (save was called "
            "inside jax.jit or another transformation). Call save outside jit, with concrete "
            "arrays: return the state from the jitted function, then save it."
        )
      if isinstance(x, jax.ShapeDtypeStruct):
        raise TypeError(
            f"CheckpointManager.save: {_where(path)} is an abstract ShapeDtypeStruct, which "
            "has no values to write. Save concrete arrays."
        )
    if len({p for p, _ in arrays}) != len(arrays):
      raise TypeError("CheckpointManager.save: two arrays of the tree share one path.")
    if step in self._bad_steps and step in self.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
      self._bad_steps.discard(step)
    elif step in self.all_steps():
      raise ValueError(
          f"CheckpointManager.save: step {step} already exists in {self.directory}; "
          "save each step once (resume from latest_step() + 1)."
      )
    if not force and not self._manager.should_save(step):
      return False
    if not arrays:
      raise ValueError("CheckpointManager.save: the tree holds no arrays; nothing to save.")
    values = [jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x for _, x in arrays]
    for (_, n), a in zip(_array_nodes(node), _host_arrays(values), strict=True):
      n["dtype"], n["shape"] = a.dtype.name, list(a.shape)
      n["crc32c"] = _array_crc32c(a)
    # Orbax cannot write zero-size arrays (e.g. the index of a SparseArray with no nonzero):
    # the layout already holds their shape, dtype and checksum, which is all of their content.
    plain = _nest([(p, v) for (p, _), v in zip(arrays, values, strict=True) if v.size])
    layout = {"format": FORMAT, "paths": [p for p, _ in arrays], "tree": node}
    layout["crc32c"] = _layout_crc32c(layout)
    ocp = self._ocp
    return bool(
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(plain), _LAYOUT: ocp.args.JsonSave(layout)}
            ),
            force=force,
        )
    )

  def _corrupt(self, step: int, detail: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"checkpoint step {step} in {self.directory}: {detail}")

  def _check_step(self, step: int | None) -> int:
    """``step`` (default: latest) if it exists, else FileNotFoundError listing the steps."""
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint steps in {self.directory}.")
      return steps[-1]
    step = int(step)
    if step not in steps and not os.path.isdir(os.path.join(self.directory, str(step))):
      raise FileNotFoundError(
          f"checkpoint step {step} does not exist in {self.directory}; the steps there are "
          f"{steps}."
      )
    return step

  def _read(self, step: int) -> tuple[dict, _Layout]:
    try:
      out = self._manager.restore(
          step, args=self._ocp.args.Composite(**{_LAYOUT: self._ocp.args.JsonRestore()})
      )
      doc = out[_LAYOUT]
    except Exception as e:  # Orbax/tensorstore raise many types for unreadable files.
      raise self._corrupt(step, f"the layout file cannot be read ({e}).") from e
    try:
      return doc, _parse_layout(doc)
    except _LayoutError as e:
      raise self._corrupt(step, f"{e}.") from None
    except Exception as e:  # a malformed document that slipped past the checks above
      raise self._corrupt(step, f"the layout is malformed ({type(e).__name__}: {e}).") from e

  def read_layout(self, step: int | None = None) -> dict:
    """The JSON layout document of a step (default: latest), after checking it.

    Raises:
      CheckpointCorruptError: the layout is unreadable, fails its checksum or names an
        unregistered type.
      FileNotFoundError: the step does not exist (the message lists the steps that do).
    """
    return self._read(self._check_step(step))[0]

  def abstract_state(self, step: int | None = None) -> PyTree:
    """The saved tree with ``ShapeDtypeStruct`` leaves (QArrays etc. rebuilt); no array reads.

    Handy to inspect a checkpoint (``jaxmem.memory_report(mgr.abstract_state())``).
    """
    step = self._check_step(step)
    layout = self._read(step)[1]
    nodes = _array_nodes(layout.tree)
    sds = iter([jax.ShapeDtypeStruct(tuple(n["shape"]), np.dtype(n["dtype"])) for _, n in nodes])
    return self._decode(step, layout.tree, sds)

  def restore(
      self,
      step: int | None = None,
      *,
      target: PyTree | None = None,
      sharding: ShardingSpec = None,
  ) -> PyTree:
    """Restores a step; the tree (QArrays, optax states, ...) comes back as it was saved.

    Args:
      step: the step to restore; None: the latest step that reads back cleanly (an
        unreadable newer step is skipped with a
        :class:`jaxmem.checkpoint.CheckpointFallbackWarning`).
      target: optional tree of the expected structure (concrete or abstract, e.g.
        :func:`jaxmem.checkpoint.abstract_target`); it must match the checkpoint exactly in
        structure, leaf types and dtypes, and its arrays' shardings are used.
      sharding: a ``jax.sharding.Sharding`` for every array, or a function
        ``(path, ShapeDtypeStruct) -> Sharding`` (paths like ``params/Dense_0/kernel/qvalue``);
        default: the target's shardings, else the first local device.

    Raises:
      ValueError: the target differs from the checkpoint (e.g. a float checkpoint into
        a quantized target); the message says how to convert explicitly.
      CheckpointCorruptError: the step (or every step, when ``step=None``) is unreadable.
      FileNotFoundError: no steps exist, or ``step`` does not (the message lists them).
    """
    if step is not None:
      return self._restore_step(self._check_step(step), target, sharding)
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint steps in {self.directory}.")
    failures = []
    for s in reversed(steps):
      try:
        out = self._restore_step(s, target, sharding)
      except CheckpointCorruptError as e:
        failures.append(f"step {s}: {e}")
        self._bad_steps.add(s)
        continue
      if failures:
        warnings.warn(
            CheckpointFallbackWarning(
                f"restored step {s} from {self.directory} because newer steps are unreadable: "
                + "; ".join(failures)
            ),
            stacklevel=2,
        )
      return out
    raise CheckpointCorruptError(
        f"no readable checkpoint step in {self.directory}: " + "; ".join(failures)
    )

  def _restore_step(self, step: int, target: PyTree | None, sharding: ShardingSpec) -> PyTree:
    layout = self._read(step)[1]
    if _has_legacy(layout.tree):
      return self._restore_legacy(step, layout, target, sharding)
    nodes = _array_nodes(layout.tree)
    target_arrays: list[Any] = [None] * len(nodes)
    if target is not None:
      want, t_arrays = _encode_with_arrays(target)
      _check_compatible(layout.tree, want, "")
      target_arrays = [x for _, x in t_arrays]
    shardings = [
        _placement(path, jax.ShapeDtypeStruct(tuple(n["shape"]), np.dtype(n["dtype"])),
                   sharding, t)
        for (path, n), t in zip(nodes, target_arrays, strict=True)
    ]
    return self._read_arrays(step, layout, shardings)

  def _restore_legacy(self, step: int, layout: _Layout, target, sharding) -> PyTree:
    """A format 1/2 step holding QArrays of the old layout: read, convert, then place.

    The on-disk arrays are read onto one device (or the single ``sharding`` given), the
    QArrays converted to today's layout, the result checked against ``target``, and each
    leaf put on the target's / ``sharding``'s placement by its path in today's layout.
    """
    single = sharding if isinstance(sharding, jax.sharding.Sharding) else None
    out = self._read_arrays(step, layout, [single] * len(layout.paths))
    node, leaves = _encode_with_arrays(out)
    t_leaves = [None] * len(leaves)
    if target is not None:
      want, t_leaves = _encode_with_arrays(target)
      _check_compatible(node, want, "")
    if single is not None or (sharding is None and target is None):
      return out
    placed = [
        jax.device_put(x, _placement(path, jax.ShapeDtypeStruct(x.shape, x.dtype), sharding, t))
        if isinstance(x, jax.Array) else x
        for (path, x), (_, t) in zip(leaves, t_leaves, strict=True)
    ]
    return _decode(_parse_node(node, "", FORMAT), "", iter(placed))

  def _read_arrays(self, step: int, layout: _Layout, shardings: list) -> PyTree:
    """Reads every array of ``layout`` (one sharding each; None: the first local device),
    verifies the checksums and rebuilds the tree."""
    nodes = _array_nodes(layout.tree)
    default_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = [
        jax.ShapeDtypeStruct(tuple(n["shape"]), np.dtype(n["dtype"]), sharding=sh or default_device)
        for (_, n), sh in zip(nodes, shardings, strict=True)
    ]
    ocp = self._ocp
    stored = [(p, a) for p, a in zip(layout.paths, abstract, strict=True) if a.size]
    try:
      out = self._manager.restore(
          step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(_nest(stored))}))
      read = iter(_flat(out[_STATE], [p for p, _ in stored]))
      # Zero-size arrays are not on disk (see save): their layout entry is their content.
      values = [next(read) if a.size else jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
                for a in abstract]
    except Exception as e:  # tensorstore/Orbax raise many types for truncated or missing data.
      raise self._corrupt(step, f"cannot be read ({type(e).__name__}: {e}).") from e
    if self.verify:
      self._verify(step, layout, nodes, values)
    return self._decode(step, layout.tree, iter(values))

  def _decode(self, step: int, tree: dict, arrays: Any) -> PyTree:
    try:
      return _decode(tree, "", arrays)
    except _LayoutError as e:
      raise self._corrupt(step, f"{e}.") from None
    except Exception as e:  # defensive: any other decoding failure is a bad step too
      raise self._corrupt(step, f"the tree cannot be rebuilt ({type(e).__name__}: {e}).") from e

  def _verify(self, step: int, layout: _Layout, nodes: list, values: list) -> None:
    """Checks every restored array against its checksum (``verify=True``)."""
    key = "fingerprint" if layout.version == FORMAT_V1 else "crc32c"
    for path, n in nodes:
      if key not in n:
        hint = (
            " (format 1 wrote none when saving with verify=False; if this step was saved "
            "that way, a manager opened with verify=False restores it unverified)"
            if layout.version == FORMAT_V1 else ""
        )
        raise self._corrupt(
            step, f"array '{path}' has no {key} in the layout, so it cannot be verified{hint}."
        )
    if layout.version == FORMAT_V1:
      try:
        prints = [int(p) for p in _fingerprints(values)]
      except Exception as e:  # e.g. a dtype edited into one format 1 never wrote
        raise self._corrupt(step, f"the arrays cannot be fingerprinted ({e}).") from e
      for (path, n), fp in zip(nodes, prints, strict=True):
        if fp != n["fingerprint"]:
          raise self._corrupt(
              step, f"array '{path}' does not match the fingerprint written at save time "
              "(the data files are corrupt)."
          )
      return
    for (path, n), a in zip(nodes, _host_arrays(values), strict=True):
      if a.dtype.name != n["dtype"] or list(a.shape) != n["shape"]:
        raise self._corrupt(
            step, f"array '{path}' was read back as {a.dtype.name}{list(a.shape)}, but the "
            f"layout says {n['dtype']}{n['shape']}."
        )
      if _array_crc32c(a) != n["crc32c"]:
        raise self._corrupt(
            step, f"array '{path}' does not match its crc32c checksum written at save time "
            "(the data files are corrupt)."
        )
