"""Budget planner: the chosen remat policy x microbatch count fits and has the least overhead."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmem

N, D, F, B = 6, 32, 128, 32


def _layer(w, x):
  h = jaxmem.memory.checkpoint_name(jnp.tanh(x @ w["w1"]), "hidden")
  return x + h @ w["w2"]


def _make_step(policy, k):
  names = ("hidden",) if policy.endswith("names") else ()

  def loss(p, b):
    y = jaxmem.scan_layers(_layer, p, b["x"], policy=policy, names=names)
    return jnp.mean((y - b["y"]) ** 2)

  return jaxmem.train_step(loss, optax.sgd(0.1), microbatches=k)


@pytest.fixture(scope="module")
def setup():
  k1, k2 = jax.random.split(jax.random.key(0))
  ws = {
      "w1": jax.random.normal(k1, (N, D, F)) / np.sqrt(D),
      "w2": jax.random.normal(k2, (N, F, D)) / np.sqrt(F),
  }
  batch = {"x": jnp.ones((B, D)), "y": jnp.zeros((B, D))}
  args = (jaxmem.init_step_state(ws, optax.sgd(0.1)), batch)
  cands = jaxmem.memory.memory_candidates(
      _make_step, args, policies=("none", "full", "dots"), microbatches=(1, 2, 3)
  )
  return args, cands


def test_jaxpr_flops_counts_matmuls_scans_and_recompute():
  a, b = jnp.ones((4, 8)), jnp.ones((8, 2))
  assert jaxmem.memory.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(a, b)) == 2 * 4 * 8 * 2
  ws = jnp.ones((5, 8, 8))
  scan = jax.make_jaxpr(lambda ws, x: jaxmem.scan_layers(lambda w, h: h @ w, ws, x))(ws, a)
  assert jaxmem.memory.jaxpr_flops(scan) == 5 * 2 * 4 * 8 * 8

  def grad_flops(policy):
    f = lambda ws: jnp.sum(jaxmem.scan_layers(lambda w, h: jnp.tanh(h @ w), ws, a, policy=policy))
    return jaxmem.memory.jaxpr_flops(jax.make_jaxpr(jax.grad(f))(ws))

  # Full remat reruns each layer's forward (one matmul and one tanh) in the backward pass.
  assert grad_flops("full") - grad_flops("none") == 5 * (2 * 4 * 8 * 8 + 4 * 8)


def test_candidates_table_and_unbuildable_configs(setup):
  _, cands = setup
  assert [c.name for c in cands][:3] == ["none/mb1", "none/mb2", "none/mb3"]
  bad = [c for c in cands if c.microbatches == 3]
  assert bad
  assert all(c.profile is None and "not divisible by microbatches=3" in c.error for c in bad)
  ok = {c.name: c for c in cands if c.profile is not None}
  assert ok["full/mb1"].profile.temp_bytes < ok["none/mb1"].profile.temp_bytes
  assert ok["full/mb1"].overhead > ok["dots/mb1"].overhead >= ok["none/mb1"].overhead == 0.0
  plan = jaxmem.memory.plan_memory(None, setup[0], 10**12, candidates=cands)
  table = plan.table()
  assert "none/mb1" in table and "<- chosen" in table and "not divisible" in table


def test_every_choice_fits_and_has_least_overhead(setup):
  args, cands = setup
  built = [c for c in cands if c.profile is not None]
  sizes = sorted({c.profile.temp_bytes for c in built})
  for budget in sizes + [sizes[-1] * 10]:
    plan = jaxmem.memory.plan_memory(None, args, budget, candidates=cands)
    assert plan.chosen_bytes <= budget
    fitting = [c for c in built if c.profile.temp_bytes <= budget]
    assert plan.chosen.overhead == min(c.overhead for c in fitting)
  # A generous budget takes no remat and no accumulation; the smallest budget forces remat.
  plan = jaxmem.memory.plan_memory(None, args, sizes[-1], candidates=cands)
  assert plan.chosen.name == "none/mb1"
  assert jaxmem.memory.plan_memory(None, args, sizes[0], candidates=cands).chosen.policy == "full"


def test_budget_below_smallest_configuration_is_an_error(setup):
  args, cands = setup
  smallest = min(c.profile.temp_bytes for c in cands if c.profile is not None)
  with pytest.raises(ValueError, match=r"below the smallest configuration tried, full/mb1"):
    jaxmem.memory.plan_memory(None, args, smallest - 1, candidates=cands)
  with pytest.raises(ValueError, match="bound='peak'"):
    jaxmem.memory.plan_memory(None, args, 10**9, candidates=cands, bound="peak")


def test_total_bound_and_measured_ranking(setup):
  args, _ = setup
  plan = jaxmem.memory.plan_memory(
      _make_step, args, 10**9, policies=("none", "full"), microbatches=(1,), measure=True,
      repeats=1, bound="total", donate_argnums=0,
  )
  assert plan.chosen.ms is not None and plan.chosen_bytes == plan.chosen.profile.total_bytes
  # The donated train state is aliased by the new state; the caller's state survives timing.
  assert plan.chosen.profile.alias_bytes >= jaxmem.tree_bytes(args[0].params)
  assert not args[0].params["w1"].is_deleted()
  assert all(c.ms is not None for c in plan.candidates)
