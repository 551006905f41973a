"""A run's metrics: sums over batches on the device, their means on the host, and TensorBoard.

The train and eval steps add each batch's sums (loss, correct predictions, count, mean |logit|)
to running totals on the device, read once per chunk of steps or per evaluation; the epoch's
record goes to metrics.jsonl (files.py) and, when TensorFlow is installed, to TensorBoard.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from allconv_jax import files
from allconv_jax.tensorflow_env import quiet_tensorflow

Metrics = dict[str, jax.Array]
KEYS = ("loss", "correct", "count", "logit_abs")


def zeros() -> Metrics:
  """Empty sums (a checkpoint saves them with the train state: a mid-epoch resume keeps them)."""
  return {k: jnp.zeros((), jnp.float32) for k in KEYS}


def batch_sums(logits: jax.Array, labels: jax.Array, losses: jax.Array,
               mask: jax.Array | None = None) -> Metrics:
  """Sums over a batch: loss, correct predictions, count, mean |logit| per example."""
  if mask is None:
    mask = jnp.ones(labels.shape, jnp.float32)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask), "logit_abs": jnp.sum(jnp.mean(jnp.abs(logits), -1) * mask)}


def means(sums: Metrics) -> dict[str, float]:
  """Loss, accuracy and mean |logit| from summed metrics (reads them from the device)."""
  s = {k: float(v) for k, v in jax.device_get(sums).items()}
  n = max(s["count"], 1.0)
  return {"loss": s["loss"] / n, "accuracy": s["correct"] / n, "logit_abs": s["logit_abs"] / n}


class TensorBoard:
  """clu metric writers into WORKDIR/tensorboard when TensorFlow is installed; else nothing."""

  def __init__(self, workdir: str, enabled: bool) -> None:
    self.writer = None
    if not enabled or importlib.util.find_spec("tensorflow") is None:
      return
    quiet_tensorflow()
    try:
      from clu import metric_writers  # imports TensorFlow: only here
      self.writer = metric_writers.create_default_writer(files.path(workdir, files.TENSORBOARD),
                                                         just_logging=False)
    except Exception as e:  # noqa: BLE001 - TensorBoard is optional
      logging.warning("no TensorBoard writer: %s", e)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
