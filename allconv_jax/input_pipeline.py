"""CIFAR-10/100 loading, subsets, validation split, preprocessing and augmentation.

Sources (``data.source``):
  * ``local``: the folders people download from https://www.cs.toronto.edu/~kriz/cifar.html
    (python or binary version), read with numpy only;
  * ``tfds``: TensorFlow Datasets (imported lazily, only for this source);
  * ``synthetic``: a small deterministic stand-in with a learnable signal, no files.

Images are uint8 (N, 32, 32, 3) HWC RGB and labels int32 (N,) until `apply_preprocessing`, which
returns float32. GCN + ZCA follows pylearn2's ``make_cifar10_gcn_whitened.py`` as used by the
maxout paper and, through it, by Springenberg et al. (2015).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pickle
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from allconv_jax.errors import UserError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

CIFAR10_CLASSES: tuple[str, ...] = (
  "airplane", "automobile", "bird", "cat", "deer",
  "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

CIFAR100_FINE: tuple[str, ...] = (
  "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
  "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
  "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
  "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
  "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
  "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
  "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
  "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
  "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
  "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
  "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
  "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
  "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
  "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

# The 20 superclasses in their standard label order, each with its 5 fine classes.
_SUPERCLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("aquatic_mammals", ("beaver", "dolphin", "otter", "seal", "whale")),
  ("fish", ("aquarium_fish", "flatfish", "ray", "shark", "trout")),
  ("flowers", ("orchid", "poppy", "rose", "sunflower", "tulip")),
  ("food_containers", ("bottle", "bowl", "can", "cup", "plate")),
  ("fruit_and_vegetables", ("apple", "mushroom", "orange", "pear", "sweet_pepper")),
  ("household_electrical_devices", ("clock", "keyboard", "lamp", "telephone", "television")),
  ("household_furniture", ("bed", "chair", "couch", "table", "wardrobe")),
  ("insects", ("bee", "beetle", "butterfly", "caterpillar", "cockroach")),
  ("large_carnivores", ("bear", "leopard", "lion", "tiger", "wolf")),
  ("large_man-made_outdoor_things", ("bridge", "castle", "house", "road", "skyscraper")),
  ("large_natural_outdoor_scenes", ("cloud", "forest", "mountain", "plain", "sea")),
  ("large_omnivores_and_herbivores", ("camel", "cattle", "chimpanzee", "elephant", "kangaroo")),
  ("medium_mammals", ("fox", "porcupine", "possum", "raccoon", "skunk")),
  ("non-insect_invertebrates", ("crab", "lobster", "snail", "spider", "worm")),
  ("people", ("baby", "boy", "girl", "man", "woman")),
  ("reptiles", ("crocodile", "dinosaur", "lizard", "snake", "turtle")),
  ("small_mammals", ("hamster", "mouse", "rabbit", "shrew", "squirrel")),
  ("trees", ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree")),
  ("vehicles_1", ("bicycle", "bus", "motorcycle", "pickup_truck", "train")),
  ("vehicles_2", ("lawn_mower", "rocket", "streetcar", "tank", "tractor")),
)
CIFAR100_COARSE: tuple[str, ...] = tuple(name for name, _ in _SUPERCLASSES)
# Coarse label of each fine label (index = fine label).
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = tuple(
  next(ci for ci, (_, members) in enumerate(_SUPERCLASSES) if fine in members)
  for fine in CIFAR100_FINE
)

# Two 10-class CIFAR-100 subsets (500 train + 100 test images per class) for transfer from
# CIFAR-10: class1 is close to CIFAR-10's vehicles and animals, class2 far from them.
SUBSETS: dict[str, tuple[str, ...]] = {
  "class1": (
    "bus", "pickup_truck", "streetcar", "train", "motorcycle",
    "leopard", "tiger", "wolf", "fox", "cattle",
  ),
  "class2": (
    "maple_tree", "orchid", "sunflower", "apple", "sweet_pepper",
    "chair", "table", "clock", "lamp", "keyboard",
  ),
}  # fmt: skip

SOURCES = ("tfds", "local", "synthetic")
DATASETS = ("cifar10", "cifar100")
LABEL_TYPES = ("fine", "coarse")
PREPROCESSINGS = ("meanstd", "gcn_zca", "none")

# The course project's per-channel constants for 'meanstd' (on x / 255).
MEANSTD_MEAN = (0.4914, 0.4822, 0.4465)
MEANSTD_STD = (0.2023, 0.1994, 0.2010)

IMAGE_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3
_CHUNK = 4096  # images per chunk in the preprocessing passes (bounds the float buffers)
_SYNTHETIC_SEED = 20150413  # fixed: synthetic data does not depend on the run seed
_SYNTHETIC_SIZES = (5000, 1000)

# On-disk layouts: (folder name, format, required files, optional meta files).
_LAYOUTS: dict[str, tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]] = {
  "cifar10": (
    ("cifar-10-batches-py", "python",
     tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",), ("batches.meta",)),
    ("cifar-10-batches-bin", "binary",
     tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",),
     ("batches.meta.txt",)),
  ),
  "cifar100": (
    ("cifar-100-python", "python", ("train", "test"), ("meta",)),
    ("cifar-100-binary", "binary", ("train.bin", "test.bin"),
     ("fine_label_names.txt", "coarse_label_names.txt")),
  ),
}  # fmt: skip
_DISPLAY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_ARCHIVES = {
  "cifar10": ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"),
  "cifar100": ("cifar-100-python.tar.gz", "cifar-100-binary.tar.gz"),
}


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


@dataclasses.dataclass(frozen=True, eq=False)
class _Raw:
  """A dataset as read from its source, in the label space of data.label_type."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any) -> Any:
  return getattr(cfg, key, default)


