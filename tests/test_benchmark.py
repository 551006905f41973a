"""The throughput benchmark CLI (`python -m allconv_jax.benchmark`) on a tiny network."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from allconv_jax import benchmark, models, steps
from tests import helpers, launcher
from tests.helpers import ROOT, tiny_config

TINY = ("--config=configs/all_cnn_c.py", "--config.model.width_multiplier=0.05",
        "--config.batch_size=16", "--steps=2", "--repeats=2")


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
  return launcher.run([sys.executable, "-m", "allconv_jax.benchmark", *args], cwd=ROOT,
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
  proc = run_benchmark(*TINY, f"--config.model.dtype={dtype}", "--torch_images_per_sec=50",
                       "--cpu_peak_gflops=200")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f", {dtype}, batch 16," in proc.stdout
  on_onednn = models.use_onednn("auto", dtype)  # auto on the CPU
  library = "oneDNN" if on_onednn else "XLA (strided input gradient polyphase)"
  assert f"convolutions: {library}, on 1 x cpu" in proc.stdout
  ips = check_output(proc.stdout)
  tflops = float(re.search(r"achieved (\d+\.\d+) TFLOP/s", proc.stdout).group(1))
  fraction = re.search(r"^peak fraction: (\d+\.\d)% of the CPU's float32 limit \(200 GFLOP/s: "
                       r"--cpu_peak_gflops\)$", proc.stdout, re.M)
  assert fraction and abs(float(fraction.group(1)) - tflops * 1e3 / 200 * 100) < 0.6, proc.stdout
  ratio = re.search(r"^ratio to PyTorch: (\d+\.\d\d) \(", proc.stdout, re.M)
  assert ratio and abs(float(ratio.group(1)) - ips / 50) < 0.01, proc.stdout
  assert re.search(r"^eval images/s: \d+\.\d \(batch 500\)$", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize("args, message", [
    (("--config.model.dtype=float16",), "error: config key 'model.dtype' must be one of"),
    (("--config.batch_size=0",), "error: config key 'batch_size' must be >= 1"),
    (("--config.nope=1",), "error: unknown config key 'nope'"),
    (("--steps=0",), "error: flag --steps=0"),
    (("--torch_images_per_sec=0",), "error: --torch_images_per_sec must be positive"),
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


def test_cpu_float32_limit_from_cpuinfo() -> None:
  """The issue's reckoning: two AVX-512 cores at 2.3 GHz, 64 FLOP per cycle: 294 GFLOP/s."""
  info = "processor\t: 0\ncpu MHz\t\t: 2300.000\nflags\t\t: fpu sse2 avx2 fma avx512f\n"
  peak, how = benchmark.cpu_peak(info, 2)
  assert abs(peak - 294.4) < 1e-9 and how == "2 cores x 2.30 GHz x 64 FLOP/cycle (AVX-512)"
  assert benchmark.cpu_peak(info.replace(" avx512f", ""), 4)[0] == 4 * 2.3 * 32
  assert benchmark.cpu_peak("flags : avx2\n", 2) is None  # no clock
  assert benchmark.cpu_peak_lines(0.147, 294.0) == [
      "peak fraction: 50.0% of the CPU's float32 limit (294 GFLOP/s: --cpu_peak_gflops)"]


