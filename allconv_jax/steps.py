"""The jitted steps of a run: one SGD step (augmentation, dropout, loss, gradients, update) and
evaluation, run as `lax.scan` chunks on GPU/TPU or one dispatch per step on the CPU."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from allconv_jax import models
from allconv_jax.data import augmentation
from allconv_jax.optim import TrainState

Metrics = dict[str, jax.Array]
METRIC_KEYS = ("loss", "correct", "count", "logit_abs")


def zero_metrics() -> Metrics:
  return {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def batch_metrics(logits: jax.Array, labels: jax.Array, losses: jax.Array,
                  mask: jax.Array | None = None) -> Metrics:
  """Sums over a batch: loss, correct predictions, count, mean |logit| per example."""
  if mask is None:
    mask = jnp.ones(labels.shape, jnp.float32)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask), "logit_abs": jnp.sum(jnp.mean(jnp.abs(logits), -1) * mask)}


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, *,
               model: models.AllConvNet, tx: optax.GradientTransformation, augment: bool,
               translate: int) -> tuple[TrainState, Metrics]:
  """One SGD step: augmentation, dropout, softmax cross-entropy, gradients, optax update."""
  aug_key, dropout_key = jax.random.split(key)
  if augment:
    images = augmentation.augment(aug_key, images, flip=True, translate=translate)

  def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key})
    losses = cross_entropy(logits, labels)
    return jnp.mean(losses), (logits, losses)

  (_, (logits, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, batch_metrics(logits, labels, losses)


def eval_step(params: Any, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              model: models.AllConvNet) -> Metrics:
  """Loss and accuracy sums of one (padded) evaluation batch."""
  logits = model.apply({"params": params}, images, train=False)
  return batch_metrics(logits, labels, cross_entropy(logits, labels), mask)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted functions of one run, bound to its model, optimizer and mesh."""
  train_chunk: Callable[..., tuple[TrainState, Metrics]]
  evaluate: Callable[..., Metrics]
  epoch_indices: Callable[..., jax.Array]


def use_scan() -> bool:
  """Whether to run a chunk of steps as one `lax.scan` (GPU/TPU) or as a loop of jitted steps.

  XLA:CPU runs convolutions inside a while loop (a rolled scan) about 40x slower than the same
  step jitted alone (measured: 4 vs 154 images/s, quarter-width All-CNN-C, jaxlib 0.10.2), so
  on the CPU each step is its own dispatch; the arithmetic is the same either way.
  """
  return jax.default_backend() != "cpu"


# XLA:CPU hands convolutions to YNNPACK by default; its weight-gradient convolutions run ~3x
# slower than XLA's own (Eigen) ones here, so on the CPU only reductions and dots go to YNNPACK.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def cpu_compiler_options() -> dict[str, str] | None:
  """CPU_COMPILER_OPTIONS if this jaxlib accepts them (they are experimental), else None."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        np.float32(0)).compile()
  except Exception:  # noqa: BLE001 - an unknown option or enum value: keep XLA's defaults
    return None
  return CPU_COMPILER_OPTIONS


def epoch_order(key: jax.Array, epoch: jax.Array, *, num_train: int, steps_per_epoch: int,
                batch_size: int) -> jax.Array:
  """One epoch's batches: the first steps x batch of a permutation of the training set."""
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_train)
  return perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)


