"""benchmarks/accelerator.py, the accelerator machine's one command: its dry run on the CPU as
real processes (timing, a SIGTERM, the pack, the resume from the carried files), the deadline,
the preflight's one line, and the limits on what OUT may hold."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import accelerator
from tests import cifar_fixtures, helpers

SCRIPT = os.path.join(helpers.ROOT, "benchmarks", "accelerator.py")


def command(tmp_path, *extra: str) -> list[str]:
  """The dry run's command line, its folders under tmp_path."""
  return [sys.executable, SCRIPT, "--dry_run", f"--data_dir={tmp_path / 'data'}",
          f"--out={tmp_path / 'out'}", f"--workroot={tmp_path / 'work'}",
          f"--resume_from={tmp_path / 'carry'}", *extra]


def out_files(folder) -> set[str]:
  """The files under OUT, checked against what the device tool returns: at most 8 files, of
  at most 16 MiB each and 64 MiB in all, at most 2 folders deep."""
  paths = [os.path.join(root, n) for root, _, names in os.walk(folder) for n in names]
  sizes = [os.path.getsize(p) for p in paths]
  assert len(paths) <= 8 and max(sizes) <= 16 * 2**20 and sum(sizes) <= 64 * 2**20, sizes
  names = {os.path.relpath(p, folder) for p in paths}
  assert all(n.count(os.sep) <= 2 for n in names), names
  return names


def epochs(path) -> list[int]:
  return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_dry_run_stops_packs_and_resumes(tmp_path) -> None:
  """The script on the CPU: it times both dtypes, trains until SIGTERM, packs what a resume
  needs under OUT and exits 130; with the workroot gone (a fresh machine) the same command,
  given the files that came back, reuses the timing, resumes from the pack and finishes the run.
  The XLA cache (the suite's, in the environment) lies outside the workroot, so the resumed
  trainer does not compile again."""
  cifar_fixtures.make_cifar10(tmp_path / "data", "python", n_train=300, n_test=100)
  proc = subprocess.Popen(command(tmp_path, "--epochs=10"), cwd=helpers.ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "work" / "dry_run" / "metrics.jsonl"
  give_up = time.monotonic() + 600
  while proc.poll() is None and time.monotonic() < give_up and not (
      metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)  # once the run has recorded an epoch
  stdout, stderr = proc.communicate(timeout=120)
  log = (tmp_path / "out" / "accelerator.log").read_text()
  assert proc.returncode == 130, stdout + stderr + log[-3000:]
  assert out_files(tmp_path / "out") == {"accelerator.log", "timing.json", "metrics.jsonl",
                                         "workdir.tar"}
  state = json.loads((tmp_path / "out" / "timing.json").read_text())
  assert state["mode"] == "dry_run" and state["device"]["platform"] == "cpu"
  assert [r["dtype"] for r in state["timing"]["jax"]] == ["float32", "bfloat16"]
  assert all(r["images_per_sec"] > 0 and r["compile_sec"] >= 0 for r in state["timing"]["jax"])
  (run,) = state["runs"]
  assert (run["status"], run["stop"], run["exit_code"]) == ("stopped", "signal", 130)
  stopped_at = run["epochs_after"]
  assert 1 <= stopped_at < 10 and epochs(tmp_path / "out" / "metrics.jsonl") == list(
      range(1, stopped_at + 1))
  with tarfile.open(tmp_path / "out" / "workdir.tar") as tar:
    names = tar.getnames()
  assert {"config.json", "metrics.jsonl"} <= set(names) and "preprocessing.npz" not in names
  (step,) = {n.split("/")[1] for n in names if n.startswith("checkpoints/")}  # the newest only

  shutil.rmtree(tmp_path / "work")
  shutil.copytree(tmp_path / "out", tmp_path / "carry")
  again = helpers.run(command(tmp_path, "--epochs=10"), timeout=600)
  log = (tmp_path / "out" / "accelerator.log").read_text()
  assert again.returncode == 0, again.stdout + again.stderr + log[-3000:]
  assert "== timing: reusing the timing of" in again.stdout and "compile time:" not in log
  assert "resuming from the carried pack" in again.stdout
  assert f"resuming from checkpoint step {step}" in log  # the trainer's line
  assert out_files(tmp_path / "out") == {"accelerator.log", "timing.json", "metrics.jsonl",
                                         "results.json"}
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert results["epochs"] == 10 and results["config"]["model"]["use_bias"] is False
  assert epochs(tmp_path / "out" / "metrics.jsonl") == list(range(1, 11))
  state = json.loads((tmp_path / "out" / "timing.json").read_text())
  assert [r["status"] for r in state["runs"]] == ["stopped", "finished"]
  assert state["runs"][1]["epochs_before"] == stopped_at
  summary = state["summary"]
  assert summary["commands"] == 2 and "test_error_percent" in summary
  assert summary["trainer_wall_sec_total"] == pytest.approx(
      sum(r["time"]["trainer_wall_sec"] for r in state["runs"]))
  assert "speed: the 10-epoch run, compile included: projected" in again.stdout


def test_the_deadline_stops_the_trainer_and_kills_what_does_not_stop(tmp_path,
                                                                      monkeypatch) -> None:
  """At the deadline a child gets SIGTERM (the trainer saves and exits 130); one that does not
  exit within the grace is killed."""
  monkeypatch.setattr(accelerator, "LOG_FILE", [open(tmp_path / "log", "a")])  # noqa: SIM115
  monkeypatch.setattr(accelerator, "SIGNALLED", [])
  saves = "import signal, sys, time; signal.signal(15, lambda *_: sys.exit(130)); time.sleep(60)"
  ignores = "import signal, time; signal.signal(15, signal.SIG_IGN); time.sleep(60)"
  t = time.monotonic()
  assert accelerator.run_child([sys.executable, "-c", saves], dict(os.environ), t + 2,
                               grace=30) == (130, True)
  assert accelerator.run_child([sys.executable, "-c", ignores], dict(os.environ),
                               time.monotonic() + 2, grace=0.5) == (-signal.SIGKILL, True)
  assert accelerator.run_child([sys.executable, "-c", "raise SystemExit(7)"], dict(os.environ),
                               time.monotonic() + 60) == (7, False)
  assert time.monotonic() - t < 30
  assert "the deadline: SIGTERM" in (tmp_path / "log").read_text()


def test_preflight_says_what_is_missing_in_one_line(tmp_path) -> None:
  proc = helpers.run(command(tmp_path), timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      f"error: accelerator preflight: no CIFAR-10 in --data_dir={tmp_path / 'data'} (cifar-10-"
      "batches-py/ or cifar-10-batches-bin/; .gpu/run.sh rebuilds it in /tmp/cifar)"]
  assert out_files(tmp_path / "out") == {"accelerator.log"}
