"""QArray: error bound (symmetric and asymmetric), zeros, packing along an axis, slicing and
stacking per layer, pytree behaviour."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmem


def _full_scale(q):
  """A hand-written block broadcast: value i of axis a uses scale[i // (n // s)]."""
  s = np.asarray(q.scale)
  for a, (n, m) in enumerate(zip(q.shape, s.shape)):
    s = np.repeat(s, n // m, axis=a)
  return s


def _bound_ok(x, q):
  d = np.asarray(jaxmem.ops.dequantize(q, jnp.float32))
  s = _full_scale(q)
  return np.abs(x - d) <= s / 2 + 1e-6 * np.maximum(np.abs(x), s) + 1e-6 * s


# No subnormals: XLA:CPU flushes them to zero, so a leaf of subnormals quantizes to 0 with an
# error of up to 1.2e-38 (found by hypothesis: x=[9.68e-39], bits=2; the same before and after
# the bad-input work), which is no error bound's concern.
floats = st.floats(
    -1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)


@settings(max_examples=25, deadline=None)
@given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8), elements=floats),
    bits=st.sampled_from([2, 3, 4, 8]),
    per_tensor=st.booleans(),
    symmetric=st.booleans(),
)
def test_error_bound_property(x, bits, per_tensor, symmetric):
  q = jaxmem.ops.quantize(x, bits, channel_axes=() if per_tensor else (-1,), symmetric=symmetric)
  assert _bound_ok(x, q).all()
  per = 4 if bits == 2 else 2
  # Sub-byte values pack when some axis is divisible by the packing factor; rank is kept.
  assert q.packed == (bits <= 4 and any(n % per == 0 for n in x.shape))
  assert q.qvalue.ndim == x.ndim and q.scale.ndim == x.ndim and q.shape == x.shape
  assert q.qvalue.dtype == (jnp.uint8 if q.packed else jnp.int8)
  assert np.isfinite(np.asarray(q.scale)).all()
  # Integer values stay in range: symmetric never uses -2**(bits-1).
  v = np.asarray(jaxmem._src.qarray.int_values(q))
  lo = -(2 ** (bits - 1)) + (1 if symmetric else 0)
  assert v.min() >= lo and v.max() <= 2 ** (bits - 1) - 1


