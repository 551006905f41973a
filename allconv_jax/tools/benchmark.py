r"""Training throughput: the jitted train chunk of train.py on random device-resident data.

  python -m allconv_jax.tools.benchmark --config=configs/all_cnn_c.py --steps=20
  python -m allconv_jax.tools.benchmark --config=configs/all_cnn_c.py --steps=50 \
      --config.model.dtype=bfloat16 --config.batch_size=256

No dataset is read: 4 x batch_size random images and labels are put on the device(s) the way
train.py puts the training set there, and `steps.make_steps(...).train_chunk` (--steps SGD
steps: one dispatch of a lax.scan on GPU/TPU, a loop of jitted steps on the CPU; the batch
sharded over every device) is compiled, run --warmup times, then timed --repeats times. The
last line is `train images/s: <number>` (from the median timed chunk).
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from allconv_jax import cli, cpu, input_pipeline, metrics, models, optim
from allconv_jax import steps as steps_lib
from allconv_jax.config import validate
from allconv_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 20, "Train steps in one timed chunk (one dispatch on GPU/TPU).",
                       lower_bound=1)
  flags.DEFINE_integer("warmup", 1, "Untimed chunks (the first one compiles).", lower_bound=1)
  flags.DEFINE_integer("repeats", 3, "Timed chunks; the median is reported.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the random data and parameters.")
  flags.DEFINE_float("torch_images_per_sec", None, "PyTorch's train images/s on this machine "
                     "(benchmarks/torch_baseline.py's last line): prints our ratio to it.")
  flags.DEFINE_float("cpu_peak_gflops", None, "The CPU's float32 limit in GFLOP/s (default: "
                     "cores x clock x FLOP/cycle of its widest FMA, from /proc/cpuinfo).")


# Nominal dense peaks in TFLOP/s (vendor data sheets, no sparsity) by device_kind substring,
# most specific first: (bf16 tensor, tf32 tensor, fp32 non-tensor).
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.0, 495.0, 67.0)),   # SXM; jax says e.g. 'NVIDIA H100 80GB HBM3'
    ("H200", (989.0, 495.0, 67.0)),   # also GH200
    ("H800", (989.0, 495.0, 67.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
)


def nominal_peak(device_kind: str) -> tuple[float, float, float] | None:
  """(bf16, tf32, fp32) nominal dense TFLOP/s of a GPU by its jax device_kind, or None."""
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks
  return None


def cpu_peak(cpuinfo: str, cores: int) -> tuple[float, str] | None:
  """The float32 limit (GFLOP/s) of `cores` cores as /proc/cpuinfo describes them, and how it
  was reckoned: clock x FLOP per cycle (two FMA units: AVX-512 64, AVX2 32), or None."""
  mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
  flag_line = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
  if not mhz or not flag_line:
    return None
  cpu_flags = set(flag_line.group(1).split())
  per_cycle, isa = (64, "AVX-512") if "avx512f" in cpu_flags else \
      (32, "AVX2") if {"avx2", "fma"} <= cpu_flags else (8, "SSE")
  ghz = float(mhz.group(1)) / 1e3
  return cores * ghz * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"


def cpu_peak_lines(tflops: float, peak_gflops: float | None) -> list[str]:
  """The fraction of the CPU's float32 limit that `tflops` is."""
  how = "--cpu_peak_gflops"
  if peak_gflops is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
      with open("/proc/cpuinfo") as f:
        found = cpu_peak(f.read(), cores or 1)
    except OSError:
      found = None
    if found is None:
      return ["peak fraction: n/a (no /proc/cpuinfo clock; pass --cpu_peak_gflops)"]
    peak_gflops, how = found
  return [f"peak fraction: {tflops * 1e3 / peak_gflops:.1%} of the CPU's float32 limit "
          f"({peak_gflops:.0f} GFLOP/s: {how})"]


def peak_lines(device_kind: str, platform: str, dtype: str, tflops: float,
               cpu_peak_gflops: float | None = None) -> list[str]:
  """What fraction of the device's nominal peak `tflops` is (GPUs in the table, CPUs)."""
  if platform == "cpu":
    return cpu_peak_lines(tflops, cpu_peak_gflops)
  if platform != "gpu":
    return [f"peak fraction: n/a on {platform} (no nominal peak table)"]
  peaks = nominal_peak(device_kind)
  if peaks is None:
    return [f"peak fraction: n/a ({device_kind!r} is not in benchmark.PEAK_TFLOPS)"]
  bf16, tf32, fp32 = peaks
  if dtype == "bfloat16":
    return [f"peak fraction: {tflops / bf16:.1%} of the nominal dense bf16 peak "
            f"({bf16:g} TFLOP/s)"]
  # float32 convolutions run on TF32 tensor cores at XLA's default precision.
  return [f"peak fraction: {tflops / tf32:.1%} of the nominal dense TF32 peak ({tf32:g} TFLOP/s)"
          f", {tflops / fp32:.1%} of the fp32 non-tensor peak ({fp32:g} TFLOP/s)"]


