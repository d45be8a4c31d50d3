"""Checkpoint round-trips of every compressed type, resharding, no silent casts, corruption."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem


def _params(seed=0, n_in=32, n_hidden=64, n_out=16):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "Dense_0": {
          "kernel": jax.random.normal(k1, (n_in, n_hidden)),
          "bias": jax.random.normal(k2, (n_hidden,)),
      },
      "Dense_1": {"kernel": jax.random.normal(k3, (n_hidden, n_out)), "bias": jnp.zeros(n_out)},
  }


def _assert_same(a, b):
  """Same tree structure (compressed types and static metadata included) and exact values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def _roundtrip(tmp_path, tree, **restore_kw):
  with jaxmem.CheckpointManager(tmp_path / "ckpt") as mgr:
    assert mgr.save(0, tree)
    mgr.wait_until_finished()
    return mgr.restore(**restore_kw)


def _stored_dtypes(directory, step):
  """dtype of every array Orbax wrote (read from Orbax's own metadata, not from jaxmem)."""
  import orbax.checkpoint as ocp

  meta = ocp.StandardCheckpointer().metadata(pathlib.Path(directory) / str(step) / "state")
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.dtype(m.dtype) for p, m in flat}


# ----------------------------------------------------------------------------- round-trips


def test_int8_roundtrip_stays_int8_on_disk(tmp_path):
  q = jaxmem.transform(jaxmem.quantize_int8(), _params())
  restored = _roundtrip(tmp_path, {"params": q})
  _assert_same(restored, {"params": q})
  kernel = restored["params"]["Dense_0"]["kernel"]
  assert isinstance(kernel, jaxmem.QArray) and kernel.bits == 8 and kernel.shape == (32, 64)
  dtypes = _stored_dtypes(tmp_path / "ckpt", 0)
  assert dtypes["params/Dense_0/kernel/qvalue"] == np.int8
  assert dtypes["params/Dense_0/kernel/scale"] == np.float32
  # No float copy of a quantized kernel on disk: exactly qvalue + scale per kernel, + biases.
  assert sorted(dtypes) == sorted(
      f"params/Dense_{i}/{leaf}"
      for i in range(2)
      for leaf in ("bias", "kernel/qvalue", "kernel/scale")
  )


def test_zero_size_arrays_roundtrip(tmp_path):
  """A fully pruned kernel packs to zero-size values and index, which Orbax cannot write:
  they live in the layout alone and come back with their dtype and shape."""
  empty = jaxmem.ops.sparse_pack(jnp.zeros((16, 8)))
  assert {x.size for x in jax.tree.leaves(empty)} == {0}
  tree = {"pruned": empty, "bias": jnp.zeros((0,), jnp.int8), "kernel": jnp.ones((4, 4))}
  with jaxmem.CheckpointManager(tmp_path) as mgr:
    mgr.save(0, tree)
    mgr.wait_until_finished()
    restored = mgr.restore()
    on_disk = mgr.abstract_state()
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(restored["pruned"].materialize(), np.zeros((16, 8)))
  assert jaxmem.tree_bytes(on_disk) == jaxmem.tree_bytes(tree)


@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 16), (2, None), (3, 8)])
def test_packed_lowbit_roundtrip(tmp_path, bits, group_size):
  tx = jaxmem.quantize_weights(bits, group_size=group_size)
  q = jaxmem.transform(tx, _params())
  restored = _roundtrip(tmp_path, q)
  _assert_same(restored, q)
  k = restored["Dense_1"]["kernel"]
  assert k.packed and k.qvalue.dtype == jnp.uint8 and k.group_size == group_size
  np.testing.assert_array_equal(
      jaxmem.ops.dequantize(k), jaxmem.ops.dequantize(q["Dense_1"]["kernel"]))
  assert _stored_dtypes(tmp_path / "ckpt", 0)["Dense_1/kernel/qvalue"] == np.uint8


def test_dynamic_int8_metadata_roundtrip(tmp_path):
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(), _params())
  restored = _roundtrip(tmp_path, q)
  assert restored["Dense_0"]["kernel"].act_bits == 8
  _assert_same(restored, q)


