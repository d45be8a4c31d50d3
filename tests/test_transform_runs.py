"""jaxmem.transform runs each stage of chain / partition / masked once, with typed states."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem


def _counting(calls, name, scale=2.0):
  """A stateless leafwise transform that counts how often its update runs."""
  inner = jaxmem.leafwise(lambda p, x: x * scale, where=".*kernel", name=name)

  def update(params, state):
    calls[name] = calls.get(name, 0) + 1
    return inner.update(params, state)

  return jaxmem.ParamTransform(inner.init, update)


PARAMS = {"a": {"kernel": jnp.ones((4, 2))}, "b": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}


@pytest.mark.parametrize("build", ["chain", "nested", "partition", "masked"])
def test_each_stage_updates_once_under_transform(build):
  calls = {}
  one, two = _counting(calls, "one"), _counting(calls, "two", 3.0)
  tx = {
      "chain": lambda: jaxmem.chain(one, two),
      "nested": lambda: jaxmem.chain(jaxmem.chain(one), jaxmem.partition([("a/.*", two)])),
      "partition": lambda: jaxmem.partition([("a/.*", jaxmem.chain(one, two)), ("b/.*", None)]),
      "masked": lambda: jaxmem.masked(jaxmem.chain(one, two), "a/.*"),
  }[build]()
  out = jaxmem.transform(tx, PARAMS)
  assert calls == {"one": 1, "two": 1}, calls
  # The result is the same as the explicit init + update (which runs inits on each
  # stage's output, so it does run updates in init).
  ref, _ = tx.update(PARAMS, tx.init(PARAMS))
  for k in ("a", "b"):
    np.testing.assert_array_equal(out[k]["kernel"], ref[k]["kernel"])
  np.testing.assert_array_equal(out["a"]["kernel"], np.full((4, 2), 6.0))  # 1 * 2 * 3
  want_b = {"chain": 6.0, "nested": 2.0, "partition": 1.0, "masked": 1.0}[build]
  np.testing.assert_array_equal(out["b"]["kernel"], np.full((2, 2), want_b))


def test_partition_and_masked_states_are_typed():
  tx = jaxmem.partition([("a/.*", jaxmem.quantize_int8()), ("b/.*", None)])
  state = tx.init(PARAMS)
  assert isinstance(state, jaxmem.PartitionState) and len(state.inner_states) == 2
  _, new = tx.update(PARAMS, state)
  assert isinstance(new, jaxmem.PartitionState)
  _, legacy = tx.update(PARAMS, tuple(state.inner_states))  # a plain tuple (old checkpoints)
  assert isinstance(legacy, jaxmem.PartitionState)
  m = jaxmem.masked(jaxmem.quantize_int8(), "a/.*")
  assert isinstance(m.init(PARAMS), jaxmem.MaskedState)
  layout = jaxmem.checkpoint.checkpoint_layout({"state": state})  # registered under a stable name
  assert dict(layout["tree"]["items"])["state"]["class"] == "jaxmem.PartitionState"
