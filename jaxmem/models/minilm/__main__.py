"""The MiniLM main job (the README's): compress, evaluate, save each recipe's params.

  python -m jaxmem.models.minilm --workdir /tmp/minilm

Loads all-MiniLM-L6-v2, compresses it with each recipe through jaxmem's param transforms,
embeds the evaluation sentences, prints a table (bytes, ratio to fp32, cosine to fp32, top-10
retrieval agreement, sentences/s) and saves each compressed parameter tree with
:class:`jaxmem.CheckpointManager` in ``<workdir>/<recipe>/``
(:func:`jaxmem.models.minilm.save_params`), then restores it to check.

Example (fp32 alone: nothing to save):
  >>> import contextlib, io, tempfile
  >>> with contextlib.redirect_stdout(io.StringIO()) as out:
  ...   rows = main(['--workdir', tempfile.mkdtemp(), '--num-sentences', '4',
  ...                '--batch-size', '4', '--recipes', 'fp32', '--no-progress'])
  >>> rows[0]['recipe'], rows[0]['cos_min'] > 0.99999, 'top-10 agree' in out.getvalue()
  ('fp32', True, True)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax

import jaxmem
from jaxmem.models.minilm.data import calibration_sentences, eval_sentences
from jaxmem.models.minilm.evaluate import evaluate_recipes, format_table, sensitivity
from jaxmem.models.minilm.loader import load
from jaxmem.models.minilm.recipes import (
  DEFAULT_RECIPES,
  RECIPES,
  recipe,
  restore_params,
  save_params,
)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs the main job with command-line ``argv``; returns the table's rows."""
  parser = argparse.ArgumentParser(
    prog="python -m jaxmem.models.minilm",
    description="Compress all-MiniLM-L6-v2 with jaxmem recipes, compare them with fp32 on "
    "real sentences, and save the compressed params with jaxmem.CheckpointManager (Orbax).",
  )
  parser.add_argument("--workdir", required=True, help="where <recipe>/ checkpoints are saved")
  parser.add_argument("--num-sentences", type=int, default=512)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument(
    "--recipes",
    default=",".join(DEFAULT_RECIPES),
    help=f"comma-separated, from: {', '.join(RECIPES)}",
  )
  parser.add_argument(
    "--sensitivity",
    action="store_true",
    help="also run the W8A8 sensitivity pass on calibration sentences",
  )
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
  for r in recipes:
    recipe(r)  # unknown names fail before the slow part

  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  m = load()
  print(
    f"all-MiniLM-L6-v2: {jaxmem.tree_bytes(m.params):,} fp32 weight bytes; "
    f"{args.num_sentences} sentences, batch {args.batch_size}; {jax.devices()[0].device_kind}"
  )
  if args.sensitivity:
    sens = sensitivity(m, calibration_sentences(128))
    print("W8A8 sensitivity (calibration set; the named group kept int8 weight-only):")
    for r in sens:
      print(f"  {r['group']:<18} cos mean {r['cos_mean']:.5f}  min {r['cos_min']:.5f}")

  saved = {}

  def save(name, params, row):
    if name != "fp32":
      saved[name] = save_params(workdir, name, params)

  rows = evaluate_recipes(
    m,
    eval_sentences(args.num_sentences),
    recipes,
    batch_size=args.batch_size,
    progress=not args.no_progress,
    on_result=save,
  )
  print(format_table(rows))
  for name, path in saved.items():
    restored = restore_params(workdir, name)
    print(f"saved {name}: {path} ({jaxmem.tree_bytes(restored):,} bytes restored)")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
