"""Pruning on scikit-learn digits: accuracy and real stored bytes of sparse MLPs.

MLP 64-256-256-10 (``jaxmem.models.digits``), Adam, minibatches of 64, the fixed
held-out split, accuracy averaged over seeds. All three kernels are pruned; biases stay
dense float32. Methods:

* ``dense``: no pruning (``TRAIN_STEPS`` steps).
* ``gradual_90/95/98``: :func:`jaxmem.gradual_prune` (Zhu & Gupta cubic schedule,
  global scope) during the same number of steps.
* ``global_90``: one-shot global magnitude pruning of the trained dense model
  (:func:`jaxmem.sparsity.magnitude_masks`, ``scope='global'``), then ``FINETUNE_STEPS`` of
  fine-tuning with the masks fixed (:func:`jaxmem.keep_masks`).
* ``nm_2_4``: one-shot 2:4 pruning along the input axis of the trained dense model,
  then the same fine-tuning.
* ``gradual_90_int8``: the ``gradual_90`` model packed with int8 values.

Accuracy is measured from the packed params (:func:`jaxmem.sparsify`) through
:func:`jaxmem.apply`, which unpacks inside the jitted function. ``stored_bytes`` is the
real size of those packed params (values + index + scales, plus dense biases);
``dense_bytes`` that of the float32 params.

Run: ``python benchmarks/pruning.py [--json] [--seeds 3]``.

The train/eval helpers (:func:`train`, :func:`evaluate`, :func:`init_params`) are
importable for other digits benchmarks.
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

LEARNING_RATE = 1e-3
BATCH_SIZE = 64
TRAIN_STEPS = 3000
FINETUNE_STEPS = 1000
PRUNE_BEGIN = 300
PRUNE_END = 2000
PRUNE_EVERY = 50
INT8_PER_TENSOR = True  # one scale per kernel (see the int8 row's note in the README table)


def init_params(seed: int, model=None):
  """Fresh MLP params for ``seed``."""
  model = model or digits.MLP()
  return model.init(jax.random.key(seed), jnp.zeros((1, 64), jnp.float32))["params"]


def batch_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """``[steps, batch_size]`` example indices: reshuffled every epoch, fixed by ``seed``."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  epochs = -(-steps // per_epoch)
  idx = np.concatenate([rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)])
  return idx.reshape(-1, batch_size)[:steps].astype(np.int32)


def cross_entropy(model, params, x, y):
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(params, tx, data: digits.DigitsData, *, steps: int, seed: int, model=None,
          loss_fn=None, batch_size: int = BATCH_SIZE):
  """Runs ``steps`` optimizer steps (one jitted ``lax.scan``); returns (params, opt_state).

  Args:
    params: initial params.
    tx: an optax transformation (e.g. ``optax.chain(optax.adam(lr), jaxmem.gradual_prune(...))``).
    data: the digits split.
    steps: number of updates.
    seed: fixes the minibatch order.
    model: a Linen module (default: ``digits.MLP()``).
    loss_fn: ``(model, params, x, y) -> scalar``; default: softmax cross-entropy.
    batch_size: examples per step.
  """
  model = model or digits.MLP()
  loss_fn = loss_fn or cross_entropy
  idx = batch_indices(len(data.x_train), steps, batch_size, seed)

  @jax.jit
  def run(params, opt_state, x, y, idx):
    def step(carry, ib):
      p, s = carry
      grads = jax.grad(lambda q: loss_fn(model, q, x[ib], y[ib]))(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), idx)
    return params, opt_state

  return run(params, tx.init(params), data.x_train, data.y_train, idx)


def evaluate(params, data: digits.DigitsData, model=None) -> float:
  """Test accuracy; ``params`` may hold compressed leaves (run through ``jaxmem.apply``)."""
  model = model or digits.MLP()
  logits = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))(params, data.x_test)
  return digits.accuracy(logits, data.y_test)


