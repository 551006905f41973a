"""Trains and evaluates the All Convolutional Nets.

  python main.py --config=configs/all_cnn_c.py --workdir=/tmp/allconv/all_cnn_c \
      --config.optimizer.learning_rate=0.05
  python main.py --config=configs/all_cnn_c.py --summary
  python main.py --config=configs/all_cnn_c.py --workdir=/shared/run --distributed \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # and =1 on host1
"""

import os
import signal
import sys


def _exit_now(signum: int, _: object) -> None:
  """SIGINT/SIGTERM outside the training loop: nothing to save; exit 130 at once (an exception
  raised inside a C++ import or compilation could crash the interpreter instead)."""
  os.write(2, b"interrupted: stopped outside the training loop (any checkpoint is kept); run "
           b"the same command again, without --config.restart=True, to resume\n")
  os._exit(130)


signal.signal(signal.SIGINT, _exit_now)
signal.signal(signal.SIGTERM, _exit_now)

from absl import app, flags  # noqa: E402 - after the handlers: imports take seconds
from ml_collections import config_flags  # noqa: E402

from allconv_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for metrics, checkpoints and results.")
flags.DEFINE_bool("summary", False, "Print the network's layer table and parameter count, then "
                  "exit (no data, no training).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (one process "
                  "per host, launched by your cluster tooling).")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                    "(default: detected from the cluster environment).")
flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 first.",
                     lower_bound=0)


def main(argv: list[str]) -> None:
  cli.start(argv[1:])
  from allconv_jax import config_lib, input_pipeline, models, train

  config = cli.load_config(FLAGS.config)
  try:
    with cli.user_errors():
      if FLAGS.summary:
        config_lib.validate(config)
        model = models.create_model(config.model, input_pipeline.num_classes(config.data))
        print(models.summary(model))
        return
      if not FLAGS.workdir:
        cli.fail("--workdir is required (or --summary)")
      explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
      if any(v is not None for v in explicit) and not FLAGS.distributed:
        cli.fail("--coordinator_address, --num_processes and --process_id need --distributed")
      if FLAGS.distributed:
        import jax
        jax.distributed.initialize(*explicit)
      train.train_and_evaluate(config, FLAGS.workdir)
  except train.Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(130)

if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_config_flags)