@dataclasses.dataclass
class Bench:
  """What the timed chunks need: the compiled steps, their inputs and the state they advance."""
  config: Any
  model: models.AllConvNet
  tx: Any  # the optax optimizer
  fns: steps_lib.Steps
  inputs: tuple[Any, ...]  # images, labels, batch indices, key
  state: Any
  sums: Any
  num_classes: int
  mesh: Any  # the jax.sharding.Mesh the data and state live on

  def run(self, fn: Any) -> float:
    """Seconds for one chunk of `fn` (it advances the state)."""
    t = time.perf_counter()
    self.state, self.sums = fn(self.state, self.sums, *self.inputs)
    jax.block_until_ready((self.state, self.sums))
    return time.perf_counter() - t


def prepare(config: Any, steps: int, seed: int) -> Bench:
  """Random device-resident data, a fresh state and the run's jitted steps."""
  validate(config)
  mesh = input_pipeline.make_mesh()
  batch = config.batch_size
  if batch % mesh.size:
    raise UserError(f"batch_size ({batch}) must be a multiple of the number of devices "
                    f"({mesh.size})")
  k = input_pipeline.num_classes(config.data)
  model = models.create_model(config.model, k, cpu.choose(
      config.model.conv_impl, config.model.strided_grad, config.model.dtype))
  pool = 4 * batch
  rng = np.random.default_rng(seed)
  images = input_pipeline.replicate(rng.standard_normal((pool, 32, 32, 3), np.float32), mesh)
  labels = input_pipeline.replicate(rng.integers(0, k, pool).astype(np.int32), mesh)
  idx = input_pipeline.replicate(np.stack([rng.permutation(pool)[:batch] for _ in range(steps)])
                           .astype(np.int32), mesh)
  key = jax.random.key(seed)
  params = models.init_params(model, jax.random.fold_in(key, 1))
  steps_per_epoch = max(1, 50000 // batch)
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch, params)
  state = input_pipeline.replicate_tree(
      optim.TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params)), mesh)
  fns = steps_lib.make_steps(model, tx, mesh, config, pool, steps_per_epoch)
  return Bench(config, model, tx, fns,
               (images, labels, idx, jax.random.fold_in(key, 2)), state,
               input_pipeline.replicate_tree(metrics.zeros(), mesh), k, mesh)


def benchmark(config: Any, steps: int, warmup: int, repeats: int, seed: int = 0,
              torch_images_per_sec: float | None = None,
              cpu_peak_gflops: float | None = None) -> dict[str, Any]:
  """Compiles and times train.py's train chunk and evaluation; returns the numbers (also
  printed), with the ratio to PyTorch's figure when given one."""
  bench = prepare(config, steps, seed)
  device = jax.devices()[0]
  print(f"{config.model.name} width x{config.model.width_multiplier:g} "
        f"({models.count_params(bench.state.params):,} parameters), {config.model.dtype}, "
        f"batch {config.batch_size}, augment={config.data.augment}, convolutions: "
        f"{bench.model.options.convolutions.describe()}, "
        f"on {bench.mesh.size} x {device.device_kind} "
        f"({device.platform}, jax {jax.__version__})", flush=True)
  if device.platform == "cpu":
    load = os.getloadavg()
    print(f"host: {os.cpu_count()} CPU(s), load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}", flush=True)
  chunk = bench.fns.train_chunk
  compile_s = None
  if hasattr(chunk, "lower"):  # one jitted lax.scan (GPU/TPU): compile ahead of time
    t0 = time.perf_counter()
    chunk = chunk.lower(bench.state, bench.sums, *bench.inputs).compile()
    compile_s = time.perf_counter() - t0
  first = bench.run(chunk)  # compiles the jitted step here when the chunk is a loop (CPU)
  warm = [first] + [bench.run(chunk) for _ in range(warmup - 1)]
  times = [bench.run(chunk) for _ in range(repeats)]
  chunk_s = statistics.median(times)
  how = "ahead of time"
  if compile_s is None:
    compile_s, how = max(first - chunk_s, 0.0), "first chunk minus a timed one"
  dispatch = "one dispatch" if hasattr(bench.fns.train_chunk, "lower") else \
      "a loop of jitted steps"
  print(f"compile time: {compile_s:.2f} s ({how}; chunk of {steps} steps as {dispatch})",
        flush=True)
  print(f"warm-up: {len(warm)} chunk(s), {', '.join(f'{t:.3f}' for t in warm)} s", flush=True)
  eval_ips = eval_images_per_sec(bench, repeats)
  return report_times(bench, steps, times, compile_s, device, eval_ips, torch_images_per_sec,
                      cpu_peak_gflops)


