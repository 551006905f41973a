"""The throughput benchmark (`python -m allconv_jax.tools.benchmark`) on a tiny network, and the
step profile of benchmarks/profile_step.py."""

from __future__ import annotations

import re
import sys

import pytest

from allconv_jax import cli, cpu, models
from allconv_jax.errors import UserError
from allconv_jax.tools import benchmark
from tests import helpers
from tests.helpers import tiny_config

TINY = ("--config=all_cnn_c", "--config.model.width_multiplier=0.05", "--config.batch_size=16",
        "--steps=2", "--repeats=2")


def run_benchmark(*args: str):
  """The benchmark as a program (its flags, its output, its exit status)."""
  return helpers.run([sys.executable, "-m", "allconv_jax.tools.benchmark", *args],
                     env={"JAX_PLATFORMS": "cpu"})


def check_output(stdout: str) -> float:
  """The images/s of a benchmark's output, after checking its other lines."""
  assert re.search(r"^compile time: \d+\.\d+ s", stdout, re.M), stdout
  assert re.search(r"achieved \d+\.\d+ TFLOP/s", stdout), stdout
  assert re.search(r"^peak fraction: ", stdout, re.M), stdout
  last = stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"train images/s: (\d+\.\d+)", last)
  assert match, last
  return float(match.group(1))


def check_full_output(stdout: str, dtype: str, eval_batch: int) -> float:
  """check_output, and the header, the peak fraction of --cpu_peak_gflops=200 and the ratio to
  --torch_images_per_sec=50 that both runs below ask for."""
  assert f", {dtype}, batch 16," in stdout
  chosen = cpu.choose("auto", "auto", dtype)  # what the benchmark picks on this machine
  assert f"convolutions: {chosen.describe()}, on 1 x cpu" in stdout, stdout
  ips = check_output(stdout)
  tflops = float(re.search(r"achieved (\d+\.\d+) TFLOP/s", stdout).group(1))
  fraction = re.search(r"^peak fraction: (\d+\.\d)% of the CPU's float32 limit \(200 GFLOP/s: "
                       r"--cpu_peak_gflops\)$", stdout, re.M)
  assert fraction and abs(float(fraction.group(1)) - tflops * 1e3 / 200 * 100) < 0.6, stdout
  ratio = re.search(r"^ratio to PyTorch: (\d+\.\d\d) \(", stdout, re.M)
  assert ratio and abs(float(ratio.group(1)) - ips / 50) < 0.01, stdout
  assert re.search(rf"^eval images/s: \d+\.\d \(batch {eval_batch}\)$", stdout, re.M), stdout
  return ips


@pytest.mark.slow
def test_benchmark_cli() -> None:
  """The program: flags, a config by its bare name and overrides in, the report out, exit
  status 0."""
  proc = run_benchmark(*TINY, "--config.model.dtype=bfloat16", "--torch_images_per_sec=50",
                       "--cpu_peak_gflops=200")
  assert proc.returncode == 0, proc.stderr[-3000:]
  check_full_output(proc.stdout, "bfloat16", 500)


@pytest.mark.slow
def test_benchmark_cli_refuses_a_nonpositive_reference_in_one_line() -> None:
  proc = run_benchmark("--config=configs/all_cnn_c.py", *TINY[1:], "--torch_images_per_sec=0")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --torch_images_per_sec must be positive (got 0)"], proc.stderr


def test_benchmark_in_process(capsys: pytest.CaptureFixture) -> None:
  config = tiny_config(batch_size=16)
  out = benchmark.benchmark(config, steps=2, warmup=1, repeats=2, torch_images_per_sec=50,
                            cpu_peak_gflops=200)
  ips = check_full_output(capsys.readouterr().out, "float32", config.eval_batch_size)
  assert abs(out["images_per_sec"] - ips) < 0.1 and len(out["chunk_sec"]) == 2
  assert out["torch_ratio"] == pytest.approx(out["images_per_sec"] / 50)


@pytest.mark.parametrize("override, message", [
    ({"model__dtype": "float16"}, "config key 'model.dtype' must be one of"),
    ({"batch_size": 0}, "config key 'batch_size' must be >= 1"),
])
def test_benchmark_checks_the_config_before_any_compute(override, message) -> None:
  with pytest.raises(UserError, match=re.escape(message)):
    benchmark.prepare(tiny_config(**override), steps=1, seed=0)


def test_unknown_override_is_named() -> None:
  """What the benchmark's flag parser (cli.parse_config_flags) prints for an unknown key."""
  line = cli.unknown_override(["--config.batch_size=8", "--config.nope=1"])
  assert line is not None and line.startswith("unknown config key 'nope' in --config.nope=1")


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
  monkeypatch.setattr(cpu, "scan_steps", lambda: True)
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


@pytest.mark.slow
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
  """With oneDNN convolutions (allconv_jax/cpu/onednn.py), every role of every 3x3 layer is one FFI
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
