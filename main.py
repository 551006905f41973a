r"""Trains and evaluates the All Convolutional Nets.

  python main.py --config=configs/all_cnn_c.py --workdir=/tmp/allconv/all_cnn_c \
      --config.optimizer.learning_rate=0.05
  python main.py --config=configs/all_cnn_c.py --summary
  python main.py --config=configs/all_cnn_c.py --workdir=/shared/run --distributed \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # and =1 on host1

The flags and the program are in allconv_jax/launch.py (also the `allconv-train` command).
"""

import signal

from allconv_jax.errors import exit_now  # standard library only: in place before the imports

if __name__ == "__main__":
  signal.signal(signal.SIGINT, exit_now)
  signal.signal(signal.SIGTERM, exit_now)
  from allconv_jax import launch

  launch.run()
