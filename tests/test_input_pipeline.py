"""The pipeline over a source: class lists and selection, the data config checks, splits and
cuts, preprocessing and its statistics files, augmentation."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from allconv_jax import config as config_lib
from allconv_jax import files
from allconv_jax import input_pipeline as ip
from allconv_jax.data import cifar, preprocessing
from allconv_jax.errors import UserError
from tests import cifar_fixtures
from tests.data_helpers import data_config, expected_order, local, user_error

# ----------------------------------------------------------------------------- classes and config


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


# ----------------------------------------------------------------------------- subsets and splits


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


def test_validation_set_larger_than_training_set(tmp_path):
  cifar_fixtures.make_cifar10(tmp_path, "python", n_train=50, n_test=20)
  message = user_error(ip.load_splits, local(tmp_path, validation_size=50), 0)
  assert message == "data.validation_size (50) must be smaller than the training set (50 images)"
  cifar_fixtures.make_cifar100(tmp_path, "python", n_train=300, n_test=100)
  cfg = local(tmp_path, dataset="cifar100", subset="class1", validation_size=1000)
  assert "(1000)" in user_error(ip.load_splits, cfg, 0) and "(30 images)" in user_error(
    ip.load_splits, cfg, 0
  )


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


# ----------------------------------------------------------------------------- preprocessing


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


# ----------------------------------------------------------------------------- augmentation


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
