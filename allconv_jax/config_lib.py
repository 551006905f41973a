"""Config checks run before any compute: every mistake is one clear line (a UserError)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import ml_collections

from allconv_jax import input_pipeline, models
from allconv_jax.errors import UserError
from configs import default

MAX_WIDTH = 8.0  # 768 / 1536 channels: about 87 M parameters for All-CNN-C

# Keys whose change would invalidate a run that already has checkpoints.
RUN_DEFINING_KEYS = (
    "seed", "batch_size", "model.name", "model.width_multiplier", "model.final_relu",
    "model.use_bias", "model.padding",
    "data.dataset", "data.label_type", "data.subset", "data.classes", "data.validation_size",
    "data.validate_on_test", "data.source", "data.dir",
    "data.max_train_examples", "data.max_train_per_class",
    "data.preprocessing", "data.gcn_scale", "data.zca_epsilon",
    "transfer.source", "optimizer.freeze", "optimizer.momentum",
)


# Keys added after runs were already saved, with the value those runs effectively used
# (before model.padding existed, strided convolutions padded as TF's SAME).
LEGACY_VALUES = {"model.padding": "tf_same", "model.use_bias": True, "model.init_std": 0.05,
                 "optimizer.learning_rates": [], "data.validate_on_test": False,
                 "data.max_train_per_class": 0}


def with_legacy_values(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config.json (nested dicts) with LEGACY_VALUES filled in where keys are missing."""
  out = json.loads(json.dumps(saved))
  for key, value in LEGACY_VALUES.items():
    section, name = key.split(".")
    if isinstance(out.get(section), dict):
      out[section].setdefault(name, value)
  return out


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> Iterator[
    tuple[str, Any]]:
  """Yields ('a.b', value) for every leaf of a (nested) config."""
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from flatten(value, path + ".")
    else:
      yield path, value


def _type_ok(value: Any, reference: Any) -> bool:
  if isinstance(reference, bool):
    return isinstance(value, bool)
  if isinstance(reference, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(reference, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(reference, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(reference))


def check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  """Unknown keys and wrong types against configs/default.py."""
  reference = dict(flatten(default.get_config()))
  for key, value in flatten(config):
    if key not in reference:
      raise UserError(f"unknown config key {key!r}; see README.md, 'Config keys'")
    if not _type_ok(value, reference[key]):
      raise UserError(f"config key {key!r} must be a {type(reference[key]).__name__}, "
                      f"got {value!r}")
  for key in reference:
    if key not in dict(flatten(config)):
      raise UserError(f"config lacks key {key!r}; start configs from configs/default.py")


def _require(ok: bool, key: str, what: str, value: Any) -> None:
  if not ok:
    raise UserError(f"config key {key!r} {what}, got {value!r}")


def _check_rates(opt: ml_collections.ConfigDict) -> None:
  """optimizer.learning_rates, when set, is one rate per segment and starts at learning_rate."""
  rates = list(opt.learning_rates)
  if not rates:
    return
  _require(all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates),
           "optimizer.learning_rates", "must be positive numbers", opt.learning_rates)
  _require(len(rates) == len(opt.boundaries) + 1, "optimizer.learning_rates",
           f"must hold one rate per segment ({len(opt.boundaries) + 1} for boundaries "
           f"{tuple(opt.boundaries)})", opt.learning_rates)
  if rates[0] != opt.learning_rate:
    raise UserError(f"optimizer.learning_rate ({opt.learning_rate:g}) is not the first of "
                    f"optimizer.learning_rates {tuple(rates)}: set the whole list, or "
                    "--config.optimizer.learning_rates='()' to use learning_rate x decay_factor")


def validate(config: ml_collections.ConfigDict) -> None:
  """All config checks: keys, types, ranges, names (no I/O beyond reading the config)."""
  check_keys_and_types(config)
  opt, model, ckpt = config.optimizer, config.model, config.checkpoint
  _require(config.num_epochs >= 1, "num_epochs", "must be >= 1", config.num_epochs)
  _require(config.batch_size >= 1, "batch_size", "must be >= 1", config.batch_size)
  _require(config.eval_batch_size >= 1, "eval_batch_size", "must be >= 1",
           config.eval_batch_size)
  _require(config.log_every_steps >= 1, "log_every_steps", "must be >= 1",
           config.log_every_steps)
  _require(opt.learning_rate > 0, "optimizer.learning_rate", "must be > 0", opt.learning_rate)
  _require(0 <= opt.momentum < 1, "optimizer.momentum", "must be in [0, 1)", opt.momentum)
  _require(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0", opt.weight_decay)
  _require(opt.decay_factor > 0, "optimizer.decay_factor", "must be > 0", opt.decay_factor)
  _require(opt.warmup_epochs >= 0, "optimizer.warmup_epochs", "must be >= 0",
           opt.warmup_epochs)
  bounds = list(opt.boundaries)
  _require(all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0
               for b in bounds), "optimizer.boundaries", "must be positive epochs", opt.boundaries)
  _require(all(a < b for a, b in zip(bounds, bounds[1:], strict=False)), "optimizer.boundaries",
           "must be strictly increasing", opt.boundaries)
  _check_rates(opt)
  models.check_model_name(model.name)
  _require(0 < model.width_multiplier <= MAX_WIDTH, "model.width_multiplier",
           f"must be in (0, {MAX_WIDTH}] (wider nets do not fit in memory)",
           model.width_multiplier)
  _require(0 <= config.seed < 2**63, "seed", "must be in [0, 2**63)", config.seed)
  try:
    re.compile(opt.freeze)
  except re.error as e:
    raise UserError(f"config key 'optimizer.freeze' is not a regular expression ({e}), "
                    f"got {opt.freeze!r}") from None
  _require(0 <= model.input_dropout < 1, "model.input_dropout", "must be in [0, 1)",
           model.input_dropout)
  _require(0 <= model.dropout < 1, "model.dropout", "must be in [0, 1)", model.dropout)
  _require(model.dtype in models.DTYPES, "model.dtype",
           f"must be one of {', '.join(models.DTYPES)}", model.dtype)
  _require(model.strided_grad in models.STRIDED_GRADS, "model.strided_grad",
           f"must be one of {', '.join(models.STRIDED_GRADS)}", model.strided_grad)
  _require(model.kernel_init in models.KERNEL_INITS, "model.kernel_init",
           f"must be one of {', '.join(models.KERNEL_INITS)}", model.kernel_init)
  _require(model.init_std > 0, "model.init_std", "must be > 0", model.init_std)
  _require(model.padding in models.PADDINGS, "model.padding",
           f"must be one of {', '.join(models.PADDINGS)}", model.padding)
  _require(ckpt.every_epochs >= 1, "checkpoint.every_epochs", "must be >= 1", ckpt.every_epochs)
  _require(ckpt.keep >= 1, "checkpoint.keep", "must be >= 1", ckpt.keep)
  _require(config.transfer.checkpoint in ("latest", "best"), "transfer.checkpoint",
           "must be 'latest' or 'best'", config.transfer.checkpoint)
  input_pipeline.check_config(config.data)


def to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON-able nested dicts (tuples become lists)."""
  return json.loads(config.to_json())


def run_defining_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> tuple[
    list[str], list[str]]:
  """(keys that would invalidate the saved run, other changed keys) between two configs."""
  old = dict(flatten(with_legacy_values(saved)))
  new = dict(flatten(to_json(config)))
  changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
  bad = [k for k in changed if k in RUN_DEFINING_KEYS]
  return bad, [k for k in changed if k not in RUN_DEFINING_KEYS]
