"""Checkpoints of anything jaxmem produces, through Orbax, with restore targets built for you.

:class:`CheckpointManager` wraps ``orbax.checkpoint.CheckpointManager`` (async saves,
``max_to_keep``). Each step stores two Orbax items:

* ``state``: the arrays, as a plain nested dict saved with ``StandardSave``. Every array
  keeps its dtype: a :class:`jaxmem.QArray`'s int8 (or packed uint8) ``qvalue`` stays int8
  on disk next to its float32 ``scale``; no float copy of a compressed leaf is written.
  Keys follow the tree: ``params/Dense_0/kernel/qvalue``; tuple and list entries are
  named by their index, NamedTuple and dataclass fields by their name.
* ``layout``: a JSON document (format ``"jaxmem.checkpoint/1"``) holding the full tree
  structure: container kinds (dict, list, tuple, NamedTuple class, dataclass class such
  as ``jaxmem._src.qarray:QArray`` with its static fields like ``bits``, ``shape``,
  ``packed``), and for each array its shape, dtype and a 32-bit fingerprint of its bytes.

On restore the layout gives the abstract target, so users never hand-build one: a
checkpoint of int8 params restores as QArrays, an optimizer state as the optax
NamedTuples it was, gradual-pruning masks as the masks they were. A target can still be
given (e.g. ``abstract_target(tx, params)``); it is checked against the layout first.

Safety rules:

* **No silent casts.** If the target's dtype or leaf type differs from what is on disk
  (the classic case: a float checkpoint restored into a quantized model, which Orbax would
  cast f32 -> int8 without quantizing), restore raises a ``ValueError`` naming the path and
  the fix: restore the float tree, then quantize explicitly with ``jaxmem.transform``.
* **No silently wrong params.** Every restored array is checked against its fingerprint.
  A step that fails to read (truncated or missing file, bad layout, fingerprint mismatch)
  raises :class:`CheckpointCorruptError` when that step was asked for explicitly. When the
  *latest* step is requested (``step=None``), the manager falls back to the newest step
  that restores cleanly and emits a :class:`CheckpointFallbackWarning` naming the bad
  step; a later ``save`` of that step number replaces the bad one. If no step restores,
  :class:`CheckpointCorruptError` lists each step's failure.
* **Any device count.** Arrays are restored with the sharding you pass (one
  ``jax.sharding.Sharding`` for all, or a function ``(path, ShapeDtypeStruct) -> Sharding``),
  else the target's shardings, else on the first local device. What sharding the
  checkpoint was written with does not matter.

NNX: save ``nnx.to_pure_dict(nnx.state(model))`` (plain nested dicts) and put restored
values back with ``nnx.replace_by_pure_dict``.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base

PyTree = Any
FORMAT = "jaxmem.checkpoint/1"
_STATE = "state"
_LAYOUT = "layout"


class CheckpointCorruptError(ValueError):
  """A checkpoint step could not be read back exactly (missing/truncated file, bad bytes)."""


class CheckpointFallbackWarning(UserWarning):
  """The latest checkpoint step was unreadable; an older step was restored instead."""


# ----------------------------------------------------------------------------- layout


def _class_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str, path: str) -> type:
  module, _, qualname = name.partition(":")
  try:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise ValueError(
        f"checkpoint layout at '{path}' names class {name!r}, which cannot be imported here "
        f"({e}). Install/import the code that defines it, or pass an explicit `target`."
    ) from e
  if not isinstance(obj, type):
    raise ValueError(f"checkpoint layout at '{path}': {name!r} is not a class.")
  return obj


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


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
  if isinstance(v, dict):
    if "tuple" in v:
      return tuple(_decode_static(a) for a in v["tuple"])
    if "list" in v:
      return [_decode_static(a) for a in v["list"]]
    if "dtype" in v:
      return np.dtype(v["dtype"])
  return v


def _dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name


def _join(path: str, key: Any) -> str:
  return f"{path}/{key}" if path else str(key)


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


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
        "class": _class_name(type(x)),
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
    node = {"kind": "dict", "items": items}
    if type(x) is not dict:
      node["class"] = _class_name(type(x))
    return node
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    children, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # not a registered pytree node
      raise TypeError(
          f"checkpoint: '{path}' is a {type(x).__name__} dataclass that is not a registered "
          "pytree; register it with jax.tree_util.register_dataclass or save its arrays."
      )
    data_fields = [base.path_str(p) for p, _ in children]
    static = {}
    for f in dataclasses.fields(x):
      if f.name not in data_fields and f.init:
        static[f.name] = _encode_static(getattr(x, f.name), _join(path, f.name))
    return {
        "kind": "dataclass",
        "class": _class_name(type(x)),
        "static": static,
        "items": [[f, _encode(getattr(x, f), _join(path, f), arrays)] for f in data_fields],
    }
  raise TypeError(
      f"checkpoint: cannot save '{path}' of type {type(x).__name__}. Supported: arrays, Python "
      "scalars, strings, None, dict/list/tuple, NamedTuples (optax states), registered dataclasses "
      "(jaxmem.QArray and other compressed types). For NNX, save nnx.to_pure_dict(state)."
  )


def _decode(node: dict, path: str, arrays: list) -> Any:
  """Inverse of :func:`_encode`; consumes ``arrays`` (an iterator) in tree order."""
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
  if kind == "namedtuple":
    cls = _resolve_class(node["class"], path)
    return cls(**{f: _decode(n, _join(path, f), arrays) for f, n in node["items"]})
  if kind == "dict":
    d = {k: _decode(n, _join(path, k), arrays) for k, n in node["items"]}
    return _resolve_class(node["class"], path)(d) if "class" in node else d
  if kind == "dataclass":
    cls = _resolve_class(node["class"], path)
    fields = {f: _decode(n, _join(path, f), arrays) for f, n in node["items"]}
    static = {k: _decode_static(v) for k, v in node["static"].items()}
    return cls(**fields, **static)
  raise ValueError(f"checkpoint layout at '{path}': unknown node kind {kind!r}.")


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


def _fingerprint(x: jax.Array) -> jax.Array:
  """A uint32 checksum of the array's bytes: sum of (word * odd position weight) mod 2**32.

  Any single changed element changes it. Runs as a jitted reduction, so it works on
  sharded arrays without gathering them.
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


