"""The data sources: the official CIFAR files in both layouts (read back exactly, the restricted
unpickler, every kind of damage), the synthetic set and TFDS."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
import time

import numpy as np
import pytest

from allconv_jax import input_pipeline as ip
from allconv_jax.data import cifar, preprocessing, synthetic, tfds_source
from tests import cifar_fixtures, helpers
from tests.data_helpers import data_config, expected_order, local, user_error

# ----------------------------------------------------------------------------- local files


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


# ----------------------------------------------------------------------------- damaged files


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


# ----------------------------------------------------------------------------- synthetic and TFDS


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
