"""The official CIFAR folders on disk (python or binary version): finding them, with a one-line
fix for every way they can be missing, and reading them with numpy only (pickles through a
restricted unpickler that builds nothing but arrays, lists, dicts and strings)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from allconv_jax.data.cifar import (
  ARCHIVES,
  CIFAR10_CLASSES,
  CIFAR100_COARSE,
  CIFAR100_FINE,
  CIFAR_URL,
  DISPLAY,
  LAYOUTS,
  PIXELS,
  Raw,
)
from allconv_jax.errors import UserError, one_line


def how_to_get(dataset: str) -> str:
  return (
    f"download the python version of {DISPLAY[dataset]} from {CIFAR_URL} and extract it there, "
    "or use data.source=tfds when online"
  )


def find_local(data_dir: str, dataset: str) -> tuple[str, str]:
  """Returns (folder, 'python'|'binary') of the complete CIFAR folder under data_dir."""
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  layouts = LAYOUTS[dataset]
  expected = " or ".join(name + "/" for name, *_ in layouts)
  if not os.path.isdir(data_dir):
    raise UserError(
      f"data.dir {data_dir} does not exist; expected {expected} under it: {how_to_get(dataset)}"
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
    raise UserError(f"{incomplete[0]}; {how_to_get(dataset)}")
  archives = [a for a in ARCHIVES[dataset] if os.path.isfile(os.path.join(data_dir, a))]
  if archives:
    raise UserError(
      f"{os.path.join(data_dir, archives[0])} is not extracted; run: "
      f"tar xzf {os.path.join(data_dir, archives[0])} -C {data_dir}"
    )
  raise UserError(
    f"no {DISPLAY[dataset]} files in {data_dir}: expected {expected} under it; "
    f"{how_to_get(dataset)}"
  )


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
    raise _corrupt(path, f"{type(e).__name__}: {one_line(e)}") from e
  if not isinstance(obj, dict):
    raise _corrupt(path, f"holds a {type(obj).__name__}, not a dict")
  return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _pickled_batch(
  path: str, label_keys: Sequence[str], num: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
  """Reads one python-format batch: HWC uint8 images and one label array per key."""
  obj = _read_pickle(path)
  data = obj.get("data")
  if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != PIXELS:
    shape = getattr(data, "shape", None)
    raise _corrupt(path, f"'data' is not a N x {PIXELS} array (got {shape})")
  if data.dtype != np.uint8:
    raise _corrupt(path, f"'data' has dtype {data.dtype}, not uint8")
  labels = []
  for key, k in zip(label_keys, num, strict=True):
    if key not in obj:
      raise _corrupt(path, f"no '{key}' entry")
    try:  # as stored: a cast to int64 here would truncate float labels before the check
      lab = np.asarray(obj[key]).reshape(-1)
    except (TypeError, ValueError) as e:
      raise _corrupt(path, f"bad '{key}'") from e
    labels.append(_check_labels(path, lab, len(data), k))
  return _rows_to_hwc(data), labels


def _check_labels(path: str, labels: np.ndarray, n: int, k: int) -> np.ndarray:
  if len(labels) != n:
    raise _corrupt(path, f"{len(labels)} labels for {n} images")
  labels = np.asarray(labels)
  if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f"
                                            and np.array_equal(labels, np.round(labels))):
    raise _corrupt(path, f"labels are not whole numbers (dtype {labels.dtype})")
  if n and (labels.min() < 0 or labels.max() >= k):
    raise _corrupt(path, f"labels outside 0..{k - 1}")
  return labels.astype(np.int32)


def _rows_to_hwc(rows: np.ndarray) -> np.ndarray:
  """(N, 3072) R, G, B planes -> (N, 32, 32, 3)."""
  return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _binary_records(path: str, label_bytes: int, num: Sequence[int]) -> tuple[np.ndarray, ...]:
  """Reads a binary-format file: HWC uint8 images and one label array per label byte."""
  record = label_bytes + PIXELS
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


def read_local(data_config: Any) -> Raw:
  dataset = data_config.dataset
  coarse = dataset == "cifar100" and data_config.label_type == "coarse"
  which = 1 if coarse else 0
  folder, fmt = find_local(str(data_config.dir), dataset)
  names = _meta_names(folder, fmt, dataset)[which]
  _, _, required, _ = next(layout for layout in LAYOUTS[dataset] if layout[1] == fmt)
  parts = [_read_batch(os.path.join(folder, f), fmt, dataset) for f in required]
  train, (test_images, test_labels) = parts[:-1], parts[-1]  # the test file comes last
  train_images = train[0][0] if len(train) == 1 else np.concatenate([im for im, _ in train])
  train_labels = np.concatenate([labels[which] for _, labels in train])
  return Raw(train_images, train_labels, test_images, test_labels[which], names)
