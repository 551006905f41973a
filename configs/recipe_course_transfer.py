r"""The course project's transfer study exactly as it ran (its report's Table 4 and section 3.1).

  python main.py --config=configs/recipe_course.py:all_cnn_c --workdir=/tmp/allconv/course_all_cnn_c
  python main.py --config=configs/recipe_course_transfer.py:step1,class1 \
      --workdir=/tmp/allconv/course_class1_step1
  python main.py --config=configs/recipe_course_transfer.py:step2,class1 \
      --workdir=/tmp/allconv/course_class1_step2
  python main.py --config=configs/recipe_course_transfer.py:scratch,class1 \
      --workdir=/tmp/allconv/course_class1_scratch

(and the same with class2). Step 1 restores the newest checkpoint of the CIFAR-10 All-CNN-C run
in transfer.source, replaces its class layer by a new 1x1 convolution and trains only that;
step 2 trains every layer from step 1's run; scratch trains All-CNN-C from the start.

Its settings: batch 4, all 5,000 training images of the subset (no validation split), the 1,000
test images watched during training (validate_on_test), rates (0.025, 0.01, 0.005, 0.001) after
epochs 200/250/300: steps 1 and 2 run 50 epochs each, so at a constant 0.025; scratch runs 350
epochs with that schedule. Published test accuracy class1 / class2: scratch 68.75 / 68.45,
step 1 52.10 / 38.65, step 2 75.05 / 75.10. configs/transfer_step1.py and friends keep a
held-out validation split instead (choosing a checkpoint on the test set flatters it).
"""

import ml_collections

from allconv_jax import paper
from allconv_jax.config import get_config as default_config

STEPS = ("step1", "step2", "scratch")


def get_config(step_and_subset: str = "step1,class1") -> ml_collections.ConfigDict:
  """'step1', 'step2' or 'scratch', a comma, then the subset 'class1' or 'class2'."""
  step, _, subset = (step_and_subset or "step1,class1").partition(",")
  subset = subset or "class1"
  if step not in STEPS or subset not in ("class1", "class2"):
    raise ValueError(f"expected STEP,SUBSET with STEP in {', '.join(STEPS)} and SUBSET class1 "
                     f"or class2; got {step_and_subset!r}")
  config = default_config()
  config.model.name = "all_cnn_c"
  config.batch_size = 4
  config.log_every_steps = 250
  config.model.kernel_init = "he_normal"
  config.data.dataset = "cifar100"
  config.data.subset = subset
  config.data.preprocessing = "meanstd"
  config.data.validation_size = 0
  config.data.validate_on_test = True
  config.optimizer.boundaries = (200, 250, 300)
  config.optimizer.learning_rate = paper.COURSE_TRANSFER_RATES[0]
  config.optimizer.learning_rates = paper.COURSE_TRANSFER_RATES
  config.num_epochs = 350 if step == "scratch" else 50
  if step == "step1":
    config.optimizer.freeze = "backbone/"
    config.transfer.source = "/tmp/allconv/course_all_cnn_c"
    config.transfer.new_classifier = True
  elif step == "step2":
    config.transfer.source = f"/tmp/allconv/course_{subset}_step1"
    config.transfer.new_classifier = False
  return config
