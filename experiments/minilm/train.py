"""MiniLM post-training quantization as a configurable experiment.

Loads all-MiniLM-L6-v2 (:mod:`jaxmem.models.bert`), builds each recipe of
``config.recipes`` with jaxmem param transforms, embeds the evaluation sentences
(:func:`jaxmem.models.minilm.eval_sentences`, real text) and compares every recipe with
fp32: weight bytes, cosine of the sentence embeddings (mean, min), top-k retrieval
agreement and sentences/s. There is no training step: PTQ works on the pretrained
weights. ``workdir`` then holds::

  compressed/<i>/     recipe i's compressed params (jaxmem.CheckpointManager, step = index)
  results/<name>.json one result per finished recipe (a rerun skips finished recipes)
  tensorboard/        event files (per-recipe scalars, step = recipe index)
  metrics.json        the table as JSON
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem.models import bert, minilm


def make_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
  """A device mesh from ``config.mesh`` ({axis: size}, one size may be -1), or None."""
  if config.mesh is None:
    return None
  return jaxmem.mesh_from_axes(dict(config.mesh), batch_size=config.batch_size)


def embed(model, params, batches, sharding=None, progress=None) -> tuple[np.ndarray, float]:
  """Sentence embeddings of all batches and the sentences/s of the (compiled) run."""
  fn = jax.jit(
      lambda p, ids, mask: jaxmem.apply(model, {"params": p}, ids, mask).sentence_embedding
  )
  put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
  for b, _ in batches:  # compile every padded shape first, so timing excludes compilation
    fn(params, put(b.input_ids), put(b.attention_mask)).block_until_ready()
  out, n = [], 0
  start = time.perf_counter()
  for b, rows in batches:
    e = fn(params, put(b.input_ids), put(b.attention_mask))
    out.append(np.asarray(e)[:rows])
    n += rows
    if progress is not None:
      progress.update(rows)
  elapsed = time.perf_counter() - start
  return np.concatenate(out), n / elapsed


def topk_agreement(ref: np.ndarray, emb: np.ndarray, k: int) -> float:
  """Mean overlap of each sentence's k nearest neighbours (cosine, self excluded)."""
  k = min(k, len(ref) - 1)

  def neighbours(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k]

  a, b = neighbours(ref), neighbours(emb)
  return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every recipe (skipping ones already finished in ``workdir``); returns the metrics."""
  from tensorboardX import SummaryWriter
  from tqdm import tqdm

  workdir = pathlib.Path(workdir)
  (workdir / "results").mkdir(parents=True, exist_ok=True)
  model_dir = config.model_dir
  if model_dir is None:
    model_dir = minilm.model_dir()
  cfg, params = bert.load_params(model_dir)
  params = jax.tree.map(jnp.asarray, params)
  model = bert.BertModel(cfg)
  tokenizer = bert.load_tokenizer(model_dir)
  sentences = minilm.eval_sentences(config.num_sentences)
  batches = []
  for i in range(0, len(sentences), config.batch_size):
    chunk = sentences[i : i + config.batch_size]
    b = bert.tokenize(tokenizer, chunk, multiple_of=config.pad_multiple,
                      batch_rows=config.batch_size)
    batches.append((b, len(chunk)))

  mesh = make_mesh(config)
  sharding = NamedSharding(mesh, P("data")) if mesh is not None else None
  replicated = NamedSharding(mesh, P()) if mesh is not None else None
  writer = SummaryWriter(str(workdir / "tensorboard"))
  fp32_bytes = jaxmem.tree_bytes(params)
  ref = None
  rows = []
  mgr = jaxmem.CheckpointManager(workdir / "compressed", max_to_keep=None)
  for i, name in enumerate(config.recipes):
    result_file = workdir / "results" / f"{name}.json"
    if result_file.exists() and i in mgr.all_steps() and name != "fp32":
      rows.append(json.loads(result_file.read_text()))  # finished by an earlier run
      continue
    tx = minilm.recipe(name)
    cparams = params if tx is None else jaxmem.transform(tx, params)
    if replicated is not None:
      cparams = jax.device_put(cparams, replicated)
    bar = tqdm(total=len(sentences), desc=name, disable=not config.progress_bar)
    emb, speed = embed(model, cparams, batches, sharding, bar)
    bar.close()
    if ref is None:
      ref_params = params if replicated is None else jax.device_put(params, replicated)
      ref = emb if name == "fp32" else embed(model, ref_params, batches, sharding)[0]
    cos = np.sum(ref * emb, axis=1) / (
        np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1)
    )
    nbytes = jaxmem.tree_bytes(cparams)
    row = {
        "recipe": name,
        "param_bytes": nbytes,
        "ratio": nbytes / fp32_bytes,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        f"top{config.top_k}_agreement": topk_agreement(ref, emb, config.top_k),
        "sent_per_s": speed,
    }
    rows.append(row)
    for key in ("param_bytes", "ratio", "cos_mean", "cos_min", "sent_per_s"):
      writer.add_scalar(f"{name}/{key}", row[key], i)
    if i not in mgr.all_steps():
      mgr.save(i, {"recipe": name, "params": cparams}, force=True)
    mgr.wait_until_finished()
    result_file.write_text(json.dumps(row))
  mgr.close()
  writer.close()
  metrics = {"num_sentences": len(sentences), "recipes": rows}
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
  k = f"top{config.top_k}_agreement"
  print(f"{'recipe':<14} {'bytes':>12} {'ratio':>6} {'cos_mean':>9} {'cos_min':>8} "
        f"{k:>15} {'sent/s':>8}")
  for r in rows:
    print(f"{r['recipe']:<14} {r['param_bytes']:>12,} {r['ratio']:>6.3f} {r['cos_mean']:>9.5f} "
          f"{r['cos_min']:>8.5f} {r[k]:>15.3f} {r['sent_per_s']:>8.1f}")
  return metrics
