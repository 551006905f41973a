r"""The paper's protocol as published (Springenberg et al., 2015, section 3.1), for any network.

  python main.py --config=configs/recipe_paper.py:all_cnn_c --workdir=/tmp/allconv/paper_all_cnn_c \
      --config.optimizer.learning_rate=0.05

The paper chose each network's rate from {0.25, 0.1, 0.05, 0.01} on validation data without
saying which won; pick it the same way (learning rates are this config's only unknown):

  python -m allconv_jax.tools.sweep --configs=all_cnn_c --learning_rates=0.25,0.1,0.05,0.01 \
      --root=/tmp/allconv/sweep

SGD, momentum 0.9, weight decay 0.001 (on every parameter, as Caffe), 350 epochs, rate x0.1 after
epochs 200, 250 and 300; dropout 20 % on the input and 50 % after each pool (or its
replacement); GCN + ZCA (pylearn2's recipe), no augmentation. The paper states neither batch
size nor initialization: batch 128 and He-normal weights with zero biases here. Paper: All-CNN-C
9.08 % test error (90.92 % accuracy); the other networks in allconv_jax/paper.py.
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config(network: str = "all_cnn_c") -> ml_collections.ConfigDict:
  """The paper's protocol for `network` (e.g. 'model_a', 'all_cnn_c')."""
  config = default_config()
  config.model.name = network or "all_cnn_c"
  config.batch_size = 128
  config.model.kernel_init = "he_normal"
  config.optimizer.boundaries = (200, 250, 300)
  config.num_epochs = 350
  return config
