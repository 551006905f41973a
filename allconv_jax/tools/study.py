r"""Studies: named sets of runs, each network's rate chosen on validation, run to completion.

  python -m allconv_jax.tools.study --study=configs/study_reduced.py --root=/tmp/allconv/study \
      --out=results/reduced [--config.data.source=local --config.data.dir=/tmp/cifar ...]

A study file defines `get_study(arg)` returning its stages as plain data: a list of dicts with
the fields of `Stage` (`--study=FILE:ARG` passes ARG). Each stage runs its configs one after
another, each at every rate of its grid (the sweep's points, ROOT/<stage>/<config>/lr<rate>/);
with `select_epochs=K` the grid runs K epochs, the
rate with the best validation accuracy in those epochs wins and only its run goes on to the
config's full num_epochs (the same run continued: the schedule is the same as a straight run);
without it every point runs in full and the best one wins. A stage's overrides may name an
earlier stage's winning run as `{winner:STAGE}` (or `{winner:STAGE/CONFIG}`). Overrides given on
the command line apply to every run.

Stopping (Ctrl-C) and running the same command again continues where it stopped; finished runs
are not redone, also on a fresh machine: the finished runs exported to OUT are copied back
into ROOT first (without checkpoints). After each run the small files of every finished run
(config.json, results.json, metrics.jsonl, sweep.log, invocations.jsonl: command, git commit,
machine, wall time) are copied to OUT/<stage>/<config>/lr<rate>/, with OUT/study.json (the
plan) and the report (`report.write_study_report`: study.md, results.md, curve PNGs)
regenerated from them. OUT names this machine's paths instead of giving them: ROOT, REPO (this
code), python3, and an override's path by its key (--config.data.dir=/x: DATA_DIR); copying
back into ROOT puts this machine's paths in again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from allconv_jax import cli, files
from allconv_jax.errors import UserError
from allconv_jax.tools import report, sweep
from allconv_jax.tools.invocations import INVOCATIONS
from allconv_jax.tools.selection import OK_STATUSES, pick_winners, rate_name, selection_record

STUDY_JSON = report.STUDY_JSON
EXPORTED_FILES = (files.CONFIG, files.RESULTS, files.METRICS, "sweep.log", INVOCATIONS)
COMPARES = ("paper", "course_transfer")
WINNER = re.compile(r"\{winner:([A-Za-z0-9_.-]+)(?:/([A-Za-z0-9_.-]+))?\}")


@dataclasses.dataclass(frozen=True)
class Stage:
  """A group of configs, each run at every rate of a grid; the best rate per config wins."""
  name: str
  configs: tuple[str, ...]  # config files, or names in configs/ ('all_cnn_c')
  learning_rates: tuple[float, ...]
  select_epochs: int = 0  # choose the rate after this many epochs (0: after full runs)
  overrides: tuple[str, ...] = ()  # --config.a.b=v flags; may use {winner:STAGE[/CONFIG]}
  compare: str = "paper"  # the reference column of the report: 'paper' or 'course_transfer'


@dataclasses.dataclass
class Outcome:
  """A stage's winners (config stem -> the winning run's final point record) and failures."""
  winners: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
  failed: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- the study file


def load_study(spec: str) -> list[Stage]:
  """The stages of `--study=FILE[:ARG]`, checked; UserError if the file or a stage is bad."""
  path, _, arg = cli.resolve_config(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location("allconv_study_file", path)
  assert module_spec is not None and module_spec.loader is not None
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    stages = module.get_study(arg) if arg else module.get_study()
    stages = [Stage(**s) if isinstance(s, dict) else s for s in stages]
  except Exception as e:  # noqa: BLE001 - a study file is user code; its error becomes one line
    raise UserError(f"{path}: {type(e).__name__}: {e}") from None
  check_stages(stages, path)
  return list(stages)


def check_stages(stages: Sequence[Stage], path: str) -> None:
  """Unique stage names, known compare modes, rates and winner references to earlier stages."""
  if not stages or not all(isinstance(s, Stage) for s in stages):
    raise UserError(f"{path}: get_study() must return a non-empty list of study.Stage")
  seen: dict[str, Stage] = {}
  for stage in stages:
    where = f"{path}: stage {stage.name!r}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", stage.name) or stage.name in seen:
      raise UserError(f"{where}: stage names must be unique words (letters, digits, _ . -)")
    if stage.compare not in COMPARES or not stage.configs or stage.select_epochs < 0:
      raise UserError(f"{where}: needs configs, select_epochs >= 0 and compare in {COMPARES}")
    sweep.parse_rates([str(r) for r in stage.learning_rates])
    for match in WINNER.finditer(" ".join(stage.overrides)):
      earlier = seen.get(match.group(1))
      if earlier is None:
        raise UserError(f"{where}: {match.group(0)} names no earlier stage")
      if match.group(2) is None and len(earlier.configs) != 1:
        raise UserError(f"{where}: {match.group(0)}: stage {earlier.name!r} has several configs; "
                        "write {winner:STAGE/CONFIG}")
    seen[stage.name] = stage


# ----------------------------------------------------------------------------- planning


def stem(config: str) -> str:
  """A config's name in folder names: its file stem."""
  return os.path.splitext(os.path.basename(cli.resolve_config(config)))[0]


