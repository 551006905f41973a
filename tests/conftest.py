"""Test session setup.

The tiny runs compile the same small programs again and again: a persistent XLA compilation
cache shared by every test, pytest-xdist worker and subprocess turns most of those compilations
into reads. It lives in `$TMPDIR/allconv-jax-xla-cache-<uid>` (or `$ALLCONV_TEST_XLA_CACHE`);
delete it to start cold. oneDNN runs on one thread per worker (the workers share the cores),
and shared preprocessing statistics go to a folder of this session.
"""

import os
import shutil
import tempfile

import pytest

_CACHE = os.environ.get("ALLCONV_TEST_XLA_CACHE") or os.path.join(
    tempfile.gettempdir(), f"allconv-jax-xla-cache-{os.getuid()}")
os.makedirs(_CACHE, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ALLCONV_CACHE_DIR", tempfile.mkdtemp(prefix="allconv-jax-statistics-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """The tests marked slow first, so that pytest-xdist hands them out early and the workers
  finish together instead of one waiting for the other's last long test."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """trained_run(num_epochs) -> the workdir of a finished tiny_config(num_epochs=...) run,
  trained once per test process. Read it; never change it (copy it with `finished_run`)."""
  from allconv_jax import train
  from tests.helpers import tiny_config

  done = {}

  def get(num_epochs: int = 1) -> str:
    if num_epochs not in done:
      workdir = str(tmp_path_factory.mktemp(f"trained_{num_epochs}_epochs"))
      train.train_and_evaluate(tiny_config(num_epochs=num_epochs), workdir)
      done[num_epochs] = workdir
    return done[num_epochs]

  return get


@pytest.fixture
def finished_run(trained_run, tmp_path):
  """finished_run(num_epochs=1, name="run") -> a fresh copy of trained_run(num_epochs) in
  tmp_path/name: what training tiny_config(num_epochs=...) there would leave, without the wait."""

  def copy(num_epochs: int = 1, name: str = "run") -> str:
    target = str(tmp_path / name)
    shutil.copytree(trained_run(num_epochs), target, symlinks=True)
    return target

  return copy


@pytest.fixture(scope="session")
def swept(tmp_path_factory):
  """A real sweep over configs/all_cnn_c.py at one rate (tiny, 2 epochs): (root, summary,
  output). Made once per test process for test_sweep.py and test_report.py (one xdist group)."""
  from tests.tool_helpers import ALL_CNN_C, run_sweep, sweep_flags

  root = str(tmp_path_factory.mktemp("sweep"))
  return root, *run_sweep([ALL_CNN_C], [0.05], root, sweep_flags())


@pytest.fixture(scope="session")
def model_a_run(tmp_path_factory):
  """A tiny Model A run trained in-process (1 epoch, rate 0.01), once per test process for
  test_report.py and test_evaluate_visualize.py (one xdist group). Read it; never change it."""
  from allconv_jax import train
  from tests.helpers import tiny_config

  workdir = str(tmp_path_factory.mktemp("runs") / "model_a")
  train.train_and_evaluate(tiny_config(model__name="model_a", num_epochs=1,
                                       optimizer__learning_rate=0.01), workdir)
  return workdir
