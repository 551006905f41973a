"""Training and evaluation: `train_and_evaluate(config, workdir)`, the paper's protocol in phases.

1. prepare: every check that needs no compute (config, transfer source, data, workdir);
2. the workdir: resume a compatible run, extend a finished one, or start (restart) afresh;
3. data: the splits, the preprocessing statistics, everything put on the devices;
4. the run: model, optimizer and jitted steps; restored from a checkpoint or initialized (from a
   transfer source's weights where one is given);
5. the epochs: SGD steps, a metrics record, the validation set and a checkpoint per epoch;
6. the results: the test set, then `results.json`.

One loop serves CIFAR-10, CIFAR-100, subsets and transfer runs; the files are in `workdir.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from allconv_jax import (
  checkpointing,
  cli,
  config_lib,
  input_pipeline,
  models,
  optim,
  steps,
  transfer,
)
from allconv_jax import workdir as wd
from allconv_jax.errors import UserError
from allconv_jax.mesh import EvalSet, make_eval_set, make_mesh, replicate, replicate_tree


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved."""


def diverged(what: str, learning_rate: float, last_good: int | None) -> TrainingDiverged:
  """The one-line error for a run whose numbers blew up."""
  kept = (f"the last good checkpoint (step {last_good}) is kept" if last_good is not None
          else "no checkpoint was saved yet")
  return TrainingDiverged(f"training diverged: {what} at learning rate {learning_rate:g}; {kept}; "
                          "lower optimizer.learning_rate or set optimizer.warmup_epochs")


def log(msg: str) -> None:
  """A console line (process 0 only) and an absl log line."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def plural(n: int, noun: str) -> str:
  """'1 epoch', '2 epochs'."""
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def hours_minutes(seconds: float) -> str:
  """An ETA as h:mm (rounded up to the minute)."""
  minutes = math.ceil(max(seconds, 0.0) / 60)
  return f"{minutes // 60}:{minutes % 60:02d}"


def primary() -> bool:
  """Whether this is the process that writes the workdir's files."""
  return jax.process_index() == 0


# ----------------------------------------------------------------------------- 1. prepare


