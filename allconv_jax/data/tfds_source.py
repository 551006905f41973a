"""TensorFlow Datasets as a source (imported lazily: only this source needs TensorFlow)."""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np

from allconv_jax.data.cifar import CIFAR_URL, Raw, base_names
from allconv_jax.errors import UserError, one_line
from allconv_jax.tensorflow_env import quiet_tensorflow

DOWNLOAD_HOST = ("storage.googleapis.com", 443)  # where tfds downloads CIFAR from
ONLINE_TIMEOUT_SEC = 3.0


def prepared(dataset: str, data_dir: str) -> bool:
  """Whether tfds has `dataset` prepared in `data_dir` (or its default folder)."""
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")
  folder = os.path.join(root, dataset)
  return os.path.isdir(folder) and any(
      os.path.isfile(os.path.join(here, "dataset_info.json")) for here, _, _ in os.walk(folder))


def online(timeout: float = ONLINE_TIMEOUT_SEC) -> bool:
  """Whether tfds's download host answers within `timeout` seconds."""
  try:
    socket.create_connection(DOWNLOAD_HOST, timeout=timeout).close()
  except OSError:
    return False
  return True


def check_downloadable(data_config: Any) -> None:
  """UserError in seconds, before tfds retries for minutes, if it would have to download
  offline (nothing is created: no half-made dataset folder)."""
  if prepared(data_config.dataset, str(data_config.dir)) or online():
    return
  raise UserError(
    f"data.source=tfds would download {data_config.dataset}, but {DOWNLOAD_HOST[0]} did not "
    f"answer in {ONLINE_TIMEOUT_SEC:g} s (offline?); use data.source=local with data.dir=FOLDER "
    f"holding the python version from {CIFAR_URL}")


def read_tfds(data_config: Any) -> Raw:
  dataset = data_config.dataset
  data_dir = str(data_config.dir) or None
  coarse = dataset == "cifar100" and data_config.label_type == "coarse"
  label_key = "coarse_label" if coarse else "label"
  quiet_tensorflow()
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise UserError(
      f"data.source=tfds could not import TensorFlow ({one_line(e)}): pip install "
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
        f"(data_dir={data_dir or 'default'}): {type(e).__name__}: {one_line(e)}; "
        f"offline, use data.source=local with the files from {CIFAR_URL}"
      ) from e
    if not images:
      raise UserError(f"tensorflow_datasets returned no {split} images for {dataset}")
    arrays.append((np.concatenate(images), np.concatenate(labels)))
  (train_images, train_labels), (test_images, test_labels) = arrays
  names = base_names(dataset, "coarse" if coarse else "fine")
  return Raw(train_images, train_labels, test_images, test_labels, names)
