"""Hostile and damaged checkpoints, concurrent writers, misuse: each case here failed before.

Crafted layouts are written the way an attacker would: the layout JSON of a saved step is
edited and (for format 2) its crc32c recomputed, so what refuses them is the type registry,
not the checksum. Format 1 cases edit a copy of tests/data/checkpoint_v1 (written by the
format 1 code).
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import typing
import uuid

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem

V1_CKPT = pathlib.Path(__file__).parent / "data" / "checkpoint_v1" / "ckpt"
V1_STEP = 7


def _tree(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  dense = {"kernel": jax.random.normal(k1, (16, 8)), "bias": jax.random.normal(k2, (8,))}
  return {
      "params": jaxmem.transform(jaxmem.quantize_int8(), dense),
      "opt": optax.adam(1e-3).init(dense),
      "big": jnp.ones(65536),  # constant and large: format 1's fingerprint of it was 0
      "name": "run",
      "step": 3,
  }


def _two_steps(tmp_path):
  """A directory with steps 0 and 1 (format 2); the manager is closed."""
  d = tmp_path / "ckpt"
  with jaxmem.CheckpointManager(d, async_save=False) as mgr:
    mgr.save(0, _tree(0))
    mgr.save(1, _tree(1))
  return d, 1, 0


def _v1_copy(tmp_path):
  """A copy of the format 1 fixture with its step 7 also copied as step 6."""
  d = tmp_path / "v1"
  shutil.copytree(V1_CKPT, d)
  shutil.copytree(d / str(V1_STEP), d / str(V1_STEP - 1))
  return d, V1_STEP, V1_STEP - 1


def _layout_crc32c(doc):
  """The documented layout checksum: crc32c of the canonical JSON without the checksum."""
  body = {k: v for k, v in doc.items() if k != "crc32c"}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return google_crc32c.value(text.encode())


def _edit(directory, step, fn, *, rehash=True):
  """Edits ``<step>/layout/metadata``; ``rehash`` recomputes its checksum (as an attacker would)."""
  path = pathlib.Path(directory) / str(step) / "layout" / "metadata"
  doc = json.loads(path.read_text())
  fn(doc)
  if rehash and "crc32c" in doc:
    doc["crc32c"] = _layout_crc32c(doc)
  path.write_text(json.dumps(doc))


def _item(node, key):
  return dict(node["items"])[key]


def _sharding():
  return NamedSharding(Mesh(np.array(jax.devices()[:2]), ("data",)), P())


def _assert_all_refuse(directory, bad, good, match):
  """restore / abstract_state / restore(sharding=...) of ``bad`` are corrupt; latest falls back."""
  with jaxmem.CheckpointManager(directory) as mgr:
    for call in (
        lambda: mgr.restore(bad),
        lambda: mgr.abstract_state(bad),
        lambda: mgr.restore(bad, sharding=_sharding()),
        lambda: mgr.read_layout(bad),
    ):
      with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match=rf"step {bad} in .*{match}"):
        call()
    with pytest.warns(
        jaxmem.checkpoint.CheckpointFallbackWarning, match=rf"restored step {good}\b"):
      restored = mgr.restore()
  return restored


# ----------------------------------------------------------------------------- code execution

SH = ["sh", "-c", 'touch "$JAXMEM_MARKER"']  # no '/': usable as dict keys too


def _payload(kind, sep, marker, module):
  popen, handler = f"subprocess{sep}Popen", f"logging{sep}FileHandler"
  strs = {"kind": "list", "items": [{"kind": "str", "value": a} for a in SH]}
  return {
      "dataclass_popen": {
          "kind": "dataclass", "class": popen, "static": {"args": {"list": SH}}, "items": [],
      },
      "namedtuple_popen": {"kind": "namedtuple", "class": popen, "items": [["args", strs]]},
      "dict_popen": {"kind": "dict", "class": popen, "items": [[a, {"kind": "none"}] for a in SH]},
      "file_handler": {
          "kind": "dataclass", "class": handler, "static": {"filename": str(marker)}, "items": [],
      },
      "import_only": {"kind": "namedtuple", "class": f"{module}{sep}Anything", "items": []},
  }[kind]


@pytest.mark.parametrize("fmt", ["v2", "v1"])
@pytest.mark.parametrize("sep", [":", "."])
@pytest.mark.parametrize(
    "kind", ["dataclass_popen", "namedtuple_popen", "dict_popen", "file_handler", "import_only"]
)
def test_crafted_layout_runs_nothing(tmp_path, monkeypatch, fmt, sep, kind):
  marker = tmp_path / "pwned"
  monkeypatch.setenv("JAXMEM_MARKER", str(marker))
  # A module nobody imported yet, whose import alone would leave the marker.
  module = f"jaxmem_evil_{uuid.uuid4().hex}"
  (tmp_path / f"{module}.py").write_text(
      "import os\nopen(os.environ['JAXMEM_MARKER'], 'w').close()\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  directory, bad, good = _two_steps(tmp_path) if fmt == "v2" else _v1_copy(tmp_path)
  node = _payload(kind, sep, marker, module)
  _edit(directory, bad, lambda doc: doc["tree"]["items"].append(["evil", node]))

  restored = _assert_all_refuse(directory, bad, good, match="'evil'.*not registered")
  assert "evil" not in restored
  if kind.endswith("popen"):
    time.sleep(0.5)  # a started process would have touched the marker by now
  assert not marker.exists()
  assert module not in sys.modules


def test_registered_type_used_as_another_kind_is_refused(tmp_path):
  directory, bad, good = _two_steps(tmp_path)

  def as_dataclass(doc):
    adam = _item(doc["tree"], "opt")["items"][0]  # ScaleByAdamState, a NamedTuple
    adam["kind"], adam["static"] = "dataclass", {}

  _edit(directory, bad, as_dataclass)
  _assert_all_refuse(
      directory, bad, good, match="'opt/0' uses optax.ScaleByAdamState \\(a NamedTuple\\)"
  )


def test_format1_kind_mismatch_is_refused(tmp_path):
  directory, bad, good = _v1_copy(tmp_path)

  def as_dataclass(doc):  # GradualPruneState is a NamedTuple
    state = _item(doc["tree"], "opt_state")["items"][1]
    state["kind"], state["static"] = "dataclass", {}

  _edit(directory, bad, as_dataclass)
  _assert_all_refuse(directory, bad, good, match="jaxmem.GradualPruneState \\(a NamedTuple\\)")


# ----------------------------------------------------------------------------- registry


def test_save_refuses_unregistered_types(tmp_path):
  class RunState(typing.NamedTuple):
    ema: jax.Array

  class Box(dict):
    pass

  with jaxmem.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
    with pytest.raises(TypeError, match=r"'train/ema' is a RunState NamedTuple .*"
                       r"register_checkpoint_type\(RunState\)"):
      mgr.save(0, {"train": {"ema": RunState(jnp.ones(2))}})
    with pytest.raises(TypeError, match=r"'box' is a Box mapping .*register_checkpoint_type"):
      mgr.save(0, {"box": Box(w=jnp.ones(2))})
    assert mgr.all_steps() == []  # nothing unrestorable was written
    with pytest.raises(TypeError, match="register_checkpoint_type"):
      jaxmem.checkpoint.checkpoint_layout(RunState(jnp.ones(2)))

    jaxmem.checkpoint.register_checkpoint_type(RunState, name="tests.bad_inputs.RunState")
    jaxmem.checkpoint.register_checkpoint_type(Box)
    mgr.save(0, {"train": {"ema": RunState(jnp.ones(2))}, "box": Box(w=jnp.ones(2))})
    restored = mgr.restore()
  assert type(restored["train"]["ema"]) is RunState and type(restored["box"]) is Box
  np.testing.assert_array_equal(restored["box"]["w"], np.ones(2))


def test_registered_dataclass_with_static_fields_roundtrips(tmp_path):
  import dataclasses

  @jaxmem.checkpoint.register_checkpoint_type
  @jax.tree_util.register_dataclass
  @dataclasses.dataclass(frozen=True)
  class Scaled:
    value: jax.Array
    factor: float = dataclasses.field(metadata=dict(static=True))

  with jaxmem.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
    mgr.save(0, {"s": Scaled(jnp.arange(3.0), 0.5)})
    assert mgr.read_layout()["tree"]["items"][0][1]["static"] == {"factor": 0.5}
    restored = mgr.restore()["s"]
  assert type(restored) is Scaled and restored.factor == 0.5


def test_register_checkpoint_type_errors():
  with pytest.raises(TypeError, match="not a NamedTuple class, a dataclass or a Mapping"):
    jaxmem.checkpoint.register_checkpoint_type(int)

  class Other(typing.NamedTuple):
    x: jax.Array

  with pytest.raises(ValueError, match="'jaxmem.QArray' is already registered"):
    jaxmem.checkpoint.register_checkpoint_type(Other, name="jaxmem.QArray")
  with pytest.raises(ValueError, match="already registered as 'jaxmem.QArray'"):
    jaxmem.checkpoint.register_checkpoint_type(jaxmem.QArray, name="mine.QArray")
  with pytest.raises(ValueError, match="without ':'"):
    jaxmem.checkpoint.register_checkpoint_type(Other, name="mine:Other")


def test_format1_spelling_of_a_user_type_resolves_through_the_registry(tmp_path):
  class Ema(typing.NamedTuple):
    ema: jax.Array

  jaxmem.checkpoint.register_checkpoint_type(Ema, name="tests.bad_inputs.Ema")
  d = tmp_path / "c"
  with jaxmem.CheckpointManager(d, async_save=False) as mgr:
    mgr.save(0, {"e": Ema(jnp.ones(3))})

  def to_format1(doc):  # what the format 1 code wrote for this tree (without fingerprints)
    doc["format"] = "jaxmem.checkpoint/1"
    del doc["crc32c"]
    node = _item(doc["tree"], "e")
    node["class"] = f"{Ema.__module__}:{Ema.__qualname__}"
    del node["items"][0][1]["crc32c"]

  _edit(d, 0, to_format1)
  with jaxmem.CheckpointManager(d, verify=False) as mgr:
    assert type(mgr.restore()["e"]) is Ema
  with jaxmem.CheckpointManager(d) as mgr:  # verify=True: an array without a checksum
    with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match="'e/ema' has no fingerprint"):
      mgr.restore(0)


# ----------------------------------------------------------------------------- integrity


def _set_dtype(key, dtype):
  def fn(doc):
    _item(doc["tree"], key)["dtype"] = dtype
  return fn


def _drop_checksum(doc):
  node = _item(doc["tree"], "big")
  node.pop("crc32c", None) or node.pop("fingerprint", None)


def _bits(doc):
  _item(_item(doc["tree"], "params"), "kernel")["static"]["bits"] = 4


def _qvalue_int4(doc):
  _item(_item(_item(doc["tree"], "params"), "kernel"), "qvalue")["dtype"] = "int4"


def _unknown_kind(doc):
  _item(doc["tree"], "opt")["kind"] = "pickle"


def _rename_key(doc):
  doc["tree"]["items"][-1][0] = "steps"  # 'step' -> 'steps'


def _str_value(doc):
  _item(doc["tree"], "name")["value"] = "other-run"


EDITS = {
    # name: (edit, rehash, what the error says)
    "f32_to_bf16_constant": (_set_dtype("big", "bfloat16"), False, "crc32c checksum"),
    "f32_to_bf16_constant_rehashed": (_set_dtype("big", "bfloat16"), True,
                                      "'big' does not match its crc32c checksum"),
    "checksum_removed": (_drop_checksum, False, "crc32c checksum"),
    "checksum_removed_rehashed": (_drop_checksum, True, "'big' has no crc32c"),
    "bits_8_to_4": (_bits, False, "crc32c checksum"),
    "int8_to_int4": (_qvalue_int4, False, "crc32c checksum"),
    "int8_to_int4_rehashed": (_qvalue_int4, True,
                              "'params/kernel/qvalue' does not match its crc32c checksum"),
    "tree_missing": (lambda doc: doc.pop("tree"), True, "top-level keys"),
    "unknown_kind": (_unknown_kind, True, "'opt' has an unknown node kind 'pickle'"),
    "key_renamed": (_rename_key, False, "crc32c checksum"),
    "str_value": (_str_value, False, "crc32c checksum"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edited_layout_is_corrupt_and_latest_falls_back(tmp_path, name):
  edit, rehash, match = EDITS[name]
  directory, bad, good = _two_steps(tmp_path)
  _edit(directory, bad, edit, rehash=rehash)
  restored = _assert_all_refuse(directory, bad, good, match=match) if name not in (
      "f32_to_bf16_constant_rehashed", "checksum_removed_rehashed", "int8_to_int4_rehashed",
  ) else None
  if restored is None:  # caught when the arrays are read: abstract_state cannot see it
    with jaxmem.CheckpointManager(directory) as mgr:
      with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match=rf"step {bad} in .*{match}"):
        mgr.restore(bad)
      with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match=rf"step {bad} in "):
        mgr.restore(bad, sharding=_sharding())
      with pytest.warns(
        jaxmem.checkpoint.CheckpointFallbackWarning, match=rf"restored step {good}\b"):
        restored = mgr.restore()
  assert restored["name"] == "run" and restored["params"]["kernel"].bits == 8
  np.testing.assert_array_equal(restored["big"], np.ones(65536, np.float32))


V1_EDITS = {
    "int8_to_int4": (
        lambda doc: _item(_item(_item(doc["tree"], "int8"), "kernel"), "qvalue").update(
            dtype="int4"), "'int8/kernel/qvalue' has a dtype 'int4' that jaxmem never writes"),
    "fingerprint_removed": (
        lambda doc: _item(_item(_item(doc["tree"], "int8"), "kernel"), "qvalue").pop(
            "fingerprint"), "'int8/kernel/qvalue' has no fingerprint"),
    "tree_missing": (lambda doc: doc.pop("tree"), "top-level keys"),
    "unknown_kind": (lambda doc: _item(doc["tree"], "pair").update(kind="set"),
                     "'pair' has an unknown node kind 'set'"),
}


@pytest.mark.parametrize("name", sorted(V1_EDITS))
def test_edited_format1_layout_is_corrupt(tmp_path, name):
  edit, match = V1_EDITS[name]
  directory, bad, good = _v1_copy(tmp_path)
  _edit(directory, bad, edit)
  with jaxmem.CheckpointManager(directory) as mgr:
    with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match=rf"step {bad} in .*{match}"):
      mgr.restore(bad)
    with pytest.warns(
        jaxmem.checkpoint.CheckpointFallbackWarning, match=rf"restored step {good}\b"):
      assert mgr.restore()["step"] == 7


def test_missing_step_lists_the_steps_that_exist(tmp_path):
  directory, _, _ = _two_steps(tmp_path)
  with jaxmem.CheckpointManager(directory) as mgr:
    for call in (mgr.restore, mgr.abstract_state, mgr.read_layout):
      with pytest.raises(FileNotFoundError, match=r"step 7 does not exist in .*are \[0, 1\]"):
        call(7)


# ----------------------------------------------------------------------------- save misuse


def test_save_inside_jit_is_a_clear_type_error(tmp_path):
  with jaxmem.CheckpointManager(tmp_path / "c") as mgr:

    @jax.jit
    def train_step(w):
      mgr.save(0, {"params": {"w": w}})
      return w

    with pytest.raises(TypeError, match=r"'params/w' is a traced value .*Call save outside jit"):
      train_step(jnp.ones(3))

    @jax.jit
    def save_step(step):
      mgr.save(step, {"w": jnp.ones(3)})
      return step

    with pytest.raises(TypeError, match="`step` is a traced value.*outside jit"):
      save_step(1)
    with pytest.raises(TypeError, match="'w' is an abstract ShapeDtypeStruct"):
      mgr.save(0, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert mgr.all_steps() == []


# ----------------------------------------------------------------------------- one writer

HOLDER = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp, jaxmem
    mgr = jaxmem.CheckpointManager(sys.argv[1], async_save=False)
    mgr.save(0, {"w": jnp.arange(3.0)})
    print("READY", flush=True)
    if sys.stdin.readline().strip() == "crash":
      os._exit(3)  # no close(): the OS releases the lock
    mgr.close()
    print("CLOSED", flush=True)
    """
)


