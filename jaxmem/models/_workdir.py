"""Workdir bookkeeping shared by the experiments: paths, config records, TensorBoard events.

Each experiment's ``train.py`` (``experiments/digits``, ``experiments/minilm``) imports it as
``from jaxmem.models import _workdir as wd``:

* :func:`as_path`: the workdir as an ``etils.epath.Path`` (``gs://bucket/x`` stays intact,
  where ``pathlib.Path`` would make it ``gs:/bucket/x``);
* :func:`check_config` / :func:`write_config`: ``workdir/config.json`` holds the config of
  the run (the main jobs write it too); resuming with a different config is refused with
  the changed fields listed (dotted paths, ``old -> new``) unless
  ``config.allow_config_change`` is True. Fields that cannot change the results (progress
  bar, logging cadence, ...) are left out of the comparison; each experiment lists its own
  in ``IGNORED_CONFIG_FIELDS``;
* :class:`EventLog`: a tensorboardX ``SummaryWriter`` on ``workdir/tensorboard`` that reads
  back the event files already there and never writes a ``(tag, step)`` twice, so a rerun or
  a resume after a kill adds no duplicate points; it also writes the config as TensorBoard
  hparams and as text, in the same directory (``SummaryWriter.add_hparams`` would open a new
  sub-directory per call);
* :func:`read_events`: ``{tag: {step: value}}`` of the event files of a directory.

``clu.metric_writers`` (what the flax examples use) is not used: importing it imports
TensorFlow (its ``SummaryWriter`` is ``tf.summary``), which the ``examples`` extra does not
install; tensorboardX writes the same event files with protobuf only.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
# Never compared: the override itself.
ALWAYS_IGNORED = ("allow_config_change",)


class ConfigError(ValueError):
  """A config refused before anything runs: invalid fields, or a changed config on resume.

  An experiment's ``main.py`` prints it without a traceback."""


class ConfigChangedError(ConfigError):
  """The workdir holds a run of another config (see :func:`check_config`)."""


def as_path(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an ``etils.epath.Path``; cloud URLs such as ``gs://b/x`` are kept."""
  return epath.Path(workdir)


def config_to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists, placeholders their values)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json(sort_keys=True))
  return json.loads(json.dumps(config, sort_keys=True))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"prune": {"final_sparsity": 0.9}} -> {"prune.final_sparsity": 0.9}``."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _ignored(key: str, ignore: Iterable[str]) -> bool:
  return any(key == f or key.startswith(f + ".") for f in (*ignore, *ALWAYS_IGNORED))


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                ignore: Iterable[str] = ()) -> list[str]:
  """``["prune.final_sparsity: 0.95 -> 0.5", ...]``: the fields that differ, sorted.

  A field present on one side only reads ``<absent>`` on the other; fields in ``ignore``
  (dotted paths; a prefix covers its sub-fields) are not compared.
  """
  a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
  absent = object()
  lines = []
  for key in sorted(set(a) | set(b)):
    if _ignored(key, ignore):
      continue
    va, vb = a.get(key, absent), b.get(key, absent)
    if va != vb:
      show = [("<absent>" if v is absent else json.dumps(v)) for v in (va, vb)]
      lines.append(f"{key}: {show[0]} -> {show[1]}")
  return lines


def check_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                 ignore: Iterable[str] = ()) -> list[str]:
  """Compares ``config`` with ``workdir/config.json``; returns the changed fields.

  Raises :class:`ConfigChangedError` naming them when some field differs and
  ``config.allow_config_change`` is not True. Writes nothing (call it before creating
  anything in the workdir). A workdir without ``config.json`` returns ``[]``.
  """
  f = as_path(workdir) / CONFIG_FILE
  if not f.exists():
    return []
  changed = config_diff(json.loads(f.read_text()), config, ignore)
  if changed and not config.get("allow_config_change", False):
    raise ConfigChangedError(
        f"{os.fspath(f)} holds a run with a different config; changed fields (old -> new):\n  "
        + "\n  ".join(changed)
        + "\nUse a new --workdir, or pass --config.allow_config_change=True to continue this "
        "run with the new config (config.json is then overwritten). Not compared: "
        + ", ".join(sorted({*ignore, *ALWAYS_IGNORED})) + ".")
  return changed


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """Writes ``workdir/config.json`` (sorted keys, indented) and returns its path."""
  f = as_path(workdir) / CONFIG_FILE
  f.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
  return f


def device_info() -> dict[str, Any]:
  """The devices this process trains on: count, local count, processes, platform, kind."""
  d = jax.devices()[0]
  return {"device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count(), "platform": d.platform,
          "device_kind": d.device_kind}


# ----------------------------------------------------------------------------- events


def _records(data: bytes):
  """The payloads of a TFRecord file; stops at a truncated tail (a killed writer)."""
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    start = pos + 12
    if start + n + 4 > len(data):
      return
    yield data[start:start + n]
    pos = start + n + 4