def eval_images_per_sec(bench: Bench, repeats: int) -> float:
  """Images/s of train.py's evaluation (two batches of eval_batch_size, median of repeats)."""
  batch, mesh = bench.config.eval_batch_size, bench.mesh
  rng = np.random.default_rng(1)
  images = input_pipeline.replicate(rng.standard_normal((2, batch, 32, 32, 3), np.float32), mesh)
  labels = input_pipeline.replicate(rng.integers(0, bench.num_classes, (2, batch)).astype(np.int32),
                              mesh)
  mask = input_pipeline.replicate(np.ones((2, batch), np.float32), mesh)

  def once() -> float:
    t = time.perf_counter()
    jax.block_until_ready(bench.fns.evaluate(bench.state.params, images, labels, mask))
    return time.perf_counter() - t

  once()  # compiles
  return 2 * batch / statistics.median(once() for _ in range(repeats))


def report_times(bench: Bench, steps: int, times: list[float], compile_s: float,
                 device: Any, eval_ips: float, torch_ips: float | None = None,
                 cpu_peak_gflops: float | None = None) -> dict[str, Any]:
  """Prints the timed chunks, FLOP rates, the ratio to PyTorch and images/s; returns them."""
  config = bench.config
  chunk_s = statistics.median(times)
  loss = float(bench.sums["loss"]) / max(float(bench.sums["count"]), 1.0)
  ips = steps * config.batch_size / chunk_s
  flops = models.train_flops_per_image(config.model.name, config.model.width_multiplier,
                                       bench.num_classes)
  tflops = flops * ips / 1e12
  print(f"timed: {len(times)} chunk(s) of {steps} steps: "
        f"{', '.join(f'{t:.3f}' for t in times)} s (median {chunk_s:.3f} s, "
        f"{chunk_s / steps * 1e3:.2f} ms/step); mean train loss {loss:.4f}", flush=True)
  print(f"train FLOPs/image: {flops / 1e9:.4g} GFLOP (3x forward); achieved "
        f"{tflops:.3f} TFLOP/s", flush=True)
  for line in peak_lines(device.device_kind, device.platform, config.model.dtype, tflops,
                         cpu_peak_gflops):
    print(line, flush=True)
  print(f"eval images/s: {eval_ips:.1f} (batch {config.eval_batch_size})", flush=True)
  if torch_ips:
    print(f"ratio to PyTorch: {ips / torch_ips:.2f} ({ips:.1f} / {torch_ips:.1f} train "
          f"images/s)", flush=True)
  print(f"train images/s: {ips:.1f}", flush=True)
  return {"compile_sec": compile_s, "chunk_sec": times, "images_per_sec": ips,
          "eval_images_per_sec": eval_ips, "tflops": tflops,
          "torch_ratio": ips / torch_ips if torch_ips else None,
          "devices": f"{bench.mesh.size} x {device.device_kind}"}


def main(argv: list[str]) -> None:
  cli.start(argv[1:])
  config = cli.load_config(FLAGS.config)
  with cli.user_errors():
    for name in ("torch_images_per_sec", "cpu_peak_gflops"):
      if FLAGS[name].value is not None and FLAGS[name].value <= 0:
        raise UserError(f"--{name} must be positive (got {FLAGS[name].value:g})")
    benchmark(config, FLAGS.steps, FLAGS.warmup, FLAGS.repeats, FLAGS.seed,
              FLAGS.torch_images_per_sec, FLAGS.cpu_peak_gflops)


def run() -> None:
  """The program (also the `allconv-benchmark` command)."""
  define_flags()
  cli.program_help(__doc__)
  app.run(main, argv=cli.resolve_config_flag(sys.argv), flags_parser=cli.parse_config_flags)


if __name__ == "__main__":
  run()
