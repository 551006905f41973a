"""Transfer learning: starting a run from another run's checkpoint (the course project's study).

Step 1 (configs/transfer_step1.py): a CIFAR-10 All-CNN-C run's backbone, a new 1x1 class layer
for a 10-class CIFAR-100 subset, the backbone frozen by `optimizer.freeze`. Step 2
(configs/transfer_step2.py): every layer of a step-1 run, all trainable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from allconv_jax import checkpointing, files, input_pipeline, models
from allconv_jax.checkpointing import read_run_config
from allconv_jax.config import get_config
from allconv_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Source:
  """A checked source run."""
  workdir: str
  config: ml_collections.ConfigDict
  preprocessing_path: str
  which: str
  params: Any = None  # its checkpoint's parameters, once `load_source` has read them
  step: int | None = None


# Model settings a transfer run takes from its source unless its config sets another value
# than the default config's (which is then checked against the source, and refused if it differs).
INHERITED = ("name", "width_multiplier", "padding", "use_bias")


def inherit_model(config: ml_collections.ConfigDict) -> list[str]:
  """Sets INHERITED model settings left at their defaults to the source's; what it set."""
  if not config.transfer.source:
    return []
  try:
    src = read_run_config(os.path.abspath(config.transfer.source))
  except UserError:
    return []  # check_source says what is wrong with the source
  defaults = get_config().model
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
  if not files.has_checkpoint_steps(workdir):
    raise UserError(f"transfer.source {workdir} has no checkpoints (train it first)")
  if config.transfer.checkpoint == "best" and not os.path.exists(
      files.path(workdir, files.BEST)):
    raise UserError(f"transfer.source {workdir} has no best checkpoint (it ran without a "
                    "validation set); use transfer.checkpoint=latest")
  prep = files.path(workdir, files.PREPROCESSING)
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


def load_source(source: Source) -> Source:
  """The source with its checkpoint's parameters read; UserError if none of its checkpoints
  can be read (checked before the new run's workdir is made)."""
  _, params, step = checkpointing.load_checkpoint(source.workdir, source.which)
  return dataclasses.replace(source, params=params, step=step)


def initial_params(source: Source, config: ml_collections.ConfigDict, fresh: Any) -> tuple[
    Any, int]:
  """The source's backbone and, unless `transfer.new_classifier`, its class layer too; and the
  step of the source checkpoint they come from."""
  if source.params is None:
    source = load_source(source)
  src, step = source.params, source.step
  for a, b in zip(jax.tree_util.tree_leaves(src["backbone"]),
                  jax.tree_util.tree_leaves(fresh["backbone"]), strict=True):
    if a.shape != b.shape:
      raise UserError(f"transfer.source {source.workdir}: backbone shapes differ "
                      f"({a.shape} vs {b.shape})")
  classifier = fresh["classifier"] if config.transfer.new_classifier else src["classifier"]
  return {"backbone": src["backbone"], "classifier": classifier}, step
