"""The Llama evaluation on the tiny config: perplexity and KL against numpy references,
top-1 agreement, KV and compiled bytes, the throughput harness and the main job end to end
(an injected tiny model and recipe builder)."""

import contextlib
import io
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from llama_params import random_params

import jaxmem
from jaxmem.models.llama import evaluate as ev
from jaxmem.models.llama import model as llama

CFG = llama.LlamaConfig.tiny()  # 2 layers, width 64, 4/2 heads of 16, vocab 97, 64 tokens
NET = llama.Llama(CFG)
STACK = {r"layers/.*": 1}
N, T = 3, 16  # windows


def _random_params(seed=0):
  return random_params(CFG, seed)


@pytest.fixture(scope="module")
def params():
  return _random_params()


@pytest.fixture(scope="module")
def int8(params):
  tx = jaxmem.quantize_int8(stack_axes=STACK)
  return jax.jit(lambda p: jaxmem.transform(tx, p))(params)


@pytest.fixture(scope="module")
def int4(params):
  tx = jaxmem.quantize_int4(group_size=32, stack_axes=STACK)
  return jax.jit(lambda p: jaxmem.transform(tx, p))(params)


@pytest.fixture(scope="module")
def wins():
  return np.random.default_rng(1).integers(0, CFG.vocab_size, (N, T)).astype(np.int32)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


_forward = jax.jit(lambda p, t: jaxmem.apply(NET, {"params": p}, t))


def _logits(params, wins):
  return np.asarray(_forward(params, wins))


def test_perplexity_matches_a_numpy_nll(params, wins):
  logp = _np_log_softmax(_logits(params, wins))[:, :-1]  # predicts positions 1..T-1
  want = -sum(logp[w, t, wins[w, t + 1]] for w in range(N) for t in range(T - 1))
  ppl, nll, count = ev.perplexity(NET, params, wins, batch_size=2)  # 2 + 1 padded batch
  assert count == N * (T - 1)
  np.testing.assert_allclose(nll, want, rtol=1e-5)
  np.testing.assert_allclose(ppl, np.exp(want / count), rtol=1e-5)
  # every batch size gives the same numbers; an int8 cache changes them a little
  assert ev.perplexity(NET, params, wins, batch_size=3)[1] == pytest.approx(nll, rel=1e-6)
  kv8 = ev.perplexity(NET, params, wins, kv_bits=8, batch_size=2)[1]
  assert kv8 != nll and kv8 == pytest.approx(nll, rel=1e-2)


def test_kl_and_top1_against_numpy(params, int4, wins):
  ref = _np_log_softmax(_logits(params, wins))[:, :-1]
  got = _np_log_softmax(_logits(int4, wins))[:, :-1]
  want_kl = float(np.mean(np.sum(np.exp(ref) * (ref - got), -1)))
  want_top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
  stats = ev.next_token_stats(NET, int4, params, wins, batch_size=2)
  assert stats["count"] == N * (T - 1)
  assert stats["kl"] > 0
  np.testing.assert_allclose(stats["kl"], want_kl, rtol=1e-3)
  assert stats["top1"] == pytest.approx(want_top1)
  # precomputed reference log-probs give the same numbers
  ref_lp = ref.astype(np.float32)
  again = ev.next_token_stats(NET, int4, ref_lp, wins, batch_size=2)
  assert again["kl"] == pytest.approx(stats["kl"], rel=1e-5)
  assert again["top1"] == stats["top1"]
  with pytest.raises(ValueError, match="T-1"):
    ev.next_token_stats(NET, int4, ref_lp[:, :-1], wins)


def test_identical_params_give_zero_kl_and_full_agreement(params, wins):
  copy = jax.tree.map(jnp.copy, params)  # computed, not short-cut
  stats = ev.next_token_stats(NET, copy, params, wins, batch_size=2)
  ref_lp = ev.reference_log_probs(NET, params, wins, batch_size=2)
  assert ref_lp.shape == (N, T - 1, CFG.vocab_size)
  np.testing.assert_allclose(ref_lp, _np_log_softmax(_logits(params, wins))[:, :-1], atol=1e-5)
  assert abs(stats["kl"]) < 1e-6 and stats["top1"] == 1.0
  same = ev.score(NET, {"fp32": (params, None)}, params, wins, batch_size=2)["fp32"]
  assert same["kl"] == 0.0 and same["top1"] == 1.0  # the reference itself
  assert same["ppl"] == pytest.approx(ev.perplexity(NET, params, wins, batch_size=2)[0], rel=1e-6)


def test_kv_bytes_of_the_int8_cache():
  big = llama.LlamaConfig.smollm2_135m()  # head_dim 64 (abstract: nothing is allocated)
  fp32, int8 = ev.kv_bytes(big), ev.kv_bytes(big, kv_bits=8)
  assert fp32 == 2 * 30 * 2048 * 3 * 64 * 4 + 4  # k and v, float32, plus the length
  assert int8 <= 0.27 * fp32
  assert ev.kv_bytes(CFG, 2, 64) == 2 * ev.kv_bytes(CFG, 1, 64) - 4


