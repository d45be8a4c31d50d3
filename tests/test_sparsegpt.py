"""SparseGPT: the OBS update against closed forms and an explicit-inverse reference, N:M, joint
int4, output error against Wanda and magnitude, the transform through chain + sparsify, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem
from jaxmem._src.pruning import magnitude_mask, nm_mask
from jaxmem._src.qarray import int_values
from jaxmem._src.sparsegpt import keep_ranked, nm_keep, prune_sparsegpt, sparsegpt_kernel
from jaxmem._src.wanda import wanda_mask

_materialize = jax.jit(lambda t: t.materialize())  # QArray: dequantize; one compile per layout


def _problem(n_in, n_out, rows=256, seed=0, outliers=False):
  """Correlated calibration inputs X, a kernel W and H = X^T X."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, n_in)) @ rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
  x += 0.5 * rng.standard_normal((rows, 1))  # a shared component: strongly correlated inputs
  if outliers:  # LLM-like input channels of very different size
    x *= np.exp(rng.standard_normal(n_in))
  w = rng.standard_normal((n_in, n_out))
  return x, w, x.T @ x


def _prune_k(score_col, k):
  """Reference: the k smallest of a column pruned, ties pruning the earlier row."""
  order = sorted(range(len(score_col)), key=lambda i: (score_col[i], i))
  keep = np.ones(len(score_col), bool)
  keep[order[:k]] = False
  return keep


