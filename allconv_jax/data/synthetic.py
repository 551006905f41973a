"""Synthetic CIFAR-shaped data: deterministic class patterns plus noise, no files.

A class is a smooth colour template (its mean image) plus a band-pass texture: random phases,
so no two images are alike, in a band of spatial frequencies and an orientation of its own. The
paper's GCN + ZCA whitening flattens the templates (a few directions of high variance) but not
the textures (their energy is spread over many directions, each class in its own), so the data
is learnable under the default preprocessing as well as under mean/std.

Each class has PER_CLASS images per split, like CIFAR-100 (500 train and 100 test images per
class), so the course's 10-class subsets hold 5,000 training images here too. A class's images
depend only on the dataset and the class, not on which other classes are selected, so a subset
is generated alone (fast) and equals the same classes of the whole set.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from allconv_jax.data.cifar import CIFAR100_FINE_TO_COARSE, Raw, base_names

SEED = 20150413  # fixed: synthetic data does not depend on the run seed
PER_CLASS = (500, 100)  # train, test images of each class
TEXTURE_STD = 30.0  # pixel standard deviation of a class's texture
BAND_WIDTH = 1.5  # of each class's frequency band (cycles per image)
NOISE_STD = 4.0  # white pixel noise
BRIGHTNESS_STD = 12.0  # per-image brightness shift


def templates(k: int) -> np.ndarray:
  """(k, 32, 32, 3) float32: a sum of random low-frequency plane waves per class and channel."""
  rng = np.random.default_rng(SEED + k)
  grid = np.arange(32, dtype=np.float64) / 32.0
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  out = np.zeros((k, 32, 32, 3))
  for _ in range(4):
    fy, fx = rng.integers(0, 3, size=(2, k, 1, 1, 3))
    phase = rng.uniform(0, 2 * np.pi, size=(k, 1, 1, 3))
    amp = rng.uniform(10, 30, size=(k, 1, 1, 3))
    out += amp * np.cos(2 * np.pi * (fy * yy[..., None] + fx * xx[..., None]) + phase)
  return (out + rng.uniform(80, 176, size=(k, 1, 1, 3))).astype(np.float32)


def bands(k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per class a Gaussian band-pass filter on rfft2's grid, (k, 32, 17), centred on a frequency
  of radius 3-10 cycles per image in a random orientation; and its texture's colour, (k, 3)."""
  rng = np.random.default_rng([SEED, k, 1])
  fy, fx = np.meshgrid(np.fft.fftfreq(32) * 32, np.fft.rfftfreq(32) * 32, indexing="ij")
  radius, angle = rng.uniform(3, 10, k), rng.uniform(0, np.pi, k)
  cy, cx = (radius * np.sin(angle))[:, None, None], (radius * np.cos(angle))[:, None, None]
  band = sum(np.exp(-((fy - sign * cy) ** 2 + (fx - sign * cx) ** 2) / (2 * BAND_WIDTH**2))
             for sign in (1, -1))  # the frequency and its mirror: rfft2 keeps half the plane
  return band.astype(np.float32), rng.uniform(0.3, 1.0, (k, 3)).astype(np.float32)


def class_images(k: int, label: int, split: int, n: int, template: np.ndarray,
                 band: np.ndarray, colour: np.ndarray) -> np.ndarray:
  """n uint8 images of one class: its template, its texture, pixel noise, a brightness shift."""
  rng = np.random.default_rng([SEED, k, label, split])
  white = rng.standard_normal((n, 32, 32), dtype=np.float32)
  texture = np.fft.irfft2(np.fft.rfft2(white) * band, s=(32, 32))
  texture *= TEXTURE_STD / texture.std(axis=(1, 2), keepdims=True)
  noise = NOISE_STD * rng.standard_normal((n, 32, 32, 3), dtype=np.float32)
  brightness = BRIGHTNESS_STD * rng.standard_normal((n, 1, 1, 1), dtype=np.float32)
  images = template + texture[..., None] * colour + noise + brightness
  return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def make_synthetic(dataset: str, label_type: str, fine_classes: Sequence[int] | None = None
                   ) -> Raw:
  """The synthetic dataset, shuffled; for CIFAR-100 only `fine_classes` (fine labels) if given.
  Generated once per process and arguments (read-only arrays): runs in one process share it."""
  return _generate(dataset, label_type, None if fine_classes is None else tuple(fine_classes))


@functools.lru_cache(maxsize=2)
def _generate(dataset: str, label_type: str, fine_classes: tuple[int, ...] | None) -> Raw:
  k = 10 if dataset == "cifar10" else 100
  wanted = list(range(k)) if fine_classes is None else list(fine_classes)
  t, (band, colour) = templates(k), bands(k)
  arrays = []
  for split, n in enumerate(PER_CLASS):
    images = np.concatenate([class_images(k, c, split, n, t[c], band[c], colour[c])
                             for c in wanted])
    labels = np.repeat(np.asarray(wanted, np.int32), n)
    order = np.random.default_rng([SEED, k, split, len(wanted)]).permutation(len(labels))
    arrays.append((images[order], labels[order]))
  (train_images, train_labels), (test_images, test_labels) = arrays
  if dataset == "cifar100" and label_type == "coarse":
    to_coarse = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int32)
    train_labels, test_labels = to_coarse[train_labels], to_coarse[test_labels]
  for array in (train_images, train_labels, test_images, test_labels):
    array.flags.writeable = False
  return Raw(train_images, train_labels, test_images, test_labels, base_names(dataset, label_type))
