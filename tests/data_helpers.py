"""Helpers of the data tests (test_data_sources.py, test_input_pipeline.py): data configs,
the one-line UserError check and the order a seed gives the training split."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from allconv_jax import config as config_lib
from allconv_jax.errors import UserError


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The default data config with `overrides`."""
  cfg = config_lib.get_config().data
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def local(path, **overrides) -> ml_collections.ConfigDict:
  """The data config of the local files in `path`, with `overrides`."""
  return data_config(source="local", dir=str(path), **overrides)


def user_error(fn, *args, **kwargs) -> str:
  """Calls fn, expects a UserError with a one-line message and returns the message."""
  with pytest.raises(UserError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert message and "\n" not in message
  return message


def expected_order(n: int, seed: int) -> np.ndarray:
  """The shuffle `seed` gives n training images (its first validation_size go to validation)."""
  return np.random.default_rng(seed).permutation(n)
