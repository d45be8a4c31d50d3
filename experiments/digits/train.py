"""Digits: train the MLP, prune it gradually, fine-tune, compress, evaluate, checkpoint.

One optax chain does the training: Adam, then :func:`jaxmem.gradual_prune` (its masks
live in the optimizer state). Steps ``[0, dense_steps)`` train dense; pruning follows the
cubic schedule over ``prune_steps``; ``finetune_steps`` train with the final masks. The
state (params, optimizer state with masks, a copy of the dense weights) is checkpointed
with :class:`jaxmem.CheckpointManager` every ``checkpoint_every`` steps; a restarted run
resumes from the latest readable step and ends exactly where an uninterrupted run ends
(batches are a pure function of ``(seed, step)``).

At the end each recipe in ``config.recipes`` is built with jaxmem transforms, evaluated
on the held-out split, and saved; ``workdir`` then holds::

  checkpoints/<step>/      training state (resumable)
  compressed/<step>/       every recipe's compressed params, one checkpoint
  tensorboard/             event files (train loss, sparsity, per-recipe accuracy/bytes)
  metrics.json             final metrics
  pareto.png               bytes vs accuracy across recipes, Pareto front marked
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem.models import digits


def total_steps(config: ml_collections.ConfigDict) -> int:
  return config.dense_steps + config.prune_steps + config.finetune_steps


def make_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
  """A device mesh from ``config.mesh`` ({axis: size}, one size may be -1), or None."""
  if config.mesh is None:
    return None
  return jaxmem.distributed.mesh_from_axes(dict(config.mesh), batch_size=config.batch_size)


def batch_indices(config, step: int, n: int) -> np.ndarray:
  """The training batch of ``step``: a pure function of (seed, step), so resumes are exact."""
  return np.random.default_rng([config.seed, step]).integers(0, n, config.batch_size)


def make_optimizer(config) -> optax.GradientTransformation:
  begin = config.dense_steps
  return optax.chain(
      optax.adam(config.learning_rate),
      jaxmem.gradual_prune(
          config.prune.final_sparsity,
          begin_step=begin,
          end_step=begin + config.prune_steps,
          update_every=config.prune.update_every,
          scope=config.prune.scope,
      ),
  )


def make_train_step(model, tx):
  """The jitted :func:`jaxmem.train_step` ``(StepState, {"x", "y"}) -> (StepState, metrics)``."""

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  # Not donated: the dense weights kept at ``dense_steps`` are the state's params then.
  return jax.jit(jaxmem.train_step(loss_fn, tx))


def recipe_transform(name: str) -> jaxmem.ParamTransform | None:
  """``dense_*`` / ``pruned_*`` recipe names to the jaxmem transform building them."""
  kind, _, fmt = name.partition("_")
  if kind == "dense":
    return {
        "fp32": None,
        "int8": jaxmem.quantize_int8(),
        "int4": jaxmem.quantize_int4(group_size=64),
    }[fmt]
  if kind == "pruned":
    return {
        "fp32": jaxmem.sparsify(),
        "int8": jaxmem.sparsify(bits=8),
        "int4": jaxmem.sparsify(bits=4),
    }[fmt]
  raise ValueError(f"unknown recipe {name!r}; use dense_{{fp32,int8,int4}} or pruned_{{...}}.")


def evaluate(model, params, data: digits.DigitsData) -> float:
  """Held-out accuracy; compressed leaves run through :func:`jaxmem.apply`."""
  logits = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))(params, data.x_test)
  return digits.accuracy(logits, data.y_test)


def pareto_plot(rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
  """Scatter of stored bytes vs accuracy per recipe with the Pareto front drawn."""
  import matplotlib
  import matplotlib.ticker

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["bytes"], r["accuracy"], s=30)
    ax.annotate(r["recipe"], (r["bytes"], r["accuracy"]), fontsize=8,
                xytext=(4, 4), textcoords="offset points")
  front, best = [], -1.0
  for r in sorted(rows, key=lambda r: (r["bytes"], -r["accuracy"])):
    if r["accuracy"] > best:
      front.append(r)
      best = r["accuracy"]
  ax.plot([r["bytes"] for r in front], [r["accuracy"] for r in front], "--", color="gray",
          label="Pareto front")
  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("stored parameter bytes")
  ax.set_ylabel("held-out accuracy")
  ax.set_title(title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the experiment in ``workdir``; returns the final metrics."""
  from tensorboardX import SummaryWriter
  from tqdm import tqdm

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = digits.load()
  model = digits.MLP()
  tx = make_optimizer(config)
  mesh = make_mesh(config)
  replicated = NamedSharding(mesh, P()) if mesh is not None else None
  batch_sharding = NamedSharding(mesh, P("data")) if mesh is not None else None

  params = model.init(jax.random.key(config.seed), data.x_train[:1])["params"]
  state = {"params": params, "opt_state": tx.init(params), "dense_params": None, "step": 0}
  mgr = jaxmem.CheckpointManager(workdir / "checkpoints", max_to_keep=config.max_to_keep)
  if mgr.latest_step() is not None:
    state = mgr.restore(sharding=replicated)  # latest readable step (warns on fallback)
    print(f"resumed from step {state['step']}")
  elif replicated is not None:
    state = jax.device_put(state, replicated)

  n_total = total_steps(config)
  train_step = make_train_step(model, tx)
  writer = SummaryWriter(str(workdir / "tensorboard"))
  # The step runs on a jaxmem.StepState; checkpoints keep the plain dict above.
  step_state = jaxmem.StepState(np.int32(state["step"]), state["params"], state["opt_state"])
  dense_params = state["dense_params"]
  start = state["step"]
  bar = tqdm(range(start, n_total), initial=start, total=n_total, desc="digits",
             disable=not config.progress_bar)
  loss = None
  for step in bar:
    idx = batch_indices(config, step, len(data.x_train))
    x, y = data.x_train[idx], data.y_train[idx]
    if batch_sharding is not None:
      x, y = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
    step_state, train_metrics = train_step(step_state, {"x": x, "y": y})
    loss = train_metrics["loss"]
    done = step + 1
    if done == config.dense_steps:
      dense_params = step_state.params
    if done % config.log_every == 0 or done == n_total:
      loss_f = float(loss)
      sparsity = jaxmem.sparsity.mask_sparsity(step_state.opt_state[1].masks)
      writer.add_scalar("train/loss", loss_f, done)
      writer.add_scalar("train/sparsity", sparsity, done)
      bar.set_postfix(loss=f"{loss_f:.4f}", sparsity=f"{sparsity:.3f}")
    if done % config.checkpoint_every == 0 or done == n_total:
      state = {"params": step_state.params, "opt_state": step_state.opt_state,
               "dense_params": dense_params, "step": done}
      mgr.save(done, state)
  bar.close()
  mgr.close()
  params = step_state.params
  if dense_params is None:  # dense_steps == 0
    dense_params = params

  rows = []
  compressed = {}
  dense_bytes = jaxmem.tree_bytes(dense_params)
  for name in config.recipes:
    source = dense_params if name.startswith("dense") else params
    rtx = recipe_transform(name)
    cparams = source if rtx is None else jaxmem.transform(rtx, jax.device_get(source))
    acc = evaluate(model, cparams, data)
    nbytes = jaxmem.tree_bytes(cparams)
    rows.append({"recipe": name, "accuracy": acc, "bytes": nbytes,
                 "ratio": nbytes / dense_bytes})
    compressed[name] = cparams
    writer.add_scalar(f"eval/{name}/accuracy", acc, n_total)
    writer.add_scalar(f"eval/{name}/bytes", nbytes, n_total)
  writer.close()

  with jaxmem.CheckpointManager(workdir / "compressed", max_to_keep=1) as cmgr:
    if n_total not in cmgr.all_steps():
      cmgr.save(n_total, compressed, force=True)

  metrics = {
      "step": n_total,
      "final_train_loss": float(jax.device_get(loss)) if loss is not None else None,
      "sparsity": jaxmem.sparsity.tree_sparsity(params),
      "recipes": rows,
  }
  if loss is None:  # resumed after training had finished: keep the earlier value
    old = workdir / "metrics.json"
    if old.exists():
      metrics["final_train_loss"] = json.loads(old.read_text())["final_train_loss"]
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
  pareto_plot(rows, workdir / "pareto.png",
              f"digits MLP, gradual {config.prune.final_sparsity:.0%} pruning")
  print(f"{'recipe':<12} {'accuracy':>8} {'bytes':>9} {'ratio':>6}")
  for r in rows:
    print(f"{r['recipe']:<12} {r['accuracy']:>8.4f} {r['bytes']:>9,} {r['ratio']:>6.3f}")
  print(f"wrote {os.fspath(workdir / 'metrics.json')} and pareto.png")
  return metrics
