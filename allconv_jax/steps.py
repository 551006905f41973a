"""The jitted steps of a run: one SGD step (augmentation, dropout, loss, gradients, update) and
one evaluation batch, run as `lax.scan` chunks on GPU/TPU and one dispatch per step on the CPU
(cpu.scan_steps says why). The dataset stays on the devices; each batch is gathered there."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from allconv_jax import cpu, metrics, models
from allconv_jax.data import augmentation
from allconv_jax.input_pipeline import EvalSet
from allconv_jax.optim import TrainState


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, *,
               model: models.AllConvNet, tx: optax.GradientTransformation, augment: bool,
               translate: int) -> tuple[TrainState, metrics.Metrics]:
  """One SGD step: augmentation, dropout, softmax cross-entropy, gradients, optax update."""
  aug_key, dropout_key = jax.random.split(key)
  if augment:
    images = augmentation.augment(aug_key, images, flip=True, translate=translate)

  def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(losses), (logits, losses)

  (_, (logits, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics.batch_sums(logits, labels, losses)


def eval_step(params: Any, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              model: models.AllConvNet) -> metrics.Metrics:
  """Loss and accuracy sums of one (padded) evaluation batch."""
  logits = model.apply({"params": params}, images, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return metrics.batch_sums(logits, labels, losses, mask)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted functions of one run, bound to its model, optimizer and mesh."""
  train_chunk: Callable[..., tuple[TrainState, metrics.Metrics]]  # (state, sums, images,
  # labels, batch indices (steps, batch), key) -> (state, sums), the steps in order
  evaluate: Callable[..., metrics.Metrics]  # (params, EvalSet arrays) -> sums
  epoch_batches: Callable[..., jax.Array]  # (key, epoch) -> batch indices (steps, batch)


def make_steps(model: models.AllConvNet, tx: optax.GradientTransformation, mesh: Mesh,
               config: ml_collections.ConfigDict, num_train: int,
               steps_per_epoch: int) -> Steps:
  """Jits the train chunk, the evaluation and the data order; the batch is sharded on 'data'."""
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  step = functools.partial(train_step, model=model, tx=tx, augment=config.data.augment,
                           translate=config.data.translate_pixels)

  def one_step(state: TrainState, sums: metrics.Metrics, images: jax.Array, labels: jax.Array,
               batch_idx: jax.Array, key: jax.Array) -> tuple[TrainState, metrics.Metrics]:
    x = jax.lax.with_sharding_constraint(images[batch_idx], batch_sharding)
    y = jax.lax.with_sharding_constraint(labels[batch_idx], batch_sharding)
    state, m = step(state, x, y, jax.random.fold_in(key, state.step))  # dropout, augmentation
    return state, jax.tree_util.tree_map(jnp.add, sums, m)

  def one_eval(sums: metrics.Metrics, params: Any, x: jax.Array, y: jax.Array,
               mask: jax.Array) -> metrics.Metrics:
    x, y, mask = (jax.lax.with_sharding_constraint(b, batch_sharding) for b in (x, y, mask))
    return jax.tree_util.tree_map(jnp.add, sums, eval_step(params, x, y, mask, model=model))

  if cpu.scan_steps():
    def scan_chunk(state: TrainState, sums: metrics.Metrics, images: jax.Array,
                   labels: jax.Array, idx: jax.Array, key: jax.Array) -> Any:
      def body(carry: Any, batch_idx: jax.Array) -> tuple[Any, None]:
        return one_step(*carry, images, labels, batch_idx, key), None
      return jax.lax.scan(body, (state, sums), idx)[0]

    def scan_eval(params: Any, images: jax.Array, labels: jax.Array,
                  mask: jax.Array) -> metrics.Metrics:
      def body(sums: metrics.Metrics, batch: tuple[jax.Array, ...]) -> tuple[Any, None]:
        return one_eval(sums, params, *batch), None
      return jax.lax.scan(body, metrics.zeros(), (images, labels, mask))[0]

    train_chunk = jax.jit(scan_chunk, donate_argnums=(0, 1), out_shardings=replicated)
    evaluate = jax.jit(scan_eval, out_shardings=replicated)
  else:  # the CPU: one dispatch per step (cpu.scan_steps says why)
    options = cpu.step_compiler_options()
    jit_step = jax.jit(one_step, donate_argnums=(0, 1), out_shardings=replicated,
                       compiler_options=options)
    jit_eval = jax.jit(one_eval, donate_argnums=(0,), out_shardings=replicated,
                       compiler_options=options)
    jit_zeros = jax.jit(metrics.zeros, out_shardings=replicated)

    def train_chunk(state: TrainState, sums: metrics.Metrics, images: jax.Array,
                    labels: jax.Array, idx: jax.Array, key: jax.Array) -> Any:
      for i in range(idx.shape[0]):
        state, sums = jit_step(state, sums, images, labels, idx[i], key)
        # One step in flight: a stop signal waits for the running step only.
        jax.block_until_ready(sums)
      return state, sums

    def evaluate(params: Any, images: jax.Array, labels: jax.Array,
                 mask: jax.Array) -> metrics.Metrics:
      sums = jit_zeros()
      for i in range(images.shape[0]):
        sums = jit_eval(sums, params, images[i], labels[i], mask[i])
      return sums

  def epoch_batches(key: jax.Array, epoch: jax.Array) -> jax.Array:
    """One epoch's batches: the first steps x batch of a permutation of the training set."""
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_train)
    return perm[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch,
                                                               config.batch_size)

  return Steps(train_chunk, evaluate, jax.jit(epoch_batches, out_shardings=replicated))


def evaluate(steps: Steps, params: Any, split: EvalSet) -> metrics.Metrics:
  """The summed metrics of an evaluation split."""
  return steps.evaluate(params, split.images, split.labels, split.mask)