def _holder(directory, stderr):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen(
      [sys.executable, "-c", HOLDER, str(directory)], env=env, text=True,
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
  )


@pytest.mark.parametrize("how", ["close", "crash"])
def test_second_writer_process_fails_at_once_naming_the_holder(tmp_path, how):
  d = tmp_path / "c"
  with open(tmp_path / "holder.log", "w") as log, _holder(d, log) as proc:
    if proc.stdout.readline().strip() != "READY":
      proc.kill()
      pytest.fail(f"holder did not start: {(tmp_path / 'holder.log').read_text()[-2000:]}")
    start = time.monotonic()
    host = re.escape(repr(socket.gethostname()))
    with pytest.raises(
        jaxmem.checkpoint.CheckpointLockedError,
                       match=rf"open for writing by pid {proc.pid} on host {host}.*read_only=True"):
      jaxmem.CheckpointManager(d)
    assert time.monotonic() - start < 10  # fails at once, does not wait for the lock
    with jaxmem.CheckpointManager(d, read_only=True) as reader:  # readers need no lock
      np.testing.assert_array_equal(reader.restore()["w"], np.arange(3.0))
    proc.stdin.write(how + "\n")
    proc.stdin.flush()
    if how == "close":
      assert proc.stdout.readline().strip() == "CLOSED"
    assert proc.wait(timeout=120) == (0 if how == "close" else 3)
  with jaxmem.CheckpointManager(d, async_save=False) as mgr:  # released: a new writer opens
    assert mgr.all_steps() == [0]
    mgr.save(1, {"w": jnp.zeros(3)})
  assert json.loads((d / ".jaxmem-writer.lock").read_text() or "{}") == {}


def test_one_writer_in_a_process_until_closed(tmp_path):
  d = tmp_path / "c"
  first = jaxmem.CheckpointManager(d, async_save=False)
  first.save(0, {"w": jnp.ones(2)})
  with pytest.raises(
        jaxmem.checkpoint.CheckpointLockedError, match="another CheckpointManager in this "
                     rf"process \(pid {os.getpid()} "):
    jaxmem.CheckpointManager(d)
  info = json.loads((d / ".jaxmem-writer.lock").read_text())
  assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
  reader = jaxmem.CheckpointManager(d, read_only=True)
  with pytest.raises(ValueError, match="opened with read_only=True"):
    reader.save(1, {"w": jnp.ones(2)})
  assert not reader.should_save(1)
  first.close()
  first.close()  # closing twice is fine
  with jaxmem.CheckpointManager(d, async_save=False) as second:
    assert second.all_steps() == [0]  # the lock file is not a step
    second.save(1, {"w": jnp.ones(2)})
  reader.close()
  with pytest.raises(FileNotFoundError, match="read_only=True creates nothing"):
    jaxmem.CheckpointManager(tmp_path / "missing", read_only=True)
  assert not (tmp_path / "missing").exists()
