r"""Transfer step 2: fine-tune every layer of a step-1 run (configs/transfer_step1.py).

  python main.py --config=configs/transfer_step2.py --workdir=/tmp/allconv/class1_step2 \
      --config.transfer.source=/tmp/allconv/class1_step1 --config.data.subset=class1

The same settings as step 1, with nothing frozen and the source's class layer kept.
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """Step 2: all layers trainable, starting from a step-1 run's newest checkpoint."""
  config = default_config()
  config.model.name = "all_cnn_c"
  config.num_epochs = 50
  config.data.dataset = "cifar100"
  config.data.subset = "class1"
  config.data.validation_size = 500
  config.optimizer.boundaries = ()
  config.transfer.source = "/tmp/allconv/class1_step1"
  config.transfer.new_classifier = False
  return config
