"""Orbax checkpoints in `workdir/checkpoints/<step>/`: save, prune, verify and restore; and a
trained run read back (`load_run`: its config, network and parameters) for the tools and for
transfer learning.

A checkpoint holds {"state": optim.TrainState, "sums": metrics.zeros()-shaped running sums}.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from allconv_jax import cpu, files, input_pipeline, metrics, models, optim
from allconv_jax.config import with_legacy_values
from allconv_jax.errors import UserError

ITEM = "default"  # the item folder CheckpointManager writes for a single unnamed item
CHECKSUMS = "allconv_sha256.json"  # in each step folder, written after the step is complete


def step_checksums(folder: str) -> dict[str, str]:
  """sha256 of every file of a checkpoint step, by path relative to the step folder."""
  sums = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel != CHECKSUMS:
        with open(path, "rb") as f:
          sums[rel] = hashlib.sha256(f.read()).hexdigest()
  return dict(sorted(sums.items()))


def os_error(e: BaseException, folder: str) -> OSError | None:
  """The OSError behind an exception (orbax wraps them; TensorStore reports a full disk as
  RESOURCE_EXHAUSTED with the OS error's code in its text), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
      number = int(code.group(1))
      return OSError(number, os.strerror(number), folder)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def all_finite(tree: Any) -> bool:
  """Whether every floating-point value in `tree` is finite (checked before each save and
  after each restore)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  return bool(_all_finite(leaves)) if leaves else True


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@contextlib.contextmanager
def quiet_orbax_echoes() -> Iterator[None]:
  """Sends to the absl log at INFO, not stderr, the echoes of a failed orbax save or read.

  orbax writes and reads a checkpoint's arrays in asyncio tasks on threads; when one of them
  fails (a damaged step, a full disk), the others fail too, and their tracebacks and orbax's
  own error lines come out one by one (dozens for one flipped bit, over a hundred lines for a
  full disk). The caller reports the failure in one line; the echoes are caught here, and the
  dead tasks are collected before the hooks are put back.
  """
  def to_log(what: str) -> None:
    logging.info("orbax echoed: %s", what)

  saved = (sys.excepthook, sys.unraisablehook, threading.excepthook,
           logging.get_verbosity())
  sys.excepthook = lambda kind, value, tb: to_log(f"{kind.__name__}: {value}")
  sys.unraisablehook = lambda u: to_log(f"{u.exc_type.__name__}: {u.exc_value}")
  threading.excepthook = lambda a: to_log(f"{a.exc_type.__name__}: {a.exc_value}")
  logging.set_verbosity(logging.FATAL)  # orbax's own error lines for the same failure
  try:
    yield
  except BaseException:
    gc.collect()  # a failure's dead tasks echo as they are collected: while the hooks catch it
    raise
  finally:
    sys.excepthook, sys.unraisablehook, threading.excepthook, verbosity = saved
    logging.set_verbosity(verbosity)


class Checkpoints:
  """Saves and restores train states; keeps the newest `keep` plus the best one."""

  def __init__(self, workdir: str, keep: int = 3) -> None:
    self.workdir = workdir
    self.directory = files.path(os.path.abspath(workdir), files.CHECKPOINTS)
    self.keep = keep
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))  # a failed save's
    path = files.path(workdir, files.BEST)
    # Kept in memory so that every process of a multi-host run prunes the same steps.
    self._best: dict[str, Any] | None = files.read_json(path) if os.path.exists(path) else None

  def steps(self) -> list[int]:
    """Finished checkpoint steps, oldest first."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def best(self) -> dict[str, Any] | None:
    """{'step', 'epoch', 'val_accuracy'} of the best checkpoint, if one was marked."""
    return self._best

  def _set_best(self, best: dict[str, Any] | None) -> None:
    self._best = best
    if jax.process_index() != 0:
      return
    path = files.path(self.workdir, files.BEST)
    if best is not None:
      files.write_json(path, best)
    elif os.path.exists(path):
      os.remove(path)

  def save(self, step: int, tree: Any, best: dict[str, Any] | None = None) -> None:
    """Saves `tree` at `step`; `best` marks it as the best so far. Then prunes old ones."""
    if step in self.steps():
      self.manager.delete(step)
    try:
      with quiet_orbax_echoes():
        self.manager.save(step, args=ocp.args.StandardSave(tree))
        self.manager.wait_until_finished()
    except Exception as e:
      cause = os_error(e, self.directory)
      if cause is None:
        raise
      raise cause from None  # disk full, folder removed: one line (cli.user_errors)
    if jax.process_index() == 0:
      files.write_json(os.path.join(self.directory, str(step), CHECKSUMS),
                 step_checksums(os.path.join(self.directory, str(step))))
    if best is not None:
      self._set_best({**best, "step": step})
    self._prune()

  def _prune(self) -> None:
    steps = self.steps()
    best = self.best()
    keep = set(steps[-self.keep:]) | ({best["step"]} if best else set())
    for step in steps:
      if step not in keep:
        self.manager.delete(step)

  def restore(self, step: int, target: Any) -> Any:
    """Restores the checkpoint at `step` into the structure (and shardings) of `target`.

    Each step is read on its own from its item folder (`<step>/default`), not through the
    manager, whose item inference a malformed step (say, an empty folder) would poison for
    every older step.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    folder = os.path.join(self.directory, str(step))
    path = os.path.join(folder, ITEM)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path} is missing")
    if not os.path.exists(os.path.join(folder, CHECKSUMS)):  # every save writes one
      raise ValueError("its checksum file is missing, so its contents cannot be verified")
    if files.read_json(os.path.join(folder, CHECKSUMS)) != step_checksums(folder):
      raise ValueError("its files do not match the checksums saved with it")
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path, abstract)

  def restore_newest(self, target: Any, move_aside: bool = True) -> tuple[int, Any] | None:
    """The newest checkpoint that restores; corrupt ones are moved aside with a warning.

    With `move_aside=False` (reading another run's workdir) nothing is moved. Returns None when
    there are no checkpoints; UserError when none of them is usable.
    """
    steps = self.steps()
    skipped = []  # one warning per unusable step, printed only if an older one restores
    for step in reversed(steps):
      try:
        with quiet_orbax_echoes():
          tree = self.restore(step, target)
        if not all_finite(tree):
          raise ValueError("it holds non-finite values")
        if isinstance(tree, dict) and "state" in tree and int(tree["state"].step) != step:
          raise ValueError(f"its train state is at step {int(tree['state'].step)}, not {step}")
        for warning in skipped:
          print(warning, file=sys.stderr, flush=True)
        return step, tree
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else \
            type(e).__name__
        logging.info("skipped unusable checkpoint %d: %s", step, reason)
        last_reason = reason
        if not move_aside:
          skipped.append(f"warning: checkpoint {self.directory}/{step} is unusable ({reason}); "
                         "used an earlier one")
          continue
        aside = os.path.join(files.path(self.workdir, files.CORRUPT), str(step))
        if self._best is not None and self._best["step"] == step:
          self._set_best(None)
        if jax.process_index() == 0:
          os.makedirs(os.path.dirname(aside), exist_ok=True)
          shutil.rmtree(aside, ignore_errors=True)
          os.replace(os.path.join(self.directory, str(step)), aside)
        skipped.append(f"warning: checkpoint {self.directory}/{step} is incomplete or corrupt "
                       f"({reason}); moved it to {aside} and used an earlier one")
    if steps:
      advice = ("set --config.restart=True to start over" if move_aside  # the run's own trainer
                else "retrain the run or restore its checkpoints from a copy")
      moved = f"; moved to {files.path(self.workdir, files.CORRUPT)}" if move_aside else ""
      raise UserError(f"no usable checkpoint in {self.directory} (steps "
                      f"{', '.join(map(str, steps))}; step {steps[0]}: {last_reason}{moved}); "
                      f"{advice}")
    return None

  def close(self) -> None:
    self.manager.close()


# ----------------------------------------------------------------------------- a trained run


def saved_shapes(step_folder: str) -> dict[str, tuple[int, ...]] | None:
  """{'backbone/stage1_conv1/kernel': shape, ...} of the parameters a checkpoint step holds,
  from its metadata; None for a step whose files lack or fail their checksums or whose metadata
  cannot be read (restoring it says why). orbax is not let near files known to be damaged: its
  failed reads echo tracebacks from its threads."""
  checksums = os.path.join(step_folder, CHECKSUMS)
  try:
    if not os.path.exists(checksums) or files.read_json(checksums) != step_checksums(step_folder):
      return None
  except (OSError, UserError):
    return None
  with quiet_orbax_echoes():
    handler = ocp.StandardCheckpointHandler()
    try:
      return shapes(handler.metadata(epath.Path(step_folder, ITEM)).tree
                    ["state"]["params"])
    except Exception:  # noqa: BLE001 - unreadable metadata: load_run reports the checkpoint
      return None
    finally:
      handler.close()


def shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of every leaf of a parameter tree (arrays or their metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


def difference(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]) -> str:
  """The first parameter where a checkpoint and the config's network differ, in words."""
  for name in sorted(saved.keys() | wanted.keys()):
    if name not in wanted:
      return f"the checkpoints hold {name} {saved[name]}, which its network does not have"
    if name not in saved:
      return f"its network has {name} {wanted[name]}, which the checkpoints do not hold"
    if saved[name] != wanted[name]:
      return f"{name} is {saved[name]} in the checkpoints, {wanted[name]} in its network"
  return "they agree"


def check_config(workdir: str, config: ml_collections.ConfigDict, params: Any,
                 which: str = "latest") -> None:
  """UserError if a run's config.json describes another network (`params`: its parameters'
  shapes) than every readable checkpoint it would load from (the best one for which='best')
  holds: the config, not the checkpoints, is then what changed."""
  steps = files.checkpoint_steps(workdir)
  if which == "best":
    best_path = files.path(workdir, files.BEST)
    best = files.read_json(best_path) if os.path.exists(best_path) else None
    steps = [best["step"]] if isinstance(best, dict) and best.get("step") in steps else []
  folder = files.path(workdir, files.CHECKPOINTS)
  saved = [s for s in (saved_shapes(os.path.join(folder, str(n))) for n in reversed(steps))
           if s is not None]
  if not saved:
    return
  wanted = shapes(params)
  if any(s == wanted for s in saved):
    return
  model = config.model
  raise UserError(
      f"{files.path(workdir, files.CONFIG)} does not match the run's checkpoints "
      f"({difference(saved[0], wanted)}; config: {model.name}, width x{model.width_multiplier:g}, "
      f"{input_pipeline.num_classes(config.data)} classes): restore the config.json the run was "
      "trained with (a finished run's results.json keeps a copy under 'config')")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir; UserError if there is none."""
  config_path = files.path(workdir, files.CONFIG)
  if not os.path.isdir(workdir):
    raise UserError(f"{workdir} does not exist")
  if not os.path.exists(config_path):
    raise UserError(f"{workdir} is not a run's workdir (no config.json)")
  saved = files.read_json(config_path)
  if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
    raise UserError(f"{config_path} holds no run config")
  return ml_collections.ConfigDict(with_legacy_values(saved))


def load_checkpoint(workdir: str, which: str = "latest") -> tuple[ml_collections.ConfigDict,
                                                                  Any, int]:
  """(config, params, step) of a run's newest usable ('latest') or best checkpoint; UserError
  if it has none that can be read. Nothing in the run's workdir is changed."""
  workdir = os.path.abspath(workdir)
  config = read_run_config(workdir)
  model = models.create_model(config.model, input_pipeline.num_classes(config.data),
                              cpu.Convolutions())  # the parameters' shapes do not depend on it
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def abstract_tree() -> Any:
    params = models.init_params(model, jax.random.key(0))
    tx = optim.make_optimizer(config.optimizer, 1, params)
    return {"state": optim.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)),
            "sums": metrics.zeros()}

  target = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
      jax.eval_shape(abstract_tree))
  check_config(workdir, config, target["state"].params, which)
  ckpts = Checkpoints(workdir)
  try:
    if which == "best":
      best = ckpts.best()
      if best is None:
        raise UserError(f"{workdir} has no best checkpoint (it ran without a validation set); "
                        "use the latest")
      try:
        step, tree = best["step"], ckpts.restore(best["step"], target)
      except Exception as e:  # noqa: BLE001 - a missing or broken checkpoint is the user's to fix
        raise UserError(f"the best checkpoint of {workdir} (step {best['step']}) cannot be "
                        f"read ({type(e).__name__}); use the latest") from None
    else:
      restored = ckpts.restore_newest(target, move_aside=False)
      if restored is None:
        raise UserError(f"{workdir} has no checkpoints")
      step, tree = restored
  finally:
    ckpts.close()
  return config, tree["state"].params, step


def load_run(workdir: str, which: str = "latest") -> tuple[ml_collections.ConfigDict,
                                                           models.AllConvNet, Any]:
  """(config, network, params) of a trained run, the network's convolutions chosen for this
  machine (cpu.choose)."""
  config, params, _ = load_checkpoint(workdir, which)
  convs = cpu.choose(config.model.conv_impl, config.model.strided_grad, config.model.dtype)
  model = models.create_model(config.model, input_pipeline.num_classes(config.data), convs)
  return config, model, params