def read_events(logdir: str | os.PathLike) -> dict[str, dict[int, Any]]:
  """``{tag: {step: value}}`` of every event file in ``logdir`` (not its sub-directories).

  Scalars read as floats, text summaries as str (under the tag given to ``add_text``, without
  the ``/text_summary`` that tensorboardX appends), anything else as None. A ``(tag, step)``
  written twice keeps its last value; :func:`count_points` counts them all.
  """
  out: dict[str, dict[int, Any]] = {}
  for tag, step, value in _points(logdir):
    out.setdefault(tag, {})[step] = value
  return out


def count_points(logdir: str | os.PathLike) -> dict[tuple[str, int], int]:
  """How many times each ``(tag, step)`` was written in ``logdir``'s event files."""
  counts: dict[tuple[str, int], int] = {}
  for tag, step, _ in _points(logdir):
    counts[(tag, step)] = counts.get((tag, step), 0) + 1
  return counts


def _points(logdir):
  from google.protobuf.message import DecodeError
  from tensorboardX.proto import event_pb2

  d = as_path(logdir)
  if not d.exists():
    return
  for f in sorted(d.glob("events.out.tfevents.*")):
    for payload in _records(f.read_bytes()):
      try:
        event = event_pb2.Event.FromString(payload)
      except DecodeError:
        break
      for v in event.summary.value:
        if v.HasField("simple_value"):
          value = float(v.simple_value)
        elif v.metadata.plugin_data.plugin_name == "text" and v.tensor.string_val:
          value = v.tensor.string_val[0].decode()
        else:
          value = None
        tag = v.tag
        if v.metadata.plugin_data.plugin_name == "text":
          tag = tag.removesuffix("/text_summary")  # tensorboardX's add_text appends it
        yield tag, int(event.step), value


def _hparam_value(v: Any) -> bool | int | float | str:
  return v if isinstance(v, (bool, int, float, str)) else json.dumps(v)


class EventLog:
  """TensorBoard events in ``logdir`` that are written at most once per ``(tag, step)``.

  On opening, the points already in ``logdir``'s event files are read back; ``scalar``,
  ``text`` and ``config`` skip what is there. A rerun of a finished run therefore writes
  nothing new, and a run resumed from step ``s`` after a kill adds only the points after
  ``s`` (and any the killed run had not flushed). Events are written synchronously with
  tensorboardX's ``EventsWriter``: after :meth:`flush` they are in the file (a
  ``SummaryWriter`` queues them to a thread, and its ``flush`` does not wait for that queue,
  so a kill right after a checkpoint could lose points the resumed run would not rewrite).
  Each EventLog writes its own file (a unique suffix: two opened within one second would
  otherwise share a name, and the second would truncate the first).
  """

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.record_writer import directory_check

    self.logdir = as_path(logdir)
    self.written = set(count_points(self.logdir))
    self.tags = {tag for tag, _ in self.written}
    directory_check(os.fspath(self.logdir))
    self._writer = EventsWriter(os.path.join(os.fspath(self.logdir), "events"),
                                f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
    self._closed = False

  def has(self, tag: str, step: int | None = None) -> bool:
    """Whether ``tag`` has a point at ``step`` (at any step when ``step`` is None)."""
    return tag in self.tags if step is None else (tag, int(step)) in self.written

  def _mark(self, tag: str, step: int) -> bool:
    if (tag, step) in self.written:
      return False
    self.written.add((tag, step))
    self.tags.add(tag)
    return True

  def _write(self, summary, step: int) -> None:
    from tensorboardX.proto import event_pb2

    self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary))

  def scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboardX import summary

    if self._mark(tag, int(step)):
      self._write(summary.scalar(tag, float(value)), step)

  def text(self, tag: str, text: str, step: int) -> None:
    """Text (markdown) under ``tag`` (stored as ``tag + '/text_summary'`` by tensorboardX)."""
    from tensorboardX import summary

    if self._mark(tag, int(step)):
      self._write(summary.text(tag, text), step)

  def config(self, config: ml_collections.ConfigDict, metric_tags: Iterable[str],
             step: int = 0, extra: Mapping[str, Any] | None = None) -> None:
    """The config as hparams (flattened, dotted names) and as JSON text (tag ``config``)."""
    from tensorboardX.summary import hparams

    flat = {**flatten(config_to_dict(config)), **(extra or {})}
    if self._mark("_hparams_/session_start_info", int(step)):
      exp, ssi, sei = hparams({k: _hparam_value(v) for k, v in flat.items()},
                              {tag: 0.0 for tag in metric_tags})
      for s in (exp, ssi, sei):
        self._write(s, step)
    text = json.dumps(config_to_dict(config), indent=2, sort_keys=True)
    # Markdown: indent by 4 so TensorBoard shows it as a code block.
    self.text("config", "\n".join("    " + line for line in text.splitlines()), step)

  def flush(self) -> None:
    """Everything written so far is in the event file once this returns."""
    self._writer.flush()

  def close(self) -> None:
    if not self._closed:
      self._writer.close()
      self._closed = True

  def __enter__(self) -> EventLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
