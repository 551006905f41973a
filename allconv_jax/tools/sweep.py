r"""Learning-rate sweep: every config at every rate, then the winning rate per network.

  python -m allconv_jax.tools.sweep --configs=configs/model_a.py,configs/all_cnn_c.py \
      --learning_rates=0.25,0.1,0.05,0.01 --root=/tmp/allconv/sweep [--config.num_epochs=50 ...]

Each point runs the training program (main.py's, as `python -m allconv_jax.launch`) in
`ROOT/<config file stem>/lr<rate>/` as a subprocess (its output is echoed and appended to
`sweep.log` there). Finished points (results.json with at least the config's num_epochs and the
same run-defining settings) are skipped, unfinished ones resume.
The rate with the highest validation accuracy (best epoch) wins, as the paper chose its rates;
the result goes to ROOT/sweep.json and ROOT/sweep.md and is printed. A failed point (e.g. a
diverged run) is recorded and the sweep goes on; the exit status is 1 if any point failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
from absl import app, flags

from allconv_jax import cli, files
from allconv_jax.config import run_defining_changes
from allconv_jax.errors import UserError
from allconv_jax.tools import selection
from allconv_jax.tools.invocations import log_invocation
from allconv_jax.tools.selection import error_pct, pct, pick_winners, rate_name

PAPER_RATES = (0.25, 0.1, 0.05, 0.01)  # the set the paper chose its rates from (section 3.1)
RATE_KEY = "optimizer.learning_rate"


class SweepInterrupted(Exception):
  """SIGINT/SIGTERM arrived during a point; main.py saved a checkpoint."""


@dataclasses.dataclass(frozen=True, eq=False)
class Point:
  """One (config, learning rate) run of the sweep."""
  network: str  # the config file's stem, e.g. 'all_cnn_c'
  config_file: str
  learning_rate: float
  workdir: str
  flags: tuple[str, ...]  # --config.* flags for main.py: the rate, then the overrides
  config: ml_collections.ConfigDict


# ----------------------------------------------------------------------------- planning


def parse_rates(values: Sequence[str]) -> tuple[float, ...]:
  """Positive, distinct learning rates from text; UserError otherwise."""
  rates = []
  for v in values:
    try:
      rate = float(v)
    except ValueError:
      raise UserError(f"--learning_rates: {v!r} is not a number") from None
    if not (math.isfinite(rate) and rate > 0):
      raise UserError(f"--learning_rates: {v!r} must be a positive number")
    if rate in rates:
      raise UserError(f"--learning_rates lists {v} twice")
    rates.append(rate)
  if not rates:
    raise UserError("--learning_rates is empty")
  return tuple(rates)


def check_overrides(overrides: Sequence[str]) -> None:
  """Overrides must read --config.a.b=value and must not set the swept rate."""
  for arg in overrides:
    if "=" not in arg:
      raise UserError(f"write config overrides as --config.a.b=value, got {arg}")
    if arg.split("=", 1)[0] == f"--config.{RATE_KEY}":
      raise UserError(f"{arg}: the sweep sets {RATE_KEY}; use --learning_rates")


def plan(config_files: Sequence[str], rates: Sequence[float], root: str,
         overrides: Sequence[str]) -> list[Point]:
  """Every (config, rate) point, each config loaded and validated before anything runs."""
  check_overrides(overrides)
  if not config_files:
    raise UserError("--configs is empty")
  paths = [cli.resolve_config(f) for f in config_files]
  stems: dict[str, str] = {}
  points = []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in stems:
      raise UserError(f"two configs share the name {stem!r}: {stems[stem]} and {path}")
    stems[stem] = path
    for rate in rates:
      point_flags = (f"--config.{RATE_KEY}={rate_name(rate)}", *overrides)
      config = cli.config_from_file(path, point_flags)
      workdir = os.path.join(os.path.abspath(root), stem, f"lr{rate_name(rate)}")
      points.append(Point(stem, path, float(rate), workdir, point_flags, config))
  return points


# ----------------------------------------------------------------------------- running


def finished_results(point: Point) -> dict[str, Any] | None:
  """The point's results if its run is finished with the same run-defining settings."""
  results = selection.read_results(point.workdir)
  if results is None or results.get("epochs", 0) < point.config.num_epochs:
    return None
  saved = results.get("config")
  if not isinstance(saved, dict) or run_defining_changes(saved, point.config)[0]:
    return None  # main.py explains the mismatch and the point fails
  return results


class _Child:
  """The running main.py process and whether a stop signal arrived (it is forwarded)."""

  def __init__(self) -> None:
    self.proc: subprocess.Popen[str] | None = None
    self.stopped = False


