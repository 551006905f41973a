"""A run's workdir: its file names, the lock, atomic writes, metrics JSON lines and results.

Every tool that reads or writes a run's files goes through here:

  WORKDIR/config.json         the resolved config (written when the run starts)
  WORKDIR/preprocessing.npz   the fitted GCN/ZCA or mean/std statistics
  WORKDIR/metrics.jsonl       one JSON object per finished epoch
  WORKDIR/checkpoints/<step>/ orbax checkpoints (checkpointing.py), best_checkpoint.json
  WORKDIR/results.json        written once, at the very end
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from absl import logging

from allconv_jax.errors import UserError, one_line
from allconv_jax.tensorflow_env import quiet_tensorflow

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
PREPROCESSING = "preprocessing.npz"
BEST = "best_checkpoint.json"
CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt_checkpoints"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
OUTPUTS = (CONFIG, METRICS, RESULTS, PREPROCESSING, BEST, CHECKPOINTS, CORRUPT, TENSORBOARD)


def path(workdir: str, name: str) -> str:
  """WORKDIR/name."""
  return os.path.join(workdir, name)


# ----------------------------------------------------------------------------- atomic writes


def write_atomic(target: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
  """Writes `target` through `write(file)` into a temporary file beside it, synced, then renamed
  over it: readers see the old or the new file, never half of one."""
  folder = os.path.dirname(os.path.abspath(target))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.path.basename(target)}-")
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_json(target: str, obj: Any) -> None:
  """Writes JSON atomically (indented, one trailing newline)."""
  write_atomic(target, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def write_text(target: str, text: str) -> None:
  """Writes a text file atomically."""
  write_atomic(target, lambda f: f.write(text))


def read_json(target: str) -> Any:
  """Reads a JSON file; a corrupt one is a UserError naming it."""
  try:
    with open(target) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{target} is corrupt ({one_line(e)})") from None


# ----------------------------------------------------------------------------- metrics.jsonl


def read_metrics(target: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file. A line that is not a record (a truncated last line
  from a kill, a damaged line) is skipped with a warning; the records after it are kept."""
  if not os.path.exists(target):
    return []
  records = []
  with open(target) as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict) and {"epoch", "step"} <= record.keys():
        records.append(record)
      elif line.strip():
        logging.warning("%s: line %d is not a metrics record; skipped", target, number)
  return records


def write_metrics(target: str, records: list[dict[str, Any]]) -> None:
  """Rewrites metrics.jsonl atomically with `records`."""
  write_atomic(target, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))


def append_metrics(target: str, record: dict[str, Any]) -> None:
  """Appends one record to metrics.jsonl and flushes it to disk."""
  with open(target, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_results(workdir: str) -> dict[str, Any] | None:
  """A workdir's results.json, or None if absent or unreadable."""
  try:
    with open(path(workdir, RESULTS)) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  return results if isinstance(results, dict) else None


# ----------------------------------------------------------------------------- the folder


@contextlib.contextmanager
def lock(workdir: str, primary: bool = True) -> Iterator[None]:
  """Holds an exclusive lock on the workdir; the OS releases it when the process dies.

  Only the primary process of a multi-host run takes it (the others share its workdir).
  """
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  if not primary:
    yield
    return
  try:
    f = open(path(workdir, LOCK), "a+")  # noqa: SIM115 - held open for the duration of the run
  except OSError as e:
    raise UserError(f"cannot open the lock file {path(workdir, LOCK)} ({e.strerror}); "
                    "remove it or use another --workdir") from None
  try:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      owner = f.read().strip() or "unknown"
      raise UserError(f"another run (pid {owner}) is using workdir {workdir}; wait for it "
                      "to finish or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield
  finally:
    f.close()
    if created and os.listdir(workdir) == [LOCK]:  # a run that failed before writing anything
      os.remove(path(workdir, LOCK))
      os.rmdir(workdir)


def check_writable(workdir: str) -> None:
  """UserError unless `workdir` can be created (or exists) and a file written in it; nothing
  is left behind (a probe file in the nearest existing folder is removed again)."""
  folder = os.path.abspath(workdir)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise UserError(f"--workdir {workdir}: {folder} is a file, not a folder")
  try:
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".allconv-probe-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir {workdir}: cannot write in {folder} ({e.strerror})") from None


def present_outputs(workdir: str) -> list[str]:
  """The names of OUTPUTS that exist in `workdir`."""
  return [n for n in OUTPUTS if os.path.exists(path(workdir, n))]


def clear(workdir: str) -> None:
  """Removes a previous run's outputs (only those this program writes)."""
  for name in OUTPUTS:
    target = path(workdir, name)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)


def has_checkpoint_steps(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds any step folder."""
  return bool(checkpoint_steps(workdir))


def checkpoint_steps(workdir: str) -> list[int]:
  """The step folders of WORKDIR/checkpoints, oldest first (finished or not)."""
  folder = path(workdir, CHECKPOINTS)
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


class TensorBoard:
  """clu metric writers into WORKDIR/tensorboard when TensorFlow is installed; else nothing."""

  def __init__(self, workdir: str, enabled: bool) -> None:
    self.writer = None
    if not enabled or importlib.util.find_spec("tensorflow") is None:
      return
    quiet_tensorflow()
    try:
      from clu import metric_writers  # imports TensorFlow: only here
      self.writer = metric_writers.create_default_writer(path(workdir, TENSORBOARD),
                                                         just_logging=False)
    except Exception as e:  # noqa: BLE001 - TensorBoard is optional
      logging.warning("no TensorBoard writer: %s", e)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
