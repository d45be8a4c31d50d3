"""Compressed params sharded over a Mesh: partition_specs, sharded execution, Orbax restore.

4 simulated CPU devices (tests/conftest.py), mesh 2 x 2 (``data``, ``model``): a
column-parallel (``up``: kernel ``P(None, 'model')``) and a row-parallel (``down``:
``P('model', None)``) layer.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem

FLOAT_SPECS = {
    "up": {"kernel": P(None, "model"), "bias": P("model")},
    "down": {"kernel": P("model", None), "bias": P()},
}
RECIPES = {
    "int8_weight": lambda: jaxmem.quantize_int8(),
    "int8_dynamic": lambda: jaxmem.quantize_dynamic_int8(),
    "int4_g32": lambda: jaxmem.quantize_int4(group_size=32),
    "int4_g32_asym": lambda: jaxmem.quantize_int4(group_size=32, symmetric=False),
    # Rotated along the input axis, which 'down' shards: blocks of 32 within each shard.
    "int8_dynamic_rot": lambda: jaxmem.quantize_dynamic_int8(rotate=32),
    "int4_g32_f16": lambda: jaxmem.quantize_int4(group_size=32, scale_dtype=jnp.float16),
}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name="down")(jax.nn.relu(nn.Dense(256, name="up")(x)))


def _mesh(shape=(2, 2)):
  return Mesh(np.array(jax.devices()[:4]).reshape(shape), ("data", "model"))


def _setup(recipe):
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (8, 64))
  params = model.init(jax.random.key(0), x)["params"]
  return model, x, jaxmem.transform(RECIPES[recipe](), params)


def _bytes_on(tree, device):
  return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
             if s.device == device)


def test_partition_specs_follow_the_float_specs_leaf_by_leaf():
  _, _, q = _setup("int4_g32_asym")
  specs = jaxmem.partition_specs(q, FLOAT_SPECS, mesh=_mesh())
  up, down = specs["up"]["kernel"], specs["down"]["kernel"]
  assert isinstance(up, jaxmem.QArray)
  # Column-parallel: values and per-column scales/zero points split along 'model'.
  assert (up.qvalue, up.scale, up.offset) == (P(None, "model"),) * 3
  # Row-parallel: values split along the (packed, grouped) input axis, and so are the
  # groups' scales and zero points.
  assert (down.qvalue, down.scale, down.offset) == (P("model", None),) * 3
  assert specs["down"]["bias"] == P() and specs["up"]["bias"] == P("model")
  # Per-channel int8: a row-parallel layer's one scale per column is replicated.
  _, _, q8 = _setup("int8_weight")
  d8 = jaxmem.partition_specs(q8, FLOAT_SPECS)["down"]["kernel"]
  assert (d8.qvalue, d8.scale, d8.offset) == (P("model", None), P(None, None), None)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_sharded_execution_equals_single_device_and_halves_weight_bytes(recipe):
  model, x, q = _setup(recipe)
  mesh = _mesh()
  specs = jaxmem.partition_specs(q, FLOAT_SPECS, mesh=mesh)
  sharded = jax.device_put(q, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  f = jax.jit(lambda q, x: jaxmem.apply(model, {"params": q}, x))
  want = f(q, x)
  got = f(sharded, jax.device_put(x, NamedSharding(mesh, P("data", None))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  dev = jax.devices()[0]
  for name in ("up", "down"):
    k, ks = q[name]["kernel"], sharded[name]["kernel"]
    assert _bytes_on(ks.qvalue, dev) * 2 == k.qvalue.nbytes  # exactly half the values
    if k.group_size or name == "up":  # grouped or per-column scales shard too
      assert _bytes_on(ks.scale, dev) * 2 == k.scale.nbytes


def test_partition_specs_errors_name_the_leaf_and_fix():
  _, _, q = _setup("int4_g32")
  with pytest.raises(ValueError, match=r"has no spec for 'down/bias'"):
    jaxmem.partition_specs(q, {"up": FLOAT_SPECS["up"], "down": {"kernel": P()}})
  with pytest.raises(ValueError, match=r"'up/kernel'.*2 axes"):
    jaxmem.partition_specs(q, dict(FLOAT_SPECS, up={"kernel": P(None, None, "model"),
                                                    "bias": P()}))
  # 64 input rows packed 2 per byte and grouped by 32: 8-way would split groups and bytes.
  mesh8 = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "model"))
  bad = {"up": FLOAT_SPECS["up"], "down": {"kernel": P(("data", "model"), None), "bias": P()}}
  specs = jaxmem.partition_specs(q, bad, mesh=mesh8)  # 4 shards of 256 rows: fine
  assert specs["down"]["kernel"].scale == P(("data", "model"), None)
  narrow = jaxmem.transform(jaxmem.quantize_int4(group_size=128), {"down": {"kernel": jnp.ones(
      (256, 8))}})
  with pytest.raises(ValueError, match=r"'down/kernel' scale has 2 entries on axis 0.*size 4"):
    jaxmem.partition_specs(narrow, {"down": {"kernel": P("model", None)}}, mesh=mesh8)


def test_orbax_restore_of_sharded_compressed_params_same_and_other_mesh(tmp_path):
  model, x, q = _setup("int4_g32_asym")
  mesh = _mesh()
  specs = jaxmem.partition_specs(q, FLOAT_SPECS, mesh=mesh)
  sharded = jax.device_put(q, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  with jaxmem.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(0, {"params": sharded})
    mgr.wait_until_finished()
    # Same mesh: the target's shardings are used.
    same = mgr.restore(target={"params": sharded})["params"]
    # Another mesh (4-way 'model'): shardings from the specs on the new mesh.
    mesh4 = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "model"))
    specs4 = jaxmem.partition_specs(q, FLOAT_SPECS, mesh=mesh4)
    target4 = jax.device_put(q, jax.tree.map(lambda s: NamedSharding(mesh4, s), specs4))
    other = mgr.restore(target={"params": target4})["params"]
  for got in (same, other):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(q), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert same["down"]["kernel"].qvalue.sharding.spec == P("model", None)
  assert other["down"]["kernel"].qvalue.sharding.mesh.shape["model"] == 4
  dev = jax.devices()[0]
  assert _bytes_on(other["down"]["kernel"].qvalue, dev) * 4 == q["down"]["kernel"].qvalue.nbytes
  f = jax.jit(lambda q, x: jaxmem.apply(model, {"params": q}, x))
  np.testing.assert_allclose(np.asarray(f(other, x)), np.asarray(f(q, x)), rtol=1e-5, atol=1e-6)