def _parse_classes(text: str) -> tuple[str, ...]:
  if not text or not text.strip():
    return ()
  return tuple(name.strip() for name in text.split(","))


def _base_names(dataset: str, label_type: str) -> tuple[str, ...]:
  if dataset == "cifar10":
    return CIFAR10_CLASSES
  return CIFAR100_FINE if label_type == "fine" else CIFAR100_COARSE


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise UserError(f"unknown data.{key} {value!r}; choose one of {', '.join(allowed)}")


def check_config(data_config: Any) -> None:
  """Raises UserError for an invalid data config; does no I/O."""
  source = _get(data_config, "source", "tfds")
  dataset = _get(data_config, "dataset", "cifar10")
  label_type = _get(data_config, "label_type", "fine")
  subset = _get(data_config, "subset", "")
  classes = _get(data_config, "classes", "")
  preprocessing = _get(data_config, "preprocessing", "gcn_zca")
  _choice("source", source, SOURCES)
  _choice("dataset", dataset, DATASETS)
  _choice("label_type", label_type, LABEL_TYPES)
  _choice("preprocessing", preprocessing, PREPROCESSINGS)
  _choice("subset", subset, ("",) + tuple(SUBSETS))
  if source == "local" and not str(_get(data_config, "dir", "")).strip():
    raise UserError(
      "data.source=local needs data.dir: the folder that holds "
      f"{' or '.join(name + '/' for name, *_ in _LAYOUTS[dataset])} (from {CIFAR_URL})"
    )
  if subset and classes:
    raise UserError(f"set data.subset ({subset!r}) or data.classes ({classes!r}), not both")
  if subset and (dataset != "cifar100" or label_type != "fine"):
    raise UserError(
      f"data.subset={subset} needs data.dataset=cifar100 and data.label_type=fine "
      f"(got {dataset}, {label_type})"
    )
  names = _parse_classes(classes)
  if names:
    base = _base_names(dataset, label_type)
    space = f"{dataset}" + (f" {label_type}" if dataset == "cifar100" else "")
    if any(not n for n in names):
      raise UserError(f"data.classes {classes!r} has an empty name; use a,b,c")
    unknown = [n for n in names if n not in base]
    if unknown:
      raise UserError(
        f"unknown class names in data.classes for {space}: {', '.join(unknown)} "
        f"(known: {base[0]}, {base[1]}, ... see input_pipeline.py)"
      )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise UserError(f"data.classes repeats {', '.join(duplicates)}")
    if len(names) < 2:
      raise UserError(f"data.classes needs at least 2 class names (got {classes!r})")
  for key in ("validation_size", "max_train_examples", "max_train_per_class",
              "max_test_examples"):
    value = _get(data_config, key, 0)
    if int(value) != value or value < 0:
      raise UserError(f"data.{key} must be an integer >= 0 (got {value})")
  if data_config.validate_on_test and data_config.validation_size:
    raise UserError(
      f"data.validate_on_test=True uses the test set for validation: set "
      f"data.validation_size=0 (got {data_config.validation_size})"
    )
  translate = _get(data_config, "translate_pixels", 5)
  if int(translate) != translate or not 0 <= translate < 32:
    raise UserError(f"data.translate_pixels must be an integer in [0, 32) (got {translate})")
  gcn_scale = _get(data_config, "gcn_scale", 55.0)
  if not 0 < gcn_scale < math.inf:
    raise UserError(f"data.gcn_scale must be a finite number > 0 (got {gcn_scale})")
  eps = _get(data_config, "zca_epsilon", 0.1)
  if not 0 <= eps < math.inf:
    raise UserError(f"data.zca_epsilon must be a finite number >= 0 (got {eps})")
  if preprocessing == "gcn_zca" and eps == 0:
    raise UserError(
      "data.zca_epsilon must be > 0 for gcn_zca: GCN makes the covariance singular "
      "(pylearn2 used 0.1)"
    )


