"""Digits: train the MLP, prune it gradually, fine-tune, compress, evaluate, checkpoint.

One optax chain does the training: Adam, then :func:`jaxmem.gradual_prune` (its masks
live in the optimizer state). Steps ``[0, dense_steps)`` train dense; pruning follows the
cubic schedule over ``prune_steps``; ``finetune_steps`` train with the final masks. The
state (params, optimizer state with masks, a copy of the dense weights) is checkpointed
with :class:`jaxmem.CheckpointManager` every ``checkpoint_every`` steps; a restarted run
resumes from the latest readable step and ends exactly where an uninterrupted run ends
(batches are a pure function of ``(seed, step)``).

The config is checked before anything runs (:func:`validate_config`), recorded in
``workdir/config.json``, and a resume whose config differs from it is refused (fields in
:data:`IGNORED_CONFIG_FIELDS` excepted) unless ``config.allow_config_change`` is True.
Every ``eval_every`` steps the held-out accuracy of the training params is logged. At the
end each recipe in ``config.recipes`` is built with jaxmem transforms, evaluated on the
held-out split, and saved; ``workdir`` then holds::

  config.json              the config of the run
  checkpoints/<step>/      training state (resumable)
  compressed/<step>/       every recipe's compressed params, one checkpoint
  tensorboard/             event files (see README.md for the tags), each point written once
  metrics.json             final metrics
  pareto.png               bytes vs accuracy across recipes, Pareto front marked
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem.models import _plots, digits
from jaxmem.models import _workdir as wd

RECIPES = tuple(f"{kind}_{fmt}" for kind in ("dense", "pruned") for fmt in ("fp32", "int8", "int4"))
SCOPES = ("global", "layer")
# Fields a resume may change freely: they change what is logged or kept, not the results.
IGNORED_CONFIG_FIELDS = ("progress_bar", "log_every", "eval_every", "checkpoint_every",
                         "max_to_keep")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``wd.ConfigError`` (a ValueError) listing every invalid field; called before
  anything runs."""
  errors = []

  def check(ok, msg):
    if not ok:
      errors.append(msg)

  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  for field in ("dense_steps", "prune_steps", "finetune_steps"):
    v = config[field]
    check(is_int(v) and v >= 0, f"config.{field}={v!r}: must be an integer >= 0")
  if not errors:
    check(total_steps(config) > 0, "config.dense_steps + prune_steps + finetune_steps must be > 0")
  for field in ("batch_size", "log_every", "eval_every", "checkpoint_every", "max_to_keep"):
    v = config[field]
    check(is_int(v) and v > 0, f"config.{field}={v!r}: must be a positive integer")
  check(config.learning_rate > 0, f"config.learning_rate={config.learning_rate!r}: must be > 0")
  s = config.prune.final_sparsity
  check(isinstance(s, (int, float)) and 0 <= s < 1,
        f"config.prune.final_sparsity={s!r}: must be in [0, 1)")
  v = config.prune.update_every
  check(is_int(v) and v > 0, f"config.prune.update_every={v!r}: must be a positive integer")
  check(config.prune.scope in SCOPES,
        f"config.prune.scope={config.prune.scope!r}: must be one of {', '.join(SCOPES)}")
  recipes = config.recipes
  if isinstance(recipes, str) or not recipes:
    errors.append(f"config.recipes={recipes!r}: must be a non-empty tuple of recipe names")
  else:
    bad = [r for r in recipes if r not in RECIPES]
    check(not bad, f"config.recipes: unknown recipe(s) {', '.join(map(repr, bad))}; valid "
          f"recipes are {', '.join(RECIPES)}")
    check(len(set(recipes)) == len(recipes), f"config.recipes={tuple(recipes)!r}: duplicates")
  if errors:
    raise wd.ConfigError("invalid digits config:\n  " + "\n  ".join(errors))


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
  raise ValueError(f"unknown recipe {name!r}; valid recipes are {', '.join(RECIPES)}.")


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, x):
  return jaxmem.apply(model, {"params": params}, x)


def evaluate(model, params, data: digits.DigitsData) -> float:
  """Held-out accuracy; compressed leaves run through :func:`jaxmem.apply` (one compilation
  per model and params structure, reused by every evaluation during training)."""
  return digits.accuracy(_logits(model, params, data.x_test), data.y_test)


