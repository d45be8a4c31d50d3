"""The calibration API: input statistics of Linen layers, scan over layers, layer-by-layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmem


def _ref_stats(x):
  rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return dict(count=rows.shape[0], absmax=np.abs(rows).max(0), sum_abs=np.abs(rows).sum(0),
              sum_sq=(rows ** 2).sum(0), xtx=rows.T @ rows)


def _assert_stats(got: jaxmem.InputStats, want: dict, rtol=1e-5):
  np.testing.assert_allclose(got.count, want["count"])
  for k in ("absmax", "sum_abs", "sum_sq", "xtx"):
    np.testing.assert_allclose(getattr(got, k), want[k], rtol=rtol, atol=1e-4, err_msg=k)


def _merge(a, b):
  return dict(count=a["count"] + b["count"], absmax=np.maximum(a["absmax"], b["absmax"]),
              **{k: a[k] + b[k] for k in ("sum_abs", "sum_sq", "xtx")})


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="down")(nn.relu(nn.Dense(8, name="up")(x)))


def _data(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_input_stats_stream_over_batches_and_equal_numpy():
  m, b1, b2 = MLP(), _data(0, 2, 5, 4), _data(1, 3, 4)
  v = m.init(jax.random.key(0), b2)
  s = jaxmem.input_stats(m, v, [(b1,), (b2,)])
  assert sorted(s) == ["down/kernel", "up/kernel"]
  _assert_stats(s["up/kernel"], _merge(_ref_stats(b1), _ref_stats(b2)))
  up = jax.tree.map(np.asarray, v["params"]["up"])
  hidden = lambda x: np.maximum(np.asarray(x) @ up["kernel"] + up["bias"], 0)
  _assert_stats(s["down/kernel"], _merge(_ref_stats(hidden(b1)), _ref_stats(hidden(b2))))
  st = s["up/kernel"]
  np.testing.assert_allclose(st.mean_abs, st.sum_abs / st.count)
  np.testing.assert_allclose(st.norm, np.sqrt(st.sum_sq))
  h = jaxmem.input_hessians(m, v, [(b1,), (b2,)], where="down/kernel")
  assert list(h) == ["down/kernel"]
  np.testing.assert_allclose(h["down/kernel"], s["down/kernel"].xtx)
  light = jaxmem.input_stats(m, v, [(b2,)], hessian=False)
  assert light["up/kernel"].xtx is None


def test_input_stats_on_compressed_params_see_the_compressed_layers():
  m, x = MLP(), _data(2, 6, 4)
  v = m.init(jax.random.key(1), x)
  q = {"params": jaxmem.transform(jaxmem.quantize_int8(), v["params"])}
  s = jaxmem.input_stats(m, q, [(x,)])
  w = np.asarray(q["params"]["up"]["kernel"].dequantize())
  b = np.asarray(v["params"]["up"]["bias"])
  _assert_stats(s["down/kernel"], _ref_stats(np.maximum(np.asarray(x) @ w + b, 0)))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(4, name="ff")(nn.tanh(x)), None


class Stack(nn.Module):
  axes: tuple = ("params", "intermediates")

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Block, variable_axes={a: 0 for a in self.axes},
                   split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


def test_input_stats_inside_scan_are_per_layer():
  m, x = Stack(), _data(3, 2, 5, 4)
  v = m.init(jax.random.key(2), x)
  s = jaxmem.input_stats(m, v, [(x,)])["layers/ff/kernel"]
  assert s.absmax.shape == (3, 4) and s.xtx.shape == (3, 4, 4)
  p, h = jax.tree.map(np.asarray, v["params"]["layers"]["ff"]), np.asarray(x)
  for i in range(3):
    _assert_stats(s.layer(i), _ref_stats(np.tanh(h)))
    h = h + np.tanh(h) @ p["kernel"][i] + p["bias"][i]


def test_scan_without_intermediates_and_pattern_typos_are_errors():
  m, x = Stack(axes=("params",)), _data(4, 2, 4)
  v = m.init(jax.random.key(3), x)
  with pytest.raises(ValueError, match=r"layers/Dense_0/kernel|layers/ff/kernel.*'intermediates'"):
    jaxmem.input_stats(m, v, [(x,)])
  m2 = MLP()
  v2 = m2.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="typo/kernel.*down/kernel, up/kernel"):
    jaxmem.input_stats(m2, v2, [(x,)], where=["up/kernel", "typo/kernel"])
  with pytest.raises(ValueError, match="no nn.Dense layer"):
    jaxmem.input_stats(m2, v2, [])


def test_calibrate_layers_sequential_feeds_compressed_outputs():
  x = _data(5, 2, 3, 4)
  v = Stack().init(jax.random.key(4), x)
  stacked = v["params"]["layers"]
  block = Block()
  for sequential in (True, False):
    seen = []

    def compress(i, p, stats, seen=seen):
      seen.append(stats["ff/kernel"])
      return jaxmem.transform(jaxmem.quantize_int4(None, where="ff/kernel"), p)

    out = jaxmem.calibrate_layers(block, stacked, [x], compress, args=(None,),
                                  sequential=sequential)
    assert isinstance(out["ff"]["kernel"], jaxmem.QArray)
    assert out["ff"]["kernel"].shape == (3, 4, 4)
    h = np.asarray(x)
    for i in range(3):
      _assert_stats(seen[i], _ref_stats(np.tanh(h)))
      w = (out["ff"]["kernel"][i].dequantize() if sequential else stacked["ff"]["kernel"][i])
      h = h + np.tanh(h) @ np.asarray(w) + np.asarray(stacked["ff"]["bias"][i])
  # The default one-line stats entry point for a stacked model equals the non-sequential run.
  full = jaxmem.input_stats(Stack(), v, [(x,)])["layers/ff/kernel"]
  for i in range(3):
    np.testing.assert_allclose(full.layer(i).xtx, seen[i].xtx, rtol=1e-5, atol=1e-5)


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class _NNXStack(nnx.Module):
  """Three blocks stacked with nnx.vmap and run with nnx.scan, then a head."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NNXBlock(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)
    self.unused = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(x, self.blocks))


