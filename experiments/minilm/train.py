"""MiniLM post-training quantization as a configurable experiment.

Loads all-MiniLM-L6-v2 (:func:`jaxmem.models.minilm.load`), builds each recipe of
``config.recipes`` (:func:`jaxmem.models.minilm.recipe`) and evaluates it against fp32 with
the MiniLM evaluation (:func:`jaxmem.models.minilm.evaluate_recipes`, the same batching,
timing, cosine and top-k agreement as ``python -m jaxmem.models.minilm``) on the evaluation
sentences (real text). There is no training step: PTQ works on the pretrained weights.
``workdir`` then holds::

  compressed/<name>/  recipe <name>'s compressed params (jaxmem.CheckpointManager,
                      :func:`jaxmem.models.minilm.save_params`)
  results/<name>.json one result per finished recipe (a rerun skips finished recipes)
  tensorboard/        event files (per-recipe scalars, step = the recipe's position)
  metrics.json        the table as JSON

Everything is keyed by recipe name, so a rerun with the recipes reordered, added or removed
reuses each finished recipe's own result and checkpoint.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem.models import minilm


def make_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
  """A device mesh from ``config.mesh`` ({axis: size}, one size may be -1), or None."""
  if config.mesh is None:
    return None
  return jaxmem.distributed.mesh_from_axes(dict(config.mesh), batch_size=config.batch_size)


def finished_row(workdir: pathlib.Path, name: str) -> dict[str, Any] | None:
  """The saved result of recipe ``name`` if both it and its checkpoint exist, else None."""
  result_file = workdir / "results" / f"{name}.json"
  if not result_file.exists() or not minilm.is_saved(workdir / "compressed", name):
    return None
  row = json.loads(result_file.read_text())
  return row if set(minilm.ROW_KEYS) <= set(row) else None  # else an older format: redo


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every recipe (skipping ones already finished in ``workdir``); returns the metrics."""
  from tensorboardX import SummaryWriter

  workdir = pathlib.Path(workdir)
  (workdir / "results").mkdir(parents=True, exist_ok=True)
  recipes = tuple(config.recipes)
  for name in recipes:
    minilm.recipe(name)  # unknown names fail before the slow part
  m = minilm.load(config.model_dir)
  sentences = minilm.eval_sentences(config.num_sentences)
  mesh = make_mesh(config)
  sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
  finished = {name: row for name in recipes if (row := finished_row(workdir, name)) is not None}
  writer = SummaryWriter(str(workdir / "tensorboard"))

  def on_result(name, params, row):
    for key in ("param_bytes", "ratio", "cos_mean", "cos_min", "topk_agreement", "sent_per_s"):
      writer.add_scalar(f"{name}/{key}", row[key], recipes.index(name))
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
    writer.close()
  metrics = {"num_sentences": len(sentences), "top_k": config.top_k, "recipes": rows}
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
  print(minilm.format_table(rows, config.top_k))
  return metrics
