"""Training and evaluation: one jitted train step, scanned over an epoch on device-resident data.

`train_and_evaluate(config, workdir)` serves CIFAR-10, CIFAR-100, subsets and transfer runs. The
workdir holds `config.json`, `preprocessing.npz`, `metrics.jsonl` (a JSON object per epoch),
`checkpoints/<step>/` (orbax) and, at the very end, `results.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from allconv_jax import checkpointing, cli, config_lib, input_pipeline, models, transfer
from allconv_jax.errors import UserError

Metrics = dict[str, jax.Array]
METRIC_KEYS = ("loss", "correct", "count", "logit_abs")


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


def diverged(what: str, learning_rate: float, last_good: int | None) -> TrainingDiverged:
  """The one-line error for a run whose numbers blew up."""
  kept = (f"the last good checkpoint (step {last_good}) is kept" if last_good is not None
          else "no checkpoint was saved yet")
  return TrainingDiverged(f"training diverged: {what} at learning rate {learning_rate:g}; {kept}; "
                          "lower optimizer.learning_rate or set optimizer.warmup_epochs")


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved."""


class TrainState(struct.PyTreeNode):
  """Step counter, parameters and optimizer state (the optimizer itself lives in closures)."""
  step: jax.Array
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------- optimizer


def make_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """A constant rate per segment, changing at each boundary epoch (counted in steps, rounded;
  fractional epochs allowed), after an optional linear warm-up."""
  rates = [float(r) for r in opt.learning_rates]  # when set, rates[0] == learning_rate (checked)
  scales = ([new / old for old, new in zip(rates, rates[1:], strict=False)] if rates
            else [opt.decay_factor] * len(opt.boundaries))
  schedule = optax.piecewise_constant_schedule(
      opt.learning_rate, {int(round(b * steps_per_epoch)): scale
                          for b, scale in zip(opt.boundaries, scales, strict=True)})
  warmup_steps = int(round(opt.warmup_epochs * steps_per_epoch))
  if warmup_steps == 0:
    return schedule
  warmup = optax.linear_schedule(opt.learning_rate / warmup_steps, opt.learning_rate,
                                 warmup_steps - 1)
  return optax.join_schedules([warmup, lambda s: schedule(s + warmup_steps)], [warmup_steps])


def param_labels(params: Any, freeze: str) -> Any:
  """'frozen' for parameters whose path ('backbone/stage1_conv1/kernel') matches `freeze`."""
  pattern = re.compile(freeze) if freeze else None

  def label(path: tuple[Any, ...], _: Any) -> str:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return "frozen" if pattern is not None and pattern.match(name) else "trainable"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int,
                   params: Any) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (grad + wd * w, as Caffe and PyTorch do).

  Parameters matched by `optimizer.freeze` get `optax.set_to_zero()`: no update, no weight
  decay and no momentum buffer.
  """
  sgd = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(make_schedule(opt, steps_per_epoch), momentum=opt.momentum or None))
  if not opt.freeze:
    return sgd
  return optax.multi_transform({"trainable": sgd, "frozen": optax.set_to_zero()},
                               param_labels(params, opt.freeze))


# ----------------------------------------------------------------------------- steps


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
    images = input_pipeline.augment(aug_key, images, flip=True, translate=translate)

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

  def epoch_indices(key: jax.Array, epoch: jax.Array) -> jax.Array:
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_train)
    return perm[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch,
                                                                config.batch_size)

  return Steps(train_chunk=train_chunk, evaluate=evaluate,
               epoch_indices=jax.jit(epoch_indices, out_shardings=replicated))


# ----------------------------------------------------------------------------- data on device


def make_mesh() -> Mesh:
  """A one-axis ('data') mesh over every device of every process."""
  return Mesh(np.array(jax.devices()), ("data",))


def replicate(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array with a full copy on every device (works across hosts)."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """`replicate` for every leaf of a tree of host or single-device arrays.

  Through host memory on purpose: with several processes, `jax.device_put` of a single-device
  jax array onto a mesh that spans processes gives a broken array (seen with jax 0.10.2).
  """
  return jax.tree_util.tree_map(lambda x: replicate(np.asarray(x), mesh), tree)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """An evaluation split padded and cut into batches: (num_batches, batch, ...) plus a mask."""
  images: jax.Array
  labels: jax.Array
  mask: jax.Array
  size: int


def make_eval_set(images: np.ndarray, labels: np.ndarray, batch: int, mesh: Mesh) -> EvalSet:
  n = len(labels)
  batch = max(1, min(batch, n)) if n else 1
  batch = -(-batch // mesh.size) * mesh.size
  nb = max(1, -(-n // batch)) if n else 0
  pad = nb * batch - n
  imgs = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labs = np.concatenate([labels, np.zeros((pad,), labels.dtype)]).astype(np.int32)
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return EvalSet(replicate(imgs.reshape(nb, batch, *images.shape[1:]), mesh),
                 replicate(labs.reshape(nb, batch), mesh), replicate(mask.reshape(nb, batch),
                                                                     mesh), n)


def dead_relus(model: models.AllConvNet, params: Any, data: EvalSet) -> dict[str, float]:
  """Per ReLU layer, the fraction of channels silent on every image of `data`'s first batch."""
  n = min(data.size, data.images.shape[1])
  return models.dead_relu_fractions(model, params, data.images[0][:n])


