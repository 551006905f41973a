"""Training and evaluation: the paper's protocol as one loop, `train_and_evaluate`.

The same loop trains CIFAR-10, CIFAR-100, class subsets and transfer runs; a transfer run only
starts from another run's weights, with some of them frozen. It reads top to bottom:

  1. checks     every mistake the user can fix, before any compute
  2. workdir    resume a compatible run, extend a finished one, or start afresh
  3. data       the splits, preprocessed once and put on the devices
  4. model      network, SGD schedule and jitted steps; restored, transferred or initialized
  5. epochs     SGD steps, validation, a metrics record and a checkpoint per epoch
  6. results    the test set, then results.json

The jitted steps it calls are in steps.py.
"""

from __future__ import annotations

import collections
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from allconv_jax import (
  checkpointing,
  cli,
  cpu,
  files,
  input_pipeline,
  metrics,
  models,
  optim,
  steps,
  transfer,
)
from allconv_jax.config import to_json, validate
from allconv_jax.errors import UserError
from allconv_jax.input_pipeline import replicate_tree
from allconv_jax.optim import TrainState


class TrainingDiverged(UserError):
  """The loss or the parameters became NaN or infinite."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved."""


def log(msg: str) -> None:
  """A console line (process 0 only) and an absl log line."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- the protocol


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns its results.json contents."""
  workdir = os.path.abspath(workdir)
  primary = jax.process_index() == 0  # the process that writes the workdir's files

  # ==== 1. checks: every mistake the user can fix, before any compute ====
  validate(config)
  adopted = transfer.inherit_model(config)
  if adopted:
    log(f"from transfer.source: {', '.join(adopted)}")
  source = transfer.check_source(config)
  if source is not None and (config.restart or not files.has_checkpoint_steps(workdir)):
    source = transfer.load_source(source)  # a run starting from it: can its checkpoint be read?
  convs = cpu.choose(config.model.conv_impl, config.model.strided_grad, config.model.dtype)
  input_pipeline.check_available(config.data)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} exists and is not a folder")
  files.check_writable(workdir)

  with files.lock(workdir, primary):
    # ==== 2. workdir: resume a compatible run, extend a finished one, or start afresh ====
    if config.restart:
      files.check_restart(workdir)
      resume = files.Resume(None, None)
    else:
      resume = files.check_resume(config, workdir, primary)
      if resume.cleared:
        log(f"workdir {workdir} holds a run that saved nothing yet; starting afresh")
      if resume.changed:
        log(f"resuming with changed settings: {', '.join(resume.changed)}")
    finished = resume.results
    if finished is not None:
      if finished.get("epochs", 0) > config.num_epochs:
        raise UserError(f"workdir {workdir} holds a finished {finished['epochs']}-epoch run, "
                        f"more than num_epochs={config.num_epochs}; raise num_epochs or use "
                        "another --workdir")
      if finished.get("epochs", 0) == config.num_epochs:
        log(f"run in {workdir} is finished ({finished['epochs']} epochs): test accuracy "
            f"{finished['test_accuracy']:.4f}, test loss {finished['test_loss']:.4f}")
        return finished
      log(f"extending the finished {finished.get('epochs')}-epoch run to {config.num_epochs} "
          "epochs")  # its results.json stays until the extended run replaces it
    splits = input_pipeline.load_splits(config.data, config.seed)  # every data check first
    if config.restart and primary:
      files.clear(workdir)  # only now that every check has passed

    # ==== 3. data: the splits, preprocessed once and put on the devices ====
    mesh = input_pipeline.make_mesh()
    input_pipeline.check_batch(config.batch_size, len(splits.train_labels), mesh)
    steps_per_epoch = len(splits.train_labels) // config.batch_size
    optim.check_schedule(config.optimizer, steps_per_epoch)
    if primary:
      files.write_json(files.path(workdir, files.CONFIG), to_json(config))
    t_data = time.time()
    stats, how = files.preprocessing_statistics(
        config.data, workdir, source.preprocessing_path if source else None,
        splits.train_images, primary)
    if how:
      whose = {"reused": f" of {source.workdir}" if source else "",
               "shared": " of an earlier run on the same images"}.get(how, "")
      log(f"{how} the {config.data.preprocessing} preprocessing statistics{whose}")
    data = input_pipeline.put_on_devices(splits, stats, config.eval_batch_size, mesh)
    log(f"data: {data.num_train} train, {data.val.size} validation, {data.test.size} test "
        f"images, {len(data.class_names)} classes ({time.time() - t_data:.1f}s)")

    # ==== 4. model: network, schedule, jitted steps; restored, transferred or initialized ====
    model = models.create_model(config.model, len(data.class_names), convs)
    init_key, data_key, train_key = (jax.random.fold_in(jax.random.key(config.seed), i)
                                     for i in range(3))
    params = models.init_params(model, init_key)
    tx = optim.make_optimizer(config.optimizer, steps_per_epoch, params)
    rate = optim.make_schedule(config.optimizer, steps_per_epoch)
    jitted = steps.make_steps(model, tx, mesh, config, data.num_train, steps_per_epoch)
    ckpts = checkpointing.Checkpoints(workdir, config.checkpoint.keep)
    if source is not None and not ckpts.steps():
      params, source_step = transfer.initial_params(source, config, params)
      labels = jax.tree_util.tree_leaves(optim.param_labels(params, config.optimizer.freeze))
      log(f"transfer: restored the {source.which} checkpoint of {source.workdir} (step "
          f"{source_step}): {'a new' if config.transfer.new_classifier else 'its'} class layer; "
          f"{labels.count('frozen')} arrays frozen, {labels.count('trainable')} trained")
    num_params = models.count_params(params)
    state = replicate_tree(TrainState(jnp.zeros((), jnp.int32), params,
                                      jax.jit(tx.init)(params)), mesh)
    sums = replicate_tree(metrics.zeros(), mesh)
    metrics_path = files.path(workdir, files.METRICS)
    records: list[dict[str, Any]] = []
    restored = ckpts.restore_newest({"state": state, "sums": sums})
    last_good = None  # the newest checkpoint step known to be good
    if restored is not None:
      last_good, tree = restored
      state, sums = tree["state"], tree["sums"]
      records = [r for r in files.read_metrics(metrics_path) if r["step"] <= last_good]
      log(f"resuming from checkpoint step {last_good} (epoch {last_good // steps_per_epoch}"
          f"{', mid-epoch' if last_good % steps_per_epoch else ''})")
    elif os.path.exists(metrics_path):
      log("no checkpoint yet: starting from the beginning")
    if primary:
      files.write_metrics(metrics_path, records)
    step = int(state.step)
    if step > steps_per_epoch * config.num_epochs:
      raise UserError(f"workdir {workdir} has trained {step // steps_per_epoch} epochs "
                      f"already, more than num_epochs={config.num_epochs}; raise num_epochs or "
                      "use another --workdir")
    recorded = next((r["convolutions"] for r in reversed(records) if "convolutions" in r), None)
    if recorded is not None and recorded != convs.name:
      log(f"resuming with changed settings: convolutions {recorded} -> {convs.name} "
          f"({convs.reason}); same arithmetic to float rounding, so the run stays comparable "
          "but is not bit-identical to an uninterrupted one")
    log(f"{config.model.name} (width x{config.model.width_multiplier}, {num_params:,} "
        f"parameters) on {config.data.dataset}"
        f"{' ' + config.data.subset if config.data.subset else ''}: "
        f"{config.num_epochs} epoch(s) of {steps_per_epoch} step(s), batch "
        f"{config.batch_size}, {mesh.size} device(s) ({jax.devices()[0].platform}), "
        f"{config.model.dtype}; {convs.describe()}")

    # ==== 5. epochs: SGD steps, validation, a metrics record and a checkpoint each ====
    writer = metrics.TensorBoard(workdir, enabled=config.tensorboard and primary)
    elapsed0, t_loop = (records[-1]["elapsed_sec"] if records else 0.0), time.time()
    best_acc = max((r["val_accuracy"] for r in records if r["val_accuracy"] is not None),
                   default=-1.0)
    warned, warm = False, None  # warm: (time, step) after this process's first chunk
    # The CPU dispatches one step at a time: look at the stop signal after each (one process;
    # several must agree, which they do at the ends of the chunks).
    per_step = not cpu.scan_steps() and jax.process_count() == 1
    total_steps = steps_per_epoch * config.num_epochs
    try:
      with cli.stop_on_signals() as stop:
        for epoch in range(step // steps_per_epoch, config.num_epochs):
          t_epoch, seen = time.time(), 0
          batches = jitted.epoch_batches(data_key, epoch)
          pos = step - epoch * steps_per_epoch
          while pos < steps_per_epoch:  # chunks of log_every_steps, a console line each
            end = min((pos // config.log_every_steps + 1) * config.log_every_steps,
                      steps_per_epoch)
            for start in range(pos, end) if per_step else (pos,):
              if per_step and stop.is_set():
                end = start
                break
              state, sums = jitted.train_chunk(state, sums, data.train_images,
                                               data.train_labels,
                                               batches[start:start + 1 if per_step else end],
                                               train_key)
            running = metrics.means(sums)
            if not math.isfinite(running["loss"]):
              raise diverged(f"the loss is {running['loss']} in epoch {epoch + 1}",
                             float(rate(step)), last_good)
            trained, pos, step = end - pos, end, int(state.step)
            seen += trained * config.batch_size
            if trained:  # (none when a stop came before the chunk's first step)
              now = time.time()
              speed = seen / max(now - t_epoch, 1e-9)
              left = ("-:-- (this chunk compiled the step)" if warm is None else eta(
                  (total_steps - step) * (now - warm[0]) / max(step - warm[1], 1)))
              warm = warm or (now, step)
              log(f"epoch {epoch + 1}/{config.num_epochs} step {pos}/{steps_per_epoch}: loss "
                  f"{running['loss']:.4f} accuracy {running['accuracy']:.4f}, {speed:.0f} "
                  f"images/s, ETA {left}")
              writer.write(step, {"running_train_loss": running["loss"],
                                  "running_train_accuracy": running["accuracy"],
                                  "images_per_sec_running": speed})
            if should_stop(stop) and pos < steps_per_epoch:  # a stop signal mid-epoch
              if not checkpointing.all_finite(state.params):
                raise diverged(f"the parameters are not finite in epoch {epoch + 1}",
                               float(rate(step - 1)), last_good)
              if step in ckpts.steps():  # a stop right after a resume trained nothing
                log(f"received a stop signal: checkpoint step {step} is current; stopping")
              else:
                log("received a stop signal: saving a checkpoint, then stopping")
                ckpts.save(step, {"state": state, "sums": sums})
              raise Interrupted(step)

          # the epoch's end: validation, the record, the dead-network check, a checkpoint
          train = metrics.means(sums)
          val = (metrics.means(steps.evaluate(jitted, state.params, data.val)) if data.val.size
                 else None)
          record = {
              "epoch": epoch + 1, "step": step,
              "learning_rate": float(f"{float(rate(step - 1)):.7g}"),  # 5e-05, not 5.0000002e-05
              "train_loss": train["loss"], "train_accuracy": train["accuracy"],
              "val_loss": val["loss"] if val else None,
              "val_accuracy": val["accuracy"] if val else None,
              "images_per_sec": seen / max(time.time() - t_epoch, 1e-9),
              "elapsed_sec": elapsed0 + time.time() - t_loop,
              "convolutions": convs.name,
          }
          if primary:
            files.append_metrics(metrics_path, record)
          writer.write(step, {k: x for k, x in record.items() if k not in ("epoch", "step")
                              and isinstance(x, float)})
          log(f"epoch {epoch + 1}: train loss {train['loss']:.4f} accuracy "
              f"{train['accuracy']:.4f}" + (f", validation loss {val['loss']:.4f} accuracy "
                                            f"{val['accuracy']:.4f}" if val else ""))
          if not warned and epoch >= 1 and train["accuracy"] < 1.5 / len(data.class_names):
            dead = dead_relus(model, state.params, data)  # only while near chance: cheap
            if train["logit_abs"] < 1e-4 or dead.get("classifier", 0.0) > 0:
              warned = True
              log(dead_warning(train, dead, config))
          is_best = val is not None and val["accuracy"] > best_acc
          best_acc = val["accuracy"] if is_best else best_acc
          last_epoch = epoch + 1 == config.num_epochs
          sums = replicate_tree(metrics.zeros(), mesh)
          stopping = should_stop(stop)
          if not checkpointing.all_finite(state.params):
            raise diverged(f"the parameters are not finite after epoch {epoch + 1}",
                           float(rate(step - 1)), last_good)
          if (is_best or last_epoch or stopping
              or (epoch + 1) % config.checkpoint.every_epochs == 0):
            if stopping:
              log("received a stop signal: saving a checkpoint, then stopping")
            ckpts.save(step, {"state": state, "sums": sums},
                       best={"epoch": epoch + 1, "val_accuracy": best_acc} if is_best else None)
            last_good = step
          if stopping and not last_epoch:
            raise Interrupted(step)
    except Interrupted as e:
      again = "without --config.restart=True" if config.restart else "again"
      raise Interrupted(f"stopped at step {e.args[0]} with a checkpoint saved; run the same "
                        f"command {again} to resume") from None
    finally:
      ckpts.close()
      writer.close()

    # ==== 6. results: the test set, then results.json ====
    test = metrics.means(steps.evaluate(jitted, state.params, data.test))
    records = files.read_metrics(metrics_path)
    best = max((r for r in records if r["val_accuracy"] is not None),
               key=lambda r: r["val_accuracy"], default=None)
    results = {
        "model": config.model.name, "dataset": config.data.dataset,
        "data_source": config.data.source, "data_dir": config.data.dir or None,
        "subset": config.data.subset or config.data.classes or None,
        "classes": list(data.class_names), "epochs": config.num_epochs, "steps": step,
        "learning_rate": config.optimizer.learning_rate, "augment": config.data.augment,
        "preprocessing": config.data.preprocessing,
        "width_multiplier": config.model.width_multiplier, "num_params": num_params,
        "train_images": data.num_train, "test_images": data.test.size,
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "final_val_accuracy": records[-1]["val_accuracy"] if records else None,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "wall_time_sec": records[-1]["elapsed_sec"] if records else 0.0,
        "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
        "convolutions": {**convs.record(config.model.dtype), "epochs_by_backend": dict(
            collections.Counter(r.get("convolutions", "unrecorded") for r in records))},
        "transfer_source": source.workdir if source else None,
        "dead_relu_fraction": dead_relus(model, state.params, data),
        "history": [*history(finished), {"epochs": config.num_epochs,
                                         "learning_rate": config.optimizer.learning_rate}],
        "config": to_json(config),
    }
    path = files.path(workdir, files.RESULTS)
    if primary:
      files.write_json(path, results)
    log(f"test loss {test['loss']:.4f} accuracy {test['accuracy']:.4f} ({data.test.size} "
        f"images); results in {path}")
    return results


# ----------------------------------------------------------------------------- helpers


def dead_relus(model: models.AllConvNet, params: Any,
               data: input_pipeline.DeviceData) -> dict[str, float]:
  """Per ReLU layer, the fraction of channels silent on every image of the first batch of the
  validation set (else the test set)."""
  split = data.val if data.val.size else data.test
  n = min(split.size, split.images.shape[1])
  return models.dead_relu_fractions(model, params, split.images[0][:n])


def dead_warning(train: dict[str, float], dead: dict[str, float],
                 config: ml_collections.ConfigDict) -> str:
  """The warning for a run near chance with zero logits or dead class channels (channels
  that are zero on every image pass no gradient: those classes are never predicted)."""
  what = ("the network looks dead (zero logits)" if train["logit_abs"] < 1e-4 else
          f"{dead['classifier']:.0%} of the class channels are zero on every image, so their "
          "classes are never predicted")
  remedies = "a lower optimizer.learning_rate, optimizer.warmup_epochs"
  remedies += ", or model.final_relu=False" if config.model.final_relu else ""
  return (f"warning: {what} (train loss {train['loss']:.4f}, accuracy {train['accuracy']:.4f});"
          f" known remedies: {remedies}; dead ReLU channels per layer: "
          + ", ".join(f"{n} {f:.0%}" for n, f in dead.items()))


def diverged(what: str, learning_rate: float, last_good: int | None) -> TrainingDiverged:
  """The one-line error for a run whose numbers blew up."""
  kept = (f"the last good checkpoint (step {last_good}) is kept" if last_good is not None
          else "no checkpoint was saved yet")
  return TrainingDiverged(f"training diverged: {what} at learning rate {learning_rate:g}; {kept}; "
                          "lower optimizer.learning_rate or set optimizer.warmup_epochs")


def should_stop(event: Any) -> bool:
  """Whether any process received a stop signal (all processes agree, so they save together)."""
  if jax.process_count() == 1:
    return event.is_set()
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(event.is_set()))))


def history(results: dict[str, Any] | None) -> list[dict[str, Any]]:
  """The (epochs, learning rate) of each earlier stage of an extended run, oldest first."""
  if results is None:
    return []
  return results.get("history") or [{"epochs": results.get("epochs"),
                                     "learning_rate": results.get("learning_rate")}]


def eta(seconds: float) -> str:
  """A time left as h:mm (rounded up to the minute)."""
  minutes = math.ceil(max(seconds, 0.0) / 60)
  return f"{minutes // 60}:{minutes % 60:02d}"
