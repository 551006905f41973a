"""Shared test helpers: a tiny, fast config and a way to run main.py in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import ml_collections

from configs import default
from tests import launcher

ROOT = launcher.ROOT  # the repository root
TIMING = ("images_per_sec", "elapsed_sec")  # metrics fields that differ between equal runs


def require_onednn() -> None:
  """Skips off x86-64 Linux, where the oneDNN convolutions are not built; there, fails unless
  they built (requirements.txt installs oneDNN; the machine needs a C++ compiler)."""
  import platform

  import pytest

  from allconv_jax import onednn

  if platform.machine() != "x86_64" or platform.system() != "Linux":
    pytest.skip("the oneDNN convolutions are built on x86-64 Linux only")
  assert onednn.unavailable() is None, onednn.unavailable()


def untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Metrics records without their timing fields."""
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def metrics(workdir: str) -> list[dict[str, Any]]:
  """A run's metrics.jsonl records without their timing fields."""
  from allconv_jax import workdir as wd

  return untimed(wd.read_metrics(os.path.join(workdir, "metrics.jsonl")))


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
  """All-CNN-C at width x0.05 on 256 synthetic images: a run takes seconds on a CPU.

  Overrides use '__' for nesting, e.g. tiny_config(model__name='model_a', num_epochs=3).
  """
  config = default.get_config()
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
  from allconv_jax import config_lib

  flat = dict(config_lib.flatten(tiny_config(**overrides)))
  base = dict(config_lib.flatten(default.get_config()))
  base["model.name"] = "all_cnn_c"
  out = []
  for key, value in flat.items():
    if value != base.get(key):
      out.append(f"--config.{key}={value}")
  return out


def run_main(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
  """Runs `python main.py ARGS` from the repository root and captures its output."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return launcher.run(
    [sys.executable, os.path.join(ROOT, "main.py"), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )
