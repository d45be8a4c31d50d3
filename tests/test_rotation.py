"""Hadamard-rotated QArrays (``rotate=``): the rotation, every product route, the formats."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem

DN = (((1,), (0,)), ((), ()))


def _blockdiag(n: int, block: int) -> np.ndarray:
  """The rotation as an explicit ``n x n`` matrix, written out by hand (Sylvester)."""
  h = np.array([[1.0]])
  while h.shape[0] < block:
    h = np.block([[h, h], [h, -h]])
  return np.kron(np.eye(n // block), h / np.sqrt(block))


def _outlier_acts(key, rows, k, spikes=(3, 50)):
  """Heavy-tailed activations: a few features ~40x the rest, as in LLM residual streams."""
  x = jax.random.normal(key, (rows, k))
  return x.at[:, list(spikes)].mul(40.0)


def test_hadamard_matches_the_block_diagonal_matrix():
  for block in (2, 8, 64):
    h = jaxmem.ops.hadamard_matrix(block)
    np.testing.assert_allclose(h, h.T)
    np.testing.assert_allclose(h @ h, np.eye(block), atol=1e-6)
  x = jax.random.normal(jax.random.key(0), (3, 128, 5))
  r = _blockdiag(128, 32)
  np.testing.assert_allclose(jaxmem.ops.hadamard(x, 1, 32), np.einsum("aib,ij->ajb", x, r),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jaxmem.ops.hadamard(jaxmem.ops.hadamard(x, -2, 32), 1, 32), x,
                             atol=1e-5)


def test_quantize_rotate_stores_the_rotated_weight_and_dequantizes_back():
  w = jax.random.normal(jax.random.key(1), (128, 24))
  q = jaxmem.ops.quantize(w, rotate=64)
  assert q.rotation == (-2, 64)
  rotated = jaxmem.ops.hadamard(w, -2, 64)
  np.testing.assert_allclose(rotated, _blockdiag(128, 64) @ np.asarray(w, np.float64),
                             atol=1e-5)
  plain = jaxmem.ops.quantize(rotated)  # the values quantize the rotated weight
  np.testing.assert_array_equal(q.qvalue, plain.qvalue)
  np.testing.assert_array_equal(q.scale, plain.scale)
  # |R w - deq| <= scale / 2 in the rotated basis; R is orthonormal, so per column the
  # error's 2-norm is at most sqrt(n) * scale / 2 in the original basis too.
  err = np.linalg.norm(np.asarray(q.dequantize() - w), axis=0)
  assert np.all(err <= np.sqrt(128) * np.asarray(q.scale)[0] / 2 * 1.001)
  assert "rotation=(-2, 64)" in repr(q)


@pytest.mark.parametrize("act_bits", [None, 8, 16])
@pytest.mark.parametrize("native", [True, False])
def test_rotated_products_equal_the_reference_math(act_bits, native):
  k, n = 128, 48
  w = jax.random.normal(jax.random.key(2), (k, n))
  x = _outlier_acts(jax.random.key(3), 4, k)
  q = jaxmem.ops.quantize(w, act_bits=act_bits, rotate=32)
  xr = np.asarray(x, np.float64) @ _blockdiag(k, 32)
  wv = np.asarray(q.qvalue, np.float64)
  ws = np.asarray(q.scale, np.float64)
  tie = 0.0
  if act_bits == 8:  # per-token int8 of the rotated activation, integer product, rescale
    xs = np.abs(xr).max(axis=1, keepdims=True) / 127
    want = (np.clip(np.round(xr / xs), -127, 127) @ wv) * xs * ws
    # float32 vs float64 rotation may round a value sitting on a .5 tie the other way: one
    # activation step times one weight, per flip (a wrong rotation is far off that).
    tie = 2 * float(xs.max() * np.abs(wv).max() * ws.max())
  else:
    xin = np.asarray(jnp.asarray(xr, jnp.float32).astype(jnp.bfloat16), np.float64) if (
        act_bits == 16) else xr
    want = (xin @ wv) * ws
  with jaxmem.ops.native_kernels(native):
    got = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, DN))(x, q)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want,
                             atol=(2e-5 * scale if act_bits != 16 else 1e-2 * scale) + tie)


def test_rotation_cuts_w8a8_error_on_outlier_activations():
  k, n = 576, 64
  w = jax.random.normal(jax.random.key(4), (k, n)) / np.sqrt(k)
  x = _outlier_acts(jax.random.key(5), 16, k)
  ref = x @ w
  errs = {}
  for rot in (None, 64):
    q = jaxmem.ops.quantize(w, act_bits=8, rotate=rot)
    errs[rot] = float(jnp.linalg.norm(jaxmem.ops.quantized_dot_general(x, q, DN) - ref))
  assert errs[64] < 0.5 * errs[None], errs


def test_rotated_stack_under_scan_vmap_and_slicing():
  layers, k = 3, 64
  w = jax.random.normal(jax.random.key(6), (layers, k, k)) / 8
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(stack_axes=1, rotate=16), {"kernel": w})
  q = q["kernel"]
  assert q.rotation == (-2, 16) and q[1].rotation == (-2, 16)
  x = jax.random.normal(jax.random.key(7), (5, k))

  def body(h, wl):
    return jnp.tanh(jaxmem.ops.quantized_dot_general(h, wl, DN)), None

  y_scan = jax.jit(lambda x, q: jax.lax.scan(body, x, q)[0])(x, q)
  h = x
  for i in range(layers):  # the per-layer slices, one by one
    h = body(h, q[i])[0]
  np.testing.assert_allclose(y_scan, h, atol=1e-5)
  ref = x
  for i in range(layers):
    ref = jnp.tanh(ref @ w[i])
  assert float(jnp.max(jnp.abs(y_scan - ref))) < 0.05
  y_vmap = jax.vmap(lambda wl: jaxmem.ops.quantized_dot_general(x, wl, DN))(q)
  np.testing.assert_allclose(y_vmap[2], jaxmem.ops.quantized_dot_general(x, q[2], DN),
                             atol=1e-5)


def test_rotated_flax_model_einsum_conv_and_take():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(64)(x))
      x = nn.DenseGeneral((2, 16), name="heads")(x)
      return nn.DenseGeneral(8, axis=(-2, -1), name="out")(x)

  net = Net()
  x = _outlier_acts(jax.random.key(8), 6, 32)
  params = net.init(jax.random.key(9), x)["params"]
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(rotate=16), params)
  assert q["Dense_0"]["kernel"].rotation == (-2, 16)
  assert q["out"]["kernel"].rotation == (-2, 16)  # [2, 16, 8]: head_dim (16 does not divide 2)
  assert q["heads"]["kernel"].rotation == (-3, 16)  # [64, 2, 16]: the input axis
  ref = net.apply({"params": params}, x)
  got = jax.jit(lambda p, x: jaxmem.apply(net, {"params": p}, x))(q, x)
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))

  w = jax.random.normal(jax.random.key(10), (16, 3, 5))
  qe = jaxmem.ops.quantize(w, channel_axes=(1, 2), rotate=8)
  xe = jax.random.normal(jax.random.key(11), (2, 4, 16))
  np.testing.assert_allclose(jaxmem.ops.quantized_einsum("abc,cde->abde", xe, qe),
                             jnp.einsum("abc,cde->abde", xe, qe.dequantize()), atol=1e-4)

  kern = jax.random.normal(jax.random.key(12), (3, 3, 16, 8))
  qc = jaxmem.ops.quantize(kern, channel_axes=(3,), rotate=16)  # rotates the input features
  assert qc.rotation == (-2, 16)
  xc = jax.random.normal(jax.random.key(13), (2, 5, 5, 16))
  dn = ("NHWC", "HWIO", "NHWC")
  np.testing.assert_allclose(
      jaxmem.ops.quantized_conv(xc, qc, (1, 1), "SAME", dimension_numbers=dn),
      jax.lax.conv_general_dilated(xc, qc.dequantize(), (1, 1), "SAME", dimension_numbers=dn),
      atol=1e-4)

  table = jax.random.normal(jax.random.key(14), (10, 32))
  qt = jaxmem.ops.quantize(table, channel_axes=(0,), rotate=32)
  ids = jnp.array([[1, 9], [0, 3]])
  np.testing.assert_allclose(jaxmem.ops.quantized_take(qt, ids), table[ids], atol=0.03)
  np.testing.assert_allclose(jaxmem.ops.quantized_take(qt, ids), qt.dequantize()[ids],
                             atol=1e-5)


def test_rotated_weight_only_gradient_is_the_dequantized_products():
  w = jax.random.normal(jax.random.key(15), (64, 8))
  q = jaxmem.ops.quantize(w, rotate=64)
  x = jax.random.normal(jax.random.key(16), (3, 64))
  loss = lambda x, w: jnp.sum(jnp.sin(jaxmem.ops.quantized_dot_general(x, w, DN)))
  g = jax.grad(loss)(x, q)
  g_ref = jax.grad(loss)(x, q.dequantize())
  np.testing.assert_allclose(g, g_ref, atol=1e-4)


def test_rotation_checkpoint_roundtrip(tmp_path):
  params = {"a": {"kernel": jax.random.normal(jax.random.key(17), (2, 64, 16))}}
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(stack_axes=1, rotate=32), params)
  with jaxmem.CheckpointManager(tmp_path / "ckpt") as mgr:
    assert mgr.save(0, q)
    mgr.wait_until_finished()
    back = mgr.restore()
  k = back["a"]["kernel"]
  assert isinstance(k.rotation, tuple) and k.rotation == (-2, 32) and k.act_bits == 8
  np.testing.assert_array_equal(k.qvalue, q["a"]["kernel"].qvalue)
  x = jax.random.normal(jax.random.key(18), (4, 64))
  np.testing.assert_array_equal(jaxmem.ops.quantized_dot_general(x, k[0], DN),
                                jaxmem.ops.quantized_dot_general(x, q["a"]["kernel"][0], DN))


def test_rotation_bad_inputs_are_clear_errors():
  w = jnp.ones((576, 8))
  for bad in (3, 1, True, 64.0):
    with pytest.raises(ValueError, match="power of two"):
      jaxmem.quantize_dynamic_int8(rotate=bad)
  with pytest.raises(ValueError, match=r"'enc/kernel'.*rotate=128 does not divide.*576.*"
                                       r"use rotate=64"):
    jaxmem.transform(jaxmem.quantize_int8(rotate=128), {"enc": {"kernel": w}})
  with pytest.raises(ValueError, match="not a channel axis"):
    jaxmem.ops.quantize(jnp.ones((8,)), channel_axes=(0,), rotate=2)
  # A rotation of the output axis cannot move onto the activation.
  q = jaxmem.ops.quantize(jnp.ones((16, 8)), rotate=8, rotate_axis=-1)
  with pytest.raises(ValueError, match="rotated axis must be contracted"):
    jaxmem.ops.quantized_dot_general(jnp.ones((2, 16)), q, DN)
  # Grouped convolutions mix channels per group: the rotation does not commute.
  qc = jaxmem.ops.quantize(jnp.ones((3, 3, 8, 8)), channel_axes=(3,), rotate=8)
  with pytest.raises(ValueError, match="grouped convolution"):
    jaxmem.ops.quantized_conv(jnp.ones((1, 4, 4, 16)), qc, (1, 1), "SAME",
                              dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  with pytest.raises(ValueError, match="'k'.*rotated"):
    jaxmem.ops.sparse_pack(jaxmem.ops.quantize(jnp.ones((16, 4)), rotate=16), path="k")
  for bad in ((-2, 3), (1, 64), (-2,), [-2, 64], "x"):
    with pytest.raises(ValueError, match="rotation="):
      jaxmem.QArray(jnp.ones((4, 4), jnp.int8), jnp.ones((1, 4)), rotation=bad)
  stacked = jaxmem.ops.quantize(jnp.ones((4, 8, 2)), channel_axes=(2,), rotate=4, rotate_axis=0)
  with pytest.raises(TypeError, match="rotated"):
    stacked[0]


def test_kernel_route_names_the_rotation():
  from jaxmem.models.llama.evaluate import kernel_route

  p = {"layers": {"mlp": {"up": {"kernel": jnp.ones((2, 64, 8))}}}}
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(stack_axes=1, rotate=64), p)
  assert kernel_route(q).startswith("inputs rotated by 64-wide Hadamard blocks; ")
  # A rotated group-wise kernel: its group sizes are filled into its own phrase.
  g = jaxmem.transform(jaxmem.quantize_weights(4, group_size=16, stack_axes=1, rotate=64), p)
  route = kernel_route(g)
  assert "inputs rotated by 64-wide" in route and "groups of 16" in route, route
  assert "{sizes}" not in route