def summarize(sums: Metrics) -> dict[str, float]:
  """Loss, accuracy and mean |logit| from summed metrics."""
  s = {k: float(v) for k, v in jax.device_get(sums).items()}
  n = max(s["count"], 1.0)
  return {"loss": s["loss"] / n, "accuracy": s["correct"] / n, "logit_abs": s["logit_abs"] / n}


# ----------------------------------------------------------------------------- logging


def log(msg: str) -> None:
  """A console line (process 0 only) and an absl log line."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


class Writer:
  """clu metric writers (TensorBoard) when TensorFlow is installed; otherwise nothing."""

  def __init__(self, workdir: str, enabled: bool) -> None:
    self.writer = None
    if not enabled or jax.process_index() != 0:
      return
    if importlib.util.find_spec("tensorflow") is None:
      return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
      from clu import metric_writers
      self.writer = metric_writers.create_default_writer(
          os.path.join(workdir, "tensorboard"), just_logging=False)
    except Exception as e:  # noqa: BLE001 - TensorBoard is optional
      logging.warning("no TensorBoard writer: %s", e)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file. A line that is not a record (a truncated last line
  from a kill, a damaged line) is skipped with a warning; the records after it are kept."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict) and {"epoch", "step"} <= record.keys():
        records.append(record)
      elif line.strip():
        logging.warning("%s: line %d is not a metrics record; skipped", path, number)
  return records


def write_metrics(path: str, records: list[dict[str, Any]]) -> None:
  """Rewrites metrics.jsonl atomically with `records`."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-metrics-")
  with os.fdopen(fd, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def append_metrics(path: str, record: dict[str, Any]) -> None:
  """Appends one record to metrics.jsonl and flushes it to disk."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def should_stop(event: threading.Event) -> bool:
  """Whether any process received a stop signal (all processes agree, so they save together)."""
  if jax.process_count() == 1:
    return event.is_set()
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(event.is_set()))))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
  """Sets an event on SIGTERM/SIGINT (main thread only), so the loop can save and stop."""
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield event
    return

  def handler(signum: int, _: Any) -> None:
    event.set()  # no printing here: the handler may interrupt a print of the main thread

  with cli.signal_handler(handler):
    yield event


# ----------------------------------------------------------------------------- the run


def num_classes(config: ml_collections.ConfigDict) -> int:
  return input_pipeline.num_classes(config.data)


def workdir_files(workdir: str) -> dict[str, str]:
  names = ("config.json", "metrics.jsonl", "results.json", "preprocessing.npz",
           checkpointing.BEST_FILE, "checkpoints", "corrupt_checkpoints", "tensorboard")
  return {n: os.path.join(workdir, n) for n in names}


def clear_workdir(workdir: str) -> None:
  """Removes a previous run's outputs (only those this program writes)."""
  for path in workdir_files(workdir).values():
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def check_restartable(workdir: str) -> None:
  """restart=True deletes only a run's outputs: refuse a folder that holds some of the files
  this program writes but no config.json (it is not a run's workdir)."""
  files = workdir_files(workdir)
  if os.path.exists(files["config.json"]):
    return
  ours = [n for n, path in files.items() if os.path.exists(path)]
  if ours:
    raise UserError(f"--config.restart=True would delete {', '.join(ours)} in {workdir}, "
                    "which is not a run's workdir (no config.json); delete them yourself or "
                    "use another --workdir")


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The workdir's saved config if compatible; UserError if it would be invalidated."""
  files = workdir_files(workdir)
  if not os.path.exists(files["config.json"]):
    leftovers = [n for n in ("results.json", "checkpoints", "metrics.jsonl")
                 if os.path.exists(files[n]) and (n != "checkpoints" or os.listdir(files[n]))]
    if leftovers:
      raise UserError(f"workdir {workdir} holds {', '.join(leftovers)} but no config.json; "
                      "use another --workdir or set --config.restart=True to start over")
    return None
  saved = checkpointing.read_json(files["config.json"])
  saved_nothing = not (read_metrics(files["metrics.jsonl"]) or os.path.exists(files["results.json"])
                       or checkpointing.Checkpoints.has_steps(workdir))
  if saved_nothing:
    # a failed start (say, out of memory) does not bind the corrected rerun; its leftovers
    # (config.json, preprocessing.npz fitted for that config) go
    log(f"workdir {workdir} holds a run that saved nothing yet; starting afresh")
    if jax.process_index() == 0:
      clear_workdir(workdir)
    return None
  bad, other = config_lib.run_defining_changes(saved, config)
  if bad:
    old, new = dict(config_lib.flatten(saved)), dict(config_lib.flatten(config_lib.to_json(
        config)))
    diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad)
    raise UserError(f"workdir {workdir} holds a run with another {diffs}; use another --workdir "
                    "or set --config.restart=True to start over")
  if other:
    log(f"resuming with changed settings: {', '.join(other)}")
  return saved


