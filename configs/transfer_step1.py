r"""Transfer step 1: a CIFAR-10 All-CNN-C backbone, frozen, with a new class layer for a subset.

The course project's Table 4, step 1: restore the newest checkpoint of a CIFAR-10 All-CNN-C run
(`transfer.source`; `transfer.checkpoint=best` for its best one), keep every layer but the class
layer, add a new 1x1 class convolution for the 10-class CIFAR-100 subset and train only that
(`optimizer.freeze` matches every backbone parameter). The source run's preprocessing is reused.

  python main.py --config=configs/transfer_step1.py --workdir=/tmp/allconv/class1_step1 \
      --config.transfer.source=/tmp/allconv/all_cnn_c --config.data.subset=class1
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """Step 1: frozen CIFAR-10 backbone, new class layer, 50 epochs on a CIFAR-100 subset."""
  config = default_config()
  config.model.name = "all_cnn_c"
  config.num_epochs = 50
  config.data.dataset = "cifar100"
  config.data.subset = "class1"
  config.data.validation_size = 500
  config.optimizer.boundaries = ()
  config.optimizer.freeze = "backbone/"
  config.transfer.source = "/tmp/allconv/all_cnn_c"
  config.transfer.new_classifier = True
  return config
