"""Shared test helpers: a tiny, fast config, and the programs run as real processes (for the
tests where the process is what is tested: exit codes, stderr, signals, the command line)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import ml_collections
import numpy as np

from allconv_jax.config import flatten, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
TIMING = ("images_per_sec", "elapsed_sec")  # metrics fields that differ between equal runs


def require_onednn() -> None:
  """Skips off x86-64 Linux, where the oneDNN convolutions are not built; there, fails unless
  they built (requirements.txt installs oneDNN; the machine needs a C++ compiler)."""
  import platform

  import pytest

  from allconv_jax.cpu import onednn

  if platform.machine() != "x86_64" or platform.system() != "Linux":
    pytest.skip("the oneDNN convolutions are built on x86-64 Linux only")
  assert onednn.missing() is None, onednn.missing()
  onednn.load()


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Standard-normal float32 test inputs from NumPy: unlike jax.random.normal, no program to
  compile for every new shape."""
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Metrics records without their timing fields."""
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def metrics(workdir: str) -> list[dict[str, Any]]:
  """A run's metrics.jsonl records without their timing fields."""
  from allconv_jax import files

  return untimed(files.read_metrics(os.path.join(workdir, "metrics.jsonl")))


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
  """All-CNN-C at width x0.05 on 256 synthetic images: a run takes seconds on a CPU.

  Overrides use '__' for nesting, e.g. tiny_config(model__name='model_a', num_epochs=3).
  """
  config = get_config()
  config.num_epochs = 2
  config.batch_size = 32
  config.eval_batch_size = 64
  config.log_every_steps = 4
  config.tensorboard = False
  config.model.width_multiplier = 0.05
  config.data.source = "synthetic"
  config.data.preprocessing = "meanstd"
  config.data.validation_size = 64
  config.data.max_train_examples = 256
  config.data.max_test_examples = 64
  config.optimizer.learning_rate = 0.05
  config.checkpoint.every_epochs = 1
  for key, value in overrides.items():
    node = config
    *path, last = key.split("__")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def tiny_flags(**overrides: Any) -> list[str]:
  """The --config.* flags that turn configs/all_cnn_c.py into tiny_config(**overrides)."""
  flat = dict(flatten(tiny_config(**overrides)))
  base = dict(flatten(get_config()))
  base["model.name"] = "all_cnn_c"
  out = []
  for key, value in flat.items():
    if value != base.get(key):
      out.append(f"--config.{key}={value}")
  return out


def run(args: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
  """Runs a command from the repository root and captures its output (text)."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
  return subprocess.run(args, cwd=kwargs.pop("cwd", ROOT), env=env, capture_output=True,
                        text=True, timeout=timeout, check=False, **kwargs)


def run_main(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
  """Runs `python main.py ARGS` from the repository root and captures its output."""
  return run([sys.executable, os.path.join(ROOT, "main.py"), *args], timeout=timeout, **kwargs)


def run_tool(module: str, *args: str, timeout: float = 300,
             **kwargs: Any) -> subprocess.CompletedProcess:
  """Runs `python -m allconv_jax.tools.MODULE ARGS` from the repository root."""
  return run([sys.executable, "-m", f"allconv_jax.tools.{module}", *args], timeout=timeout,
             **kwargs)


def popen_main(*args: str, **kwargs: Any) -> subprocess.Popen:
  """Starts `python main.py ARGS` (stdout and stderr piped, text) for tests that signal it."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)
