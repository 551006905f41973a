"""benchmarks/accelerator.py, the accelerator machine's one command: its dry run on the CPU as a
real process (timing, a stop, the packed workdir, the resume on a "fresh machine"), and its
parts in-process (the deadlines, the pack, the plan, the time breakdown, the preflight)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
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


def out_files(tmp_path) -> set[str]:
  return set(os.listdir(tmp_path / "out"))


@pytest.mark.slow
def test_dry_run_times_stops_packs_and_resumes(tmp_path) -> None:
  """The exact script on the CPU: it times both dtypes, trains until SIGTERM, packs the workdir
  under OUT and exits 130; on a fresh machine (workroot gone) the same command, given the files
  that came back, reuses the timing, resumes from the pack and finishes the run."""
  cifar_fixtures.make_cifar10(tmp_path / "data", "python", n_train=300, n_test=100)
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(command(tmp_path, "--epochs=3"), cwd=helpers.ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output, signalled = [], False
  watchdog = threading.Timer(600, proc.kill)  # a hang fails the test instead of blocking it
  watchdog.start()
  assert proc.stdout is not None
  for line in proc.stdout:
    output.append(line)
    if not signalled and line.startswith("epoch 1/3 step "):  # the trainer's first chunk
      proc.send_signal(signal.SIGTERM)
      signalled = True
  code = proc.wait(timeout=60)
  watchdog.cancel()
  text = "".join(output)
  assert signalled and code == 130, text[-3000:]
  assert {"accelerator.log", "timing.json", "metrics.jsonl", "workdir.tar"} == out_files(
      tmp_path), text[-3000:]
  with open(tmp_path / "out" / "accelerator.log") as f:
    assert f.read().splitlines() == text.splitlines()
  state = json.loads((tmp_path / "out" / "timing.json").read_text())
  assert state["mode"] == "dry_run" and state["device"]["platform"] == "cpu"
  timed = {r["dtype"]: r for r in state["timing"]["jax"]}
  assert set(timed) == {"float32", "bfloat16"}
  for r in timed.values():
    assert r["images_per_sec"] > 0 and r["compile_sec"] >= 0 and r["steps"] == 4, r
  assert {r["dtype"] for r in state["timing"]["torch"]} == {"float32", "bfloat16"}
  (segment,) = state["runs"]
  assert (segment["status"], segment["stop"], segment["exit_code"]) == ("stopped", "signal", 130)
  stopped_at = segment["epochs_after"]
  assert 1 <= stopped_at < 3
  epochs = [r["epoch"] for r in accelerator.read_metrics(str(tmp_path / "out" /
                                                               "metrics.jsonl"))]
  assert epochs == list(range(1, stopped_at + 1))
  with tarfile.open(tmp_path / "out" / "workdir.tar") as tar:
    names = tar.getnames()
  assert {"config.json", "metrics.jsonl"} <= set(names)
  assert "preprocessing.npz" not in names and "results.json" not in names
  steps = {n.split("/")[1] for n in names if n.startswith("checkpoints/")}
  assert len(steps) == 1, names  # the newest checkpoint only

  shutil.rmtree(tmp_path / "work")  # a fresh machine: only the carried files are there
  shutil.copytree(tmp_path / "out", tmp_path / "carry")
  again = helpers.run(command(tmp_path, "--epochs=3"), timeout=600)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
  assert "== timing: reusing the timing of" in again.stdout
  assert "-- JAX:" not in again.stdout
  assert "resuming from the carried pack workdir.tar" in again.stdout
  assert f"resuming from checkpoint step {steps.pop()}" in again.stdout
  assert {"accelerator.log", "timing.json", "metrics.jsonl", "results.json"} == out_files(
      tmp_path)
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert results["epochs"] == 3 and results["width_multiplier"] == 0.05
  assert results["config"]["model"]["use_bias"] is False  # configs/recipe_neon.py
  epochs = [r["epoch"] for r in accelerator.read_metrics(str(tmp_path / "out" /
                                                               "metrics.jsonl"))]
  assert epochs == [1, 2, 3]
  state = json.loads((tmp_path / "out" / "timing.json").read_text())
  assert [s["status"] for s in state["runs"]] == ["stopped", "finished"]
  assert state["runs"][1]["epochs_before"] == stopped_at
  assert state["summary"]["finished"] and state["summary"]["commands"] == 2
  assert state["summary"]["readme_line"].startswith("All-CNN-C, paper protocol, cpu: test error ")
  assert "README (a dry run: not a result): All-CNN-C, paper protocol, cpu" in again.stdout


# A stand-in trainer: `start-up` seconds, then its loop's first line, then it waits for SIGTERM
# and exits 130 if the signal came after that line (99 if before).
FAKE_TRAINER = r"""
import signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(time.monotonic()))
time.sleep(float(sys.argv[1]))
t_loop = time.monotonic()
print("epoch 1/2 step 1/1: loss 2.3026", flush=True)
while not got:
  time.sleep(0.01)
