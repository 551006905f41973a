"""Synthetic CIFAR-shaped data: deterministic smooth class templates plus noise, no files.

Each class has PER_CLASS images per split, like CIFAR-100 (500 train and 100 test images per
class), so the course's 10-class subsets hold 5,000 training images here too. A CIFAR-100
class's images depend only on the class, not on which other classes are selected, so a subset
is generated alone (fast) and equals the same classes of the whole set. CIFAR-10's 6,000 images
are drawn together, as they always were (tests and documented runs rely on them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from allconv_jax.data.cifar import CIFAR100_FINE_TO_COARSE, Raw, base_names

SEED = 20150413  # fixed: synthetic data does not depend on the run seed
PER_CLASS = (500, 100)  # train, test images of each class


def templates(k: int) -> np.ndarray:
  """(k, 32, 32, 3) float: a sum of random low-frequency plane waves per class and channel."""
  rng = np.random.default_rng(SEED + k)
  grid = np.arange(32, dtype=np.float64) / 32.0
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  out = np.zeros((k, 32, 32, 3))
  for _ in range(4):
    fy, fx = rng.integers(0, 3, size=(2, k, 1, 1, 3))
    phase = rng.uniform(0, 2 * np.pi, size=(k, 1, 1, 3))
    amp = rng.uniform(10, 30, size=(k, 1, 1, 3))
    out += amp * np.cos(2 * np.pi * (fy * yy[..., None] + fx * xx[..., None]) + phase)
  return out + rng.uniform(80, 176, size=(k, 1, 1, 3))


def class_images(template: np.ndarray, k: int, label: int, split: int, n: int) -> np.ndarray:
  """n uint8 images of one class: its template, pixel noise and a brightness shift."""
  rng = np.random.default_rng([SEED, k, label, split])
  noise = rng.normal(0.0, 32.0, size=(n, 32, 32, 3)).astype(np.float32)
  brightness = rng.normal(0.0, 12.0, size=(n, 1, 1, 1)).astype(np.float32)
  return np.clip(np.rint(template + noise + brightness), 0, 255).astype(np.uint8)


def make_synthetic(dataset: str, label_type: str, fine_classes: Sequence[int] | None = None
                   ) -> Raw:
  """The synthetic dataset, shuffled; for CIFAR-100 only `fine_classes` (fine labels) if given."""
  k = 10 if dataset == "cifar10" else 100
  t = templates(k)
  if k == 10:
    (train_images, train_labels), (test_images, test_labels) = _whole_set(t)
  else:
    wanted = list(range(k)) if fine_classes is None else list(fine_classes)
    arrays = []
    for split, n in enumerate(PER_CLASS):
      images = np.concatenate([class_images(t[c], k, c, split, n) for c in wanted])
      labels = np.repeat(np.asarray(wanted, np.int32), n)
      order = np.random.default_rng([SEED, k, split, len(wanted)]).permutation(len(labels))
      arrays.append((images[order], labels[order]))
    (train_images, train_labels), (test_images, test_labels) = arrays
  if dataset == "cifar100" and label_type == "coarse":
    to_coarse = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int32)
    train_labels, test_labels = to_coarse[train_labels], to_coarse[test_labels]
  return Raw(train_images, train_labels, test_images, test_labels, base_names(dataset, label_type))


def _whole_set(t: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """CIFAR-10's 10 x (500 + 100) images drawn together, as this generator always has (its
  tests and documented runs use exactly these images)."""
  k = len(t)
  rng = np.random.default_rng(SEED + k)
  for _ in range(4):  # past the draws of templates(k), which used this stream first
    rng.integers(0, 3, size=(2, k, 1, 1, 3))
    rng.uniform(0, 2 * np.pi, size=(k, 1, 1, 3))
    rng.uniform(10, 30, size=(k, 1, 1, 3))
  rng.uniform(80, 176, size=(k, 1, 1, 3))
  arrays = []
  for per_class in PER_CLASS:
    n = per_class * k
    labels = rng.permutation(np.arange(n) % k).astype(np.int32)
    noise = rng.normal(0.0, 32.0, size=(n, 32, 32, 3)).astype(np.float32)
    brightness = rng.normal(0.0, 12.0, size=(n, 1, 1, 1)).astype(np.float32)
    arrays.append((np.clip(np.rint(t[labels] + noise + brightness), 0, 255).astype(np.uint8),
                   labels))
  return arrays