def pareto_plot(rows: list[dict[str, Any]], path, title: str) -> None:
  """Stored bytes vs held-out accuracy per recipe, Pareto front drawn (``_plots.pareto_plot``)."""
  _plots.pareto_plot(rows, x="bytes", y="accuracy", label="recipe", path=path, title=title,
                     xlabel="stored parameter bytes", ylabel="held-out accuracy")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the experiment in ``workdir``; returns the final metrics.

  Raises ``wd.ConfigError`` (a ValueError) before anything is written when the config is
  invalid (:func:`validate_config`) or differs from the one recorded in
  ``workdir/config.json`` (``wd.ConfigChangedError``; set
  ``config.allow_config_change=True`` to continue anyway).
  """
  from tqdm import tqdm

  validate_config(config)
  workdir = wd.as_path(workdir)
  changed = wd.check_config(config, workdir, ignore=IGNORED_CONFIG_FIELDS)
  workdir.mkdir(parents=True, exist_ok=True)
  wd.write_config(config, workdir)
  data = digits.load()
  model = digits.MLP()
  tx = make_optimizer(config)
  mesh = make_mesh(config)
  replicated = NamedSharding(mesh, P()) if mesh is not None else None
  batch_sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
  devices = wd.device_info()

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
  # The step runs on a jaxmem.StepState; checkpoints keep the plain dict above.
  step_state = jaxmem.StepState(np.int32(state["step"]), state["params"], state["opt_state"])
  dense_params = state["dense_params"]
  start = int(state["step"])
  events = wd.EventLog(workdir / "tensorboard")
  if changed:
    events.text("config_change", "\n".join(f"* {c}" for c in changed), start)
    print("continuing with a changed config (allow_config_change):\n  " + "\n  ".join(changed))
  if changed or not events.has("config"):
    events.config(config, ["eval/accuracy", "train/loss",
                           *(f"eval/{r}/accuracy" for r in config.recipes)],
                  step=start, extra={"device_count": devices["device_count"]})
  if start < n_total or not events.has("run/device_count"):  # one point per (re)start
    events.scalar("run/device_count", devices["device_count"], start)
  print(f"devices: {devices['device_count']} x {devices['device_kind']} "
        f"({devices['process_count']} process(es)); steps {start}..{n_total}")
  bar = tqdm(range(start, n_total), initial=start, total=n_total, desc="digits",
             disable=not config.progress_bar)
  loss = None
  t_last, step_last = time.perf_counter(), start
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
      loss_f = float(loss)  # waits for the step: the timing below is of finished steps
      now = time.perf_counter()
      steps_per_sec = (done - step_last) / max(now - t_last, 1e-9)
      t_last, step_last = now, done
      sparsity = jaxmem.sparsity.mask_sparsity(step_state.opt_state[1].masks)
      events.scalar("train/loss", loss_f, done)
      events.scalar("train/sparsity", sparsity, done)
      events.scalar("train/steps_per_sec", steps_per_sec, done)
      bar.set_postfix(loss=f"{loss_f:.4f}", sparsity=f"{sparsity:.3f}",
                      steps_s=f"{steps_per_sec:.1f}")
    if done % config.eval_every == 0 or done == n_total:
      acc = evaluate(model, step_state.params, data)
      events.scalar("eval/accuracy", acc, done)
      tqdm.write(f"step {done}: held-out accuracy {acc:.4f}, train loss {float(loss):.4f}")
    if done % config.checkpoint_every == 0 or done == n_total:
      events.flush()  # points up to a checkpoint outlive a kill: a resume starts after them
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
    events.scalar(f"eval/{name}/accuracy", acc, n_total)  # skipped when already written
    events.scalar(f"eval/{name}/bytes", nbytes, n_total)
  events.close()
  # The eval curve of the whole run, resumes included, as logged (each step once).
  logged = wd.read_events(workdir / "tensorboard").get("eval/accuracy", {})
  curve = [{"step": s, "accuracy": a} for s, a in sorted(logged.items())]

  with jaxmem.CheckpointManager(workdir / "compressed", max_to_keep=1) as cmgr:
    if n_total not in cmgr.all_steps():
      cmgr.save(n_total, compressed, force=True)

  metrics = {
      "step": n_total,
      "final_train_loss": float(jax.device_get(loss)) if loss is not None else None,
      "sparsity": jaxmem.sparsity.tree_sparsity(params),
      "device_count": devices["device_count"],
      "eval_curve": curve,
      "recipes": rows,
  }
  old = workdir / "metrics.json"
  if loss is None and old.exists():  # resumed after training had finished: keep the value
    metrics["final_train_loss"] = json.loads(old.read_text())["final_train_loss"]
  old.write_text(json.dumps(metrics, indent=2))
  pareto_plot(rows, workdir / "pareto.png",
              f"digits MLP, gradual {config.prune.final_sparsity:.0%} pruning")
  print(f"{'recipe':<12} {'accuracy':>8} {'bytes':>9} {'ratio':>6}")
  for r in rows:
    print(f"{r['recipe']:<12} {r['accuracy']:>8.4f} {r['bytes']:>9,} {r['ratio']:>6.3f}")
  print(f"wrote {os.fspath(workdir / 'metrics.json')} and pareto.png")
  return metrics