@settings(max_examples=12, deadline=None)
@given(
    groups=st.integers(1, 4),
    group_size=st.sampled_from([2, 4, 8]),
    cols=st.integers(1, 5),
    bits=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_group_wise_bound(groups, group_size, cols, bits, seed):
  x = np.random.default_rng(seed).normal(size=(groups * group_size, cols)).astype(np.float32)
  q = jaxmem.ops.quantize(x, bits, group_size=group_size)
  assert q.scale.shape == (groups, cols)
  assert (q.group_axis, q.group_size) == ((0, group_size) if groups > 1 else (None, None))
  assert _bound_ok(x, q).all()
  a = jaxmem.ops.quantize(x, bits, group_size=group_size, symmetric=False)
  assert a.offset.shape == a.scale.shape and _bound_ok(x, a).all()


def test_asymmetric_hand_computed():
  # One group [0, 1, 2, 3] at 2 bits: min 0, max 3, scale 1; codes 0..3 stored as -2..1.
  a = jaxmem.ops.quantize(jnp.array([[0.0, 1.0, 2.0, 3.0]]), 2, channel_axes=(0,), symmetric=False)
  np.testing.assert_array_equal(np.asarray(jaxmem._src.qarray.int_values(a)), [[-2, -1, 0, 1]])
  np.testing.assert_allclose(np.asarray(a.scale), [[1.0]])
  np.testing.assert_allclose(np.asarray(a.offset), [[2.0]])
  np.testing.assert_array_equal(np.asarray(a.dequantize()), [[0.0, 1.0, 2.0, 3.0]])
  # A skewed range is represented more finely than symmetric quantization can.
  x = jnp.linspace(10.0, 11.0, 64).reshape(1, 64)
  err = lambda q: float(jnp.abs(q.dequantize() - x).max())
  assert err(jaxmem.ops.quantize(x, 4, channel_axes=(0,), symmetric=False)) < err(
      jaxmem.ops.quantize(x, 4, channel_axes=(0,))) / 10


@settings(max_examples=5, deadline=None)
@given(
    layers=st.integers(1, 4),
    bits=st.sampled_from([2, 4, 8]),
    group=st.sampled_from([None, 4, 8]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_slicing_and_stacking_per_layer(layers, bits, group, symmetric, seed):
  """Slicing a stacked QArray along axis 0 gives each layer's own QArray, and back."""
  x = np.random.default_rng(seed).normal(size=(layers, 16, 6)).astype(np.float32)
  kw = dict(channel_axes=(0, 2), group_size=group, group_axis=1, symmetric=symmetric)
  q = jaxmem.ops.quantize(x, bits, **kw)
  per_layer = [
      jaxmem.ops.quantize(x[i], bits, **dict(kw, channel_axes=(1,), group_axis=0))
      for i in range(layers)
  ]
  for i, ref in enumerate(per_layer):
    for got in (q[i], jax.tree.map(lambda a, i=i: a[i], q)):  # indexing, or a leaf-wise slice
      assert got.shape == ref.shape and got.pack_axis == ref.pack_axis
      assert jax.tree.structure(got) == jax.tree.structure(ref)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(q)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # lax.scan and vmap hand the body one layer's QArray.
  # (Equal up to one float32 rounding: XLA may fuse q * scale + offset into an FMA.)
  _, ys = jax.lax.scan(lambda c, w: (c, w.dequantize()), 0, q)
  np.testing.assert_allclose(np.asarray(ys), np.asarray(q.dequantize()), rtol=1e-6, atol=1e-7)
  vs = jax.vmap(lambda w: w.dequantize())(q)
  np.testing.assert_allclose(np.asarray(vs), np.asarray(q.dequantize()), rtol=1e-6, atol=1e-7)


def test_indexing_that_cannot_slice_is_a_clear_error():
  q = jaxmem.ops.quantize(jnp.ones((4, 8)), 4, group_size=4, channel_axes=(1,))  # groups on 0
  with pytest.raises(TypeError, match="neither packed, grouped nor rotated"):
    q[0]
  with pytest.raises(TypeError, match="keeping at least one axis"):
    jaxmem.ops.quantize(jnp.ones((4, 8)))[0, 1]


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
def test_all_zero_gives_zero_not_nan(shape):
  q = jaxmem.ops.quantize(jnp.zeros(shape), 8)
  d = jaxmem.ops.dequantize(q)
  assert not np.isnan(np.asarray(d)).any()
  np.testing.assert_array_equal(np.asarray(d), 0.0)


def test_hand_computed_per_channel():
  x = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
  q = jaxmem.ops.quantize(x)
  np.testing.assert_allclose(np.asarray(q.scale), [[1 / 127, 4 / 127]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.qvalue), [[127, -64], [64, 127]])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_exact(bits):
  qmax = 2 ** (bits - 1) - 1
  v = np.arange(-qmax, qmax + 1, dtype=np.int8)
  v = np.resize(v, 37)  # odd length exercises padding
  p = jaxmem.ops.pack_ints(jnp.asarray(v), bits)
  per = 4 if bits == 2 else 2
  assert p.dtype == jnp.uint8 and p.shape == (-(-37 // per),)
  np.testing.assert_array_equal(np.asarray(jaxmem.ops.unpack_ints(p, bits, size=37)), v)
  # Along one axis of a 3-d array: the other axes are kept; adjacent values share a byte.
  m = np.resize(v, (3, 8, 5))
  for axis in range(3):
    p = jaxmem.ops.pack_ints(jnp.asarray(m), bits, axis=axis)
    assert p.shape == tuple(-(-n // per) if a == axis else n for a, n in enumerate(m.shape))
    back = jaxmem.ops.unpack_ints(p, bits, axis=axis, size=m.shape[axis])
    np.testing.assert_array_equal(np.asarray(back), m)
  # Hand-written reference: byte k holds values 2k (low nibble) and 2k+1 (high nibble).
  if bits == 4:
    np.testing.assert_array_equal(
        np.asarray(jaxmem.ops.pack_ints(jnp.array([1, -1, 7, 2], jnp.int8), 4)), [0xF1, 0x27])


def test_int4_real_bytes():
  x = jax.random.normal(jax.random.key(0), (256, 128))
  q = jaxmem.ops.quantize(x, 4, group_size=64)
  assert q.qvalue.shape == (128, 128) and q.pack_axis == -2  # packed along the group axis
  assert q.qvalue.nbytes == 256 * 128 // 2
  assert q.nbytes == 256 * 128 // 2 + 4 * 128 * 4
  a = jaxmem.ops.quantize(x, 4, group_size=64, symmetric=False)
  assert a.nbytes == 256 * 128 // 2 + 2 * 4 * 128 * 4  # scales and zero points


def test_pytree_leaves_and_static_metadata():
  q = jaxmem.ops.quantize(jnp.ones((4, 3)))
  leaves, treedef = jax.tree.flatten(q)
  assert [leaf.dtype for leaf in leaves] == [jnp.int8, jnp.float32]  # offset None: no leaf
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.shape == q.shape and rebuilt.bits == q.bits
  out = jax.jit(lambda q: q)(q)
  assert isinstance(out, jaxmem.QArray) and out.bits == 8 and out.shape == (4, 3)
  abstract = jax.eval_shape(lambda x: jaxmem.ops.quantize(x, 4, group_size=2), jnp.ones((4, 3)))
  assert abstract.qvalue.shape == (2, 3) and abstract.scale.shape == (2, 3)
  assert abstract.shape == (4, 3) and abstract.group_size == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits=1 is not supported"),
        (dict(bits=9), "bits=9 is not supported"),
        (dict(group_size=3), "not divisible by group_size=3"),
        (dict(act_bits=4), "act_bits=4"),
        (dict(bits=8, pack_bits=True), "packing needs bits <= 4"),
        (dict(bits=4, pack_axis=0, group_size=None), None),
        (dict(bits=2, pack_bits=True, channel_axes=(0,)), None),
        (dict(symmetric="no"), "symmetric"),
    ],
)
def test_bad_arguments(kwargs, match):
  if match is None:  # valid: a packing the shape allows
    q = jaxmem.ops.quantize(jnp.ones((4, 4)), path="layer/kernel", **kwargs)
    assert q.packed
    return
  with pytest.raises((ValueError, TypeError), match=match):
    jaxmem.ops.quantize(jnp.ones((4, 4)), path="layer/kernel", **kwargs)


def test_packing_an_indivisible_axis_names_the_fix():
  with pytest.raises(ValueError, match=r"'layer/kernel'.*cannot pack.*axis 0 of shape \(3, 5\)"):
    jaxmem.ops.quantize(jnp.ones((3, 5)), 4, pack_axis=0, path="layer/kernel")
  q = jaxmem.ops.quantize(jnp.ones((3, 5)), 4)  # default: no divisible axis, one int8 per value
  assert not q.packed and q.qvalue.dtype == jnp.int8


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_path(bad):
  x = np.ones((4, 4), np.float32)
  x[1, 2] = bad
  with pytest.raises(ValueError, match="'enc/kernel'.*NaN or Inf"):
    jaxmem.ops.quantize(x, path="enc/kernel")


def test_requantize_and_int_errors():
  q = jaxmem.ops.quantize(jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="already a QArray"):
    jaxmem.ops.quantize(q)
  with pytest.raises(ValueError, match="not float"):
    jaxmem.ops.quantize(jnp.ones((4, 4), jnp.int32))