sys.exit(130 if got[0] >= t_loop else 99)
"""


def test_the_deadline_waits_for_the_training_loop(tmp_path) -> None:
  """SIGTERM at the soft deadline only once the trainer's loop runs (before it, a stop would
  save nothing): here the deadline passes during a 1 s start-up."""
  console = accelerator.Console(str(tmp_path / "log"))
  now = time.monotonic()
  out = accelerator.supervise([sys.executable, "-c", FAKE_TRAINER, "1.0"], console,
                              soft=now + 0.1, hard=now + 60)
  assert (out.code, out.stop, out.in_loop) == (130, "deadline", True)
  assert out.wall_sec < 30
  assert any("epoch 1/2 step 1/1" in line for _, line in out.lines)


def test_the_hard_deadline_kills_a_trainer_that_does_not_stop(tmp_path) -> None:
  console = accelerator.Console(None)
  ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
  now = time.monotonic()
  out = accelerator.supervise([sys.executable, "-c", ignores], console, soft=now,
                              hard=now + 0.5, kill_grace=0.5)
  assert (out.code, out.stop, out.in_loop) == (-signal.SIGKILL, "hard deadline", False)
  assert out.wall_sec < 30


def write_step(workdir, step: int, payload: bytes, complete: bool = True) -> None:
  folder = workdir / "checkpoints" / str(step) / "default"
  folder.mkdir(parents=True)
  (folder / "data").write_bytes(payload)
  if complete:
    (workdir / "checkpoints" / str(step) / accelerator.CHECKSUMS).write_text("{}")


def test_pack_keeps_what_a_resume_needs_in_parts(tmp_path) -> None:
  """The newest complete checkpoint, config and metrics, split into parts that join again; not
  the statistics, older or unfinished steps, or a best mark whose step is not packed."""
  work, out = tmp_path / "run", tmp_path / "out"
  work.mkdir()
  out.mkdir()
  (work / "config.json").write_text('{"a": 1}')
  (work / "metrics.jsonl").write_text('{"epoch": 1, "step": 10}\n')
  (work / "preprocessing.npz").write_bytes(b"x" * 100)
  (work / "best_checkpoint.json").write_text('{"step": 5}')
  payload = os.urandom(5000)
  write_step(work, 5, b"old")
  write_step(work, 10, payload)
  write_step(work, 12, b"half", complete=False)
  assert accelerator.complete_steps(str(work)) == [5, 10]
  names = accelerator.pack(str(work), str(out), str(tmp_path), part_bytes=2048)
  assert names == [f"workdir.tar.{i:02d}" for i in range(len(names))] and len(names) >= 3
  parts = accelerator.packed_parts(str(out))
  assert [os.path.basename(p) for p in parts] == names
  accelerator.unpack(parts, str(tmp_path / "restored"), str(tmp_path))
  restored = tmp_path / "restored"
  assert sorted(os.listdir(restored)) == ["checkpoints", "config.json", "metrics.jsonl"]
  assert os.listdir(restored / "checkpoints") == ["10"]
  assert (restored / "checkpoints" / "10" / "default" / "data").read_bytes() == payload
  assert (restored / "metrics.jsonl").read_text() == '{"epoch": 1, "step": 10}\n'

  (work / "best_checkpoint.json").write_text('{"step": 10}')
  assert accelerator.pack(str(work), str(out), str(tmp_path)) == ["workdir.tar"]
  assert sorted(os.listdir(out)) == ["workdir.tar"]  # the old parts are gone
  with tarfile.open(out / "workdir.tar") as tar:
    assert "best_checkpoint.json" in tar.getnames()
  shutil.rmtree(work / "checkpoints")
  assert accelerator.pack(str(work), str(out), str(tmp_path)) == []


def test_plan_and_deadlines() -> None:
  """The run fits or it does not; the trainer's deadlines leave time to stop and pack."""
  plan = accelerator.make_plan(350, 350, 0.5, 20.0, True, 500.0)
  startup = accelerator.STARTUP_EST_SEC + 20.0
  assert plan["needed_sec"] == pytest.approx(startup + 175 + accelerator.TAIL_EST_SEC)
  assert plan["fits"] and plan["epochs_this_command"] == 350
  plan = accelerator.make_plan(350, 350, 2.0, 20.0, True, 500.0)
  assert not plan["fits"] and 0 < plan["epochs_this_command"] < 350
  assert plan["next_command_sec_est"] > (350 - plan["epochs_this_command"]) * 2.0
  assert accelerator.make_plan(10, 350, None, None, False, 100.0)["fits"] is None
  soft, hard = accelerator.deadlines(1000.0, 20.0)
  assert hard == 1000.0 - accelerator.PACK_RESERVE_SEC and soft == hard - 60.0
  assert accelerator.deadlines(None, 1.0) == (None, None)