def _nnx_inputs(state, x):
  """Hand-written reference: each layer's input, the scan unrolled in numpy."""
  k = np.asarray(state["blocks"]["lin"]["kernel"].get_value())
  b = np.asarray(state["blocks"]["lin"]["bias"].get_value())
  h, per_layer = np.asarray(x, np.float64), []
  for i in range(3):
    per_layer.append(h)
    h = np.tanh(h @ k[i] + b[i])
  return per_layer, h


def test_input_stats_of_an_nnx_model_with_nnx_scan_are_per_layer():
  model = _NNXStack(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  b1, b2 = _data(5, 4, 8), _data(6, 3, 8)
  s = jaxmem.input_stats(model, state, [(b1,), (b2,)])
  assert sorted(s) == ["blocks/lin/kernel", "head/kernel"]  # 'unused' never ran
  (l1, h1), (l2, h2) = _nnx_inputs(state, b1), _nnx_inputs(state, b2)
  stacked = s["blocks/lin/kernel"]
  assert stacked.absmax.shape == (3, 8) and stacked.xtx.shape == (3, 8, 8)
  for i in range(3):
    _assert_stats(stacked.layer(i), _merge(_ref_stats(l1[i]), _ref_stats(l2[i])))
  _assert_stats(s["head/kernel"], _merge(_ref_stats(h1), _ref_stats(h2)))
  # Compressed state runs through the quantized twins; the model and state are untouched.
  q = jaxmem.transform(jaxmem.quantize_int8(stack_axes={r"blocks/.*": 1}), state)
  sq = jaxmem.input_stats(model, q, [(b1,)], where="head/kernel", hessian=False)
  assert list(sq) == ["head/kernel"] and sq["head/kernel"].xtx is None
  assert type(model.head) is nnx.Linear and isinstance(q["head"]["kernel"].get_value(),
                                                       jaxmem.QArray)
  np.testing.assert_allclose(sq["head/kernel"].absmax, np.abs(h1).max(0), rtol=0.05)
  with pytest.raises(ValueError, match="match"):
    jaxmem.input_stats(model, state, [(b1,)], where="blocks/nope/kernel")
