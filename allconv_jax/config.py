"""The run's config: every key with its default (the paper's protocol), and the checks that run
before any compute, so that every mistake is one clear line (a UserError).

`get_config()` is the default every file in configs/ starts from. Network, optimizer and data
settings follow Springenberg et al. (2015), section 3.1: SGD with momentum 0.9, weight decay
0.001, 350 epochs with the rate x0.1 after epochs 200, 250 and 300, dropout 20 % on the input
and 50 % after each pooling layer (or its replacement), GCN + ZCA whitened CIFAR-10. The keys
are documented in docs/config.md.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from allconv_jax import cpu, models
from allconv_jax.data import cifar
from allconv_jax.errors import UserError


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (All-CNN-C on CIFAR-10, the paper's protocol)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 350
  config.batch_size = 128
  config.eval_batch_size = 500
  config.log_every_steps = 100
  config.restart = False
  config.tensorboard = True

  config.model = ml_collections.ConfigDict()
  config.model.name = "all_cnn_c"
  config.model.width_multiplier = 1.0
  config.model.final_relu = True
  config.model.input_dropout = 0.2
  config.model.dropout = 0.5
  config.model.kernel_init = "he_normal"
  config.model.init_std = 0.05
  config.model.use_bias = True
  config.model.bias_init = 0.0
  config.model.padding = "symmetric"
  config.model.dtype = "float32"
  config.model.strided_grad = "auto"
  config.model.conv_impl = "auto"

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.dataset = "cifar10"
  config.data.dir = ""
  config.data.label_type = "fine"
  config.data.subset = ""
  config.data.classes = ""
  config.data.validation_size = 1000
  config.data.validate_on_test = False
  config.data.max_train_examples = 0
  config.data.max_train_per_class = 0
  config.data.max_test_examples = 0
  config.data.preprocessing = "gcn_zca"
  config.data.gcn_scale = 55.0
  config.data.zca_epsilon = 0.1
  config.data.augment = False
  config.data.translate_pixels = 5

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 0.01
  config.optimizer.learning_rates = ()
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.001
  config.optimizer.boundaries = (200, 250, 300)
  config.optimizer.decay_factor = 0.1
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.freeze = ""

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 10
  config.checkpoint.keep = 3

  config.transfer = ml_collections.ConfigDict()
  config.transfer.source = ""
  config.transfer.checkpoint = "latest"
  config.transfer.new_classifier = True
  return config


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
  """Unknown keys and wrong types against get_config()."""
  reference = dict(flatten(get_config()))
  for key, value in flatten(config):
    if key not in reference:
      raise UserError(f"unknown config key {key!r}{did_you_mean(key, reference)}; see "
                      "docs/config.md")
    if not _type_ok(value, reference[key]):
      raise UserError(f"config key {key!r} must be a {type(reference[key]).__name__}, "
                      f"got {value!r}")
  for key in reference:
    if key not in dict(flatten(config)):
      raise UserError(f"config lacks key {key!r}; start configs from "
                      "allconv_jax.config.get_config()")


def did_you_mean(key: str, known: Any) -> str:
  """' (did you mean 'a.b'?)' for the closest known key, or ''."""
  close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _require(ok: bool, key: str, what: str, value: Any) -> None:
  if not ok:
    raise UserError(f"config key {key!r} {what}, got {value!r}")


def _check_rates(opt: ml_collections.ConfigDict) -> None:
  """optimizer.learning_rates, when set, is one rate per segment and starts at learning_rate."""
  rates = list(opt.learning_rates)
  if not rates:
    return
  _require(all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < math.inf
               for r in rates), "optimizer.learning_rates", "must be positive finite numbers",
           opt.learning_rates)
  _require(len(rates) == len(opt.boundaries) + 1, "optimizer.learning_rates",
           f"must hold one rate per segment ({len(opt.boundaries) + 1} for boundaries "
           f"{tuple(opt.boundaries)})", opt.learning_rates)
  if rates[0] != opt.learning_rate:
    raise UserError(f"optimizer.learning_rate ({opt.learning_rate:g}) is not the first of "
                    f"optimizer.learning_rates {tuple(rates)}: set the whole list, or "
                    "--config.optimizer.learning_rates='()' to use learning_rate x decay_factor")


def validate(config: ml_collections.ConfigDict) -> None:
  """Every config check, once, before any compute: keys, types, ranges and names (no I/O).

  The rest of the code trusts a validated config.
  """
  check_keys_and_types(config)
  _require(config.num_epochs >= 1, "num_epochs", "must be >= 1", config.num_epochs)
  _require(config.batch_size >= 1, "batch_size", "must be >= 1", config.batch_size)
  _require(config.eval_batch_size >= 1, "eval_batch_size", "must be >= 1",
           config.eval_batch_size)
  _require(config.log_every_steps >= 1, "log_every_steps", "must be >= 1",
           config.log_every_steps)
  _require(0 <= config.seed < 2**63, "seed", "must be in [0, 2**63)", config.seed)
  _check_optimizer(config.optimizer)
  _check_model(config.model)
  ckpt = config.checkpoint
  _require(ckpt.every_epochs >= 1, "checkpoint.every_epochs", "must be >= 1", ckpt.every_epochs)
  _require(ckpt.keep >= 1, "checkpoint.keep", "must be >= 1", ckpt.keep)
  _require(config.transfer.checkpoint in ("latest", "best"), "transfer.checkpoint",
           "must be 'latest' or 'best'", config.transfer.checkpoint)
  check_data(config.data)


def _check_optimizer(opt: ml_collections.ConfigDict) -> None:
  _require(0 < opt.learning_rate < math.inf, "optimizer.learning_rate",
           "must be a finite number > 0", opt.learning_rate)
  _require(0 <= opt.momentum < 1, "optimizer.momentum", "must be in [0, 1)", opt.momentum)
  _require(0 <= opt.weight_decay < math.inf, "optimizer.weight_decay",
           "must be a finite number >= 0", opt.weight_decay)
  _require(0 < opt.decay_factor < math.inf, "optimizer.decay_factor",
           "must be a finite number > 0", opt.decay_factor)
  _require(0 <= opt.warmup_epochs < math.inf, "optimizer.warmup_epochs",
           "must be a finite number >= 0", opt.warmup_epochs)
  bounds = list(opt.boundaries)
  _require(all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < math.inf
               for b in bounds), "optimizer.boundaries", "must be positive finite epochs",
           opt.boundaries)
  _require(all(a < b for a, b in zip(bounds, bounds[1:], strict=False)), "optimizer.boundaries",
           "must be strictly increasing", opt.boundaries)
  _check_rates(opt)
  try:
    re.compile(opt.freeze)
  except re.error as e:
    raise UserError(f"config key 'optimizer.freeze' is not a regular expression ({e}), "
                    f"got {opt.freeze!r}") from None


def _check_model(model: ml_collections.ConfigDict) -> None:
  models.check_model_name(model.name)
  _require(0 < model.width_multiplier <= MAX_WIDTH, "model.width_multiplier",
           f"must be in (0, {MAX_WIDTH}] (wider nets do not fit in memory)",
           model.width_multiplier)
  _require(0 <= model.input_dropout < 1, "model.input_dropout", "must be in [0, 1)",
           model.input_dropout)
  _require(0 <= model.dropout < 1, "model.dropout", "must be in [0, 1)", model.dropout)
  for key, allowed in (("dtype", models.DTYPES), ("strided_grad", cpu.STRIDED_GRADS),
                       ("conv_impl", cpu.CONV_IMPLS), ("kernel_init", models.KERNEL_INITS),
                       ("padding", models.PADDINGS)):
    _require(model[key] in allowed, f"model.{key}", f"must be one of {', '.join(allowed)}",
             model[key])
  _require(0 < model.init_std < math.inf, "model.init_std", "must be a finite number > 0",
           model.init_std)


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise UserError(f"unknown data.{key} {value!r}; choose one of {', '.join(allowed)}")


def check_data(data_config: Any) -> None:
  """The data section: names, the class selection, sizes and preprocessing ranges (no I/O)."""
  source = data_config.source
  dataset = data_config.dataset
  label_type = data_config.label_type
  subset = data_config.subset
  classes = data_config.classes
  preprocessing = data_config.preprocessing
  _choice("source", source, cifar.SOURCES)
  _choice("dataset", dataset, cifar.DATASETS)
  _choice("label_type", label_type, cifar.LABEL_TYPES)
  _choice("preprocessing", preprocessing, cifar.PREPROCESSINGS)
  _choice("subset", subset, ("",) + tuple(cifar.SUBSETS))
  if source == "local" and not str(data_config.dir).strip():
    raise UserError(
      "data.source=local needs data.dir: the folder that holds "
      f"{' or '.join(name + '/' for name, *_ in cifar.LAYOUTS[dataset])} (from {cifar.CIFAR_URL})"
    )
  if subset and classes:
    raise UserError(f"set data.subset ({subset!r}) or data.classes ({classes!r}), not both")
  if subset and (dataset != "cifar100" or label_type != "fine"):
    raise UserError(
      f"data.subset={subset} needs data.dataset=cifar100 and data.label_type=fine "
      f"(got {dataset}, {label_type})"
    )
  _check_classes(dataset, label_type, classes)
  for key in ("validation_size", "max_train_examples", "max_train_per_class",
              "max_test_examples"):
    value = data_config[key]
    if int(value) != value or value < 0:
      raise UserError(f"data.{key} must be an integer >= 0 (got {value})")
  if data_config.validate_on_test and data_config.validation_size:
    raise UserError(
      f"data.validate_on_test=True uses the test set for validation: set "
      f"data.validation_size=0 (got {data_config.validation_size})"
    )
  translate = data_config.translate_pixels
  if int(translate) != translate or not 0 <= translate < 32:
    raise UserError(f"data.translate_pixels must be an integer in [0, 32) (got {translate})")
  gcn_scale = data_config.gcn_scale
  if not 0 < gcn_scale < math.inf:
    raise UserError(f"data.gcn_scale must be a finite number > 0 (got {gcn_scale})")
  eps = data_config.zca_epsilon
  if not 0 <= eps < math.inf:
    raise UserError(f"data.zca_epsilon must be a finite number >= 0 (got {eps})")
  if preprocessing == "gcn_zca" and eps == 0:
    raise UserError(
      "data.zca_epsilon must be > 0 for gcn_zca: GCN makes the covariance singular "
      "(pylearn2 used 0.1)"
    )


def _check_classes(dataset: str, label_type: str, classes: str) -> None:
  """data.classes: at least two known, distinct class names of the dataset's label space."""
  names = cifar.parse_classes(classes)
  if not names:
    return
  base = cifar.base_names(dataset, label_type)
  space = f"{dataset}" + (f" {label_type}" if dataset == "cifar100" else "")
  if any(not n for n in names):
    raise UserError(f"data.classes {classes!r} has an empty name; use a,b,c")
  unknown = [n for n in names if n not in base]
  if unknown:
    raise UserError(
      f"unknown class names in data.classes for {space}: {', '.join(unknown)} "
      f"(known: {base[0]}, {base[1]}, ... see allconv_jax/data/cifar.py)"
    )
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"data.classes repeats {', '.join(duplicates)}")
  if len(names) < 2:
    raise UserError(f"data.classes needs at least 2 class names (got {classes!r})")


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
