"""Compiled memory of a 12-layer transformer train step: remat policies, data parallel, planner.

Model: ``jaxmem.models.transformer`` (12 layers scanned with ``nn.scan``, d_model 128,
4 heads, d_ff 512, seq 64, vocab 256), batch 16, Adam, next-token loss.

* ``remat``: temp bytes (XLA ``memory_analysis()``) and step time of the train step under
  each remat policy (one microbatch).
* ``dp``: the same model's gradients data-parallel over 4 devices (``pmap`` and
  ``shard_map``, 4 examples per device), relative error against the single-device
  full-batch gradients (max over leaves of ``||g_dp - g|| / ||g||``), and the time of the
  data-parallel train step.
* ``scan_quant``: the same model's *forward pass* (batch 16) with its params quantized
  (``nn.scan`` stacks every block param along axis 0; ``stack_axes={'layers/.*': 1}`` keeps
  per-layer scales): bytes of the param tree, compiled temp bytes, time, and the relative
  error of the logits against fp32 (``||y - y_fp32|| / ||y_fp32||``). Kernels *and* the
  tied embedding/head are quantized (LayerNorms and the position table stay float); the
  weights are the random init (Gaussian, no training). ``int8_weight``: weight-only int8;
  ``int8_dynamic``: W8A8 (int8 activations per token, integer dots); ``int4_g64``:
  weight-only int4, groups of 64 along each kernel's input axis, packed two per byte.
* ``planner``: ``jaxmem.memory.plan_memory`` over remat policy x microbatches (1, 2, 4) for several
  temp-byte budgets; ``temp_bytes`` is the chosen configuration's compiled temp bytes.

The script sets 4 simulated CPU devices (XLA_FLAGS) before importing JAX. Times are best of
``--repeats`` runs after a warm-up and are noisy on a shared CPU.

Usage::

  python benchmarks/memory.py            # tables
  python benchmarks/memory.py --json     # one JSON object per line

JSON lines::

  {"bench": "remat", "policy": str, "temp_bytes": int, "ms": float}
  {"bench": "dp", "backend": "pmap" | "shard_map", "devices": 4, "max_rel_grad_err": float,
   "ms": float}
  {"bench": "planner", "budget_bytes": int, "chosen": str, "temp_bytes": int}
  {"bench": "scan_quant", "method": "fp32" | "int8_weight" | "int8_dynamic" | "int4_g64",
   "param_bytes": int, "temp_bytes": int, "ms": float, "rel_err": float}
"""

from __future__ import annotations

import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxmem  # noqa: E402
from jaxmem.models import transformer  # noqa: E402

CFG = transformer.Config(vocab=256, d_model=128, heads=4, d_ff=512, layers=12, seq=64)
BATCH = 16
DEVICES = 4


def _loss_for(policy: str):
  model = transformer.Transformer(CFG, policy=policy)
  return lambda params, tokens: transformer.lm_loss(model, params, tokens)


def _best_ms(run, repeats: int) -> float:
  run()  # warm-up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    best = min(best, (time.perf_counter() - t0) * 1e3)
  return best


def candidates(params, tokens):
  """Every remat policy x microbatch count (1, 2, 4), compiled once (state donated)."""
  opt = optax.adam(1e-3)
  state = jaxmem.init_step_state(params, opt)
  make_step = lambda policy, k: jaxmem.train_step(_loss_for(policy), opt, microbatches=k)
  cands = jaxmem.memory.memory_candidates(
      make_step, (state, tokens), microbatches=(1, 2, 4), donate_argnums=0
  )
  return state, cands


def bench_remat(state, tokens, cands, repeats):
  rows = []
  for c in cands:
    if c.microbatches != 1:
      continue
    holder = [jax.tree.map(jnp.copy, state)]  # the step donates (consumes) its state

    def run(c=c, holder=holder):
      holder[0], metrics = c.compiled(holder[0], tokens)
      jax.block_until_ready(metrics)

    rows.append({
        "bench": "remat",
        "policy": c.policy,
        "temp_bytes": c.profile.temp_bytes,
        "ms": round(_best_ms(run, repeats), 2),
    })
  return rows


