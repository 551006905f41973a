"""Trains and evaluates the All Convolutional Nets.

  python main.py --config=configs/all_cnn_c.py --workdir=/tmp/allconv/all_cnn_c \
      --config.optimizer.learning_rate=0.05
  python main.py --config=configs/all_cnn_c.py --summary
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from allconv_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for metrics, checkpoints and results.")
flags.DEFINE_bool("summary", False, "Print the network's layer table and parameter count, then "
                  "exit (no data, no training).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (one process "
                  "per host, launched by your cluster tooling).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from allconv_jax import config_lib, input_pipeline, models, train
  from allconv_jax.errors import UserError

  logging.set_verbosity(logging.WARNING)
  config = cli.load_config(FLAGS.config)
  try:
    if FLAGS.summary:
      config_lib.validate(config)
      model = models.create_model(config.model, input_pipeline.num_classes(config.data))
      print(models.summary(model))
      return
    if not FLAGS.workdir:
      cli.fail("--workdir is required (or --summary)")
    if FLAGS.distributed:
      import jax
      jax.distributed.initialize()
    train.train_and_evaluate(config, FLAGS.workdir)
  except UserError as e:
    cli.fail(str(e))
  except train.Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(130)
  except KeyboardInterrupt:
    print("interrupted before training started or after it ended; run the same command again "
          "to resume", file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_config_flags)
