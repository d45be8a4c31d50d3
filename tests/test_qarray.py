"""QArray: quantize/dequantize error bound, zeros, packing, pytree behaviour."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmem
from jaxmem._src.qarray import grouped_shape


def _bound_ok(x, q):
  d = np.asarray(jaxmem.dequantize(q, jnp.float32))
  s = np.broadcast_to(
      np.asarray(q.scale), grouped_shape(q.shape, q.group_size, q.group_axis)
  ).reshape(q.shape)
  return np.abs(x - d) <= s / 2 + 1e-6 * np.maximum(np.abs(x), s)


# No subnormals: XLA:CPU flushes them to zero, so a leaf of subnormals quantizes to 0 with an
# error of up to 1.2e-38 (found by hypothesis: x=[9.68e-39], bits=2; the same before and after
# the bad-input work), which is no error bound's concern.
floats = st.floats(
    -1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8), elements=floats),
    bits=st.sampled_from([2, 3, 4, 8]),
    per_tensor=st.booleans(),
)
def test_error_bound_property(x, bits, per_tensor):
  q = jaxmem.quantize(x, bits, channel_axes=() if per_tensor else (-1,))
  assert _bound_ok(x, q).all()
  assert q.qvalue.dtype == (jnp.uint8 if bits <= 4 else jnp.int8)
  assert np.isfinite(np.asarray(q.scale)).all()


@settings(max_examples=30, deadline=None)
@given(
    groups=st.integers(1, 4),
    group_size=st.sampled_from([2, 4, 8]),
    cols=st.integers(1, 5),
    bits=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_group_wise_bound(groups, group_size, cols, bits, seed):
  x = np.random.default_rng(seed).normal(size=(groups * group_size, cols)).astype(np.float32)
  q = jaxmem.quantize(x, bits, group_size=group_size)
  assert q.scale.shape == (groups, 1, cols)
  assert _bound_ok(x, q).all()


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
def test_all_zero_gives_zero_not_nan(shape):
  q = jaxmem.quantize(jnp.zeros(shape), 8)
  d = jaxmem.dequantize(q)
  assert not np.isnan(np.asarray(d)).any()
  np.testing.assert_array_equal(np.asarray(d), 0.0)


def test_hand_computed_per_channel():
  x = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
  q = jaxmem.quantize(x)
  np.testing.assert_allclose(np.asarray(q.scale), [[1 / 127, 4 / 127]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.qvalue), [[127, -64], [64, 127]])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_exact(bits):
  qmax = 2 ** (bits - 1) - 1
  v = np.arange(-qmax, qmax + 1, dtype=np.int8)
  v = np.resize(v, 37)  # odd length exercises padding
  p = jaxmem.pack(jnp.asarray(v), bits)
  per = 4 if bits == 2 else 2
  assert p.dtype == jnp.uint8 and p.shape == (-(-37 // per),)
  np.testing.assert_array_equal(np.asarray(jaxmem.unpack(p, bits, (37,))), v)


def test_int4_real_bytes():
  x = jax.random.normal(jax.random.key(0), (256, 128))
  q = jaxmem.quantize(x, 4, group_size=64)
  assert q.qvalue.nbytes == 256 * 128 // 2
  assert q.nbytes == 256 * 128 // 2 + 4 * 128 * 4


def test_pytree_leaves_and_static_metadata():
  q = jaxmem.quantize(jnp.ones((4, 3)))
  leaves, treedef = jax.tree.flatten(q)
  assert [leaf.dtype for leaf in leaves] == [jnp.int8, jnp.float32]
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.shape == q.shape and rebuilt.bits == q.bits
  out = jax.jit(lambda q: q)(q)
  assert isinstance(out, jaxmem.QArray) and out.bits == 8 and out.shape == (4, 3)
  abstract = jax.eval_shape(lambda x: jaxmem.quantize(x, 4, group_size=2), jnp.ones((4, 3)))
  assert abstract.qvalue.shape == (6,) and abstract.scale.shape == (2, 1, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits=1 is not supported"),
        (dict(bits=9), "bits=9 is not supported"),
        (dict(group_size=3), "not divisible by group_size=3"),
        (dict(act_bits=4), "act_bits=4"),
        (dict(bits=8, pack_bits=True), "packing needs bits <= 4"),
    ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jaxmem.quantize(jnp.ones((4, 4)), path="layer/kernel", **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_path(bad):
  x = np.ones((4, 4), np.float32)
  x[1, 2] = bad
  with pytest.raises(ValueError, match="'enc/kernel'.*NaN or Inf"):
    jaxmem.quantize(x, path="enc/kernel")


def test_requantize_and_int_errors():
  q = jaxmem.quantize(jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="already a QArray"):
    jaxmem.quantize(q)
  with pytest.raises(ValueError, match="not float"):
    jaxmem.quantize(jnp.ones((4, 4), jnp.int32))