def test_optimizer_and_transform_state_roundtrip(tmp_path):
  params = _params()
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  tx = jaxmem.chain(jaxmem.quantize_int8())
  tx_state = tx.init(params)
  state = {
      "params": params, "opt_state": opt_state, "tx_state": tx_state, "step": 7, "none": None,
      "name": "run-1",
  }
  restored = _roundtrip(tmp_path, state)
  assert restored["step"] == 7 and isinstance(restored["step"], int)
  assert restored["name"] == "run-1"
  assert type(restored["opt_state"][1][0]) is type(opt_state[1][0])  # ScaleByAdamState
  _assert_same(restored, state)
  # The restored optimizer state keeps working.
  opt.update(grads, restored["opt_state"], restored["params"])


def test_nnx_pure_dict_roundtrip(tmp_path):
  from flax import nnx

  model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  pure = nnx.to_pure_dict(nnx.state(model))
  restored = _roundtrip(tmp_path, pure)
  other = nnx.Linear(8, 4, rngs=nnx.Rngs(1))
  state = nnx.state(other)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(other, state)
  np.testing.assert_array_equal(other.kernel[...], model.kernel[...])


def test_abstract_state_and_layout_read_no_arrays(tmp_path):
  q = jaxmem.transform(jaxmem.quantize_int8(), _params())
  with jaxmem.CheckpointManager(tmp_path) as mgr:
    mgr.save(3, q)
    mgr.wait_until_finished()
    abstract = mgr.abstract_state()
  assert isinstance(abstract["Dense_0"]["kernel"], jaxmem.QArray)
  assert abstract["Dense_0"]["kernel"].qvalue == jax.ShapeDtypeStruct((32, 64), jnp.int8)
  assert jaxmem.tree_bytes(abstract) == jaxmem.tree_bytes(q)


# ----------------------------------------------------------------------------- targets


def test_target_derived_from_transform(tmp_path):
  params = _params()
  tx = jaxmem.quantize_int8()
  q = jaxmem.transform(tx, params)
  abstract_float = jax.eval_shape(lambda: params)
  target = jaxmem.checkpoint.abstract_target(tx, abstract_float)
  restored = _roundtrip(tmp_path, q, target=target)
  _assert_same(restored, q)


def test_float_checkpoint_into_quantized_target_raises_with_fix(tmp_path):
  params = _params()
  target = jaxmem.checkpoint.abstract_target(jaxmem.quantize_int8(), params)
  with jaxmem.CheckpointManager(tmp_path) as mgr:
    mgr.save(0, params)
    mgr.wait_until_finished()
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*quantize_int8"):
      mgr.restore(target=target)
    # The explicit path: restore the floats, then quantize.
    q = jaxmem.transform(jaxmem.quantize_int8(), mgr.restore())
  _assert_same(q, jaxmem.transform(jaxmem.quantize_int8(), params))


def test_target_mismatches_raise(tmp_path):
  params = _params()
  q = jaxmem.transform(jaxmem.quantize_int8(), params)
  with jaxmem.CheckpointManager(tmp_path) as mgr:
    mgr.save(0, params)
    mgr.save(1, q)
    mgr.wait_until_finished()
    as_int8 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.int8), params)
    with pytest.raises(ValueError, match="Dense_0/bias.*stored as float32.*int8"):
      mgr.restore(0, target=as_int8)
    with pytest.raises(ValueError, match="Dense_0/kernel.*QArray in the checkpoint"):
      mgr.restore(1, target=params)
    int4 = jaxmem.checkpoint.abstract_target(jaxmem.quantize_weights(4), params)
    with pytest.raises(ValueError, match="Dense_0/kernel.*bit width"):
      mgr.restore(1, target=int4)
    with pytest.raises(ValueError, match="only in the checkpoint: \\['Dense_1'\\]"):
      mgr.restore(0, target={"Dense_0": params["Dense_0"]})


def test_unsupported_node_is_a_type_error(tmp_path):
  with jaxmem.CheckpointManager(tmp_path) as mgr:
    with pytest.raises(TypeError, match="'a/b'.*object"):
      mgr.save(0, {"a": {"b": object()}})
    with pytest.raises(TypeError, match="contains '/'"):
      mgr.save(0, {"a/b": jnp.ones(2)})


# ----------------------------------------------------------------------------- devices