def resolve(stage: Stage, outcomes: dict[str, Outcome]) -> tuple[str, ...]:
  """The stage's overrides with {winner:...} replaced by the winning runs' workdirs."""
  def winner(match: re.Match[str]) -> str:
    won = outcomes[match.group(1)].winners
    name = match.group(2) or next(iter(won), "")
    if name not in won:
      raise UserError(f"stage {stage.name!r}: {match.group(0)} has no finished run")
    return won[name]["workdir"]

  return tuple(WINNER.sub(winner, o) for o in stage.overrides)


def plan_all(stages: Sequence[Stage], root: str, overrides: Sequence[str]) -> None:
  """Loads and checks every run's config before anything runs (winners as placeholder paths)."""
  for stage in stages:
    stage_flags = [WINNER.sub(lambda m: os.path.join(root, m.group(1)), o)
                   for o in stage.overrides]
    sweep.plan(stage.configs, stage.learning_rates, os.path.join(root, stage.name),
               [*stage_flags, *overrides, *epochs_flag(stage.select_epochs)])


def epochs_flag(epochs: int) -> tuple[str, ...]:
  """The override that stops a grid point after the selection epochs (none for 0)."""
  return (f"--config.num_epochs={epochs}",) if epochs else ()


# ----------------------------------------------------------------------------- running


def run_config(stage: Stage, config: str, root: str, flags_: Sequence[str],
               child: Any, echo: Callable[[str], None]) -> dict[str, Any] | None:
  """The grid of one config, the choice of rate and the winner's full run: its final record."""
  stage_root = os.path.join(root, stage.name)
  grid = sweep.plan([config], stage.learning_rates, stage_root,
                    [*flags_, *epochs_flag(stage.select_epochs)])
  records = []
  for i, point in enumerate(grid, 1):
    rate = rate_name(point.learning_rate)
    head = f"[{stage.name} {i}/{len(grid)}] {point.network} lr {rate}"
    records.append(sweep.execute(point, child, echo, head))
    if child.stopped:
      raise sweep.SweepInterrupted(f"stopped in stage {stage.name}; run the same command to go on")
  chosen = pick_winners([selection_record(r, stage.select_epochs) for r in records])
  best = chosen.get(grid[0].network)
  if best is None:
    return None
  if not stage.select_epochs:
    return next(r for r in records if r["workdir"] == best["workdir"])
  final = sweep.plan([config], [best["learning_rate"]], stage_root, flags_)[0]
  echo(f"[{stage.name}] {final.network}: lr {rate_name(final.learning_rate)} chosen "
       f"after epoch {stage.select_epochs}; running it to epoch {final.config.num_epochs}")
  record = sweep.execute(final, child, echo, f"[{stage.name}] {final.network} full run")
  if child.stopped:
    raise sweep.SweepInterrupted(f"stopped in stage {stage.name}; run the same command to go on")
  return record if record["status"] in OK_STATUSES else None


def run_stage(stage: Stage, root: str, overrides: Sequence[str], outcomes: dict[str, Outcome],
              child: Any, echo: Callable[[str], None], after_run: Callable[[], None]) -> Outcome:
  """Every config of a stage; a config without a finished run is recorded as failed."""
  outcome = Outcome()
  try:
    flags_ = [*resolve(stage, outcomes), *overrides]
  except UserError as e:
    echo(f"[{stage.name}] skipped: {e}")
    outcome.failed = [stem(c) for c in stage.configs]
    return outcome
  for config in stage.configs:
    record = run_config(stage, config, root, flags_, child, echo)
    if record is None:
      outcome.failed.append(stem(config))
      echo(f"[{stage.name}] {stem(config)}: no finished run")
    else:
      outcome.winners[stem(config)] = record
    after_run()
  return outcome


def plan_json(stages: Sequence[Stage], overrides: Sequence[str]) -> dict[str, Any]:
  """study.json: the stages as data (the report recomputes every choice from the runs)."""
  return {"overrides": list(overrides), "stages": [
      {**dataclasses.asdict(s), "configs": [stem(c) for c in s.configs]} for s in stages]}


def machine_paths(root: str, plan: dict[str, Any]) -> list[tuple[str, str]]:
  """(this machine's path, the name OUT gives it): the study root ('ROOT'), this code ('REPO'),
  the Python ('python3') and each absolute path given as an override ('--config.data.dir=/x':
  'DATA_DIR'); the longest first, so that a path inside another keeps its own name."""
  names = {os.path.abspath(root): "ROOT", cli.REPO_ROOT: "REPO",
           sys.executable: os.path.basename(sys.executable)}
  for flag in [*plan["overrides"], *(f for s in plan["stages"] for f in s["overrides"])]:
    key, _, value = flag.partition("=")
    if os.path.isabs(value) and not WINNER.search(value):
      names.setdefault(os.path.normpath(value),
                       key.removeprefix("--config.").replace(".", "_").upper())
  return sorted(names.items(), key=lambda pair: -len(pair[0]))


