r"""The LLM main job: compress SmolLM2-135M, evaluate each recipe, save its params.

  python -m jaxmem.models.llama --workdir=/tmp/smollm2
  python -m jaxmem.models.llama --workdir=/tmp/smollm2 \
      --config.recipes=fp32,int8_weight,int8_weight+kv8 --config.windows=8

Loads SmolLM2-135M-Instruct from its GGUF file (the dequantized fp32 tree, once), builds
each recipe (jaxmem.models.llama.recipes), and prints one table
(jaxmem.models.llama.evaluate.format_table): weight bytes and ratio to fp32, KV cache bytes
at kv_tokens tokens, perplexity on `windows` evaluation windows of window_length tokens
and its difference to fp32, mean KL(fp32 || recipe) and top-1 agreement of the next-token
distributions on the same positions, and batch-1 prefill (a prompt_len-token prompt) and
decode (new_tokens tokens) tokens/s, measured interleaved. Then it prints one greedy completion of
a fixed prompt per recipe and saves each compressed tree with jaxmem.CheckpointManager in
<workdir>/<recipe>/ (save_params), restoring it to check. fp32 is not saved: it is the
file's own dequantization. <workdir>/perplexity_vs_bytes.png plots the table's perplexity
against weight bytes (the Pareto front dashed), and <workdir>/config.json records the
config the job ran with.

This is a short evaluation (default 4 windows, 2,044 scored tokens); benchmarks/llm.py
runs the full one (32 windows, batch 1 and 8).

Flags: --workdir (required) and --config, a Python file whose get_config() returns the
config (default: jaxmem/models/llama/config.py); --config.<field>=<value> overrides one
field. The fields (see jaxmem.models.llama.config):
  recipes (all of jaxmem.models.llama.recipes.RECIPES): comma-separated recipe names;
    '<weight recipe>+kv8' runs that weight recipe with an int8 KV cache.
  windows (4): evaluation windows for perplexity, KL and top-1.
  window_length (512): tokens per evaluation window.
  batch_size (4): windows per scoring call.
  prompt_len (128): prompt tokens of the prefill timing.
  new_tokens (32): tokens decoded per recipe (decode speed and the completion).
  repeats (3): interleaved timing rounds (median).
  kv_tokens (2048): the KV cache length whose bytes the table reports.
  save (True): save each compressed recipe's params in <workdir>/<recipe>/.
  plot (True): write <workdir>/perplexity_vs_bytes.png.
"""

from __future__ import annotations

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
from jaxmem.models import _cli, _workdir
from jaxmem.models import _recipe_checkpoints as _ckpt
from jaxmem.models.llama import config as _config
from jaxmem.models.llama import evaluate
from jaxmem.models.llama.data import PROMPTS, windows
from jaxmem.models.llama.model import Llama, generate

PROMPT = PROMPTS[0]  # "The capital of France is": the completion every recipe prints
PROG = "python -m jaxmem.models.llama"
PLOT = "perplexity_vs_bytes.png"
_FLAGS = dict(
    config_module=_config,
    workdir_help="Directory the job writes: config.json, perplexity_vs_bytes.png and one "
    "jaxmem.CheckpointManager directory <recipe>/ per compressed recipe (created if missing).",
)


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


def recipe_names(config, build: Callable | None = None) -> list[str]:
  """The config's recipe list, checked (before the slow part): by the recipes module when
  ``build`` is None (its builder), and as checkpoint directory names.

  Raises:
    ValueError: an unknown recipe (the message lists the known ones), no recipe, a name
      that cannot name a directory, or a count below 1.
  """
  from jaxmem.models.llama import recipes as _recipes

  _cli.check_config(config, _config)
  names = _cli.recipe_list(config.recipes)
  if build is None:
    for n in names:
      _recipes.parse(n)  # an unknown name fails before the slow part, listing the known ones
  for n in names:
    _ckpt.recipe_dir(".", n)  # a bad directory name fails before the slow part
  counts = ("windows", "window_length", "batch_size", "prompt_len", "new_tokens", "repeats",
            "kv_tokens")
  if any(config[k] < 1 for k in counts):
    raise ValueError(f"--config.{{{','.join(counts)}}} must be >= 1.")
  if config.window_length < 2:
    raise ValueError("--config.window_length must be >= 2 (a window predicts its tokens).")
  return names