def prepare(config: ml_collections.ConfigDict, workdir: str) -> transfer.Source | None:
  """Every check that needs no compute: config, data, transfer source."""
  config_lib.validate(config)
  source = transfer.check_source(config)
  input_pipeline.check_available(config.data)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} exists and is not a folder")
  return source


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` and returns its results.json contents."""
  workdir = os.path.abspath(workdir)
  source = prepare(config, workdir)
  with checkpointing.workdir_lock(workdir):
    files = workdir_files(workdir)
    if config.restart:
      check_restartable(workdir)
      saved = None
    else:
      saved = check_resumable(config, workdir)
    if saved is not None and os.path.exists(files["results.json"]):
      results = checkpointing.read_json(files["results.json"])
      if results.get("epochs", 0) >= config.num_epochs:
        log(f"run in {workdir} is finished ({results['epochs']} epochs): test accuracy "
            f"{results['test_accuracy']:.4f}, test loss {results['test_loss']:.4f}")
        return results
      # results.json stays until the extended run replaces it (atomically) at its end
      log(f"extending the finished {results.get('epochs')}-epoch run to {config.num_epochs} "
          "epochs")
    splits = input_pipeline.load_splits(config.data, config.seed)  # every data check first
    if config.restart and jax.process_index() == 0:
      clear_workdir(workdir)  # only now that every check has passed
    return _run(config, workdir, source, splits)


def _preprocessing(config: ml_collections.ConfigDict, workdir: str,
                   source: transfer.Source | None, train_images: np.ndarray) -> dict[str, Any]:
  path = workdir_files(workdir)["preprocessing.npz"]
  if os.path.exists(path):
    return input_pipeline.load_preprocessing(path)
  if source is not None:
    stats = input_pipeline.load_preprocessing(source.preprocessing_path)
    log(f"reusing the preprocessing statistics of {source.workdir}")
  else:
    t0 = time.time()
    stats = input_pipeline.fit_preprocessing(config.data, train_images)
    log(f"fitted {config.data.preprocessing} preprocessing in {time.time() - t0:.1f}s")
  if jax.process_index() == 0:
    input_pipeline.save_preprocessing(path, stats)
  return stats


def _run(config: ml_collections.ConfigDict, workdir: str, source: transfer.Source | None,
         splits: input_pipeline.Splits) -> dict[str, Any]:
  files = workdir_files(workdir)
  t_start = time.time()
  n_train = len(splits.train_labels)
  mesh = make_mesh()
  if config.batch_size > n_train:
    raise UserError(f"batch_size ({config.batch_size}) is larger than the training set "
                    f"({n_train} images)")
  if config.batch_size % mesh.size:
    raise UserError(f"batch_size ({config.batch_size}) must be a multiple of the number of "
                    f"devices ({mesh.size})")
  if jax.process_index() == 0:
    checkpointing.write_json(files["config.json"], config_lib.to_json(config))
  stats = _preprocessing(config, workdir, source, splits.train_images)

  def prep(x: np.ndarray) -> np.ndarray:
    return input_pipeline.apply_preprocessing(stats, x)

  train_images = replicate(prep(splits.train_images), mesh)
  train_labels = replicate(splits.train_labels.astype(np.int32), mesh)
  val = make_eval_set(prep(splits.val_images), splits.val_labels, config.eval_batch_size, mesh)
  test = make_eval_set(prep(splits.test_images), splits.test_labels, config.eval_batch_size,
                       mesh)
  log(f"data: {n_train} train, {val.size} validation, {test.size} test images, "
      f"{len(splits.class_names)} classes ({time.time() - t_start:.1f}s)")

  k = len(splits.class_names)
  model = models.create_model(config.model, k)
  spe = n_train // config.batch_size
  total_steps = spe * config.num_epochs
  root = jax.random.key(config.seed)
  init_key, data_key, train_key = (jax.random.fold_in(root, i) for i in range(3))
  params = models.init_params(model, init_key)
  tx = make_optimizer(config.optimizer, spe, params)
  schedule = make_schedule(config.optimizer, spe)
  steps = make_steps(model, tx, mesh, config, n_train, spe)

  ckpts = checkpointing.Checkpoints(workdir, config.checkpoint.keep)
  if source is not None and not ckpts.steps():
    params = transfer.initial_params(source, config, params)
  put = functools.partial(replicate_tree, mesh=mesh)
  state = put(TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params)))
  sums = put(zero_metrics())
  restored = ckpts.restore_newest({"state": state, "sums": sums})
  records: list[dict[str, Any]] = []
  last_good = None
  if restored is not None:
    step, tree = restored
    last_good = step
    state, sums = tree["state"], tree["sums"]
    records = [r for r in read_metrics(files["metrics.jsonl"]) if r["step"] <= step]
    log(f"resuming from checkpoint step {step} (epoch {step // spe}"
        f"{', mid-epoch' if step % spe else ''})")
  elif os.path.exists(files["metrics.jsonl"]):
    log("no checkpoint yet: starting from the beginning")
  if jax.process_index() == 0:
    write_metrics(files["metrics.jsonl"], records)

  step = int(state.step)
  if step > total_steps:
    raise UserError(f"workdir {workdir} has trained {step // spe} epochs already, more than "
                    f"num_epochs={config.num_epochs}; raise num_epochs or use another --workdir")
  elapsed0 = records[-1]["elapsed_sec"] if records else 0.0
  best = max(records, key=lambda r: r["val_accuracy"] if r["val_accuracy"] is not None else -1,
             default=None)
  best_acc = best["val_accuracy"] if best and best["val_accuracy"] is not None else -1.0
  writer = Writer(workdir, enabled=config.tensorboard)
  log(f"{config.model.name} (width x{config.model.width_multiplier}, "
      f"{models.count_params(params):,} parameters) on {config.data.dataset}"
      f"{' ' + config.data.subset if config.data.subset else ''}: {config.num_epochs} epochs of "
      f"{spe} steps, batch {config.batch_size}, {mesh.size} device(s) "
      f"({jax.devices()[0].platform})")

  t_loop = time.time()
  warned_dead = False
  try:
    with stop_on_signals() as stop:
      for epoch in range(step // spe, config.num_epochs):
        idx = steps.epoch_indices(data_key, epoch)
        pos = step - epoch * spe
        t_epoch, images_seen, stopping = time.time(), 0, False
        while pos < spe:
          end = min((pos // config.log_every_steps + 1) * config.log_every_steps, spe)
          state, sums = steps.train_chunk(state, sums, train_images, train_labels,
                                          idx[pos:end], train_key)
          running = summarize(sums)
          if not math.isfinite(running["loss"]):
            raise diverged(f"the loss is {running['loss']} in epoch {epoch + 1}",
                           float(schedule(step)), last_good)
          images_seen += (end - pos) * config.batch_size
          step += end - pos
          pos = end
          rate = images_seen / max(time.time() - t_epoch, 1e-9)
          eta = (total_steps - step) * config.batch_size / rate
          log(f"epoch {epoch + 1}/{config.num_epochs} step {pos}/{spe}: loss "
              f"{running['loss']:.4f} accuracy {running['accuracy']:.4f}, {rate:.0f} images/s, "
              f"ETA {eta / 60:.1f} min")
          stopping = should_stop(stop)
          if stopping and pos < spe:
            if not checkpointing.all_finite(state.params):
              raise diverged(f"the parameters are not finite in epoch {epoch + 1}",
                             float(schedule(step - 1)), last_good)
            log("received a stop signal: saving a checkpoint, then stopping")
            ckpts.save(step, {"state": state, "sums": sums})
            raise Interrupted(step)
        train = summarize(sums)
        train_seconds = max(time.time() - t_epoch, 1e-9)
        v = summarize(steps.evaluate(state.params, val.images, val.labels, val.mask)) \
            if val.size else None
        record = {
            "epoch": epoch + 1, "step": step, "learning_rate": float(schedule(step - 1)),
            "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            "val_loss": v["loss"] if v else None, "val_accuracy": v["accuracy"] if v else None,
            "images_per_sec": images_seen / train_seconds,
            "elapsed_sec": elapsed0 + time.time() - t_loop,
        }
        if jax.process_index() == 0:
          append_metrics(files["metrics.jsonl"], record)
        writer.write(step, {k: val_ for k, val_ in record.items()
                            if val_ is not None and k not in ("epoch", "step")})
        log(f"epoch {epoch + 1}: train loss {train['loss']:.4f} accuracy "
            f"{train['accuracy']:.4f}" + (f", validation loss {v['loss']:.4f} accuracy "
                                          f"{v['accuracy']:.4f}" if v else ""))
        if (not warned_dead and epoch >= 1 and abs(train["loss"] - math.log(k)) < 1e-3
            and train["logit_abs"] < 1e-4):
          warned_dead = True
          dead = dead_relus(model, state.params, val if val.size else test)
          log(f"warning: the network looks dead (loss {train['loss']:.4f} = ln({k}) with "
              "zero logits for a whole epoch): known remedies are a lower "
              "optimizer.learning_rate, optimizer.warmup_epochs, or model.final_relu=False; "
              "dead ReLU channels per layer: "
              + ", ".join(f"{n} {f:.0%}" for n, f in dead.items()))
        is_best = v is not None and v["accuracy"] > best_acc
        if is_best:
          best_acc = v["accuracy"]
        last_epoch = epoch + 1 == config.num_epochs
        sums = put(zero_metrics())
        stopping = should_stop(stop)
        if not checkpointing.all_finite(state.params):
          raise diverged(f"the parameters are not finite after epoch {epoch + 1}",
                         float(schedule(step - 1)), last_good)
        if is_best or last_epoch or (epoch + 1) % config.checkpoint.every_epochs == 0 or \
            stopping:
          if stopping:
            log("received a stop signal: saving a checkpoint, then stopping")
          ckpts.save(step, {"state": state, "sums": sums},
                     best={"epoch": epoch + 1, "val_accuracy": best_acc} if is_best else None)
          last_good = step
        if stopping and not last_epoch:
          raise Interrupted(step)
  except Interrupted as e:
    ckpts.close()
    writer.close()
    again = ("without --config.restart=True" if config.restart  # rerunning it would wipe it
             else "again")
    raise Interrupted(f"stopped at step {e.args[0]} with a checkpoint saved; run the same "
                      f"command {again} to resume") from None
  writer.close()

  t = summarize(steps.evaluate(state.params, test.images, test.labels, test.mask))
  records = read_metrics(files["metrics.jsonl"])
  best_rec = max((r for r in records if r["val_accuracy"] is not None),
                 key=lambda r: r["val_accuracy"], default=None)
  results = {
      "model": config.model.name, "dataset": config.data.dataset,
      "subset": config.data.subset or config.data.classes or None,
      "classes": list(splits.class_names), "epochs": config.num_epochs, "steps": step,
      "learning_rate": config.optimizer.learning_rate, "augment": config.data.augment,
      "preprocessing": config.data.preprocessing,
      "width_multiplier": config.model.width_multiplier,
      "num_params": models.count_params(params), "train_images": n_train,
      "test_images": test.size, "test_loss": t["loss"], "test_accuracy": t["accuracy"],
      "final_val_accuracy": records[-1]["val_accuracy"] if records else None,
      "best_val_accuracy": best_rec["val_accuracy"] if best_rec else None,
      "best_epoch": best_rec["epoch"] if best_rec else None,
      "wall_time_sec": records[-1]["elapsed_sec"] if records else 0.0,
      "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
      "transfer_source": source.workdir if source else None,
      "dead_relu_fraction": dead_relus(model, state.params, val if val.size else test),
      "config": config_lib.to_json(config),
  }
  ckpts.close()
  if jax.process_index() == 0:
    checkpointing.write_json(files["results.json"], results)
  log(f"test loss {t['loss']:.4f} accuracy {t['accuracy']:.4f} ({test.size} images); "
      f"results in {files['results.json']}")
  return results


# ----------------------------------------------------------------------------- restoring runs


def restore_run(workdir: str, which: str = "latest") -> tuple[ml_collections.ConfigDict,
                                                              models.AllConvNet, Any]:
  """(config, model, params) of a run's newest ('latest') or best checkpoint."""
  config, params = transfer.load_run_params(workdir, which)
  model = models.create_model(config.model, num_classes(config))
  return config, model, params
