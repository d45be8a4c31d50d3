"""MiniLM post-training quantization as a configurable experiment.

Loads all-MiniLM-L6-v2 (:func:`jaxmem.models.minilm.load`), builds each recipe of
``config.recipes`` (:func:`jaxmem.models.minilm.recipe`) and evaluates it against fp32 with
the MiniLM evaluation (:func:`jaxmem.models.minilm.evaluate_recipes`, the same batching,
timing, cosine and top-k agreement as ``python -m jaxmem.models.minilm``) on the evaluation
sentences (real text). There is no training step: PTQ works on the pretrained weights.
``workdir`` then holds::

  config.json         the config of the run
  compressed/<name>/  recipe <name>'s compressed params (jaxmem.CheckpointManager,
                      :func:`jaxmem.models.minilm.save_params`)
  results/<name>.json one result per finished recipe (a rerun skips finished recipes)
  tensorboard/        event files (per-recipe scalars, step = the recipe's position when it
                      was first evaluated; each tag written once), the config as hparams/text
  metrics.json        the table as JSON
  pareto.png          weight bytes vs mean cosine to fp32, Pareto front marked

Everything is keyed by recipe name, so a rerun with the recipes reordered, added or removed
reuses each finished recipe's own result and checkpoint; ``config.recipes`` is therefore not
compared with ``config.json`` on a rerun, the other results-relevant fields are (a change is
refused unless ``config.allow_config_change``; see :data:`IGNORED_CONFIG_FIELDS`).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem.models import _plots, minilm
from jaxmem.models import _workdir as wd

# Not compared with workdir/config.json on a rerun: results are keyed by recipe name, and the
# progress bar changes nothing.
IGNORED_CONFIG_FIELDS = ("progress_bar", "recipes")
SCALAR_KEYS = ("param_bytes", "ratio", "cos_mean", "cos_min", "topk_agreement", "sent_per_s")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``wd.ConfigError`` (a ValueError) listing every invalid field; called before
  the model is loaded."""
  errors = []
  recipes = config.recipes
  if isinstance(recipes, str) or not recipes:
    errors.append(f"config.recipes={recipes!r}: must be a non-empty tuple of recipe names")
  else:
    bad = []
    for name in recipes:
      try:
        minilm.recipe(name)
      except ValueError:
        bad.append(name)
    if bad:
      errors.append(f"config.recipes: unknown recipe(s) {', '.join(map(repr, bad))}; valid "
                    f"recipes are {', '.join(minilm.RECIPES)}, or int4_g<group size> "
                    "(e.g. int4_g32)")
    if len(set(recipes)) != len(recipes):
      errors.append(f"config.recipes={tuple(recipes)!r}: duplicates")
  for field in ("num_sentences", "batch_size", "pad_multiple", "top_k"):
    v = config[field]
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
      errors.append(f"config.{field}={v!r}: must be a positive integer")
  if errors:
    raise wd.ConfigError("invalid minilm config:\n  " + "\n  ".join(errors))


def make_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
  """A device mesh from ``config.mesh`` ({axis: size}, one size may be -1), or None."""
  if config.mesh is None:
    return None
  return jaxmem.distributed.mesh_from_axes(dict(config.mesh), batch_size=config.batch_size)


def finished_row(workdir, name: str) -> dict[str, Any] | None:
  """The saved result of recipe ``name`` if both it and its checkpoint exist, else None."""
  result_file = workdir / "results" / f"{name}.json"
  if not result_file.exists() or not minilm.is_saved(workdir / "compressed", name):
    return None
  row = json.loads(result_file.read_text())
  return row if set(minilm.ROW_KEYS) <= set(row) else None  # else an older format: redo


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every recipe (skipping ones already finished in ``workdir``); returns the metrics.

  Raises ``wd.ConfigError`` (a ValueError) before anything is loaded or written when the
  config is invalid (:func:`validate_config`) or differs from ``workdir/config.json``
  (``wd.ConfigChangedError``; ``config.allow_config_change=True`` continues anyway).
  """
  validate_config(config)
  workdir = wd.as_path(workdir)
  changed = wd.check_config(config, workdir, ignore=IGNORED_CONFIG_FIELDS)
  (workdir / "results").mkdir(parents=True, exist_ok=True)
  wd.write_config(config, workdir)
  recipes = tuple(config.recipes)
  m = minilm.load(config.model_dir)
  sentences = minilm.eval_sentences(config.num_sentences)
  mesh = make_mesh(config)
  sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
  finished = {name: row for name in recipes if (row := finished_row(workdir, name)) is not None}
  devices = wd.device_info()
  events = wd.EventLog(workdir / "tensorboard")
  if changed:
    events.text("config_change", "\n".join(f"* {c}" for c in changed), 0)
  if changed or not events.has("config"):
    events.config(config, [f"{r}/cos_mean" for r in recipes],
                  extra={"device_count": devices["device_count"]})
  if not events.has("run/device_count"):
    events.scalar("run/device_count", devices["device_count"], 0)
  print(f"devices: {devices['device_count']} x {devices['device_kind']}")

  def on_result(name, params, row):
    for key in SCALAR_KEYS:
      if not events.has(f"{name}/{key}"):  # one point per recipe, whatever its position later
        events.scalar(f"{name}/{key}", row[key], recipes.index(name))
    if not minilm.is_saved(workdir / "compressed", name):
      minilm.save_params(workdir / "compressed", name, params)
    (workdir / "results" / f"{name}.json").write_text(json.dumps(row))

  try:
    rows = minilm.evaluate_recipes(
        m,
        sentences,
        recipes,
        batch_size=config.batch_size,
        multiple_of=config.pad_multiple,
        top_k=config.top_k,
        progress=config.progress_bar,
        sharding=sharding,
        finished=finished,
        on_result=on_result,
    )
  finally:
    events.close()
  metrics = {"num_sentences": len(sentences), "top_k": config.top_k, "recipes": rows}
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
  _plots.pareto_plot(rows, x="param_bytes", y="cos_mean", label="recipe",
                     path=workdir / "pareto.png",
                     title=f"all-MiniLM-L6-v2 PTQ, {len(sentences)} sentences",
                     xlabel="weight bytes (embeddings included)",
                     ylabel="mean cosine to fp32 embeddings")
  print(minilm.format_table(rows, config.top_k))
  return metrics