def run(workdir: str | os.PathLike, config, *,
        source: evaluate.Source | Callable[[], evaluate.Source] | None = None,
        build: Callable | None = None) -> list[dict[str, Any]]:
  """Runs the job on a parsed config (fields: :mod:`jaxmem.models.llama.config`); ``source``
  and ``build`` as in :func:`main`."""
  names = recipe_names(config, build)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _workdir.write_config(config, workdir)
  c = config
  t0 = time.perf_counter()
  src = source if isinstance(source, evaluate.Source) else (source or evaluate.load_smollm2)()
  model = Llama(src.config)
  wins = np.asarray(windows(np.asarray(src.eval_ids), c.window_length, c.windows))
  print(f"{src.name}: {jaxmem.tree_bytes(src.params):,} fp32 weight bytes; {c.windows} "
        f"windows of {c.window_length} tokens; {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}; loaded in {time.perf_counter() - t0:.1f} s")

  def built(name, seconds):
    print(f"  built {name} in {seconds:.1f} s", flush=True)

  recipes = evaluate.build_recipes(
      names, src.params, config=src.config, model=model, path=src.path,
      calib_tokens=evaluate.calibration_windows(src.eval_ids, c.window_length), build=build,
      on_built=built)
  prompt_ids = np.asarray(src.eval_ids[:c.prompt_len], np.int32)[None]  # the text's start
  t1 = time.perf_counter()
  rows = evaluate.evaluate_recipes(
      model, src.params, recipes, wins, batch_size=c.batch_size, prompt_len=c.prompt_len,
      new_tokens=c.new_tokens, batch=1, repeats=c.repeats, kv_tokens=c.kv_tokens,
      prompt_ids=prompt_ids)
  print(f"  evaluated in {time.perf_counter() - t1:.1f} s")
  print(f"perplexity, KL, top-1: {wins.shape[0]} windows x {wins.shape[1] - 1} predicted tokens; "
        f"speed: batch 1, {c.prompt_len}-token prompt, {c.new_tokens} decoded tokens, "
        f"median of {c.repeats} interleaved rounds; KV bytes at {c.kv_tokens} tokens")
  print(jaxmem.ops.kernel_info().summary())
  print(evaluate.format_table(rows))
  if c.plot:
    from jaxmem.models import _plots

    path = workdir / PLOT
    _plots.pareto_plot(
        rows, x="weight_bytes", y="ppl", label="recipe", path=path,
        title=f"{src.name}: perplexity vs weight bytes", xlabel="weight bytes",
        ylabel=f"perplexity, {wins.shape[0]} x {wins.shape[1]} tokens (lower is better)",
        higher_is_better=False, logx=True)
    print(f"plot: {path}")

  t1 = time.perf_counter()
  prompt = jnp.asarray([src.encode(PROMPT)], jnp.int32)
  print(f"greedy completions of {PROMPT!r} ({c.new_tokens} tokens):")
  for row in rows:
    params, kv_bits = recipes[row["recipe"]]
    out = generate(model, {"params": params}, prompt, c.new_tokens, kv_bits=kv_bits)
    row["completion"] = src.decode(np.asarray(out[0]).tolist())
    print(f"  {row['recipe']:<20} {row['completion']!r}")

  print(f"  generated in {time.perf_counter() - t1:.1f} s")
  t1 = time.perf_counter()
  for row in rows:
    row["checkpoint"] = None
    name = row["recipe"]
    if not c.save or name.removesuffix(evaluate.KV8) == "fp32":
      continue
    params, kv_bits = recipes[name]
    path = save_params(workdir, name, params, kv_bits)
    restored, _ = restore_params(workdir, name)
    row["checkpoint"] = str(path)
    print(f"saved {name}: {path} ({jaxmem.tree_bytes(restored):,} bytes restored)")
  print(f"  saved in {time.perf_counter() - t1:.1f} s; total {time.perf_counter() - t0:.1f} s")
  return rows


def main(argv: Sequence[str] | None = None, *,
         source: evaluate.Source | Callable[[], evaluate.Source] | None = None,
         build: Callable | None = None) -> list[dict[str, Any]]:
  """Runs the job with command-line ``argv`` (absl flags, parsed by a
  :class:`absl.flags.FlagValues` of this call's own); returns the table's rows (each with
  its ``completion`` and ``checkpoint`` directory, or None for fp32).

  Args:
    argv: the command line without the program name (default ``sys.argv[1:]``), e.g.
      ``['--workdir=/tmp/smollm2', '--config.recipes=fp32,int8_weight']``.
    source: the model (a :class:`~jaxmem.models.llama.evaluate.Source` or a function
      making one); default :func:`~jaxmem.models.llama.evaluate.load_smollm2`.
    build: the recipe builder (default :func:`jaxmem.models.llama.recipes.build`; see
      :func:`jaxmem.models.llama.evaluate.build_recipes`).

  Raises:
    absl.flags.Error: a bad flag or config override, or no ``--workdir``.
    ValueError: an unknown recipe (the message lists the known ones), before the model loads.
  """
  fv = _cli.parse(argv, PROG, **_FLAGS)
  return run(fv.workdir, fv.config, source=source, build=build)


if __name__ == "__main__":
  _cli.run_app(_cli.app_main(recipe_names, run), module_name=sys.argv[0], **_FLAGS)