def test_restore_onto_other_sharding_and_device_count(tmp_path):
  devices = jax.devices()
  assert len(devices) == 4
  mesh4 = Mesh(np.array(devices), ("data",))
  params = _params()
  q = jaxmem.transform(jaxmem.quantize_int8(), params)
  # Save from 4 devices: kernels' output axis sharded 4 ways.
  sharded = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh4, P(*([None] * (x.ndim - 1)), "data"))), q
  )
  assert len(sharded["Dense_0"]["kernel"].qvalue.sharding.device_set) == 4
  with jaxmem.CheckpointManager(tmp_path) as mgr:
    mgr.save(0, sharded)
    mgr.wait_until_finished()
    # Default: one device.
    one = mgr.restore()
    assert one["Dense_0"]["kernel"].qvalue.sharding.device_set == {jax.local_devices()[0]}
    _assert_same(one, q)
    # Two devices, replicated.
    mesh2 = Mesh(np.array(devices[:2]), ("data",))
    rep = mgr.restore(sharding=NamedSharding(mesh2, P()))
    assert len(rep["Dense_1"]["kernel"].scale.sharding.device_set) == 2
    _assert_same(rep, q)

    # Two devices, kernels' int8 values sharded along the output axis, everything else replicated.
    def per_leaf(path, sds):
      if path.endswith("kernel/qvalue"):
        return NamedSharding(mesh2, P(None, "data"))
      return NamedSharding(mesh2, P())

    split = mgr.restore(sharding=per_leaf)
    qv = split["Dense_0"]["kernel"].qvalue
    assert qv.sharding.spec == P(None, "data")
    assert {s.data.shape for s in qv.addressable_shards} == {(32, 32)}
    _assert_same(split, q)


def test_restore_in_a_one_device_process(tmp_path):
  q = jaxmem.transform(jaxmem.quantize_int8(), _params())
  mesh4 = Mesh(np.array(jax.devices()), ("data",))
  q = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh4, P())), q)
  with jaxmem.CheckpointManager(tmp_path / "c") as mgr:
    mgr.save(0, q)
  expected = float(jnp.sum(jaxmem.ops.dequantize(q["Dense_1"]["kernel"])))
  script = textwrap.dedent(
      f"""
      import jax, jax.numpy as jnp, jaxmem
      assert jax.device_count() == 1, jax.devices()
      with jaxmem.CheckpointManager({str(tmp_path / "c")!r}) as mgr:
        q = mgr.restore()
      print(float(jnp.sum(jaxmem.ops.dequantize(q['Dense_1']['kernel']))))
      """
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- corruption


def _data_files(step_dir):
  files = pathlib.Path(step_dir, "state").rglob("*")
  return [p for p in files if p.is_file() and p.parent.name == "d"]


def _three_steps(tmp_path):
  mgr = jaxmem.CheckpointManager(tmp_path, max_to_keep=5)
  trees = [jaxmem.transform(jaxmem.quantize_int8(), _params(seed=s)) for s in range(3)]
  for s, t in enumerate(trees):
    mgr.save(s, t)
  mgr.wait_until_finished()
  return mgr, trees


def test_truncated_latest_step_falls_back_with_warning(tmp_path):
  mgr, trees = _three_steps(tmp_path)
  files = _data_files(tmp_path / "2")
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match="step 2"):
    mgr.restore(2)
  with pytest.warns(
        jaxmem.checkpoint.CheckpointFallbackWarning, match="restored step 1.*step 2"):
    restored = mgr.restore()
  _assert_same(restored, trees[1])
  # Training resumes from step 1 and writes step 2 again: the bad step is replaced.
  mgr.save(2, trees[0])
  mgr.wait_until_finished()
  _assert_same(mgr.restore(), trees[0])
  mgr.close()


def test_wrong_bytes_are_caught_by_checksum(tmp_path):
  mgr, trees = _three_steps(tmp_path)
  mgr.close()
  # Step 2's data replaced by step 1's: Orbax reads it without complaint, values are wrong.
  shutil.rmtree(tmp_path / "2" / "state")
  shutil.copytree(tmp_path / "1" / "state", tmp_path / "2" / "state")
  with jaxmem.CheckpointManager(tmp_path, max_to_keep=5) as mgr:
    with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match="Dense_0/bias.*crc32c checksum"):
      mgr.restore(2)
    with pytest.warns(jaxmem.checkpoint.CheckpointFallbackWarning):
      _assert_same(mgr.restore(), trees[1])


