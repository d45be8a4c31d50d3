"""Sub-byte weights: exact packing, group-wise int2..int8 quantization, int4 param transforms."""

import math

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmem

VALUES_PER_BYTE = {2: 4, 3: 2, 4: 2}


def _pack_reference(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Hand-written packing along ``axis``: byte k of a line holds its values k*per .. k*per+per-1
  (adjacent values share a byte), value i of the byte in bits [i*w, (i+1)*w), two's complement;
  a line whose length the packing factor does not divide is padded with zero fields."""
  per = VALUES_PER_BYTE[bits]
  w = 8 // per
  axis %= values.ndim
  n = values.shape[axis]
  nbytes = -(-n // per)
  out = np.zeros(values.shape[:axis] + (nbytes,) + values.shape[axis + 1 :], np.uint8)
  for idx in np.ndindex(*out.shape):
    k = idx[axis]
    byte = 0
    for i in range(per):
      j = k * per + i
      if j < n:
        v = int(values[idx[:axis] + (j,) + idx[axis + 1 :]])
        byte |= (v & ((1 << w) - 1)) << (i * w)
    out[idx] = byte
  return out


@st.composite
def _int_values(draw):
  bits = draw(st.sampled_from([2, 3, 4]))
  w = 8 // VALUES_PER_BYTE[bits]
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
  # The full two's-complement range of the field (the symmetric QArray range is inside it).
  lo, hi = -(2 ** (w - 1)), 2 ** (w - 1) - 1
  values = draw(hnp.arrays(np.int8, shape, elements=st.integers(lo, hi)))
  return bits, values


@settings(max_examples=20, deadline=None)
@given(_int_values(), st.data())
def test_pack_matches_reference_and_unpacks_exactly(case, data):
  bits, values = case
  axis = data.draw(st.integers(-values.ndim, values.ndim - 1), label="axis")
  packed = jaxmem.ops.pack_ints(jnp.asarray(values), bits, axis=axis)
  assert packed.dtype == jnp.uint8
  # Only the packed axis shrinks (rounded up); the rank and the other axes are kept.
  want = list(values.shape)
  want[axis] = math.ceil(values.shape[axis] / VALUES_PER_BYTE[bits])
  assert packed.shape == tuple(want)
  np.testing.assert_array_equal(np.asarray(packed), _pack_reference(values, bits, axis))
  back = jaxmem.ops.unpack_ints(packed, bits, axis=axis, size=values.shape[axis])
  assert back.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(back), values)


def test_pack_known_bytes():
  # int4: low nibble first. -1 -> 0xF, 7 -> 0x7: byte 0x7F; -8 -> 0x8, 1 -> 0x1: 0x18.
  v = jnp.array([-1, 7, -8, 1], jnp.int8)
  assert jaxmem.ops.pack_ints(v, 4).tolist() == [0x7F, 0x18]
  # int2: four per byte, -1 -> 0b11, 1 -> 0b01, 0, -2 -> 0b10: 0b10_00_01_11.
  assert jaxmem.ops.pack_ints(jnp.array([-1, 1, 0, -2], jnp.int8), 2).tolist() == [0b10000111]
  # Odd length pads with zero fields.
  assert jaxmem.ops.pack_ints(jnp.array([3, -3, 5], jnp.int8), 4).tolist() == [0xD3, 0x05]


def test_pack_known_bytes_along_an_axis():
  # Along axis 0 of a (4, 2) array: rows 0 and 1 share byte row 0, rows 2 and 3 byte row 1.
  v = jnp.array([[-1, 1], [7, 2], [-8, 0], [1, -2]], jnp.int8)
  assert jaxmem.ops.pack_ints(v, 4, axis=0).tolist() == [[0x7F, 0x21], [0x18, 0xE0]]
  # int2, four rows per byte: column 0 holds -1, 1, 0, -2 (0b11, 0b01, 0b00, 0b10, low first).
  v2 = jnp.array([[-1, 1], [1, 0], [0, -2], [-2, -1]], jnp.int8)
  assert jaxmem.ops.pack_ints(v2, 2, axis=0).tolist() == [[0b10_00_01_11, 0b11_10_00_01]]
  packed = jaxmem.ops.pack_ints(v2, 2, axis=0)
  assert jaxmem.ops.unpack_ints(packed, 2, axis=0).tolist() == v2.tolist()


def test_pack_unpack_under_jit():
  v = jnp.arange(-7, 8, dtype=jnp.int8)
  ops = jaxmem.ops
  back = jax.jit(lambda x: ops.unpack_ints(ops.pack_ints(x, 4), 4, size=x.shape[-1]))(v)
  np.testing.assert_array_equal(back, v)
  m = v[:12].reshape(6, 2)
  back = jax.jit(lambda x: ops.unpack_ints(ops.pack_ints(x, 2, axis=0), 2, axis=0, size=6))(m % 2)
  np.testing.assert_array_equal(back, m % 2)


def _grouped_reference(x: np.ndarray, bits: int, group_size: int):
  """Hand-written group-wise symmetric quantization of an (in, out) kernel along axis 0."""
  n_in, n_out = x.shape
  qmax = 2 ** (bits - 1) - 1
  deq = np.zeros_like(x)
  scales = np.zeros((n_in // group_size, n_out), np.float32)
  for g in range(n_in // group_size):
    for j in range(n_out):
      block = x[g * group_size : (g + 1) * group_size, j]
      s = np.float32(np.abs(block).max()) / np.float32(qmax)
      q = np.clip(np.round(block / s), -qmax, qmax)
      deq[g * group_size : (g + 1) * group_size, j] = q * s
      scales[g, j] = s
  return deq, scales


@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    group_size=st.sampled_from([4, 8]),
    groups=st.integers(1, 3),
    n_out=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_grouped_quantize_matches_reference(bits, group_size, groups, n_out, seed):
  x = np.random.default_rng(seed).normal(size=(group_size * groups, n_out)).astype(np.float32)
  q = jaxmem.ops.quantize(jnp.asarray(x), bits, channel_axes=(1,), group_size=group_size)
  deq_ref, scales_ref = _grouped_reference(x, bits, group_size)
  assert q.packed == (bits <= 4)
  if q.packed:  # along the group axis, keeping the rank
    per = VALUES_PER_BYTE[bits]
    assert q.pack_axis == -2 and q.qvalue.shape == (group_size * groups // per, n_out)
  assert q.scale.shape == (groups, n_out)  # same rank: one row of scales per group
  np.testing.assert_allclose(np.asarray(q.scale), scales_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.dequantize()), deq_ref, rtol=1e-5, atol=1e-6)
  # Round to nearest: error at most half a step of the element's own group scale.
  step = np.repeat(np.asarray(q.scale), group_size, axis=0)
  assert np.all(np.abs(x - np.asarray(q.dequantize())) <= step / 2 * (1 + 1e-5))
  # Packing is exact: the packed and unpacked forms dequantize to identical values.
  u = jaxmem.ops.quantize(jnp.asarray(x), bits, channel_axes=(1,), group_size=group_size,
                      pack_bits=False)
  np.testing.assert_array_equal(np.asarray(u.dequantize()), np.asarray(q.dequantize()))


def test_quantize_int4_bytes_and_layout():
  rng = np.random.default_rng(0)
  params = {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(128, 32)), jnp.float32),
                "bias": jnp.zeros(32)},
      "embed": {"embedding": jnp.asarray(rng.normal(size=(10, 128)), jnp.float32)},
  }
  q = jaxmem.transform(jaxmem.quantize_int4(group_size=64), params)
  k, e = q["dense"]["kernel"], q["embed"]["embedding"]
  assert (k.bits, k.packed, k.group_size, k.group_axis) == (4, True, 64, 0)
  # Packed two per byte along the input (group) axis; scales keep the rank.
  assert (k.qvalue.shape, k.pack_axis, k.scale.shape) == ((64, 32), -2, (2, 32))
  # Embedding tables are grouped along features (and packed along them), one row per token.
  assert (e.group_axis, e.group_size, e.scale.shape) == (1, 64, (10, 2))
  assert (e.qvalue.shape, e.pack_axis, e.channel_axes) == ((10, 64), -1, (0,))
  assert q["dense"]["bias"] is params["dense"]["bias"]
  report = jaxmem.memory_report(q).as_dict()
  assert report["dense/kernel"] == 128 * 32 // 2 + 4 * 2 * 32
  assert report["embed/embedding"] == 10 * 128 // 2 + 4 * 10 * 2
  fp32 = 128 * 32 * 4
  assert report["dense/kernel"] / fp32 <= 0.16


def test_quantize_int4_per_channel_and_where():
  params = {"a": {"kernel": jnp.ones((6, 4))}, "b": {"kernel": jnp.ones((8, 4))}}
  q = jaxmem.transform(jaxmem.quantize_int4(group_size=None, where="a/kernel"), params)
  assert isinstance(q["a"]["kernel"], jaxmem.QArray)
  assert q["a"]["kernel"].scale.shape == (1, 4)
  assert not isinstance(q["b"]["kernel"], jaxmem.QArray)


def test_quantize_int4_indivisible_group_names_leaf():
  params = {"layer": {"kernel": jnp.ones((100, 4))}}
  with pytest.raises(ValueError, match="layer/kernel.*divisible by group_size=64"):
    jaxmem.transform(jaxmem.quantize_int4(group_size=64), params)


def test_quantize_weights_grouped_int2_and_errors():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 8)), jnp.float32)
  q = jaxmem.transform(jaxmem.quantize_weights(2, group_size=32), {"kernel": x})["kernel"]
  assert q.qvalue.nbytes == 64 * 8 // 4 and q.qvalue.shape == (16, 8)  # 4 per byte on axis 0
  values = np.asarray(jaxmem.ops.unpack_ints(q.qvalue, 2, q.pack_axis))
  assert values.shape == q.shape and set(np.unique(values)) <= {-1, 0, 1}
  with pytest.raises(ValueError, match="bits=1"):
    jaxmem.quantize_weights(1)
  with pytest.raises(ValueError, match="already a QArray"):
    jaxmem.transform(jaxmem.quantize_int4(group_size=32), {"kernel": q})


def test_quantize_int4_under_jit_and_eval_shape():
  params = {"kernel": jnp.ones((64, 16))}
  tx = jaxmem.quantize_int4(group_size=32)
  abstract = jax.eval_shape(lambda p: jaxmem.transform(tx, p), params)
  assert abstract["kernel"].qvalue.shape == (32, 16)
  assert abstract["kernel"].scale.shape == (2, 16) and abstract["kernel"].shape == (64, 16)
  q = jax.jit(lambda p: jaxmem.transform(tx, p))(params)
  np.testing.assert_allclose(q["kernel"].dequantize(), params["kernel"])


def _cosine(a, b):
  a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


class _LinenLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(16, 64)(ids)
    h = nn.gelu(nn.Dense(64)(h))
    return nn.Dense(8)(h)


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(128, 64, rngs=rngs)
    self.l2 = nnx.Linear(64, 8, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.gelu(self.l1(x)))


def test_int4_params_run_in_linen_model():
  ids = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
  model = _LinenLM()
  params = model.init(jax.random.key(0), ids)["params"]
  q = jaxmem.transform(jaxmem.quantize_int4(group_size=32), params)
  assert q["Embed_0"]["embedding"].packed and q["Dense_0"]["kernel"].packed
  got = jax.jit(lambda p: jaxmem.apply(model, {"params": p}, ids))(q)
  want = model.apply({"params": jaxmem.transform(jaxmem.dequantize_params(), q)}, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  fp32 = model.apply({"params": params}, ids)
  assert _cosine(got, fp32) > 0.97  # and stays close to the float model


def test_int4_params_run_in_nnx_model():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 128)), jnp.float32)
  model = _NnxMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  q = jaxmem.transform(jaxmem.quantize_int4(group_size=64), state)
  report = jaxmem.memory_report(q).as_dict()
  assert report["l1/kernel"] == 128 * 64 // 2 + 4 * 2 * 64
  got = jax.jit(lambda s: jaxmem.apply(graphdef, s, x))(q)
  want = nnx.merge(graphdef, jaxmem.transform(jaxmem.dequantize_params(), q))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  fp32 = model(x)
  assert _cosine(got, fp32) > 0.97  # and stays close to the float model


# ----------------------------------------------------------------------------- GPTQ


def _correlated_inputs(n=512, d=64, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) * np.linspace(2.0, 0.1, d)[None]
  return rng.normal(size=(n, d)) @ mix


def test_gptq_with_isotropic_hessian_is_round_to_nearest():
  w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  q = jaxmem.ops.gptq_kernel(w, np.eye(64), 4, group_size=32, act_order=False, clip_search=False)
  rtn = jaxmem.ops.quantize(jnp.asarray(w), 4, channel_axes=(1,), group_size=32)
  np.testing.assert_array_equal(q.qvalue, rtn.qvalue)
  np.testing.assert_allclose(q.scale, rtn.scale, rtol=1e-6)
  assert (q.shape, q.scale.shape, q.packed, q.group_axis) == (rtn.shape, rtn.scale.shape, True, 0)


@pytest.mark.parametrize("group_size,act_order", [(32, True), (32, False), (None, True)])
def test_gptq_reduces_output_error(group_size, act_order):
  x = _correlated_inputs()
  w = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
  q = jaxmem.ops.gptq_kernel(w, x.T @ x, 4, group_size=group_size, act_order=act_order)
  rtn = jaxmem.ops.quantize(jnp.asarray(w), 4, channel_axes=(1,), group_size=group_size)
  err = lambda wq: np.linalg.norm(x @ (np.asarray(wq, np.float64) - w))
  assert err(q.dequantize()) < 0.8 * err(rtn.dequantize())
  values = np.asarray(jaxmem.ops.unpack_ints(q.qvalue, 4, q.pack_axis))
  assert values.shape == (64, 16) and q.qvalue.shape == (32, 16)
  assert values.min() >= -7 and values.max() <= 7


def test_input_hessians_and_quantize_gptq_on_linen_model():
  model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
  x = jnp.asarray(_correlated_inputs(96, 64), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  p = variables["params"]
  hs = jaxmem.input_hessians(model, variables, [(x[:48],), (x[48:],)])
  assert sorted(hs) == ["layers_0/kernel", "layers_2/kernel"]
  h1 = np.maximum(np.asarray(x @ p["layers_0"]["kernel"] + p["layers_0"]["bias"][None]), 0)
  np.testing.assert_allclose(hs["layers_0/kernel"], np.asarray(x).T @ np.asarray(x), rtol=1e-4,
                             atol=1e-2)
  np.testing.assert_allclose(hs["layers_2/kernel"], h1.T @ h1, rtol=1e-3, atol=1e-3)
  # Only the first layer gets GPTQ; the other kernel is round-to-nearest, like quantize_int4.
  q = jaxmem.transform(jaxmem.quantize_gptq({"layers_0/kernel": hs["layers_0/kernel"]}, 4, 32), p)
  rtn = jaxmem.transform(jaxmem.quantize_int4(32), p)
  np.testing.assert_array_equal(q["layers_2"]["kernel"].qvalue, rtn["layers_2"]["kernel"].qvalue)
  out = lambda params: jaxmem.apply(model, {"params": params}, x)
  fp32 = model.apply(variables, x)
  assert np.linalg.norm(out(q) - fp32) < np.linalg.norm(out(rtn) - fp32)
  with pytest.raises(ValueError, match="not selected leaves"):
    jaxmem.transform(jaxmem.quantize_gptq({"nope/kernel": np.eye(2)}, 4, 32), p)
  with pytest.raises(ValueError, match="Hessian shape"):
    jaxmem.transform(jaxmem.quantize_gptq({"layers_0/kernel": np.eye(3)}, 4, 32), p)
  with pytest.raises(ValueError, match="matches no Dense kernel"):
    jaxmem.input_hessians(model, variables, [(x,)], where=["layers_0/kernel", "typo/kernel"])


# ----------------------------------------------------------------------------- asymmetric


def _hand_dequantize(q) -> np.ndarray:
  """``code * scale + offset`` of an unpacked per-channel QArray, broadcast by numpy."""
  assert q.qvalue.dtype == jnp.int8 and not q.packed
  return (np.asarray(q.qvalue, np.float64) * np.asarray(q.scale, np.float64)
          + np.asarray(q.offset, np.float64))


def _hand_activations(x: np.ndarray, axes, act_bits) -> np.ndarray:
  """The activation each policy multiplies by the weight, by hand (in float32, as the kernels)."""
  x = np.asarray(x, np.float32)
  if act_bits is None:
    return x.astype(np.float64)
  if act_bits == 16:
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  s = np.abs(x).max(axis=axes, keepdims=True) / np.float32(127)  # per row (token)
  xq = np.clip(np.round(x / np.where(s > 0, s, np.float32(1))), -127, 127)
  return xq.astype(np.float64) * s.astype(np.float64)


def _assert_matmul_close(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("act_bits", [None, 16, 8])
def test_asymmetric_weights_through_dot_general_and_einsum(act_bits):
  rng = np.random.default_rng(3)
  # Skewed columns (all positive, different ranges): a zero point per column pays off.
  w = (rng.uniform(0.5, 2.0, size=(48, 16)) * rng.uniform(0.1, 3.0, size=(1, 16))).astype(
      np.float32)
  x = rng.normal(size=(5, 48)).astype(np.float32)
  q = jaxmem.ops.quantize(jnp.asarray(w), 8, channel_axes=(1,), symmetric=False, act_bits=act_bits)
  assert (q.scale.shape, q.offset.shape, q.symmetric, q.act_bits) == ((1, 16), (1, 16), False,
                                                                       act_bits)
  codes = np.asarray(q.qvalue)
  assert codes.min() == -128 and codes.max() == 127  # the full asymmetric range is used
  deq = _hand_dequantize(q)
  np.testing.assert_allclose(np.asarray(q.dequantize()), deq, rtol=1e-6, atol=1e-6)
  ref = _hand_activations(x, (1,), act_bits) @ deq
  dn = (((1,), (0,)), ((), ()))
  y = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, dn))(x, q)
  _assert_matmul_close(y, ref)
  _assert_matmul_close(jaxmem.ops.quantized_einsum("bi,io->bo", x, q), ref)
  # Batched activations through einsum: one activation scale per (batch, position).
  x3 = rng.normal(size=(2, 3, 48)).astype(np.float32)
  _assert_matmul_close(jaxmem.ops.quantized_einsum("btc,cd->btd", x3, q),
                       _hand_activations(x3, (2,), act_bits) @ deq)
  if act_bits == 8:  # both integer-dot routes give the same (exact) integer sums
    a = jaxmem.ops.quantized_dot_general(x, q, dn, int8_route="int32")
    b = jaxmem.ops.quantized_dot_general(x, q, dn, int8_route="bf16")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("act_bits", [None, 16, 8])
def test_asymmetric_einsum_summing_a_weight_only_axis(act_bits):
  """'bc,cde->bd' also sums e, which the activation lacks: the zero point counts once per e."""
  rng = np.random.default_rng(4)
  w = (rng.normal(size=(24, 6, 3)) + 1.5).astype(np.float32)
  x = rng.normal(size=(4, 24)).astype(np.float32)
  q = jaxmem.ops.quantize(jnp.asarray(w), 8, channel_axes=(1,), symmetric=False, act_bits=act_bits)
  assert q.scale.shape == (1, 6, 1)
  ref = np.einsum("bc,cde->bd", _hand_activations(x, (1,), act_bits), _hand_dequantize(q))
  _assert_matmul_close(jaxmem.ops.quantized_einsum("bc,cde->bd", x, q), ref)


def test_asymmetric_int8_codes_shorten_the_exact_bf16_chunks():
  """Asymmetric int8 codes reach -128: 127 * 128 * K < 2**24 holds up to K = 1032, not 1040."""
  dn = (((1,), (0,)), ((), ()))
  x = jnp.ones((2, 1040))

  def dots(q):
    f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, dn, int8_route="bf16"))
    return f.lower(x, q).as_text().count("dot_general")

  w = jnp.asarray(np.random.default_rng(5).normal(size=(1040, 4)), jnp.float32)
  sym = jaxmem.ops.quantize(w, 8, act_bits=8)
  asym = jaxmem.ops.quantize(w, 8, act_bits=8, symmetric=False)
  assert dots(sym) == 1 and dots(asym) == 2  # one exact dot, or two exact chunks
  np.testing.assert_array_equal(
      np.asarray(jaxmem.ops.quantized_dot_general(x, asym, dn, int8_route="bf16")),
      np.asarray(jaxmem.ops.quantized_dot_general(x, asym, dn, int8_route="int32")))


# ----------------------------------------------------------------------------- layouts


def test_quantize_weights_stacked_kernel_groups_along_the_input_axis():
  w = jnp.asarray(np.random.default_rng(6).normal(size=(8, 256, 256)), jnp.float32)
  q = jaxmem.transform(jaxmem.quantize_weights(4, group_size=64, stack_axes=1), {"kernel": w})
  k = q["kernel"]
  assert k.shape == (8, 256, 256) and k.scale.shape == (8, 4, 256)
  assert (k.group_axis, k.group_size, k.channel_axes) == (1, 64, (0, 2))
  assert (k.qvalue.shape, k.pack_axis) == ((8, 128, 256), -2)  # packed along the groups
  for i in (0, 3, 7):
    alone = jaxmem.transform(jaxmem.quantize_weights(4, group_size=64), {"kernel": w[i]})
    ref, got = alone["kernel"], k[i]
    assert (got.shape, got.pack_axis, got.bits) == (ref.shape, ref.pack_axis, ref.bits)
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quantize_weights_groups_embedding_tables_along_features():
  table = jnp.asarray(np.random.default_rng(7).normal(size=(50, 256)), jnp.float32)
  model = nn.Embed(50, 256)
  params = {"embedding": table}
  # Grouping along the vocabulary (axis 0, 50 rows) would not divide; features do.
  q = jaxmem.transform(jaxmem.quantize_weights(8, group_size=128), params)["embedding"]
  assert (q.group_axis, q.group_size, q.scale.shape, q.channel_axes) == (1, 128, (50, 2), (0,))
  s = np.repeat(np.asarray(q.scale), 128, axis=1)
  assert np.all(np.abs(np.asarray(q.dequantize()) - np.asarray(table)) <= s / 2 * (1 + 1e-5))
  ids = jnp.array([[0, 49, 7], [3, 3, 12]])
  np.testing.assert_allclose(jaxmem.ops.quantized_take(q, ids), np.asarray(q.dequantize())[ids],
                             rtol=1e-6, atol=1e-6)
  got = jaxmem.apply(model, {"params": {"embedding": q}}, ids)
  np.testing.assert_allclose(got, np.asarray(q.dequantize())[ids], rtol=1e-6, atol=1e-6)


def test_stack_axes_rule_matching_no_leaf_names_the_rule():
  params = {"dense": {"kernel": jnp.ones((8, 4))}, "layers": {"kernel": jnp.ones((2, 8, 4))}}
  tx = jaxmem.quantize_weights(8, stack_axes={"nomatch/.*": 1})
  with pytest.raises(ValueError, match=r"stack_axes rule 'nomatch/\.\*' matches no selected leaf"):
    jaxmem.transform(tx, params)
  with pytest.raises(ValueError, match=r"'nomatch/\.\*'"):
    tx.init(params)  # checked up front, before any leaf is quantized
  ok = jaxmem.transform(jaxmem.quantize_weights(8, stack_axes={"layers/.*": 1}), params)
  assert ok["layers"]["kernel"].scale.shape == (2, 1, 4) and ok["dense"]["kernel"].scale.shape == (
      1, 4)


def test_set_act_bits_switches_the_policy_without_requantizing():
  set_act_bits = jaxmem._src.quantize.set_act_bits
  model = nn.Dense(16)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(6, 32)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  w8a8 = jaxmem.transform(jaxmem.quantize_dynamic_int8(), params)
  w8a16 = jaxmem.transform(set_act_bits(16), w8a8)
  weight_only = jaxmem.transform(set_act_bits(None), w8a16)
  k = w8a8["kernel"]
  for p, bits in ((w8a8, 8), (w8a16, 16), (weight_only, None)):
    assert p["kernel"].act_bits == bits
    assert p["kernel"].qvalue is k.qvalue and p["kernel"].scale is k.scale  # shared, not redone
    assert p["bias"] is params["bias"]
  # The same as quantizing weight-only in the first place.
  plain = jaxmem.transform(jaxmem.quantize_int8(), params)["kernel"]
  assert plain.act_bits is None
  np.testing.assert_array_equal(np.asarray(plain.qvalue), np.asarray(k.qvalue))
  deq = np.asarray(k.qvalue, np.float64) * np.asarray(k.scale, np.float64)
  bias = np.asarray(params["bias"], np.float64)
  run = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))
  for p, bits in ((w8a8, 8), (w8a16, 16), (weight_only, None)):
    ref = _hand_activations(np.asarray(x), (1,), bits) @ deq + bias
    _assert_matmul_close(run(p, x), ref)
  # Back to W8A8 gives the W8A8 model's outputs exactly.
  again = jaxmem.transform(set_act_bits(8), weight_only)
  np.testing.assert_array_equal(np.asarray(run(again, x)), np.asarray(run(w8a8, x)))
  with pytest.raises(ValueError, match="act_bits=4"):
    set_act_bits(4)
