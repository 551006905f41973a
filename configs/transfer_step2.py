r"""Transfer step 2: fine-tune every layer of a step-1 run (configs/transfer_step1.py).

  python main.py --config=configs/transfer_step2.py --workdir=/tmp/allconv/class1_step2 \
      --config.transfer.source=/tmp/allconv/class1_step1 --config.data.subset=class1
"""

import ml_collections

from configs import transfer_step1


def get_config() -> ml_collections.ConfigDict:
  """Step 2: all layers trainable, starting from a step-1 run's newest checkpoint."""
  config = transfer_step1.get_config()
  config.optimizer.freeze = ""
  config.transfer.source = "/tmp/allconv/class1_step1"
  config.transfer.new_classifier = False
  return config