def test_benchmark_scan_path_compiles_ahead_of_time(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
  """The GPU/TPU path (one jitted lax.scan per chunk), forced on the CPU."""
  monkeypatch.setattr(steps, "use_scan", lambda: True)
  out = benchmark.benchmark(tiny_config(batch_size=8), steps=2, warmup=1, repeats=1)
  stdout = capsys.readouterr().out
  assert "(ahead of time; chunk of 2 steps as one dispatch)" in stdout
  assert abs(out["images_per_sec"] - check_output(stdout)) < 0.1
  assert out["devices"].startswith("1 x ") and len(out["chunk_sec"]) == 1
  assert out["eval_images_per_sec"] > 0 and out["torch_ratio"] is None


def expected_conv_flops(config) -> dict[str, dict[str, float]]:
  """Per role and 3x3 layer, one batch's FLOPs: 2 x output pixels x 9 x channels in x out. The
  forward pass and the weight gradient have the layer's output size; a stride-1 input gradient
  the input's (autodiff pads the gradient: more for a VALID layer); a strided one (polyphase)
  8/9 of the forward's, as its 1x1-tap phase becomes a dot. The first layer's input gradient
  is not computed."""
  size, channels, out = 32, 3, {"forward": {}, "weight grad": {}, "input grad": {}}
  for i, layer in enumerate(models.layer_list(config.model.name, config.model.width_multiplier)):
    if isinstance(layer, models.Conv):
      before = size
      size = size - layer.kernel + 1 if layer.padding == "VALID" else -(-size // layer.stride)
      if layer.kernel == 3:
        per_pixel = 2.0 * 9 * channels * layer.features * config.batch_size
        out["forward"][layer.name] = out["weight grad"][layer.name] = per_pixel * size * size
        if i > 1:
          out["input grad"][layer.name] = (per_pixel * before * before if layer.stride == 1
                                           else per_pixel * size * size * 8 / 9)
      channels = layer.features
    elif isinstance(layer, models.MaxPool):
      size = -(-size // 2)
  return out


def test_profile_finds_every_convolution_of_the_step_with_its_role_and_flops() -> None:
  """benchmarks/profile_step.py: each 3x3 layer has its forward convolution, its weight
  gradient and (but the first) its input gradient in the compiled step, with their FLOPs, and
  every rebuilt convolution compiles, runs and is timed."""
  from benchmarks import profile_step

  config = tiny_config(batch_size=8)  # All-CNN-C: SAME, VALID and strided layers
  config.model.conv_impl = "xla"
  step, args = profile_step.build_step(config)
  convs = profile_step.parse_convs(step.lower(*args).compile().as_text(), 8)
  for role, expected in expected_conv_flops(config).items():
    by_layer = {}
    for c in convs:
      if c.role == role and c.layer in expected:
        by_layer[c.layer] = by_layer.get(c.layer, 0.0) + c.flops
    assert by_layer == expected, role
  profile_step.time_convs(convs, repeats=1)
  assert all(c.ms > 0 for c in convs)
  table = profile_step.report(config, 10.0, convs, {"transpose_copy_fusion": 1.0}, top=3)
  assert "| layout copies (transposes) | 1.0 | 10% | - |" in table


def test_profile_finds_every_onednn_convolution_with_its_role_and_flops() -> None:
  """With oneDNN convolutions (allconv_jax/onednn.py), every role of every 3x3 layer is one FFI
  call with the forward pass's FLOPs (the first layer's input gradient is not computed); the
  report counts their traced times as convolutions, not as other thunks."""
  from benchmarks import profile_step

  helpers.require_onednn()
  config = tiny_config(batch_size=8)
  config.model.conv_impl = "onednn"
  step, args = profile_step.build_step(config)
  convs = profile_step.parse_onednn(step.lower(*args).compile().as_text())
  forward = expected_conv_flops(config)["forward"]
  for role in ("forward", "weight grad", "input grad"):
    got = {c.layer: c.flops for c in convs if c.role == role}
    assert got == {k: v for k, v in forward.items()
                   if role != "input grad" or k != "stage1_conv1"}, role
  thunks = {c.name: 0.25 for c in convs}  # as traced_thunks names them
  for conv in convs:
    conv.ms = thunks.pop(conv.name)
  table = profile_step.report(config, 10.0, convs, {**thunks, "fusion": 1.0}, top=3)
  weight_grads = sum(c.role == "weight grad" for c in convs)
  assert f"| convolutions: weight grad | {0.25 * weight_grads:.1f} |" in table
  assert "| elementwise and other fusions | 1.0 | 10% | - |" in table