def test_breakdown_of_a_trainer_command() -> None:
  """Start-up, compile, the steady epoch, checkpoint saves (epochs after a new best) and the
  tail, from timestamped console lines and the metrics."""
  lines = [(1.0, "data: 49000 train, 1000 validation, 10000 test images, 10 classes (4.5s)"),
           (2.0, "all_cnn_c (width x1.0, 1,368,480 parameters) on cifar10: 350 epoch(s) ..."),
           (12.0, "epoch 1: train loss 2.2"), (13.5, "epoch 2: train loss 2.1"),
           (14.5, "epoch 3: train loss 2.0"), (16.0, "epoch 4: train loss 1.9")]
  records = [{"epoch": e, "step": 382 * e, "val_accuracy": acc, "images_per_sec": 40000.0}
             for e, acc in ((1, 0.5), (2, 0.4), (3, 0.6), (4, 0.55))]
  b = accelerator.breakdown(lines, 17.5, records, {"step_ms": 2.0, "eval_images_per_sec": 1e4},
                            1000, 25, 350)
  assert b["startup_sec"] == 2.0 and b["data_and_preprocessing_sec"] == 4.5
  assert b["epoch_sec"] == pytest.approx(1.0) and b["compile_sec_est"] == pytest.approx(9.0)
  assert b["checkpoint_save_sec_est"] == pytest.approx(0.5) and b["tail_sec"] == 1.5
  assert b["steps_sec"] == pytest.approx(0.764) and b["eval_sec_est"] == pytest.approx(0.1)
  assert b["other_sec"] == pytest.approx(1.0 - 0.764 - 0.1)
  assert b["host_round_trips_per_epoch"]["dispatches"] == 3
  lines = accelerator.time_lines(b, 350)
  assert lines[0].startswith("where the time went (trainer wall 17.5 s)")
  parts = accelerator.projected_parts(b, 350)
  assert next(iter(parts)) == "SGD steps" and parts["SGD steps"] == pytest.approx(267.4)
  assert parts["checkpoint saves"] == pytest.approx(350 * 2 / 4 * 0.5)
  assert lines[-1].startswith(f"  the 350-epoch run at this pace, {sum(parts.values()):.0f} s: "
                              "SGD steps 267 s")


def test_preflight_says_what_is_missing_in_one_line(tmp_path) -> None:
  proc = helpers.run(command(tmp_path), timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      f"error: accelerator preflight: no CIFAR-10 in --data_dir={tmp_path / 'data'} "
      "(cifar-10-batches-py/ or cifar-10-batches-bin/; .gpu/run.sh rebuilds it in /tmp/cifar)"]
  assert out_files(tmp_path) == {"accelerator.log"}


def test_torch_baseline_writes_its_figures(tmp_path) -> None:
  """benchmarks/torch_baseline.py at a tiny width on the CPU (where torch is installed)."""
  pytest.importorskip("torch")
  from benchmarks import torch_baseline

  path = tmp_path / "torch.json"
  out = torch_baseline.main(["--device=cpu", "--width_multiplier=0.05", "--batch_size=8",
                             "--steps=1", "--warmup=1", "--repeats=1", "--no-bias",
                             f"--json={path}"])
  assert json.loads(path.read_text()) == out
  assert out["images_per_sec"] > 0 and out["dtype"] == "float32" and not out["bias"]
  assert {r["format"] for r in out["runs"]} == {"NCHW", "channels_last"}
