"""A public neon All-CNN-C example run, reported at 89.9 % CIFAR-10 test accuracy.

  python main.py --config=configs/recipe_neon.py --workdir=/tmp/allconv/neon_all_cnn_c

Its settings as published: GCN + ZCA, Gaussian weights with standard deviation 0.05, no
convolution biases, pad 1 at stride 2 (symmetric), rate 0.05, momentum 0.9, weight decay 0.001,
rate x0.1 after epochs 200, 250 and 300, 350 epochs. Its batch size is the backend's default,
128 in neon. Weight decay covers every parameter there is (here: only kernels).
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """All-CNN-C with the neon example's settings."""
  config = default_config()
  config.model.name = "all_cnn_c"
  config.batch_size = 128
  config.model.kernel_init = "gaussian"
  config.model.init_std = 0.05
  config.model.use_bias = False
  config.model.padding = "symmetric"
  config.optimizer.learning_rate = 0.05
  config.optimizer.boundaries = (200, 250, 300)
  config.num_epochs = 350
  config.data.preprocessing = "gcn_zca"
  return config