def class_names(data_config: Any) -> tuple[str, ...]:
  """The label space after data.label_type and data.subset/classes; no I/O."""
  check_config(data_config)
  dataset = _get(data_config, "dataset", "cifar10")
  label_type = _get(data_config, "label_type", "fine")
  subset = _get(data_config, "subset", "")
  if subset:
    return SUBSETS[subset]
  names = _parse_classes(_get(data_config, "classes", ""))
  return names or _base_names(dataset, label_type)


def num_classes(data_config: Any) -> int:
  """Number of classes the model must output."""
  return len(class_names(data_config))


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------


def _how_to_get(dataset: str) -> str:
  return (
    f"download the python version of {_DISPLAY[dataset]} from {CIFAR_URL} and extract it there, "
    "or use data.source=tfds when online"
  )


def _find_local(data_dir: str, dataset: str) -> tuple[str, str]:
  """Returns (folder, 'python'|'binary') of the complete CIFAR folder under data_dir."""
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  layouts = _LAYOUTS[dataset]
  expected = " or ".join(name + "/" for name, *_ in layouts)
  if not os.path.isdir(data_dir):
    raise UserError(
      f"data.dir {data_dir} does not exist; expected {expected} under it: {_how_to_get(dataset)}"
    )
  candidates = [(os.path.join(data_dir, name), ((fmt, req),)) for name, fmt, req, _ in layouts]
  candidates.append((data_dir, tuple((fmt, req) for _, fmt, req, _ in layouts)))
  incomplete = []
  for folder, options in candidates:
    if not os.path.isdir(folder):
      continue
    for fmt, required in options:
      missing = [f for f in required if not os.path.isfile(os.path.join(folder, f))]
      if not missing:
        return folder, fmt
      if folder != data_dir or len(missing) < len(required):
        incomplete.append(f"{folder} is incomplete ({fmt} format): missing {', '.join(missing)}")
  if incomplete:
    raise UserError(f"{incomplete[0]}; {_how_to_get(dataset)}")
  archives = [a for a in _ARCHIVES[dataset] if os.path.isfile(os.path.join(data_dir, a))]
  if archives:
    raise UserError(
      f"{os.path.join(data_dir, archives[0])} is not extracted; run: "
      f"tar xzf {os.path.join(data_dir, archives[0])} -C {data_dir}"
    )
  raise UserError(
    f"no {_DISPLAY[dataset]} files in {data_dir}: expected {expected} under it; "
    f"{_how_to_get(dataset)}"
  )


def check_available(data_config: Any) -> None:
  """Cheap check that data.source can deliver the data; UserError saying how to fix it."""
  check_config(data_config)
  source = _get(data_config, "source", "tfds")
  if source == "local":
    _find_local(str(_get(data_config, "dir", "")), _get(data_config, "dataset", "cifar10"))
  elif source == "tfds":
    for module in ("tensorflow", "tensorflow_datasets"):
      if importlib.util.find_spec(module) is None:
        raise UserError(
          f"data.source=tfds needs {module}: pip install tensorflow-cpu tensorflow-datasets, "
          "or use data.source=local"
        )


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def _reconstruct() -> Any:
  try:
    from numpy._core.multiarray import _reconstruct
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
  return _reconstruct


def _scalar() -> Any:
  try:
    from numpy._core.multiarray import scalar
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar
  return scalar


