"""The paper's shared protocol; every other config starts from this one.

  python main.py --config=configs/default.py --workdir=/tmp/allconv/default

Network, optimizer and data settings follow Springenberg et al. (2015), section 3.1: SGD with
momentum 0.9, weight decay 0.001, 350 epochs with the rate x0.1 after epochs 200, 250 and 300,
dropout 20 % on the input and 50 % after each pooling layer (or its replacement), GCN + ZCA
whitened CIFAR-10. Keys are documented in README.md ("Config keys").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (All-CNN-C on CIFAR-10, the paper's protocol)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 350
  config.batch_size = 128
  config.eval_batch_size = 500
  config.log_every_steps = 100
  config.restart = False
  config.tensorboard = True

  config.model = ml_collections.ConfigDict()
  config.model.name = "all_cnn_c"
  config.model.width_multiplier = 1.0
  config.model.final_relu = True
  config.model.input_dropout = 0.2
  config.model.dropout = 0.5
  config.model.kernel_init = "he_normal"
  config.model.init_std = 0.05
  config.model.use_bias = True
  config.model.bias_init = 0.0
  config.model.padding = "symmetric"
  config.model.dtype = "float32"
  config.model.strided_grad = "auto"
  config.model.conv_impl = "auto"

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.dataset = "cifar10"
  config.data.dir = ""
  config.data.label_type = "fine"
  config.data.subset = ""
  config.data.classes = ""
  config.data.validation_size = 1000
  config.data.validate_on_test = False
  config.data.max_train_examples = 0
  config.data.max_train_per_class = 0
  config.data.max_test_examples = 0
  config.data.preprocessing = "gcn_zca"
  config.data.gcn_scale = 55.0
  config.data.zca_epsilon = 0.1
  config.data.augment = False
  config.data.translate_pixels = 5

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 0.01
  config.optimizer.learning_rates = ()
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.001
  config.optimizer.boundaries = (200, 250, 300)
  config.optimizer.decay_factor = 0.1
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.freeze = ""

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 10
  config.checkpoint.keep = 3

  config.transfer = ml_collections.ConfigDict()
  config.transfer.source = ""
  config.transfer.checkpoint = "latest"
  config.transfer.new_classifier = True
  return config
