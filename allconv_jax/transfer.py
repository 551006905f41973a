"""Reading trained runs back, and transfer learning: starting a run from another run's
checkpoint (the course project's study).

Step 1 (configs/transfer_step1.py): a CIFAR-10 All-CNN-C run's backbone, a new 1x1 class layer
for a 10-class CIFAR-100 subset, the backbone frozen by `optimizer.freeze`. Step 2
(configs/transfer_step2.py): every layer of a step-1 run, all trainable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from allconv_jax import checkpointing, config_lib, input_pipeline, models, optim, steps
from allconv_jax import workdir as wd
from allconv_jax.errors import UserError
from configs import default


@dataclasses.dataclass(frozen=True)
class Source:
  """A checked source run."""
  workdir: str
  config: ml_collections.ConfigDict
  preprocessing_path: str
  which: str


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir; UserError if there is none."""
  path = wd.path(workdir, wd.CONFIG)
  if not os.path.isdir(workdir):
    raise UserError(f"{workdir} does not exist")
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a run's workdir (no config.json)")
  return ml_collections.ConfigDict(config_lib.with_legacy_values(wd.read_json(path)))


# Model settings a transfer run takes from its source unless its config sets another value
# than configs/default.py's (which is then checked against the source, and refused if it differs).
INHERITED = ("name", "width_multiplier", "padding", "use_bias")


def inherit_model(config: ml_collections.ConfigDict) -> list[str]:
  """Sets INHERITED model settings left at their defaults to the source's; what it set."""
  if not config.transfer.source:
    return []
  try:
    src = read_run_config(os.path.abspath(config.transfer.source))
  except UserError:
    return []  # check_source says what is wrong with the source
  defaults = default.get_config().model
  adopted = []
  for key in INHERITED:
    if config.model[key] == defaults[key] and src.model[key] != config.model[key]:
      config.model[key] = src.model[key]
      adopted.append(f"model.{key}={src.model[key]}")
  return adopted


def check_source(config: ml_collections.ConfigDict) -> Source | None:
  """Checks `transfer.source` against this config before any compute (None when unset)."""
  if not config.transfer.source:
    return None
  workdir = os.path.abspath(config.transfer.source)
  try:
    src = read_run_config(workdir)
  except UserError as e:
    raise UserError(f"transfer.source: {e}") from None
  mine = (config.model.name, float(config.model.width_multiplier))
  theirs = (src.model.name, float(src.model.width_multiplier))
  if mine != theirs:
    raise UserError(f"transfer.source {workdir} holds {models.article(theirs[0])} of width "
                    f"x{theirs[1]:g}; this config builds {models.article(mine[0])} of width "
                    f"x{mine[1]:g}")
  for key in ("padding", "use_bias"):
    if src.model[key] != config.model[key]:
      raise UserError(f"transfer.source {workdir} was trained with model.{key}="
                      f"{src.model[key]}; set model.{key}={src.model[key]}")
  if not wd.has_checkpoint_steps(workdir):
    raise UserError(f"transfer.source {workdir} has no checkpoints (train it first)")
  if config.transfer.checkpoint == "best" and not os.path.exists(
      wd.path(workdir, wd.BEST)):
    raise UserError(f"transfer.source {workdir} has no best checkpoint (it ran without a "
                    "validation set); use transfer.checkpoint=latest")
  prep = wd.path(workdir, wd.PREPROCESSING)
  if not os.path.exists(prep):
    raise UserError(f"transfer.source {workdir} has no preprocessing.npz")
  if src.data.preprocessing != config.data.preprocessing:
    raise UserError(f"transfer reuses the source's preprocessing ({src.data.preprocessing}); "
                    f"set data.preprocessing={src.data.preprocessing}")
  if not config.transfer.new_classifier:
    theirs_k, mine_k = input_pipeline.num_classes(src.data), input_pipeline.num_classes(
        config.data)
    if theirs_k != mine_k:
      raise UserError(f"transfer.source {workdir} has a class layer for {theirs_k} classes, "
                      f"this run has {mine_k}; set transfer.new_classifier=True")
    theirs_c, mine_c = input_pipeline.class_names(src.data), input_pipeline.class_names(
        config.data)
    if (src.data.dataset, theirs_c) != (config.data.dataset, mine_c):
      raise UserError(f"transfer.source {workdir} has a class layer for {src.data.dataset} "
                      f"({', '.join(theirs_c[:3])}, ...), this run classifies "
                      f"{config.data.dataset} ({', '.join(mine_c[:3])}, ...); set "
                      "transfer.new_classifier=True")
  return Source(workdir, src, prep, config.transfer.checkpoint)


def load_run_params(workdir: str, which: str = "latest") -> tuple[ml_collections.ConfigDict,
                                                                  Any]:
  """(config, params) of a run's newest usable or best checkpoint."""
  config, params, _ = load_run_checkpoint(workdir, which)
  return config, params


def load_run_checkpoint(workdir: str, which: str = "latest") -> tuple[
    ml_collections.ConfigDict, Any, int]:
  """(config, params, step) of a run's newest usable or best checkpoint."""
  workdir = os.path.abspath(workdir)
  config = read_run_config(workdir)
  model = models.create_model(config.model, input_pipeline.num_classes(config.data))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def abstract_state() -> Any:
    params = models.init_params(model, jax.random.key(0))
    tx = optim.make_optimizer(config.optimizer, 1, params)
    return {"state": optim.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)),
            "sums": steps.zero_metrics()}

  target = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
      jax.eval_shape(abstract_state))
  ckpts = checkpointing.Checkpoints(workdir)
  try:
    if which == "best":
      best = ckpts.best()
      if best is None:
        raise UserError(f"{workdir} has no best checkpoint")
      try:
        step, tree = best["step"], ckpts.restore(best["step"], target)
      except Exception as e:  # noqa: BLE001 - a missing or broken checkpoint is the user's to fix
        raise UserError(f"the best checkpoint of {workdir} (step {best['step']}) cannot be "
                        f"read ({type(e).__name__}); use transfer.checkpoint=latest") from None
    else:
      restored = ckpts.restore_newest(target, move_aside=False)
      if restored is None:
        raise UserError(f"{workdir} has no checkpoints")
      step, tree = restored
  finally:
    ckpts.close()
  return config, tree["state"].params, step


def initial_params(source: Source, config: ml_collections.ConfigDict, fresh: Any) -> tuple[
    Any, int]:
  """The source's backbone and, unless `transfer.new_classifier`, its class layer too; and the
  step of the source checkpoint they come from."""
  _, src, step = load_run_checkpoint(source.workdir, source.which)
  for a, b in zip(jax.tree_util.tree_leaves(src["backbone"]),
                  jax.tree_util.tree_leaves(fresh["backbone"]), strict=True):
    if a.shape != b.shape:
      raise UserError(f"transfer.source {source.workdir}: backbone shapes differ "
                      f"({a.shape} vs {b.shape})")
  classifier = fresh["classifier"] if config.transfer.new_classifier else src["classifier"]
  return {"backbone": src["backbone"], "classifier": classifier}, step


def restore_run(workdir: str, which: str = "latest") -> tuple[ml_collections.ConfigDict,
                                                              models.AllConvNet, Any]:
  """(config, model, params) of a run's newest ('latest') or best checkpoint."""
  config, params = load_run_params(workdir, which)
  model = models.create_model(config.model, input_pipeline.num_classes(config.data))
  return config, model, params
