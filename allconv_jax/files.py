"""A run's files in its workdir: their names, the lock, atomic writes, metrics JSON lines,
results, the preprocessing statistics (shared between runs on the same images), and whether a
config may resume what a workdir holds.

Every tool that reads or writes a run's files goes through here:

  WORKDIR/config.json         the resolved config (written when the run starts)
  WORKDIR/preprocessing.npz   the fitted GCN/ZCA or mean/std statistics
  WORKDIR/metrics.jsonl       one JSON object per finished epoch
  WORKDIR/checkpoints/<step>/ orbax checkpoints (checkpointing.py), best_checkpoint.json
  WORKDIR/tensorboard/        TensorBoard scalars (metrics.py)
  WORKDIR/results.json        written once, at the very end
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import ml_collections
import numpy as np
from absl import logging

from allconv_jax.config import flatten, run_defining_changes, to_json
from allconv_jax.data import preprocessing
from allconv_jax.errors import UserError, one_line

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
PREPROCESSING = "preprocessing.npz"
BEST = "best_checkpoint.json"
CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt_checkpoints"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
TMP_PREFIX, TMP_LINK = ".tmp-", ".tmp-link-"  # write_atomic's and _link's temporary files
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
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.path.basename(target)}-")
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


def json_kind(value: Any) -> str:
  """What a JSON value is, in JSON's words ('a list', 'null', ...), for error lines."""
  if value is None or isinstance(value, bool):
    return json.dumps(value)
  kinds = {list: "a list", dict: "an object", str: "a string", int: "a number", float: "a number"}
  return kinds.get(type(value), f"a {type(value).__name__}")


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
    remove_stale_temporaries(workdir)
    yield
  finally:
    f.close()
    if created and os.listdir(workdir) == [LOCK]:  # a run that failed before writing anything
      os.remove(path(workdir, LOCK))
      os.rmdir(workdir)


def remove_stale_temporaries(workdir: str) -> None:
  """Removes the temporary files of an earlier process killed mid-write (only ever called by
  the holder of the workdir's lock, so no live writer owns them)."""
  for name in os.listdir(workdir):
    if name.startswith(TMP_PREFIX) or TMP_LINK in name:
      with contextlib.suppress(OSError):
        os.remove(path(workdir, name))


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


# ----------------------------------------------------------------------------- resuming


@dataclasses.dataclass(frozen=True)
class Resume:
  """What a workdir holds for the config about to run in it."""
  saved: dict[str, Any] | None  # the config.json of a run to resume (None: start afresh)
  results: dict[str, Any] | None  # its results.json, if it finished
  changed: tuple[str, ...] = ()  # keys changed since that do not invalidate it
  cleared: bool = False  # it held a failed start (nothing saved), now removed


def check_restart(workdir: str) -> None:
  """restart=True deletes only a run's outputs: refuse a folder that holds some of the files
  this program writes but no config.json (it is not a run's workdir)."""
  if os.path.exists(path(workdir, CONFIG)):
    return
  ours = present_outputs(workdir)
  if ours:
    raise UserError(f"--config.restart=True would delete {', '.join(ours)} in {workdir}, "
                    "which is not a run's workdir (no config.json); delete them yourself or "
                    "use another --workdir")


def check_resume(config: ml_collections.ConfigDict, workdir: str, primary: bool) -> Resume:
  """Whether `config` may resume the run in `workdir`; UserError if it would invalidate it."""
  if not os.path.exists(path(workdir, CONFIG)):
    leftovers = [n for n in (RESULTS, CHECKPOINTS, METRICS) if os.path.exists(path(workdir, n))
                 and (n != CHECKPOINTS or os.listdir(path(workdir, n)))]
    if leftovers:
      raise UserError(f"workdir {workdir} holds {', '.join(leftovers)} but no config.json; "
                      "use another --workdir or set --config.restart=True to start over")
    return Resume(None, None)
  try:
    saved = read_json(path(workdir, CONFIG))
  except UserError as e:
    raise UserError(f"{e}; delete it or set --config.restart=True to start over") from None
  if not isinstance(saved, dict):
    raise UserError(f"{path(workdir, CONFIG)} holds no config ({json_kind(saved)}); "
                    "delete it or set --config.restart=True to start over")
  if not (read_metrics(path(workdir, METRICS)) or os.path.exists(path(workdir, RESULTS))
          or has_checkpoint_steps(workdir)):
    # a failed start (say, out of memory) does not bind the corrected rerun; its leftovers
    # (config.json, preprocessing.npz fitted for that config) go
    if primary:
      clear(workdir)
    return Resume(None, None, cleared=True)
  bad, other = run_defining_changes(saved, config)
  if bad:
    old, new = dict(flatten(saved)), dict(flatten(to_json(config)))
    diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad)
    raise UserError(f"workdir {workdir} holds a run with another {diffs}; use another --workdir "
                    "or set --config.restart=True to start over")
  results = read_json(path(workdir, RESULTS)) if os.path.exists(path(workdir, RESULTS)) else None
  if results is not None and not isinstance(results, dict):
    raise UserError(f"{path(workdir, RESULTS)} holds no results ({json_kind(results)}); "
                    "delete it or set --config.restart=True to start over")
  return Resume(saved, results, tuple(other))