def make_steps(model: models.AllConvNet, tx: optax.GradientTransformation, mesh: Mesh,
               config: ml_collections.ConfigDict, num_train: int,
               steps_per_epoch: int) -> Steps:
  """Jits the chunk of train steps, the evaluation and the data order."""
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  step = functools.partial(train_step, model=model, tx=tx, augment=config.data.augment,
                           translate=config.data.translate_pixels)

  def one_step(state: TrainState, sums: Metrics, images: jax.Array, labels: jax.Array,
               batch_idx: jax.Array, key: jax.Array) -> tuple[TrainState, Metrics]:
    x = jax.lax.with_sharding_constraint(images[batch_idx], batch_sharding)
    y = jax.lax.with_sharding_constraint(labels[batch_idx], batch_sharding)
    state, m = step(state, x, y, jax.random.fold_in(key, state.step))
    return state, jax.tree_util.tree_map(jnp.add, sums, m)

  def one_eval(sums: Metrics, params: Any, x: jax.Array, y: jax.Array,
               mask: jax.Array) -> Metrics:
    x, y, mask = (jax.lax.with_sharding_constraint(b, batch_sharding) for b in (x, y, mask))
    return jax.tree_util.tree_map(jnp.add, sums, eval_step(params, x, y, mask, model=model))

  if use_scan():
    def scan_chunk(state: TrainState, sums: Metrics, images: jax.Array, labels: jax.Array,
                   idx: jax.Array, key: jax.Array) -> tuple[TrainState, Metrics]:
      def body(carry: tuple[TrainState, Metrics], batch_idx: jax.Array) -> tuple[Any, None]:
        return one_step(*carry, images, labels, batch_idx, key), None
      return jax.lax.scan(body, (state, sums), idx)[0]

    def scan_eval(params: Any, images: jax.Array, labels: jax.Array,
                  mask: jax.Array) -> Metrics:
      def body(sums: Metrics, batch: tuple[jax.Array, ...]) -> tuple[Metrics, None]:
        return one_eval(sums, params, *batch), None
      return jax.lax.scan(body, zero_metrics(), (images, labels, mask))[0]

    train_chunk = jax.jit(scan_chunk, donate_argnums=(0, 1), out_shardings=replicated)
    evaluate = jax.jit(scan_eval, out_shardings=replicated)
  else:
    options = cpu_compiler_options()
    jit_step = jax.jit(one_step, donate_argnums=(0, 1), out_shardings=replicated,
                       compiler_options=options)
    jit_eval = jax.jit(one_eval, donate_argnums=(0,), out_shardings=replicated,
                       compiler_options=options)
    jit_zero = jax.jit(zero_metrics, out_shardings=replicated)

    def train_chunk(state: TrainState, sums: Metrics, images: jax.Array, labels: jax.Array,
                    idx: jax.Array, key: jax.Array) -> tuple[TrainState, Metrics]:
      for i in range(idx.shape[0]):
        state, sums = jit_step(state, sums, images, labels, idx[i], key)
      return state, sums

    def evaluate(params: Any, images: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
      sums = jit_zero()
      for i in range(images.shape[0]):
        sums = jit_eval(sums, params, images[i], labels[i], mask[i])
      return sums

  order = functools.partial(epoch_order, num_train=num_train, steps_per_epoch=steps_per_epoch,
                            batch_size=config.batch_size)
  return Steps(train_chunk=train_chunk, evaluate=evaluate,
               epoch_indices=jax.jit(order, out_shardings=replicated))


class StepsCache:
  """The jitted steps of recent runs in this process, by what they are built from.

  A later run with the same configuration, model, data sizes and devices gets the same jitted
  functions back, so it skips tracing, lowering and loading its programs (about 0.6 s for the
  tiny test run; the test suite runs the same small configs dozens of times). The key holds the
  whole config, so anything that shapes the model, the optimizer or the step is in it.
  """

  def __init__(self, size: int = 8) -> None:
    self.size = size
    self.entries: dict[tuple[Any, ...], Steps] = {}  # oldest first

  def get(self, model: models.AllConvNet, tx: optax.GradientTransformation, mesh: Mesh,
          config: ml_collections.ConfigDict, num_train: int, steps_per_epoch: int) -> Steps:
    key = (config.to_json(), repr(model), num_train, steps_per_epoch,
           tuple(d.id for d in mesh.devices.flat), mesh.axis_names, use_scan())
    if key not in self.entries:
      if len(self.entries) >= self.size:
        self.entries.pop(next(iter(self.entries)))  # the oldest
      self.entries[key] = make_steps(model, tx, mesh, config, num_train, steps_per_epoch)
    return self.entries[key]


CACHE = StepsCache()


def metric_means(sums: Metrics) -> dict[str, float]:
  """Loss, accuracy and mean |logit| from summed metrics."""
  s = {k: float(v) for k, v in jax.device_get(sums).items()}
  n = max(s["count"], 1.0)
  return {"loss": s["loss"] / n, "accuracy": s["correct"] / n, "logit_abs": s["logit_abs"] / n}