@contextlib.contextmanager
def forward_signals() -> Iterator[_Child]:
  """SIGINT/SIGTERM mark the sweep stopped and go on to main.py, which saves a checkpoint."""
  child = _Child()
  if threading.current_thread() is not threading.main_thread():
    yield child
    return

  def handler(signum: int, _: Any) -> None:
    child.stopped = True
    if child.proc is not None and child.proc.poll() is None:
      child.proc.send_signal(signum)

  with cli.signal_handler(handler):
    yield child


def main_command(point: Point) -> list[str]:
  """The main.py command line of a point."""
  return [sys.executable, "-m", "allconv_jax.launch", f"--config={point.config_file}", *point.flags,
          f"--workdir={point.workdir}"]


def child_env() -> dict[str, str]:
  """main.py's environment: this one, unbuffered, with this code first on its import path (so
  that it runs the same code from any folder, installed or not)."""
  path = [cli.REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
  return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}


def run_point(point: Point, child: _Child, echo: Callable[[str], None]) -> tuple[int, str | None]:
  """Runs main.py for a point, echoing and logging its output: (exit status, its error line)."""
  os.makedirs(point.workdir, exist_ok=True)
  started = time.time()
  env = child_env()
  prefix = f"[{point.network} lr{rate_name(point.learning_rate)}]"
  error = None
  with open(os.path.join(point.workdir, "sweep.log"), "a") as log:
    log.write(f"$ {' '.join(main_command(point))}\n")
    proc = subprocess.Popen(main_command(point), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env)
    child.proc = proc
    if child.stopped:  # the signal came while it was starting
      proc.send_signal(signal.SIGINT)
    try:
      assert proc.stdout is not None
      for line in proc.stdout:
        line = line.rstrip("\n")
        log.write(line + "\n")
        log.flush()
        echo(f"{prefix} {line}")
        if line.startswith(("error:", "interrupted:")):
          error = line.split(":", 1)[1].strip()
      returncode = proc.wait()
    finally:
      child.proc = None
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  log_invocation(point.workdir, main_command(point), started, returncode)
  if returncode != 0 and error is None:
    error = f"main.py exited with status {returncode}"
  return returncode, error


def point_record(point: Point, status: str, results: dict[str, Any] | None,
                 returncode: int | None = None, error: str | None = None) -> dict[str, Any]:
  """A point as a sweep.json entry."""
  r = results or {}
  return {
      "network": point.network, "config_file": point.config_file,
      "learning_rate": point.learning_rate, "workdir": point.workdir, "status": status,
      "returncode": returncode, "error": error, "epochs": r.get("epochs"),
      "best_val_accuracy": r.get("best_val_accuracy"), "best_epoch": r.get("best_epoch"),
      "final_val_accuracy": r.get("final_val_accuracy"), "test_accuracy": r.get("test_accuracy"),
      "test_loss": r.get("test_loss"),
  }


# ----------------------------------------------------------------------------- summarising


