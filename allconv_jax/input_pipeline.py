"""The input pipeline: CIFAR-10/100 from a source, class selection, the validation split, and
the preprocessed splits on the devices (the dataset lives there; each batch is gathered there).

Table of contents:
  data/cifar.py          class names, superclasses, the course's subsets, label spaces
  data/local_files.py    the official python/binary folders (`data.source=local`)
  data/tfds_source.py    TensorFlow Datasets (`data.source=tfds`, imported lazily)
  data/synthetic.py      a learnable stand-in with no files (`data.source=synthetic`)
  this file              availability check, class selection, train/validation/test splits,
                         the device mesh and the splits on it
  data/preprocessing.py  GCN + ZCA (pylearn2's, as the paper used) and mean/std statistics
  data/augmentation.py   random flips and translations, on the device

Images are uint8 (N, 32, 32, 3) HWC RGB and labels int32 (N,) until `apply_preprocessing`, which
returns float32.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from allconv_jax.data import cifar, local_files, synthetic, tfds_source
from allconv_jax.data.augmentation import augment
from allconv_jax.data.cifar import Raw, class_names, num_classes
from allconv_jax.data.preprocessing import apply_preprocessing
from allconv_jax.errors import UserError

__all__ = ["DeviceData", "EvalSet", "Splits", "augment", "apply_preprocessing", "check_available",
           "class_names", "load_splits", "make_mesh", "num_classes", "put_on_devices",
           "replicate", "replicate_tree"]


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """uint8 images (N, 32, 32, 3) HWC RGB and int32 labels (N,) of each split."""

  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]


def check_available(data_config: Any) -> None:
  """Cheap check that data.source can deliver the data; UserError saying how to fix it."""
  if data_config.source == "local":
    local_files.find_local(str(data_config.dir), data_config.dataset)
  elif data_config.source == "tfds":
    for module in ("tensorflow", "tensorflow_datasets"):
      if importlib.util.find_spec(module) is None:
        raise UserError(
          f"data.source=tfds needs {module}: pip install tensorflow-cpu tensorflow-datasets, "
          "or use data.source=local"
        )
    tfds_source.check_downloadable(data_config)


def _synthetic_classes(data_config: Any) -> list[int] | None:
  """The fine labels a selection keeps (generated alone), or None for every class."""
  if not (data_config.subset or data_config.classes) or data_config.label_type != "fine":
    return None
  base = cifar.base_names(data_config.dataset, "fine")
  return sorted(base.index(n) for n in cifar.class_names(data_config))


def _select(raw: Raw, names: tuple[str, ...]) -> Raw:
  """Keeps the classes `names` and relabels them 0..k-1 in that order."""
  missing = [n for n in names if n not in raw.class_names]
  if missing:
    raise UserError(f"the data has no classes {', '.join(missing)}")
  lut = np.full(len(raw.class_names), -1, dtype=np.int32)
  for new, name in enumerate(names):
    lut[raw.class_names.index(name)] = new

  def keep(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new_labels = lut[labels]
    mask = new_labels >= 0
    return images[mask], new_labels[mask]

  train = keep(raw.train_images, raw.train_labels)
  test = keep(raw.test_images, raw.test_labels)
  return Raw(*train, *test, names)


def _first_per_class(idx: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
  """The indices of `idx`, in order, keeping at most `limit` of each label."""
  rank = np.zeros(len(idx), dtype=np.int64)
  for label in np.unique(labels[idx]):
    where = labels[idx] == label
    rank[where] = np.arange(where.sum())
  return idx[rank < limit]


def load_splits(data_config: Any, seed: int) -> Splits:
  """Reads data.source and returns train/validation/test splits as uint8 HWC images.

  The config must have passed `config_lib.validate`; the source's availability is checked here
  (one line saying how to get the files) before anything is read.
  """
  check_available(data_config)
  if data_config.source == "local":
    raw = local_files.read_local(data_config)
  elif data_config.source == "tfds":
    raw = tfds_source.read_tfds(data_config)
  else:
    raw = synthetic.make_synthetic(data_config.dataset, data_config.label_type,
                                   _synthetic_classes(data_config))
  if data_config.subset or data_config.classes:
    raw = _select(raw, cifar.class_names(data_config))

  n = len(raw.train_images)
  val_size = int(data_config.validation_size)
  if val_size >= n:
    raise UserError(
      f"data.validation_size ({val_size}) must be smaller than the training set ({n} images)"
    )
  order = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = order[:val_size], order[val_size:]
  max_train = int(data_config.max_train_examples)
  max_test = int(data_config.max_test_examples)
  per_class = int(data_config.max_train_per_class)
  if per_class:
    train_idx = _first_per_class(train_idx, raw.train_labels, per_class)
  if max_train:
    train_idx = train_idx[:max_train]
  test_images, test_labels = raw.test_images, raw.test_labels
  if max_test:
    test_images, test_labels = test_images[:max_test], test_labels[:max_test]
  val_images, val_labels = raw.train_images[val_idx], raw.train_labels[val_idx]
  if data_config.validate_on_test:  # the course project's (and the Caffe run's) practice
    val_images, val_labels = test_images, test_labels
  return Splits(
    train_images=raw.train_images[train_idx],
    train_labels=raw.train_labels[train_idx].astype(np.int32),
    val_images=val_images,
    val_labels=val_labels.astype(np.int32),
    test_images=np.ascontiguousarray(test_images),
    test_labels=np.ascontiguousarray(test_labels, dtype=np.int32),
    class_names=raw.class_names,
  )


# ----------------------------------------------------------------------------- on the devices


def make_mesh() -> Mesh:
  """A one-axis ('data') mesh over every device of every process."""
  return Mesh(np.array(jax.devices()), ("data",))


def replicate(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array with a full copy on every device (works across hosts)."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """`replicate` for every leaf of a tree of host or single-device arrays.

  Through host memory on purpose: with several processes, `jax.device_put` of a single-device
  jax array onto a mesh that spans processes gives a broken array (seen with jax 0.10.2).
  """
  return jax.tree_util.tree_map(lambda x: replicate(np.asarray(x), mesh), tree)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """An evaluation split padded and cut into batches: (num_batches, batch, ...) plus a mask."""
  images: jax.Array
  labels: jax.Array
  mask: jax.Array
  size: int


def make_eval_set(images: np.ndarray, labels: np.ndarray, batch: int, mesh: Mesh) -> EvalSet:
  """A split padded to whole batches of at least `batch` (a multiple of the device count)."""
  n = len(labels)
  batch = max(1, min(batch, n)) if n else 1
  batch = -(-batch // mesh.size) * mesh.size
  nb = max(1, -(-n // batch)) if n else 0
  pad = nb * batch - n
  imgs = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labs = np.concatenate([labels, np.zeros((pad,), labels.dtype)]).astype(np.int32)
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return EvalSet(replicate(imgs.reshape(nb, batch, *images.shape[1:]), mesh),
                 replicate(labs.reshape(nb, batch), mesh), replicate(mask.reshape(nb, batch),
                                                                     mesh), n)


def check_batch(batch_size: int, num_train: int, mesh: Mesh) -> None:
  """The batch must fit the training set and split evenly over the devices."""
  if batch_size > num_train:
    raise UserError(f"batch_size ({batch_size}) is larger than the training set "
                    f"({num_train} images)")
  if batch_size % mesh.size:
    raise UserError(f"batch_size ({batch_size}) must be a multiple of the number of devices "
                    f"({mesh.size})")


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """The preprocessed splits on the devices: the training set whole, the others in batches."""
  train_images: jax.Array
  train_labels: jax.Array
  val: EvalSet
  test: EvalSet
  class_names: tuple[str, ...]

  @property
  def num_train(self) -> int:
    return int(self.train_labels.shape[0])


def put_on_devices(splits: Splits, stats: dict[str, Any], eval_batch_size: int,
                   mesh: Mesh) -> DeviceData:
  """Preprocesses every split with the fitted statistics and puts it on the devices."""

  def prep(x: np.ndarray) -> np.ndarray:
    return apply_preprocessing(stats, x)

  return DeviceData(
      train_images=replicate(prep(splits.train_images), mesh),
      train_labels=replicate(splits.train_labels.astype(np.int32), mesh),
      val=make_eval_set(prep(splits.val_images), splits.val_labels, eval_batch_size, mesh),
      test=make_eval_set(prep(splits.test_images), splits.test_labels, eval_batch_size, mesh),
      class_names=splits.class_names)