class _CifarUnpickler(pickle.Unpickler):
  """Unpickles only what CIFAR python files hold: dicts, lists, strings and numpy arrays."""

  def find_class(self, module: str, name: str) -> Any:
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
      if name == "_reconstruct":
        return _reconstruct()
      if name == "scalar":
        return _scalar()
    if (module, name) == ("numpy", "ndarray"):
      return np.ndarray
    if (module, name) == ("numpy", "dtype"):
      return np.dtype
    if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3 at protocol < 3
      import codecs

      return codecs.encode
    raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _corrupt(path: str, why: str) -> UserError:
  return UserError(f"{path} is truncated or corrupt ({why}); download it again from {CIFAR_URL}")


def _read_pickle(path: str) -> dict[str, Any]:
  try:
    with open(path, "rb") as f:
      obj = _CifarUnpickler(f, encoding="bytes").load()
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror or e}") from e
  except Exception as e:  # any unpickling failure means a bad file
    raise _corrupt(path, f"{type(e).__name__}: {_one_line(e)}") from e
  if not isinstance(obj, dict):
    raise _corrupt(path, f"holds a {type(obj).__name__}, not a dict")
  return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _pickled_batch(
  path: str, label_keys: Sequence[str], num: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
  """Reads one python-format batch: HWC uint8 images and one label array per key."""
  obj = _read_pickle(path)
  data = obj.get("data")
  if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _PIXELS:
    shape = getattr(data, "shape", None)
    raise _corrupt(path, f"'data' is not a N x {_PIXELS} array (got {shape})")
  if data.dtype != np.uint8:
    raise _corrupt(path, f"'data' has dtype {data.dtype}, not uint8")
  labels = []
  for key, k in zip(label_keys, num, strict=True):
    if key not in obj:
      raise _corrupt(path, f"no '{key}' entry")
    try:
      lab = np.asarray(obj[key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
      raise _corrupt(path, f"bad '{key}'") from e
    labels.append(_check_labels(path, lab, len(data), k))
  return _rows_to_hwc(data), labels


def _check_labels(path: str, labels: np.ndarray, n: int, k: int) -> np.ndarray:
  if len(labels) != n:
    raise _corrupt(path, f"{len(labels)} labels for {n} images")
  if n and (labels.min() < 0 or labels.max() >= k):
    raise _corrupt(path, f"labels outside 0..{k - 1}")
  return labels.astype(np.int32)


def _rows_to_hwc(rows: np.ndarray) -> np.ndarray:
  """(N, 3072) R, G, B planes -> (N, 32, 32, 3)."""
  return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _binary_records(path: str, label_bytes: int, num: Sequence[int]) -> tuple[np.ndarray, ...]:
  """Reads a binary-format file: HWC uint8 images and one label array per label byte."""
  record = label_bytes + _PIXELS
  try:
    size = os.path.getsize(path)
    if size == 0 or size % record:
      raise _corrupt(path, f"{size} bytes is not a positive multiple of the {record}-byte record")
    raw = np.fromfile(path, dtype=np.uint8)
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror or e}") from e
  if raw.size != size:
    raise _corrupt(path, f"read {raw.size} of {size} bytes")
  raw = raw.reshape(-1, record)
  labels = [
    _check_labels(path, raw[:, i].astype(np.int64), len(raw), num[i]) for i in range(label_bytes)
  ]
  return (_rows_to_hwc(raw[:, label_bytes:]), *labels)


def _meta_names(folder: str, fmt: str, dataset: str) -> tuple[tuple[str, ...], ...]:
  """Class names from the meta files when present (fine, coarse for CIFAR-100)."""
  if dataset == "cifar10":
    wanted: tuple[tuple[str, tuple[str, ...]], ...] = (("label_names", CIFAR10_CLASSES),)
    files = ("batches.meta",) if fmt == "python" else ("batches.meta.txt",)
  else:
    wanted = (("fine_label_names", CIFAR100_FINE), ("coarse_label_names", CIFAR100_COARSE))
    files = ("meta",) if fmt == "python" else ("fine_label_names.txt", "coarse_label_names.txt")
  result = []
  for i, (key, standard) in enumerate(wanted):
    path = os.path.join(folder, files[0 if fmt == "python" else i])
    if not os.path.isfile(path):
      result.append(standard)
      continue
    if fmt == "python":
      raw = _read_pickle(path).get(key)
      if not isinstance(raw, list):
        raise _corrupt(path, f"no '{key}' list")
      names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in raw]
    else:
      try:
        with open(path, encoding="latin1") as f:
          names = [line.strip() for line in f if line.strip()]
      except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    if len(names) != len(standard):
      raise _corrupt(path, f"{len(names)} class names, expected {len(standard)}")
    result.append(tuple(names))
  return tuple(result)


def _read_batch(path: str, fmt: str, dataset: str) -> tuple[np.ndarray, list[np.ndarray]]:
  """Images and labels of one file: [labels] (CIFAR-10) or [fine, coarse] (CIFAR-100)."""
  if dataset == "cifar10":
    if fmt == "python":
      return _pickled_batch(path, ("labels",), (10,))
    images, labels = _binary_records(path, 1, (10,))
    return images, [labels]
  if fmt == "python":
    return _pickled_batch(path, ("fine_labels", "coarse_labels"), (100, 20))
  images, coarse, fine = _binary_records(path, 2, (20, 100))
  return images, [fine, coarse]


def _read_local(data_config: Any) -> _Raw:
  dataset = _get(data_config, "dataset", "cifar10")
  coarse = dataset == "cifar100" and _get(data_config, "label_type", "fine") == "coarse"
  which = 1 if coarse else 0
  folder, fmt = _find_local(str(_get(data_config, "dir", "")), dataset)
  names = _meta_names(folder, fmt, dataset)[which]
  _, _, required, _ = next(layout for layout in _LAYOUTS[dataset] if layout[1] == fmt)
  parts = [_read_batch(os.path.join(folder, f), fmt, dataset) for f in required]
  train, (test_images, test_labels) = parts[:-1], parts[-1]  # the test file comes last
  train_images = train[0][0] if len(train) == 1 else np.concatenate([im for im, _ in train])
  train_labels = np.concatenate([labels[which] for _, labels in train])
  return _Raw(train_images, train_labels, test_images, test_labels[which], names)


# ---------------------------------------------------------------------------------------------
# TFDS and synthetic
# ---------------------------------------------------------------------------------------------


def _one_line(e: BaseException, limit: int = 200) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_tfds(data_config: Any) -> _Raw:
  dataset = _get(data_config, "dataset", "cifar10")
  data_dir = str(_get(data_config, "dir", "")) or None
  coarse = dataset == "cifar100" and _get(data_config, "label_type", "fine") == "coarse"
  label_key = "coarse_label" if coarse else "label"
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise UserError(
      f"data.source=tfds could not import TensorFlow ({_one_line(e)}): pip install "
      "tensorflow-cpu tensorflow-datasets, or use data.source=local"
    ) from e
  try:  # keep TensorFlow off the accelerator JAX uses
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass
  arrays = []
  for split in ("train", "test"):
    try:
      ds = tfds.load(dataset, split=split, data_dir=data_dir, shuffle_files=False)
      images, labels = [], []
      # Iterate in batches: batch_size=-1 aborted the process under tfds.testing.mock_data.
      for batch in tfds.as_numpy(ds.batch(1000)):
        images.append(np.asarray(batch["image"], dtype=np.uint8))
        labels.append(np.asarray(batch[label_key], dtype=np.int32))
    except Exception as e:  # tfds raises many types (not prepared, offline, ...)
      raise UserError(
        f"tensorflow_datasets could not load {dataset} {split} "
        f"(data_dir={data_dir or 'default'}): {type(e).__name__}: {_one_line(e)}; "
        f"offline, use data.source=local with the files from {CIFAR_URL}"
      ) from e
    if not images:
      raise UserError(f"tensorflow_datasets returned no {split} images for {dataset}")
    arrays.append((np.concatenate(images), np.concatenate(labels)))
  (train_images, train_labels), (test_images, test_labels) = arrays
  names = _base_names(dataset, "coarse" if coarse else "fine")
  return _Raw(train_images, train_labels, test_images, test_labels, names)


def _synthetic(dataset: str, label_type: str) -> _Raw:
  """Deterministic smooth per-class templates plus noise; learnable within a few epochs."""
  k = 10 if dataset == "cifar10" else 100
  rng = np.random.default_rng(_SYNTHETIC_SEED + k)
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
  for n in _SYNTHETIC_SIZES:
    labels = rng.permutation(np.arange(n) % k).astype(np.int32)
    noise = rng.normal(0.0, 32.0, size=(n, 32, 32, 3)).astype(np.float32)
    brightness = rng.normal(0.0, 12.0, size=(n, 1, 1, 1)).astype(np.float32)
    images = np.clip(np.rint(templates[labels] + noise + brightness), 0, 255).astype(np.uint8)
    arrays.append((images, labels))
  (train_images, train_labels), (test_images, test_labels) = arrays
  if dataset == "cifar100" and label_type == "coarse":
    to_coarse = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int32)
    train_labels, test_labels = to_coarse[train_labels], to_coarse[test_labels]
  names = _base_names(dataset, label_type)
  return _Raw(train_images, train_labels, test_images, test_labels, names)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _select(raw: _Raw, names: tuple[str, ...]) -> _Raw:
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
  return _Raw(*train, *test, names)


def _first_per_class(idx: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
  """The indices of `idx`, in order, keeping at most `limit` of each label."""
  rank = np.zeros(len(idx), dtype=np.int64)
  for label in np.unique(labels[idx]):
    where = labels[idx] == label
    rank[where] = np.arange(where.sum())
  return idx[rank < limit]


def load_splits(data_config: Any, seed: int) -> Splits:
  """Reads data.source and returns train/validation/test splits as uint8 HWC images."""
  check_config(data_config)
  check_available(data_config)
  source = _get(data_config, "source", "tfds")
  if source == "local":
    raw = _read_local(data_config)
  elif source == "tfds":
    raw = _read_tfds(data_config)
  else:
    dataset, label_type = (
      _get(data_config, "dataset", "cifar10"),
      _get(data_config, "label_type", "fine"),
    )
    raw = _synthetic(dataset, label_type)
  subset = _get(data_config, "subset", "")
  selected = SUBSETS[subset] if subset else _parse_classes(_get(data_config, "classes", ""))
  if selected:
    raw = _select(raw, selected)

  n = len(raw.train_images)
  val_size = int(_get(data_config, "validation_size", 1000))
  if val_size >= n:
    raise UserError(
      f"data.validation_size ({val_size}) must be smaller than the training set ({n} images)"
    )
  order = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = order[:val_size], order[val_size:]
  max_train = int(_get(data_config, "max_train_examples", 0))
  max_test = int(_get(data_config, "max_test_examples", 0))
  per_class = int(_get(data_config, "max_train_per_class", 0))
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


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _check_images(images: np.ndarray) -> None:
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"expected images of shape (N, 32, 32, 3), got {images.shape}")


