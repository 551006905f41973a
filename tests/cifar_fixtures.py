"""Writers of tiny CIFAR-10/100 folders in the official python and binary formats.

Files are laid out as the downloads from https://www.cs.toronto.edu/~kriz/cifar.html: python
batches are protocol-2 pickles with byte-string keys whose b'data' is uint8 [N, 3072] (the R, then
G, then B 32x32 plane, row-major); binary records are label byte(s) + 3072 pixel bytes.

  from tests import cifar_fixtures
  fake = cifar_fixtures.make_cifar10(tmp_path, "python", n_train=50, n_test=10)
  config.data.source, config.data.dir = "local", str(tmp_path)
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np

from allconv_jax.data import cifar

CIFAR10_FOLDERS = {"python": "cifar-10-batches-py", "binary": "cifar-10-batches-bin"}
CIFAR100_FOLDERS = {"python": "cifar-100-python", "binary": "cifar-100-binary"}


@dataclasses.dataclass(frozen=True, eq=False)
class FakeCifar:
  """What was written: HWC uint8 images, int labels (file order) and the folder."""

  folder: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  train_coarse: np.ndarray | None = None  # CIFAR-100 only; *_labels are then the fine labels
  test_coarse: np.ndarray | None = None


def random_images(n: int, seed: int) -> np.ndarray:
  """n distinct random uint8 images (N, 32, 32, 3)."""
  return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def balanced_labels(n: int, k: int, seed: int) -> np.ndarray:
  """n labels in 0..k-1, each class as often as possible, shuffled."""
  return np.random.default_rng(seed).permutation(np.arange(n) % k).astype(np.int64)


def to_rows(images: np.ndarray) -> np.ndarray:
  """(N, 32, 32, 3) -> (N, 3072) with the R, G and B planes one after the other."""
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _dump(path: str, obj: dict) -> None:
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=2)


def _names(names: tuple[str, ...]) -> list[bytes]:
  return [n.encode() for n in names]


def write_cifar10(
  root: str | os.PathLike,
  fmt: str,
  train_images: np.ndarray,
  train_labels: np.ndarray,
  test_images: np.ndarray,
  test_labels: np.ndarray,
  label_names: tuple[str, ...] | None = cifar.CIFAR10_CLASSES,
) -> str:
  """Writes cifar-10-batches-py/ or cifar-10-batches-bin/ under root; returns that folder."""
  folder = os.path.join(root, CIFAR10_FOLDERS[fmt])
  os.makedirs(folder, exist_ok=True)
  parts = [
    (f"data_batch_{i + 1}", train_images[idx], train_labels[idx], f"training batch {i + 1} of 5")
    for i, idx in enumerate(np.array_split(np.arange(len(train_images)), 5))
  ]
  parts.append(("test_batch", test_images, test_labels, "testing batch 1 of 1"))
  for name, images, labels, batch_label in parts:
    if fmt == "python":
      _dump(
        os.path.join(folder, name),
        {
          b"batch_label": batch_label.encode(),
          b"labels": [int(v) for v in labels],
          b"data": to_rows(images),
          b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
        },
      )
    else:
      records = np.concatenate([np.asarray(labels, np.uint8)[:, None], to_rows(images)], axis=1)
      records.tofile(os.path.join(folder, name + ".bin"))
  if label_names is not None:
    if fmt == "python":
      _dump(
        os.path.join(folder, "batches.meta"),
        {b"num_cases_per_batch": 10000, b"label_names": _names(label_names), b"num_vis": 3072},
      )
    else:
      with open(os.path.join(folder, "batches.meta.txt"), "w") as f:
        f.write("\n".join(label_names) + "\n\n")
  return folder


def write_cifar100(
  root: str | os.PathLike,
  fmt: str,
  train_images: np.ndarray,
  train_fine: np.ndarray,
  train_coarse: np.ndarray,
  test_images: np.ndarray,
  test_fine: np.ndarray,
  test_coarse: np.ndarray,
  with_meta: bool = True,
) -> str:
  """Writes cifar-100-python/ or cifar-100-binary/ under root; returns that folder."""
  folder = os.path.join(root, CIFAR100_FOLDERS[fmt])
  os.makedirs(folder, exist_ok=True)
  for name, images, fine, coarse in [
    ("train", train_images, train_fine, train_coarse),
    ("test", test_images, test_fine, test_coarse),
  ]:
    if fmt == "python":
      _dump(
        os.path.join(folder, name),
        {
          b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
          b"batch_label": f"{name}ing batch 1 of 1".encode(),
          b"fine_labels": [int(v) for v in fine],
          b"coarse_labels": [int(v) for v in coarse],
          b"data": to_rows(images),
        },
      )
    else:
      labels = np.stack([np.asarray(coarse, np.uint8), np.asarray(fine, np.uint8)], axis=1)
      np.concatenate([labels, to_rows(images)], axis=1).tofile(os.path.join(folder, name + ".bin"))
  if with_meta:
    fine_names, coarse_names = cifar.CIFAR100_FINE, cifar.CIFAR100_COARSE
    if fmt == "python":
      _dump(
        os.path.join(folder, "meta"),
        {b"fine_label_names": _names(fine_names), b"coarse_label_names": _names(coarse_names)},
      )
    else:
      for name, names in [("fine", fine_names), ("coarse", coarse_names)]:
        with open(os.path.join(folder, f"{name}_label_names.txt"), "w") as f:
          f.write("\n".join(names) + "\n")
  return folder


def make_cifar10(
  root: str | os.PathLike, fmt: str = "python", n_train: int = 50, n_test: int = 20, seed: int = 0
) -> FakeCifar:
  """Random CIFAR-10 folder with balanced labels; returns what was written."""
  train_images, test_images = random_images(n_train, seed), random_images(n_test, seed + 1)
  train_labels = balanced_labels(n_train, 10, seed + 2)
  test_labels = balanced_labels(n_test, 10, seed + 3)
  folder = write_cifar10(root, fmt, train_images, train_labels, test_images, test_labels)
  return FakeCifar(folder, train_images, train_labels, test_images, test_labels)


def make_cifar100(
  root: str | os.PathLike, fmt: str = "python", n_train: int = 300, n_test: int = 100, seed: int = 0
) -> FakeCifar:
  """Random CIFAR-100 folder, every fine class present when n >= 100, standard coarse labels."""
  to_coarse = np.asarray(cifar.CIFAR100_FINE_TO_COARSE)
  train_images, test_images = random_images(n_train, seed), random_images(n_test, seed + 1)
  train_fine = balanced_labels(n_train, 100, seed + 2)
  test_fine = balanced_labels(n_test, 100, seed + 3)
  train_coarse, test_coarse = to_coarse[train_fine], to_coarse[test_fine]
  folder = write_cifar100(
    root, fmt, train_images, train_fine, train_coarse, test_images, test_fine, test_coarse
  )
  return FakeCifar(
    folder, train_images, train_fine, test_images, test_fine, train_coarse, test_coarse
  )
