"""Test session setup: a persistent XLA compilation cache shared by every test, every pytest-xdist
worker and every subprocess, and kept between runs.

The tiny runs compile the same programs again and again; the cache turns most of those
compilations into reads. It lives in one place, `$TMPDIR/allconv-jax-xla-cache-<uid>` (or
`$ALLCONV_TEST_XLA_CACHE`); delete it to start cold.
"""

import os
import sys
import tempfile

_CACHE = os.environ.get("ALLCONV_TEST_XLA_CACHE") or os.path.join(
    tempfile.gettempdir(), f"allconv-jax-xla-cache-{os.getuid()}")
os.makedirs(_CACHE, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The workers share the cores: oneDNN's convolutions (tiny here) run on one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Shared preprocessing statistics (data/preprocessing.py) go to a folder of this session.
os.environ.setdefault("ALLCONV_CACHE_DIR", tempfile.mkdtemp(prefix="allconv-jax-statistics-"))


# Imported after the environment above is set: jax reads it when it starts.
import shutil  # noqa: E402

import flax.linen  # noqa: E402, F401
import jax  # noqa: E402, F401
import matplotlib  # noqa: E402, F401
import optax  # noqa: E402, F401
import orbax.checkpoint  # noqa: E402, F401
import pytest  # noqa: E402

# Collection keeps the bytecode of what it imports from here on (pytest's assertion-rewritten
# test modules, allconv_jax) in a folder of its own, also where PYTHONDONTWRITEBYTECODE is set:
# rewriting the test modules takes 2 s per worker. The libraries above keep their own bytecode;
# after collection Python's settings are back.
_BYTECODE = sys.pycache_prefix, sys.dont_write_bytecode
sys.pycache_prefix = os.path.join(tempfile.gettempdir(), f"allconv-jax-pycache-{os.getuid()}")
sys.dont_write_bytecode = False


def pytest_collection_finish(session: pytest.Session) -> None:
  sys.pycache_prefix, sys.dont_write_bytecode = _BYTECODE


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
  """An xdist worker ends here, once its results are with the controller ("workerfinished" is
  sent in pytest_sessionfinish): freeing its thousands of compiled XLA programs and the rest
  of the interpreter's teardown took 3-6 s at the end of every run. Its fork server sees its
  stdin close and exits too."""
  if hasattr(config, "workerinput"):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """The tests marked slow first (in their order), so that pytest-xdist hands them out early
  and the workers finish together instead of one waiting for the other's last long test."""
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
