r"""Results table and learning curves of finished runs, beside the paper's numbers.

  python -m allconv_jax.tools.report --root=/tmp/allconv/sweep --out=/tmp/allconv/report
  python -m allconv_jax.tools.report --workdirs=/tmp/allconv/all_cnn_c,/tmp/allconv/model_a \
      --out=DIR
  python -m allconv_jax.tools.report --study_root=results/study_reduced --out=results/study_reduced

Writes OUT/results.md (network, dataset, rate, epochs, augmentation, preprocessing, test error,
the paper's test error and the course project's accuracy where they apply), OUT/<run>.png
(validation accuracy and training loss per epoch) and OUT/comparison.png (validation accuracy
per epoch of every run); with --study_root also OUT/study.md, a table per stage of the study.
Run folders are written relative to OUT, never as this machine's absolute paths. Every run is
read first: a damaged number in a results.json or metrics.jsonl stops the report with one line
naming the file, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from allconv_jax import cli, files, paper
from allconv_jax.errors import UserError
from allconv_jax.tools import plots, selection
from allconv_jax.tools.selection import error_pct, pct, rate_name

SKIP_DIRS = (files.CHECKPOINTS, files.CORRUPT, files.TENSORBOARD)
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
COMPARISON_PNG = "comparison.png"
STUDY_JSON = "study.json"
STUDY_MD = "study.md"
COLUMNS = ("Run", "Network", "Dataset", "LR", "Epochs", "Seed", "Augmentation", "Preprocessing",
           "Best val. acc. %", "Val. acc. %, last 20 % of epochs", "Test error %",
           "Paper test error %", "Course test acc. %")
FINDINGS = "findings.md"  # hand-written conclusions beside a report, shown at its top


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run: its label, workdir, results.json and metrics.jsonl records."""
  label: str
  workdir: str
  results: dict[str, Any]
  metrics: list[dict[str, Any]]


# ----------------------------------------------------------------------------- finding runs


def find_runs(root: str) -> list[str]:
  """Every folder at or below `root` that holds results.json, sorted."""
  if not os.path.isdir(root):
    raise UserError(f"--root {root} is not a folder")
  found = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    if files.RESULTS in names:
      found.append(os.path.abspath(folder))
  if not found:
    raise UserError(f"no runs found below {root} (no results.json; are the runs finished?)")
  return sorted(found)


def labels_for(workdirs: Sequence[str], root: str | None = None) -> list[str]:
  """Short distinct names: paths relative to `root` (or the runs' common folder)."""
  paths = [os.path.abspath(w) for w in workdirs]
  base = os.path.abspath(root) if root else (
      os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]))
  labels = []
  for p in paths:
    rel = os.path.relpath(p, base)
    labels.append(os.path.basename(p) if rel == "." else rel.replace(os.sep, "/"))
  return labels


def load_run(workdir: str, label: str) -> Run:
  """Reads a run's results.json and metrics.jsonl; UserError if either is missing or damaged
  (selection.check_results, selection.read_metrics)."""
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} does not exist")
  path = files.path(workdir, files.RESULTS)
  if not os.path.exists(path):
    raise UserError(f"{workdir} has no results.json (is the run finished?)")
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is unreadable: {e}") from None
  if not isinstance(results, dict) or "test_accuracy" not in results:
    raise UserError(f"{path} is not a run's results.json (no test_accuracy)")
  return Run(label, workdir, selection.check_results(results, path),
             selection.read_metrics(workdir))


def load_runs(workdirs: Sequence[str], root: str | None = None) -> list[Run]:
  """The runs in `workdirs`, in the paper's network order, then by label."""
  runs = [load_run(os.path.abspath(w), label)
          for w, label in zip(workdirs, labels_for(workdirs, root), strict=True)]
  return sorted(runs, key=lambda r: (paper.network_rank(r.results.get("model", "")), r.label))


# ----------------------------------------------------------------------------- the table


def comparable(results: dict[str, Any]) -> bool:
  """Whether a run follows the paper's setting closely enough to print its reference numbers.

  Real data (not synthetic), every class and image (no subset, no caps), width x1, no transfer.
  """
  data = (results.get("config") or {}).get("data", {})
  return (data.get("source") != "synthetic" and not results.get("subset")
          and not data.get("max_train_examples") and not data.get("max_test_examples")
          and float(results.get("width_multiplier", 1.0)) == 1.0
          and not results.get("transfer_source"))