def test_every_step_corrupt_raises(tmp_path):
  mgr, _ = _three_steps(tmp_path)
  for s in range(3):
    (tmp_path / str(s) / "layout" / "metadata").write_text("{not json")
  with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match="no readable checkpoint step"):
    mgr.restore()
  mgr.close()


def test_max_to_keep_and_existing_step(tmp_path):
  with jaxmem.CheckpointManager(tmp_path, max_to_keep=2) as mgr:
    for s in range(4):
      mgr.save(s, {"w": jnp.full((3,), float(s))})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 3]
    with pytest.raises(ValueError, match="step 3 already exists"):
      mgr.save(3, {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(mgr.restore()["w"], np.full(3, 3.0))


def test_checkpoint_layout_document():
  q = jaxmem.transform(jaxmem.quantize_weights(4), _params())
  layout = jaxmem.checkpoint.checkpoint_layout({"params": q})
  assert layout["format"] == "jaxmem.checkpoint/3"
  node = dict(dict(layout["tree"]["items"])["params"]["items"])["Dense_0"]
  kernel = dict(node["items"])["kernel"]
  assert kernel["class"] == "jaxmem.QArray"  # the registered name, not an import path
  assert kernel["static"]["bits"] == 4 and kernel["static"]["pack_axis"] == -2
  assert "shape" not in kernel["static"]  # derived from the leaves, never stored
  assert dict(kernel["items"])["qvalue"]["dtype"] == "uint8"


# ----------------------------------------------------------------------------- sparse / masks


@pytest.mark.parametrize("bits,encoding", [(None, "bitmask"), (8, "rice"), (4, "auto")])
def test_sparse_array_roundtrip(tmp_path, bits, encoding):
  tx = jaxmem.chain(jaxmem.magnitude_prune(0.9), jaxmem.sparsify(bits=bits, encoding=encoding))
  s = jaxmem.transform(tx, _params())
  assert isinstance(s["Dense_0"]["kernel"], jaxmem.SparseArray)
  restored = _roundtrip(tmp_path, {"params": s})
  _assert_same(restored, {"params": s})
  k, k0 = restored["params"]["Dense_0"]["kernel"], s["Dense_0"]["kernel"]
  assert (k.nnz, k.encoding, k.bits) == (k0.nnz, k0.encoding, k0.bits)
  np.testing.assert_array_equal(k.materialize(), k0.materialize())
  dtypes = _stored_dtypes(tmp_path / "ckpt", 0)
  assert dtypes["params/Dense_0/kernel/index"] == np.uint8
  if bits == 8:
    assert dtypes["params/Dense_0/kernel/values"] == np.int8


def test_gradual_prune_optimizer_state_with_masks_roundtrip(tmp_path):
  params = _params()
  opt = optax.chain(optax.adam(1e-2), jaxmem.gradual_prune(0.5, 0, 2, update_every=1))
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  restored = _roundtrip(tmp_path, {"params": params, "opt_state": state})
  _assert_same(restored, {"params": params, "opt_state": state})
  masks = restored["opt_state"][1].masks
  assert isinstance(restored["opt_state"][1], jaxmem.sparsity.GradualPruneState)
  assert masks["Dense_0"]["kernel"].dtype == jnp.bool_ and masks["Dense_0"]["bias"] is None
  # Training continues identically from the restored state.
  a, _ = opt.update(grads, state, params)
  b, _ = opt.update(grads, restored["opt_state"], restored["params"])
  _assert_same(a, b)


# ----------------------------------------------------------------------------- registry


def test_default_registry_covers_jaxmem_and_optax_states(tmp_path):
  """Restore builds only registered types; jaxmem's and optax's states need no registration."""
  params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
  opt = optax.chain(
      optax.masked(optax.adamw(1e-3), {"dense": {"kernel": True, "bias": False}}),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
      optax.apply_if_finite(optax.scale_by_rms(bias_correction=True), 3),
      jaxmem.gradual_prune(0.5, 0, 2, update_every=1),
  )
  lbfgs = optax.lbfgs()  # a state NamedTuple optax does not export (ZoomLinesearchState)
  state = {
      "opt": opt.init(params),
      "multi": optax.MultiSteps(optax.lion(1e-3), 2).init(params),
      "train": jaxmem.init_step_state(params, optax.adam(1e-3)),
      "lbfgs": lbfgs.init(params),
      "free": optax.contrib.schedule_free_adamw(1e-3).init(params),
      "tx": jaxmem.chain(jaxmem.magnitude_prune(0.5), jaxmem.quantize_int8()).init(params),
  }
  with jaxmem.CheckpointManager(tmp_path / "c", async_save=False) as mgr:
    mgr.save(0, state)
    restored = mgr.restore()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert isinstance(restored["train"], jaxmem.StepState)
  opt.update(params, restored["opt"], params)  # the restored state keeps working


# ----------------------------------------------------------------------------- format 1

V1_FIXTURE = pathlib.Path(__file__).parent / "data" / "checkpoint_v1"


def _listing(directory):
  return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def test_format1_checkpoint_still_restores(tmp_path):
  """tests/data/checkpoint_v1/ckpt was written by the format 1 code (see make_checkpoint.py)."""
  expected = dict(np.load(V1_FIXTURE / "expected.npz"))
  before = _listing(V1_FIXTURE)
  with jaxmem.CheckpointManager(V1_FIXTURE / "ckpt", read_only=True) as reader:
    assert reader.all_steps() == [7]
    assert reader.read_layout()["format"] == "jaxmem.checkpoint/1"
    abstract = reader.abstract_state()
    restored = reader.restore()
  assert _listing(V1_FIXTURE) == before  # a reader writes nothing, not even a lock file
  shutil.copytree(V1_FIXTURE / "ckpt", tmp_path / "ckpt")
  with jaxmem.CheckpointManager(tmp_path / "ckpt") as mgr:  # a writer reads it the same way
    _assert_same(mgr.restore(7), restored)

  int8, int4 = restored["int8"]["kernel"], restored["int4"]["kernel"]
  assert isinstance(int8, jaxmem.QArray) and int8.bits == 8 and int8.qvalue.dtype == jnp.int8
  assert isinstance(int4, jaxmem.QArray)
  assert (int4.bits, int4.packed, int4.group_size) == (4, True, 8)
  assert int4.qvalue.dtype == jnp.uint8 and int4.shape == (16, 8)
  sparse = restored["sparse"]["kernel"]
  assert isinstance(sparse, jaxmem.SparseArray) and sparse.shape == (16, 8)
  assert type(restored["opt_state"][0][0]) is optax.ScaleByAdamState
  assert isinstance(restored["opt_state"][1], jaxmem.sparsity.GradualPruneState)
  assert restored["opt_state"][1].masks["bias"] is None
  assert restored["step"] == 7 and type(restored["step"]) is int
  assert (restored["name"], restored["nothing"]) == ("v1-fixture", None)
  assert isinstance(restored["pair"], tuple) and restored["pair"][1].dtype == jnp.bool_
  assert isinstance(abstract["int4"]["kernel"], jaxmem.QArray)
  # Format 1 stored packed values as one flat vector; they come back in today's layout.
  assert abstract["int4"]["kernel"].qvalue == jax.ShapeDtypeStruct((8, 8), jnp.uint8)
  assert restored["int4"]["kernel"].scale.shape == (2, 8)

  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}
  legacy = {  # the QArrays' arrays as saved (old layout), checked by hand below
      k for k in expected if k.startswith(("['int4']['kernel']", "['int8']['kernel']"))}
  assert sorted(got) == sorted(expected)
  for key, want in expected.items():
    if key in legacy:
      continue
    if key != "['step']":  # a Python int: compared above
      assert got[key].dtype == want.dtype, key
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  # A hand-written reading of format 1's QArrays: flat packed nibbles (low first), grouped
  # scales of shape (in/g, 1, out); the converted QArrays dequantize to the same numbers.
  qv = expected["['int4']['kernel'].qvalue"]
  nib = np.stack([qv & 15, qv >> 4], -1).reshape(-1).astype(np.int8)
  ints = np.where(nib > 7, nib - 16, nib).reshape(16, 8)
  old_int4 = (ints.reshape(2, 8, 8) * expected["['int4']['kernel'].scale"]).reshape(16, 8)
  np.testing.assert_array_equal(np.asarray(int4.dequantize()), old_int4)
  old_int8 = expected["['int8']['kernel'].qvalue"] * expected["['int8']['kernel'].scale"]
  np.testing.assert_array_equal(np.asarray(int8.dequantize()), old_int8)
  # The restored compressed values still work.
  assert jaxmem.ops.dequantize(int4).shape == (16, 8)
  np.testing.assert_array_equal(sparse.materialize(), jaxmem.ops.sparse_unpack(sparse))


V2_FIXTURE = pathlib.Path(__file__).parent / "data" / "checkpoint_v2"


def test_format2_checkpoint_with_old_qarray_layout_restores(tmp_path):
  """tests/data/checkpoint_v2 was written by the format 2 code (see make_checkpoint.py)."""
  expected = dict(np.load(V2_FIXTURE / "expected.npz"))
  with jaxmem.CheckpointManager(V2_FIXTURE / "ckpt", read_only=True) as reader:
    assert reader.read_layout()["format"] == "jaxmem.checkpoint/2"
    abstract = reader.abstract_state()
    restored = reader.restore()
  dense = jax.tree_util.tree_flatten_with_path(restored, is_leaf=jaxmem.is_compressed)[0]
  seen = 0
  for p, x in dense:
    key = "dense:" + jax.tree_util.keystr(p)
    if key in expected:  # every compressed leaf: exactly the dense value the old code had
      seen += 1
      np.testing.assert_array_equal(np.asarray(x.materialize()), expected[key], err_msg=key)
  assert seen == 6
  stacked = restored["extra"]["stacked_int8"]
  assert stacked.shape == (3, 16, 8) and stacked.scale.shape == (3, 1, 8)
  np.testing.assert_array_equal(  # it slices per layer now
      np.asarray(stacked[1].dequantize()), expected["dense:['extra']['stacked_int8']"][1])
  table = restored["extra"]["int2_table"]["embedding"]
  assert (table.bits, table.group_size, table.qvalue.shape) == (2, 4, (16, 2))
  assert restored["extra"]["w8a8"]["kernel"].act_bits == 8
  assert jax.tree.structure(abstract) == jax.tree.structure(restored)
  # Restored with a target in today's layout, and re-saved: it is written as format 3.
  target = jax.tree.map(lambda x: x, restored)
  with jaxmem.CheckpointManager(V2_FIXTURE / "ckpt", read_only=True) as reader:
    again = reader.restore(target=target)
  _assert_same(again, restored)
  with jaxmem.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(7, restored)
    mgr.wait_until_finished()
    assert mgr.read_layout()["format"] == "jaxmem.checkpoint/3"
    _assert_same(mgr.restore(), restored)
  # A format-2 layout whose QArray's static fields were edited does not convert: corrupt.
  bad = tmp_path / "bad"
  shutil.copytree(V2_FIXTURE / "ckpt", bad)
  meta = bad / "7" / "layout" / "metadata"
  doc = json.loads(meta.read_text())
  doc["tree"] = json.loads(json.dumps(doc["tree"]).replace('"group_size": 8', '"group_size": 3'))
  doc["crc32c"] = jaxmem._src.checkpoint._layout_crc32c(doc)
  meta.write_text(json.dumps(doc))
  with jaxmem.CheckpointManager(bad, read_only=True) as reader:
    with pytest.raises(
        jaxmem.checkpoint.CheckpointCorruptError, match="format-1/2 QArray that does not"):
      reader.restore(7)


STATES_FIXTURE = pathlib.Path(__file__).parent / "data" / "checkpoint_v3_states"


def test_renamed_train_states_restore_as_step_state():
  """tests/data/checkpoint_v3_states holds a TrainState and a DistillState (make_checkpoint.py)."""
  expected = dict(np.load(STATES_FIXTURE / "expected.npz"))
  with jaxmem.CheckpointManager(STATES_FIXTURE / "ckpt", read_only=True) as reader:
    abstract = reader.abstract_state()
    restored = reader.restore()
    again = reader.restore(target=abstract)
  for name, step in (("train", 5), ("distill", 2)):
    state = restored[name]
    assert type(state) is jaxmem.StepState and int(state.step) == step
    assert type(abstract[name]) is jaxmem.StepState
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}
  # Old paths spelled the state's fields by attribute: the same names, in the new order.
  assert sorted(got) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  _assert_same(again, restored)