def _encode_with_arrays(tree: PyTree) -> tuple[dict, list[tuple[str, Any]]]:
  arrays: list[tuple[str, Any]] = []
  node = _encode(tree, "", arrays)
  for (_, x), (_, n) in zip(arrays, _array_nodes(node), strict=True):
    n["shape"] = list(x.shape)
    n["dtype"] = _dtype_name(x.dtype)
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

  This is what :class:`CheckpointManager` writes next to the arrays (without the
  fingerprints, which need concrete values).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((4, 2))})
    >>> node = jaxmem.checkpoint_layout(q)['tree']['items'][0][1]
    >>> node['class'], node['static']['bits'], node['items'][0][1]['dtype']
    ('jaxmem._src.qarray:QArray', 8, 'int8')
  """
  node, _ = _encode_with_arrays(tree)
  return {"format": FORMAT, "tree": node}


def abstract_target(tx: base.ParamTransform, params: PyTree) -> PyTree:
  """The abstract result of ``jaxmem.transform(tx, params)``, computed without any FLOPs.

  ``params`` may be concrete float params or their abstract form (e.g. from
  ``jax.eval_shape(model.init, ...)``). The result (``ShapeDtypeStruct`` leaves inside
  QArrays etc.) is a restore target for a checkpoint of transformed params.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> abstract = {'kernel': jax.ShapeDtypeStruct((256, 64), jnp.float32)}
    >>> t = jaxmem.abstract_target(jaxmem.quantize_int8(), abstract)
    >>> t['kernel'].qvalue.dtype, t['kernel'].scale.shape
    (dtype('int8'), (1, 64))
  """
  return jax.eval_shape(lambda p: base.transform(tx, p), params)


def _describe(node: dict) -> str:
  kind = node["kind"]
  if kind == "array":
    return f"{node.get('dtype')}{tuple(node.get('shape', ()))} array"
  if kind in ("dataclass", "namedtuple") or "class" in node:
    return node["class"].rsplit(":", 1)[-1]
  return kind


def _check_compatible(saved: dict, want: dict, path: str) -> None:
  """Raises a ValueError naming the first place ``want`` (the target) differs from disk."""
  where = f"'{path}'" if path else "the root"
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
    if saved["dtype"] != want["dtype"]:
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


# ----------------------------------------------------------------------------- manager

ShardingSpec = None | jax.sharding.Sharding | Callable[[str, jax.ShapeDtypeStruct], Any]


class CheckpointManager:
  """Saves and restores pytrees of (compressed) params and training state with Orbax.

  Args:
    directory: where steps are written (``directory/<step>/{state,layout}``).
    max_to_keep: how many recent steps to keep (None keeps all).
    save_interval_steps: ``save`` only writes steps divisible by this (unless ``force``).
    async_save: write in a background thread (call :meth:`wait_until_finished` or
      :meth:`close` before reading the files from another process).
    verify: check every restored array against the fingerprint stored at save time.

  Example:
    >>> import tempfile, jax.numpy as jnp, jaxmem
    >>> params = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((8, 4))})
    >>> with jaxmem.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
    ...   _ = mgr.save(0, {'params': params})
    ...   mgr.wait_until_finished()
    ...   restored = mgr.restore()
    >>> restored['params']['kernel'].qvalue.dtype
    dtype('int8')
  """

  def __init__(
      self,
      directory: str,
      *,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
      verify: bool = True,
  ):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = str(directory)
    self.verify = verify
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _LAYOUT)
    )
    self._bad_steps: set[int] = set()
    self._max_to_keep = max_to_keep

  # -- context manager
  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self.wait_until_finished()
    self._manager.close()

  def wait_until_finished(self) -> None:
    """Blocks until every started save is on disk, then trims to ``max_to_keep`` steps.

    (While an async save is in flight, one extra older step stays on disk, so a
    crash mid-save always leaves ``max_to_keep`` complete steps.)
    """
    self._manager.wait_until_finished()
    if self._max_to_keep is not None:
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
    return self._manager.should_save(step)

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Starts saving ``state`` (any pytree of arrays and compressed values) as ``step``.

    Returns True if a save was started (False when the interval policy skips ``step``).
    With ``async_save`` the arrays are copied off-device before this returns; writing
    continues in the background.

    Raises:
      TypeError: a node the layout cannot describe (the message names its path).
      ValueError: ``step`` already exists (and was not found corrupt by a restore).
    """
    step = int(step)
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
    node, arrays = _encode_with_arrays(state)
    if not arrays:
      raise ValueError("CheckpointManager.save: the tree holds no arrays; nothing to save.")
    values = [jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x for _, x in arrays]
    if self.verify:
      prints = _fingerprints(values)
      for (_, n), fp in zip(_array_nodes(node), prints, strict=True):
        n["fingerprint"] = int(fp)
    plain = _nest([(p, v) for (p, _), v in zip(arrays, values, strict=True)])
    layout = {"format": FORMAT, "paths": [p for p, _ in arrays], "tree": node}
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

  def read_layout(self, step: int | None = None) -> dict:
    """The JSON layout document of a step (default: latest)."""
    step = self._resolve_step(step)
    try:
      out = self._manager.restore(
          step, args=self._ocp.args.Composite(**{_LAYOUT: self._ocp.args.JsonRestore()})
      )
      layout = out[_LAYOUT]
    except Exception as e:  # Orbax/tensorstore raise many types for unreadable files.
      raise CheckpointCorruptError(
          f"checkpoint step {step} in {self.directory}: the layout file cannot be read ({e})."
      ) from e
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
      raise CheckpointCorruptError(
          f"checkpoint step {step} in {self.directory}: layout is not a {FORMAT!r} document "
          "(written by another tool?). Read it with orbax.checkpoint directly."
      )
    return layout

  def abstract_state(self, step: int | None = None) -> PyTree:
    """The saved tree with ``ShapeDtypeStruct`` leaves (QArrays etc. rebuilt); no array reads.

    Handy to inspect a checkpoint (``jaxmem.memory_report(mgr.abstract_state())``).
    """
    layout = self.read_layout(step)
    nodes = _array_nodes(layout["tree"])
    sds = iter([jax.ShapeDtypeStruct(tuple(n["shape"]), np.dtype(n["dtype"])) for _, n in nodes])
    return _decode(layout["tree"], "", sds)

  def _resolve_step(self, step: int | None) -> int:
    if step is not None:
      return int(step)
    latest = self.latest_step()
    if latest is None:
      raise FileNotFoundError(f"no checkpoint steps in {self.directory}.")
    return latest

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
        unreadable newer step is skipped with a :class:`CheckpointFallbackWarning`).
      target: optional tree of the expected structure (concrete or abstract, e.g.
        :func:`abstract_target`); it must match the checkpoint exactly in structure,
        leaf types and dtypes, and its arrays' shardings are used.
      sharding: a ``jax.sharding.Sharding`` for every array, or a function
        ``(path, ShapeDtypeStruct) -> Sharding`` (paths like ``params/Dense_0/kernel/qvalue``);
        default: the target's shardings, else the first local device.

    Raises:
      ValueError: the target differs from the checkpoint (e.g. a float checkpoint into
        a quantized target); the message says how to convert explicitly.
      CheckpointCorruptError: the step (or every step, when ``step=None``) is unreadable.
      FileNotFoundError: no steps exist.
    """
    if step is not None:
      return self._restore_step(int(step), target, sharding)
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
    layout = self.read_layout(step)
    tree = layout["tree"]
    nodes = _array_nodes(tree)
    target_arrays: list[Any] = [None] * len(nodes)
    if target is not None:
      want, t_arrays = _encode_with_arrays(target)
      _check_compatible(tree, want, "")
      target_arrays = [x for _, x in t_arrays]
    default_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = []
    for (path, n), t in zip(nodes, target_arrays, strict=True):
      sds = jax.ShapeDtypeStruct(tuple(n["shape"]), np.dtype(n["dtype"]))
      if isinstance(sharding, jax.sharding.Sharding):
        sh = sharding
      elif callable(sharding):
        sh = sharding(path, sds)
      elif t is not None and getattr(t, "sharding", None) is not None:
        sh = t.sharding
      else:
        sh = default_device
      abstract.append(jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sh))
    paths = layout["paths"]
    ocp = self._ocp
    try:
      out = self._manager.restore(
          step,
          args=ocp.args.Composite(
              **{_STATE: ocp.args.StandardRestore(_nest(list(zip(paths, abstract, strict=True))))}
          ),
      )
      values = _flat(out[_STATE], paths)
    except Exception as e:  # tensorstore/Orbax raise many types for truncated or missing data.
      raise CheckpointCorruptError(
          f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: {e})."
      ) from e
    if self.verify:
      prints = _fingerprints(values)
      for (path, n), fp in zip(nodes, prints, strict=True):
        if "fingerprint" in n and int(fp) != n["fingerprint"]:
          raise CheckpointCorruptError(
              f"checkpoint step {step} in {self.directory}: array '{path}' does not match the "
              "fingerprint written at save time (the data files are corrupt)."
          )
    return _decode(tree, "", iter(values))
