"""Model C on CIFAR-10 (the base net: each stage ends in 3x3 max-pooling with stride 2).

  python main.py --config=configs/model_c.py --workdir=/tmp/allconv/model_c

CIFAR-100: add --config.data.dataset=cifar100. Layer list: `python main.py
--config=configs/model_c.py --summary`.
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """Model C with the paper's protocol (configs/default.py)."""
  config = default_config()
  config.model.name = "model_c"
  return config
