"""The paper's optimizer: SGD with momentum, coupled weight decay, the piecewise-constant rate
schedule, freezing by parameter path (`optax.multi_transform`), and the train state."""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax
from flax import struct

from allconv_jax.errors import UserError


class TrainState(struct.PyTreeNode):
  """Step counter, parameters and optimizer state (the optimizer itself lives in closures)."""
  step: jax.Array
  params: Any
  opt_state: Any


MAX_STEP = 2**31 - 1  # optax counts steps in int32


def check_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """UserError where the schedule cannot be what the config says at this many steps per epoch:
  a boundary on step 0 or two on the same step (a decay would be lost), or a step beyond
  int32."""
  for key, epochs in (("boundaries", max(opt.boundaries, default=0)),
                      ("warmup_epochs", opt.warmup_epochs)):
    if epochs * steps_per_epoch > MAX_STEP:
      raise UserError(f"optimizer.{key} ({epochs:g} epochs) is beyond the last step a schedule "
                      f"can count ({MAX_STEP:,} at {steps_per_epoch} steps per epoch)")
  bounds = list(opt.boundaries)
  if bounds and round(bounds[0] * steps_per_epoch) == 0:
    raise UserError(f"optimizer.boundaries {bounds[0]:g} falls on step 0 at {steps_per_epoch} "
                    "steps per epoch, so the rate would be decayed before the first step; set "
                    "it later")
  for a, b in zip(bounds, bounds[1:], strict=False):
    if round(a * steps_per_epoch) == round(b * steps_per_epoch):
      raise UserError(f"optimizer.boundaries {a:g} and {b:g} fall on the same step "
                      f"({round(a * steps_per_epoch)}) at "
                      f"{steps_per_epoch} steps per epoch, so one decay would be lost; space "
                      "them further apart")


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
