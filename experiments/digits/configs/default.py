"""Default digits recipe: train dense, prune gradually to 90%, fine-tune, then compress.

Override any field from the command line, e.g. ``--config.prune.final_sparsity=0.95``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 128
  config.learning_rate = 1e-3
  # Steps 0..dense_steps-1 train dense; pruning then runs over prune_steps (cubic
  # schedule of Zhu & Gupta 2017, masks in the optax state), then finetune_steps with
  # the final masks fixed.
  config.dense_steps = 1000
  config.prune_steps = 1000
  config.finetune_steps = 1000
  config.prune = ml_collections.ConfigDict()
  config.prune.final_sparsity = 0.9
  config.prune.update_every = 50
  config.prune.scope = "global"
  # Compressed variants evaluated at the end (the Pareto plot's points). "dense_*" use the
  # weights saved at the end of the dense phase, "pruned_*" the final sparse weights.
  config.recipes = ("dense_fp32", "dense_int8", "dense_int4", "pruned_fp32", "pruned_int8",
                    "pruned_int4")
  config.log_every = 50  # train/loss, train/sparsity, train/steps_per_sec
  config.eval_every = 100  # held-out accuracy of the training params (eval/accuracy)
  config.checkpoint_every = 250
  config.max_to_keep = 2
  config.progress_bar = True
  # A rerun in a workdir whose config.json differs (results-relevant fields; see
  # train.IGNORED_CONFIG_FIELDS) is refused unless this is True.
  config.allow_config_change = False
  # Data parallelism: None runs on one device; a dict of mesh axis sizes (-1: all remaining
  # devices) shards each batch over the 'data' axis and replicates the params.
  config.mesh = None
  return config
