"""One-shot magnitude and N:M pruning against numpy references; composition and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem


def _ref_keep(scores: np.ndarray, num_prune: int) -> np.ndarray:
  """Prune the num_prune smallest scores; ties: the lower index goes first."""
  order = sorted(range(scores.size), key=lambda i: (scores[i], i))
  keep = np.ones(scores.size, bool)
  keep[order[:num_prune]] = False
  return keep


def _ref_nm(x: np.ndarray, n: int, m: int) -> np.ndarray:
  """N:M along axis 0 of a 2-d array, with a short last group treated as zero-padded."""
  keep = np.zeros(x.shape, bool)
  for j in range(x.shape[1]):
    for start in range(0, x.shape[0], m):
      idx = list(range(start, min(start + m, x.shape[0])))
      best = sorted(idx, key=lambda i: (-abs(x[i, j]), -i))[:n]  # ties: the higher index stays
      keep[best, j] = True
  return keep


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
      "a": {"kernel": f(8, 6), "bias": f(6)},
      "b": {"kernel": f(6, 4), "bias": f(4)},
      "count": jnp.arange(3),
  }


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.77, 0.9])
def test_layer_magnitude_prune_is_exact(sparsity):
  params = _params()
  out = jaxmem.transform(jaxmem.magnitude_prune(sparsity), params)
  for k in ("a", "b"):
    w = np.asarray(params[k]["kernel"])
    want = np.where(_ref_keep(np.abs(w).reshape(-1), round(sparsity * w.size)).reshape(w.shape),
                    w, 0)
    np.testing.assert_array_equal(np.asarray(out[k]["kernel"]), want)
    np.testing.assert_array_equal(out[k]["bias"], params[k]["bias"])  # default: kernels only
  np.testing.assert_array_equal(out["count"], params["count"])


def test_ties_are_deterministic():
  x = jnp.ones((4, 4))
  mask = jaxmem.ops.magnitude_mask(x, 0.25)
  # All equal: the first four (row-major) entries are pruned.
  np.testing.assert_array_equal(np.asarray(mask).reshape(-1), [False] * 4 + [True] * 12)
  x = jnp.array([2.0, -1.0, 1.0, 3.0, -1.0])
  np.testing.assert_array_equal(np.asarray(jaxmem.ops.magnitude_mask(x, 0.4)),
                                [True, False, False, True, True])


def test_global_prune_uses_one_threshold():
  params = _params(1)
  params["b"]["kernel"] = params["b"]["kernel"] * 10  # 'b' dominates the global ranking
  out = jaxmem.transform(jaxmem.magnitude_prune(0.6, scope="global"), params)
  flat = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).reshape(-1) for k in ("a", "b")])
  keep = _ref_keep(flat, round(0.6 * flat.size))
  got = np.concatenate([np.asarray(out[k]["kernel"]).reshape(-1) != 0 for k in ("a", "b")])
  np.testing.assert_array_equal(got, keep)
  assert jaxmem.sparsity.tree_sparsity(out) == pytest.approx(round(0.6 * 72) / 72)
  assert (np.asarray(out["b"]["kernel"]) != 0).mean() > (np.asarray(out["a"]["kernel"]) != 0).mean()


def test_prune_runs_under_jit_and_where_rules():
  params = _params(2)
  tx = jaxmem.magnitude_prune(0.5, where=r"a/.*")  # kernel and bias of 'a'
  out = jax.jit(lambda p: jaxmem.transform(tx, p))(params)
  assert int(jnp.sum(out["a"]["kernel"] == 0)) == 24 and int(jnp.sum(out["a"]["bias"] == 0)) == 3
  np.testing.assert_array_equal(out["b"]["kernel"], params["b"]["kernel"])


@pytest.mark.parametrize("n,m,rows", [(2, 4, 8), (1, 3, 9), (3, 8, 16), (2, 4, 10)])
def test_nm_prune_matches_reference(n, m, rows):
  w = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 5)), jnp.float32)
  w = w.at[0, 0].set(w[1, 0])  # a tie
  pad = rows % m != 0
  out = jaxmem.transform(jaxmem.nm_prune(n, m, pad=pad), {"kernel": w})["kernel"]
  keep = _ref_nm(np.asarray(w), n, m)
  np.testing.assert_array_equal(np.asarray(out), np.where(keep, np.asarray(w), 0))
  if not pad:
    assert float(jnp.mean(out == 0)) == pytest.approx(1 - n / m)


def test_nm_prune_conv_kernel_groups_input_axis():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 8, 2)), jnp.float32)
  mask = jaxmem.sparsity.nm_masks({"conv": {"kernel": w}}, 2, 4)["conv"]["kernel"]
  groups = np.asarray(mask).reshape(3, 3, 2, 4, 2).sum(axis=3)
  assert (groups == 2).all()


def test_nm_indivisible_axis_is_an_error():
  msg = "'dense/kernel': axis 0 has 10 entries, not divisible by m=4"
  with pytest.raises(ValueError, match=msg):
    jaxmem.transform(jaxmem.nm_prune(2, 4), {"dense": {"kernel": jnp.ones((10, 3))}})


def test_prune_then_quantize_runs_in_a_model():
  model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 16)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  tx = jaxmem.chain(jaxmem.magnitude_prune(0.5), jaxmem.quantize_int8())
  q = jaxmem.transform(tx, params)
  assert isinstance(q["layers_0"]["kernel"], jaxmem.QArray)
  assert float(jnp.mean(q["layers_0"]["kernel"].qvalue == 0)) >= 0.5
  pruned = jaxmem.transform(jaxmem.magnitude_prune(0.5), params)
  want = model.apply({"params": pruned}, x)
  got = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))(q, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)
  # Prune, quantize, then pack sparse: the int8 values and scales are kept as they are.
  packed = jaxmem.transform(jaxmem.chain(tx, jaxmem.sparsify()), params)
  s = packed["layers_0"]["kernel"]
  assert isinstance(s, jaxmem.SparseArray) and s.bits == 8
  np.testing.assert_array_equal(np.asarray(s.materialize()),
                                np.asarray(q["layers_0"]["kernel"].materialize()))
  # (The QArray path rescales after the matmul; the sparse one before: float rounding differs.)
  np.testing.assert_allclose(
      np.asarray(jaxmem.apply(model, {"params": packed}, x)),
      np.asarray(jaxmem.apply(model, {"params": q}, x)), rtol=1e-5, atol=1e-6,
  )


def test_prune_then_sparsify_int8():
  params = _params(3)
  tx = jaxmem.chain(jaxmem.magnitude_prune(0.75), jaxmem.sparsify(bits=8))
  out = jaxmem.transform(tx, params)
  s = out["a"]["kernel"]
  assert isinstance(s, jaxmem.SparseArray) and s.nnz == 12 and s.values.dtype == jnp.int8
  assert jaxmem.sparsity.tree_sparsity(out) == 0.75
  assert isinstance(out["a"]["bias"], jax.Array)


def test_pruning_a_quantized_leaf_says_which_order_works():
  params = _params()
  tx = jaxmem.chain(jaxmem.quantize_int8(), jaxmem.magnitude_prune(0.5))
  with pytest.raises(ValueError, match=r"'a/kernel'.*already a QArray.*Prune first"):
    jaxmem.transform(tx, params)
  with pytest.raises(ValueError, match=r"'a/kernel'.*already a QArray.*Prune first"):
    jaxmem.transform(jaxmem.chain(jaxmem.quantize_int8(), jaxmem.nm_prune(2, 4)), params)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
  with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
    jaxmem.magnitude_prune(sparsity)


@pytest.mark.parametrize("n,m,msg", [(4, 4, "1 <= n < m"), (5, 4, "1 <= n < m"),
                                     (0, 4, "1 <= n < m"), (1, 0, "m=0 < 1")])
def test_bad_nm(n, m, msg):
  with pytest.raises(ValueError, match=msg):
    jaxmem.nm_prune(n, m)


def test_bad_input_names_the_path():
  params = _params()
  with pytest.raises(ValueError, match="'count'"):
    jaxmem.transform(jaxmem.magnitude_prune(0.5, where="count"), params)
  with pytest.raises(ValueError, match="scope"):
    jaxmem.magnitude_prune(0.5, scope="model")
  with pytest.raises(ValueError, match="'a/kernel'.*NaN"):
    bad = {"a": {"kernel": jnp.full((2, 2), jnp.nan)}}
    jaxmem.transform(jaxmem.magnitude_prune(0.5), bad)
  masks = jaxmem.sparsity.magnitude_masks(params, 0.5)
  with pytest.raises(ValueError, match="only in params"):
    jaxmem.sparsity.apply_masks(params, {"a": masks["a"]})
  masks["b"]["kernel"] = jnp.ones((2, 2), bool)
  with pytest.raises(ValueError, match="'b/kernel': mask shape"):
    jaxmem.sparsity.apply_masks(params, masks)


def test_masks_have_params_structure():
  params = _params()
  masks = jaxmem.sparsity.magnitude_masks(params, 0.5)
  assert masks["a"]["bias"] is None and masks["count"] is None
  assert masks["a"]["kernel"].dtype == jnp.bool_ and int(masks["a"]["kernel"].sum()) == 24
  out = jaxmem.sparsity.apply_masks(params, masks)
  np.testing.assert_array_equal(np.asarray(out["a"]["kernel"] != 0),
                                np.asarray(masks["a"]["kernel"]))