# ----------------------------------------------------------------------------- preprocessing


def save_preprocessing(target: str, stats: dict[str, np.ndarray]) -> None:
  """Writes preprocessing statistics to `target` atomically."""
  write_atomic(target, lambda f: preprocessing.write_preprocessing(f, stats), binary=True)


# Runs on the same training images with the same settings (the points of a sweep or a study)
# share one statistics file, hard-linked into each workdir from $ALLCONV_CACHE_DIR, so neither
# the fit nor the 37 MB is repeated. Files are only ever replaced, never changed in place.
CACHE_ENV = "ALLCONV_CACHE_DIR"


def statistics_cache() -> str:
  """$ALLCONV_CACHE_DIR, else $XDG_CACHE_HOME/allconv-jax/preprocessing (~/.cache/...)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.environ.get(CACHE_ENV) or os.path.join(base, "allconv-jax", "preprocessing")


def statistics_key(data_config: Any, train_images: np.ndarray) -> str:
  """A hash of what the statistics depend on: the settings and every training image's bytes."""
  h = hashlib.sha256(json.dumps([data_config.preprocessing, float(data_config.gcn_scale),
                                 float(data_config.zca_epsilon)]).encode())
  h.update(np.ascontiguousarray(train_images).data)
  return h.hexdigest()[:32]


def _link(source: str, target: str) -> None:
  """`target` becomes a hard link to `source` (a copy across file systems), atomically."""
  tmp = f"{target}{TMP_LINK}{os.getpid()}"
  with contextlib.suppress(FileNotFoundError):
    os.remove(tmp)
  try:
    try:
      os.link(source, tmp)
    except OSError:
      shutil.copyfile(source, tmp)
    os.replace(tmp, target)
  except BaseException:  # a full disk or Ctrl-C mid-copy: no half-written file stays behind
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def fit_or_share(data_config: Any, train_images: np.ndarray, target: str
                 ) -> tuple[dict[str, np.ndarray], bool]:
  """The statistics written to `target`: linked from the shared file of an earlier run on the
  same images and settings (True), or fitted, saved and shared (False)."""
  shared = os.path.join(statistics_cache(), statistics_key(data_config, train_images) + ".npz")
  if os.path.exists(shared):
    try:
      stats = preprocessing.load_preprocessing(shared)
      _link(shared, target)
      return stats, True
    except (UserError, OSError):
      pass  # a damaged or unreadable shared file: fit again below
  stats = preprocessing.fit_preprocessing(data_config, train_images)
  save_preprocessing(target, stats)
  with contextlib.suppress(OSError):  # sharing is an optimization only
    os.makedirs(statistics_cache(), exist_ok=True)
    _link(target, shared)
  return stats, False


def preprocessing_statistics(data_config: Any, workdir: str, source_path: str | None,
                             train_images: np.ndarray, primary: bool
                             ) -> tuple[dict[str, np.ndarray], str | None]:
  """The statistics a run preprocesses with, and how they came (for the log): the workdir's
  own (None), a transfer source's ('reused', copied in), or fitted ('fitted') or found in the
  shared cache ('shared') and saved. Only the primary process writes."""
  target = path(workdir, PREPROCESSING)
  if os.path.exists(target):
    return preprocessing.load_preprocessing(target), None
  if source_path is not None:
    stats = preprocessing.load_preprocessing(source_path)
    if primary:
      save_preprocessing(target, stats)
    return stats, "reused"
  if not primary:  # the others fit the same numbers themselves, writing nothing
    return preprocessing.fit_preprocessing(data_config, train_images), "fitted"
  stats, shared = fit_or_share(data_config, train_images, target)
  return stats, "shared" if shared else "fitted"

