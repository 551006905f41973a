r"""The reduced-scale reproduction: the paper's 12 CIFAR-10 nets and the course's transfer study.

  python -m allconv_jax.tools.study --study=configs/study_reduced.py \
      --root=/tmp/allconv/study_reduced --out=results/study_reduced \
      --config.data.source=local --config.data.dir=/tmp/cifar

Scaled from the paper's protocol (section 3.1) so that everything runs in about two hours on a
2-core CPU: width x0.25, EPOCHS epochs with the rate x0.1 at the same fractions of the run as the
paper's 200/250/300 of 350, the paper's GCN + ZCA and no augmentation, each network's rate chosen
from RATES on validation accuracy after SELECT epochs (before the first decay), then that run
continued to the end. RATES are the paper's grid {0.25, 0.1, 0.05, 0.01} less the two rates
that killed or stalled quarter-width nets in our trainability map (results/trainability/,
docs/reproducing.md).

The transfer study keeps the course project's shape on real pixels: an All-CNN-C trained on five
CIFAR-10 classes (SOURCE_CLASSES) is transferred to the other five (TARGET_CLASSES), 500
training images per class (the size of the course's CIFAR-100 subsets): step 1 trains a new class
layer on the frozen backbone, step 2 fine-tunes every layer from step 1, and a from-scratch
baseline; steps 1 and 2 also run without the ReLU after the class layer (the paper's nets have
one; on a frozen backbone it can silence a new class layer).
`--study=configs/study_reduced.py:cifar100` runs the same steps on the course's real CIFAR-100
subset class1 instead, from a source trained on all of CIFAR-10 (needs CIFAR-100 files).
"""

from allconv_jax import paper

EPOCHS, SELECT = 6, 3
RATES = (0.05, 0.01)
TRANSFER_EPOCHS = 20  # steps 1 and 2 (the course: 50 epochs each, constant rate)
SCRATCH_EPOCHS, SCRATCH_SELECT = 60, 30  # the baseline, on the compressed schedule
SOURCE_CLASSES = "airplane,automobile,bird,cat,deer"
TARGET_CLASSES = "dog,frog,horse,ship,truck"
NETWORKS = tuple(f"{variant}_{base}" for base in "abc"
                 for variant in ("model", "strided_cnn", "convpool_cnn", "all_cnn"))
COMMON = ("--config.model.width_multiplier=0.25", "--config.checkpoint.every_epochs=1")


def schedule(epochs: int) -> tuple[str, ...]:
  """num_epochs and the paper's boundaries at the same fractions of a shorter run."""
  boundaries = ",".join(map(repr, paper.scaled_boundaries(epochs)))
  return (f"--config.num_epochs={epochs}", f"--config.optimizer.boundaries=({boundaries})")


def stage(name: str, configs: tuple[str, ...], select: int, overrides: tuple[str, ...],
          compare: str = "paper") -> dict[str, object]:
  """One stage as data for the study tool: each config at every rate of RATES, the rate chosen
  on validation accuracy after `select` epochs (0: after full runs)."""
  return {"name": name, "configs": configs, "learning_rates": RATES, "select_epochs": select,
          "overrides": overrides, "compare": compare}


def get_study(arg: str = "") -> list[dict[str, object]]:
  """The stages; arg 'cifar100' transfers to the real CIFAR-100 subset class1 instead."""
  if arg not in ("", "cifar100"):
    raise ValueError(f"unknown study variant {arg!r} (expected nothing or 'cifar100')")
  if arg == "cifar100":
    source_data: tuple[str, ...] = ()
    target = ("--config.data.subset=class1",)
  else:
    source_data = (f"--config.data.classes={SOURCE_CLASSES}",)
    target = ("--config.data.dataset=cifar10", "--config.data.subset=",
              f"--config.data.classes={TARGET_CLASSES}", "--config.data.max_train_per_class=500")
  steps = (f"--config.num_epochs={TRANSFER_EPOCHS}", *target, *COMMON)
  return [
      stage("transfer_source", ("all_cnn_c",), SELECT,
            (*schedule(EPOCHS), *source_data, *COMMON)),
      stage("step1", ("transfer_step1",), 0,
            ("--config.transfer.source={winner:transfer_source}", *steps),
            compare="course_transfer"),
      stage("step2", ("transfer_step2",), 0,
            ("--config.transfer.source={winner:step1}", *steps), compare="course_transfer"),
      stage("scratch", ("scratch_subset",), SCRATCH_SELECT,
            (*schedule(SCRATCH_EPOCHS), *target, *COMMON), compare="course_transfer"),
      # The paper's ReLU after the class layer can silence a new class layer on a frozen
      # backbone; the same two steps without it show how much of step 1's result that costs.
      stage("step1_no_final_relu", ("transfer_step1",), 0,
            ("--config.transfer.source={winner:transfer_source}", "--config.model.final_relu=False",
             *steps), compare="course_transfer"),
      stage("step2_no_final_relu", ("transfer_step2",), 0,
            ("--config.transfer.source={winner:step1_no_final_relu}",
             "--config.model.final_relu=False", *steps), compare="course_transfer"),
      stage("cifar10", NETWORKS, SELECT, (*schedule(EPOCHS), *COMMON)),
  ]
