"""Trains and evaluates the All Convolutional Nets.

  python main.py --config=configs/all_cnn_c.py --workdir=/tmp/allconv/all_cnn_c \
      --config.optimizer.learning_rate=0.05
  python main.py --config=configs/all_cnn_c.py --summary
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for metrics, checkpoints and results.")
flags.DEFINE_bool("summary", False, "Print the network's layer table and parameter count, then "
                  "exit (no data, no training).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (one process "
                  "per host, launched by your cluster tooling).")


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (also for unknown --config.* overrides)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except Exception as e:  # noqa: BLE001 - ml_collections raises plain errors for bad overrides
    from allconv_jax import config_lib
    from configs import default

    known = dict(config_lib.flatten(default.get_config()))
    for arg in argv[1:]:
      key = arg.split("=", 1)[0].removeprefix("--config.")
      if arg.startswith("--config.") and key not in known:
        _fail(f"unknown config key {key!r} in {arg}; see README.md, 'Config keys'")
    _fail(f"could not parse the flags: {type(e).__name__}: {e}")
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    _fail("--config is required, e.g. --config=configs/all_cnn_c.py")
  from allconv_jax import config_lib, input_pipeline, models, train
  from allconv_jax.errors import UserError

  logging.set_verbosity(logging.WARNING)
  try:
    config = FLAGS.config
    config.get("model")
  except Exception as e:  # noqa: BLE001 - config_flags defers load errors until first access
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f"could not load the config file: {lines[-1] if lines else type(e).__name__}")
  try:
    if FLAGS.summary:
      config_lib.validate(config)
      model = models.create_model(config.model, input_pipeline.num_classes(config.data))
      print(models.summary(model))
      return
    if not FLAGS.workdir:
      _fail("--workdir is required (or --summary)")
    if FLAGS.distributed:
      import jax
      jax.distributed.initialize()
    train.train_and_evaluate(config, FLAGS.workdir)
  except UserError as e:
    _fail(str(e))
  except train.Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
