r"""The MiniLM main job (the README's): compress, evaluate, save each recipe's params.

  python -m jaxmem.models.minilm --workdir=/tmp/minilm
  python -m jaxmem.models.minilm --workdir=/tmp/minilm --config.num_sentences=64 \
      --config.recipes=fp32,int8_dynamic

Loads all-MiniLM-L6-v2, compresses it with each recipe through jaxmem's param transforms,
embeds the evaluation sentences, prints a table (bytes, ratio to fp32, cosine to fp32, top-10
retrieval agreement, sentences/s) and saves each compressed parameter tree with
jaxmem.CheckpointManager in <workdir>/<recipe>/ (jaxmem.models.minilm.save_params), then
restores it to check; <workdir>/config.json records the config the job ran with.

Flags: --workdir (required) and --config, a Python file whose get_config() returns the
config (default: jaxmem/models/minilm/config.py); --config.<field>=<value> overrides one
field. The fields (see jaxmem.models.minilm.config):
  num_sentences (512): evaluation sentences embedded by every recipe.
  batch_size (32): sentences per embedding call.
  recipes ('fp32,int8_weight,int8_dynamic,int4_g64'): comma-separated recipe names.
  sensitivity (False): also run the W8A8 sensitivity pass on calibration sentences.
  progress (True): a progress bar per recipe.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax

import jaxmem
from jaxmem.models import _cli, _workdir
from jaxmem.models.minilm import config as _config
from jaxmem.models.minilm.data import calibration_sentences, eval_sentences
from jaxmem.models.minilm.evaluate import evaluate_recipes, format_table, sensitivity
from jaxmem.models.minilm.loader import load
from jaxmem.models.minilm.recipes import recipe, restore_params, save_params

PROG = "python -m jaxmem.models.minilm"
_FLAGS = dict(
    config_module=_config,
    workdir_help="Directory the job writes: config.json and one jaxmem.CheckpointManager "
    "directory <recipe>/ per compressed recipe (created if missing).",
)


def recipe_names(config) -> list[str]:
  """The config's recipe list, checked (before the slow part).

  Raises:
    ValueError: an unknown recipe (the message lists the known ones), no recipe, or a
      count below 1.
  """
  _cli.check_config(config, _config)
  if config.num_sentences < 1 or config.batch_size < 1:
    raise ValueError("--config.num_sentences and --config.batch_size must be >= 1.")
  names = _cli.recipe_list(config.recipes)
  for r in names:
    recipe(r)  # an unknown name fails before the slow part, listing the known ones
  return names


def run(workdir: str | pathlib.Path, config) -> list[dict[str, Any]]:
  """Runs the job on a parsed config (fields: :mod:`jaxmem.models.minilm.config`)."""
  names = recipe_names(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _workdir.write_config(config, workdir)
  m = load()
  print(
    f"all-MiniLM-L6-v2: {jaxmem.tree_bytes(m.params):,} fp32 weight bytes; "
    f"{config.num_sentences} sentences, batch {config.batch_size}; "
    f"{jax.devices()[0].device_kind}"
  )
  if config.sensitivity:
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
    eval_sentences(config.num_sentences),
    names,
    batch_size=config.batch_size,
    progress=config.progress,
    on_result=save,
  )
  print(format_table(rows))
  for name, path in saved.items():
    restored = restore_params(workdir, name)
    print(f"saved {name}: {path} ({jaxmem.tree_bytes(restored):,} bytes restored)")
  return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs the job with command-line ``argv`` (default ``sys.argv[1:]``; absl flags, parsed
  by a :class:`absl.flags.FlagValues` of this call's own); returns the table's rows.

  Raises:
    absl.flags.Error: a bad flag or config override, or no ``--workdir``.
    ValueError: an unknown recipe (the message lists the known ones), before the model loads.

  Example (fp32 alone: nothing to save):
    >>> import contextlib, io, json, pathlib, tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> with contextlib.redirect_stdout(io.StringIO()) as out:
    ...   rows = main([f'--workdir={workdir}', '--config.num_sentences=4',
    ...                '--config.batch_size=4', '--config.recipes=fp32', '--config.progress=False'])
    >>> rows[0]['recipe'], rows[0]['cos_min'] > 0.99999, 'top-10 agree' in out.getvalue()
    ('fp32', True, True)
    >>> json.loads((pathlib.Path(workdir) / 'config.json').read_text())['num_sentences']
    4
  """
  fv = _cli.parse(argv, PROG, **_FLAGS)
  return run(fv.workdir, fv.config)


if __name__ == "__main__":
  _cli.run_app(_cli.app_main(recipe_names, run), module_name=sys.argv[0], **_FLAGS)
