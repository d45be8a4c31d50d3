"""The Llama model of the zoo: RoPE and GQA against numpy references, the KV cache (float
and int8) against the full forward pass, compressed params inside the scan, generation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_params import random_params

import jaxmem
from jaxmem.models.llama import model as llama

CFG = llama.LlamaConfig.tiny()  # 2 layers, width 64, 4 query / 2 KV heads of 16, vocab 97
NET = llama.Llama(CFG)
B, T = 2, 8
STACK = {r"layers/.*": 1}


def _random_params(seed=0):
  return random_params(CFG, seed)


@pytest.fixture(scope="module")
def params():
  return _random_params()


RECIPES = {"int8": jaxmem.quantize_int8(stack_axes=STACK),
           "int4_g32": jaxmem.quantize_int4(group_size=32, stack_axes=STACK)}


@pytest.fixture(scope="module")
def quantized(params):
  """``{recipe: compressed params}``, quantized under jit once per module (eager: seconds)."""
  return {name: jax.jit(lambda p, tx=tx: jaxmem.transform(tx, p))(params)
          for name, tx in RECIPES.items()}


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


PROMPT = jnp.asarray([[5, 17, 3], [60, 2, 96]], jnp.int32)
_forward = jax.jit(lambda v, t: jaxmem.apply(NET, v, t))


def test_params_tree_is_the_documented_layout(params):
  L, D, F, hd = CFG.n_layers, CFG.dim, CFG.ffn_dim, CFG.head_dim
  q, kv = CFG.n_heads * hd, CFG.n_kv_heads * hd
  want = {
      "embed": {"embedding": (CFG.vocab_size, D)},
      "layers": {
          "attn_norm": {"scale": (L, D)},
          "attn": {"q": {"kernel": (L, D, q)}, "k": {"kernel": (L, D, kv)},
                   "v": {"kernel": (L, D, kv)}, "o": {"kernel": (L, q, D)}},
          "mlp_norm": {"scale": (L, D)},
          "mlp": {"gate": {"kernel": (L, D, F)}, "up": {"kernel": (L, D, F)},
                  "down": {"kernel": (L, F, D)}},
      },
      "final_norm": {"scale": (D,)},
  }
  assert jax.tree.map(lambda x: tuple(x.shape), params) == want
  smol = llama.LlamaConfig.smollm2_135m()
  shapes = llama.param_shapes(smol)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == 134_515_008  # SmolLM2-135M's parameter count (tied head)


def _rope_reference(x, positions, theta):
  """Each pair (x_i, x_{i+hd/2}) as a complex number, turned by position * theta^(-2i/hd)."""
  hd = x.shape[-1]
  half = hd // 2
  freq = theta ** (-2.0 * np.arange(half) / hd)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[None, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_a_handwritten_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
  positions = np.array([0, 1, 7, 100, 4095])
  cos, sin = llama.rope_tables(jnp.asarray(positions), 16, 10000.0)
  got = llama.apply_rope(jnp.asarray(x), cos, sin)
  ref = _rope_reference(x, positions, 10000.0)
  np.testing.assert_allclose(got[:, :4], ref[:, :4], rtol=1e-5, atol=1e-5)
  # At position 4095 a float32 angle is only good to ~2.5e-4 (its ulp), as in any fp32 RoPE.
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
  # Rotations keep norms, and position 0 is the identity.
  np.testing.assert_allclose(got[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_gqa_attention_matches_a_numpy_reference():
  """One layer: each group of Hq/Hkv query heads shares a KV head (np.repeat of K and V)."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(B, T, CFG.dim)).astype(np.float32)
  hq, hkv, hd, d = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.dim
  shapes = {"q": (d, hq * hd), "k": (d, hkv * hd), "v": (d, hkv * hd), "o": (hq * hd, d)}
  w = {k: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32) for k, s in shapes.items()}
  cos, sin = llama.rope_tables(jnp.arange(T), hd, CFG.rope_theta)
  mask = jnp.tril(jnp.ones((T, T), bool))
  p = {k: {"kernel": jnp.asarray(v)} for k, v in w.items()}
  got, _ = jax.jit(llama.LlamaAttention(CFG).apply)({"params": p}, x, cos, sin, mask)

  q = (x @ w["q"]).reshape(B, T, hq, hd)
  k = (x @ w["k"]).reshape(B, T, hkv, hd)
  v = (x @ w["v"]).reshape(B, T, hkv, hd)
  q = _rope_reference(q, np.arange(T), CFG.rope_theta)
  k = _rope_reference(k, np.arange(T), CFG.rope_theta)
  k, v = np.repeat(k, hq // hkv, axis=2), np.repeat(v, hq // hkv, axis=2)  # [B, T, Hq, hd]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
  s = np.where(np.tril(np.ones((T, T), bool))[None, None], s, -np.inf)
  prob = np.exp(s - s.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  ref = np.einsum("bhqk,bkhd->bqhd", prob, v).reshape(B, T, hq * hd) @ w["o"]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def _decode_all(variables, tokens, prompt_len, cache):
  """Prefill ``prompt_len`` tokens, then feed the rest one by one: logits [B, T, V]."""
  logits, cache = llama.prefill(NET, variables, tokens[:, :prompt_len], cache)
  out = [logits]
  for i in range(prompt_len, tokens.shape[1]):
    step, cache = llama.decode_step(NET, variables, tokens[:, i], cache)
    out.append(step[:, None])
  return jnp.concatenate(out, axis=1), cache


def test_cache_decode_equals_the_full_forward_pass(params, tokens):
  variables = {"params": params}
  full = _forward(variables, tokens)
  assert full.shape == (B, T, CFG.vocab_size) and full.dtype == jnp.float32
  cache = llama.init_cache(CFG, B, T + 2)  # spare, unwritten slots must be masked
  got, cache = _decode_all(variables, tokens, 3, cache)
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
  assert int(cache.length) == T
  # The cache holds RoPE'd keys at slots [0, T) and nothing after.
  assert not np.asarray(cache.k[:, :, T:]).any() and np.asarray(cache.k[:, :, :T]).any()


def test_int8_kv_cache_is_close_to_float_and_quarter_size(params, tokens):
  variables = {"params": params}
  ref, fcache = _decode_all(variables, tokens, 3, llama.init_cache(CFG, B, T + 2))
  got, cache = _decode_all(variables, tokens, 3, llama.init_cache(CFG, B, T + 2, kv_bits=8))
  assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == (CFG.n_layers, B, T + 2, 2, 1)
  # Per-token absmax int8 keys/values: relative error of the logits ~1% (0.8% here).
  rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  assert rel < 2e-2, rel
  assert np.mean(np.argmax(got, -1) == np.argmax(ref, -1)) >= 0.9
  # Layer 0's keys (same inputs in both caches) dequantize within half a step of the floats.
  k8, scale = np.asarray(cache.k[0], np.float32), np.asarray(cache.k_scale[0])
  err = np.abs(k8 * scale - np.asarray(fcache.k[0]))
  assert (err <= scale / 2 + 1e-6).all() and not k8[:, T:].any()
  # Bytes at SmolLM2's head_dim 64: (64 int8 + one f32 scale) / (64 f32) = 68/256.
  smol = llama.LlamaConfig.smollm2_135m()
  f32 = jaxmem.tree_bytes(llama.init_cache(smol, 1, 16))
  i8 = jaxmem.tree_bytes(llama.init_cache(smol, 1, 16, kv_bits=8))
  assert abs(i8 / f32 - 68 / 256) < 1e-4, i8 / f32


@pytest.mark.parametrize("recipe", ["int8", "int4_g32"])
def test_compressed_params_in_the_scan_match_dequantized_float(quantized, tokens, recipe):
  q = quantized[recipe]
  assert isinstance(q["layers"]["mlp"]["gate"]["kernel"], jaxmem.QArray)
  assert isinstance(q["embed"]["embedding"], jaxmem.QArray)
  deq = jax.jit(lambda q: jaxmem.transform(jaxmem.dequantize_params(), q))(q)
  compiled = _forward.lower({"params": q}, tokens).compile()
  got = compiled({"params": q}, tokens)
  ref = _forward({"params": deq}, tokens)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # The loop reads integer weights: no dense float copy of a stacked kernel anywhere.
  hlo = compiled.as_text()
  assert f"f32[{CFG.n_layers},{CFG.dim},{CFG.ffn_dim}]" not in hlo
  assert re.search(r"(s8|u8)\[", hlo)


@pytest.mark.parametrize("recipe", ["float", "int4_kv8"])
def test_generate_greedy_is_deterministic_and_matches_stepwise_argmax(params, quantized, recipe):
  prompt = PROMPT
  kv_bits, p = None, params
  if recipe == "int4_kv8":  # any weight recipe composes with the int8 KV cache
    kv_bits, p = 8, quantized["int4_g32"]
  # Shapes as in the cache tests (batch 2, 3-token prefill, 10 slots): compiled once.
  variables, n, max_len = {"params": p}, 5, T + 2
  gen = lambda: llama.generate(NET, variables, prompt, n, kv_bits=kv_bits, max_len=max_len)
  out = gen()
  assert out.shape == (2, n) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, gen())
  # Reference: the prompt too goes in token by token (decode_step only: one compilation).
  cache = llama.init_cache(CFG, 2, max_len, kv_bits=kv_bits)
  for i in range(prompt.shape[1]):
    logits, cache = llama.decode_step(NET, variables, prompt[:, i], cache)
  token, want = jnp.argmax(logits, -1), []
  for _ in range(n):
    want.append(token)
    logits, cache = llama.decode_step(NET, variables, token, cache)
    token = jnp.argmax(logits, -1)
  np.testing.assert_array_equal(out, np.stack(want, 1))
  if recipe == "float":  # greedy tokens also continue the full forward pass's argmax
    seq = jnp.concatenate([prompt, out], 1)
    full = _forward(variables, seq)
    np.testing.assert_array_equal(out, np.argmax(full[:, prompt.shape[1] - 1:-1], -1))


def test_sampling_depends_on_the_key_only(params):
  variables = {"params": params}
  # The greedy test's shapes: greedy and sampling share one compilation.
  draw = lambda seed, t=1.0: llama.generate(NET, variables, PROMPT, 5, temperature=t,
                                            rng=jax.random.key(seed), max_len=T + 2)
  a, b, c = draw(0), draw(0), draw(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, draw(0, 0.0))  # temperature 0: argmax, the key is unused
  np.testing.assert_array_equal(draw(0, 0.0), draw(1, 0.0))
  assert ((np.asarray(a) >= 0) & (np.asarray(a) < CFG.vocab_size)).all()
  with pytest.raises(ValueError, match="needs rng"):
    llama.generate(NET, variables, PROMPT, 2, temperature=0.5)


def test_tokens_that_do_not_fit_raise_naming_both_numbers(params, tokens):
  variables = {"params": params}
  cache = llama.init_cache(CFG, B, T + 2)
  long = jnp.concatenate([tokens, tokens], axis=1)
  with pytest.raises(ValueError, match=r"16 new tokens .*max_len=10"):  # static, from shapes
    NET.apply(variables, long, cache=cache)
  _, filled = llama.prefill(NET, variables, tokens[:, :3], cache)
  with pytest.raises(ValueError, match=r"8 new tokens at cache length 3 need 11 .*max_len=10"):
    llama.prefill(NET, variables, tokens, filled)  # concrete length: at once
  # Traced length (under jit): the model stages a host check that raises when it runs.
  jaxpr = str(jax.make_jaxpr(lambda c: NET.apply(variables, tokens, cache=c))(filled))
  assert jaxpr.count("debug_callback[") == 1
  assert "debug_callback[" not in str(jax.make_jaxpr(
      lambda c: NET.apply(variables, tokens, cache=c, check_length=False))(filled))
  with pytest.raises(Exception, match=r"at cache length 3 need 11 slots.*max_len=10") as e:
    jax.block_until_ready(jax.jit(lambda c: llama.check_fits(c, T) and c.length)(filled))
  assert isinstance(e.value, (ValueError, jax.errors.JaxRuntimeError))
  with pytest.raises(ValueError, match=r"max_len >= 7 .* got max_len=6"):
    llama.generate(NET, variables, tokens[:, :3], 5, max_len=6)
  with pytest.raises(ValueError, match="max_seq_len=64"):
    llama.init_cache(CFG, 1, 65)
  with pytest.raises(ValueError, match="kv_bits"):
    llama.init_cache(CFG, 1, 8, kv_bits=4)
  with pytest.raises(ValueError, match="need .*init_cache"):
    NET.apply(variables, tokens[:1, :2], cache=cache)  # batch 1 against a batch-2 cache
