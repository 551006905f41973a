"""Settings for the lazy TensorFlow imports (TensorBoard, tfds): keep TensorFlow's start-up
lines off stderr. TensorFlow computes nothing the model depends on, so turning its oneDNN
kernels off changes no result of ours."""

from __future__ import annotations

import os

QUIET = {
  "TF_CPP_MIN_LOG_LEVEL": "2",  # C++ INFO and WARNING lines
  "TF_ENABLE_ONEDNN_OPTS": "0",  # "oneDNN custom operations are on" (TF 2.21 logs it via absl)
}


def quiet_tensorflow() -> None:
  """Set QUIET in the environment before TensorFlow is imported (user settings win)."""
  for key, value in QUIET.items():
    os.environ.setdefault(key, value)