def transfer_step(results: dict[str, Any]) -> str:
  """'step1' (from a source, something frozen), 'step2' (from a source) or 'scratch'."""
  if not results.get("transfer_source"):
    return "scratch"
  frozen = ((results.get("config") or {}).get("optimizer") or {}).get("freeze")
  return "step1" if frozen else "step2"


def references(results: dict[str, Any]) -> tuple[str, str]:
  """(paper test error %, course test accuracy %) as table cells; '—' where none applies.

  The course project's transfer numbers apply to real-data, width x1 runs on its CIFAR-100
  subsets class1/class2 (scratch, step 1, step 2).
  """
  data = (results.get("config") or {}).get("data", {})
  subset = results.get("subset")
  if (subset in ("class1", "class2") and results.get("dataset") == "cifar100"
      and data.get("source") != "synthetic"
      and float(results.get("width_multiplier", 1.0)) == 1.0):
    course = paper.course_transfer_accuracy(transfer_step(results), subset)
    return "—", "—" if course is None else f"{course:.2f}"
  if not comparable(results):
    return "—", "—"
  model, dataset, augment = (results.get("model", ""), results.get("dataset", ""),
                             bool(results.get("augment")))
  err = paper.paper_test_error(model, dataset, augment)
  course = paper.course_accuracy(model, dataset, augment)
  return ("—" if err is None else f"{err:.2f}"), ("—" if course is None else f"{course:.2f}")


def data_source(results: dict[str, Any]) -> str:
  """'tfds', 'local' or 'synthetic' (older results: from the embedded config)."""
  return str(results.get("data_source")
             or ((results.get("config") or {}).get("data") or {}).get("source") or "?")


def dataset_label(results: dict[str, Any]) -> str:
  """'CIFAR-10', 'CIFAR-100 (class1)', 'CIFAR-10 (synthetic)' ..."""
  label = DATASET_NAMES.get(results.get("dataset", ""), str(results.get("dataset")))
  notes = [str(results["subset"])] if results.get("subset") else []
  if data_source(results) == "synthetic":
    notes.append("synthetic")
  return label + (f" ({', '.join(notes)})" if notes else "")


def table_row(run: Run) -> list[str]:
  """One results.md row (see COLUMNS)."""
  r = run.results
  dataset = dataset_label(r)
  width = r.get("width_multiplier", 1.0)
  network = r.get("model", "?") + (f" (width x{width:g})" if width != 1.0 else "")
  paper_err, course = references(r)
  return [
      run.label, network, dataset, learning_rate(r), str(r.get("epochs", "?")),
      str((r.get("config") or {}).get("seed", "?")), "yes" if r.get("augment") else "no",
      str(r.get("preprocessing", "?")), pct(r.get("best_val_accuracy")),
      last_fifth(run.metrics), error_pct(r["test_accuracy"]), paper_err, course,
  ]


def last_fifth(records: Sequence[dict[str, Any]]) -> str:
  """'min-max' of the validation accuracy (%) over the last 20 % of the epochs (at least one):
  how settled the run ended."""
  vals = [m["val_accuracy"] for m in records if m.get("val_accuracy") is not None]
  tail = vals[-max(1, round(len(vals) / 5)):]
  return f"{pct(min(tail))}-{pct(max(tail))}" if tail else "—"


def learning_rate(results: dict[str, Any]) -> str:
  """The run's learning rate as text ('?' in results that do not record it)."""
  return f"{results['learning_rate']:g}" if "learning_rate" in results else "?"


def folder(workdir: str, out: str) -> str | None:
  """A run's folder relative to the report's folder `out`, which stays right wherever the two
  are moved together; None where they share no folder but the filesystem root (the path would
  only spell out this machine's layout)."""
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  if os.path.commonpath([workdir, out]) == os.path.abspath(os.sep):
    return None
  return os.path.relpath(workdir, out).replace(os.sep, "/")