def test_throughput_and_compiled_memory(params, int8):
  recipes = {"fp32": (params, None), "int8+kv8": (int8, 8)}  # the shapes of the job test
  speed = ev.throughput(NET, recipes, prompt_len=8, new_tokens=4, repeats=2)
  assert set(speed) == set(recipes)
  assert all(v > 0 for s in speed.values() for v in s.values())
  mem = ev.compiled_memory(NET, int8, prompt_len=8, kv_bits=8, max_len=12)
  assert set(mem) == {f"{s}_{k}_bytes" for s in ("prefill", "decode")
                      for k in ("temp", "argument", "output")}
  assert all(isinstance(v, int) and v >= 0 for v in mem.values())
  assert mem["prefill_argument_bytes"] >= jaxmem.tree_bytes(int8)


class _Recipe(NamedTuple):
  name: str
  params: Any
  kv_bits: int | None


def _stand_in(int8, calls):
  """A stand-in for recipes.build: fp32 and int8 weight-only, each also '+kv8'."""

  def build(name, fp32_params=None, *, config=None, path=None, calib_tokens=None, model=None):
    calls.append(name)
    base = name.removesuffix("+kv8")
    assert base in ("fp32", "int8_weight"), name
    return _Recipe(name, fp32_params if base == "fp32" else int8, 8 if base != name else None)

  return build


def test_build_recipes_reuses_the_weights_of_kv8_recipes(params, int8):
  calls = []
  built = ev.build_recipes(["int8_weight", "int8_weight+kv8", "fp32+kv8"], params,
                           build=_stand_in(int8, calls))
  assert calls == ["int8_weight", "fp32+kv8"]
  assert built["int8_weight+kv8"] == (int8, 8) and built["int8_weight"] == (int8, None)
  assert built["fp32+kv8"] == (params, 8)


def test_main_job_end_to_end(params, int8, tmp_path):
  from jaxmem.models.llama import __main__ as job

  ids = np.random.default_rng(2).integers(0, CFG.vocab_size, 40 * 32).astype(np.int32)
  src = ev.Source("tiny", CFG, params, ids, encode=lambda s: [ord(c) % 97 for c in s][:8],
                   decode=lambda t: " ".join(map(str, t)))
  argv = ["--workdir", str(tmp_path), "--config.recipes=int8_weight+kv8", "--config.windows=2",
          "--config.window_length=16", "--config.prompt_len=8", "--config.new_tokens=4",
          "--config.repeats=1", "--config.kv_tokens=64"]
  with contextlib.redirect_stdout(io.StringIO()) as out:
    (row,) = job.main(argv, source=src, build=_stand_in(int8, []))
  text = out.getvalue()
  assert "decode tok/s" in text and "CPU:" in text and "greedy completions" in text
  config = json.loads((tmp_path / "config.json").read_text())
  assert config == {**job._config.get_config().to_dict(), "recipes": "int8_weight+kv8",
                    "windows": 2, "window_length": 16, "prompt_len": 8, "new_tokens": 4,
                    "repeats": 1, "kv_tokens": 64}
  with PIL.Image.open(tmp_path / job.PLOT) as png:  # perplexity against weight bytes
    assert png.format == "PNG" and png.size == (840, 540)
  assert row["recipe"] == "int8_weight+kv8" and 0 < row["kl"] < 0.1 and row["top1"] > 0.5
  assert row["weight_bytes"] == jaxmem.tree_bytes(int8) < 0.3 * jaxmem.tree_bytes(params)
  assert row["kv_bytes"] == ev.kv_bytes(CFG, 1, 64, kv_bits=8)
  assert row["ppl_delta"] == pytest.approx(
      row["ppl"] - ev.perplexity(NET, params, np.reshape(ids[:32], (2, 16)))[0], abs=1e-3)
  assert len(row["completion"].split()) == 4 and row["checkpoint"] == str(
      tmp_path / "int8_weight+kv8")
  restored, kv_bits = job.restore_params(tmp_path, "int8_weight+kv8")
  assert kv_bits == 8 and jaxmem.tree_bytes(restored) == row["weight_bytes"]
  with jaxmem.CheckpointManager(str(tmp_path / "int8_weight+kv8"), read_only=True) as mgr:
    saved = mgr.restore()  # the checkpoint opens with jaxmem.CheckpointManager itself
  assert saved["recipe"] == "int8_weight+kv8" and saved["kv_bits"] == 8
  assert jaxmem.tree_bytes(saved["params"]) == row["weight_bytes"]
  # Bad names fail before the model loads (the source would raise).
  def no_source():
    raise AssertionError("loaded")

  with pytest.raises(ValueError, match="cannot name"):
    job.main(["--workdir", str(tmp_path), "--config.recipes=../x"], source=no_source,
             build=_stand_in(int8, []))
  with pytest.raises(ValueError, match="unknown recipe 'int9'.*int8_weight, int8_dynamic"):
    job.main(["--workdir", str(tmp_path), "--config.recipes=fp32,int9"], source=no_source)


def test_calibration_windows_follow_the_evaluation_windows():
  from jaxmem.models.llama import recipes

  ids = ev.eval_tokens()
  calib = ev.calibration_windows(ids)
  np.testing.assert_array_equal(calib, recipes.calibration_tokens())
  assert calib.shape == (8, 512) and ev.calibration_windows(ids[:32 * 512]) is None
  np.testing.assert_array_equal(ev.eval_windows(2), ids[:1024].reshape(2, 512))
