"""Wanda: the mask against hand-written per-column top-k and N:M, jit, stacked kernels, the
transform through chain + sparsify (and under jit), errors naming the path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem
from jaxmem._src.wanda import prune_wanda, wanda_mask

_mask = jax.jit(wanda_mask, static_argnames=("sparsity", "n_m"))
_materialize = jax.jit(lambda t: t.materialize())


def _ref_mask(w, a, sparsity=None, n_m=None):
  """Per output column: rank inputs by |w| * a (ties: the earlier input is pruned first)."""
  n_in, n_out = w.shape
  keep = np.ones(w.shape, bool)
  for c in range(n_out):
    score = [abs(float(w[i, c])) * float(a[i]) for i in range(n_in)]
    if n_m is None:
      k = int(np.floor(sparsity * n_in + 0.5))
      for i in sorted(range(n_in), key=lambda i: (score[i], i))[:k]:
        keep[i, c] = False
    else:
      n, m = n_m
      for g0 in range(0, n_in, m):
        rows = sorted(range(g0, g0 + m), key=lambda i: (score[i], i))
        for i in rows[: m - n]:
          keep[i, c] = False
  return keep


def test_mask_equals_hand_written_top_k():
  w = np.array([[0.5, -2.0, 1.0], [3.0, 0.1, -1.0], [-1.0, 1.0, 2.0], [0.2, 0.3, -0.5],
                [1.5, -0.7, 0.0], [-0.4, 2.5, 1.0]], np.float32)
  a = np.array([4.0, 0.1, 1.0, 10.0, 1.0, 0.5], np.float32)
  # Column 0 by hand: scores 2.0, 0.3, 1.0, 2.0, 1.5, 0.2 -> keep rows 0, 3, 4 (half of 6).
  got = np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray(a), 0.5))
  np.testing.assert_array_equal(got[:, 0], [True, False, False, True, True, False])
  np.testing.assert_array_equal(got, _ref_mask(w, a, 0.5))
  for s in (0.0, 0.2, 0.75):
    np.testing.assert_array_equal(np.asarray(_mask(jnp.asarray(w), jnp.asarray(a), s)),
                                  _ref_mask(w, a, s))
  # Ties (column 2 has |w| * a = 1.0 three times): the earlier input goes first.
  np.testing.assert_array_equal(got[:, 2], _ref_mask(w, a, 0.5)[:, 2])


def test_random_cases_and_nm():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((16, 7)).astype(np.float32)
  a = np.exp(rng.standard_normal(16)).astype(np.float32)
  wj, aj = jnp.asarray(w), jnp.asarray(a)
  np.testing.assert_array_equal(np.asarray(_mask(wj, aj, 0.6)), _ref_mask(w, a, 0.6))
  for n_m in ((2, 4), (1, 8)):
    got = np.asarray(_mask(wj, aj, n_m=n_m))
    np.testing.assert_array_equal(got, _ref_mask(w, a, n_m=n_m))
    assert (got.reshape(16 // n_m[1], n_m[1], 7).sum(1) == n_m[0]).all()
  # Equal norms: magnitude pruning per column.
  ones = np.ones(16, np.float32)
  np.testing.assert_array_equal(
      np.asarray(_mask(wj, jnp.asarray(ones), 0.5)), _ref_mask(np.abs(w), ones, 0.5))


def test_stacked_kernel_is_per_layer():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((3, 8, 5)).astype(np.float32)
  a = np.abs(rng.standard_normal((3, 8))).astype(np.float32)
  got = np.asarray(_mask(jnp.asarray(w), jnp.asarray(a), 0.5))
  for i in range(3):
    np.testing.assert_array_equal(got[i], _ref_mask(w[i], a[i], 0.5))


def test_transform_chain_sparsify_and_jit():
  rng = np.random.default_rng(2)
  params = {
      "blk": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
              "bias": jnp.ones(8)},
      "layers": {"kernel": jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)},
  }
  norms = {"blk/kernel": np.exp(rng.standard_normal(16)).astype(np.float32),
           "layers/kernel": np.exp(rng.standard_normal((2, 16))).astype(np.float32)}
  tx = prune_wanda(norms, 0.5)
  out = jax.jit(lambda p: jaxmem.transform(tx, p))(params)
  want = np.where(_ref_mask(np.asarray(params["blk"]["kernel"]), norms["blk/kernel"], 0.5),
                  params["blk"]["kernel"], 0)
  np.testing.assert_array_equal(np.asarray(out["blk"]["kernel"]), want)
  for i in range(2):
    keep = _ref_mask(np.asarray(params["layers"]["kernel"][i]), norms["layers/kernel"][i], 0.5)
    np.testing.assert_array_equal(np.asarray(out["layers"]["kernel"][i]),
                                  np.where(keep, params["layers"]["kernel"][i], 0))
  assert out["head"]["kernel"] is not None
  np.testing.assert_array_equal(np.asarray(out["head"]["kernel"]), params["head"]["kernel"])
  eager = jaxmem.transform(jaxmem.chain(tx, jaxmem.quantize_int8(where="blk/kernel"),
                                        jaxmem.sparsify(where="(blk|layers)/kernel")), params)
  assert eager["head"]["kernel"] is params["head"]["kernel"]
  s = eager["layers"]["kernel"]
  assert isinstance(s, jaxmem.SparseArray) and s.density == 0.5
  np.testing.assert_array_equal(np.asarray(_materialize(s)), np.asarray(out["layers"]["kernel"]))
  sq = eager["blk"]["kernel"]
  assert isinstance(sq, jaxmem.SparseArray) and sq.bits == 8 and sq.density <= 0.5
  q = jaxmem.transform(jaxmem.quantize_int8(), {"kernel": out["blk"]["kernel"]})["kernel"]
  np.testing.assert_array_equal(np.asarray(_materialize(sq)), np.asarray(_materialize(q)))
  # N:M through the transform.
  nm = jaxmem.transform(prune_wanda(norms, n_m=(2, 4)), params)["blk"]["kernel"]
  keep = _ref_mask(np.asarray(params["blk"]["kernel"]), norms["blk/kernel"], n_m=(2, 4))
  np.testing.assert_array_equal(np.asarray(nm), np.where(keep, params["blk"]["kernel"], 0))


def test_bad_inputs_name_the_path():
  w = jnp.ones((8, 4))
  a = jnp.ones(8)
  for s in (1.0, -0.5, float("nan")):
    with pytest.raises(ValueError, match=r"sparsity=.*outside \[0, 1\)"):
      wanda_mask(w, a, s)
    with pytest.raises(ValueError, match=r"sparsity=.*outside \[0, 1\)"):
      prune_wanda({}, s)
  with pytest.raises(ValueError, match=r"n=4, m=4"):
    wanda_mask(w, a, n_m=(4, 4))
  with pytest.raises(TypeError, match=r"n_m must be None or a pair"):
    prune_wanda({}, n_m=(1, 2, 4))
  with pytest.raises(ValueError, match=r"^wanda 'blk/kernel': 8 inputs are not divisible by m=3"):
    wanda_mask(w, a, n_m=(1, 3), path="blk/kernel")
  with pytest.raises(ValueError, match=r"^wanda 'blk/kernel': act_norm of shape \(4,\)"):
    wanda_mask(w, jnp.ones(4), path="blk/kernel")
  with pytest.raises(ValueError, match=r"^wanda 'kernel': the kernel holds NaN"):
    wanda_mask(w.at[0, 0].set(jnp.nan), a)
  params = {"blk": {"kernel": w}}
  with pytest.raises(ValueError, match=r"^prune_wanda 'blk/kernel': its act_norm of shape \(4,\) "
                     r"does not match the kernel of shape \(8, 4\); expected \(8,\)"):
    jaxmem.transform(prune_wanda({"blk/kernel": np.ones(4)}), params)
  with pytest.raises(ValueError, match=r"^prune_wanda 'blk/kernel': its act_norm holds NaN"):
    prune_wanda({"blk/kernel": np.full(8, np.nan)})
  with pytest.raises(ValueError, match=r"^prune_wanda 'blk/kernel': act_norm has negative"):
    jaxmem.transform(prune_wanda({"blk/kernel": -np.ones(8)}), params)
  with pytest.raises(ValueError, match=r"statistics given for \['nope/kernel'\]"):
    jaxmem.transform(prune_wanda({"nope/kernel": np.ones(8)}), params)
  with pytest.raises(TypeError, match=r"act_norms must be a mapping"):
    prune_wanda([np.ones(8)])
  bad = {"blk": {"kernel": w.at[1, 1].set(jnp.inf)}}
  with pytest.raises(ValueError, match=r"^prune_wanda 'blk/kernel': the tensor holds NaN or Inf"):
    jaxmem.transform(prune_wanda({"blk/kernel": np.ones(8)}), bad)
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"prune_wanda 'blk/kernel'.*NaN or Inf"):
    jax.jit(lambda p: jaxmem.transform(prune_wanda({"blk/kernel": np.ones(8)}), p))(bad)
  q = jaxmem.transform(jaxmem.quantize_int8(), params)
  with pytest.raises(ValueError, match=r"^prune_wanda 'blk/kernel': the leaf is already a QArray"):
    jaxmem.transform(prune_wanda({"blk/kernel": np.ones(8)}), q)
