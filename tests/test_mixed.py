"""Mixed precision under a byte budget: sensitivity per leaf and the greedy choice."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem


def _params():
  rng = np.random.default_rng(0)
  return {
      name: {"kernel": jnp.asarray(rng.normal(size=(128, n)) * s, jnp.float32)}
      for name, n, s in [("a", 16, 1.0), ("b", 32, 3.0), ("c", 64, 0.1)]
  }


def _sq_err(params):
  def metric(p):
    total = 0.0
    for k in params:
      w = p[k]["kernel"]
      w = w.materialize() if jaxmem.is_compressed(w) else w
      total += float(jnp.sum((w - params[k]["kernel"]) ** 2))
    return total

  return metric


def test_leaf_sensitivity_matches_hand_computed_errors():
  params = _params()
  low = jaxmem.transform(jaxmem.quantize_int4(64), params)
  sens = jaxmem.memory.leaf_sensitivity(_sq_err(params), params, low)
  assert list(sens) == ["a/kernel", "b/kernel", "c/kernel"]
  for k in params:
    want = float(jnp.sum((low[k]["kernel"].dequantize() - params[k]["kernel"]) ** 2))
    np.testing.assert_allclose(sens[f"{k}/kernel"], want, rtol=1e-5)
  # Swapping in the compressed leaf itself gives the same numbers here.
  direct = jaxmem.memory.leaf_sensitivity(_sq_err(params), params, low, materialize=False)
  np.testing.assert_allclose([direct[p] for p in sens], list(sens.values()), rtol=1e-5)
  with pytest.raises(ValueError, match="no leaf at.*'z/kernel'"):
    jaxmem.memory.leaf_sensitivity(_sq_err(params), params, low, paths=["z/kernel"])


def test_allocate_bits_greedy_by_gain_per_byte_within_budget():
  params = _params()
  low = jaxmem.transform(jaxmem.quantize_int4(64), params)
  high = jaxmem.transform(jaxmem.quantize_int8(), params)
  extra = {
      f"{k}/kernel": jaxmem.tree_bytes(high[k]["kernel"]) - jaxmem.tree_bytes(low[k]["kernel"])
      for k in params
  }
  # Hand-made gains: per extra byte, c > a > b.
  sens = {"a/kernel": 2.0 * extra["a/kernel"], "b/kernel": 1.0 * extra["b/kernel"],
          "c/kernel": 3.0 * extra["c/kernel"]}
  base = jaxmem.tree_bytes(low)
  # Room for c and a, not b: b is skipped.
  budget = base + extra["c/kernel"] + extra["a/kernel"] + extra["b/kernel"] - 1
  mixed, chosen = jaxmem.memory.allocate_bits(low, high, sens, budget)
  assert chosen == ["c/kernel", "a/kernel"]
  assert jaxmem.tree_bytes(mixed) == base + extra["c/kernel"] + extra["a/kernel"] <= budget
  assert mixed["c"]["kernel"] is high["c"]["kernel"] and mixed["b"]["kernel"] is low["b"]["kernel"]
  # Too little room for c: the smaller a still fits.
  _, chosen = jaxmem.memory.allocate_bits(low, high, sens, base + extra["a/kernel"])
  assert chosen == ["a/kernel"]
  # Zero gain is never paid for.
  _, chosen = jaxmem.memory.allocate_bits(low, high, {"a/kernel": 0.0}, budget)
  assert chosen == []


def test_allocate_bits_errors_name_the_problem():
  params = _params()
  low = jaxmem.transform(jaxmem.quantize_int4(64), params)
  high = jaxmem.transform(jaxmem.quantize_int8(), params)
  with pytest.raises(ValueError, match="low-precision tree alone takes"):
    jaxmem.memory.allocate_bits(low, high, {}, jaxmem.tree_bytes(low) - 1)
  with pytest.raises(ValueError, match="not leaves of `low`"):
    jaxmem.memory.allocate_bits(low, high, {"kernel": 1.0}, 10**9)
  with pytest.raises(ValueError, match="differ in structure"):
    jaxmem.memory.mix_leaves(low, {"a": high["a"]}, [])