def replace_paths(text: str, pairs: Sequence[tuple[str, str]]) -> str:
  """`text` with each whole path (or name) `old` of `pairs` replaced by `new`, in order."""
  for old, new in pairs:
    text = re.sub(rf"(?<![\w./-]){re.escape(old)}(?![\w.-])", lambda _, n=new: n, text)
  return text


def copy_runs(source: str, target: str, only_missing: bool = False,
              paths: Sequence[tuple[str, str]] = ()) -> int:
  """Copies the small files of every finished run (a folder holding results.json) below
  `source` to the same place below `target` (with only_missing, only runs `target` lacks),
  replacing `paths` (see replace_paths) in them; returns how many runs were copied."""
  copied = 0
  for folder, dirs, names in os.walk(source):
    dirs[:] = sorted(d for d in dirs if d not in report.SKIP_DIRS)
    destination = os.path.join(target, os.path.relpath(folder, source))
    if files.RESULTS not in names or (
        only_missing and os.path.exists(os.path.join(destination, files.RESULTS))):
      continue
    os.makedirs(destination, exist_ok=True)
    for name in EXPORTED_FILES:
      if name in names:
        with open(os.path.join(folder, name), "rb") as f:
          text = replace_paths(f.read().decode("utf-8", "surrogateescape"), paths)
        data = text.encode("utf-8", "surrogateescape")
        files.write_atomic(os.path.join(destination, name), lambda f, d=data: f.write(d),
                           binary=True)
    copied += 1
  return copied


def export(root: str, out: str, plan: dict[str, Any]) -> None:
  """Copies every finished run's small files to OUT (same layout, this machine's paths by
  name: machine_paths) and regenerates the report."""
  paths = machine_paths(root, plan)
  copy_runs(root, out, paths=paths)
  files.write_text(os.path.join(out, STUDY_JSON),
                   replace_paths(json.dumps(plan, indent=2) + "\n", paths))
  report.write_study_report(out, out)


def restore(out: str, root: str, plan: dict[str, Any]) -> int:
  """Copies the finished runs exported to OUT that ROOT lacks into ROOT, with this machine's
  paths put back in; returns how many."""
  return copy_runs(out, root, only_missing=True,
                   paths=[(name, path) for path, name in machine_paths(root, plan)])


def run_study(stages: Sequence[Stage], root: str, overrides: Sequence[str] = (),
              out: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Outcome]:
  """Runs every stage in order; exports after each run if `out` is given."""
  sweep.check_overrides(overrides)
  for path, name in ((root, "--root"), (out, "--out")):
    if path and os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f"{name} {path} exists and is not a folder")
  root = os.path.abspath(root)
  plan_all(stages, root, overrides)
  plan = plan_json(stages, overrides)
  os.makedirs(root, exist_ok=True)
  files.write_json(os.path.join(root, STUDY_JSON), plan)
  if out and os.path.isdir(out):  # a fresh machine: OUT (committed) knows the finished runs
    restored = restore(out, root, plan)
    if restored:
      echo(f"restored {restored} finished run(s) from {out} into {root} (without checkpoints: "
           "a stage that starts from one of them trains it again)")
  outcomes: dict[str, Outcome] = {}

  def after_run() -> None:
    if out:
      export(root, out, plan)

  with sweep.forward_signals() as child:
    for stage in stages:
      outcomes[stage.name] = run_stage(stage, root, overrides, outcomes, child, echo, after_run)
  if out:
    echo(f"study report: {os.path.join(out, report.STUDY_MD)}")
  return outcomes


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("study", None, "Study file (configs/study_*.py), optionally FILE:ARG.")
  flags.DEFINE_string("root", None, "Folder for the runs (ROOT/<stage>/<config>/lr<rate>/).")
  flags.DEFINE_string("out", None, "Folder for the runs' small files and the report "
                      "(e.g. results/<study>); none: no export.")


def main(argv: list[str]) -> None:
  rest, overrides = cli.split_overrides(argv[1:])
  cli.start(rest)
  fl = flags.FLAGS
  with cli.interruptions(sweep.SweepInterrupted), cli.user_errors():
    if not fl.study or not fl.root:
      raise UserError("--study and --root are required, e.g. --study=configs/study_reduced.py "
                      "--root=/tmp/allconv/study")
    outcomes = run_study(load_study(fl.study), fl.root, overrides, fl.out)
  failed = [f"{name}/{c}" for name, o in outcomes.items() for c in o.failed]
  if failed:
    print(f"error: no finished run for {', '.join(failed)}", file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
  """The program (also the `allconv-study` command)."""
  define_flags()
  cli.program_help(__doc__)
  app.run(main, flags_parser=sweep.parse_flags)


if __name__ == "__main__":
  run()
