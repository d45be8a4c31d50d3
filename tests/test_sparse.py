"""SparseArray: exact pack/unpack against hand-written encoders, int8 values, bytes, jit, models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem
from jaxmem._src.sparse import sparse_int_values


def _sparse(shape, density, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  return x * (rng.random(shape) < density)


def _ref_rice(x: np.ndarray, k: int) -> tuple[bytes, int]:
  """Reference Rice index from bit strings: unary quotients, then k-bit remainders."""
  pos = [i for i, v in enumerate(x.reshape(-1)) if v != 0]
  unary, rem, prev = "", "", -1
  for p in pos:
    gap = p - prev - 1
    prev = p
    unary += "1" * (gap >> k) + "0"
    rem += format(gap & ((1 << k) - 1), f"0{k}b") if k else ""

  def to_bytes(bits):
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))

  return to_bytes(unary) + to_bytes(rem), len(unary)


def _ref_rice_cost(x: np.ndarray, k: int) -> int:
  index, _ = _ref_rice(x, k)
  return len(index)


@pytest.mark.parametrize(
    "shape,density",
    [((8,), 0.0), ((13,), 1.0), ((7, 9), 0.3), ((3, 4, 5), 0.7), ((64, 32), 0.05)],
)
def test_pack_unpack_exact_under_jit(shape, density):
  x = _sparse(shape, density, seed=len(shape))
  unpack = jax.jit(jaxmem.ops.sparse_unpack)
  for encoding in ("bitmask", "rice", "auto"):
    s = jaxmem.ops.sparse_pack(jnp.asarray(x), encoding=encoding)
    assert s.nnz == np.count_nonzero(x)
    assert s.values.dtype == jnp.float32
    if encoding != "auto":
      assert s.encoding == encoding
    np.testing.assert_array_equal(np.asarray(unpack(s)), x)
    # Values are the nonzeros in row-major order.
    np.testing.assert_array_equal(np.asarray(s.values), x[x != 0])
  # -0.0 comes back as 0.0 (equal, as the docstring says).
  neg_zero = jaxmem.ops.sparse_pack(jnp.array([-0.0, 2.0]))
  np.testing.assert_array_equal(np.asarray(neg_zero.materialize()), [0.0, 2.0])


def test_bitmask_index_matches_reference():
  x = _sparse((5, 7), 0.4)
  s = jaxmem.ops.sparse_pack(jnp.asarray(x), encoding="bitmask")
  bits = "".join("1" if v != 0 else "0" for v in x.reshape(-1))
  bits += "0" * (-len(bits) % 8)
  ref = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
  assert bytes(np.asarray(s.index)) == ref


def test_rice_index_matches_reference_and_k_is_optimal():
  x = np.zeros(40, np.float32)
  x[[1, 4, 5, 17, 39]] = [1.0, -2.0, 3.0, 4.0, 5.0]
  s = jaxmem.ops.sparse_pack(jnp.asarray(x), encoding="rice")
  ref, ulen = _ref_rice(x, s.rice_k)
  assert bytes(np.asarray(s.index)) == ref
  assert s.unary_bits == ulen
  costs = {k: _ref_rice_cost(x, k) for k in range(8)}
  assert len(ref) == min(costs.values())
  # Hand-checked small case: positions 1, 4, 5 with k=1 -> gaps 1, 2, 0.
  y = np.zeros(8, np.float32)
  y[[1, 4, 5]] = 1.0
  index, ulen = _ref_rice(y, 1)
  assert (index, ulen) == (bytes([0b01000000, 0b10000000]), 4)


def test_rice_beats_bitmask_at_ten_percent():
  x = _sparse((64, 256), 0.1)
  s = jaxmem.ops.sparse_pack(jnp.asarray(x))
  assert s.encoding == "rice"
  bits_per_weight = s.index.size * 8 / x.size
  # The entropy of a 10% Bernoulli mask is 0.469 bits; Rice coding lands close to it.
  assert 0.46 < bits_per_weight < 0.5
  dense = jaxmem.ops.sparse_pack(jnp.asarray(_sparse((64, 256), 0.6)))
  assert dense.encoding == "bitmask"


def test_int8_values_match_hand_quantization():
  x = _sparse((16, 6), 0.3, seed=3)
  s = jaxmem.ops.sparse_pack(jnp.asarray(x), bits=8)
  assert s.values.dtype == jnp.int8 and s.scale.shape == (1, 6)
  scale = np.abs(x).max(0, keepdims=True) / 127
  q = np.clip(np.round(x / np.where(scale > 0, scale, 1)), -127, 127)
  np.testing.assert_array_equal(np.asarray(s.values), q[x != 0].astype(np.int8))
  np.testing.assert_allclose(np.asarray(jax.jit(jaxmem.ops.sparse_unpack)(s)), q * scale, rtol=1e-6)
  assert s.nnz == np.count_nonzero(x)
  # Per-tensor scale.
  t = jaxmem.ops.sparse_pack(jnp.asarray(x), bits=8, channel_axes=())
  assert t.scale.shape == (1, 1)
  assert np.abs(np.asarray(t.materialize()) - x).max() <= np.abs(x).max() / 127 / 2 + 1e-7


def test_int4_values_are_packed():
  x = _sparse((8, 16), 0.5, seed=4)
  s = jaxmem.ops.sparse_pack(jnp.asarray(x), bits=4)
  assert s.packed and s.values.dtype == jnp.uint8 and s.values.size == -(-s.nnz // 2)
  scale = np.abs(x).max(0, keepdims=True) / 7
  q = np.clip(np.round(x / np.where(scale > 0, scale, 1)), -7, 7)
  np.testing.assert_allclose(np.asarray(jax.jit(jaxmem.ops.sparse_unpack)(s)), q * scale, rtol=1e-6)


def test_from_qarray_keeps_values_and_scales():
  x = _sparse((12, 5), 0.4, seed=5)
  q = jaxmem.ops.quantize(jnp.asarray(x), 8)
  s = jaxmem.ops.sparse_pack(q)
  assert s.bits == 8 and s.nnz == int(np.count_nonzero(np.asarray(q.qvalue)))
  np.testing.assert_array_equal(np.asarray(s.materialize()), np.asarray(jaxmem.ops.dequantize(q)))
  # Group-wise QArrays pack too (scales kept in their block-broadcast layout).
  g = jaxmem.ops.quantize(jnp.asarray(x), 8, channel_axes=(), group_size=4)
  sg = jaxmem.ops.sparse_pack(g, path="w")
  assert sg.scale.shape == (3, 1) and sg.group_size == 4
  np.testing.assert_array_equal(np.asarray(sg.materialize()), np.asarray(jaxmem.ops.dequantize(g)))
  with pytest.raises(ValueError, match="'w': the QArray is asymmetric"):
    jaxmem.ops.sparse_pack(jaxmem.ops.quantize(jnp.asarray(x), 8, symmetric=False), path="w")


def test_explicit_mask_keeps_zero_values():
  x = jnp.array([0.0, 1.0, 2.0, 0.0])
  s = jaxmem.ops.sparse_pack(x, mask=jnp.array([True, True, False, False]))
  assert s.nnz == 2
  np.testing.assert_array_equal(np.asarray(s.materialize()), [0.0, 1.0, 0.0, 0.0])


def test_memory_report_counts_real_bytes():
  x = _sparse((64, 32), 0.1)
  params = {"dense": {"kernel": jnp.asarray(x), "bias": jnp.zeros(32)}}
  packed = jaxmem.transform(jaxmem.sparsify(bits=8), params)
  s = packed["dense"]["kernel"]
  assert isinstance(s, jaxmem.SparseArray)
  expected = s.values.size + s.index.size + 4 * s.scale.size
  assert s.nbytes == expected
  report = jaxmem.memory_report(packed)
  assert report.as_dict()["dense/kernel"] == expected
  assert jaxmem.tree_bytes(packed) == expected + 32 * 4
  # int8 values (~0.1 B/weight) + Rice index (~0.06 B) + 32 float scales: < 0.25 B/weight.
  assert report.as_dict()["dense/kernel"] < 0.25 * x.size


def test_pytree_and_jit_round_trip():
  s = jaxmem.ops.sparse_pack(jnp.asarray(_sparse((6, 10), 0.3)), bits=8)
  leaves, treedef = jax.tree.flatten(s)
  assert len(leaves) == 3  # values, index, scale
  s2 = jax.tree.unflatten(treedef, [np.asarray(a) for a in leaves])
  assert (s2.shape, s2.nnz, s2.encoding, s2.bits) == (s.shape, s.nnz, s.encoding, s.bits)
  np.testing.assert_array_equal(np.asarray(s2.materialize()), np.asarray(s.materialize()))
  out = jax.jit(lambda t: t)(s)
  assert isinstance(out, jaxmem.SparseArray) and out.nnz == s.nnz
  abstract = jax.eval_shape(lambda t: t.materialize(), s)
  assert abstract.shape == (6, 10) and abstract.dtype == jnp.float32
  assert jaxmem.is_compressed(s) and s.shape == (6, 10) and s.dtype == np.float32


def test_model_runs_from_sparse_params():
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  pruned = jaxmem.transform(jaxmem.magnitude_prune(0.8), params)
  packed = jaxmem.transform(jaxmem.sparsify(), pruned)
  assert all(isinstance(packed[k]["kernel"], jaxmem.SparseArray) for k in packed)
  want = model.apply({"params": pruned}, x)
  got = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))(packed, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_errors_name_the_path():
  x = jnp.asarray(_sparse((4, 4), 0.5))
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda a: jaxmem.ops.sparse_pack(a, path="layer/kernel").values)(x)
  with pytest.raises(ValueError, match="'w'.*not float"):
    jaxmem.ops.sparse_pack(jnp.ones((4, 4), jnp.int32), path="w")
  s = jaxmem.ops.sparse_pack(x)
  with pytest.raises(ValueError, match="already a SparseArray"):
    jaxmem.ops.sparse_pack(s, path="w")
  with pytest.raises(ValueError, match="'w': mask shape"):
    jaxmem.ops.sparse_pack(x, mask=jnp.ones((4,), bool), path="w")
  with pytest.raises(ValueError, match="encoding"):
    jaxmem.ops.sparse_pack(x, encoding="huffman")
  with pytest.raises(ValueError, match="'kernel': the leaf is already a SparseArray"):
    jaxmem.transform(jaxmem.sparsify(), {"kernel": s})
  with pytest.raises(TypeError, match="SparseArray"):
    jaxmem.ops.sparse_unpack(x)


@pytest.mark.parametrize(
    "shape,bits,layout",
    [
        ((32, 6), 4, dict(channel_axes=(1,), group_size=8)),  # int4 groups along the inputs
        ((16, 8), 8, dict(channel_axes=(0,), group_size=2, group_axis=1)),
        ((2, 32, 6), 4, dict(channel_axes=(0, 2), group_size=8, group_axis=1)),  # stacked layers
    ],
)
def test_grouped_qarray_round_trip(shape, bits, layout):
  x = _sparse(shape, 0.5, seed=len(shape) + bits)
  q = jaxmem.ops.quantize(jnp.asarray(x), bits, **layout)
  assert q.group_size == layout["group_size"]
  deq = np.asarray(jaxmem.ops.dequantize(q))
  ints = np.asarray(jaxmem.ops.unpack_ints(q.qvalue, bits, q.pack_axis) if q.packed else q.qvalue)
  unpack = jax.jit(jaxmem.ops.sparse_unpack)
  for encoding in ("bitmask", "rice") if len(shape) == 2 and bits == 4 else ("auto",):
    s = jaxmem.ops.sparse_pack(q, encoding=encoding)
    assert encoding in ("auto", s.encoding) and s.bits == bits and s.nnz == np.count_nonzero(ints)
    assert s.group_size == layout["group_size"] and s.group_axis == layout.get("group_axis", 0)
    np.testing.assert_array_equal(np.asarray(s.scale), np.asarray(q.scale))  # stored as is
    np.testing.assert_array_equal(np.asarray(unpack(s)), deq)  # exactly the QArray's value
    np.testing.assert_array_equal(np.asarray(jax.jit(sparse_int_values)(s)), ints)
    # Honest bytes: packed codes (2 per byte for 3-4 bits), the index, float32 scales.
    per = 1 if bits > 4 else 2
    assert s.values.size == -(-s.nnz // per) and s.values.dtype == (jnp.uint8 if per > 1
                                                                    else jnp.int8)
    assert s.nbytes == s.values.size + s.index.size + 4 * q.scale.size
    assert jaxmem.tree_bytes({"w": s}) == s.nbytes
  # A stacked SparseArray's materialize slices to the per-layer QArrays' values.
  if len(shape) == 3:
    for i in range(shape[0]):
      np.testing.assert_array_equal(deq[i], np.asarray(jaxmem.ops.dequantize(q[i])))


def test_grouped_int4_sparsify_chain_and_model():
  model = nn.Dense(4)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 32)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  tx = jaxmem.chain(jaxmem.magnitude_prune(0.5), jaxmem.quantize_int4(8))
  q = jaxmem.transform(tx, params)["kernel"]
  packed = jaxmem.transform(jaxmem.chain(tx, jaxmem.sparsify()), params)
  s = packed["kernel"]
  assert isinstance(s, jaxmem.SparseArray) and s.group_size == 8 and s.density <= 0.5
  assert s.nbytes < q.nbytes
  got = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))(packed, x)
  want = x @ jaxmem.ops.dequantize(q) + params["bias"][None]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
