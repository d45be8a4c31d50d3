"""Entry point of the digits experiment (flax-examples layout).

  python experiments/digits/main.py --workdir=/tmp/digits \
      --config=experiments/digits/configs/default.py --config.prune.final_sparsity=0.95

Rerunning with the same --workdir resumes; a changed config is refused (the changed fields
are listed) unless --config.allow_config_change=True.
"""

import sys

import train
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, metrics.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.wd.ConfigError as e:  # refused before anything ran: the message alone
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
