r"""Trains and evaluates the All Convolutional Nets.

  python main.py --config=configs/all_cnn_c.py --workdir=/tmp/allconv/all_cnn_c \
      --config.optimizer.learning_rate=0.05
  python main.py --config=configs/all_cnn_c.py --summary
  python main.py --config=configs/all_cnn_c.py --workdir=/shared/run --distributed \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # and =1 on host1

The flags and the program are in allconv_jax/launch.py (also the `allconv-train` command).
"""

import os
import signal


def _exit_now(signum: int, _: object) -> None:
  """A signal while the imports below run (seconds): exit 130 at once, cleanly."""
  os.write(2, b"interrupted: stopped outside the training loop (any checkpoint is kept); run "
           b"the same command again, without --config.restart=True, to resume\n")
  os._exit(130)


if __name__ == "__main__":
  signal.signal(signal.SIGINT, _exit_now)
  signal.signal(signal.SIGTERM, _exit_now)
  from allconv_jax import launch

  launch.run()
