r"""The converged reduced-scale study: the paper's C family and the course's transfer finding,
each run trained until its validation accuracy stops improving.

  python -m allconv_jax.tools.study --study=configs/study_converged.py \
      --root=/tmp/allconv/study_converged --out=results/study_converged \
      --config.data.source=local --config.data.dir=/tmp/cifar

The paper's protocol (section 3.1) compressed to fit a 2-core CPU (8.1 hours in all): width
x0.25, EPOCHS epochs with the rate x0.1 at the same fractions of the run as the paper's
200/250/300 of 350, GCN + ZCA, no augmentation unless a stage says so, bfloat16 compute, and
All-CNN-C and Model C again with seeds 1 and 2 to show the seed spread. The stage
`cifar10_float32` repeats All-CNN-C in float32: the same at rate 0.01, but at 0.05 only the
float32 run kept its class channels, so `cifar10_float32_lr0.05` trains the whole family in
float32 at 0.05. Each
network's rate is chosen from RATES (the paper's grid less the two rates that killed
quarter-width nets in results/trainability/) on validation accuracy after SELECT epochs, before
the first decay; only the chosen run goes on to the end.

The transfer stand-in keeps the course project's shape on real pixels: All-CNN-C trained on five
CIFAR-10 classes (SOURCE_CLASSES), then on the other five (TARGET_CLASSES) at 500 training images
per class (the course's subset size): step 1 trains a new class layer on the frozen backbone,
step 2 fine-tunes every layer from step 1, and a baseline trains from scratch; all three with
and without the ReLU after the class layer.
"""

from allconv_jax import paper

EPOCHS, SELECT = 30, 5  # CIFAR-10 and the transfer source (first decay after epoch 17.1)
TARGET_EPOCHS, TARGET_SELECT = 60, 15  # the 2,500-image target runs (first decay after 34.3)
RATES = (0.05, 0.01)
SOURCE_CLASSES = "airplane,automobile,bird,cat,deer"
TARGET_CLASSES = "dog,frog,horse,ship,truck"
C_FAMILY = ("model_c", "strided_cnn_c", "convpool_cnn_c", "all_cnn_c")
COMMON = ("--config.model.width_multiplier=0.25", "--config.checkpoint.every_epochs=1")
BFLOAT16 = ("--config.model.dtype=bfloat16",)


def schedule(epochs: int) -> tuple[str, ...]:
  """num_epochs and the paper's boundaries at the same fractions of a shorter run."""
  boundaries = ",".join(map(repr, paper.scaled_boundaries(epochs)))
  return (f"--config.num_epochs={epochs}", f"--config.optimizer.boundaries=({boundaries})")


def stage(name: str, configs: tuple[str, ...], select: int, overrides: tuple[str, ...],
          compare: str = "paper") -> dict[str, object]:
  """One stage as data for the study tool: each config at every rate of RATES, the rate chosen
  on validation accuracy after `select` epochs."""
  return {"name": name, "configs": configs, "learning_rates": RATES, "select_epochs": select,
          "overrides": overrides, "compare": compare}


def get_study() -> list[dict[str, object]]:
  """The stages, in the order they run."""
  cifar10 = (*schedule(EPOCHS), *COMMON)
  target = (*schedule(TARGET_EPOCHS), "--config.data.dataset=cifar10", "--config.data.subset=",
            f"--config.data.classes={TARGET_CLASSES}", "--config.data.max_train_per_class=500",
            *COMMON, *BFLOAT16)
  no_relu = ("--config.model.final_relu=False",)

  def transfer(name: str, config: str, source: str, *extra: str) -> dict[str, object]:
    source_flag = (f"--config.transfer.source={{winner:{source}}}",) if source else ()
    return stage(name, (config,), TARGET_SELECT, (*source_flag, *target, *extra),
                 compare="course_transfer")

  return [
      stage("transfer_source", ("all_cnn_c",), SELECT,
            (*cifar10, f"--config.data.classes={SOURCE_CLASSES}", *BFLOAT16)),
      transfer("step1", "transfer_step1", "transfer_source"),
      transfer("step2", "transfer_step2", "step1"),
      transfer("scratch", "scratch_subset", ""),
      transfer("step1_no_final_relu", "transfer_step1", "transfer_source", *no_relu),
      transfer("step2_no_final_relu", "transfer_step2", "step1_no_final_relu", *no_relu),
      transfer("scratch_no_final_relu", "scratch_subset", "", *no_relu),
      stage("cifar10", C_FAMILY, SELECT, (*cifar10, *BFLOAT16)),
      stage("cifar10_seed1", ("all_cnn_c", "model_c"), SELECT,
            (*cifar10, *BFLOAT16, "--config.seed=1")),
      stage("cifar10_augment", ("all_cnn_c",), SELECT,
            (*cifar10, *BFLOAT16, "--config.data.augment=True")),
      stage("cifar10_float32", ("all_cnn_c",), SELECT, cifar10),
      stage("cifar10_seed2", ("all_cnn_c", "model_c"), SELECT,
            (*cifar10, *BFLOAT16, "--config.seed=2")),
      # In float32 the rate 0.05 was alive after 5 epochs, unlike in bfloat16: run it out, for
      # the whole family, so that every net has been trained out at both rates.
      {**stage("cifar10_float32_lr0.05", C_FAMILY, 0, cifar10), "learning_rates": (0.05,)},
  ]
