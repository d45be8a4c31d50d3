"""Data parallel: pmap == shard_map == single-device full batch; accumulation, bf16, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import jaxmem

N_DEV = 4  # tests/conftest.py sets 4 simulated CPU devices


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
  return {
      "w1": f(8, 16),
      "b1": jnp.zeros(16),
      "frozen": jaxmem.ops.quantize(f(8, 16)),  # int8 values + float scales; never trained
      "w2": f(16, 4),
  }


def _batch(n=16, seed=1):
  rng = np.random.default_rng(seed)
  return {
      "x": jnp.asarray(rng.normal(size=(n, 8)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
  }


def _loss(p, b):
  h = jnp.tanh(b["x"] @ p["w1"] + p["b1"][None] + b["x"] @ jaxmem.ops.dequantize(p["frozen"]))
  return jnp.mean((h @ p["w2"] - b["y"]) ** 2)


def _trainable(p):
  return {k: v for k, v in p.items() if k != "frozen"}


def _rel_err(a, b):
  return max(
      float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _grad_step(params, batch):
  """A per-replica step written in pmap style: pmean of gradients over 'batch'."""
  grads = jax.grad(lambda t: _loss({**params, **t}, batch))(_trainable(params))
  return params, jax.lax.pmean(grads, "batch")


def test_pmap_and_shard_map_gradients_match_single_device():
  params, batch = _params(), _batch()
  ref = jax.grad(lambda t: _loss({**params, **t}, batch))(_trainable(params))
  got = {}
  for backend in ("pmap", "shard_map"):
    dp = jaxmem.data_parallel(_grad_step, backend=backend)
    assert dp.num_devices == N_DEV
    _, grads = dp(dp.replicate(params), batch)
    got[backend] = dp.unreplicate(grads)
    assert _rel_err(got[backend], ref) <= 1e-6, backend
  assert _rel_err(got["pmap"], got["shard_map"]) <= 1e-6
  # The trap the shard_map backend avoids: replicas' gradients are not pre-summed.
  assert _rel_err(got["shard_map"], jax.tree.map(lambda g: N_DEV * g, ref)) > 0.5


def _mask_keeper(masks):
  """Optax stand-in for pruning: bool masks + an int counter in the optimizer state."""

  def init(params):
    del params
    return (jnp.zeros([], jnp.int32), masks)

  def update(updates, state, params=None):
    del params
    count, m = state
    updates = jax.tree.map(lambda u, k: jnp.where(k, u, 0.0), updates, m)
    return updates, (count + 1, m)

  return optax.GradientTransformation(init, update)


def _optimizer(params):
  masks = {
      "w1": jnp.asarray(np.random.default_rng(2).random((8, 16)) > 0.5),
      "b1": jnp.ones(16, bool),
      "frozen": None,
      "w2": jnp.ones((16, 4), bool),
  }
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  return optax.chain(
      optax.adam(1e-2), optax.masked(optax.add_decayed_weights(1e-2), decay_mask),
      _mask_keeper(masks),
  ), masks


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_train_step_data_parallel_matches_single_device(backend):
  params, batches = _params(), [_batch(seed=1), _batch(seed=2)]
  opt, masks = _optimizer(params)

  single = jax.jit(jaxmem.train_step(_loss, opt))
  ref = jaxmem.init_step_state(params, opt)
  for b in batches:
    ref, ref_metrics = single(ref, b)

  # Data parallel over 4 devices, each accumulating over 2 microbatches of 2 examples.
  dp = jaxmem.data_parallel(
      jaxmem.train_step(_loss, opt, axis_name="batch", microbatches=2), backend=backend
  )
  state = dp.replicate(jaxmem.init_step_state(params, opt))
  for b in batches:
    state, metrics = dp(state, b)
  state, metrics = dp.unreplicate(state), dp.unreplicate(metrics)

  assert _rel_err(_trainable(state.params), _trainable(ref.params)) <= 1e-6
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  assert int(state.step) == 2 and int(state.opt_state[2][0]) == 2
  # Frozen quantized leaf: bit-identical; pruned weights never move.
  assert isinstance(state.params["frozen"], jaxmem.QArray)
  np.testing.assert_array_equal(state.params["frozen"].qvalue, params["frozen"].qvalue)
  moved = np.asarray(state.params["w1"] != params["w1"])
  assert not moved[~np.asarray(masks["w1"])].any() and moved[np.asarray(masks["w1"])].all()


def test_microbatches_equal_full_batch_and_trainable_subset():
  params, batch = _params(), _batch()
  opt = optax.sgd(0.5)
  full = jaxmem.train_step(_loss, opt)(jaxmem.init_step_state(params, opt), batch)[0]
  micro = jaxmem.train_step(_loss, opt, microbatches=4)(
      jaxmem.init_step_state(params, opt), batch
  )[0]
  assert _rel_err(_trainable(micro.params), _trainable(full.params)) <= 1e-6

  state = jaxmem.init_step_state(params, opt, trainable="w2")
  new = jaxmem.train_step(_loss, opt, trainable="w2")(state, batch)[0]
  np.testing.assert_array_equal(new.params["w1"], params["w1"])
  g = jax.grad(lambda w2: _loss({**params, "w2": w2}, batch))(params["w2"])
  np.testing.assert_allclose(new.params["w2"], params["w2"] - 0.5 * g, rtol=1e-6)


def test_extra_step_args_reach_the_loss_whole_and_get_no_gradient():
  params, batch = _params(), _batch()
  opt = optax.sgd(0.5)
  # A scalar and a leading size of 3: splitting either into 4 microbatches would fail.
  scaled = lambda p, b, s, v: s * _loss(p, b) + jnp.sum(v) * 0.0
  step = jaxmem.train_step(scaled, opt, microbatches=4)
  new, metrics = jax.jit(step)(jaxmem.init_step_state(params, opt), batch, 0.5, jnp.ones(3))
  ref, ref_metrics = jaxmem.train_step(lambda p, b: 0.5 * _loss(p, b), opt)(
      jaxmem.init_step_state(params, opt), batch
  )
  assert _rel_err(_trainable(new.params), _trainable(ref.params)) <= 1e-6
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  with pytest.raises(TypeError, match=r"state is a dict, not a jaxmem\.StepState"):
    step(params, batch, 0.5, jnp.ones(3))


def test_bf16_compute_keeps_f32_master_params():
  params, batch = _params(), _batch()
  opt = optax.adam(1e-2)
  step = jaxmem.train_step(_loss, opt, compute_dtype=jnp.bfloat16)
  state = jaxmem.init_step_state(params, opt)
  jaxpr = str(jax.make_jaxpr(step)(state, batch))
  assert "bf16[16,8]" in jaxpr and "dot_general" in jaxpr  # the forward runs in bfloat16
  new, metrics = jax.jit(step)(state, batch)
  for leaf in jax.tree.leaves((_trainable(new.params), new.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32)
  f32_loss = _loss(params, batch)
  assert metrics["loss"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["loss"], f32_loss, rtol=3e-2)
  assert float(metrics["loss"]) != float(f32_loss)  # really computed at lower precision


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_batch_not_divisible_is_a_clear_error(backend):
  dp = jaxmem.data_parallel(_grad_step, backend=backend)
  with pytest.raises(ValueError, match=r"leaf 'x' has leading size 6, not divisible by the 4"):
    dp(dp.replicate(_params()), _batch(6))


def test_microbatch_not_divisible_is_a_clear_error():
  opt = optax.sgd(0.1)
  step = jaxmem.train_step(_loss, opt, microbatches=3)
  with pytest.raises(ValueError, match=r"'x' has leading size 16, not divisible by microbatches=3"):
    step(jaxmem.init_step_state(_params(), opt), _batch())


def test_state_is_donated_and_caller_arrays_survive():
  params, batch = _params(), _batch()
  opt = optax.adam(1e-3)
  dp = jaxmem.data_parallel(jaxmem.train_step(_loss, opt, axis_name="batch"))
  host_state = jaxmem.init_step_state(params, opt)
  state = dp.replicate(host_state)
  compiled = dp.lower(state, batch).compile()
  prof = jaxmem.memory.compiled_profile(compiled, params=params)
  # The float state (params, adam mu/nu, counters) is updated in place.
  assert prof.alias_bytes >= 3 * jaxmem.tree_bytes(_trainable(params))
  new_state, _ = dp(state, batch)
  assert state.params["w1"].is_deleted()
  assert not host_state.params["w1"].is_deleted()  # replicate() copied
  assert not new_state.params["w1"].is_deleted()


def test_data_parallel_argument_errors():
  with pytest.raises(ValueError, match="backend='xla'"):
    jaxmem.data_parallel(_grad_step, backend="xla")
  mesh = Mesh(np.array(jax.devices()), ("data",))
  with pytest.raises(ValueError, match=r"mesh axes \('data',\) must be exactly \('batch',\)"):
    jaxmem.data_parallel(_grad_step, mesh=mesh)
  dp = jaxmem.data_parallel(_grad_step, mesh=Mesh(np.array(jax.devices()[:2]), ("batch",)))
  _, g = dp(dp.replicate(_params()), _batch(8))
  ref = jax.grad(lambda t: _loss({**_params(), **t}, _batch(8)))(_trainable(_params()))
  assert dp.num_devices == 2 and _rel_err(dp.unreplicate(g), ref) <= 1e-6


def test_mesh_from_axes_resolves_minus_one_and_checks_sizes():
  mesh = jaxmem.distributed.mesh_from_axes({"data": -1, "model": 2})
  assert mesh.shape == {"data": jax.device_count() // 2, "model": 2}
  with pytest.raises(ValueError, match="does not cover the 4 devices"):
    jaxmem.distributed.mesh_from_axes({"data": 3})
  with pytest.raises(ValueError, match="more than one -1"):
    jaxmem.distributed.mesh_from_axes({"data": -1, "model": -1})
  with pytest.raises(ValueError, match="batch_size=6 does not divide over the 4 devices"):
    jaxmem.distributed.mesh_from_axes({"data": -1}, batch_size=6)
