"""Transform core: path rules, chain, partition, masked; Linen, NNX and dict params; jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmem
from jaxmem import testing


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "encoder": {
          "layer_0": {"kernel": jax.random.normal(k[0], (16, 8)), "bias": jnp.zeros(8)},
          "layer_1": {"kernel": jax.random.normal(k[1], (8, 8)), "bias": jnp.zeros(8)},
      },
      "embed": {"embedding": jax.random.normal(k[2], (10, 16))},
      "step": jnp.zeros((), jnp.int32),
      "mask": jnp.ones((8,), jnp.bool_),
  }


def test_paths_and_default_selection():
  p = _params()
  paths = [path for path, _ in jaxmem.leaves_with_paths(p)]
  assert "encoder/layer_0/kernel" in paths and "embed/embedding" in paths
  q = jaxmem.transform(jaxmem.quantize_int8(), p)
  assert isinstance(q["encoder"]["layer_0"]["kernel"], jaxmem.QArray)
  assert isinstance(q["embed"]["embedding"], jaxmem.QArray)
  assert q["embed"]["embedding"].scale.shape == (10, 1)  # per row (token) for tables
  assert q["encoder"]["layer_0"]["bias"] is p["encoder"]["layer_0"]["bias"]
  assert q["step"] is p["step"] and q["mask"] is p["mask"]  # ints/bools never touched


def test_regex_rules_select_and_first_match_wins():
  p = _params()
  tx = jaxmem.partition(
      [
          ("encoder/layer_0/.*", None),  # exempt the first layer
          (".*kernel", jaxmem.quantize_int8()),
          (".*embedding", jaxmem.quantize_weights(4, group_size=2, channel_axes=(0,),
                                                  group_axis=1)),
      ]
  )
  q = jaxmem.transform(tx, p)
  assert not isinstance(q["encoder"]["layer_0"]["kernel"], jaxmem.QArray)
  assert q["encoder"]["layer_1"]["kernel"].bits == 8
  assert q["embed"]["embedding"].bits == 4 and q["embed"]["embedding"].packed


def test_rule_matching_nothing_is_an_error():
  p = _params()
  with pytest.raises(ValueError, match=r"'encoder/layer_9/kernel' matches no leaf.*Paths are"):
    jaxmem.transform(jaxmem.quantize_int8("encoder/layer_9/kernel"), p)
  tx = jaxmem.partition([(".*kernel", jaxmem.quantize_int8()), ("encoder/.*kernel", None)])
  with pytest.raises(ValueError, match="matches no float leaf as its first match"):
    jaxmem.transform(tx, p)


def test_integer_leaf_selected_explicitly_is_an_error():
  with pytest.raises(ValueError, match="selects leaf 'step' of dtype int32"):
    jaxmem.transform(jaxmem.quantize_int8(["step"]), _params())


def test_predicate_selection_skips_ints():
  p = _params()
  q = jaxmem.transform(jaxmem.quantize_int8(lambda path, x: x.ndim >= 1), p)
  assert isinstance(q["encoder"]["layer_0"]["bias"], jaxmem.QArray)
  assert q["step"].dtype == jnp.int32 and q["mask"].dtype == jnp.bool_


def test_chain_composes_and_keeps_states():
  p = _params()
  calls = []

  def record(path, x):
    calls.append(path)
    return x * 2.0

  tx = jaxmem.chain(jaxmem.leafwise(record, ".*bias"), jaxmem.quantize_int8())
  state = tx.init(p)
  assert isinstance(state, tuple) and len(state) == 2
  q, state2 = tx.update(p, state)
  assert isinstance(q["encoder"]["layer_1"]["kernel"], jaxmem.QArray)
  assert "encoder/layer_0/bias" in calls
  with pytest.raises(TypeError, match="not a ParamTransform"):
    jaxmem.chain(jaxmem.quantize_int8(), lambda p: p)


def test_quantizing_twice_is_an_error_naming_the_path():
  tx = jaxmem.chain(jaxmem.quantize_int8(), jaxmem.quantize_int8())
  with pytest.raises(ValueError, match="'embed/embedding'.*already a QArray"):
    jaxmem.transform(tx, _params())


def test_masked_passes_unselected_through():
  p = _params()
  tx = jaxmem.masked(jaxmem.quantize_int8(), "encoder/.*kernel")
  q = jaxmem.transform(tx, p)
  assert isinstance(q["encoder"]["layer_0"]["kernel"], jaxmem.QArray)
  assert not isinstance(q["embed"]["embedding"], jaxmem.QArray)


def test_jit_eval_shape_and_purity_helpers():
  p = {k: v for k, v in _params().items() if k != "mask"}
  tx = jaxmem.chain(jaxmem.quantize_int8(), jaxmem.quantize_weights(8, ".*bias", per_tensor=True))
  testing.assert_transform_pure(tx, p)
  testing.assert_eval_shape_matches(tx, p)
  testing.assert_quantized_within_bound(jaxmem.transform(tx, p), p)
  abstract = jax.eval_shape(lambda p: jaxmem.transform(tx, p), p)
  assert abstract["encoder"]["layer_0"]["kernel"].qvalue.dtype == jnp.int8


def test_linen_params():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))

  x = jnp.ones((2, 16))
  params = Net().init(jax.random.key(0), x)["params"]
  q = jax.jit(lambda p: jaxmem.transform(jaxmem.quantize_int8(), p))(params)
  assert isinstance(q["Dense_0"]["kernel"], jaxmem.QArray)
  np.testing.assert_allclose(
      np.asarray(q["Dense_0"]["kernel"].dequantize()), params["Dense_0"]["kernel"], atol=0.02
  )


def test_nnx_state():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(16, 32, rngs=rngs)
      self.l2 = nnx.Linear(32, 4, rngs=rngs)
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  paths = [p for p, _ in jaxmem.leaves_with_paths(state)]
  assert "l1/kernel" in paths and "count" in paths
  q = jax.jit(lambda s: jaxmem.transform(jaxmem.quantize_int8("l.*/kernel"), s))(state)
  model = nnx.merge(graphdef, q)
  assert isinstance(model.l1.kernel.get_value(), jaxmem.QArray)
  assert model.count.get_value().dtype == jnp.int32


def test_testing_helpers_catch_problems():
  p = {"kernel": jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)}
  impure = jaxmem.leafwise(lambda path, x: x + np.random.default_rng().normal(), "kernel")
  with pytest.raises(AssertionError, match="not deterministic"):
    testing.assert_transform_pure(impure, p)
  q = jaxmem.transform(jaxmem.quantize_int8(), p)
  with pytest.raises(AssertionError, match="exceeds scale/2"):
    testing.assert_quantized_within_bound(q, {"kernel": p["kernel"] + 0.1})
  with pytest.raises(ValueError, match="different tree structures"):
    testing.assert_quantized_within_bound(q, {"kernel2": p["kernel"]})
  with pytest.raises(AssertionError, match="NaN or Inf"):
    testing.assert_finite({"a": {"b": jnp.array([1.0, jnp.nan])}})
