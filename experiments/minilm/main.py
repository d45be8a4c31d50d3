"""Entry point of the MiniLM PTQ experiment (flax-examples layout).

  python experiments/minilm/main.py --workdir=/tmp/minilm \
      --config=experiments/minilm/configs/default.py --config.num_sentences=256

Rerunning with the same --workdir skips finished recipes; a change of another field than
recipes/progress_bar is refused unless --config.allow_config_change=True.
"""

import sys

import train
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, metrics.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.", lock_config=True)
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
