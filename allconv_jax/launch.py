r"""The training program behind main.py and the `allconv-train` command: flags, then
`train.train_and_evaluate(config, workdir)`.

  allconv-train --config=configs/all_cnn_c.py --workdir=/tmp/allconv/all_cnn_c \
      --config.optimizer.learning_rate=0.05
  allconv-train --config=configs/all_cnn_c.py --summary
"""

import signal
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from allconv_jax import cli, cpu, input_pipeline, models, train
from allconv_jax.config import validate
from allconv_jax.errors import exit_now

FLAGS = flags.FLAGS


def define_flags() -> None:
  """main.py's flags (defined only when run as a program)."""
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
  """Checks the flags, then trains (or prints the layer table with --summary)."""
  cli.start(argv[1:])
  config = cli.load_config(FLAGS.config)
  with cli.interruptions(train.Interrupted):
    with cli.user_errors():
      if FLAGS.summary:
        validate(config)
        model = models.create_model(config.model, input_pipeline.num_classes(config.data),
                                    cpu.Convolutions())  # the layer table is the same for all
        print(models.summary(model))
        return
      if not FLAGS.workdir:
        cli.fail("--workdir is required (or --summary)")
      explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
      if any(v is not None for v in explicit) and not FLAGS.distributed:
        cli.fail("--coordinator_address, --num_processes and --process_id need --distributed")
      if FLAGS.distributed:
        jax.distributed.initialize(*explicit)
      train.train_and_evaluate(config, FLAGS.workdir)


def run() -> None:
  """The program: flags, then main (the `allconv-train` command)."""
  signal.signal(signal.SIGINT, exit_now)
  signal.signal(signal.SIGTERM, exit_now)
  define_flags()
  cli.program_help(__doc__)
  app.run(main, argv=cli.resolve_config_flag(sys.argv), flags_parser=cli.parse_config_flags)


if __name__ == "__main__":  # what the sweep and the study run: `python -m allconv_jax.launch`
  run()