def _gcn(rows: np.ndarray, scale: float) -> np.ndarray:
  """pylearn2 global_contrast_normalize(scale=scale): zero mean, L2 norm `scale` per row."""
  x = rows.astype(np.float64)
  x -= x.mean(axis=1, keepdims=True)
  divisor = np.sqrt(np.square(x).sum(axis=1, keepdims=True)) / scale
  divisor[divisor < 1e-8] = 1.0
  x /= divisor
  return x


def _zca_matrix(
  centred: np.ndarray | None, cov: np.ndarray | None, n: int, eps: float
) -> np.ndarray:
  """W = V diag(1/sqrt(eig + eps)) V^T, from the covariance or (N < D) an SVD of the data."""
  if cov is not None:
    eig, vec = np.linalg.eigh(cov)
    eig = np.maximum(eig, 0.0)
    return (vec * (1.0 / np.sqrt(eig + eps))) @ vec.T
  assert centred is not None
  _, s, vt = np.linalg.svd(centred / np.sqrt(n), full_matrices=False)
  # Null-space directions have eigenvalue 0 and get the factor 1/sqrt(eps).
  d = centred.shape[1]
  scale = 1.0 / np.sqrt(s**2 + eps) - 1.0 / np.sqrt(eps)
  return np.eye(d) / np.sqrt(eps) + (vt.T * scale) @ vt


