"""The workdir's files under failure: a disk that fills while the statistics are linked or
copied in, and temporaries that a killed process left behind."""

import errno
import os
import shutil

import numpy as np
import pytest

from allconv_jax import cli, files, train
from tests.data_helpers import data_config
from tests.helpers import tiny_config


def _full_after_half(source, target, *args, **kwargs):
  """shutil.copyfile on a disk that fills half way: half the bytes written, then ENOSPC."""
  with open(source, "rb") as f, open(target, "wb") as g:
    g.write(f.read()[:100])
  raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_sharing_statistics_leaves_no_temporary(tmp_path, monkeypatch):
  """Linking the shared statistics fails across file systems and the copy fills the disk:
  the error reaches the caller and no half-written temporary stays in the workdir."""
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "shared"))
  cfg = data_config(preprocessing="meanstd")
  images = np.random.default_rng(0).uniform(0, 255, (20, 32, 32, 3)).astype(np.float32)
  files.fit_or_share(cfg, images, str(tmp_path / "first.npz"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
  monkeypatch.setattr(shutil, "copyfile", _full_after_half)
  monkeypatch.setattr(files, "save_preprocessing", lambda target, stats: _full_after_half(
      str(tmp_path / "first.npz"), target))
  with pytest.raises(OSError, match="No space left"):
    files.fit_or_share(cfg, images, str(workdir / files.PREPROCESSING))
  assert os.listdir(workdir) == [files.PREPROCESSING]  # save_preprocessing's own target only
  os.remove(workdir / files.PREPROCESSING)
  monkeypatch.setattr(files, "save_preprocessing", lambda *a: None)
  files.fit_or_share(cfg, images, str(workdir / files.PREPROCESSING))  # the fallback fit
  assert os.listdir(workdir) == []
  assert sorted(os.listdir(tmp_path / "shared")) == [
      files.statistics_key(cfg, images) + ".npz"]


def test_a_run_removes_the_temporaries_of_a_killed_one(tmp_path, capsys):
  """Files that a process killed mid-write left beside its targets are removed by the next run
  on the workdir (which holds the lock, so no live writer owns them); other files stay."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  stale = [f"{files.PREPROCESSING}{files.TMP_LINK}4242", f"{files.TMP_PREFIX}{files.METRICS}-x1"]
  for name in [*stale, "notes.txt"]:
    (workdir / name).write_text("half")
  with cli.user_errors():
    train.train_and_evaluate(tiny_config(num_epochs=1), str(workdir))
  present = set(os.listdir(workdir))
  assert "notes.txt" in present and not present & set(stale)
  assert files.RESULTS in present
