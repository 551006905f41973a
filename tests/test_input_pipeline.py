"""The data: class lists and selection, the official CIFAR files (layouts, the restricted
unpickler, every kind of damage), splits, synthetic and TFDS sources, preprocessing and its
statistics files, augmentation."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from allconv_jax import config as config_lib
from allconv_jax import files
from allconv_jax import input_pipeline as ip
from allconv_jax.data import cifar, preprocessing, synthetic, tfds_source
from allconv_jax.errors import UserError
from tests import cifar_fixtures, helpers


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The default data config with `overrides`."""
  cfg = config_lib.get_config().data
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def local(path, **overrides) -> ml_collections.ConfigDict:
  return data_config(source="local", dir=str(path), **overrides)


def user_error(fn, *args, **kwargs) -> str:
  """Calls fn, expects a UserError with a one-line message and returns the message."""
  with pytest.raises(UserError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert message and "\n" not in message
  return message


def expected_order(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).permutation(n)


# ---------------------------------------------------------------------------------------------
# Constants and config
# ---------------------------------------------------------------------------------------------


def test_class_lists():
  assert len(cifar.CIFAR10_CLASSES) == 10 and cifar.CIFAR10_CLASSES[0] == "airplane"
  fine = cifar.CIFAR100_FINE
  assert len(set(fine)) == 100 and list(fine) == sorted(fine)
  assert len(set(cifar.CIFAR100_COARSE)) == 20
  assert list(cifar.CIFAR100_COARSE) == sorted(cifar.CIFAR100_COARSE)
  assert np.bincount(cifar.CIFAR100_FINE_TO_COARSE, minlength=20).tolist() == [5] * 20
  coarse_of = {
    f: cifar.CIFAR100_COARSE[c]
    for f, c in zip(cifar.CIFAR100_FINE, cifar.CIFAR100_FINE_TO_COARSE, strict=True)
  }
  assert coarse_of["bus"] == "vehicles_1" and coarse_of["streetcar"] == "vehicles_2"
  assert coarse_of["maple_tree"] == "trees" and coarse_of["keyboard"].startswith("household_elec")
  for subset in ("class1", "class2"):
    names = cifar.SUBSETS[subset]
    assert len(set(names)) == 10 and set(names) <= set(cifar.CIFAR100_FINE)
  assert not set(cifar.SUBSETS["class1"]) & set(cifar.SUBSETS["class2"])


@pytest.mark.parametrize(
  "overrides, names",
  [
    ({}, cifar.CIFAR10_CLASSES),
    ({"dataset": "cifar10", "label_type": "coarse"}, cifar.CIFAR10_CLASSES),  # ignored for cifar10
    ({"dataset": "cifar100"}, cifar.CIFAR100_FINE),
    ({"dataset": "cifar100", "label_type": "coarse"}, cifar.CIFAR100_COARSE),
    ({"dataset": "cifar100", "subset": "class1"}, cifar.SUBSETS["class1"]),
    ({"dataset": "cifar100", "subset": "class2"}, cifar.SUBSETS["class2"]),
    ({"dataset": "cifar100", "classes": "tiger, apple,bus"}, ("tiger", "apple", "bus")),
    ({"classes": "dog,cat"}, ("dog", "cat")),
  ],
)
def test_class_names(overrides, names):
  cfg = data_config(**overrides)
  assert ip.class_names(cfg) == names
  assert ip.num_classes(cfg) == len(names)


@pytest.mark.parametrize(
  "overrides, fragment",
  [
    ({"source": "s3"}, "data.source"),
    ({"dataset": "mnist"}, "data.dataset 'mnist'"),
    ({"label_type": "medium"}, "data.label_type"),
    ({"preprocessing": "pca"}, "data.preprocessing"),
    ({"dataset": "cifar100", "subset": "class3"}, "data.subset"),
    ({"dataset": "cifar100", "subset": "class1", "classes": "bus,train"}, "not both"),
    ({"subset": "class1"}, "cifar100"),
    ({"dataset": "cifar100", "label_type": "coarse", "subset": "class2"}, "label_type=fine"),
    ({"dataset": "cifar100", "classes": "bus,unicorn,dragon"}, "unicorn, dragon"),
    ({"classes": "cat,bus"}, "bus"),
    ({"dataset": "cifar100", "classes": "bus,bus"}, "repeats bus"),
    ({"dataset": "cifar100", "classes": "bus"}, "at least 2"),
    ({"validation_size": -1}, "data.validation_size"),
    ({"max_train_examples": -5}, "data.max_train_examples"),
    ({"max_train_per_class": -1}, "data.max_train_per_class"),
    ({"max_test_examples": -5}, "data.max_test_examples"),
    ({"translate_pixels": -1}, "data.translate_pixels"),
    ({"gcn_scale": 0.0}, "data.gcn_scale"),
    ({"zca_epsilon": -0.1}, "data.zca_epsilon"),
    ({"zca_epsilon": 0.0}, "singular"),
    ({"source": "local", "dir": ""}, "data.dir"),
  ],
)
def test_check_config_errors(overrides, fragment):
  message = user_error(config_lib.check_data, data_config(**overrides))
  assert fragment in message
  # The one full check (config_lib.validate, run before any compute) gives the same line.
  config = config_lib.get_config()
  config.data = data_config(**overrides)
  assert user_error(config_lib.validate, config) == message


def test_check_config_accepts_valid():
  config_lib.check_data(data_config())
  config_lib.check_data(data_config(zca_epsilon=0.0, preprocessing="meanstd"))
  config_lib.check_data(data_config(dataset="cifar100", label_type="coarse",
                                    classes="trees,people"))


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_cifar10_reads_back_exactly(tmp_path, fmt):
  fake = cifar_fixtures.make_cifar10(tmp_path, fmt, n_train=53, n_test=17)
  ip.check_available(local(tmp_path))
  splits = ip.load_splits(local(tmp_path, validation_size=0), seed=3)
  order = expected_order(53, 3)
  np.testing.assert_array_equal(splits.train_images, fake.train_images[order])
  np.testing.assert_array_equal(splits.train_labels, fake.train_labels[order])
  np.testing.assert_array_equal(splits.test_images, fake.test_images)
  np.testing.assert_array_equal(splits.test_labels, fake.test_labels)
  assert splits.val_images.shape == (0, 32, 32, 3) and splits.val_labels.shape == (0,)
  assert splits.train_images.dtype == np.uint8 and splits.train_labels.dtype == np.int32
  assert splits.class_names == cifar.CIFAR10_CLASSES


@pytest.mark.parametrize("fmt", ["python", "binary"])
@pytest.mark.parametrize("label_type", ["fine", "coarse"])
def test_cifar100_reads_back_exactly(tmp_path, fmt, label_type):
  fake = cifar_fixtures.make_cifar100(tmp_path, fmt, n_train=230, n_test=120)
  cfg = local(tmp_path, dataset="cifar100", label_type=label_type, validation_size=30)
  splits = ip.load_splits(cfg, seed=5)
  train_labels = fake.train_labels if label_type == "fine" else fake.train_coarse
  test_labels = fake.test_labels if label_type == "fine" else fake.test_coarse
  order = expected_order(230, 5)
  np.testing.assert_array_equal(splits.val_images, fake.train_images[order[:30]])
  np.testing.assert_array_equal(splits.val_labels, train_labels[order[:30]])
  np.testing.assert_array_equal(splits.train_images, fake.train_images[order[30:]])
  np.testing.assert_array_equal(splits.train_labels, train_labels[order[30:]])
  np.testing.assert_array_equal(splits.test_images, fake.test_images)
  np.testing.assert_array_equal(splits.test_labels, test_labels)
  expected_names = cifar.CIFAR100_FINE if label_type == "fine" else cifar.CIFAR100_COARSE
  assert splits.class_names == expected_names


def test_pixel_layout_is_rgb_planes(tmp_path):
  """A red-only image in the HWC array comes from the first 1024 bytes of its row."""
  images = np.zeros((5, 32, 32, 3), np.uint8)
  images[0, :, :, 0] = np.arange(1024).reshape(32, 32) % 251
  images[1, 3, 7, 2] = 200
  labels = np.arange(5)
  cifar_fixtures.write_cifar10(tmp_path, "binary", images, labels, images, labels)
  raw = np.fromfile(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", np.uint8)
  raw = raw.reshape(5, 3073)
  assert raw[0, 1:1025].tolist() == (np.arange(1024) % 251).tolist()
  assert raw[1, 1 + 2048 + 3 * 32 + 7] == 200
  splits = ip.load_splits(local(tmp_path, validation_size=0), 0)
  np.testing.assert_array_equal(splits.test_images, images)


def test_dir_may_point_at_the_folder_and_meta_names_are_used(tmp_path):
  images = cifar_fixtures.random_images(12, 0)
  labels = np.arange(12) % 10
  names = tuple(n.upper() for n in cifar.CIFAR10_CLASSES)
  folder = cifar_fixtures.write_cifar10(tmp_path, "python", images, labels, images, labels, names)
  splits = ip.load_splits(local(folder, validation_size=2), 0)
  assert splits.class_names == names
  assert len(splits.train_images) == 10 and len(splits.val_images) == 2


def test_without_meta_files_the_standard_names_are_used(tmp_path):
  images = cifar_fixtures.random_images(12, 0)
  labels = np.arange(12) % 10
  cifar_fixtures.write_cifar10(tmp_path, "binary", images, labels, images, labels, None)
  assert not os.path.exists(tmp_path / "cifar-10-batches-bin" / "batches.meta.txt")
  assert ip.load_splits(local(tmp_path, validation_size=2), 0).class_names == cifar.CIFAR10_CLASSES


def test_python_folder_preferred_and_incomplete_one_skipped(tmp_path):
  fake = cifar_fixtures.make_cifar10(tmp_path, "binary", n_train=20, n_test=10)
  (tmp_path / "cifar-10-batches-py").mkdir()  # empty python folder next to a complete binary one
  splits = ip.load_splits(local(tmp_path, validation_size=0, max_test_examples=4), 0)
  np.testing.assert_array_equal(splits.test_images, fake.test_images[:4])


# ---------------------------------------------------------------------------------------------
# Subsets, validation split and cuts
# ---------------------------------------------------------------------------------------------


def _identify(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Index in `reference` of each image (images are unique random arrays)."""
  index = {img.tobytes(): i for i, img in enumerate(reference)}
  return np.asarray([index[img.tobytes()] for img in images], dtype=np.int64)


@pytest.mark.parametrize(
  "overrides, names",
  [
    ({"subset": "class1"}, cifar.SUBSETS["class1"]),
    ({"subset": "class2"}, cifar.SUBSETS["class2"]),
    ({"classes": "tiger,apple,bus"}, ("tiger", "apple", "bus")),
  ],
)
def test_subsets_remap_labels_in_list_order(tmp_path, overrides, names):
  fake = cifar_fixtures.make_cifar100(tmp_path, "python", n_train=300, n_test=200)
  cfg = local(tmp_path, dataset="cifar100", validation_size=len(names), **overrides)
  splits = ip.load_splits(cfg, seed=1)
  assert splits.class_names == names
  for images, labels, ref_images, ref_fine in [
    (splits.train_images, splits.train_labels, fake.train_images, fake.train_labels),
    (splits.val_images, splits.val_labels, fake.train_images, fake.train_labels),
    (splits.test_images, splits.test_labels, fake.test_images, fake.test_labels),
  ]:
    original = [cifar.CIFAR100_FINE[i] for i in ref_fine[_identify(images, ref_images)]]
    assert [names[i] for i in labels] == original
  assert len(splits.train_images) + len(splits.val_images) == 3 * len(names)
  assert np.bincount(splits.test_labels).tolist() == [2] * len(names)


def test_cifar10_explicit_classes(tmp_path):
  fake = cifar_fixtures.make_cifar10(tmp_path, "binary", n_train=100, n_test=30)
  splits = ip.load_splits(local(tmp_path, classes="dog,cat", validation_size=0), 0)
  expected = np.where(fake.test_labels == 5, 0, 1)[np.isin(fake.test_labels, [3, 5])]
  np.testing.assert_array_equal(splits.test_labels, expected)
  assert len(splits.train_labels) == 20 and set(splits.train_labels.tolist()) == {0, 1}


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
  fake = cifar_fixtures.make_cifar10(tmp_path, "python", n_train=60, n_test=10)
  cfg = local(tmp_path, validation_size=15)
  a, b, c = ip.load_splits(cfg, 7), ip.load_splits(cfg, 7), ip.load_splits(cfg, 8)
  np.testing.assert_array_equal(a.val_images, b.val_images)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert not np.array_equal(a.val_images, c.val_images)
  val, train = (
    _identify(a.val_images, fake.train_images),
    _identify(a.train_images, fake.train_images),
  )
  assert len(val) == 15 and len(train) == 45
  assert not set(val) & set(train) and set(val) | set(train) == set(range(60))
  np.testing.assert_array_equal(val, expected_order(60, 7)[:15])
  np.testing.assert_array_equal(a.val_labels, fake.train_labels[val])


def test_max_examples_cut_after_the_split(tmp_path):
  fake = cifar_fixtures.make_cifar10(tmp_path, "python", n_train=60, n_test=10)
  cfg = local(tmp_path, validation_size=15, max_train_examples=20, max_test_examples=3)
  splits = ip.load_splits(cfg, 2)
  full = ip.load_splits(local(tmp_path, validation_size=15), 2)
  assert len(splits.val_images) == 15 and len(splits.train_images) == 20
  np.testing.assert_array_equal(splits.val_images, full.val_images)
  np.testing.assert_array_equal(splits.train_images, full.train_images[:20])
  np.testing.assert_array_equal(splits.test_images, fake.test_images[:3])


def test_max_train_per_class_keeps_the_first_of_each_class(tmp_path):
  cifar_fixtures.make_cifar10(tmp_path, "python", n_train=60, n_test=10)
  full = ip.load_splits(local(tmp_path, validation_size=15), 2)
  capped = ip.load_splits(local(tmp_path, validation_size=15, max_train_per_class=2), 2)
  counts = np.bincount(full.train_labels, minlength=10)
  assert np.array_equal(np.bincount(capped.train_labels, minlength=10), np.minimum(counts, 2))
  keep = [i for i, label in enumerate(full.train_labels)
          if (full.train_labels[:i] == label).sum() < 2]
  np.testing.assert_array_equal(capped.train_images, full.train_images[keep])
  np.testing.assert_array_equal(capped.val_images, full.val_images)


# ---------------------------------------------------------------------------------------------
# Errors from files
# ---------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
  missing = tmp_path / "nowhere"
  message = user_error(ip.check_available, local(missing))
  assert str(missing) in message and "cifar-10-batches-py/" in message
  assert "cifar-10-batches-bin/" in message and "cs.toronto.edu/~kriz/cifar.html" in message
  assert "data.source=tfds" in message
  assert user_error(ip.load_splits, local(missing), 0) == message


def test_empty_folder(tmp_path):
  message = user_error(ip.check_available, local(tmp_path, dataset="cifar100"))
  assert str(tmp_path) in message
  assert "cifar-100-python/" in message and "cifar-100-binary/" in message
  assert "cs.toronto.edu/~kriz/cifar.html" in message


def test_incomplete_folder_names_the_missing_files(tmp_path):
  cifar_fixtures.make_cifar10(tmp_path, "python", n_train=20, n_test=5)
  os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
  message = user_error(ip.check_available, local(tmp_path))
  assert "cifar-10-batches-py" in message and "data_batch_4" in message
  assert "data_batch_3" not in message


def test_unextracted_archive(tmp_path):
  (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
  assert "tar xzf" in user_error(ip.check_available, local(tmp_path))


@pytest.mark.parametrize(
  "dataset, name", [("cifar10", "data_batch_3.bin"), ("cifar100", "test.bin")]
)
def test_truncated_binary_file(tmp_path, dataset, name):
  make = cifar_fixtures.make_cifar10 if dataset == "cifar10" else cifar_fixtures.make_cifar100
  fake = make(tmp_path, "binary", n_train=50, n_test=20)
  path = os.path.join(fake.folder, name)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  ip.check_available(local(tmp_path, dataset=dataset))  # cheap check does not read the files
  message = user_error(ip.load_splits, local(tmp_path, dataset=dataset, validation_size=5), 0)
  assert path in message and "truncated or corrupt" in message


@pytest.mark.parametrize("damage", ["garbage", "half", "empty", "not_a_dict", "short_data"])
def test_corrupt_pickle(tmp_path, damage):
  fake = cifar_fixtures.make_cifar10(tmp_path, "python", n_train=50, n_test=20)
  path = os.path.join(fake.folder, "data_batch_2")
  content = open(path, "rb").read()
  if damage == "garbage":
    content = b"this is not a pickle" * 10
  elif damage == "half":
    content = content[: len(content) // 2]
  elif damage == "empty":
    content = b""
  elif damage == "not_a_dict":
    content = pickle.dumps([1, 2, 3], protocol=2)
  else:
    content = pickle.dumps(
      {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2
    )
  with open(path, "wb") as f:
    f.write(content)
  message = user_error(ip.load_splits, local(tmp_path, validation_size=5), 0)
  assert path in message and "truncated or corrupt" in message


def test_pickle_with_foreign_objects_is_refused(tmp_path):
  fake = cifar_fixtures.make_cifar10(tmp_path, "python", n_train=50, n_test=20)
  path = os.path.join(fake.folder, "test_batch")
  marker = tmp_path / "executed"

  class Evil:
    def __reduce__(self):
      return (os.mkdir, (str(marker),))

  with open(path, "wb") as f:
    pickle.dump({b"data": Evil()}, f, protocol=2)
  message = user_error(ip.load_splits, local(tmp_path, validation_size=5), 0)
  assert path in message and not marker.exists()


def test_labels_out_of_range(tmp_path):
  images = cifar_fixtures.random_images(10, 0)
  labels = np.arange(10) + 3  # 10, 11, 12 are not CIFAR-10 labels
  cifar_fixtures.write_cifar10(tmp_path, "binary", images, labels, images, labels % 10)
  message = user_error(ip.load_splits, local(tmp_path, validation_size=1), 0)
  assert "data_batch_" in message and "labels outside 0..9" in message


def test_validation_set_larger_than_training_set(tmp_path):
  cifar_fixtures.make_cifar10(tmp_path, "python", n_train=50, n_test=20)
  message = user_error(ip.load_splits, local(tmp_path, validation_size=50), 0)
  assert message == "data.validation_size (50) must be smaller than the training set (50 images)"
  cifar_fixtures.make_cifar100(tmp_path, "python", n_train=300, n_test=100)
  cfg = local(tmp_path, dataset="cifar100", subset="class1", validation_size=1000)
  assert "(1000)" in user_error(ip.load_splits, cfg, 0) and "(30 images)" in user_error(
    ip.load_splits, cfg, 0
  )


# ---------------------------------------------------------------------------------------------
# Synthetic and TFDS
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_synthetic_is_deterministic_and_learnable():
  cfg = data_config(source="synthetic", validation_size=500)
  a, b = ip.load_splits(cfg, 0), ip.load_splits(cfg, 1)
  assert a.train_images.shape == (4500, 32, 32, 3) and a.test_images.shape == (1000, 32, 32, 3)
  assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int32
  np.testing.assert_array_equal(a.test_images, b.test_images)  # independent of the run seed
  assert not np.array_equal(a.val_images, b.val_images)  # but the split follows it
  assert np.bincount(a.test_labels).tolist() == [100] * 10
  # Nearest class mean on raw pixels separates the classes: there is a learnable signal.
  x = a.train_images.reshape(len(a.train_images), -1).astype(np.float32)
  means = np.stack([x[a.train_labels == k].mean(0) for k in range(10)])
  t = a.test_images.reshape(1000, -1).astype(np.float32)
  pred = np.argmin(((t[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == a.test_labels).mean() > 0.9
  # And after the paper's GCN + ZCA (the default) too, in what a convolution + ReLU + global
  # pooling can measure: how much energy each spatial frequency has. Fitted on 2,000 images
  # (the fast N < D path) to keep the test short; the split's 4,500 separate as well.
  fit, fit_labels = a.train_images[:2000], a.train_labels[:2000]
  stats = preprocessing.fit_preprocessing(data_config(), fit)

  def energy(images):
    whitened = preprocessing.apply_preprocessing(stats, images)
    return np.log(np.abs(np.fft.rfft2(whitened, axes=(1, 2))) ** 2).mean(-1).reshape(
        len(images), -1)

  e, et = energy(fit), energy(a.test_images)
  means = np.stack([e[fit_labels == k].mean(0) for k in range(10)])
  pred = np.argmin(((et[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == a.test_labels).mean() > 0.9


def test_synthetic_data_is_generated_once_per_process_and_read_only():
  a = synthetic.make_synthetic("cifar10", "fine")
  assert synthetic.make_synthetic("cifar10", "fine") is a
  assert synthetic.make_synthetic("cifar100", "fine", [3, 1]) is \
      synthetic.make_synthetic("cifar100", "fine", (3, 1))
  with pytest.raises(ValueError, match="read-only"):
    a.train_images[0, 0, 0, 0] = 1


@pytest.mark.slow
def test_synthetic_cifar100():
  fine = ip.load_splits(data_config(source="synthetic", dataset="cifar100"), 0)
  assert fine.train_labels.max() == 99 and len(fine.train_images) == 49_000  # 500 per class
  assert np.bincount(fine.test_labels).tolist() == [100] * 100
  # A subset is as large as the real one (500 + 100 per class) and made of the same images as
  # those classes of the whole set (generated alone).
  sub = ip.load_splits(
    data_config(source="synthetic", dataset="cifar100", subset="class2", validation_size=500), 0
  )
  assert sub.class_names == cifar.SUBSETS["class2"] and len(sub.test_images) == 1000
  assert len(sub.train_images) == 4500 and sorted(set(sub.train_labels.tolist())) == list(range(10))
  first = cifar.CIFAR100_FINE.index(sub.class_names[0])
  whole = {bytes(x) for x in fine.test_images[fine.test_labels == first]}
  assert {bytes(x) for x in sub.test_images[sub.test_labels == 0]} == whole
  # Coarse labels are the superclasses of the fine ones (checked on a few classes).
  classes = [0, 17, 58, 99]
  some = synthetic.make_synthetic("cifar100", "fine", classes)
  coarse = synthetic.make_synthetic("cifar100", "coarse", classes)
  np.testing.assert_array_equal(coarse.test_images, some.test_images)
  to_coarse = np.asarray(cifar.CIFAR100_FINE_TO_COARSE)
  np.testing.assert_array_equal(coarse.test_labels, to_coarse[some.test_labels])
  assert len(coarse.class_names) == 20


@pytest.mark.slow
def test_tfds_mock_data(monkeypatch):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(tfds_source, "online", lambda: True)  # mock data: nothing to download
  cfg = data_config(source="tfds", validation_size=4, max_test_examples=5)
  ip.check_available(cfg)
  with tfds.testing.mock_data(num_examples=12):
    splits = ip.load_splits(cfg, seed=0)
    direct = [b for b in tfds.as_numpy(tfds.load("cifar10", split="train").batch(100))][0]
    coarse = ip.load_splits(data_config(source="tfds", dataset="cifar100", label_type="coarse",
                                        validation_size=2), seed=0)  # fmt: skip
  order = expected_order(12, 0)
  assert splits.train_images.shape == (8, 32, 32, 3) and splits.train_images.dtype == np.uint8
  np.testing.assert_array_equal(splits.val_images, direct["image"][order[:4]])
  np.testing.assert_array_equal(splits.train_labels, direct["label"][order[4:]])
  assert splits.train_labels.dtype == np.int32 and len(splits.test_images) == 5
  assert coarse.class_names == cifar.CIFAR100_COARSE and coarse.train_labels.max() < 20


def test_tfds_offline_is_one_line_in_seconds_and_creates_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "DOWNLOAD_HOST", ("192.0.2.1", 443))  # TEST-NET: no answer
  monkeypatch.setattr(tfds_source, "ONLINE_TIMEOUT_SEC", 1.0)
  started = time.time()
  message = user_error(ip.check_available, data_config(source="tfds", dir=str(tmp_path / "tfds")))
  assert time.time() - started < 5
  assert "offline" in message and "data.source=local" in message
  assert not (tmp_path / "tfds").exists()
  (tmp_path / "tfds" / "cifar10" / "3.0.2").mkdir(parents=True)  # prepared: no download needed
  (tmp_path / "tfds" / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
  ip.check_available(data_config(source="tfds", dir=str(tmp_path / "tfds")))


def test_tfds_missing(monkeypatch):
  real = ip.importlib.util.find_spec
  monkeypatch.setattr(
    ip.importlib.util,
    "find_spec",
    lambda name, *a: None if name == "tensorflow_datasets" else real(name, *a),
  )
  message = user_error(ip.check_available, data_config(source="tfds"))
  assert "pip install tensorflow-cpu tensorflow-datasets" in message
  assert "data.source=local" in message


@pytest.mark.slow
def test_local_and_synthetic_do_not_import_tensorflow(tmp_path):
  cifar_fixtures.make_cifar10(tmp_path, "binary", n_train=20, n_test=5)
  code = textwrap.dedent(f"""
    import sys
    import ml_collections
    from allconv_jax import input_pipeline as ip
    from allconv_jax.config import get_config
    from allconv_jax.data import preprocessing
    cfg = get_config().data
    cfg.source, cfg.dir, cfg.validation_size = "local", {str(tmp_path)!r}, 5
    cfg.preprocessing = "meanstd"
    s = ip.load_splits(cfg, 0)
    ip.apply_preprocessing(preprocessing.fit_preprocessing(cfg, s.train_images), s.train_images)
    cfg.source = "synthetic"
    ip.load_splits(cfg, 0)
    ip.check_available(cfg)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
    print("TF" if bad else "OK", bad[:3])
  """)
  result = helpers.run([sys.executable, "-c", code], timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("OK"), result.stdout


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_meanstd_and_none():
  images = cifar_fixtures.random_images(7, 0)
  stats = preprocessing.fit_preprocessing(data_config(preprocessing="meanstd"), images)
  out = ip.apply_preprocessing(stats, images)
  assert out.dtype == np.float32 and out.shape == images.shape
  expected = (images / 255.0 - np.array([0.4914, 0.4822, 0.4465])) / np.array(
    [0.2023, 0.1994, 0.2010]
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  none = ip.apply_preprocessing(
    preprocessing.fit_preprocessing(data_config(preprocessing="none"), images), images
  )
  np.testing.assert_allclose(none, images / 255.0, rtol=1e-6)


def test_gcn_matches_pylearn2_definition():
  rows = cifar_fixtures.random_images(6, 1).reshape(6, -1)
  rows[5] = 17  # a constant image stays zero (divisor below min_divisor -> 1)
  x = preprocessing._gcn(rows, 55.0)
  np.testing.assert_allclose(x.mean(axis=1), 0, atol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(x[:5], axis=1), 55.0, rtol=1e-12)
  np.testing.assert_array_equal(x[5], 0)


def _smooth_images(n: int, seed: int) -> np.ndarray:
  """Correlated images (a coarse random grid upsampled plus noise): not white to start with."""
  rng = np.random.default_rng(seed)
  coarse = rng.normal(128, 50, size=(n, 4, 4, 3))
  images = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) + rng.normal(0, 8, (n, 32, 32, 3))
  return np.clip(images, 0, 255).astype(np.uint8)


def test_gcn_zca_whitens_the_training_data(tmp_path):
  train = _smooth_images(300, 0)
  cfg = data_config(preprocessing="gcn_zca", zca_epsilon=1e-5)
  stats = preprocessing.fit_preprocessing(cfg, train)
  assert str(stats["kind"]) == "gcn_zca" and stats["whitening"].shape == (3072, 3072)
  np.testing.assert_allclose(stats["whitening"], stats["whitening"].T, atol=1e-4)  # ZCA: symmetric
  y = ip.apply_preprocessing(stats, train).reshape(300, -1).astype(np.float64)
  np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-3)
  # N < D: the covariance is the identity on the span of the centred data (rank N - 1).
  eig = np.sort(np.linalg.eigvalsh(y @ y.T / 300))
  assert eig[0] < 1e-4
  np.testing.assert_allclose(eig[1:], 1.0, atol=1e-3)
  before = np.sort(np.linalg.eigvalsh(np.cov(train.reshape(300, -1).astype(np.float64))))
  assert before[-1] / before[1] > 100  # the input was far from white

  # Saved and loaded statistics give identical outputs on other data.
  test = _smooth_images(20, 1)
  path = str(tmp_path / "sub" / "preprocessing")
  files.save_preprocessing(path, stats)
  assert os.listdir(tmp_path / "sub") == ["preprocessing"]  # no suffix added, no temp file left
  loaded = preprocessing.load_preprocessing(path)
  assert set(loaded) == set(stats) and str(loaded["kind"]) == "gcn_zca"
  np.testing.assert_array_equal(
    ip.apply_preprocessing(loaded, test), ip.apply_preprocessing(stats, test)
  )


def test_zca_matrix_covariance_and_gram_paths_agree():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 30)) @ rng.normal(size=(30, 30))  # correlated, full rank
  x -= x.mean(axis=0)
  w_eigh = preprocessing._zca_matrix(None, x.T @ x / 200, 200, 1e-9)
  w_gram = preprocessing._zca_matrix(x, None, 200, 1e-9)
  np.testing.assert_allclose(w_eigh, w_gram, atol=1e-6)
  # Fewer samples than dimensions (the Gram path's use): rank 19, the null space gets 1/sqrt(eps).
  few = rng.normal(size=(20, 50)) @ rng.normal(size=(50, 50))
  few -= few.mean(axis=0)
  np.testing.assert_allclose(preprocessing._zca_matrix(few, None, 20, 0.1),
                             preprocessing._zca_matrix(None, few.T @ few / 20, 20, 0.1), atol=1e-9)
  y = x @ w_eigh
  np.testing.assert_allclose(y.T @ y / 200, np.eye(30), atol=1e-6)
  # epsilon damps the small directions exactly as 1/sqrt(eig + eps)
  eig, vec = np.linalg.eigh(x.T @ x / 200)
  np.testing.assert_allclose(
    preprocessing._zca_matrix(x, None, 200, 0.5), (vec / np.sqrt(eig + 0.5)) @ vec.T, atol=1e-9
  )


@pytest.mark.parametrize("kind", ["none", "meanstd"])
def test_save_load_other_kinds(tmp_path, kind):
  images = cifar_fixtures.random_images(3, 0)
  stats = preprocessing.fit_preprocessing(data_config(preprocessing=kind), images)
  files.save_preprocessing(str(tmp_path / "p.npz"), stats)
  loaded = preprocessing.load_preprocessing(str(tmp_path / "p.npz"))
  np.testing.assert_array_equal(
    ip.apply_preprocessing(loaded, images), ip.apply_preprocessing(stats, images)
  )


def test_load_preprocessing_errors(tmp_path):
  assert "not found" in user_error(preprocessing.load_preprocessing, str(tmp_path / "missing.npz"))
  (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken")
  assert "corrupt" in user_error(preprocessing.load_preprocessing, str(tmp_path / "bad.npz"))
  np.savez(tmp_path / "partial.npz", kind=np.array("gcn_zca"), mean=np.zeros(3072))
  assert "incomplete" in user_error(preprocessing.load_preprocessing, str(tmp_path / "partial.npz"))


def test_runs_on_the_same_images_share_their_statistics(tmp_path, monkeypatch):
  """files.fit_or_share: the first run fits and shares its file; a run on the same images and
  settings links it (the same bytes, not refitted); other images or settings fit anew; a
  damaged shared file is fitted again, not trusted."""
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "shared"))
  assert files.statistics_cache() == str(tmp_path / "shared")
  cfg = data_config(preprocessing="gcn_zca")
  images = _smooth_images(40, 0)
  first, shared = files.fit_or_share(cfg, images, str(tmp_path / "a.npz"))
  assert not shared and os.listdir(tmp_path / "shared") == [
      files.statistics_key(cfg, images) + ".npz"]
  monkeypatch.setattr(preprocessing, "fit_preprocessing", lambda *a: pytest.fail("refitted"))
  again, shared = files.fit_or_share(cfg, images, str(tmp_path / "b.npz"))
  assert shared and os.path.samefile(tmp_path / "a.npz", tmp_path / "b.npz")
  np.testing.assert_array_equal(again["whitening"], first["whitening"])
  monkeypatch.undo()
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "shared"))
  other = data_config(preprocessing="gcn_zca", zca_epsilon=0.2)
  assert files.statistics_key(other, images) != files.statistics_key(cfg, images)
  assert files.statistics_key(cfg, images[:-1]) != files.statistics_key(cfg, images)
  assert not files.fit_or_share(other, images, str(tmp_path / "c.npz"))[1]
  shared_file = tmp_path / "shared" / (files.statistics_key(cfg, images) + ".npz")
  os.remove(shared_file)
  shared_file.write_bytes(b"PK\x03\x04 broken")
  stats, shared = files.fit_or_share(cfg, images, str(tmp_path / "d.npz"))
  assert not shared
  np.testing.assert_array_equal(stats["whitening"], first["whitening"])
  assert preprocessing.load_preprocessing(str(shared_file))["whitening"].shape == (3072, 3072)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


_augment = jax.jit(ip.augment, static_argnames=("flip", "translate"))


def _images(n: int = 64) -> np.ndarray:
  return np.random.default_rng(0).uniform(1.0, 2.0, size=(n, 32, 32, 3)).astype(np.float32)


def test_augment_off_is_identity():
  images = _images(4)
  out = _augment(jax.random.key(0), images, flip=False, translate=0)
  np.testing.assert_array_equal(np.asarray(out), images)


def test_augment_flip():
  images = _images()
  out = np.asarray(_augment(jax.random.key(1), images, flip=True, translate=0))
  assert out.shape == images.shape and out.dtype == images.dtype
  same = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
  mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
  assert all(s or m for s, m in zip(same, mirrored, strict=True))
  assert 10 < sum(mirrored) < 54


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
    max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
  ]
  return out


@pytest.mark.parametrize("flip", [False, True])
def test_augment_translate(flip):
  images, t = _images(32), 3
  out = np.asarray(_augment(jax.random.key(2), images, flip=flip, translate=t))
  assert out.shape == images.shape and out.dtype == np.float32
  assert set(np.unique(out)) <= set(np.unique(images)) | {0.0}  # pixels moved, zeros padded
  shifts = []
  for o, i in zip(out, images, strict=True):
    candidates = [i, i[:, ::-1]] if flip else [i]
    found = [(dy, dx) for c in candidates for dy in range(-t, t + 1) for dx in range(-t, t + 1)
             if np.array_equal(o, _shift(c, dy, dx))]  # fmt: skip
    assert found, "output is not a zero-filled translation of its input"
    shifts.append(found[0])
  assert len(set(shifts)) > 5


def test_augment_keys():
  images = _images(16)
  a = _augment(jax.random.key(3), images, flip=True, translate=5)
  b = _augment(jax.random.key(3), images, flip=True, translate=5)
  c = _augment(jax.random.key(4), images, flip=True, translate=5)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_validate_on_test_uses_the_test_images():
  """The course project's protocol: every training image trains, the test set is watched."""
  splits = ip.load_splits(data_config(source="synthetic", validation_size=0,
                                      validate_on_test=True, max_test_examples=40), seed=0)
  assert len(splits.train_images) == len(ip.load_splits(
      data_config(source="synthetic", validation_size=0), seed=0).train_images)
  np.testing.assert_array_equal(splits.val_images, splits.test_images)
  np.testing.assert_array_equal(splits.val_labels, splits.test_labels)
  with pytest.raises(UserError, match="data.validate_on_test=True uses the test set"):
    config_lib.check_data(data_config(validate_on_test=True))


@pytest.mark.parametrize("fmt", ["list", "array"])
def test_float_labels_in_a_data_file_are_refused_not_truncated(tmp_path, fmt):
  """Labels 3.7 are not label 3: a python batch whose labels are not whole numbers is refused
  with one line naming the file (a list of floats, or a float array)."""
  fake = cifar_fixtures.make_cifar10(tmp_path, "python", n_train=50, n_test=20)
  path = os.path.join(fake.folder, "data_batch_3")
  with open(path, "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  labels = np.asarray(batch[b"labels"]) + 0.7
  batch[b"labels"] = [float(v) for v in labels] if fmt == "list" else labels
  with open(path, "wb") as f:
    pickle.dump(batch, f, protocol=2)
  message = user_error(ip.load_splits, local(tmp_path, validation_size=5), 0)
  assert path in message and "not whole numbers" in message


def test_whole_float_labels_are_read_as_integers(tmp_path):
  """Labels stored as floats with whole values (2.0) are the integers they hold."""
  fake = cifar_fixtures.make_cifar10(tmp_path, "python", n_train=50, n_test=20)
  path = os.path.join(fake.folder, "test_batch")
  with open(path, "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  batch[b"labels"] = [float(v) for v in batch[b"labels"]]
  with open(path, "wb") as f:
    pickle.dump(batch, f, protocol=2)
  splits = ip.load_splits(local(tmp_path, validation_size=5), 0)
  np.testing.assert_array_equal(splits.test_labels, fake.test_labels)
  assert splits.test_labels.dtype == np.int32
