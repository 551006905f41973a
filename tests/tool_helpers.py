"""Helpers of the results-tools tests (test_sweep.py, test_report.py, test_evaluate_visualize.py
and conftest.py's `swept`): the sweep's flags, a sweep in this process, a PNG check."""

import os

from PIL import Image

from allconv_jax.tools import sweep
from tests.helpers import ROOT, tiny_flags

ALL_CNN_C = os.path.join(ROOT, "configs", "all_cnn_c.py")


def sweep_flags(**overrides):
  """tiny_flags for configs/all_cnn_c.py without the rate (the sweep sets it)."""
  return [f for f in tiny_flags(**overrides) if "optimizer.learning_rate" not in f]


def run_sweep(*args, **kwargs):
  """sweep.run_sweep in this process; (summary, the lines it echoed)."""
  lines = []
  summary = sweep.run_sweep(*args, echo=lines.append, **kwargs)
  return summary, "\n".join(lines)


def assert_png(path):
  """`path` is a valid PNG image larger than 50 x 50 pixels."""
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    assert img.size[0] > 50 and img.size[1] > 50
