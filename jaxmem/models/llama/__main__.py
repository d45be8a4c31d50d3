"""The LLM main job: compress SmolLM2-135M, evaluate each recipe, save its params.

  python -m jaxmem.models.llama --workdir /tmp/smollm2

Loads SmolLM2-135M-Instruct from its GGUF file (the dequantized fp32 tree, once), builds
each recipe (:mod:`jaxmem.models.llama.recipes`), and prints one table
(:func:`jaxmem.models.llama.evaluate.format_table`): weight bytes and ratio to fp32, KV
cache bytes at 2048 tokens, perplexity on ``--windows`` evaluation windows of 512 tokens
and its difference to fp32, mean KL(fp32 || recipe) and top-1 agreement of the next-token
distributions on the same positions, and batch-1 prefill (128-token prompt) and decode
(``--new-tokens`` tokens) tokens/s, measured interleaved. Then it prints one greedy
completion of a fixed prompt per recipe and saves each compressed tree with
:class:`jaxmem.CheckpointManager` in ``<workdir>/<recipe>/`` (:func:`save_params`),
restoring it to check. fp32 is not saved: it is the file's own dequantization.

This is a short evaluation (default 4 windows, 2,044 scored tokens); ``benchmarks/llm.py``
runs the full one (32 windows, batch 1 and 8).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxmem
from jaxmem._src import qdot  # cpu_summary: the CPU line under the table
from jaxmem.models import _recipe_checkpoints as _ckpt
from jaxmem.models.llama import evaluate
from jaxmem.models.llama.data import PROMPTS, WINDOW_LENGTH, windows
from jaxmem.models.llama.model import Llama, generate

PROMPT = PROMPTS[0]  # "The capital of France is": the completion every recipe prints


# ----------------------------------------------------------------------------- checkpoints


def save_params(workdir: str | os.PathLike, name: str, params: Any,
                kv_bits: int | None = None) -> pathlib.Path:
  """Saves recipe ``name``'s params in ``<workdir>/<name>/`` (a :class:`jaxmem.CheckpointManager`
  directory) and returns it; the step holds ``{'recipe': name, 'kv_bits': 0 | 8, 'params':
  params}`` (0: float cache). A later save of the same name replaces it; the save is
  finished when this returns.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((8, 4))})
    >>> workdir = tempfile.mkdtemp()
    >>> _ = save_params(workdir, 'int8_weight+kv8', q, kv_bits=8)
    >>> params, kv_bits = restore_params(workdir, 'int8_weight+kv8')
    >>> params['kernel'].qvalue.dtype, kv_bits
    (dtype('int8'), 8)
  """
  return _ckpt.save_recipe(workdir, name, {"kv_bits": int(kv_bits or 0), "params": params})


def restore_params(workdir: str | os.PathLike, name: str) -> tuple[Any, int | None]:
  """``(params, kv_bits)`` that :func:`save_params` wrote for recipe ``name``.

  Raises:
    FileNotFoundError: nothing was saved for ``name`` in ``workdir``.
    ValueError: the checkpoint there was saved for another recipe.
  """
  saved = _ckpt.restore_recipe(workdir, name)
  return saved["params"], (int(saved["kv_bits"]) or None)


# ----------------------------------------------------------------------------- the job


def _recipe_names(spec: str | None, build) -> list[str]:
  """The ``--recipes`` list, checked by the recipes module when it is the builder."""
  from jaxmem.models.llama import recipes as _recipes

  if spec is None:
    return list(_recipes.RECIPES)
  names = [r.strip() for r in spec.split(",") if r.strip()]
  if not names:
    raise ValueError("--recipes: no recipe named.")
  if build is None:
    for n in names:
      _recipes.parse(n)  # an unknown name fails before the slow part
  return names


def parser() -> argparse.ArgumentParser:
  """The job's command line."""
  p = argparse.ArgumentParser(
      prog="python -m jaxmem.models.llama",
      description="Compress SmolLM2-135M-Instruct with jaxmem recipes, compare each with fp32 "
      "(perplexity, next-token KL and top-1, speed, weight and KV cache bytes), print a greedy "
      "completion per recipe and save the compressed params with jaxmem.CheckpointManager.",
  )
  p.add_argument("--workdir", required=True, help="where <recipe>/ checkpoints are saved")
  p.add_argument("--recipes", default=None,
                 help="comma-separated recipe names (default: all of "
                 "jaxmem.models.llama.recipes.RECIPES); any '<weight recipe>+kv8' runs that "
                 "weight recipe with an int8 KV cache")
  p.add_argument("--windows", type=int, default=4,
                 help="evaluation windows of 512 tokens for perplexity, KL and top-1 (default 4; "
                 "benchmarks/llm.py uses 32)")
  p.add_argument("--new-tokens", type=int, default=32,
                 help="tokens decoded per recipe, for the decode speed and the completion")
  p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the prefill timing")
  p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
  p.add_argument("--batch-size", type=int, default=4, help="windows per scoring call")
  p.add_argument("--window-length", type=int, default=WINDOW_LENGTH, help=argparse.SUPPRESS)
  p.add_argument("--kv-tokens", type=int, default=2048, help=argparse.SUPPRESS)
  p.add_argument("--no-save", action="store_true", help="skip the checkpoints")
  return p


def main(argv: Sequence[str] | None = None, *,
         source: evaluate.Source | Callable[[], evaluate.Source] | None = None,
         build: Callable | None = None) -> list[dict[str, Any]]:
  """Runs the job with command-line ``argv``; returns the table's rows (each with its
  ``completion`` and ``checkpoint`` directory, or None for fp32).

  Args:
    argv: the command line (default ``sys.argv[1:]``).
    source: the model (a :class:`~jaxmem.models.llama.evaluate.Source` or a function
      making one); default :func:`~jaxmem.models.llama.evaluate.load_smollm2`.
    build: the recipe builder (default :func:`jaxmem.models.llama.recipes.build`; see
      :func:`jaxmem.models.llama.evaluate.build_recipes`).
  """
  args = parser().parse_args(argv)
  names = _recipe_names(args.recipes, build)
  if args.windows < 1 or args.new_tokens < 1 or args.prompt_len < 1:
    raise ValueError("--windows, --new-tokens and --prompt-len must be >= 1.")
  workdir = pathlib.Path(args.workdir)
  for name in names:
    _ckpt.recipe_dir(workdir, name)  # a bad directory name fails before the slow part
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  src = source if isinstance(source, evaluate.Source) else (source or evaluate.load_smollm2)()
  model = Llama(src.config)
  wins = np.asarray(windows(np.asarray(src.eval_ids), args.window_length, args.windows))
  print(f"{src.name}: {jaxmem.tree_bytes(src.params):,} fp32 weight bytes; {args.windows} "
        f"windows of {args.window_length} tokens; {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}; loaded in {time.perf_counter() - t0:.1f} s")

  def built(name, seconds):
    print(f"  built {name} in {seconds:.1f} s", flush=True)

  recipes = evaluate.build_recipes(
      names, src.params, config=src.config, model=model, path=src.path,
      calib_tokens=evaluate.calibration_windows(src.eval_ids, args.window_length), build=build,
      on_built=built)
  prompt_ids = np.asarray(src.eval_ids[:args.prompt_len], np.int32)[None]  # the text's start
  t1 = time.perf_counter()
  rows = evaluate.evaluate_recipes(
      model, src.params, recipes, wins, batch_size=args.batch_size, prompt_len=args.prompt_len,
      new_tokens=args.new_tokens, batch=1, repeats=args.repeats, kv_tokens=args.kv_tokens,
      prompt_ids=prompt_ids)
  print(f"  evaluated in {time.perf_counter() - t1:.1f} s")
  print(f"perplexity, KL, top-1: {wins.shape[0]} windows x {wins.shape[1] - 1} predicted tokens; "
        f"speed: batch 1, {args.prompt_len}-token prompt, {args.new_tokens} decoded tokens, "
        f"median of {args.repeats} interleaved rounds; KV bytes at {args.kv_tokens} tokens")
  print(qdot.cpu_summary())
  print(evaluate.format_table(rows))

  t1 = time.perf_counter()
  prompt = jnp.asarray([src.encode(PROMPT)], jnp.int32)
  print(f"greedy completions of {PROMPT!r} ({args.new_tokens} tokens):")
  for row in rows:
    params, kv_bits = recipes[row["recipe"]]
    out = generate(model, {"params": params}, prompt, args.new_tokens, kv_bits=kv_bits)
    row["completion"] = src.decode(np.asarray(out[0]).tolist())
    print(f"  {row['recipe']:<20} {row['completion']!r}")

  print(f"  generated in {time.perf_counter() - t1:.1f} s")
  t1 = time.perf_counter()
  for row in rows:
    row["checkpoint"] = None
    name = row["recipe"]
    if args.no_save or name.removesuffix(evaluate.KV8) == "fp32":
      continue
    params, kv_bits = recipes[name]
    path = save_params(workdir, name, params, kv_bits)
    restored, _ = restore_params(workdir, name)
    row["checkpoint"] = str(path)
    print(f"saved {name}: {path} ({jaxmem.tree_bytes(restored):,} bytes restored)")
  print(f"  saved in {time.perf_counter() - t1:.1f} s; total {time.perf_counter() - t0:.1f} s")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
