"""QAT: fake quantization (STE), training with optax and masks, and exact conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmem


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4)(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def _data(n=64, d=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x[:, :4].argmax(-1)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("bits,group_size", [(2, None), (4, 16), (4, None), (8, 32)])
def test_fake_quantize_forward_is_quantize_dequantize(bits, group_size):
  x = jnp.asarray(np.random.default_rng(bits).normal(size=(64, 6)), jnp.float32)
  fq = jaxmem.ops.fake_quantize(x, bits, channel_axes=(1,), group_size=group_size)
  q = jaxmem.ops.quantize(x, bits, channel_axes=(1,), group_size=group_size)
  np.testing.assert_array_equal(fq, q.dequantize())
  if bits < 8:
    rows = group_size or x.shape[0]  # one scale per group: at most 2**bits - 1 levels
    assert len(np.unique(np.asarray(fq[:rows, 0]))) <= 2**bits - 1


def test_straight_through_gradient():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
  c = jnp.asarray(np.random.default_rng(1).normal(size=(16, 3)), jnp.float32)
  loss = lambda w: jnp.sum(c * w**2)
  g = jax.jit(jax.grad(lambda w: loss(jaxmem.ops.fake_quantize(w, 3, group_size=8))))(x)
  # STE: the gradient of the loss at the quantized weights, passed through unchanged.
  fq = jaxmem.ops.fake_quantize(x, 3, group_size=8)
  np.testing.assert_allclose(g, 2 * c * fq, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda w: jaxmem.ops.fake_quantize(w, 4).sum())(x),
                             jnp.ones_like(x))


def _train(loss_fn, params, steps=60, lr=1e-2):
  opt = optax.adam(lr)

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  state = opt.init(params)
  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return params, losses


@pytest.mark.parametrize("bits,group_size", [(4, 16), (2, 32), (8, None)])
def test_linen_qat_trains_and_converts_exactly(bits, group_size):
  x, y = _data()
  model = MLP()
  params = model.init(jax.random.key(0), x)["params"]
  qat = jaxmem.qat_weights(bits, group_size=group_size)

  def loss_fn(p):
    logits = model.apply({"params": qat.fake_quant(p)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  params, losses = _train(loss_fn, params)
  assert losses[-1] < 0.5 * losses[0]
  converted = jaxmem.transform(qat.convert, params)
  k = converted["Dense_0"]["kernel"]
  assert isinstance(k, jaxmem.QArray) and (k.bits, k.group_size) == (bits, group_size)
  assert k.packed == (bits <= 4)
  assert not isinstance(converted["Dense_0"]["bias"], jaxmem.QArray)
  want = model.apply({"params": qat.fake_quant(params)}, x)
  # Full float32 products: on CPUs with bf16 dots, DEFAULT precision may split them in two
  # bf16 dots (jaxmem._src.qdot), within 2**-18 |x|.|w| but above this tolerance.
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda p: jaxmem.apply(model, {"params": p}, x))(converted)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The stored bytes shrink accordingly.
  assert jaxmem.tree_bytes(converted) < jaxmem.tree_bytes(params) * (bits / 32 + 0.2)


def test_nnx_qat_converts_exactly():
  x, y = _data()
  model = NnxMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  qat = jaxmem.qat_weights(4, group_size=32)

  def loss_fn(s):
    logits = nnx.merge(graphdef, qat.fake_quant(s))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  state, losses = _train(loss_fn, state, steps=30)
  assert losses[-1] < losses[0]
  converted = jaxmem.transform(qat.convert, state)
  kernels = [x for p, x in jaxmem.leaves_with_paths(converted) if p.endswith("kernel")]
  assert len(kernels) == 2 and all(isinstance(k, jaxmem.QArray) and k.packed for k in kernels)
  want = nnx.merge(graphdef, qat.fake_quant(state))(x)
  with jax.default_matmul_precision("highest"):  # full float32, as in the Linen test above
    got = jaxmem.apply(graphdef, converted, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_qat_composes_with_pruning_masks():
  x, y = _data()
  model = MLP()
  params = model.init(jax.random.key(1), x)["params"]
  masks = jaxmem.sparsity.magnitude_masks(params, 0.75)
  qat = jaxmem.qat_weights(4, group_size=16)

  def loss_fn(p):
    logits = model.apply({"params": qat.fake_quant(jaxmem.sparsity.apply_masks(p, masks))}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  params, losses = _train(loss_fn, params)
  assert losses[-1] < 0.7 * losses[0]
  final = jaxmem.sparsity.apply_masks(params, masks)
  converted = jaxmem.transform(qat.convert, final)
  for name in ("Dense_0", "Dense_1"):
    q = converted[name]["kernel"]
    assert q.packed and q.qvalue.shape[q.pack_axis] * 2 == q.shape[q.pack_axis]
    values = np.asarray(jaxmem.ops.unpack_ints(q.qvalue, 4, q.pack_axis))
    assert values.shape == q.shape
    assert np.all(values[~np.asarray(masks[name]["kernel"])] == 0)  # pruned stay exactly zero
  want = model.apply({"params": qat.fake_quant(final)}, x)
  got = jaxmem.apply(model, {"params": converted}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_activation_fake_quant_interceptor_and_w8a8_convert():
  x, y = _data(d=64)
  model = MLP()
  params = model.init(jax.random.key(2), x)["params"]
  qat = jaxmem.qat_weights(8, act_bits=8)

  def forward(p):
    with jaxmem.train.fake_quantize_linen_inputs():
      return model.apply({"params": qat.fake_quant(p)}, x)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(forward(p), y).mean()

  params, losses = _train(loss_fn, params, steps=30)
  assert losses[-1] < losses[0]
  # The interceptor quantizes exactly the Dense inputs, as an explicit call would.
  fq = qat.fake_quant(params)
  d0 = fq["Dense_0"]
  h = jaxmem.ops.fake_quantize_activations(x) @ d0["kernel"] + d0["bias"][None]
  h = jaxmem.ops.fake_quantize_activations(jax.nn.relu(h))
  manual = h @ fq["Dense_1"]["kernel"] + fq["Dense_1"]["bias"][None]
  np.testing.assert_allclose(forward(params), manual, rtol=1e-5, atol=1e-5)
  # Converted: int8 x int8 matmuls (dynamic W8A8) reproduce the fake-quant model.
  converted = jaxmem.transform(qat.convert, params)
  assert converted["Dense_0"]["kernel"].act_bits == 8
  got = jax.jit(lambda p: jaxmem.apply(model, {"params": p}, x))(converted)
  np.testing.assert_allclose(got, forward(params), rtol=1e-4, atol=1e-4)


def test_activation_interceptor_where_selects_modules():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 64)), jnp.float32)
  model = MLP()
  params = model.init(jax.random.key(0), x)
  with jaxmem.train.fake_quantize_linen_inputs(where="Dense_1"):
    only_second = model.apply(params, x)
  p = params["params"]
  h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
  fq = jaxmem.ops.fake_quantize_activations(h)
  want = fq @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None]
  np.testing.assert_allclose(only_second, want, rtol=1e-5, atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="bits=9"):
    jaxmem.qat_weights(9)
  with pytest.raises(ValueError, match="act_bits=4"):
    jaxmem.qat_weights(4, act_bits=4)
  with pytest.raises(ValueError, match="8 bits"):
    jaxmem.ops.fake_quantize_activations(jnp.ones((2, 2)), bits=4)
  with pytest.raises(ValueError, match="8 bits"):
    with jaxmem.train.fake_quantize_linen_inputs(bits=4):
      pass
  qat = jaxmem.qat_weights(4, group_size=16)
  q = jaxmem.transform(qat.convert, {"layer": {"kernel": jnp.ones((32, 2))}})
  with pytest.raises(ValueError, match="layer/kernel.*already a QArray"):
    qat.fake_quant(q)
  with pytest.raises(ValueError, match="layer/kernel.*divisible by group_size=16"):
    qat.fake_quant({"layer": {"kernel": jnp.ones((24, 2))}})


def test_qat_of_stacked_layers_keeps_per_layer_scales():
  """stack_axes as in quantize_weights: each layer of a scanned [L, in, out] kernel alone."""
  w = jnp.asarray(np.random.default_rng(3).normal(size=(3, 64, 8)), jnp.float32)
  params = {"layers": {"kernel": w}, "head": {"kernel": w[0]}}
  qat = jaxmem.qat_weights(4, group_size=32, stack_axes={"layers/.*": 1})
  q = jaxmem.transform(qat.convert, params)
  k = q["layers"]["kernel"]
  assert k.scale.shape == (3, 2, 8) and (k.group_axis, k.pack_axis) == (1, -2)
  assert q["head"]["kernel"].scale.shape == (2, 8)  # unmatched leaves: no stack axes
  fq = qat.fake_quant(params)
  np.testing.assert_array_equal(np.asarray(k.dequantize()), np.asarray(fq["layers"]["kernel"]))
  tx = jaxmem.quantize_weights(4, group_size=32, stack_axes=1)
  ref = jaxmem.transform(tx, {"kernel": w})["kernel"]
  for a, b in zip(jax.tree.leaves(k), jax.tree.leaves(ref), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  bad = jaxmem.qat_weights(4, group_size=32, stack_axes={"nomatch/.*": 1})
  with pytest.raises(ValueError, match=r"stack_axes rule 'nomatch/\.\*' matches no selected"):
    bad.fake_quant(params)
  with pytest.raises(ValueError, match=r"stack_axes rule 'nomatch/\.\*' matches no selected"):
    jaxmem.transform(bad.convert, params)


def test_activation_fake_quant_is_the_w8a8_quantizer():
  """One activation quantizer: QAT's forward value is W8A8's integer values times scales."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 7, 64)), jnp.float32)
  x = x.at[1, 2].set(0.0)  # an all-zero row: zeros, not NaN
  xq, xs = jaxmem.ops.quantize_activations(x, axes=(2,))
  np.testing.assert_array_equal(
      np.asarray(jaxmem.ops.fake_quantize_activations(x)),
      np.asarray(xq.astype(jnp.float32) * xs))
  fq = np.asarray(jaxmem.ops.fake_quantize_activations(x))
  assert not np.isnan(fq).any()
  # Bit for bit, signed zeros included (a small negative input rounds to 0, not -0).
  np.testing.assert_array_equal(np.signbit(fq), np.signbit(np.asarray(xq.astype(jnp.float32) * xs)))