def fit_preprocessing(data_config: Any, train_images: np.ndarray) -> dict[str, np.ndarray]:
  """Fits data.preprocessing on the training images only; returns numpy statistics."""
  check_config(data_config)
  kind = _get(data_config, "preprocessing", "gcn_zca")
  stats: dict[str, np.ndarray] = {"kind": np.array(kind)}
  if kind == "none":
    return stats
  if kind == "meanstd":
    stats["mean"] = np.asarray(MEANSTD_MEAN, dtype=np.float32)
    stats["std"] = np.asarray(MEANSTD_STD, dtype=np.float32)
    return stats
  _check_images(train_images)
  n = len(train_images)
  if n < 2:
    raise UserError(f"gcn_zca needs at least 2 training images to fit (got {n})")
  scale = float(_get(data_config, "gcn_scale", 55.0))
  eps = float(_get(data_config, "zca_epsilon", 0.1))
  rows = train_images.reshape(n, _PIXELS)
  if n < _PIXELS:
    x = _gcn(rows, scale)
    mean = x.mean(axis=0)
    x -= mean
    whitening = _zca_matrix(x, None, n, eps)
  else:
    # Two passes over chunks (mean, then covariance of the centred data) in float64.
    total = np.zeros(_PIXELS)
    for i in range(0, n, _CHUNK):
      total += _gcn(rows[i : i + _CHUNK], scale).sum(axis=0)
    mean = total / n
    cov = np.zeros((_PIXELS, _PIXELS))
    for i in range(0, n, _CHUNK):
      x = _gcn(rows[i : i + _CHUNK], scale) - mean
      cov += x.T @ x
    cov /= n  # pylearn2 divides by N
    whitening = _zca_matrix(None, cov, n, eps)
  stats.update(
    gcn_scale=np.array(scale),
    zca_epsilon=np.array(eps),
    mean=mean.astype(np.float32),
    whitening=whitening.astype(np.float32),
  )
  return stats


def _kind(stats: dict[str, Any]) -> str:
  if "kind" not in stats:
    raise ValueError("preprocessing statistics have no 'kind'")
  return str(np.asarray(stats["kind"]))


_REQUIRED_STATS = {
  "none": (),
  "meanstd": ("mean", "std"),
  "gcn_zca": ("gcn_scale", "zca_epsilon", "mean", "whitening"),
}


def apply_preprocessing(stats: dict[str, Any], images: np.ndarray) -> np.ndarray:
  """Maps uint8 images to float32 (N, 32, 32, 3) with fitted statistics, chunk by chunk."""
  _check_images(images)
  kind = _kind(stats)
  if kind not in _REQUIRED_STATS:
    raise ValueError(f"unknown preprocessing kind {kind!r}")
  n = len(images)
  out = np.empty(images.shape, dtype=np.float32)
  if kind == "gcn_zca":
    scale = float(stats["gcn_scale"])
    mean = np.asarray(stats["mean"], dtype=np.float32)
    whitening = np.asarray(stats["whitening"], dtype=np.float32)
    rows, flat = images.reshape(n, _PIXELS), out.reshape(n, _PIXELS)
    for i in range(0, n, _CHUNK):
      x = _gcn(rows[i : i + _CHUNK], scale).astype(np.float32) - mean
      np.matmul(x, whitening, out=flat[i : i + _CHUNK])
    return out
  for i in range(0, n, _CHUNK):
    x = images[i : i + _CHUNK].astype(np.float32) / 255.0
    if kind == "meanstd":
      x = (x - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
    out[i : i + _CHUNK] = x
  return out


def save_preprocessing(path: str, stats: dict[str, np.ndarray]) -> None:
  """Writes the statistics to `path` (.npz content) atomically."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in stats.items()})
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_preprocessing(path: str) -> dict[str, np.ndarray]:
  """Reads statistics written by `save_preprocessing`; UserError if missing or damaged."""
  if not os.path.isfile(path):
    raise UserError(f"preprocessing statistics {path} not found")
  try:
    with np.load(path, allow_pickle=False) as f:
      stats = {k: f[k] for k in f.files}
  except Exception as e:  # zip/npy errors of a damaged file
    raise UserError(f"preprocessing statistics {path} are corrupt: {_one_line(e)}") from e
  kind = str(stats["kind"]) if "kind" in stats else None
  if kind not in _REQUIRED_STATS or any(k not in stats for k in _REQUIRED_STATS[kind]):
    raise UserError(f"preprocessing statistics {path} are incomplete (kind={kind})")
  return stats


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def augment(key: jax.Array, images: jax.Array, *, flip: bool, translate: int) -> jax.Array:
  """Random horizontal flips (p=0.5) and translations by up to `translate` pixels (zero fill)."""
  if translate < 0:
    raise ValueError(f"translate must be >= 0, got {translate}")
  if not flip and translate == 0:
    return images
  flip_key, shift_key = jax.random.split(key)
  n, h, w, c = images.shape
  if translate:
    t = translate
    padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)))
    offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * t + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
    images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
  return images
