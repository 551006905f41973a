"""The tools' rough edges: damaged numbers in a run's files, a config.json changed since training,
corrupt checkpoints, machine paths in the written reports, config names from any folder."""

import json
import os
import re
import subprocess
import sys

import pytest

from allconv_jax.errors import UserError
from allconv_jax.tools import evaluate, report, selection, study, sweep, visualize
from tests.helpers import ROOT, run_tool, tiny_flags

ABSOLUTE = re.compile(r"(?<![\w.])/(work|tmp|home|root|Users|private|var)/")  # a machine's path


def edit_json(path, **changes):
  """Sets top-level (or 'a__b' nested) fields of a JSON file."""
  with open(path) as f:
    data = json.load(f)
  for key, value in changes.items():
    *parents, last = key.split("__")
    node = data
    for p in parents:
      node = node[p]
    node[last] = value
  with open(path, "w") as f:
    json.dump(data, f)


def edit_metrics(workdir, epoch, **changes):
  """Changes fields of one epoch's record of a run's metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  for r in records:
    if r["epoch"] == epoch:
      r.update(changes)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def tiny_study(root, select_epochs=0):
  """A study folder holding one finished run (tiny_config: all_cnn_c at rate 0.05) and its plan;
  returns that run's folder."""
  plan = {"overrides": [], "stages": [
      {"name": "s", "configs": ["all_cnn_c"], "learning_rates": [0.05],
       "select_epochs": select_epochs, "overrides": [], "compare": "paper"}]}
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, report.STUDY_JSON), "w") as f:
    json.dump(plan, f)
  return os.path.join(root, "s", "all_cnn_c", "lr0.05")


# ----------------------------------------------------------------------------- damaged numbers


@pytest.mark.parametrize("field, value, fragment", [
    ("test_accuracy", "0.9", "results.json: test_accuracy is '0.9', not a number"),
    ("learning_rate", None, "results.json: learning_rate is None, not a number"),
    ("best_val_accuracy", [0.5], "results.json: best_val_accuracy is [0.5], not a number"),
])
def test_a_damaged_number_in_results_json_is_refused_naming_the_file(finished_run, tmp_path,
                                                                      field, value, fragment):
  run = finished_run()
  edit_json(os.path.join(run, "results.json"), **{field: value})
  with pytest.raises(UserError, match=re.escape(fragment)):
    report.load_runs([run])
  point = sweep.plan(["all_cnn_c"], [0.05], str(tmp_path / "sweep"),
                     [f for f in tiny_flags() if "learning_rate" not in f])[0]
  os.makedirs(os.path.dirname(point.workdir))
  os.rename(run, point.workdir)
  with pytest.raises(UserError, match=re.escape(fragment)):  # the sweep reads it the same way
    sweep.finished_results(point)


def test_a_damaged_number_in_metrics_jsonl_is_refused_naming_the_file(finished_run, tmp_path):
  run = tiny_study(str(tmp_path / "study"), select_epochs=1)
  finished_run(name="study/s/all_cnn_c/lr0.05")
  edit_metrics(run, 1, val_accuracy="high")
  fragment = "metrics.jsonl: epoch 1: val_accuracy is 'high', not a number"
  with pytest.raises(UserError, match=re.escape(fragment)):
    report.load_runs([run])
  with pytest.raises(UserError, match=re.escape(fragment)):  # the study's choice of a rate
    selection.selection_record({"workdir": run, "status": "trained"}, 1)
  out = tmp_path / "out"
  with pytest.raises(UserError, match=re.escape(fragment)):
    report.write_study_report(str(tmp_path / "study"), str(out))
  assert not out.exists()  # every run is read before anything is written


def test_the_report_program_refuses_a_damaged_file_in_one_line(finished_run, tmp_path):
  run = finished_run()
  edit_json(os.path.join(run, "results.json"), test_accuracy="n/a")
  out = tmp_path / "out"
  proc = run_tool("report", f"--workdirs={run}", f"--out={out}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: {run}/results.json: test_accuracy is 'n/a', not a number (a damaged or edited "
      "file: restore it from a copy or train the run again)"]
  assert not out.exists()


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("change", [{"model__width_multiplier": 0.1}, {"model__name": "model_c"},
                                    {"data__classes": "cat,dog"}])
