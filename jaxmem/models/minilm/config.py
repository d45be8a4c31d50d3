"""The default config of the MiniLM main job (``python -m jaxmem.models.minilm``).

Override a field on the command line, e.g. ``--config.num_sentences=64
--config.recipes=fp32,int8_dynamic``, or pass another file with ``--config=path/to/file.py``
(a module whose ``get_config()`` returns a config with these fields; start from a copy of
this one).

Fields:
  num_sentences: evaluation sentences embedded by every recipe (the first N of
    :func:`jaxmem.models.minilm.eval_sentences`).
  batch_size: sentences per embedding call.
  recipes: comma-separated recipe names, one table row each in this order (see
    :func:`jaxmem.models.minilm.recipe`); fp32, the reference, is embedded whether listed or
    not.
  sensitivity: also run the W8A8 sensitivity pass on 128 calibration sentences (which
    layer group, kept int8 weight-only, helps most).
  progress: show a progress bar per recipe.
"""

import ml_collections

from jaxmem.models.minilm.recipes import DEFAULT_RECIPES


def get_config() -> ml_collections.ConfigDict:
  """The job's defaults: 512 sentences, batch 32, the four default recipes."""
  config = ml_collections.ConfigDict()
  # Evaluation sentences embedded by every recipe (the first N of eval_sentences).
  config.num_sentences = 512
  # Sentences per embedding call.
  config.batch_size = 32
  # Comma-separated recipe names (jaxmem.models.minilm.recipes.RECIPES, or int4_g<size>).
  config.recipes = ",".join(DEFAULT_RECIPES)
  # Also run the W8A8 sensitivity pass on 128 calibration sentences.
  config.sensitivity = False
  # A progress bar per recipe.
  config.progress = True
  return config
