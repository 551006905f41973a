"""Use a trained run: its test accuracy per class and confusion matrix, or the classes of images.

  python -m allconv_jax.tools.evaluate --workdir=/tmp/allconv/all_cnn_c [--checkpoint=best]
  python -m allconv_jax.tools.evaluate --workdir=/tmp/allconv/all_cnn_c cat.jpg truck.png

Without images: the run's test set (its data settings, its saved preprocessing statistics),
accuracy overall and per class, and WORKDIR/evaluation/confusion.png (or --out). With image files
(PNG/JPEG, any size): each is converted to RGB, resized to 32x32 and preprocessed exactly as the
run's training images, and the three likeliest classes are printed with their probabilities.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
from absl import app, flags
from PIL import Image, UnidentifiedImageError

from allconv_jax import checkpointing, cli, files, input_pipeline
from allconv_jax.data import preprocessing
from allconv_jax.errors import UserError

matplotlib.use("Agg")  # headless; must come before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

BATCH = 500
TOP = 3


def read_images(paths: Sequence[str]) -> np.ndarray:
  """uint8 (N, 32, 32, 3) RGB from image files; UserError naming an unreadable one."""
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        rgb = image.convert("RGB").resize((32, 32), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as e:
      raise UserError(f"cannot read image {path}: {type(e).__name__}") from None
    images.append(np.asarray(rgb, dtype=np.uint8))
  return np.stack(images)


def probabilities(model: Any, params: Any, stats: dict[str, Any], images: np.ndarray
                  ) -> np.ndarray:
  """Softmax outputs (N, classes) for uint8 images, in batches."""
  forward = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x, train=False)))
  batches = (input_pipeline.apply_preprocessing(stats, images[i:i + BATCH])
             for i in range(0, len(images), BATCH))
  out = [np.asarray(forward(params, x)) for x in batches]
  return np.concatenate(out)


def confusion(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((k, k), dtype=np.int64)
  np.add.at(counts, (labels, predicted), 1)
  return counts


def plot_confusion(counts: np.ndarray, names: Sequence[str], title: str, path: str) -> None:
  """The confusion matrix as rows of true classes, normalized per row."""
  k = len(names)
  fig, ax = plt.subplots(figsize=(1 + 0.45 * k, 1 + 0.4 * k))
  rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  ticks = range(k) if k <= 20 else []
  ax.set_xticks(list(ticks), [names[i] for i in ticks], rotation=90, fontsize="small")
  ax.set_yticks(list(ticks), [names[i] for i in ticks], fontsize="small")
  ax.set(xlabel="predicted", ylabel="true", title=title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def evaluate_test_set(workdir: str, checkpoint: str, out: str) -> dict[str, Any]:
  """Accuracy overall and per class on the run's test set; writes the confusion PNG."""
  config, model, params = checkpointing.load_run(workdir, checkpoint)
  splits = input_pipeline.load_splits(config.data, config.seed)
  stats = preprocessing.load_preprocessing(files.path(workdir, files.PREPROCESSING))
  predicted = probabilities(model, params, stats, splits.test_images).argmax(-1)
  counts = confusion(splits.test_labels, predicted, len(splits.class_names))
  per_class = np.diag(counts) / np.maximum(counts.sum(1), 1)
  accuracy = float(np.trace(counts) / max(counts.sum(), 1))
  os.makedirs(out, exist_ok=True)
  png = os.path.join(out, "confusion.png")
  plot_confusion(counts, splits.class_names, f"{config.model.name}: test accuracy "
                 f"{100 * accuracy:.2f} %", png)
  print(f"{config.model.name} ({checkpoint} checkpoint) on {len(splits.test_labels)} test "
        f"images: accuracy {100 * accuracy:.2f} %")
  for name, acc, n in zip(splits.class_names, per_class, counts.sum(1), strict=True):
    print(f"  {name:<16} {100 * acc:6.2f} %  ({n} images)")
  print(f"confusion matrix: {png}")
  return {"accuracy": accuracy, "per_class": dict(zip(splits.class_names, per_class.tolist(),
                                                      strict=True)), "confusion": counts}


def classify(workdir: str, checkpoint: str, paths: Sequence[str]) -> list[list[tuple[str, float]]]:
  """The TOP likeliest classes of each image file, with probabilities (also printed)."""
  images = read_images(paths)
  config, model, params = checkpointing.load_run(workdir, checkpoint)
  stats = preprocessing.load_preprocessing(files.path(workdir, files.PREPROCESSING))
  names = input_pipeline.class_names(config.data)
  ranked = []
  for path, p in zip(paths, probabilities(model, params, stats, images), strict=True):
    best = [(names[i], float(p[i])) for i in np.argsort(-p)[:TOP]]
    ranked.append(best)
    print(f"{path}: " + ", ".join(f"{n} {100 * q:.1f} %" for n, q in best))
  return ranked


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "A trained run's folder.")
  flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint to load.")
  flags.DEFINE_string("out", None, "Folder for confusion.png (default WORKDIR/evaluation).")


def main(argv: list[str]) -> None:
  fl = flags.FLAGS
  cli.start([])  # positional arguments are the image files
  with cli.user_errors():
    if not fl.workdir:
      raise UserError("--workdir is required (a trained run's folder)")
    if not os.path.isdir(fl.workdir):
      raise UserError(f"workdir {fl.workdir} does not exist")
    if argv[1:]:
      classify(fl.workdir, fl.checkpoint, argv[1:])
    else:
      evaluate_test_set(fl.workdir, fl.checkpoint,
                        fl.out or os.path.join(fl.workdir, "evaluation"))
  sys.stdout.flush()


def run() -> None:
  """The program (also the `allconv-evaluate` command)."""
  define_flags()
  cli.program_help(__doc__)
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
