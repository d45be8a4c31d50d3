"""jaxmem.memory.plan_training: remat x microbatches x FSDP x optimizer x offload under a budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import jaxmem

L, D, B = 4, 128, 8


def _make_loss(policy):
  layer = lambda w, h: jnp.tanh(h @ w)

  def loss(p, b):
    h = jaxmem.scan_layers(layer, p["layers"], b["x"], policy=policy)
    return jnp.mean((h @ p["head"] - b["y"]) ** 2)

  return loss


def _setup():
  rng = np.random.default_rng(0)
  params = {"layers": jnp.asarray(rng.normal(size=(L, D, D)) / np.sqrt(D), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(D, 4)), jnp.float32)}
  batch = {"x": jnp.ones((B, D)), "y": jnp.zeros((B, 4))}
  return params, batch, Mesh(np.array(jax.devices()[:4]), ("fsdp",))


OPTIMIZERS = {"adamw": optax.adamw(1e-3), "adamw_8bit": jaxmem.optim.adamw_8bit(1e-3)}


def _direct_total(params, batch, mesh, policy, k, sharded, opt):
  """Hand-built reference: the same configuration compiled directly."""
  step = jaxmem.fsdp_train_step(_make_loss(policy), OPTIMIZERS[opt], mesh, microbatches=k,
                                min_size=2**14 if sharded else 2**62)
  state = step.abstract_state(params)
  m = step.lower(state, step.shard_batch(batch)).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def test_every_combination_is_compiled_and_the_cheapest_fitting_one_chosen():
  params, batch, mesh = _setup()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  kw = dict(mesh=mesh, optimizers=OPTIMIZERS, policies=("none", "full"), microbatches=(1, 3),
            fsdp=(False, True))
  plan = jaxmem.memory.plan_training(_make_loss, abstract, batch, 10**9, **kw)
  assert len(plan.candidates) == 2 * 2 * 2 * 2
  names = {c.name for c in plan.candidates}
  assert "full/mb1/fsdp/adamw_8bit" in names and "none/mb1/replicated/adamw" in names
  bad = [c for c in plan.candidates if c.microbatches == 3]  # 8 rows do not split in 3
  assert bad and all(c.profile is None and c.error for c in bad)
  ok = [c for c in plan.candidates if c.profile is not None]
  for c in ok[:3] + [c for c in ok if c.name == "full/mb1/fsdp/adamw_8bit"]:
    assert c.bytes("total") == _direct_total(params, batch, mesh, c.policy, c.microbatches,
                                             c.fsdp, c.optimizer), c.name
  # With room for everything: the least overhead (no remat, replicated, fp32 AdamW).
  assert plan.chosen.name == "none/mb1/replicated/adamw" and plan.chosen.overhead == 0.0
  # A budget only sharded configs meet: the cheapest of those.
  replicated = min(c.bytes("total") for c in ok if not c.fsdp)
  tight = jaxmem.memory.plan_training(_make_loss, abstract, batch, replicated - 1, **kw)
  fitting = [c for c in tight.candidates if c.profile is not None
             and c.bytes("total") <= replicated - 1]
  assert fitting and all(c.fsdp for c in fitting)
  assert tight.chosen.overhead == min(c.overhead for c in fitting)
  assert tight.chosen.bytes("total") <= replicated - 1
  table = tight.table()
  assert "<- chosen" in table and "full/mb1/fsdp/adamw_8bit" in table
  # Below every candidate: an error naming the smallest.
  smallest = min(ok, key=lambda c: c.bytes("total"))
  with pytest.raises(ValueError, match=f"smallest configuration tried, {smallest.name}"):
    jaxmem.memory.plan_training(_make_loss, abstract, batch, 1000, **kw)


def test_offload_candidates_and_measured_choice():
  if not jaxmem.memory.offload_supported():
    pytest.skip("this backend has no pinned_host memory")
  params, batch, mesh = _setup()
  plan = jaxmem.memory.plan_training(
      _make_loss, params, batch, 10**9, mesh=mesh, optimizers={"sgd": optax.sgd(0.1)},
      policies=("none",), microbatches=(1,), fsdp=(True,), offload=((), ("opt_state",)),
      measure=True, repeats=1)
  assert [c.name for c in plan.candidates] == ["none/mb1/fsdp/sgd",
                                               "none/mb1/fsdp/sgd/offload:opt_state"]
  assert all(c.ms is not None and c.ms > 0 for c in plan.candidates)
  assert plan.candidates[1].overhead > plan.candidates[0].overhead


@pytest.mark.parametrize("kw,match", [
    (dict(optimizers={}), "non-empty mapping"),
    (dict(policies=()), "policies must be a non-empty"),
    (dict(policies=("sometimes",)), "unknown remat policy 'sometimes'"),
    (dict(bound="peak"), "bound='peak'"),
    (dict(offload=(("grads",),)), "no configuration could be built.*offload"),
])
def test_bad_arguments_are_clear_errors(kw, match):
  params, batch, mesh = _setup()
  args = dict(mesh=mesh, optimizers={"sgd": optax.sgd(0.1)}, policies=("none",),
              microbatches=(1,), fsdp=(True,))
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    jaxmem.memory.plan_training(_make_loss, params, batch, 10**9, **args)
