"""All-CNN-A on CIFAR-10 (each pool replaced by a 3x3 convolution with stride 2).

  python main.py --config=configs/all_cnn_a.py --workdir=/tmp/allconv/all_cnn_a

CIFAR-100: add --config.data.dataset=cifar100. Layer list: `python main.py
--config=configs/all_cnn_a.py --summary`.
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """All-CNN-A with the paper's protocol (configs/default.py)."""
  config = default_config()
  config.model.name = "all_cnn_a"
  return config
