"""All-CNN-C on CIFAR-100 (100 fine classes; the paper reports 33.71 % test error).

  python main.py --config=configs/cifar100_all_cnn_c.py --workdir=/tmp/allconv/cifar100_all_cnn_c
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """All-CNN-C with the paper's protocol on CIFAR-100."""
  config = default_config()
  config.model.name = "all_cnn_c"
  config.data.dataset = "cifar100"
  return config