def test_a_changed_config_json_is_named_instead_of_the_checkpoints(finished_run, tmp_path,
                                                                   change):
  run = finished_run()
  edit_json(os.path.join(run, "config.json"), **change)
  fragment = f"{run}/config.json does not match the run's checkpoints"
  with pytest.raises(UserError, match=re.escape(fragment)) as e:
    evaluate.evaluate_test_set(run, "latest", str(tmp_path / "eval"))
  assert "restore the config.json the run was trained with" in str(e.value)
  with pytest.raises(UserError, match=re.escape(fragment)):
    visualize.visualize(run, str(tmp_path / "vis"), checkpoint="best")
  assert not (tmp_path / "eval").exists() and not (tmp_path / "vis").exists()


def test_corrupt_checkpoints_advise_retraining_not_a_restart(finished_run, tmp_path):
  run = finished_run()
  for folder, _, names in os.walk(os.path.join(run, "checkpoints")):
    for name in names:
      if os.path.basename(folder) == "d":  # the arrays' data files
        with open(os.path.join(folder, name), "wb") as f:
          f.write(b"garbage")
  advice = "retrain the run or restore its checkpoints from a copy"
  with pytest.raises(UserError, match=f"no usable checkpoint in .*; {advice}") as e:
    visualize.visualize(run, str(tmp_path / "vis"))
  assert "restart" not in str(e.value)
  proc = run_tool("evaluate", f"--workdir={run}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: no usable checkpoint in "), lines
  assert advice in lines[0] and "step 8: " in lines[0]  # the oldest step's reason
  assert "restart" not in proc.stderr
  assert os.listdir(os.path.join(run, "checkpoints"))  # nothing moved aside in another's run


# ----------------------------------------------------------------------------- paths


def test_reports_and_the_study_export_write_no_machine_paths(finished_run, tmp_path):
  root = tmp_path / "root"
  tiny_study(str(root))
  finished_run(name="root/s/all_cnn_c/lr0.05")
  for out in (root, tmp_path / "elsewhere"):  # beside the runs, and in another folder
    report.write_study_report(str(root), str(out))
    for name in (report.STUDY_MD, "results.md"):
      text = (out / name).read_text()
      assert not ABSOLUTE.search(text) and str(tmp_path) not in text, text
    where = "s/all_cnn_c/lr0.05" if out == root else "../root/s/all_cnn_c/lr0.05"
    assert f"`{where}`" in (out / "results.md").read_text()
  exported = tmp_path / "exported"
  study.export(str(root), str(exported), json.loads((root / report.STUDY_JSON).read_text()))
  for name in (report.STUDY_MD, "results.md", report.STUDY_JSON):
    text = (exported / name).read_text()
    assert not ABSOLUTE.search(text) and str(tmp_path) not in text, text
  assert report.folder("/a/run", "/b/report") is None  # nothing shared but the root: no path


def test_the_study_export_names_machine_paths_and_a_fresh_machine_puts_its_own_back(
    finished_run, tmp_path):
  run = finished_run(name="first/s/all_cnn_c/lr0.05")
  data_dir = str(tmp_path / "cifar")
  plan = {"overrides": [f"--config.data.dir={data_dir}"], "stages": [
      {"name": "s", "configs": ["all_cnn_c"], "learning_rates": [0.05], "select_epochs": 0,
       "overrides": [], "compare": "paper"}]}
  edit_json(os.path.join(run, "config.json"), data__dir=data_dir)
  edit_json(os.path.join(run, "results.json"), config__data__dir=data_dir)
  command = (f"{sys.executable} {ROOT}/main.py --config={ROOT}/configs/all_cnn_c.py "
             f"--config.data.dir={data_dir} --workdir={run}")
  with open(os.path.join(run, "invocations.jsonl"), "w") as f:
    f.write(json.dumps({"command": command}) + "\n")
  out = tmp_path / "out"
  study.export(str(tmp_path / "first"), str(out), plan)
  exported = out / "s" / "all_cnn_c" / "lr0.05"
  for path in [out / report.STUDY_JSON, *exported.iterdir()]:
    text = path.read_text()
    assert not ABSOLUTE.search(text) and str(tmp_path) not in text, (path, text)
  python = os.path.basename(sys.executable)
  assert json.loads((exported / "invocations.jsonl").read_text())["command"] == (
      f"{python} REPO/main.py --config=REPO/configs/all_cnn_c.py --config.data.dir=DATA_DIR "
      "--workdir=ROOT/s/all_cnn_c/lr0.05")
  assert json.loads((exported / "config.json").read_text())["data"]["dir"] == "DATA_DIR"

  # Another machine: its own root and data folder go back in, so the run counts as finished.
  second, other_data = tmp_path / "second", str(tmp_path / "data")
  plan["overrides"] = [f"--config.data.dir={other_data}"]
  assert study.restore(str(out), str(second), plan) == 1
  restored = second / "s" / "all_cnn_c" / "lr0.05"
  assert json.loads((restored / "config.json").read_text())["data"]["dir"] == other_data
  assert json.loads((restored / "results.json").read_text())["config"]["data"]["dir"] == other_data
  assert json.loads((restored / "invocations.jsonl").read_text())["command"].endswith(
      f"--config.data.dir={other_data} --workdir={restored}")
  point = sweep.plan(["all_cnn_c"], [0.05], str(second / "s"),
                     [*(f for f in tiny_flags(num_epochs=1) if "learning_rate=" not in f),
                      f"--config.data.dir={other_data}"])[0]
  assert point.workdir == str(restored) and sweep.finished_results(point) is not None


