"""Data parallelism: a tiny run over 4 (forced host) CPU devices, or over two processes joined by
jax.distributed, matches the same run on 1 device.

The device count is fixed when jax starts, so each run is its own Python process with
XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from allconv_jax import cpu, files, train
from tests.helpers import ROOT, metrics, run, run_main, tiny_config, tiny_flags, untimed

# One worker: its runs share one module fixture; among the longest (scheduled first).
pytestmark = [pytest.mark.xdist_group("parallel"), pytest.mark.slow]

RESULT_KEYS = ("test_loss", "test_accuracy", "final_val_accuracy", "best_val_accuracy",
               "best_epoch", "steps", "num_params")

# For each argument 'WORKDIR=loop|scan': runs tiny_config() in WORKDIR with chunks of steps as a
# loop of jitted steps (XLA:CPU's default) or as one lax.scan (GPU/TPU's), then prints
# jax.device_count() and the run's outputs as JSON.
SCRIPT = """
import json, sys
import jax
from allconv_jax import cpu, files, train
from tests.helpers import tiny_config
for arg in sys.argv[1:]:
  workdir, mode = arg.rsplit("=", 1)
  cpu.scan_steps = lambda: mode == "scan"  # read by steps.make_steps and train's loop
  results = train.train_and_evaluate(tiny_config(), workdir)
  records = files.read_metrics(workdir + "/metrics.jsonl")
  print("RESULT " + json.dumps({"mode": mode, "device_count": jax.device_count(),
                                "results": results, "records": records}))
"""


def run_tiny(devices: int, *runs: tuple[str, str]) -> dict[str, dict]:
  """Tiny 2-epoch runs (global batch 32), (workdir, 'loop' or 'scan') each, in one fresh
  process with `devices` CPU devices; their JSON outputs by mode, the metrics records
  without their timing fields."""
  flags = os.environ.get("XLA_FLAGS", "")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}
  proc = run([sys.executable, "-c", SCRIPT, *(f"{w}={m}" for w, m in runs)], env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      record = json.loads(line.removeprefix("RESULT "))
      record["records"] = untimed(record["records"])
      out[record["mode"]] = record
  assert sorted(out) == sorted(m for _, m in runs), proc.stdout[-3000:]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
  """The same tiny run on 1 device (in this process), and on 4 devices (a fresh process) both
  as a loop and as a lax.scan."""
  tmp = tmp_path_factory.mktemp
  four = run_tiny(4, (str(tmp("four_loop")), "loop"), (str(tmp("four_scan")), "scan"))
  return {"1 loop": run_here(str(tmp("one_loop"))), "4 loop": four["loop"],
          "4 scan": four["scan"]}


def run_here(workdir: str) -> dict:
  """The tiny run on this process's one CPU device (XLA:CPU's loop), as run_tiny returns it."""
  assert jax.device_count() == 1 and not cpu.scan_steps()
  config = tiny_config()
  config.model.conv_impl = "xla"  # as 'auto' is on several devices: the same convolutions
  train.train_and_evaluate(config, workdir)
  return {"mode": "loop", "device_count": jax.device_count(), **read_run(workdir)}


def assert_same_run(a: dict, b: dict) -> None:
  assert len(a["records"]) == len(b["records"]) == 2
  for ra, rb in zip(a["records"], b["records"], strict=True):
    assert ra.keys() == rb.keys()
    for key in ra:
      if isinstance(ra[key], float):
        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-7, err_msg=key)
      else:
        assert rb[key] == ra[key], key
  for key in RESULT_KEYS:
    np.testing.assert_allclose(b["results"][key], a["results"][key], rtol=1e-5, atol=1e-7,
                               err_msg=key)


def test_four_devices_were_used(runs: dict[str, dict]) -> None:
  assert runs["1 loop"]["device_count"] == 1
  assert runs["1 loop"]["results"]["devices"].startswith("1 x ")
  for name in ("4 loop", "4 scan"):
    assert runs[name]["device_count"] == 4
    assert runs[name]["results"]["devices"].startswith("4 x ")
    convs = runs[name]["results"]["convolutions"]  # model.conv_impl=auto
    assert (convs["backend"], convs["reason"]) == (
        "xla", "model.conv_impl=auto: 4 devices, and oneDNN runs on one"), convs


@pytest.mark.parametrize("name", ["4 loop", "4 scan"])
def test_same_metrics_on_one_and_four_devices(runs: dict[str, dict], name: str) -> None:
  """Data parallelism changes no number (beyond float rounding), looped or scanned."""
  assert_same_run(runs["1 loop"], runs[name])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(workdir: str, *flags: str) -> None:
  """main.py as two processes (one CPU device each) joined by jax.distributed on this host."""
  port = free_port()
  # Only process 0 reads and writes the persistent compilation cache (jax's rule), so process 1
  # compiles every program at every launch while process 0 waits for it at the first
  # collective. LLVM's -O0 halves that wait (22 -> 11 s per launch); kernels are the same
  # library calls, and the numbers must still equal the one-device run's below.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/all_cnn_c.py",
       f"--workdir={workdir}", *tiny_flags(), *flags, "--distributed",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in (0, 1)]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]


def read_run(workdir: str) -> dict:
  """A finished run's untimed metrics records and its results.json."""
  return {"records": metrics(workdir),
          "results": files.read_json(os.path.join(workdir, "results.json"))}


def test_two_processes_match_one_device_and_resume(runs: dict[str, dict], tmp_path) -> None:
  """Multi-host through jax.distributed (two processes here): it trains, stops after epoch 1,
  resumes from that checkpoint, and every number equals the straight run on one device."""
  workdir = str(tmp_path / "two")
  run_two_processes(workdir, "--config.num_epochs=1")
  one = read_run(workdir)
  assert one["results"]["devices"].startswith("2 x ") and one["results"]["epochs"] == 1
  run_two_processes(workdir)  # num_epochs=2: resumes from epoch 1's checkpoint
  two = read_run(workdir)
  assert two["records"][:1] == one["records"]
  assert two["results"]["epochs"] == 2 and two["results"]["history"][0]["epochs"] == 1
  assert_same_run(runs["1 loop"], two)


def test_process_flags_need_distributed(tmp_path) -> None:
  r = run_main("--config=configs/all_cnn_c.py", f"--workdir={tmp_path / 'w'}", "--num_processes=2")
  assert r.returncode != 0
  assert r.stderr.strip() == ("error: --coordinator_address, --num_processes and --process_id "
                              "need --distributed")
  assert not (tmp_path / "w").exists()
