"""The course project's CIFAR-10 protocol (its report's Table 3), for the 8 networks it trained.

  python main.py --config=configs/recipe_course.py:all_cnn_c --workdir=/tmp/allconv/course_all_cnn_c

Networks and their published test accuracy: model_a 80.28, all_cnn_a 80.05, model_b 80.97,
all_cnn_b 79.11, model_c 83.18, strided_cnn_c 80.78, convpool_cnn_c 85.88, all_cnn_c 83.28.

Its settings: PyTorch, batch size 4, mean/std normalization (x/255, then the per-channel
constants of data.preprocessing=meanstd), 49,000 train / 1,000 validation images, no
augmentation, SGD momentum 0.9, weight decay 0.001, 350 epochs with the rate changing after
epochs 200, 250 and 300 to the next of the network's four rates (Table 3, e.g. all_cnn_c
0.005 / 0.001 / 0.0005 / 0.0001: optimizer.learning_rates), Kaiming-normal weights and zero
biases (He-normal here), dropout 0.2 / 0.5, final ReLU. The networks are the paper's: its own
All-CNN listings used unpadded stride-2 convolutions and a padding-3 head, a geometry of its
own; here every convolution pads (k-1)/2 as PyTorch does. On a 2-core CPU batch 4 is slow
(12,250 steps per epoch): this config is for a GPU.
"""

import ml_collections

from allconv_jax import paper
from allconv_jax.config import get_config as default_config


def get_config(network: str = "all_cnn_c") -> ml_collections.ConfigDict:
  """The course project's settings for `network` (one of the 8 of its Table 3)."""
  network = network or "all_cnn_c"
  if network not in paper.COURSE_CIFAR10:
    raise ValueError(f"the course project trained only {', '.join(paper.COURSE_CIFAR10)}; "
                     f"got {network!r}")
  config = default_config()
  rates = paper.COURSE_CIFAR10[network][1]
  config.model.name = network
  config.batch_size = 4
  config.eval_batch_size = 500
  config.log_every_steps = 1000
  config.model.kernel_init = "he_normal"
  config.model.bias_init = 0.0
  config.data.preprocessing = "meanstd"
  config.data.validation_size = 1000
  config.data.augment = False
  config.optimizer.boundaries = (200, 250, 300)
  config.optimizer.learning_rate = rates[0]
  config.optimizer.learning_rates = rates
  config.num_epochs = 350
  return config
