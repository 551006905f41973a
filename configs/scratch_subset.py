r"""The baseline of the transfer study: All-CNN-C from scratch on a 10-class CIFAR-100 subset.

  python main.py --config=configs/scratch_subset.py --workdir=/tmp/allconv/class1_scratch \
      --config.data.subset=class1
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """All-CNN-C, the paper's 350-epoch protocol, on subset class1 (or class2) of CIFAR-100."""
  config = default_config()
  config.model.name = "all_cnn_c"
  config.data.dataset = "cifar100"
  config.data.subset = "class1"
  config.data.validation_size = 500
  return config
