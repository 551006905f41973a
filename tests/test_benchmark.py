"""The throughput benchmark CLI (`python -m allconv_jax.benchmark`) on a tiny network."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from allconv_jax import benchmark, steps
from tests.helpers import ROOT, tiny_config

TINY = ("--config=configs/all_cnn_c.py", "--config.model.width_multiplier=0.05",
        "--config.batch_size=16", "--steps=2", "--repeats=2")


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "allconv_jax.benchmark", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def check_output(stdout: str) -> float:
  """The images/s of a benchmark's output, after checking its other lines."""
  assert re.search(r"^compile time: \d+\.\d+ s", stdout, re.M), stdout
  assert re.search(r"achieved \d+\.\d+ TFLOP/s", stdout), stdout
  assert re.search(r"^peak fraction: ", stdout, re.M), stdout
  last = stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"train images/s: (\d+\.\d+)", last)
  assert match, last
  return float(match.group(1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_benchmark_cli(dtype: str) -> None:
  proc = run_benchmark(*TINY, f"--config.model.dtype={dtype}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f", {dtype}, batch 16," in proc.stdout
  assert "strided input gradient polyphase, on 1 x cpu" in proc.stdout  # auto on the CPU
  assert "peak fraction: n/a on cpu" in proc.stdout
  assert check_output(proc.stdout) > 0


@pytest.mark.parametrize("args, message", [
    (("--config.model.dtype=float16",), "error: config key 'model.dtype' must be one of"),
    (("--config.batch_size=0",), "error: config key 'batch_size' must be >= 1"),
    (("--config.nope=1",), "error: unknown config key 'nope'"),
    (("--steps=0",), "error: flag --steps=0"),
    ((), "error: --config is required"),
])
def test_benchmark_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
  config = () if not args else ("--config=configs/all_cnn_c.py",)
  proc = run_benchmark(*config, *args)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
  assert "Traceback" not in proc.stderr


def test_nominal_peaks() -> None:
  assert benchmark.nominal_peak("NVIDIA H100 80GB HBM3") == (989.0, 495.0, 67.0)
  assert benchmark.nominal_peak("NVIDIA H100 PCIe")[0] == 756.0
  assert benchmark.nominal_peak("NVIDIA H200")[0] == 989.0
  assert benchmark.nominal_peak("cpu") is None
  lines = benchmark.peak_lines("NVIDIA H200", "gpu", "bfloat16", 98.9)
  assert lines == ["peak fraction: 10.0% of the nominal dense bf16 peak (989 TFLOP/s)"]
  assert "TF32" in benchmark.peak_lines("NVIDIA A100-SXM4-40GB", "gpu", "float32", 15.6)[0]
  assert "not in" in benchmark.peak_lines("NVIDIA B200", "gpu", "bfloat16", 1.0)[0]


def test_benchmark_scan_path_compiles_ahead_of_time(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
  """The GPU/TPU path (one jitted lax.scan per chunk), forced on the CPU."""
  monkeypatch.setattr(steps, "use_scan", lambda: True)
  out = benchmark.benchmark(tiny_config(batch_size=8), steps=2, warmup=1, repeats=1)
  stdout = capsys.readouterr().out
  assert "(ahead of time; chunk of 2 steps as one dispatch)" in stdout
  assert abs(out["images_per_sec"] - check_output(stdout)) < 0.1
  assert out["devices"].startswith("1 x ") and len(out["chunk_sec"]) == 1
