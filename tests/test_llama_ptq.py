"""The SmolLM2 calibrated / data-free / pruning recipes on the tiny Llama: layouts, sparsity
patterns, bytes, and each method's error on its calibration data against its baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_params import random_params

import jaxmem
from jaxmem.models.llama import model as llama
from jaxmem.models.llama import recipes

CFG = llama.LlamaConfig.tiny()  # 2 layers, width 64, FFN 128
NET = llama.Llama(CFG)
KERNELS = recipes.BLOCK_KERNEL_NAMES


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, 3)


@pytest.fixture(scope="module")
def calib():
  return np.random.default_rng(4).integers(0, CFG.vocab_size, (4, 32)).astype(np.int32)


@pytest.fixture(scope="module")
def built(params, calib):
  names = ("int4_g128", "int8_dynamic") + recipes.PTQ_RECIPES
  return {n: recipes.build(n, params, config=CFG, calib_tokens=calib, progress=False).params
          for n in names}


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _dense(x):
  return x.materialize() if isinstance(x, jaxmem.Compressed) else x


_logits = jax.jit(lambda p, t: jaxmem.apply(NET, {"params": p}, t))


def _calib_error(params, built, calib, name):
  """Mean squared logit error against the float model on the calibration tokens."""
  ref = _logits(params, jnp.asarray(calib))
  return float(jnp.mean((_logits(built[name], jnp.asarray(calib)) - ref) ** 2))


def test_quantized_layouts_match_int4_g128(built):
  for name in ("int4_awq_g128", "int4_hqq_g128"):
    for k in KERNELS:
      w, r = (_leaf(built[n], f"layers/{k}/kernel") for n in (name, "int4_g128"))
      assert isinstance(w, jaxmem.QArray) and (w.bits, w.packed) == (4, True), (name, k)
      assert w.scale.shape == r.scale.shape and w.qvalue.shape == r.qvalue.shape, (name, k)
      assert w.symmetric == (name != "int4_hqq_g128"), (name, k)  # HQQ has zero points
    assert isinstance(built[name]["embed"]["embedding"], jaxmem.QArray)
  w = _leaf(built["int8_smoothquant"], "layers/attn/q/kernel")
  assert (w.bits, w.act_bits) == (8, 8)
  assert jaxmem.tree_bytes(built["int4_awq_g128"]) == jaxmem.tree_bytes(built["int4_g128"])


def test_awq_folds_the_scales_into_the_producers(params, built):
  """AWQ divides the norm scales (and up's columns) by its scales: they differ from fp32."""
  for name in ("int4_awq_g128", "int8_smoothquant"):
    for norm in ("attn_norm", "mlp_norm"):
      got = np.asarray(built[name]["layers"][norm]["scale"])
      assert got.shape == params["layers"][norm]["scale"].shape
      assert not np.allclose(got, params["layers"][norm]["scale"]), (name, norm)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("name, pattern", [
    ("magnitude_50", "unstructured"), ("wanda_50", "per_output"),
    ("sparsegpt_50", "per_output"), ("sparsegpt_2_4", "2:4"),
    ("sparsegpt_50+int4_g128", "per_output"),
])
def test_sparse_recipes_prune_half_of_every_layer(params, built, name, pattern):
  for k in KERNELS:
    s = _leaf(built[name], f"layers/{k}/kernel")
    assert isinstance(s, jaxmem.SparseArray), (name, k)
    w = np.asarray(s.materialize())
    dense = np.asarray(_leaf(params, f"layers/{k}/kernel"))
    assert w.shape == dense.shape
    zero = w == 0
    quantized = name.endswith("int4_g128")  # some kept weights also round to 0
    for i in range(CFG.n_layers):
      frac = zero[i].mean()
      assert (0.5 <= frac < 0.56) if quantized else abs(frac - 0.5) < 0.01, (name, k, i, frac)
      if pattern == "per_output":  # every output column loses half of its inputs
        per_col = zero[i].sum(0)
        assert (per_col >= dense.shape[1] // 2).all() if quantized else (
            per_col == dense.shape[1] // 2).all(), (name, k, i)
      if pattern == "2:4":
        groups = zero[i].reshape(dense.shape[1] // 4, 4, -1).sum(1)
        np.testing.assert_array_equal(groups, 2)
    if name in ("magnitude_50", "wanda_50"):  # kept weights are the float ones
      np.testing.assert_array_equal(w[~zero], dense[~zero])
  assert isinstance(built[name]["embed"]["embedding"], jaxmem.QArray) == name.endswith("int4_g128")


def test_sparse_bytes_count_the_packed_storage(params, built):
  b = {n: jaxmem.tree_bytes(p) for n, p in built.items()}
  fp32 = jaxmem.tree_bytes(params)
  assert b["sparsegpt_50"] == b["wanda_50"] == b["magnitude_50"] < fp32
  assert b["sparsegpt_50+int4_g128"] < b["int4_g128"]


def test_calibrated_methods_beat_their_baselines_on_calibration_data(params, built, calib):
  err = {n: _calib_error(params, built, calib, n) for n in built}
  assert err["int4_awq_g128"] < err["int4_g128"], err
  assert err["int8_smoothquant"] < 2 * err["int8_dynamic"], err  # random weights: no outliers
  assert err["sparsegpt_50"] < err["magnitude_50"], err
  assert err["wanda_50"] < err["magnitude_50"] * 1.5, err
  for name in built:
    assert np.isfinite(err[name]), name


def test_every_ptq_recipe_generates(built):
  prompt = jnp.asarray([[5, 17, 3, 88]], jnp.int32)
  for name in ("int4_hqq_g128", "sparsegpt_50+int4_g128"):
    out = llama.generate(NET, {"params": built[name]}, prompt, 2)
    assert out.shape == (1, 2), name
