"""The learning-rate sweep: its points run as `python -m allconv_jax.launch` processes, finished
points skipped, winners picked on validation accuracy, failed points, its plan's one-line errors."""

import json
import os

import pytest

from allconv_jax import cli, files
from allconv_jax import config as config_lib
from allconv_jax.errors import UserError
from allconv_jax.tools import invocations, selection, sweep
from tests import helpers
from tests.tool_helpers import ALL_CNN_C, run_sweep, sweep_flags

# One worker for the three results-tools files (sweep, report, evaluate/visualize): they
# share conftest.py's `swept` and `model_a_run`; among the longest (scheduled first).
pytestmark = [pytest.mark.xdist_group("results_tools")]


@pytest.mark.slow
def test_sweep_trains_a_point_and_picks_its_rate(swept):
  root, summary, out = swept
  workdir = os.path.join(root, "all_cnn_c", "lr0.05")
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert res["epochs"] == 2 and res["learning_rate"] == 0.05
  assert "running main.py" in out and "[all_cnn_c lr0.05] epoch 2" in out
  with open(os.path.join(workdir, "sweep.log")) as f:
    assert "epoch 2" in f.read()
  with open(os.path.join(workdir, invocations.INVOCATIONS)) as f:
    (record,) = [json.loads(line) for line in f]
  assert record["returncode"] == 0 and " -m allconv_jax.launch --config=" in record["command"]
  assert summary["points"][0]["status"] == "trained" and summary["failed"] == 0
  with open(os.path.join(root, "sweep.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary["winners"]["all_cnn_c"]["learning_rate"] == 0.05
  assert summary["winners"]["all_cnn_c"]["best_val_accuracy"] == res["best_val_accuracy"]
  with open(os.path.join(root, "sweep.md")) as f:
    text = f.read()
  assert "| all_cnn_c |" in text and text.strip() in out


@pytest.mark.slow
def test_sweep_skips_a_finished_run(swept):
  root, first, _ = swept
  assert first["points"][0]["status"] == "trained"
  metrics_path = os.path.join(root, "all_cnn_c", "lr0.05", "metrics.jsonl")
  with open(metrics_path) as f:
    before = f.read()
  mtime = os.path.getmtime(metrics_path)
  summary, out = run_sweep(["all_cnn_c"], [0.05], root, sweep_flags())  # a bare config name
  assert "skipped, finished" in out and "running main.py" not in out
  with open(metrics_path) as f:
    assert f.read() == before
  assert os.path.getmtime(metrics_path) == mtime
  assert summary["points"][0]["status"] == "skipped"
  with open(os.path.join(root, "sweep.json")) as f:
    assert json.load(f)["points"][0]["status"] == "skipped"


def fake_point(root, rate, best_val, final_val, test_acc, **config_changes):
  """A finished run's files for configs/all_cnn_c.py (tiny flags) at `rate`, without training."""
  config = cli.config_from_file(ALL_CNN_C, (f"--config.optimizer.learning_rate={rate}",
                                            *sweep_flags()))
  saved = config_lib.to_json(config)
  for key, value in config_changes.items():
    section, name = key.split("__")
    saved[section][name] = value
  workdir = os.path.join(root, "all_cnn_c", f"lr{selection.rate_name(rate)}")
  files.write_json(os.path.join(workdir, "config.json"), saved)
  files.write_json(os.path.join(workdir, "results.json"), {
      "model": "all_cnn_c", "dataset": "cifar10", "epochs": config.num_epochs,
      "learning_rate": rate, "best_val_accuracy": best_val, "best_epoch": 2,
      "final_val_accuracy": final_val, "test_accuracy": test_acc, "test_loss": 1.0,
      "config": saved})


@pytest.mark.slow
def test_sweep_program_winner_on_validation_and_a_failed_point(tmp_path):
  """The sweep as a program: three finished points are skipped, the fourth (another run in its
  folder) fails in its main.py; the winner is chosen on validation, not test, accuracy; the
  exit status is 1 with one error line."""
  root = str(tmp_path)
  fake_point(root, 0.25, 0.30, 0.30, 0.90)
  fake_point(root, 0.1, 0.60, 0.55, 0.20)  # best validation accuracy, worst test accuracy
  fake_point(root, 0.05, 0.50, 0.50, 0.95)
  fake_point(root, 0.01, 0.99, 0.99, 0.99, model__width_multiplier=0.5)  # another run: fails
  proc = helpers.run_tool("sweep", "--configs=all_cnn_c", "--learning_rates=0.25,0.1,0.05,0.01",
                          f"--root={root}", *sweep_flags())
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stdout.count("skipped, finished") == 3
  assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 4 points failed")
  with open(os.path.join(root, "sweep.json")) as f:
    summary = json.load(f)
  assert [p["status"] for p in summary["points"]] == ["skipped", "skipped", "skipped", "failed"]
  assert "another model.width_multiplier" in summary["points"][3]["error"]
  assert summary["winners"]["all_cnn_c"]["learning_rate"] == 0.1
  assert summary["failed"] == 1
  with open(os.path.join(root, "sweep.md")) as f:
    text = f.read()
  assert "| all_cnn_c | 30.00 | **60.00** | 50.00 | failed | 0.1 | 80.00 |" in text
  assert "all_cnn_c lr 0.01: " in text


def test_pick_winners_ties_and_unfinished():
  def rec(net, rate, status, best, final=None):
    return {"network": net, "learning_rate": rate, "status": status, "best_val_accuracy": best,
            "final_val_accuracy": final}

  winners = selection.pick_winners([
      rec("a", 0.25, "failed", None), rec("a", 0.1, "skipped", 0.7, 0.6),
      rec("a", 0.05, "trained", 0.7, 0.65), rec("a", 0.01, "trained", 0.7, 0.65),
      rec("b", 0.1, "failed", None), rec("c", 0.1, "trained", None)])
  assert winners["a"]["learning_rate"] == 0.05  # tie on best -> final -> first listed
  assert winners["b"] is None and winners["c"] is None


def test_sweep_user_errors(tmp_path):
  assert selection.rate_name(0.05) == "0.05" and selection.rate_name(1e-5) == "1e-05"
  with pytest.raises(UserError, match="twice"):
    sweep.parse_rates(["0.1", "0.10"])
  with pytest.raises(UserError, match="positive"):
    sweep.parse_rates(["-1"])
  with pytest.raises(UserError, match="use --learning_rates"):
    sweep.plan([ALL_CNN_C], [0.1], str(tmp_path), ["--config.optimizer.learning_rate=0.2"])
  with pytest.raises(UserError, match="unknown config key 'model.nope'"):
    sweep.plan([ALL_CNN_C], [0.1], str(tmp_path), ["--config.model.nope=1"])
  with pytest.raises(UserError, match="not found"):
    sweep.plan(["configs/nope.py"], [0.1], str(tmp_path), [])
  with pytest.raises(UserError, match="num_epochs"):
    sweep.plan([ALL_CNN_C], [0.1], str(tmp_path), ["--config.num_epochs=0"])
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="exists and is not a folder"):
    sweep.run_sweep([ALL_CNN_C], [0.1], str(tmp_path / "file"), sweep_flags())
  assert os.listdir(tmp_path) == ["file"]  # nothing planned was written
