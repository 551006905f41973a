"""The study command: the study files (plain data), planning, and a tiny study end to end with
an interruption (Ctrl-C reaches the study and its running main.py; the same command goes on)."""

import ast
import dataclasses
import os
import signal
import subprocess
import sys

import pytest

from allconv_jax import files
from allconv_jax.errors import UserError
from allconv_jax.tools import report, study, sweep
from allconv_jax.tools.invocations import INVOCATIONS
from tests.helpers import ROOT, tiny_flags

STUDY_FILE = os.path.join(ROOT, "configs", "study_reduced.py")

# A tiny study: a source net whose rate is chosen after 1 of 2 epochs, then a transfer step
# from the winner. Plain data, as every study file.
TINY_STUDY = '''
def get_study():
  return [
      {"name": "source", "configs": ("all_cnn_c",), "learning_rates": (0.05, 0.02),
       "select_epochs": 1,
       "overrides": ("--config.num_epochs=2", "--config.optimizer.boundaries=(1.5,)",
                     "--config.data.classes=airplane,automobile,bird")},
      {"name": "step1", "configs": ("transfer_step1",), "learning_rates": (0.05,),
       "overrides": ("--config.transfer.source={winner:source}", "--config.num_epochs=1",
                     "--config.data.dataset=cifar10", "--config.data.subset=",
                     "--config.data.classes=dog,frog,horse",
                     "--config.data.max_train_per_class=40", "--config.data.validation_size=32"),
       "compare": "course_transfer"},
  ]
'''


def test_the_reduced_study_plans_every_run(tmp_path):
  for variant in ("", ":cifar100"):
    stages = study.load_study(STUDY_FILE + variant)
    assert [s.name for s in stages] == ["transfer_source", "step1", "step2", "scratch",
                                        "step1_no_final_relu", "step2_no_final_relu", "cifar10"]
    study.plan_all(stages, str(tmp_path), ["--config.data.source=synthetic"])
  cifar10 = stages[-1]
  assert len(cifar10.configs) == 12 and cifar10.select_epochs < 200 / 350 * 6
  grid = sweep.plan(cifar10.configs[:1], cifar10.learning_rates, str(tmp_path),
                    cifar10.overrides)
  opt = grid[0].config.optimizer
  assert [b / grid[0].config.num_epochs for b in opt.boundaries] == pytest.approx(
      [200 / 350, 250 / 350, 300 / 350])
  with open(STUDY_FILE) as f:
    assert "python -m allconv_jax.tools.study --study=configs/study_reduced.py" in f.read()
  assert not os.listdir(tmp_path)  # planning writes nothing


@pytest.mark.parametrize("name", ["study_reduced", "study_converged"])
def test_study_files_are_plain_data(name):
  """A study file returns dicts of Stage's fields and imports none of the tools."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  with open(path) as f:
    source = f.read()
  imported = [f"{n.module}.{a.name}" if isinstance(n, ast.ImportFrom) else a.name
              for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import | ast.ImportFrom)
              for a in n.names]
  assert imported and not any(m.startswith("allconv_jax.tools") for m in imported), imported
  namespace = {}
  exec(compile(source, path, "exec"), namespace)  # noqa: S102 - our own config file
  stages = namespace["get_study"]()
  fields = {f.name for f in dataclasses.fields(study.Stage)}
  assert stages and all(type(s) is dict and set(s) <= fields for s in stages)
  assert [s.name for s in study.load_study(name)] == [s["name"] for s in stages]


@pytest.mark.parametrize("text, fragment", [
    ("def get_study():\n  return []\n", "non-empty list"),
    ("def get_study():\n  return [{'name': 'a', 'configs': ('all_cnn_c',), 'learning_rates': "
     "(0.1,), 'overrides': ('--config.transfer.source={winner:b}',)}]\n",
     "names no earlier stage"),
    ("def get_study():\n  return [{'name': 'a', 'configs': ('all_cnn_c',)}]\n",
     "TypeError: "),  # a stage without its rates
    ("def get_study():\n  return [{'name': 'a', 'configs': ('all_cnn_c',), 'learning_rates': "
     "(0.1, 0.1)}]\n", "lists 0.1 twice"),
    ("def get_study():\n  raise ValueError('nope')\n", "ValueError: nope"),
])
def test_bad_study_files_are_one_line(tmp_path, text, fragment):
  path = tmp_path / "s.py"
  path.write_text(text)
  with pytest.raises(UserError, match=fragment) as e:
    study.load_study(str(path))
  assert "\n" not in str(e.value)


def run_study(root, out, study_file, stop_after=None):
  """Runs the study as a program; with `stop_after`, sends it SIGINT (Ctrl-C) once that text is
  printed. (exit status, output)."""
  common = [f for f in tiny_flags() if not f.startswith(("--config.num_epochs=",
                                                         "--config.optimizer.learning_rate="))]
  cmd = [sys.executable, "-m", "allconv_jax.tools.study", f"--study={study_file}",
         f"--root={root}", f"--out={out}", *common]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if stop_after and stop_after in line:
        proc.send_signal(signal.SIGINT)
        stop_after = None
    return proc.wait(timeout=600), "".join(lines)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow
def test_a_tiny_study_end_to_end_with_an_interruption(tmp_path):
  study_file = tmp_path / "tiny_study.py"
  study_file.write_text(TINY_STUDY)
  root, out = tmp_path / "root", tmp_path / "out"
  code, text = run_study(root, out, study_file, stop_after="[all_cnn_c lr0.02] epoch 1/1 step 4/")
  assert code == 130, text
  assert text.splitlines()[-1].startswith("interrupted: stopped in stage source"), text
  first = root / "source" / "all_cnn_c" / "lr0.05"
  assert files.read_results(str(first))["epochs"] == 1
  assert files.read_results(str(root / "source" / "all_cnn_c" / "lr0.02")) is None
  assert files.checkpoint_steps(str(root / "source" / "all_cnn_c" / "lr0.02"))  # saved, stopped

  code, text = run_study(root, out, study_file)
  assert code == 0, text
  assert "[source 1/2] all_cnn_c lr 0.05: skipped, finished" in text  # not redone
  assert "resuming from checkpoint step" in text  # the interrupted point goes on
  chosen = [line for line in text.splitlines() if "chosen after epoch 1" in line]
  assert len(chosen) == 1
  rate = chosen[0].split(" lr ")[1].split()[0]
  winner = root / "source" / "all_cnn_c" / f"lr{rate}"
  assert files.read_results(str(winner))["epochs"] == 2
  step1 = files.read_results(str(root / "step1" / "transfer_step1" / "lr0.05"))
  assert step1["transfer_source"] == str(winner) and step1["epochs"] == 1

  # Exported: each run's small files, no checkpoints; the report regenerates the same tables.
  for run in ("source/all_cnn_c/lr0.05", "source/all_cnn_c/lr0.02",
              "step1/transfer_step1/lr0.05"):
    names = set(os.listdir(out / run))
    assert {"config.json", "results.json", "metrics.jsonl", INVOCATIONS} <= names
    assert "checkpoints" not in names and "preprocessing.npz" not in names
  with open(out / "source" / "all_cnn_c" / "lr0.05" / INVOCATIONS) as f:
    records = [line for line in f if line.strip()]
  assert len(records) == 1 + (rate == "0.05")  # run once (and continued if it won)
  table = (out / report.STUDY_MD).read_text()
  assert "| all_cnn_c | " in table and f"| {rate} | 2 |" in table
  regenerated = tmp_path / "again"
  report.write_study_report(str(out), str(regenerated))
  assert (regenerated / report.STUDY_MD).read_text() == table
