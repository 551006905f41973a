"""Synthetic CIFAR-shaped data: deterministic smooth class templates plus noise, no files."""

from __future__ import annotations

import numpy as np

from allconv_jax.data.cifar import CIFAR100_FINE_TO_COARSE, Raw, base_names

SEED = 20150413  # fixed: synthetic data does not depend on the run seed
SIZES = (5000, 1000)  # train, test images

def make_synthetic(dataset: str, label_type: str) -> Raw:
  """Deterministic smooth per-class templates plus noise; learnable within a few epochs."""
  k = 10 if dataset == "cifar10" else 100
  rng = np.random.default_rng(SEED + k)
  grid = np.arange(32, dtype=np.float64) / 32.0
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  templates = np.zeros((k, 32, 32, 3))
  for _ in range(4):  # a sum of random low-frequency plane waves per class and channel
    fy, fx = rng.integers(0, 3, size=(2, k, 1, 1, 3))
    phase = rng.uniform(0, 2 * np.pi, size=(k, 1, 1, 3))
    amp = rng.uniform(10, 30, size=(k, 1, 1, 3))
    templates += amp * np.cos(2 * np.pi * (fy * yy[..., None] + fx * xx[..., None]) + phase)
  templates += rng.uniform(80, 176, size=(k, 1, 1, 3))
  arrays = []
  for n in SIZES:
    labels = rng.permutation(np.arange(n) % k).astype(np.int32)
    noise = rng.normal(0.0, 32.0, size=(n, 32, 32, 3)).astype(np.float32)
    brightness = rng.normal(0.0, 12.0, size=(n, 1, 1, 1)).astype(np.float32)
    images = np.clip(np.rint(templates[labels] + noise + brightness), 0, 255).astype(np.uint8)
    arrays.append((images, labels))
  (train_images, train_labels), (test_images, test_labels) = arrays
  if dataset == "cifar100" and label_type == "coarse":
    to_coarse = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int32)
    train_labels, test_labels = to_coarse[train_labels], to_coarse[test_labels]
  names = base_names(dataset, label_type)
  return Raw(train_images, train_labels, test_images, test_labels, names)