def results_markdown(runs: Sequence[Run], pngs: dict[str, str], out: str) -> str:
  """results.md (in `out`): the table, the notes on the references and the plots."""
  findings = os.path.join(out, FINDINGS)
  lines = ["# Results", ""]
  if os.path.exists(findings):  # written by hand; the rest of this file is generated
    with open(findings) as f:
      lines += ["## Findings", "", f.read().strip(), "", "## Runs in numbers", ""]
  lines += ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
  lines += ["| " + " | ".join(table_row(run)) + " |" for run in runs]
  lines += [
      "",
      "Test error = 100 - test accuracy (%), on the test set after the last epoch. "
      "Paper: Springenberg et al. (2015), CIFAR-10 without augmentation unless the run used it "
      "(All-CNN-C with augmentation: 7.25), CIFAR-100 All-CNN-C: 33.71. "
      "Course: test accuracy of the PyTorch course project (its Tables 3 and 4: CIFAR-10, "
      f"batch {paper.COURSE_BATCH_SIZE}, mean/std normalization, no augmentation; transfer on "
      "its CIFAR-100 subsets class1/class2, whose classes it never listed). References are "
      "shown only for runs in their setting (real data, all classes and images, width x1; "
      "the transfer numbers for runs on class1/class2).",
      "", "## Validation accuracy per epoch", "", f"![comparison]({COMPARISON_PNG})", "",
      "## Runs", "", "Run folders are given relative to this file.", "",
  ]
  for run in runs:
    where = folder(run.workdir, out)
    lines += [f"### {run.label}", "", *([f"`{where}`", ""] if where else []),
              f"![{run.label}]({pngs[run.label]})", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def comparison_curves(runs: Sequence[Run]) -> list[tuple[str, list[dict[str, Any]]]]:
  """(legend label: the run's label, with its network unless the label names it, metrics)."""
  curves = []
  for run in runs:
    model = str(run.results.get("model", "?"))
    curves.append((run.label if model in run.label else f"{run.label} ({model})", run.metrics))
  return curves


def write_report(runs: Sequence[Run], out: str) -> str:
  """Writes results.md and the plots into `out`; returns the path of results.md."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out} exists and is not a folder")
  os.makedirs(out, exist_ok=True)
  pngs = plots.file_names([run.label for run in runs], taken=(COMPARISON_PNG,))
  for run in runs:
    r = run.results
    plots.plot_run(run.metrics, f"{run.label}: {r.get('model')} on {dataset_label(r)}, lr "
                   f"{learning_rate(r)}, test error {error_pct(r['test_accuracy'])} %",
                   os.path.join(out, pngs[run.label]))
  plots.plot_comparison(comparison_curves(runs), os.path.join(out, COMPARISON_PNG))
  path = os.path.join(out, "results.md")
  files.write_text(path, results_markdown(runs, pngs, out))
  return path


# ----------------------------------------------------------------------------- studies


def read_study(root: str) -> dict[str, Any]:
  """ROOT/study.json (written by allconv_jax.tools.study); UserError if missing or unreadable."""
  path = os.path.join(root, STUDY_JSON)
  try:
    with open(path) as f:
      plan = json.load(f)
    assert isinstance(plan, dict) and isinstance(plan["stages"], list)
  except (OSError, json.JSONDecodeError, AssertionError, KeyError, TypeError) as e:
    raise UserError(f"{path} is not a study plan: {e or type(e).__name__}") from None
  return plan


def stage_records(root: str, stage: dict[str, Any], network: str) -> list[dict[str, Any]]:
  """Every grid point of one config of a study stage, judged as the study judged it."""
  records = []
  for rate in stage["learning_rates"]:
    workdir = os.path.join(root, stage["name"], network, f"lr{rate_name(rate)}")
    results = selection.read_results(workdir) or {}
    record = {"network": network, "learning_rate": rate, "workdir": workdir,
              "status": "trained" if results else "missing", "epochs": results.get("epochs"),
              "best_val_accuracy": results.get("best_val_accuracy"),
              "final_val_accuracy": results.get("final_val_accuracy")}
    records.append(selection.selection_record(record, stage["select_epochs"]))
  return records


def stage_table(root: str, stage: dict[str, Any]) -> tuple[list[str], list[Run]]:
  """A stage's markdown table (validation per rate, chosen rate, results) and its winning runs."""
  rates, k = stage["learning_rates"], stage["select_epochs"]
  course = stage.get("compare") == "course_transfer"
  reference = ("Course test acc. % (class1 / class2)" if course
               else "Paper test error % (width x1, 350 epochs)")
  when = f"after epoch {k}" if k else "best epoch"
  lines = ["| Network | " + " | ".join(f"val. % {when}, lr {rate_name(r)}" for r in rates)
           + " | Chosen lr | Epochs | Best val. % | Test acc. % | Test error % | "
           + reference + " |", "|---" * (len(rates) + 7) + "|"]
  runs = []
  for network in stage["configs"]:
    records = stage_records(root, stage, network)
    winner = selection.pick_winners(records).get(network)
    cells = [pct(r["best_val_accuracy"]) if r["status"] in selection.OK_STATUSES else "—"
             for r in records]
    if winner is None:
      lines.append(f"| {network} | " + " | ".join(cells + ["—"] * 6) + " |")
      continue
    run = load_run(winner["workdir"], f"{stage['name']}/{network}")
    runs.append(run)
    r = run.results
    if course:
      step = transfer_step(r)
      ref = " / ".join(f"{paper.course_transfer_accuracy(step, s):.2f}"
                       for s in ("class1", "class2"))
    else:
      data = (r.get("config") or {}).get("data", {})
      err = None if r.get("subset") or data.get("classes") else paper.paper_test_error(
          r.get("model", ""), r.get("dataset", ""), bool(r.get("augment")))
      ref = "—" if err is None else f"{err:.2f}"
    lines.append(f"| {network} | " + " | ".join(cells + [
        rate_name(winner["learning_rate"]), str(r.get("epochs")), pct(r.get("best_val_accuracy")),
        pct(r["test_accuracy"]), error_pct(r["test_accuracy"]), ref]) + " |")
  return lines, runs


def write_study_report(root: str, out: str) -> str:
  """OUT/study.md (a table per stage), a validation plot per stage and the winners' report.
  Every run is read (and checked) before anything is written."""
  plan = read_study(root)
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out} exists and is not a folder")
  tables = [(stage, *stage_table(root, stage)) for stage in plan["stages"]]
  os.makedirs(out, exist_ok=True)
  lines = ["# Study", "",
           "Generated by `python -m allconv_jax.tools.report --study_root=ROOT --out=OUT` "
           "from the runs' files; each rate is chosen on validation accuracy, as the study ran.",
           ""]
  winners: list[Run] = []
  for stage, table, runs in tables:
    lines += [f"## {stage['name']}", "",
              f"Configs: {', '.join(stage['configs'])}; overrides: "
              f"`{' '.join(stage['overrides']) or 'none'}`.", "", *table, ""]
    if runs:
      png = f"{stage['name']}_validation.png"
      plots.plot_comparison(comparison_curves(runs), os.path.join(out, png))
      lines += [f"![{stage['name']}]({png})", ""]
    winners += runs
  if winners:
    write_report(winners, out)
    lines += ["Per-run curves of the chosen runs: [results.md](results.md).", ""]
  path = os.path.join(out, STUDY_MD)
  files.write_text(path, "\n".join(lines))
  return path


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_list("workdirs", None, "Run folders, comma-separated.")
  flags.DEFINE_string("root", None, "Find every run (folder holding results.json) below this.")
  flags.DEFINE_string("study_root", None, "A study's folder (holding study.json): its tables.")
  flags.DEFINE_string("out", None, "Folder for results.md and the plots.")


def main(argv: list[str]) -> None:
  cli.start(argv[1:])
  fl = flags.FLAGS
  with cli.user_errors():
    if (bool(fl.workdirs) + bool(fl.root) + bool(fl.study_root)) != 1:
      raise UserError("give one of --workdirs=DIR1,DIR2,..., --root=DIR or --study_root=DIR")
    if not fl.out:
      raise UserError("--out is required (the folder for results.md and the plots)")
    if fl.study_root:
      print(f"study tables: {write_study_report(fl.study_root, fl.out)}")
      return
    workdirs = fl.workdirs or find_runs(fl.root)
    if len(set(map(os.path.abspath, workdirs))) != len(workdirs):
      raise UserError("--workdirs lists a folder twice")
    runs = load_runs(workdirs, fl.root)
    path = write_report(runs, fl.out)
  print(f"{len(runs)} run(s): {path}, {COMPARISON_PNG} and {len(runs)} run plot(s) in {fl.out}")


def run() -> None:
  """The program (also a console command, see pyproject.toml)."""
  define_flags()
  cli.program_help(__doc__)
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