def _rel_err(a, b) -> float:
  return max(
      float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def bench_dp(params, tokens, repeats):
  loss = _loss_for("none")
  ref = jax.jit(jax.grad(loss))(params, tokens)

  def grad_step(p, t):  # pmap style: each replica's gradient, averaged over the axis
    return p, jax.lax.pmean(jax.grad(loss)(p, t), "batch")

  opt = optax.adam(1e-3)
  rows = []
  for backend in ("pmap", "shard_map"):
    dp = jaxmem.data_parallel(grad_step, backend=backend, donate_argnums=())
    _, grads = dp(dp.replicate(params), tokens)
    err = _rel_err(dp.unreplicate(grads), ref)
    train = jaxmem.data_parallel(
        jaxmem.train_step(loss, opt, axis_name="batch"), backend=backend
    )
    holder = [train.replicate(jaxmem.init_step_state(params, opt))]

    def run(train=train, holder=holder):
      holder[0], metrics = train(holder[0], tokens)
      jax.block_until_ready(metrics)

    rows.append({
        "bench": "dp",
        "backend": backend,
        "devices": train.num_devices,
        "max_rel_grad_err": err,
        "ms": round(_best_ms(run, repeats), 2),
    })
  return rows


def bench_planner(state, tokens, cands):
  sizes = [c.profile.temp_bytes for c in cands if c.profile is not None]
  none = next(c for c in cands if c.name == "none/mb1").profile.temp_bytes
  budgets = sorted({none, none // 2, none // 4, none // 8, min(sizes)}, reverse=True)
  rows, plans = [], []
  for budget in budgets:
    plan = jaxmem.memory.plan_memory(None, (state, tokens), budget, candidates=cands)
    plans.append(plan)
    rows.append({
        "bench": "planner",
        "budget_bytes": int(budget),
        "chosen": plan.chosen.name,
        "temp_bytes": int(plan.chosen_bytes),
    })
  below = min(sizes) - 1
  try:
    jaxmem.memory.plan_memory(None, (state, tokens), below, candidates=cands)
    below_msg = f"budget {below:,}: no error (unexpected)"
  except ValueError as e:
    below_msg = f"budget {below:,}: ValueError: {e}"
  return rows, plans, below_msg


SCAN_STACK = {r"layers/.*": 1}
SCAN_METHODS = {
    "fp32": None,
    "int8_weight": lambda: jaxmem.quantize_int8(stack_axes=SCAN_STACK),
    "int8_dynamic": lambda: jaxmem.quantize_dynamic_int8(stack_axes=SCAN_STACK),
    "int4_g64": lambda: jaxmem.quantize_int4(group_size=64, stack_axes=SCAN_STACK),
}


def bench_scan_quant(params, tokens, repeats):
  """The scan-over-layers forward pass with quantized params (see the module docstring).

  Times are medians over ``repeats`` rounds that run every method once each (interleaved,
  so machine load moves all methods alike).
  """
  model = transformer.Transformer(CFG)
  fwd = jax.jit(lambda p, t: jaxmem.apply(model, {"params": p}, t))
  runs = {}
  for method, make in SCAN_METHODS.items():
    p = params if make is None else jaxmem.transform(make(), params)
    runs[method] = (fwd.lower(p, tokens).compile(), p)
  ref = runs["fp32"][0](params, tokens)
  times = {m: [] for m in runs}
  for _ in range(repeats + 1):  # the first round warms up
    for method, (compiled, p) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(p, tokens))
      times[method].append((time.perf_counter() - t0) * 1e3)
  rows = []
  for method, (compiled, p) in runs.items():
    y = compiled(p, tokens)
    rows.append({
        "bench": "scan_quant",
        "method": method,
        "param_bytes": int(jaxmem.tree_bytes(p)),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "ms": float(np.median(times[method][1:])),
        "rel_err": float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)),
    })
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", action="store_true", help="one JSON object per line")
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  if jax.device_count() < DEVICES:
    raise SystemExit(f"need {DEVICES} devices, got {jax.device_count()}; check XLA_FLAGS")

  tokens = transformer.example_tokens(CFG, BATCH)
  params = transformer.Transformer(CFG).init(jax.random.key(0), tokens)["params"]
  state, cands = candidates(params, tokens)
  remat = bench_remat(state, tokens, cands, args.repeats)
  dp = bench_dp(params, tokens, args.repeats)
  planner, plans, below_msg = bench_planner(state, tokens, cands)
  scan_quant = bench_scan_quant(params, tokens, max(args.repeats, 9))

  if args.json:
    for row in remat + dp + planner + scan_quant:
      print(json.dumps(row))
    return

  print(f"12-layer transformer train step (scan over layers), batch {BATCH}, "
        f"params {jaxmem.tree_bytes(params):,} bytes, backend {jax.default_backend()}")
  none = remat[0]["temp_bytes"]
  print(f"\n{'policy':<15} {'temp bytes':>14} {'x none':>8} {'ms':>9}")
  for r in remat:
    print(f"{r['policy']:<15} {r['temp_bytes']:>14,} {r['temp_bytes'] / none:>8.3f} "
          f"{r['ms']:>9.1f}")
  print(f"\n{'backend':<10} {'devices':>7} {'max rel grad err':>17} {'ms':>9}")
  for r in dp:
    print(f"{r['backend']:<10} {r['devices']:>7} {r['max_rel_grad_err']:>17.2e} {r['ms']:>9.1f}")
  print(f"\n{'budget bytes':>14} {'chosen':<20} {'temp bytes':>14}  fits")
  for r in planner:
    fits = "yes" if r["temp_bytes"] <= r["budget_bytes"] else "NO"
    print(f"{r['budget_bytes']:>14,} {r['chosen']:<20} {r['temp_bytes']:>14,}  {fits}")
  print(f"{below_msg}\n")
  print(plans[-1].table())
  fp32 = scan_quant[0]
  print(f"\nforward pass, quantized params inside nn.scan (batch {BATCH}, random-init weights)")
  print(f"{'method':<13} {'param bytes':>12} {'x fp32':>7} {'temp bytes':>11} {'x fp32':>7} "
        f"{'ms':>8} {'speed x':>8} {'rel err':>8}")
  for r in scan_quant:
    print(f"{r['method']:<13} {r['param_bytes']:>12,} "
          f"{r['param_bytes'] / fp32['param_bytes']:>7.3f} {r['temp_bytes']:>11,} "
          f"{r['temp_bytes'] / fp32['temp_bytes']:>7.3f} {r['ms']:>8.1f} "
          f"{fp32['ms'] / r['ms']:>8.2f} {r['rel_err']:>8.4f}")
  print(jaxmem.ops.kernel_info().summary())


if __name__ == "__main__":
  main()
