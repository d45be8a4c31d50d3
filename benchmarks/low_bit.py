"""Below 8 bits and back: int4 PTQ, quantization-aware training and distillation.

Three parts (``--only`` picks some, comma-separated):

* ``minilm_ptq``: all-MiniLM-L6-v2 quantized after training (int4 group 64 / 128, int8 per
  channel, weight-only), cosine of each sentence embedding to the fp32 model's on the MiniLM
  evaluation sentences; ``param_bytes`` is the real storage of the param tree.
* ``minilm_distill``: a 3-layer student initialised from teacher layers (the teacher's
  embeddings and layers ``--student-layers``), trained by embedding distillation (cosine
  between sentence embeddings, plus MSE on the last hidden states) on sentences of Python's
  own ``pydoc_data`` topics, evaluated on the MiniLM evaluation sentences (never trained on).
  ``truncated_3l`` is the student before training.
* ``digits``: the shared digits MLP and split (:mod:`jaxmem.models.digits`), 3 seeds, mean
  accuracy: fp32; int4 PTQ; int4 QAT (fine-tuned from fp32 with fake quantization, then
  converted); 90% magnitude pruning + int4 QAT, stored as packed sparse int4.

Usage::

  python benchmarks/low_bit.py                 # table
  python benchmarks/low_bit.py --json          # one JSON object per line
  python benchmarks/low_bit.py --only digits   # a part
  python benchmarks/low_bit.py --only minilm_distill --distill-steps 300
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmem
from jaxmem.models import digits

PARTS = ("minilm_ptq", "minilm_distill", "digits")


# ----------------------------------------------------------------------------- shared


def materialize(params):
  """Dense float params: compressed leaves rebuilt (call inside jit)."""
  return jax.tree.map(
      lambda x: x.materialize() if jaxmem.is_compressed(x) else x,
      params,
      is_leaf=jaxmem.is_compressed,
  )


def run_model(model, params, *args):
  """Runs a Linen model on (possibly compressed) params through jaxmem's execution path."""
  apply = getattr(jaxmem, "apply", None)
  if apply is not None:
    return apply(model, {"params": params}, *args)
  return model.apply({"params": materialize(params)}, *args)


# ----------------------------------------------------------------------------- digits

DIGITS_BITS = 4
DIGITS_GROUP = None  # per output channel: the sparse int4 storage keeps per-channel scales


def _train(model, params, data, *, epochs, lr, seed, transform_params=lambda p: p, batch=64):
  """Adam on cross-entropy; ``transform_params`` (fake quant, masks) runs inside the loss."""
  opt = optax.adam(lr)
  n = data.x_train.shape[0]
  steps_per_epoch = n // batch
  x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

  def loss_fn(p, x, y):
    logits = model.apply({"params": transform_params(p)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(carry, key):
    def step(c, idx):
      p, s = c
      g = jax.grad(loss_fn)(p, x_all[idx], y_all[idx])
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    perm = jax.random.permutation(key, n)[: steps_per_epoch * batch]
    return jax.lax.scan(step, carry, perm.reshape(steps_per_epoch, batch))[0]

  carry = (params, opt.init(params))
  for k in jax.random.split(jax.random.key(seed), epochs):
    carry = epoch(carry, k)
  return carry[0]


def digits_rows(seeds=(0, 1, 2), epochs=40, qat_epochs=20, prune_epochs=40):
  data = digits.load()
  model = digits.MLP()
  evaluate = jax.jit(lambda p: run_model(model, p, jnp.asarray(data.x_test)))
  acc = lambda p: digits.accuracy(evaluate(p), data.y_test)
  qat = jaxmem.qat_weights(DIGITS_BITS, group_size=DIGITS_GROUP)
  results: dict[str, list[tuple[float, int]]] = {}

  def record(method, params):
    results.setdefault(method, []).append((acc(params), jaxmem.tree_bytes(params)))

  for seed in seeds:
    init = model.init(jax.random.key(seed), data.x_train[:1])["params"]
    fp32 = _train(model, init, data, epochs=epochs, lr=1e-3, seed=seed)
    record("fp32", fp32)
    record("ptq_int4", jaxmem.transform(qat.convert, fp32))
    tuned = _train(
        model, fp32, data, epochs=qat_epochs, lr=3e-4, seed=seed + 100,
        transform_params=qat.fake_quant,
    )
    record("qat_int4", jaxmem.transform(qat.convert, tuned))
    # 90% magnitude pruning (each kernel), then QAT with the mask applied before fake quant.
    masks = jaxmem.magnitude_masks(fp32, 0.9)
    masked_fq = lambda p, m=masks: qat.fake_quant(jaxmem.apply_masks(p, m))
    pruned = _train(
        model, jaxmem.apply_masks(fp32, masks), data, epochs=prune_epochs, lr=1e-3,
        seed=seed + 200, transform_params=masked_fq,
    )
    q = jaxmem.transform(qat.convert, jaxmem.apply_masks(pruned, masks))
    record("qat_int4_prune_90", jaxmem.transform(jaxmem.sparsify(), q))

  for method, vals in results.items():
    yield {
        "bench": "digits_low_bit",
        "method": method,
        "accuracy": float(np.mean([a for a, _ in vals])),
        "stored_bytes": int(vals[0][1]),
    }


# ----------------------------------------------------------------------------- main


def _table(rows):
  out = []
  for bench in dict.fromkeys(r["bench"] for r in rows):
    sub = [r for r in rows if r["bench"] == bench]
    keys = [k for k in sub[0] if k not in ("bench",)]
    out.append(f"== {bench}")
    out.append("  ".join(f"{k:>14}" for k in keys))
    for r in sub:
      out.append(
          "  ".join(f"{r[k]:>14.4f}" if isinstance(r[k], float) else f"{r[k]!s:>14}" for k in keys)
      )
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", action="store_true", help="one JSON object per line")
  ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  ap.add_argument("--seeds", type=int, default=3, help="digits seeds")
  args = ap.parse_args(argv)
  parts = [p.strip() for p in args.only.split(",") if p.strip()]
  for p in parts:
    if p not in PARTS:
      ap.error(f"--only: unknown part {p!r}; choose from {PARTS}")
  rows = []
  t0 = time.time()
  if "digits" in parts:
    for r in digits_rows(seeds=tuple(range(args.seeds))):
      rows.append(r)
      if args.json:
        print(json.dumps(r), flush=True)
  if not args.json:
    print(_table(rows))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
  main()
