"""Gradual pruning in optax: cubic schedule, exact zeros after jitted updates, masks in state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxmem


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"a": {"kernel": f(16, 8), "bias": f(8)}, "b": {"kernel": f(8, 4), "bias": f(4)}}


def _ref_sparsity(t, s_f, t0, t1, dt, s_i=0.0):
  """Zhu & Gupta 2017, held constant between mask updates (hand-written)."""
  if t < t0:
    return 0.0
  last = t1 if t >= t1 else min(t0 + ((t - t0) // dt) * dt, t1)
  frac = 1.0 if t1 == t0 else (last - t0) / (t1 - t0)
  return s_f + (s_i - s_f) * (1 - frac) ** 3


@pytest.mark.parametrize("t0,t1,dt,s_i", [(10, 50, 10, 0.0), (0, 7, 3, 0.2), (5, 5, 1, 0.0)])
def test_schedule_matches_formula(t0, t1, dt, s_i):
  sched = jax.jit(
      jaxmem.sparsity.sparsity_schedule(0.9, t0, t1, update_every=dt, initial_sparsity=s_i))
  for t in range(0, t1 + 15):
    assert float(sched(t)) == pytest.approx(_ref_sparsity(t, 0.9, t0, t1, dt, s_i), abs=1e-6), t


def _run(tx, params, steps, seed=0):
  """Jitted steps with random gradients; checks exact zeros after every update."""
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  keys = jax.random.split(jax.random.key(seed), steps)
  history = []
  for t in range(steps):
    grads = jax.tree.map(lambda x, k=keys[t]: jax.random.normal(k, x.shape), params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks = state[-1].masks
    for k in ("a", "b"):
      mk = np.asarray(masks[k]["kernel"])
      w = np.asarray(params[k]["kernel"])
      assert (w[~mk] == 0).all(), (t, k)  # exactly zero, not merely small
      assert masks[k]["bias"] is None
    history.append((params, masks))
  return params, state, history


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradual_prune_exact_sparsity_and_zeros(scope):
  params = _params()
  s_f, t0, t1, dt = 0.8, 2, 12, 3
  prune = jaxmem.gradual_prune(s_f, t0, t1, update_every=dt, scope=scope)
  tx = optax.chain(optax.adam(0.05), prune)
  params, state, history = _run(tx, params, 18)
  sizes = {"a": 128, "b": 32}
  for t, (_, masks) in enumerate(history):
    s_t = _ref_sparsity(t, s_f, t0, t1, dt)
    pruned = {k: int((~np.asarray(masks[k]["kernel"])).sum()) for k in sizes}
    if scope == "layer":
      for k, n in sizes.items():
        assert pruned[k] == int(np.floor(s_t * n + 0.5)), (t, k)
    else:
      assert sum(pruned.values()) == int(np.floor(s_t * 160 + 0.5)), t
    if t:  # masks only shrink
      prev = history[t - 1][1]
      for k in sizes:
        assert not (np.asarray(masks[k]["kernel"]) & ~np.asarray(prev[k]["kernel"])).any()
  assert jaxmem.sparsity.tree_sparsity(params) == pytest.approx(0.8)
  assert int(state[-1].count) == 18
  # Biases are never pruned.
  assert all(bool((params[k]["bias"] != 0).all()) for k in sizes)


def test_gradual_keeps_largest_weights_after_the_step():
  params = {"kernel": jnp.array([[1.0, -5.0], [3.0, 0.5]])}
  tx = optax.chain(optax.sgd(1.0), jaxmem.gradual_prune(0.5, 0, 0, update_every=1))
  state = tx.init(params)
  grads = {"kernel": jnp.array([[0.0, 0.0], [0.0, -4.0]])}  # 0.5 -> 4.5 after the step
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new["kernel"]), [[0.0, -5.0], [0.0, 4.5]])


def test_keep_masks_matches_plain_optimizer_on_kept_weights():
  params = _params(1)
  masks = jaxmem.sparsity.nm_masks(params, 2, 4)
  start = jaxmem.sparsity.apply_masks(params, masks)
  tx = optax.chain(optax.adam(0.1), jaxmem.keep_masks(masks))
  plain = optax.adam(0.1)
  s, ps = tx.init(start), plain.init(start)
  p = start
  for t in range(4):
    g = jax.tree.map(lambda x, t=t: jnp.cos(x + t), p)
    u, s = jax.jit(tx.update)(g, s, p)
    pu, ps = jax.jit(plain.update)(g, ps, p)
    new = optax.apply_updates(p, u)
    ref = optax.apply_updates(p, pu)
    for k in ("a", "b"):
      mk = np.asarray(masks[k]["kernel"])
      np.testing.assert_array_equal(np.asarray(new[k]["kernel"])[~mk], 0)
      np.testing.assert_allclose(np.asarray(new[k]["kernel"])[mk], np.asarray(ref[k]["kernel"])[mk],
                                 rtol=1e-6)
      np.testing.assert_allclose(np.asarray(new[k]["bias"]), np.asarray(ref[k]["bias"]), rtol=1e-6)
    p = new
  # On its own, keep_masks passes kept updates through bit for bit and sends pruned weights to 0.
  alone = jaxmem.keep_masks(masks)
  u, _ = alone.update(g, alone.init(params), params)
  for k in ("a", "b"):
    mk = np.asarray(masks[k]["kernel"])
    np.testing.assert_array_equal(np.asarray(u[k]["kernel"])[mk], np.asarray(g[k]["kernel"])[mk])
    np.testing.assert_array_equal(np.asarray(u[k]["kernel"])[~mk],
                                  -np.asarray(params[k]["kernel"])[~mk])
    np.testing.assert_array_equal(np.asarray(u[k]["bias"]), np.asarray(g[k]["bias"]))


def test_state_is_arrays_and_works_with_sharded_params():
  params = _params(2)
  tx = optax.chain(optax.adam(0.05), jaxmem.gradual_prune(0.5, 0, 2, update_every=1))
  state = tx.init(params)
  prune_state = state[-1]
  assert isinstance(prune_state, jaxmem.sparsity.GradualPruneState)
  assert prune_state.count.dtype == jnp.int32 and prune_state.count.shape == ()
  assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(prune_state.masks))
  abstract = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)

  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  repl = NamedSharding(mesh, PartitionSpec())
  rows = NamedSharding(mesh, PartitionSpec("data"))
  shard = lambda t: jax.tree.map(
      lambda x: jax.device_put(x, rows if x.ndim and x.shape[0] % 4 == 0 else repl), t)
  grads = jax.tree.map(jnp.sin, params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  u_ref, s_ref = step(grads, state, params)
  u_sh, s_sh = step(shard(grads), shard(state), shard(params))
  for a, b in zip(jax.tree.leaves((u_ref, s_ref)), jax.tree.leaves((u_sh, s_sh))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_bad_schedules():
  with pytest.raises(ValueError, match="end_step=5 precedes begin_step=10"):
    jaxmem.gradual_prune(0.9, 10, 5)
  with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
    jaxmem.gradual_prune(1.0, 0, 5)
  with pytest.raises(ValueError, match="update_every"):
    jaxmem.gradual_prune(0.9, 0, 5, update_every=0)
  with pytest.raises(ValueError, match="initial_sparsity"):
    jaxmem.gradual_prune(0.5, 0, 5, initial_sparsity=0.6)
  with pytest.raises(ValueError, match="scope"):
    jaxmem.gradual_prune(0.5, 0, 5, scope="net")


def test_mismatched_masks_and_params_name_the_path():
  params = _params()
  other = {"a": params["a"]}
  with pytest.raises(ValueError, match=r"only in params: \['b/bias', 'b/kernel'\]"):
    jaxmem.keep_masks(jaxmem.sparsity.magnitude_masks(other, 0.5)).init(params)
  masks = jaxmem.sparsity.magnitude_masks(params, 0.5)
  masks["a"]["kernel"] = jnp.ones((3, 3), bool)
  with pytest.raises(ValueError, match="'a/kernel': mask shape"):
    jaxmem.keep_masks(masks).init(params)
  tx = jaxmem.gradual_prune(0.5, 0, 2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="only in params"):
    tx.update(other, state, params)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="'a/kernel'.*already a QArray"):
    jaxmem.gradual_prune(0.5, 0, 2).init(jaxmem.transform(jaxmem.quantize_int8(), params))
  with pytest.raises(ValueError, match="matches no leaf"):
    jaxmem.gradual_prune(0.5, 0, 2, where="c/kernel").init(params)
