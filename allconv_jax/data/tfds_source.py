"""TensorFlow Datasets as a source (imported lazily: only this source needs TensorFlow)."""

from __future__ import annotations

from typing import Any

import numpy as np

from allconv_jax.data.cifar import CIFAR_URL, Raw, base_names
from allconv_jax.errors import UserError, one_line


def read_tfds(data_config: Any) -> Raw:
  dataset = data_config.dataset
  data_dir = str(data_config.dir) or None
  coarse = dataset == "cifar100" and data_config.label_type == "coarse"
  label_key = "coarse_label" if coarse else "label"
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