def pack(params, bits: int | None = None):
  """Packs the pruned kernels into :class:`jaxmem.SparseArray` (float or int8 values)."""
  return jaxmem.transform(jaxmem.sparsify(bits=bits, per_tensor=INT8_PER_TENSOR), params)


def gradual_tx(sparsity: float):
  return optax.chain(
      optax.adam(LEARNING_RATE),
      jaxmem.gradual_prune(sparsity, PRUNE_BEGIN, PRUNE_END, update_every=PRUNE_EVERY,
                           scope="global"),
  )


def run_seed(seed: int, data: digits.DigitsData) -> dict[str, dict]:
  """All methods for one seed: ``{method: {sparsity, accuracy, stored_bytes, dense_bytes}}``."""
  out = {}
  p0 = init_params(seed)
  dense_bytes = jaxmem.tree_bytes(p0)

  def record(method, params, packed):
    out[method] = dict(
        sparsity=jaxmem.sparsity.tree_sparsity(params), accuracy=evaluate(packed, data),
        stored_bytes=jaxmem.tree_bytes(packed), dense_bytes=dense_bytes,
    )

  dense, _ = train(p0, optax.adam(LEARNING_RATE), data, steps=TRAIN_STEPS, seed=seed)
  record("dense", dense, dense)
  for s in (0.90, 0.95, 0.98):
    pruned, _ = train(p0, gradual_tx(s), data, steps=TRAIN_STEPS, seed=seed)
    record(f"gradual_{round(s * 100)}", pruned, pack(pruned))
    if s == 0.90:
      record("gradual_90_int8", pruned, pack(pruned, bits=8))
  for method, masks in (
      ("global_90", jaxmem.sparsity.magnitude_masks(dense, 0.9, scope="global")),
      ("nm_2_4", jaxmem.sparsity.nm_masks(dense, 2, 4)),
  ):
    tx = optax.chain(optax.adam(LEARNING_RATE), jaxmem.keep_masks(masks))
    tuned, _ = train(jaxmem.sparsity.apply_masks(dense, masks), tx, data, steps=FINETUNE_STEPS,
                     seed=seed + 1000)
    record(method, tuned, pack(tuned))
  return out


METHODS = ("dense", "gradual_90", "gradual_95", "gradual_98", "global_90", "nm_2_4",
           "gradual_90_int8")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", action="store_true", help="one JSON object per line")
  ap.add_argument("--seeds", type=int, default=3)
  args = ap.parse_args(argv)
  data = digits.load()
  t0 = time.perf_counter()
  runs = [run_seed(seed, data) for seed in range(args.seeds)]
  rows = []
  for m in METHODS:
    rs = [r[m] for r in runs]
    rows.append(dict(
        bench="digits_prune", method=m,
        sparsity=float(np.mean([r["sparsity"] for r in rs])),
        accuracy=float(np.mean([r["accuracy"] for r in rs])),
        stored_bytes=int(round(np.mean([r["stored_bytes"] for r in rs]))),
        dense_bytes=int(rs[0]["dense_bytes"]),
    ))
  if args.json:
    for r in rows:
      print(json.dumps(r))
    return
  print(f"digits MLP 64-256-256-10, Adam lr={LEARNING_RATE}, batch {BATCH_SIZE}, "
        f"{args.seeds} seeds, {time.perf_counter() - t0:.0f} s")
  print(f"{'method':<16} {'sparsity':>8} {'accuracy':>8} {'min acc':>8} {'stored B':>9} "
        f"{'dense B':>8} {'ratio':>6}")
  for r in rows:
    accs = [run[r['method']]["accuracy"] for run in runs]
    print(f"{r['method']:<16} {r['sparsity']:>8.4f} {r['accuracy']:>8.4f} {min(accs):>8.4f} "
          f"{r['stored_bytes']:>9,} {r['dense_bytes']:>8,} "
          f"{r['stored_bytes'] / r['dense_bytes']:>6.3f}")


if __name__ == "__main__":
  main()