def _reference(w, h, damp, *, sel, sparsity=0.5, n_m=None, bits=None, g=None):
  """Sequential OBS with explicit inverses of the remaining rows' Hessian (no Cholesky, no lazy
  blocks): the mask of rows [r, r + sel) is chosen at row r from the compensated weights, scored
  by w^2 / [inv(H[j:, j:])]_00; with bits, each group's scale is max|kept| / qmax of its
  compensated, pruned rows when the sweep reaches the group."""
  w = np.array(w, np.float64)
  h = np.array(h, np.float64) + damp * np.mean(np.diag(h)) * np.eye(len(h))
  n_in, n_out = w.shape
  keep = np.zeros(w.shape, bool)
  out = np.zeros(w.shape)
  codes = np.zeros(w.shape, np.int64)
  scales = np.zeros((n_in // g if g else 0, n_out))
  qmax = 2 ** (bits - 1) - 1 if bits else None
  rnd = lambda v: int(np.floor(sparsity * v + 0.5))
  for r in range(n_in):
    hinv = np.linalg.inv(h[r:, r:])
    if r % sel == 0:
      e = min(r + sel, n_in)
      d = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(r, e)])
      score = w[r:e] ** 2 / d[:, None]
      for c in range(n_out):
        if n_m is None:
          keep[r:e, c] = _prune_k(score[:, c], rnd(e) - rnd(r))
        else:
          n, m = n_m
          for s0 in range(0, e - r, m):
            keep[r + s0 : r + s0 + m, c] = _prune_k(score[s0 : s0 + m, c], m - n)
    if bits:
      if r % g == 0:
        scales[r // g] = np.abs(w[r : r + g] * keep[r : r + g]).max(0) / qmax
      codes[r] = np.clip(np.round(w[r] / scales[r // g]), -qmax, qmax) * keep[r]
      target = codes[r] * scales[r // g]
    else:
      target = w[r] * keep[r]
    out[r] = target
    w[r:] -= np.outer(hinv[:, 0], (w[r] - target) / hinv[0, 0])  # OBS over rows r, r+1, ...
  return (codes, scales) if bits else out


def test_two_rows_closed_form():
  # H = [[a, b], [b, c]]: removing row 0 moves w0 * H_01 / H_11 onto row 1 (OBS); removing
  # row 1 (visited last) changes nothing. Scores: w0^2 / [H^-1]_00 = w0^2 (ac - b^2) / c for
  # row 0, w1^2 / [inv(H_11)] = w1^2 c for row 1 (the Cholesky diagonal of H^-1).
  a, b, c = 2.0, 1.0, 3.0
  h = np.array([[a, b], [b, c]])
  w = np.array([[0.5, 3.0, 1.0], [2.0, 0.1, 0.9]])
  # scores: col 0: 0.417 vs 12 -> row 0; col 1: 15 vs 0.03 -> row 1; col 2: 1.67 vs 2.43 -> row
  # 0, although |w0| > |w1| (magnitude pruning would drop row 1).
  want = np.array([[0.0, 3.0, 0.0], [2.0 + 0.5 * b / c, 0.0, 0.9 + 1.0 * b / c]])
  got = np.asarray(sparsegpt_kernel(w, h, 0.5, damp=0.0))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.dtype == np.float32


@pytest.mark.parametrize(
    "kw,shape,block,sel",
    [
        (dict(sparsity=0.5), (10, 5), 4, 4),  # ragged last block, lazy updates across blocks
        (dict(sparsity=0.3), (12, 5), 5, 5),  # cumulative rounding of per-block counts
        (dict(n_m=(2, 4)), (12, 5), 8, 4),
        (dict(n_m=(1, 3)), (12, 3), 5, 3),  # block rounded down to a multiple of m
        (dict(sparsity=0.5, bits=4, g=4), (12, 5), 8, 8),
        (dict(sparsity=0.25, bits=3, g=4), (16, 5), 4, 4),
        (dict(n_m=(2, 4), bits=4, g=8), (16, 5), 8, 8),
        (dict(sparsity=0.5, bits=8, g=None), (12, 5), 4, 12),  # per column: mask chosen up front
    ],
)
def test_matches_explicit_inverse_reference(kw, shape, block, sel):
  _, w, h = _problem(shape[0], shape[1], rows=64, seed=shape[0] + block)
  kw = dict(kw)
  bits = kw.pop("bits", None)
  g = kw.pop("g", None)
  args = dict(n_m=kw.get("n_m"), bits=bits, group_size=g, damp=0.01, block_size=block)
  got = sparsegpt_kernel(w, h, kw.get("sparsity", 0.5), **args)
  ref = _reference(w, h, 0.01, sel=sel, bits=bits, g=g or (shape[0] if bits else None), **kw)
  if bits is None:
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    zeros = (np.asarray(got) == 0).sum(0)
    if "sparsity" in kw:
      assert (zeros == int(np.floor(kw["sparsity"] * shape[0] + 0.5))).all()
    return
  codes, scales = ref
  np.testing.assert_array_equal(np.asarray(int_values(got)), codes)
  np.testing.assert_allclose(np.asarray(got.scale), scales.astype(np.float32), rtol=1e-6)


def test_identity_hessian_is_magnitude_pruning_per_column():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((64, 6)).astype(np.float32)
  got = np.asarray(sparsegpt_kernel(w, np.eye(64), 0.5))
  want = w.copy()
  for c in range(6):
    want[np.argsort(np.abs(w[:, c]))[:32], c] = 0.0  # hand-written per-column top-32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  nm = np.asarray(sparsegpt_kernel(w, np.eye(64), n_m=(2, 4)))
  np.testing.assert_allclose(nm, np.asarray(jnp.where(nm_mask(jnp.asarray(w), 2, 4), w, 0)),
                             rtol=1e-6)


def test_numpy_ranking_helpers_match_jaxmem_masks():
  rng = np.random.default_rng(2)
  s = rng.integers(0, 4, size=(16, 5)).astype(np.float32)  # many ties
  nm = jax.jit(lambda a: nm_mask(a, 2, 4))(jnp.asarray(s))
  np.testing.assert_array_equal(nm_keep(s, 2, 4), np.asarray(nm))
  for c in range(5):
    np.testing.assert_array_equal(keep_ranked(s, 6)[:, c], _prune_k(s[:, c], 6))
  # Per column, keep_ranked is magnitude_mask of that column.
  mag = jax.jit(lambda a: magnitude_mask(a, 6 / 16))(jnp.asarray(s[:, 0]))
  np.testing.assert_array_equal(keep_ranked(s[:, :1], 6)[:, 0], np.asarray(mag))


@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (3, 8)])
def test_nm_pattern_holds(n_m):
  _, w, h = _problem(64, 24, seed=3)
  n, m = n_m
  ws = np.asarray(sparsegpt_kernel(w, h, n_m=n_m))
  nz = (ws.reshape(64 // m, m, 24) != 0).sum(1)
  assert (nz == n).all()
  q = sparsegpt_kernel(w, h, n_m=n_m, bits=4, group_size=16)
  assert ((np.asarray(int_values(q)).reshape(64 // m, m, 24) != 0).sum(1) <= n).all()


def test_output_error_sparsegpt_below_wanda_below_magnitude():
  x, w, h = _problem(128, 64, rows=1024, seed=4, outliers=True)
  err = lambda ws: float(np.sum((x @ (w - np.asarray(ws, np.float64))) ** 2))
  norms = jnp.asarray(np.sqrt((x**2).sum(0)), jnp.float32)
  wj = jnp.asarray(w, jnp.float32)
  # Arrays are jit arguments, not constants (XLA would constant-fold the sorts, slowly).
  wanda = jax.jit(lambda n_m, w, a: jnp.where(wanda_mask(w, a, 0.5, n_m=n_m), w, 0),
                  static_argnums=0)
  e_sgpt, e_wanda = err(sparsegpt_kernel(w, h, 0.5)), err(wanda(None, wj, norms))
  e_mag = err(jax.jit(lambda w: jnp.where(magnitude_mask(w, 0.5), w, 0))(wj))
  assert e_sgpt < 0.8 * e_wanda and e_wanda < 0.8 * e_mag, (e_sgpt, e_wanda, e_mag)
  assert err(sparsegpt_kernel(w, h, n_m=(2, 4))) < err(wanda((2, 4), wj, norms))
  # Joint sparsify + int4 beats SparseGPT followed by round-to-nearest int4 of its result.
  q = sparsegpt_kernel(w, h, 0.5, bits=4, group_size=32)
  rtn = jax.jit(lambda k: jaxmem.ops.quantize(k, 4, channel_axes=(1,), group_size=32))(
      sparsegpt_kernel(w, h, 0.5))
  assert err(_materialize(q)) < err(_materialize(rtn))


def test_joint_quantization_layout_is_quantize_weights():
  _, w, h = _problem(32, 6, seed=5)
  for bits, g in ((4, 8), (4, None), (8, 16), (2, 32)):
    q = sparsegpt_kernel(w, h, 0.5, bits=bits, group_size=g)
    tx = jaxmem.quantize_weights(bits, group_size=g)
    rtn = jax.eval_shape(lambda k, tx=tx: jaxmem.transform(tx, {"kernel": k}),
                         jax.ShapeDtypeStruct(w.shape, jnp.float32))["kernel"]
    assert isinstance(q, jaxmem.QArray)
    assert jax.tree.structure(q) == jax.tree.structure(rtn)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(rtn)):
      assert (a.shape, a.dtype) == (b.shape, b.dtype)
    iv = np.asarray(int_values(q))
    assert ((iv == 0).sum(0) >= 16).all()  # pruned entries are integer 0
    assert np.abs(iv).max() <= 2 ** (bits - 1) - 1


def _two_layer_problem():
  """Params of two Dense layers (16 -> 32 -> 8) and the Hessians of their inputs."""
  rng = np.random.default_rng(6)
  x = rng.standard_normal((128, 16)) @ rng.standard_normal((16, 16))
  params = {
      "layers_0": {"kernel": rng.standard_normal((16, 32)), "bias": rng.standard_normal(32)},
      "layers_2": {"kernel": rng.standard_normal((32, 8)), "bias": np.zeros(8)},
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x1 = np.maximum(x @ np.asarray(params["layers_0"]["kernel"]), 0)
  return params, {"layers_0/kernel": x.T @ x, "layers_2/kernel": x1.T @ x1}



def test_transform_chain_and_sparsify():
  params, hess = _two_layer_problem()
  pruned = jaxmem.transform(prune_sparsegpt(hess, 0.5), params)
  for k in ("layers_0", "layers_2"):
    want = sparsegpt_kernel(params[k]["kernel"], hess[f"{k}/kernel"], 0.5, path=f"{k}/kernel")
    np.testing.assert_array_equal(np.asarray(pruned[k]["kernel"]), np.asarray(want))
    assert pruned[k]["bias"] is params[k]["bias"]
  packed = jaxmem.transform(jaxmem.chain(prune_sparsegpt(hess, 0.5), jaxmem.sparsify()), params)
  for k in ("layers_0", "layers_2"):
    s = packed[k]["kernel"]
    assert isinstance(s, jaxmem.SparseArray) and s.density == 0.5
    np.testing.assert_array_equal(np.asarray(_materialize(s)), np.asarray(pruned[k]["kernel"]))
  # Joint int4 g8 + 2:4, packed: materialize is the QArray's dequantize exactly.
  tx = prune_sparsegpt(hess, n_m=(2, 4), bits=4, group_size=8)
  qs = jaxmem.transform(tx, params)
  sq = jaxmem.transform(jaxmem.chain(tx, jaxmem.sparsify()), params)
  for k in ("layers_0", "layers_2"):
    q, s = qs[k]["kernel"], sq[k]["kernel"]
    assert isinstance(q, jaxmem.QArray) and q.group_size == 8
    assert isinstance(s, jaxmem.SparseArray) and s.bits == 4 and s.packed and s.density <= 0.5
    np.testing.assert_array_equal(np.asarray(_materialize(s)),
                                  np.asarray(_materialize(q)))


def test_kernels_without_hessian_untouched_and_stacked_kernels():
  rng = np.random.default_rng(7)
  xs = rng.standard_normal((2, 64, 16))
  stacked_h = np.einsum("lri,lrj->lij", xs, xs)
  params = {
      "layers": {"kernel": jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)},
  }
  for kw in (dict(), dict(n_m=(2, 4), bits=4, group_size=8)):
    out = jaxmem.transform(prune_sparsegpt({"layers/kernel": stacked_h}, 0.5, **kw), params)
    assert out["head"]["kernel"] is params["head"]["kernel"]
    got = out["layers"]["kernel"]
    for i in range(2):
      want = sparsegpt_kernel(params["layers"]["kernel"][i], stacked_h[i], 0.5, **kw)
      if kw.get("bits"):
        np.testing.assert_array_equal(np.asarray(_materialize(got[i])),
                                      np.asarray(_materialize(want)))
      else:
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))
    if kw.get("bits"):  # the layout of quantize_weights(stack_axes=1)
      tx = jaxmem.quantize_weights(4, "layers/kernel", group_size=8, stack_axes=1)
      rtn = jax.eval_shape(lambda p, tx=tx: jaxmem.transform(tx, p), params)["layers"]["kernel"]
      assert jax.tree.structure(got) == jax.tree.structure(rtn)
      shapes = lambda t: [(a.shape, a.dtype) for a in jax.tree.leaves(t)]
      assert shapes(got) == shapes(rtn)
      s = jaxmem.transform(jaxmem.sparsify(where="layers/kernel"), out)["layers"]["kernel"]
      np.testing.assert_array_equal(np.asarray(_materialize(s)), np.asarray(_materialize(got)))


def test_bad_inputs_name_the_path():
  _, w, h = _problem(8, 4, rows=32, seed=8)
  for s in (1.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match=r"sparsity=.*outside \[0, 1\)"):
      sparsegpt_kernel(w, h, s)
  with pytest.raises(ValueError, match=r"n=2, m=2"):
    sparsegpt_kernel(w, h, n_m=(2, 2))
  with pytest.raises(ValueError, match=r"n=0, m=4"):
    prune_sparsegpt({}, n_m=(0, 4))
  with pytest.raises(TypeError, match=r"n_m must be None or a pair"):
    sparsegpt_kernel(w, h, n_m="2:4")
  with pytest.raises(ValueError, match=r"^sparsegpt 'blk/kernel': 8 input rows are not divisible "
                     r"by m=3"):
    sparsegpt_kernel(w, h, n_m=(1, 3), path="blk/kernel")
  with pytest.raises(ValueError, match=r"^sparsegpt 'blk/kernel': Hessian shape \(4, 4\)"):
    sparsegpt_kernel(w, h[:4, :4], path="blk/kernel")
  with pytest.raises(ValueError, match=r"group_size=4 without bits"):
    sparsegpt_kernel(w, h, group_size=4)
  with pytest.raises(ValueError, match=r"group_size=2 is not a multiple of m=4"):
    sparsegpt_kernel(w, h, n_m=(2, 4), bits=4, group_size=2)
  with pytest.raises(ValueError, match=r"damp=-1"):
    prune_sparsegpt({}, damp=-1.0)
  with pytest.raises(ValueError, match=r"bits=1"):
    prune_sparsegpt({}, bits=1)
  with pytest.raises(TypeError, match=r"hessians must be a mapping"):
    prune_sparsegpt([h])
  bad_w = w.copy()
  bad_w[1, 2] = np.nan
  bad_h = h.copy()
  bad_h[0, 0] = np.inf
  params = {"blk": {"kernel": jnp.asarray(w, jnp.float32)}}
  with pytest.raises(ValueError, match=r"^sparsegpt 'blk/kernel': the kernel holds NaN or Inf"):
    jaxmem.transform(prune_sparsegpt({"blk/kernel": h}), {"blk": {"kernel": jnp.asarray(bad_w)}})
  with pytest.raises(ValueError, match=r"^sparsegpt 'blk/kernel': its Hessian \(X\^T X\) holds"):
    jaxmem.transform(prune_sparsegpt({"blk/kernel": bad_h}), params)
  with pytest.raises(ValueError, match=r"^prune_sparsegpt 'blk/kernel': its Hessian of shape "
                     r"\(2, 8, 8\) does not match the kernel of shape \(8, 4\)"):
    jaxmem.transform(prune_sparsegpt({"blk/kernel": np.stack([h, h])}), params)
  with pytest.raises(ValueError, match=r"statistics given for \['nope/kernel'\]"):
    jaxmem.transform(prune_sparsegpt({"nope/kernel": h}), params)
  with pytest.raises(ValueError, match=r"'blk/kernel': runs on concrete params, outside jax.jit"):
    jax.jit(lambda p: jaxmem.transform(prune_sparsegpt({"blk/kernel": h}), p))(params)
  q = jaxmem.transform(jaxmem.quantize_int8(), params)
  with pytest.raises(ValueError, match=r"^prune_sparsegpt 'blk/kernel': the leaf is already a "
                     r"QArray"):
    jaxmem.transform(prune_sparsegpt({"blk/kernel": h}), q)