def prepare(config: ml_collections.ConfigDict, workdir: str) -> transfer.Source | None:
  """Every check that needs no compute: config, transfer source, data, workdir."""
  config_lib.validate(config)
  adopted = transfer.inherit_model(config)
  if adopted:
    log(f"from transfer.source: {', '.join(adopted)}")
  source = transfer.check_source(config)
  models.use_onednn(config.model.conv_impl, config.model.dtype)  # conv_impl=onednn can run here
  input_pipeline.check_available(config.data)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} exists and is not a folder")
  wd.check_writable(workdir)
  return source


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` and returns its results.json contents."""
  workdir = os.path.abspath(workdir)
  source = prepare(config, workdir)
  with wd.lock(workdir, primary()):
    if config.restart:
      check_restartable(workdir)
    else:
      saved = check_resumable(config, workdir)
      results = wd.read_json(wd.path(workdir, wd.RESULTS)) if saved is not None and \
          os.path.exists(wd.path(workdir, wd.RESULTS)) else None
      if results is not None and results.get("epochs", 0) > config.num_epochs:
        raise UserError(f"workdir {workdir} holds a finished {results['epochs']}-epoch run, more "
                        f"than num_epochs={config.num_epochs}; raise num_epochs or use another "
                        "--workdir")
      if results is not None and results.get("epochs", 0) == config.num_epochs:
        log(f"run in {workdir} is finished ({results['epochs']} epochs): test accuracy "
            f"{results['test_accuracy']:.4f}, test loss {results['test_loss']:.4f}")
        return results
      if results is not None:  # results.json stays until the extended run replaces it
        log(f"extending the finished {results.get('epochs')}-epoch run to {config.num_epochs} "
            "epochs")
    splits = input_pipeline.load_splits(config.data, config.seed)  # every data check first
    if config.restart and primary():
      wd.clear(workdir)  # only now that every check has passed
      results = None
    return run_training(config, workdir, source, splits, history(results))


# ----------------------------------------------------------------------------- 2. the workdir


def history(results: dict[str, Any] | None) -> list[dict[str, Any]]:
  """The (epochs, learning rate) of each earlier stage of an extended run, oldest first."""
  if results is None:
    return []
  return results.get("history") or [{"epochs": results.get("epochs"),
                                     "learning_rate": results.get("learning_rate")}]


def check_restartable(workdir: str) -> None:
  """restart=True deletes only a run's outputs: refuse a folder that holds some of the files
  this program writes but no config.json (it is not a run's workdir)."""
  if os.path.exists(wd.path(workdir, wd.CONFIG)):
    return
  ours = wd.present_outputs(workdir)
  if ours:
    raise UserError(f"--config.restart=True would delete {', '.join(ours)} in {workdir}, "
                    "which is not a run's workdir (no config.json); delete them yourself or "
                    "use another --workdir")


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The workdir's saved config if compatible; UserError if it would be invalidated."""
  if not os.path.exists(wd.path(workdir, wd.CONFIG)):
    leftovers = [n for n in (wd.RESULTS, wd.CHECKPOINTS, wd.METRICS)
                 if os.path.exists(wd.path(workdir, n))
                 and (n != wd.CHECKPOINTS or os.listdir(wd.path(workdir, n)))]
    if leftovers:
      raise UserError(f"workdir {workdir} holds {', '.join(leftovers)} but no config.json; "
                      "use another --workdir or set --config.restart=True to start over")
    return None
  try:
    saved = wd.read_json(wd.path(workdir, wd.CONFIG))
  except UserError as e:
    raise UserError(f"{e}; delete it or set --config.restart=True to start over") from None
  if not (wd.read_metrics(wd.path(workdir, wd.METRICS))
          or os.path.exists(wd.path(workdir, wd.RESULTS)) or wd.has_checkpoint_steps(workdir)):
    # a failed start (say, out of memory) does not bind the corrected rerun; its leftovers
    # (config.json, preprocessing.npz fitted for that config) go
    log(f"workdir {workdir} holds a run that saved nothing yet; starting afresh")
    if primary():
      wd.clear(workdir)
    return None
  bad, other = config_lib.run_defining_changes(saved, config)
  if bad:
    old = dict(config_lib.flatten(saved))
    new = dict(config_lib.flatten(config_lib.to_json(config)))
    diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad)
    raise UserError(f"workdir {workdir} holds a run with another {diffs}; use another --workdir "
                    "or set --config.restart=True to start over")
  if other:
    log(f"resuming with changed settings: {', '.join(other)}")
  return saved


# ----------------------------------------------------------------------------- 3. data


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """The preprocessed splits on the devices."""
  train_images: jax.Array
  train_labels: jax.Array
  val: EvalSet
  test: EvalSet
  class_names: tuple[str, ...]

  @property
  def num_train(self) -> int:
    return int(self.train_labels.shape[0])


def preprocessing_stats(config: ml_collections.ConfigDict, workdir: str,
                        source: transfer.Source | None, train_images: np.ndarray
                        ) -> dict[str, Any]:
  """The run's saved statistics, the transfer source's, or fitted ones (saved, and shared with
  later runs on the same training images and settings: data/preprocessing.py)."""
  path = wd.path(workdir, wd.PREPROCESSING)
  if os.path.exists(path):
    return input_pipeline.load_preprocessing(path)
  if source is not None:
    stats = input_pipeline.load_preprocessing(source.preprocessing_path)
    log(f"reusing the preprocessing statistics of {source.workdir}")
    if primary():
      input_pipeline.save_preprocessing(path, stats)
    return stats
  t0 = time.time()
  if not primary():  # the others fit the same numbers themselves, writing nothing
    return input_pipeline.fit_preprocessing(config.data, train_images)
  stats, shared = input_pipeline.fit_or_share(config.data, train_images, path)
  log(f"{'shared the' if shared else 'fitted'} {config.data.preprocessing} preprocessing "
      f"statistics{' of an earlier run on the same images' if shared else ''} in "
      f"{time.time() - t0:.1f}s")
  return stats


def put_data(config: ml_collections.ConfigDict, workdir: str, source: transfer.Source | None,
             splits: input_pipeline.Splits, mesh: Mesh) -> DeviceData:
  """Preprocesses every split and puts it on the devices."""
  t_start = time.time()
  stats = preprocessing_stats(config, workdir, source, splits.train_images)

  def prep(x: np.ndarray) -> np.ndarray:
    return input_pipeline.apply_preprocessing(stats, x)

  batch = config.eval_batch_size
  data = DeviceData(
      train_images=replicate(prep(splits.train_images), mesh),
      train_labels=replicate(splits.train_labels.astype(np.int32), mesh),
      val=make_eval_set(prep(splits.val_images), splits.val_labels, batch, mesh),
      test=make_eval_set(prep(splits.test_images), splits.test_labels, batch, mesh),
      class_names=splits.class_names)
  log(f"data: {data.num_train} train, {data.val.size} validation, {data.test.size} test images, "
      f"{len(data.class_names)} classes ({time.time() - t_start:.1f}s)")
  return data


def check_batch(config: ml_collections.ConfigDict, num_train: int, mesh: Mesh) -> None:
  """The batch must fit the training set and split evenly over the devices."""
  if config.batch_size > num_train:
    raise UserError(f"batch_size ({config.batch_size}) is larger than the training set "
                    f"({num_train} images)")
  if config.batch_size % mesh.size:
    raise UserError(f"batch_size ({config.batch_size}) must be a multiple of the number of "
                    f"devices ({mesh.size})")


# ----------------------------------------------------------------------------- 4. the run


@dataclasses.dataclass
class Training:
  """One run's fixed parts (model, optimizer, steps, data, files) and its progress."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  data: DeviceData
  model: models.AllConvNet
  schedule: optax.Schedule
  steps: steps.Steps
  ckpts: checkpointing.Checkpoints
  data_key: jax.Array
  train_key: jax.Array
  steps_per_epoch: int
  num_params: int
  state: Any = None
  sums: Any = None
  last_good: int | None = None  # the newest checkpoint step known to be good

  @property
  def step(self) -> int:
    return int(self.state.step)

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.config.num_epochs

  def put(self, tree: Any) -> Any:
    return replicate_tree(tree, self.mesh)

  def rate(self, step: int) -> float:
    return float(self.schedule(step))

  def eval_set(self) -> EvalSet:
    """The set the dead-network diagnosis looks at: validation, else test."""
    return self.data.val if self.data.val.size else self.data.test


def build(config: ml_collections.ConfigDict, workdir: str, source: transfer.Source | None,
          data: DeviceData, mesh: Mesh) -> Training:
  """Model, optimizer and jitted steps; the state restored from a checkpoint or initialized."""
  model = models.create_model(config.model, len(data.class_names))
  steps_per_epoch = data.num_train // config.batch_size
  root = jax.random.key(config.seed)
  init_key, data_key, train_key = (jax.random.fold_in(root, i) for i in range(3))
  params = models.init_params(model, init_key)
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch, params)
  run_ = Training(config, workdir, mesh, data, model,
             optim.make_schedule(config.optimizer, steps_per_epoch),
             steps.CACHE.get(model, tx, mesh, config, data.num_train, steps_per_epoch),
             checkpointing.Checkpoints(workdir, config.checkpoint.keep), data_key, train_key,
             steps_per_epoch, models.count_params(params))
  if source is not None and not run_.ckpts.steps():
    params, step = transfer.initial_params(source, config, params)
    labels = jax.tree_util.tree_leaves(optim.param_labels(params, config.optimizer.freeze))
    log(f"transfer: restored the {source.which} checkpoint of {source.workdir} (step {step}): "
        f"{'a new' if config.transfer.new_classifier else 'its'} class layer; "
        f"{labels.count('frozen')} arrays frozen, {labels.count('trainable')} trained")
  run_.state = run_.put(optim.TrainState(jnp.zeros((), jnp.int32), params,
                                         jax.jit(tx.init)(params)))
  run_.sums = run_.put(steps.zero_metrics())
  return run_


def restore(run_: Training) -> list[dict[str, Any]]:
  """Restores the newest usable checkpoint into `run_`; the metrics records up to it."""
  metrics_path = wd.path(run_.workdir, wd.METRICS)
  restored = run_.ckpts.restore_newest({"state": run_.state, "sums": run_.sums})
  records: list[dict[str, Any]] = []
  if restored is not None:
    step, tree = restored
    run_.state, run_.sums, run_.last_good = tree["state"], tree["sums"], step
    records = [r for r in wd.read_metrics(metrics_path) if r["step"] <= step]
    log(f"resuming from checkpoint step {step} (epoch {step // run_.steps_per_epoch}"
        f"{', mid-epoch' if step % run_.steps_per_epoch else ''})")
  elif os.path.exists(metrics_path):
    log("no checkpoint yet: starting from the beginning")
  if primary():
    wd.write_metrics(metrics_path, records)
  if run_.step > run_.total_steps:
    raise UserError(f"workdir {run_.workdir} has trained {run_.step // run_.steps_per_epoch} "
                    f"epochs already, more than num_epochs={run_.config.num_epochs}; raise "
                    "num_epochs or use another --workdir")
  return records


def run_training(config: ml_collections.ConfigDict, workdir: str, source: transfer.Source | None,
                 splits: input_pipeline.Splits, earlier: list[dict[str, Any]]) -> dict[str, Any]:
  """Phases 3 to 6 in a locked, checked workdir."""
  mesh = make_mesh()
  check_batch(config, len(splits.train_labels), mesh)
  if primary():
    wd.write_json(wd.path(workdir, wd.CONFIG), config_lib.to_json(config))
  data = put_data(config, workdir, source, splits, mesh)
  run_ = build(config, workdir, source, data, mesh)
  records = restore(run_)
  log(f"{config.model.name} (width x{config.model.width_multiplier}, {run_.num_params:,} "
      f"parameters) on {config.data.dataset}"
      f"{' ' + config.data.subset if config.data.subset else ''}: "
      f"{plural(config.num_epochs, 'epoch')} of {plural(run_.steps_per_epoch, 'step')}, "
      f"batch {config.batch_size}, {mesh.size} device(s) ({jax.devices()[0].platform})")
  writer = wd.TensorBoard(workdir, enabled=config.tensorboard and primary())
  try:
    train_epochs(run_, records, writer)
  except Interrupted as e:
    again = ("without --config.restart=True" if config.restart  # rerunning it would wipe it
             else "again")
    raise Interrupted(f"stopped at step {e.args[0]} with a checkpoint saved; run the same "
                      f"command {again} to resume") from None
  finally:
    run_.ckpts.close()
    writer.close()
  return write_results(run_, source, earlier)


# ----------------------------------------------------------------------------- 5. the epochs


def should_stop(event: threading.Event) -> bool:
  """Whether any process received a stop signal (all processes agree, so they save together)."""
  if jax.process_count() == 1:
    return event.is_set()
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(event.is_set()))))


@dataclasses.dataclass
class Watch:
  """What the loop remembers between epochs."""
  elapsed0: float  # seconds trained before this process started
  t_loop: float
  best_acc: float
  warned_dead: bool = False


def train_epochs(run_: Training, records: list[dict[str, Any]], writer: wd.TensorBoard) -> None:
  """The epoch loop from the restored step to num_epochs; Interrupted on a stop signal."""
  vals = [r["val_accuracy"] for r in records if r["val_accuracy"] is not None]
  watch = Watch(records[-1]["elapsed_sec"] if records else 0.0, time.time(),
                max(vals, default=-1.0))
  with cli.stop_on_signals() as stop:
    for epoch in range(run_.step // run_.steps_per_epoch, run_.config.num_epochs):
      t_epoch = time.time()
      images_seen = train_epoch(run_, epoch, stop, t_epoch, writer)
      end_epoch(run_, epoch, images_seen, time.time() - t_epoch, watch, writer, stop)


def train_epoch(run_: Training, epoch: int, stop: threading.Event, t_epoch: float,
                writer: wd.TensorBoard) -> int:
  """The SGD steps of one epoch, in chunks of log_every_steps (each logged to the console and
  TensorBoard); the images seen."""
  config, spe = run_.config, run_.steps_per_epoch
  idx = run_.steps.epoch_indices(run_.data_key, epoch)
  pos = run_.step - epoch * spe
  images_seen = 0
  # One dispatch per step anyway on the CPU: look at the stop signal after every step there
  # (one process: several must agree, which they do at the chunk ends).
  per_step = not steps.use_scan() and jax.process_count() == 1
  while pos < spe:
    end = min((pos // config.log_every_steps + 1) * config.log_every_steps, spe)
    first_step = run_.step
    for start, stop_at in ([(i, i + 1) for i in range(pos, end)] if per_step else [(pos, end)]):
      if per_step and stop.is_set():
        end = start
        break
      run_.state, run_.sums = run_.steps.train_chunk(
          run_.state, run_.sums, run_.data.train_images, run_.data.train_labels,
          idx[start:stop_at], run_.train_key)
    running = steps.metric_means(run_.sums)
    if not math.isfinite(running["loss"]):
      raise diverged(f"the loss is {running['loss']} in epoch {epoch + 1}",
                     run_.rate(first_step), run_.last_good)
    trained, pos = end - pos, end
    images_seen += trained * config.batch_size
    if trained:  # (none when a stop came before the chunk's first step)
      speed = images_seen / max(time.time() - t_epoch, 1e-9)
      eta = (run_.total_steps - run_.step) * config.batch_size / speed
      log(f"epoch {epoch + 1}/{config.num_epochs} step {pos}/{spe}: loss "
          f"{running['loss']:.4f} accuracy {running['accuracy']:.4f}, {speed:.0f} images/s, "
          f"ETA {hours_minutes(eta)}")
      writer.write(run_.step, {"running_train_loss": running["loss"],
                               "running_train_accuracy": running["accuracy"],
                               "images_per_sec_running": speed})
    if should_stop(stop) and pos < spe:
      stop_mid_epoch(run_, epoch)
  return images_seen


def stop_mid_epoch(run_: Training, epoch: int) -> None:
  """A stop signal mid-epoch: checkpoint the current step (unless it has one: a stop right
  after a resume trained nothing) and raise Interrupted."""
  if not checkpointing.all_finite(run_.state.params):
    raise diverged(f"the parameters are not finite in epoch {epoch + 1}",
                   run_.rate(run_.step - 1), run_.last_good)
  if run_.step in run_.ckpts.steps():
    log(f"received a stop signal: checkpoint step {run_.step} is current; stopping")
  else:
    log("received a stop signal: saving a checkpoint, then stopping")
    run_.ckpts.save(run_.step, {"state": run_.state, "sums": run_.sums})
  raise Interrupted(run_.step)


def end_epoch(run_: Training, epoch: int, images_seen: int, train_seconds: float, watch: Watch,
              writer: wd.TensorBoard, stop: threading.Event) -> None:
  """Validation, the metrics record, the dead-network check and the epoch's checkpoint."""
  config, step = run_.config, run_.step
  train = steps.metric_means(run_.sums)
  val = run_.data.val
  v = steps.metric_means(run_.steps.evaluate(run_.state.params, val.images, val.labels,
                                             val.mask)) if val.size else None
  record = {
      "epoch": epoch + 1, "step": step,
      "learning_rate": float(f"{run_.rate(step - 1):.7g}"),  # 5e-05, not float32's 5.0000002e-05
      "train_loss": train["loss"], "train_accuracy": train["accuracy"],
      "val_loss": v["loss"] if v else None, "val_accuracy": v["accuracy"] if v else None,
      "images_per_sec": images_seen / max(train_seconds, 1e-9),
      "elapsed_sec": watch.elapsed0 + time.time() - watch.t_loop,
  }
  if primary():
    wd.append_metrics(wd.path(run_.workdir, wd.METRICS), record)
  writer.write(step, {k: x for k, x in record.items()
                      if x is not None and k not in ("epoch", "step")})
  log(f"epoch {epoch + 1}: train loss {train['loss']:.4f} accuracy {train['accuracy']:.4f}"
      + (f", validation loss {v['loss']:.4f} accuracy {v['accuracy']:.4f}" if v else ""))
  warn_if_dead(run_, epoch, train, watch)
  is_best = v is not None and v["accuracy"] > watch.best_acc
  if is_best:
    watch.best_acc = v["accuracy"]
  last_epoch = epoch + 1 == config.num_epochs
  run_.sums = run_.put(steps.zero_metrics())
  stopping = should_stop(stop)
  if not checkpointing.all_finite(run_.state.params):
    raise diverged(f"the parameters are not finite after epoch {epoch + 1}",
                   run_.rate(step - 1), run_.last_good)
  if is_best or last_epoch or (epoch + 1) % config.checkpoint.every_epochs == 0 or stopping:
    if stopping:
      log("received a stop signal: saving a checkpoint, then stopping")
    run_.ckpts.save(step, {"state": run_.state, "sums": run_.sums},
                    best={"epoch": epoch + 1, "val_accuracy": watch.best_acc} if is_best else None)
    run_.last_good = step
  if stopping and not last_epoch:
    raise Interrupted(step)


def warn_if_dead(run_: Training, epoch: int, train: dict[str, float], watch: Watch) -> None:
  """Once per run: a whole epoch at loss ln(k) with zero logits means the network died."""
  k = len(run_.data.class_names)
  if (watch.warned_dead or epoch < 1 or abs(train["loss"] - math.log(k)) >= 1e-3
      or train["logit_abs"] >= 1e-4):
    return
  watch.warned_dead = True
  dead = dead_relus(run_)
  log(f"warning: the network looks dead (loss {train['loss']:.4f} = ln({k}) with zero logits "
      "for a whole epoch): known remedies are a lower optimizer.learning_rate, "
      "optimizer.warmup_epochs, or model.final_relu=False; dead ReLU channels per layer: "
      + ", ".join(f"{n} {f:.0%}" for n, f in dead.items()))


def dead_relus(run_: Training) -> dict[str, float]:
  """Per ReLU layer, the fraction of channels silent on every image of the first eval batch."""
  data = run_.eval_set()
  n = min(data.size, data.images.shape[1])
  return models.dead_relu_fractions(run_.model, run_.state.params, data.images[0][:n])


# ----------------------------------------------------------------------------- 6. the results


def write_results(run_: Training, source: transfer.Source | None,
                  earlier: list[dict[str, Any]]) -> dict[str, Any]:
  """Evaluates the test set and writes results.json (atomically, replacing an older one)."""
  config, test = run_.config, run_.data.test
  t = steps.metric_means(run_.steps.evaluate(run_.state.params, test.images, test.labels,
                                             test.mask))
  records = wd.read_metrics(wd.path(run_.workdir, wd.METRICS))
  best = max((r for r in records if r["val_accuracy"] is not None),
             key=lambda r: r["val_accuracy"], default=None)
  results = {
      "model": config.model.name, "dataset": config.data.dataset,
      "data_source": config.data.source, "data_dir": config.data.dir or None,
      "subset": config.data.subset or config.data.classes or None,
      "classes": list(run_.data.class_names), "epochs": config.num_epochs, "steps": run_.step,
      "learning_rate": config.optimizer.learning_rate, "augment": config.data.augment,
      "preprocessing": config.data.preprocessing,
      "width_multiplier": config.model.width_multiplier,
      "num_params": run_.num_params, "train_images": run_.data.num_train,
      "test_images": test.size, "test_loss": t["loss"], "test_accuracy": t["accuracy"],
      "final_val_accuracy": records[-1]["val_accuracy"] if records else None,
      "best_val_accuracy": best["val_accuracy"] if best else None,
      "best_epoch": best["epoch"] if best else None,
      "wall_time_sec": records[-1]["elapsed_sec"] if records else 0.0,
      "devices": f"{run_.mesh.size} x {jax.devices()[0].device_kind}",
      "transfer_source": source.workdir if source else None,
      "dead_relu_fraction": dead_relus(run_),
      "history": [*earlier, {"epochs": config.num_epochs,
                             "learning_rate": config.optimizer.learning_rate}],
      "config": config_lib.to_json(config),
  }
  path = wd.path(run_.workdir, wd.RESULTS)
  if primary():
    wd.write_json(path, results)
  log(f"test loss {t['loss']:.4f} accuracy {t['accuracy']:.4f} ({test.size} images); "
      f"results in {path}")
  return results
