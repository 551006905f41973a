"""A public Caffe All-CNN-C run that reached 90.25 % CIFAR-10 test accuracy without batch norm.

  python main.py --config=configs/recipe_caffe.py --workdir=/tmp/allconv/caffe_all_cnn_c

Its solver and net as published: pylearn2 GCN + ZCA, no augmentation, batch 256, base rate 0.05,
momentum 0.9, weight decay 0.001 on weights and biases, Caffe "xavier" weights (uniform, variance
1/fan_in) and zero biases, pad 1 at stride 2 (symmetric), final ReLU, rate x0.1 after 40k, 50k
and 60k iterations, 70k iterations. At 50,000 images per epoch that is x0.1 after epochs 204.8,
256 and 307.2 of 358.4; here the boundaries are those epochs (fractional epochs are allowed) and
the run is 358 epochs. Its authors called training "unstable".

Differences, said here: that run trained on all 50,000 images and picked its snapshot on the
test set; this config holds out 1,000 training images for validation (49,000 train, 191 steps
per epoch, 68,378 iterations in all). For its exact protocol add
--config.data.validation_size=0 --config.data.validate_on_test=True (then 195 steps per epoch,
69,810 iterations, and the "best" checkpoint is chosen on the test set, as it was there).
"""

import ml_collections

from allconv_jax.config import get_config as default_config


def get_config() -> ml_collections.ConfigDict:
  """All-CNN-C with the Caffe run's settings."""
  config = default_config()
  config.model.name = "all_cnn_c"
  config.batch_size = 256
  config.model.kernel_init = "caffe_xavier"
  config.model.use_bias = True
  config.model.bias_init = 0.0
  config.model.padding = "symmetric"
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.001
  config.optimizer.boundaries = (204.8, 256.0, 307.2)
  config.num_epochs = 358
  config.data.preprocessing = "gcn_zca"
  config.data.augment = False
  return config
