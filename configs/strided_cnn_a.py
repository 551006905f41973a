"""Strided-CNN-A on CIFAR-10 (the pools removed, the convolution before each given stride 2).

  python main.py --config=configs/strided_cnn_a.py --workdir=/tmp/allconv/strided_cnn_a

CIFAR-100: add --config.data.dataset=cifar100. Layer list: `python main.py
--config=configs/strided_cnn_a.py --summary`.
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """Strided-CNN-A with the paper's protocol (configs/default.py)."""
  config = default_config()
  config.model.name = "strided_cnn_a"
  return config
