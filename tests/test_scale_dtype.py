"""Half-precision scales (``scale_dtype=``): bounds, bytes, products, formats, bad input."""

import dataclasses

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmem

DN = (((1,), (0,)), ((), ()))
HALF = [jnp.float16, jnp.bfloat16]


def _full(s, shape):
  """A hand-written block broadcast of a scale/offset to ``shape`` (float64)."""
  s = np.asarray(s, np.float64)
  for a, (n, m) in enumerate(zip(shape, s.shape)):
    s = np.repeat(s, n // m, axis=a)
  return s


def _as_f32(q):
  """The same QArray with its scales/offsets widened to float32 (the values they hold)."""
  return dataclasses.replace(
      q, scale=q.scale.astype(jnp.float32),
      offset=None if q.offset is None else q.offset.astype(jnp.float32))


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.sampled_from([4, 6, 8]), st.integers(1, 5)),
                 elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)),
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
    sdt=st.sampled_from(HALF),
)
def test_half_scales_keep_the_rounding_bound(x, bits, symmetric, sdt):
  q = jaxmem.ops.quantize(x, bits, group_size=2, symmetric=symmetric, scale_dtype=sdt)
  assert q.scale.dtype == sdt and (q.offset is None or q.offset.dtype == sdt)
  s = _full(q.scale, x.shape)
  err = np.abs(np.asarray(q.dequantize(), np.float64) - x)
  # The values are rounded with the stored scale (rounded up), so the bound is scale / 2;
  # an asymmetric zero point's own rounding (2**-8 relative for bfloat16) adds its part.
  slack = 0.0 if symmetric else np.abs(_full(q.offset, x.shape)) * 2.0**-7
  assert np.all(err <= s / 2 + slack + 1e-6 * np.maximum(np.abs(x), s)), err.max()
  v = np.asarray(jaxmem._src.qarray.int_values(q))
  assert v.min() >= -(2 ** (bits - 1)) and v.max() <= 2 ** (bits - 1) - 1


def test_half_scales_halve_the_scale_bytes():
  w = jax.random.normal(jax.random.key(0), (256, 64))
  for sym in (True, False):
    full = jaxmem.transform(jaxmem.quantize_int4(32, symmetric=sym), {"kernel": w})
    half = jaxmem.transform(jaxmem.quantize_int4(32, symmetric=sym, scale_dtype=jnp.float16),
                            {"kernel": w})
    n_scales = (256 // 32) * 64 * (1 if sym else 2)
    assert jaxmem.tree_bytes(full) - jaxmem.tree_bytes(half) == 2 * n_scales
  # 4.5 bits a weight at groups of 32, symmetric.
  sym_half = jaxmem.transform(jaxmem.quantize_int4(32, scale_dtype=jnp.bfloat16), {"kernel": w})
  assert jaxmem.tree_bytes(sym_half) * 8 == 256 * 64 * 4.5


@pytest.mark.parametrize("act_bits", [None, 8, 16])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("sdt", HALF)
def test_products_use_the_stored_half_scales_exactly(act_bits, native, sdt):
  w = jax.random.normal(jax.random.key(1), (96, 40))
  x = jax.random.normal(jax.random.key(2), (3, 96))
  q = jaxmem.ops.quantize(w, act_bits=act_bits, scale_dtype=sdt)
  run = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, DN))
  with jaxmem.ops.native_kernels(native):
    np.testing.assert_array_equal(run(x, q), run(x, _as_f32(q)))
  g = jaxmem.ops.quantize(w, 4, group_size=32, symmetric=False, scale_dtype=sdt)
  with jaxmem.ops.native_kernels(native):
    np.testing.assert_allclose(run(x, g), x @ g.dequantize(), rtol=1e-5, atol=1e-5)
  table = jaxmem.ops.quantize(w, channel_axes=(0,), scale_dtype=sdt)
  ids = jnp.array([0, 95, 7])
  np.testing.assert_array_equal(jaxmem.ops.quantized_take(table, ids),
                                jaxmem.ops.quantized_take(_as_f32(table), ids))


def test_half_scales_in_a_model_scan_and_checkpoint(tmp_path):
  params = {"layers": {"kernel": jax.random.normal(jax.random.key(3), (3, 64, 64)) / 8}}
  q = jaxmem.transform(
      jaxmem.quantize_weights(8, stack_axes=1, scale_dtype=jnp.float16, act_bits=8), params)
  k = q["layers"]["kernel"]
  assert k.scale.dtype == jnp.float16 and k[1].scale.dtype == jnp.float16
  x = jax.random.normal(jax.random.key(4), (4, 64))
  body = lambda h, wl: (jnp.tanh(jaxmem.ops.quantized_dot_general(h, wl, DN)), None)
  y = jax.jit(lambda x, k: jax.lax.scan(body, x, k)[0])(x, k)
  y32 = jax.jit(lambda x, k: jax.lax.scan(body, x, k)[0])(x, _as_f32(k))
  np.testing.assert_array_equal(y, y32)
  with jaxmem.CheckpointManager(tmp_path / "ckpt") as mgr:
    assert mgr.save(0, q)
    mgr.wait_until_finished()
    back = mgr.restore()
  kb = back["layers"]["kernel"]
  assert kb.scale.dtype == jnp.float16
  np.testing.assert_array_equal(kb.scale, k.scale)
  np.testing.assert_array_equal(kb.qvalue, k.qvalue)


def test_scale_dtype_bad_inputs():
  for bad in (jnp.int8, "float64", True, "nope"):
    with pytest.raises(ValueError, match="scale_dtype.*float32.*float16 or bfloat16"):
      jaxmem.quantize_int4(32, scale_dtype=bad)
    with pytest.raises(ValueError, match="'w'.*scale_dtype"):
      jaxmem.ops.quantize(jnp.ones((4, 4)), scale_dtype=bad, path="w")
  # float16 tops out at 65504: a larger scale is an error, not an inf scale.
  with pytest.raises(ValueError, match="'big'.*overflows float16.*bfloat16"):
    jaxmem.ops.quantize(jnp.full((4, 4), 1e7), scale_dtype=jnp.float16, path="big")
  assert jaxmem.ops.quantize(jnp.full((4, 4), 1e7), scale_dtype=jnp.bfloat16).scale.dtype == (
      jnp.bfloat16)
