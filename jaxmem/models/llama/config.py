"""The default config of the LLM main job (``python -m jaxmem.models.llama``).

Override a field on the command line, e.g. ``--config.recipes=fp32,int8_weight+kv8
--config.windows=8``, or pass another file with ``--config=path/to/file.py`` (a module whose
``get_config()`` returns a config with these fields; start from a copy of this one).

Fields:
  recipes: comma-separated recipe names, one table row each in this order (default: all of
    :data:`jaxmem.models.llama.recipes.RECIPES`); ``<weight recipe>+kv8`` runs that weight
    recipe with an int8 KV cache. fp32, the reference, is scored whether listed or not.
  windows: evaluation windows for perplexity, KL and top-1 (``benchmarks/llm.py`` uses 32).
  window_length: tokens per evaluation window.
  batch_size: windows per scoring call.
  prompt_len: prompt tokens of the prefill timing (the evaluation text's start).
  new_tokens: tokens decoded per recipe, for the decode speed and the greedy completion.
  repeats: interleaved timing rounds (their median is reported).
  kv_tokens: tokens of the KV cache whose bytes the table reports.
  save: save each compressed recipe's params in ``<workdir>/<recipe>/``.
  plot: write ``<workdir>/perplexity_vs_bytes.png``, perplexity against weight bytes with
    the Pareto front.
"""

import ml_collections

from jaxmem.models.llama.data import WINDOW_LENGTH
from jaxmem.models.llama.recipes import RECIPES


def get_config() -> ml_collections.ConfigDict:
  """The job's defaults: every recipe of RECIPES, 4 windows of 512 tokens, 32 new tokens."""
  config = ml_collections.ConfigDict()
  # Comma-separated recipe names; '<weight recipe>+kv8' adds an int8 KV cache.
  config.recipes = ",".join(RECIPES)
  # Evaluation windows for perplexity, KL divergence and top-1 agreement.
  config.windows = 4
  # Tokens per evaluation window.
  config.window_length = WINDOW_LENGTH
  # Windows per scoring call.
  config.batch_size = 4
  # Prompt tokens of the prefill timing.
  config.prompt_len = 128
  # Tokens decoded per recipe (decode speed and the greedy completion).
  config.new_tokens = 32
  # Interleaved timing rounds (median).
  config.repeats = 3
  # KV cache length whose bytes the table reports.
  config.kv_tokens = 2048
  # Save each compressed recipe with jaxmem.CheckpointManager in <workdir>/<recipe>/.
  config.save = True
  # Write <workdir>/perplexity_vs_bytes.png.
  config.plot = True
  return config
