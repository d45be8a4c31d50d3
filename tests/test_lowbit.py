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


def _pack_reference(values: np.ndarray, bits: int) -> np.ndarray:
  """Hand-written packing: value i of each byte occupies bits [i*w, (i+1)*w), two's complement."""
  per = VALUES_PER_BYTE[bits]
  w = 8 // per
  flat = values.reshape(-1).astype(np.int64)
  out = []
  for start in range(0, flat.size, per):
    byte = 0
    for i, v in enumerate(flat[start : start + per]):
      byte |= (int(v) & ((1 << w) - 1)) << (i * w)
    out.append(byte)
  return np.array(out, np.uint8)


@st.composite
def _int_values(draw):
  bits = draw(st.sampled_from([2, 3, 4]))
  w = 8 // VALUES_PER_BYTE[bits]
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
  # The full two's-complement range of the field (the symmetric QArray range is inside it).
  lo, hi = -(2 ** (w - 1)), 2 ** (w - 1) - 1
  values = draw(hnp.arrays(np.int8, shape, elements=st.integers(lo, hi)))
  return bits, values


@settings(max_examples=40, deadline=None)
@given(_int_values())
def test_pack_matches_reference_and_unpacks_exactly(case):
  bits, values = case
  packed = jaxmem.pack(jnp.asarray(values), bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (math.ceil(values.size / VALUES_PER_BYTE[bits]),)
  np.testing.assert_array_equal(np.asarray(packed), _pack_reference(values, bits))
  back = jaxmem.unpack(packed, bits, values.shape)
  assert back.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(back), values)


def test_pack_known_bytes():
  # int4: low nibble first. -1 -> 0xF, 7 -> 0x7: byte 0x7F; -8 -> 0x8, 1 -> 0x1: 0x18.
  v = jnp.array([-1, 7, -8, 1], jnp.int8)
  assert jaxmem.pack(v, 4).tolist() == [0x7F, 0x18]
  # int2: four per byte, -1 -> 0b11, 1 -> 0b01, 0, -2 -> 0b10: 0b10_00_01_11.
  assert jaxmem.pack(jnp.array([-1, 1, 0, -2], jnp.int8), 2).tolist() == [0b10000111]
  # Odd length pads with zero fields.
  assert jaxmem.pack(jnp.array([3, -3, 5], jnp.int8), 4).tolist() == [0xD3, 0x05]


def test_pack_unpack_under_jit():
  v = jnp.arange(-7, 8, dtype=jnp.int8)
  back = jax.jit(lambda x: jaxmem.unpack(jaxmem.pack(x, 4), 4, x.shape))(v)
  np.testing.assert_array_equal(back, v)


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
  q = jaxmem.quantize(jnp.asarray(x), bits, channel_axes=(1,), group_size=group_size)
  deq_ref, scales_ref = _grouped_reference(x, bits, group_size)
  assert q.packed == (bits <= 4)
  np.testing.assert_allclose(np.asarray(q.scale)[:, 0, :], scales_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.dequantize()), deq_ref, rtol=1e-5, atol=1e-6)
  # Round to nearest: error at most half a step of the element's own group scale.
  step = np.repeat(np.asarray(q.scale)[:, 0, :], group_size, axis=0)
  assert np.all(np.abs(x - np.asarray(q.dequantize())) <= step / 2 * (1 + 1e-5))
  # Packing is exact: the packed and unpacked forms dequantize to identical values.
  u = jaxmem.quantize(jnp.asarray(x), bits, channel_axes=(1,), group_size=group_size,
                      pack_bits=False)
  np.testing.assert_array_equal(np.asarray(u.dequantize()), np.asarray(q.dequantize()))


def test_quantize_int4_bytes_and_layout():
  rng = np.random.default_rng(0)
  params = {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(128, 32)), jnp.float32),
                "bias": jnp.zeros(32)},
      "embed": {"embedding": jnp.asarray(rng.normal(size=(10, 64)), jnp.float32)},
  }
  q = jaxmem.transform(jaxmem.quantize_int4(group_size=64), params)
  k, e = q["dense"]["kernel"], q["embed"]["embedding"]
  assert (k.bits, k.packed, k.group_size, k.group_axis) == (4, True, 64, 0)
  assert k.qvalue.shape == (128 * 32 // 2,) and k.scale.shape == (2, 1, 32)
  # Embedding tables are grouped along features, one scale row per token.
  assert (e.group_axis, e.scale.shape) == (1, (10, 1, 1))
  assert q["dense"]["bias"] is params["dense"]["bias"]
  report = jaxmem.memory_report(q).as_dict()
  assert report["dense/kernel"] == 128 * 32 // 2 + 4 * 2 * 32
  assert report["embed/embedding"] == 10 * 64 // 2 + 4 * 10
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


def test_quantize_grouped_int2_and_errors():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 8)), jnp.float32)
  q = jaxmem.transform(jaxmem.quantize_grouped(2, group_size=32), {"kernel": x})["kernel"]
  assert q.qvalue.nbytes == 64 * 8 // 4
  assert set(np.unique(np.asarray(jaxmem.unpack(q.qvalue, 2, q.shape)))) <= {-1, 0, 1}
  with pytest.raises(ValueError, match="bits=1"):
    jaxmem.quantize_grouped(1)
  with pytest.raises(ValueError, match="already a QArray"):
    jaxmem.transform(jaxmem.quantize_int4(group_size=32), {"kernel": q})


def test_quantize_int4_under_jit_and_eval_shape():
  params = {"kernel": jnp.ones((64, 16))}
  tx = jaxmem.quantize_int4(group_size=32)
  abstract = jax.eval_shape(lambda p: jaxmem.transform(tx, p), params)
  assert abstract["kernel"].qvalue.shape == (512,)
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
  q = jaxmem.gptq_kernel(w, np.eye(64), 4, group_size=32, act_order=False, clip_search=False)
  rtn = jaxmem.quantize(jnp.asarray(w), 4, channel_axes=(1,), group_size=32)
  np.testing.assert_array_equal(q.qvalue, rtn.qvalue)
  np.testing.assert_allclose(q.scale, rtn.scale, rtol=1e-6)
  assert (q.shape, q.scale.shape, q.packed, q.group_axis) == (rtn.shape, rtn.scale.shape, True, 0)


@pytest.mark.parametrize("group_size,act_order", [(32, True), (32, False), (None, True)])
def test_gptq_reduces_output_error(group_size, act_order):
  x = _correlated_inputs()
  w = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
  q = jaxmem.gptq_kernel(w, x.T @ x, 4, group_size=group_size, act_order=act_order)
  rtn = jaxmem.quantize(jnp.asarray(w), 4, channel_axes=(1,), group_size=group_size)
  err = lambda wq: np.linalg.norm(x @ (np.asarray(wq, np.float64) - w))
  assert err(q.dequantize()) < 0.8 * err(rtn.dequantize())
  values = np.asarray(jaxmem.unpack(q.qvalue, 4, q.shape))
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