def sweep_summary(root: str, rates: Sequence[float], overrides: Sequence[str],
                  records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The sweep.json contents."""
  winners = pick_winners(records)
  return {
      "root": os.path.abspath(root), "learning_rates": list(rates), "overrides": list(overrides),
      "selection": "highest best-epoch validation accuracy (results.json best_val_accuracy)",
      "points": list(records),
      "winners": {net: None if w is None else {
          "learning_rate": w["learning_rate"], "best_val_accuracy": w["best_val_accuracy"],
          "best_epoch": w["best_epoch"], "test_accuracy": w["test_accuracy"],
          "workdir": w["workdir"]} for net, w in winners.items()},
      "failed": sum(r["status"] == "failed" for r in records),
  }


def to_markdown(summary: dict[str, Any]) -> str:
  """sweep.md: validation accuracy per network and rate, the winner, failed points."""
  rates = summary["learning_rates"]
  lines = [
      "# Learning-rate sweep", "",
      f"Root: `{summary['root']}`" + (f"; overrides: `{' '.join(summary['overrides'])}`"
                                       if summary["overrides"] else ""), "",
      "Cells: validation accuracy % at the best epoch; the winner (bold) has the highest.", "",
      "| Network | " + " | ".join(f"lr {rate_name(r)}" for r in rates)
      + " | Winning rate | Test error % (winner) |",
      "|---" * (len(rates) + 3) + "|",
  ]
  by_point = {(p["network"], p["learning_rate"]): p for p in summary["points"]}
  for net, win in summary["winners"].items():
    cells = []
    for rate in rates:
      p = by_point.get((net, rate))
      if p is None or p["status"] == "interrupted":
        cells.append("—")
      elif p["status"] == "failed":
        cells.append("failed")
      else:
        cell = pct(p["best_val_accuracy"])
        cells.append(f"**{cell}**" if win is not None and win["learning_rate"] == rate else cell)
    if win is None:
      cells += ["—", "—"]
    else:
      test = win["test_accuracy"]
      cells += [rate_name(win["learning_rate"]), "—" if test is None else error_pct(test)]
    lines.append(f"| {net} | " + " | ".join(cells) + " |")
  failed = [p for p in summary["points"] if p["status"] == "failed"]
  if failed:
    lines += ["", "Failed points:", ""]
    lines += [f"- {p['network']} lr {rate_name(p['learning_rate'])}: {p['error']}" for p in failed]
  return "\n".join(lines) + "\n"


def write_summary(root: str, summary: dict[str, Any]) -> str:
  """Writes ROOT/sweep.json and ROOT/sweep.md; returns the markdown."""
  text = to_markdown(summary)
  files.write_json(os.path.join(root, "sweep.json"), summary)
  files.write_text(os.path.join(root, "sweep.md"), text)
  return text


def execute(point: Point, child: _Child, echo: Callable[[str], None], head: str
            ) -> dict[str, Any]:
  """Skips a finished point or runs it; its record ('skipped', 'trained', 'interrupted' with
  returncode None if it never started, or 'failed')."""
  results = finished_results(point)
  if results is not None:
    echo(f"{head}: skipped, finished ({results['epochs']} epochs, validation accuracy "
         f"{pct(results.get('best_val_accuracy'))} %) in {point.workdir}")
    return point_record(point, "skipped", results)
  if child.stopped:
    return point_record(point, "interrupted", None, None, "stopped before it started")
  echo(f"{head}: running main.py in {point.workdir}")
  returncode, error = run_point(point, child, echo)
  results = finished_results(point) if returncode == 0 else None
  if results is not None:
    return point_record(point, "trained", results, returncode)
  if child.stopped:
    return point_record(point, "interrupted", None, returncode, error)
  error = error or "main.py finished without a matching results.json"
  echo(f"{head}: failed: {error}")
  return point_record(point, "failed", None, returncode, error)


def run_sweep(config_files: Sequence[str], rates: Sequence[float], root: str,
              overrides: Sequence[str] = (),
              echo: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or skips) every point, writes sweep.json and sweep.md and returns the summary.

  Raises SweepInterrupted after recording the points done so far if a stop signal arrived.
  """
  if os.path.exists(root) and not os.path.isdir(root):
    raise UserError(f"--root {root} exists and is not a folder")
  points = plan(config_files, rates, root, overrides)
  os.makedirs(root, exist_ok=True)
  records: list[dict[str, Any]] = []
  with forward_signals() as child:
    for i, point in enumerate(points, 1):
      name = f"{point.network} lr {rate_name(point.learning_rate)}"
      record = execute(point, child, echo, f"[{i}/{len(points)}] {name}")
      started = not (record["status"] == "interrupted" and record["returncode"] is None)
      if started:
        records.append(record)
      if record["status"] != "skipped":
        write_summary(root, sweep_summary(root, rates, overrides, records))
      if child.stopped:
        raise SweepInterrupted(f"stopped {'during' if started else 'before'} {name}; run the same "
                          "command again to " + ("resume" if started else "go on"))
  summary = sweep_summary(root, rates, overrides, records)
  echo(write_summary(root, summary).rstrip("\n"))
  return summary


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_list("configs", None, "Config files (configs/*.py), comma-separated.")
  flags.DEFINE_list("learning_rates", [rate_name(r) for r in PAPER_RATES],
                    "Learning rates, comma-separated (default: the paper's set).")
  flags.DEFINE_string("root", None, "Folder for the runs (ROOT/<config>/lr<rate>/) and the "
                      "sweep summary.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing of the sweep's flags; --config.* overrides are passed through untouched."""
  rest, overrides = cli.split_overrides(argv[1:])
  return [*cli.parse_flags([argv[0], *rest]), *overrides]


def main(argv: list[str]) -> None:
  rest, overrides = cli.split_overrides(argv[1:])
  cli.start(rest)
  fl = flags.FLAGS
  with cli.interruptions(SweepInterrupted), cli.user_errors():
    if not fl.configs:
      raise UserError("--configs is required, e.g. --configs=configs/model_a.py,"
                      "configs/all_cnn_c.py")
    if not fl.root:
      raise UserError("--root is required (the folder for the sweep's runs)")
    summary = run_sweep(fl.configs, parse_rates(fl.learning_rates), fl.root, overrides)
  if summary["failed"]:
    print(f"error: {summary['failed']} of {len(summary['points'])} points failed (see "
          f"{os.path.join(fl.root, 'sweep.md')})", file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
  """The program (also a console command, see pyproject.toml)."""
  define_flags()
  cli.program_help(__doc__)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