def test_the_committed_results_hold_no_machine_path():
  """Run files and reports under results/ (its READMEs give example commands, PNGs are images)."""
  checked = 0
  for folder, _, names in os.walk(os.path.join(ROOT, "results")):
    for name in names:
      if name == "README.md" or name.endswith(".png"):
        continue
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        match = ABSOLUTE.search(f.read())
      assert match is None, (os.path.join(folder, name), match)
      checked += 1
  assert checked > 100


# ----------------------------------------------------------------------------- any folder


def test_config_and_study_names_resolve_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  stages = study.load_study("study_reduced")
  assert stages[0].name == "transfer_source" and study.stem("all_cnn_c") == "all_cnn_c"
  study.plan_all(stages[:1], str(tmp_path / "root"), ["--config.data.source=synthetic"])
  points = sweep.plan(["all_cnn_c", "configs/model_a.py", os.path.join(ROOT, "configs",
                                                                          "model_b.py")],
                      [0.05], "sweep", [])
  assert [p.network for p in points] == ["all_cnn_c", "model_a", "model_b"]
  assert all(os.path.isabs(p.config_file) and os.path.isfile(p.config_file) for p in points)
  assert points[0].workdir == str(tmp_path / "sweep" / "all_cnn_c" / "lr0.05")
  # main.py, started by the sweep from this folder, imports this code.
  monkeypatch.delenv("PYTHONPATH", raising=False)
  proc = subprocess.run([sys.executable, "-c", "import allconv_jax, os; "
                         "print(os.path.dirname(os.path.dirname(allconv_jax.__file__)))"],
                        cwd=tmp_path, env=sweep.child_env(), capture_output=True, text=True,
                        check=False, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == ROOT, proc.stderr


def test_a_study_on_a_fresh_machine_starts_from_the_runs_exported_to_out(tmp_path):
  out, root = tmp_path / "out", tmp_path / "root"
  run = out / "stage" / "all_cnn_c" / "lr0.01"
  run.mkdir(parents=True)
  for name in ("config.json", "results.json", "metrics.jsonl", "sweep.log"):
    (run / name).write_text(f"{name}\n")
  (out / "stage" / "all_cnn_c" / "lr0.05").mkdir()  # no results.json: not a finished run
  (out / "study.md").write_text("report\n")
  assert study.copy_runs(str(out), str(root), only_missing=True) == 1
  copied = root / "stage" / "all_cnn_c" / "lr0.01"
  assert sorted(os.listdir(copied)) == ["config.json", "metrics.jsonl", "results.json",
                                        "sweep.log"]
  assert not (root / "stage" / "all_cnn_c" / "lr0.05").exists()
  assert not (root / "study.md").exists()
  (copied / "results.json").write_text("newer\n")  # the run in ROOT wins from now on
  assert study.copy_runs(str(out), str(root), only_missing=True) == 0
  assert (copied / "results.json").read_text() == "newer\n"
