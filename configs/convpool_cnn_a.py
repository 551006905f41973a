"""ConvPool-CNN-A on CIFAR-10 (an extra 3x3 convolution before each pool).

  python main.py --config=configs/convpool_cnn_a.py --workdir=/tmp/allconv/convpool_cnn_a

CIFAR-100: add --config.data.dataset=cifar100. Layer list: `python main.py
--config=configs/convpool_cnn_a.py --summary`.
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """ConvPool-CNN-A with the paper's protocol (configs/default.py)."""
  config = default_config()
  config.model.name = "convpool_cnn_a"
  return config
