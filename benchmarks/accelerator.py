r"""The accelerator run in one command: the device, two timed epochs in float32 and bfloat16
against PyTorch's eager All-CNN-C, then the paper's protocol (350 epochs) with checkpoints,
stopped cleanly at a deadline and resumed by the same command (docs/accelerator.md).

On the accelerator machine, after ../shared/gpu/prepare.sh here (device tool `run`, carry
[".gpu", "workdirs/accelerator"], timeout_s 600):

  bash .gpu/run.sh python3 benchmarks/accelerator.py --out=$OUT --budget=540

A dry run of the same code on a CPU (width x0.05, 1 epoch, a tiny local CIFAR-10 folder):

  python3 benchmarks/accelerator.py --dry_run --data_dir=/tmp/tiny_cifar --out=/tmp/acc/out \
      --workroot=/tmp/acc/work

What it does, in order, everything it prints also going to OUT/accelerator.log:
  1. preflight: python modules, the CIFAR-10 folder, jax's devices (one line and exit 2 when
     something is missing; a run that is not --dry_run needs an accelerator);
  2. timing (skipped when an earlier command of the same run already timed it): the training
     code's jitted chunk (allconv_jax.tools.benchmark) for one epoch of steps, compiled, run
     once untimed and once timed, in float32 and bfloat16 (--extra_batch adds bfloat16 at a
     larger batch), then benchmarks/torch_baseline.py at the same batch and precisions;
  3. the run: main.py with configs/recipe_neon.py (the recipe that trains best at full width in
     results/trainability/), one lax.scan dispatch per epoch, sized from the timing; at the
     deadline it gets SIGTERM, saves a checkpoint at the end of its epoch and exits 130;
  4. the files: OUT/timing.json (device, timing, plan, each command's segment of the run and
     where its time went), OUT/metrics.jsonl, OUT/results.json once finished, and, when the run
     is not finished, OUT/workdir.tar: what the next command needs to resume (the newest
     checkpoint, config.json, metrics.jsonl; not the 37 MB of GCN + ZCA statistics, which the
     resumed run fits again). Copy every file of OUT into workdirs/accelerator/, carry that
     folder, and run the same command again: it resumes (from the workroot itself while the
     machine is still warm).

Exit status: 0 finished, 3 stopped at the deadline (resume with the same command), 130 stopped
by SIGTERM/SIGINT (the workdir is packed all the same), 2 preflight or usage error, 1 failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_BASELINE = os.path.join(REPO, "benchmarks", "torch_baseline.py")

# ----------------------------------------------------------------------------- the run's config

CONFIG = "configs/recipe_neon.py"  # Gaussian std 0.05, no biases, rate 0.05, GCN + ZCA
PAPER_EPOCHS = 350
CIFAR10_TRAIN = 50_000
ONE_DISPATCH_PER_EPOCH = 10_000  # log_every_steps >= an epoch's steps (382): one scan an epoch


def run_overrides(args: argparse.Namespace) -> list[str]:
  """The --config.* flags the run adds to CONFIG (the timing uses the same, bar the data)."""
  flags = [
      f"--config.num_epochs={args.epochs}",
      f"--config.model.dtype={args.dtype}",
      f"--config.log_every_steps={ONE_DISPATCH_PER_EPOCH}",
      f"--config.eval_batch_size={args.eval_batch_size}",
      "--config.tensorboard=False",
      "--config.checkpoint.keep=1",
      f"--config.checkpoint.every_epochs={args.checkpoint_every}",
  ]
  if args.dry_run:
    flags += DRY_RUN_OVERRIDES
  return flags


# The dry run: the same program on a CPU in seconds (XLA's convolutions, as on the GPU).
DRY_RUN_OVERRIDES = [
    "--config.model.width_multiplier=0.05",
    "--config.batch_size=32",
    "--config.data.validation_size=64",
    "--config.model.conv_impl=xla",
]
DRY_RUN = {"batch_size": 32, "validation_size": 64, "eval_batch_size": 64, "timing_steps": 4,
           "torch_steps": 2, "width_multiplier": 0.05}
DEVICE = {"batch_size": 128, "validation_size": 1000, "eval_batch_size": 1000,
          "torch_steps": 100, "width_multiplier": 1.0}

# ----------------------------------------------------------------------------- files

LOG = "accelerator.log"
TIMING = "timing.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
PACK = "workdir.tar"  # or workdir.tar.00, .01, ... when larger than PART_BYTES
PART_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB
OUTPUTS = (LOG, TIMING, RESULTS, METRICS)
CHECKSUMS = "allconv_sha256.json"  # written into a checkpoint step once it is complete
PACKED = ("config.json", "metrics.jsonl", "results.json")  # with the newest checkpoint

# ----------------------------------------------------------------------------- time reserves

PACK_RESERVE_SEC = 25.0  # after the trainer: the kill grace, packing, the files, exiting
KILL_GRACE_SEC = 10.0  # from SIGTERM at the hard deadline to SIGKILL
MIN_STOP_RESERVE_SEC = 30.0  # from the deadline's SIGTERM to the trainer's exit
STARTUP_EST_SEC = 30.0  # imports, CIFAR-10 read, GCN + ZCA fit, data to the device (estimate)
TAIL_EST_SEC = 10.0  # the test set and results.json after the last epoch (estimate)
EPOCH_OVERHEAD_EST_SEC = 0.1  # host round trips and checkpoint saves per epoch (estimate)
GOAL_SEC, MOONSHOT_SEC, GOAL_RATIO = 300.0, 120.0, 2.0

EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_DEADLINE, EXIT_SIGNAL = 0, 1, 2, 3, 130

LOOP_LINE = re.compile(r"^epoch \d+(/\d+ step \d+/\d+|: train loss)")  # the trainer's loop runs
EPOCH_LINE = re.compile(r"^epoch (\d+): train loss")
MODEL_LINE = re.compile(r"^\w+ \(width x[\d.]+, [\d,]+ parameters\)")
DATA_LINE = re.compile(r"^data: .*\(([\d.]+)s\)$")


class Fail(Exception):
  """A problem reported as one `error:` line (exit 2)."""


# ----------------------------------------------------------------------------- console


class Console:
  """Prints to stdout and appends to OUT/accelerator.log, line by line."""

  def __init__(self, log_path: str | None) -> None:
    self.file: IO[str] | None = open(log_path, "a") if log_path else None  # noqa: SIM115
    self.lock = threading.Lock()

  def say(self, text: str = "") -> None:
    with self.lock:
      for line in text.splitlines() or [""]:
        print(line, flush=True)
        if self.file:
          self.file.write(line + "\n")
          self.file.flush()

  def close(self) -> None:
    if self.file:
      self.file.close()


def now_iso() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_json(path: str, obj: Any) -> None:
  """JSON written atomically (a reader never sees half a file)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def read_metrics(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl records (lines that are not records are skipped)."""
  records = []
  with contextlib.suppress(OSError), open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        record = json.loads(line)
        if isinstance(record, dict) and "epoch" in record:
          records.append(record)
  return records


# ----------------------------------------------------------------------------- children


@dataclasses.dataclass
class Outcome:
  """How a child process ended."""
  code: int
  wall_sec: float
  stop: str | None  # None, 'deadline', 'hard deadline', 'signal'
  lines: list[tuple[float, str]]  # (seconds since start, line) of its output
  in_loop: bool  # whether its output showed a training loop


class Stopper:
  """SIGTERM/SIGINT to this program: the child being supervised is stopped the same way."""

  def __init__(self) -> None:
    self.requested = threading.Event()
    self.count = 0

  def handler(self, signum: int, _: Any) -> None:
    self.count += 1
    self.requested.set()

  @contextlib.contextmanager
  def installed(self) -> Any:
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    old = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def supervise(argv: Sequence[str], console: Console, *, env: dict[str, str] | None = None,
              soft: float | None = None, hard: float | None = None,
              stopper: Stopper | None = None, kill_grace: float = KILL_GRACE_SEC,
              echo: bool = True) -> Outcome:
  """Runs `argv` (output to the console, each line timestamped) until it exits.

  At `soft` (time.monotonic()) it gets SIGTERM once its output shows its training loop (a
  trainer stopped before its loop has nothing to save); at `hard`, SIGTERM whatever it is doing,
  then SIGKILL after `kill_grace` seconds. A stop request (the Stopper) sends SIGTERM at once;
  a second request, SIGKILL.
  """
  t0 = time.monotonic()
  proc = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
  lines: list[tuple[float, str]] = []
  in_loop = threading.Event()

  def read() -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
      line = raw.rstrip("\n")
      lines.append((time.monotonic() - t0, line))
      if LOOP_LINE.match(line):
        in_loop.set()
      if echo:
        console.say(line)

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  stop: str | None = None
  termed_at: float | None = None
  killed = False
  signals_seen = 0
  while proc.poll() is None:
    now = time.monotonic()
    if stopper is not None and stopper.count > signals_seen:
      signals_seen = stopper.count
      if termed_at is None:
        stop, termed_at = "signal", now
        proc.send_signal(signal.SIGTERM)
      elif not killed:
        proc.kill()
        killed = True
    elif termed_at is None and soft is not None and now >= soft and in_loop.is_set():
      stop, termed_at = "deadline", now
      console.say("accelerator: the deadline: SIGTERM to the trainer (it saves a checkpoint at "
                  "the end of its epoch and exits)")
      proc.send_signal(signal.SIGTERM)
    elif hard is not None and now >= hard:
      if termed_at is None:
        stop, termed_at = "hard deadline", now
        console.say("accelerator: the hard deadline: SIGTERM")
        proc.send_signal(signal.SIGTERM)
      elif not killed and now >= max(hard, termed_at) + kill_grace:
        console.say("accelerator: no exit after SIGTERM: SIGKILL (the newest complete "
                    "checkpoint is kept)")
        proc.kill()
        killed = True
    with contextlib.suppress(subprocess.TimeoutExpired):
      proc.wait(timeout=0.2)
  reader.join(timeout=5)
  return Outcome(proc.returncode, time.monotonic() - t0, stop, lines, in_loop.is_set())


def child_env(args: argparse.Namespace) -> dict[str, str]:
  """The environment of every child: unbuffered output, a persistent XLA cache (compilations
  and GPU autotuning shared between the timing and the run, and with a resumed command on a
  warm machine) and the shared GCN + ZCA statistics in the workroot, unless already set."""
  env = dict(os.environ)
  env["PYTHONUNBUFFERED"] = "1"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.workroot, "xla_cache"))
  env.setdefault("ALLCONV_CACHE_DIR", os.path.join(args.workroot, "statistics"))
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


# ----------------------------------------------------------------------------- preflight

REQUIRED = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "absl",
            "numpy")
CIFAR10_MARKERS = ("cifar-10-batches-py/test_batch", "cifar-10-batches-bin/test_batch.bin")

PROBE = r"""
import json, jax, jaxlib
d = jax.devices()
mem = None
try:
  mem = (d[0].memory_stats() or {}).get("bytes_limit")
except Exception:
  pass
print("PROBE " + json.dumps({"platform": d[0].platform, "device_kind": d[0].device_kind,
  "count": len(d), "jax": jax.__version__, "jaxlib": jaxlib.__version__, "memory_bytes": mem}))
"""


def missing_modules(names: Sequence[str]) -> list[str]:
  """The modules of `names` that cannot be imported here (found, not imported)."""
  out = []
  for name in names:
    try:
      found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      out.append(name)
  return out


def preflight(args: argparse.Namespace) -> list[str]:
  """What this machine lacks for the command, in words (empty: nothing)."""
  problems = []
  missing = missing_modules(REQUIRED)
  if missing:
    problems.append(f"python modules {', '.join(missing)} (on the accelerator machine: run "
                    "../shared/gpu/prepare.sh here, carry .gpu and start the command with "
                    "bash .gpu/run.sh)")
  if not any(os.path.exists(os.path.join(args.data_dir, m)) for m in CIFAR10_MARKERS):
    problems.append(f"no CIFAR-10 in --data_dir={args.data_dir} (cifar-10-batches-py/ or "
                    "cifar-10-batches-bin/; .gpu/run.sh rebuilds it in /tmp/cifar)")
  os.makedirs(args.workroot, exist_ok=True)
  free = shutil.disk_usage(args.workroot).free
  if free < 2**30:
    problems.append(f"{free / 2**30:.1f} GiB free in --workroot={args.workroot} (1 GiB needed)")
  return problems


def probe_device(args: argparse.Namespace, console: Console) -> dict[str, Any]:
  """jax's view of the devices, from a child (this process never holds the accelerator)."""
  out = supervise([sys.executable, "-c", PROBE], console, env=child_env(args), echo=False,
                  hard=time.monotonic() + 180)
  for _, line in out.lines:
    if line.startswith("PROBE "):
      return json.loads(line[len("PROBE "):])
  tail = " | ".join(line for _, line in out.lines[-3:])
  raise Fail(f"accelerator preflight: jax did not start (exit {out.code}): {tail}")


def describe_device(device: dict[str, Any]) -> str:
  mem = device.get("memory_bytes")
  return (f"{device['count']} x {device['device_kind']} ({device['platform']}"
          f"{f', {mem / 2**30:.0f} GiB for jax' if mem else ''}), jax {device['jax']}, "
          f"jaxlib {device['jaxlib']}")


# ----------------------------------------------------------------------------- timing


def timing_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
  """The timed configurations: float32 and bfloat16 at the run's batch, and the extra batch."""
  sizes = DRY_RUN if args.dry_run else DEVICE
  batch = sizes["batch_size"]

  def steps(b: int) -> int:
    if args.timing_steps:
      return args.timing_steps
    if args.dry_run:
      return DRY_RUN["timing_steps"]
    return max(1, (CIFAR10_TRAIN - DEVICE["validation_size"]) // b)  # an epoch: 382 at 128

  specs = [{"dtype": d, "batch_size": batch, "steps": steps(batch)}
           for d in ("float32", "bfloat16")]
  if args.extra_batch:
    specs.append({"dtype": "bfloat16", "batch_size": args.extra_batch,
                  "steps": steps(args.extra_batch)})
  return specs


def time_jax_child(spec_path: str) -> int:
  """The child behind --time_jax: each spec's train chunk compiled, run untimed, run timed
  (two epochs of steps), and the evaluation; results appended to the spec's JSON file."""
  sys.path.insert(0, REPO)
  with open(spec_path) as f:
    spec = json.load(f)
  from allconv_jax import cli
  from allconv_jax.errors import one_line
  from allconv_jax.tools import benchmark

  results: list[dict[str, Any]] = []
  for run in spec["runs"]:
    print(f"-- JAX: {run['dtype']}, batch {run['batch_size']}: compile, then one untimed and "
          f"one timed chunk of {run['steps']} steps", flush=True)
    t0 = time.perf_counter()
    try:
      config = cli.config_from_file(spec["config"], [
          *spec["overrides"], f"--config.model.dtype={run['dtype']}",
          f"--config.batch_size={run['batch_size']}"])
      out = benchmark.benchmark(config, run["steps"], warmup=1, repeats=1)
      kind = out["devices"].split(" x ", 1)[-1]
      peaks = benchmark.nominal_peak(kind)
      peak = None if peaks is None else peaks[0] if run["dtype"] == "bfloat16" else peaks[1]
      epoch_sec = out["chunk_sec"][0]
      record = {**run, "compile_sec": out["compile_sec"], "epoch_sec": epoch_sec,
                "step_ms": epoch_sec / run["steps"] * 1e3,
                "images_per_sec": out["images_per_sec"],
                "eval_images_per_sec": out["eval_images_per_sec"],
                "eval_batch_size": config.eval_batch_size, "tflops": out["tflops"],
                "peak_tflops": peak, "peak_fraction": out["tflops"] / peak if peak else None,
                "devices": out["devices"]}
    except Exception as e:  # noqa: BLE001 - recorded; the next configuration still runs
      record = {**run, "error": one_line(e)}
      print(f"error: JAX timing {run['dtype']} batch {run['batch_size']}: {one_line(e)}",
            flush=True)
    record["wall_sec"] = time.perf_counter() - t0
    results.append(record)
    write_json(spec["out"], results)
  return 0


def time_torch(args: argparse.Namespace, console: Console, stopper: Stopper,
               specs: list[dict[str, Any]], deadline: float) -> list[dict[str, Any]]:
  """benchmarks/torch_baseline.py at each spec's batch and precision (skipped without torch)."""
  if missing_modules(["torch"]):
    console.say("-- PyTorch: not installed here: the anchor is skipped")
    return [{**s, "error": "torch is not installed"} for s in specs]
  sizes = DRY_RUN if args.dry_run else DEVICE
  steps = args.torch_steps or sizes["torch_steps"]
  results = []
  for spec in specs:
    if stopper.requested.is_set() or time.monotonic() > deadline:
      results.append({**spec, "error": "skipped: no time left for it"})
      continue
    path = os.path.join(args.workroot, f"torch_{spec['dtype']}_{spec['batch_size']}.json")
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    argv = [sys.executable, TORCH_BASELINE, f"--batch_size={spec['batch_size']}",
            f"--steps={steps}", f"--warmup={max(1, steps // 5)}",
            f"--repeats={1 if args.dry_run else 3}", "--no-bias",
            f"--device={'cpu' if args.dry_run else 'cuda'}",
            f"--width_multiplier={sizes['width_multiplier']}", f"--json={path}"]
    if spec["dtype"] == "bfloat16":
      argv.append("--bf16")
    console.say(f"-- PyTorch eager: {spec['dtype']}, batch {spec['batch_size']}")
    out = supervise(argv, console, env=child_env(args), hard=deadline, stopper=stopper,
                    kill_grace=5)
    record = read_json(path)
    if out.code != 0 or not isinstance(record, dict):
      tail = " | ".join(line for _, line in out.lines[-2:])
      results.append({**spec, "error": f"exit {out.code}: {tail}"})
    else:
      results.append({**spec, **record, "wall_sec": out.wall_sec})
  return results


def ratios(jax_runs: list[dict[str, Any]], torch_runs: list[dict[str, Any]]) -> list[dict]:
  """JAX's images/s over PyTorch's at the same batch and precision."""
  out = []
  for j in jax_runs:
    for t in torch_runs:
      if (j["dtype"], j["batch_size"]) == (t["dtype"], t["batch_size"]) and \
          j.get("images_per_sec") and t.get("images_per_sec"):
        r = j["images_per_sec"] / t["images_per_sec"]
        out.append({"dtype": j["dtype"], "batch_size": j["batch_size"], "ratio": r,
                    "jax_images_per_sec": j["images_per_sec"],
                    "torch_images_per_sec": t["images_per_sec"], "goal": GOAL_RATIO,
                    "goal_met": r >= GOAL_RATIO})
  return out


def run_timing(args: argparse.Namespace, console: Console, stopper: Stopper,
               end: float | None) -> dict[str, Any]:
  """The timing phase: JAX in one child (a third of the time left at most), then PyTorch (the
  whole phase 45 % at most), so that the run keeps the larger part of the command."""
  specs = timing_specs(args)
  t0 = time.monotonic()
  left = end - t0 if end else 1e9
  jax_cap, cap = t0 + max(90.0, left / 3), t0 + max(120.0, 0.45 * left)
  spec_path = os.path.join(args.workroot, "timing_spec.json")
  result_path = os.path.join(args.workroot, "timing_jax.json")
  with contextlib.suppress(FileNotFoundError):
    os.remove(result_path)
  overrides = [f for f in run_overrides(args) if not f.startswith(("--config.model.dtype=",
                                                                    "--config.batch_size="))]
  write_json(spec_path, {"config": CONFIG, "overrides": overrides, "runs": specs,
                         "out": result_path})
  console.say(f"== timing: {len(specs)} JAX configurations (two epochs of steps each), then "
              "PyTorch eager at the same batch and precision")
  out = supervise([sys.executable, os.path.abspath(__file__), f"--time_jax={spec_path}"],
                  console, env=child_env(args), hard=jax_cap, stopper=stopper, kill_grace=5)
  jax_runs = read_json(result_path) or []
  done = {(r["dtype"], r["batch_size"]) for r in jax_runs}
  jax_runs += [{**s, "error": f"not timed (the timing child exited {out.code}"
                f"{', at its time cap' if out.stop else ''})"}
               for s in specs if (s["dtype"], s["batch_size"]) not in done]
  torch_runs = [] if not args.torch else time_torch(args, console, stopper, specs, cap)
  return {"jax": jax_runs, "torch": torch_runs, "ratios": ratios(jax_runs, torch_runs),
          "wall_sec": time.monotonic() - t0, "when": now_iso()}


# ----------------------------------------------------------------------------- sizing


def timed(timing: dict[str, Any] | None, dtype: str, batch: int) -> dict[str, Any] | None:
  """The JAX timing record of (dtype, batch), if it ran."""
  for r in (timing or {}).get("jax", []):
    if (r.get("dtype"), r.get("batch_size")) == (dtype, batch) and "images_per_sec" in r:
      return r
  return None


def epoch_estimate(record: dict[str, Any] | None, steps: int, val_images: int,
                   measured: float | None = None) -> float | None:
  """Seconds an epoch takes: measured in an earlier command, else the timed steps plus the
  validation set at the timed evaluation speed plus EPOCH_OVERHEAD_EST_SEC."""
  if measured:
    return measured
  if record is None:
    return None
  return (steps * record["step_ms"] / 1e3 + val_images / record["eval_images_per_sec"]
          + EPOCH_OVERHEAD_EST_SEC)


def make_plan(epochs_left: int, epochs: int, epoch_sec: float | None, compile_sec: float | None,
              fresh: bool, time_left: float | None) -> dict[str, Any]:
  """Whether the rest of the run fits in this command, and what it needs if not."""
  plan: dict[str, Any] = {"epochs_left": epochs_left, "epochs": epochs,
                          "epoch_sec_est": epoch_sec, "time_left_sec": time_left}
  if epoch_sec is None:
    plan.update(needed_sec=None, fits=None, note="no timing: no estimate")
    return plan
  startup = STARTUP_EST_SEC + (compile_sec or 30.0)
  needed = startup + epochs_left * epoch_sec + TAIL_EST_SEC
  plan.update(startup_sec_est=startup, needed_sec=needed,
              full_run_sec_est=startup + epochs * epoch_sec + TAIL_EST_SEC, fresh=fresh)
  if time_left is None:
    plan.update(fits=True, note="no deadline")
    return plan
  stop_reserve = max(MIN_STOP_RESERVE_SEC, 3 * epoch_sec)
  train_time = time_left - PACK_RESERVE_SEC - stop_reserve - startup
  fits = needed <= time_left - PACK_RESERVE_SEC
  plan.update(fits=fits, stop_reserve_sec=stop_reserve,
              epochs_this_command=epochs_left if fits else max(0, int(train_time / epoch_sec)))
  if not fits:
    rest = epochs_left - plan["epochs_this_command"]
    plan["next_command_sec_est"] = startup + rest * epoch_sec + TAIL_EST_SEC + PACK_RESERVE_SEC
  return plan


def deadlines(end: float | None, epoch_sec: float | None) -> tuple[float | None, float | None]:
  """(soft, hard) deadlines of the trainer for a command that must end by `end`."""
  if end is None:
    return None, None
  hard = end - PACK_RESERVE_SEC
  return hard - max(MIN_STOP_RESERVE_SEC, 3 * (epoch_sec or 0.0)), hard


# ----------------------------------------------------------------------------- the workdir


def complete_steps(workdir: str) -> list[int]:
  """Checkpoint steps whose save finished (their checksum file exists), oldest first."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.exists(os.path.join(folder, n, CHECKSUMS)))


def pack(workdir: str, out: str, scratch: str, part_bytes: int = PART_BYTES) -> list[str]:
  """Packs what a resume needs into OUT/workdir.tar (or .tar.00, .01, ... parts): the newest
  complete checkpoint, config.json, metrics.jsonl, results.json. Not the preprocessing
  statistics (refitted), older or unfinished checkpoints, or TensorBoard logs. Returns the
  names written ([] when there is no complete checkpoint)."""
  steps = complete_steps(workdir)
  if not steps:
    return []
  newest = steps[-1]
  best = read_json(os.path.join(workdir, "best_checkpoint.json"))
  names = [n for n in PACKED if os.path.exists(os.path.join(workdir, n))]
  if isinstance(best, dict) and best.get("step") == newest:
    names.append("best_checkpoint.json")  # else the marked step is not packed: the resumed
    # run marks a best again once validation improves (results use metrics.jsonl)
  tmp = os.path.join(scratch, PACK + ".tmp")
  with tarfile.open(tmp, "w") as tar:
    for name in names:
      tar.add(os.path.join(workdir, name), arcname=name)
    tar.add(os.path.join(workdir, "checkpoints", str(newest)),
            arcname=f"checkpoints/{newest}")
  for old in glob.glob(os.path.join(out, PACK + "*")):
    os.remove(old)
  size = os.path.getsize(tmp)
  if size <= part_bytes:
    shutil.move(tmp, os.path.join(out, PACK))
    return [PACK]
  written = []
  with open(tmp, "rb") as f:
    for i in range(math.ceil(size / part_bytes)):
      name = f"{PACK}.{i:02d}"
      with open(os.path.join(out, name), "wb") as part:
        part.write(f.read(part_bytes))
      written.append(name)
  os.remove(tmp)
  return written


def packed_parts(folder: str) -> list[str]:
  """The pack in `folder`: [workdir.tar] or its parts in order ([] when there is none)."""
  whole = os.path.join(folder, PACK)
  if os.path.exists(whole):
    return [whole]
  return sorted(p for p in glob.glob(os.path.join(folder, PACK + ".*"))
                if re.fullmatch(r"\d\d", p.rsplit(".", 1)[-1]))


def unpack(parts: list[str], workdir: str, scratch: str) -> None:
  """Restores a pack into `workdir` (which holds no checkpoint)."""
  joined = os.path.join(scratch, PACK + ".joined")
  with open(joined, "wb") as out:
    for p in parts:
      with open(p, "rb") as f:
        shutil.copyfileobj(f, out)
  os.makedirs(workdir, exist_ok=True)
  with tarfile.open(joined) as tar:
    tar.extractall(workdir, filter="data")
  os.remove(joined)


# ----------------------------------------------------------------------------- where the time went


def saved_epochs(records: list[dict[str, Any]], every: int, epochs: int) -> set[int]:
  """The epochs after which the trainer saved a checkpoint: a new best validation accuracy,
  every `every` epochs, and the last."""
  saved, best = set(), -1.0
  for r in records:
    e, acc = r["epoch"], r.get("val_accuracy")
    if acc is not None and acc > best:
      best = acc
      saved.add(e)
    if e % every == 0 or e == epochs:
      saved.add(e)
  return saved


def breakdown(lines: list[tuple[float, str]], wall: float, records: list[dict[str, Any]],
              record: dict[str, Any] | None, val_images: int, every: int,
              epochs: int) -> dict[str, Any]:
  """Where one trainer command's time went, from its timestamped console lines, the run's
  metrics and the timed step (`record`): start-up, compile, epochs (steps, evaluation, the
  rest), checkpoint saves, the tail; and the host round trips of an epoch."""
  out: dict[str, Any] = {"trainer_wall_sec": wall}
  t_model = next((t for t, line in lines if MODEL_LINE.match(line)), None)
  for t, line in lines:
    m = DATA_LINE.match(line)
    if m:
      out["data_line_sec"], out["data_and_preprocessing_sec"] = t, float(m.group(1))
  epoch_times = [(int(m.group(1)), t) for t, line in lines if (m := EPOCH_LINE.match(line))]
  out["startup_sec"] = t_model
  out["epochs_trained"] = len(epoch_times)
  if t_model is None or not epoch_times:
    return out
  first = epoch_times[0][1] - t_model
  deltas = {e: t - tp for (_, tp), (e, t) in zip(epoch_times, epoch_times[1:], strict=False)}
  out["first_epoch_sec"] = first
  out["tail_sec"] = wall - epoch_times[-1][1]
  if not deltas:
    return out
  by_epoch = {r["epoch"]: r for r in records}
  steps = next((r["step"] // r["epoch"] for r in records if r.get("epoch")), None)
  saved = saved_epochs(records, every, epochs)
  plain = [d for e, d in deltas.items() if e - 1 not in saved]
  after_save = [d for e, d in deltas.items() if e - 1 in saved]
  epoch = statistics.median(plain or after_save)
  out.update(epoch_sec=epoch, compile_sec_est=max(first - epoch, 0.0),
             epochs_with_a_save=len([e for e, _ in epoch_times if e in saved]),
             checkpoint_save_sec_est=(statistics.median(after_save) - epoch
                                      if plain and after_save else None))
  ips = [by_epoch[e]["images_per_sec"] for e, _ in epoch_times if e in by_epoch
         and "images_per_sec" in by_epoch[e]]
  if ips:
    out["images_per_sec_median"] = statistics.median(ips)
  if record is not None and steps:
    step_sec = steps * record["step_ms"] / 1e3
    eval_sec = val_images / record["eval_images_per_sec"]
    out.update(steps_per_epoch=steps, steps_sec=step_sec, eval_sec_est=eval_sec,
               other_sec=epoch - step_sec - eval_sec)
  chunks = math.ceil((steps or 1) / ONE_DISPATCH_PER_EPOCH)
  # train.py's epoch, read off its loop: dispatches of the epoch's batch order, its scan
  # chunk(s) and the validation scan; reads (each a wait for the device) of each chunk's
  # metrics and step counter, the validation metrics, the learning rate of the record and the
  # finiteness check; a checkpoint save on top after a new best and every --checkpoint_every.
  out["host_round_trips_per_epoch"] = {"dispatches": 2 + chunks,
                                       "device_to_host_reads": 2 * chunks + 3,
                                       "plus_on_checkpoint_epochs": "one save"}
  out["projected_full_run_sec"] = (t_model + out["compile_sec_est"] + epochs * epoch
                                   + (out["checkpoint_save_sec_est"] or 0.0) * len(saved)
                                   + out["tail_sec"])
  return out


def projected_parts(b: dict[str, Any], epochs: int) -> dict[str, float]:
  """The uninterrupted run's seconds by part, from one command's breakdown, largest first."""
  if "epoch_sec" not in b:
    return {}
  parts = {"start-up": b["startup_sec"], "compile": b["compile_sec_est"],
           "tail (test set, results)": b["tail_sec"]}
  if "steps_sec" in b:
    parts.update({"SGD steps": epochs * b["steps_sec"], "validation": epochs * b["eval_sec_est"],
                  "the rest of the epochs (host round trips, Python)": epochs * b["other_sec"]})
  else:
    parts["epochs"] = epochs * b["epoch_sec"]
  if b.get("checkpoint_save_sec_est"):
    share = b["epochs_with_a_save"] / max(b["epochs_trained"], 1)
    parts["checkpoint saves"] = epochs * share * b["checkpoint_save_sec_est"]
  return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def time_lines(b: dict[str, Any], epochs: int | None = None) -> list[str]:
  """The breakdown as a few console lines."""
  if "epoch_sec" not in b:
    return [f"where the time went: {b.get('epochs_trained', 0)} epoch line(s) only; "
            f"trainer wall {b['trainer_wall_sec']:.1f} s"]
  lines = [f"where the time went (trainer wall {b['trainer_wall_sec']:.1f} s): start-up "
           f"{b['startup_sec']:.1f} s (data + GCN/ZCA {b.get('data_and_preprocessing_sec', 0):.1f}"
           f" s), compile ~{b['compile_sec_est']:.1f} s, epoch {b['epoch_sec']:.3f} s x "
           f"{b['epochs_trained']}, tail {b['tail_sec']:.1f} s"]
  if "steps_sec" in b:
    lines.append(f"  one epoch: SGD steps {b['steps_sec']:.3f} s ({b['steps_per_epoch']} x the "
                 f"timed step), validation ~{b['eval_sec_est']:.3f} s, the rest "
                 f"{b['other_sec']:.3f} s (host round trips: "
                 f"{b['host_round_trips_per_epoch']['dispatches']} dispatches, "
                 f"{b['host_round_trips_per_epoch']['device_to_host_reads']} reads)")
  if b.get("checkpoint_save_sec_est") is not None:
    lines.append(f"  checkpoint saves: ~{b['checkpoint_save_sec_est']:.2f} s each after "
                 f"{b['epochs_with_a_save']} of these epochs (new best, every "
                 "--checkpoint_every, the last)")
  parts = projected_parts(b, epochs) if epochs else {}
  if parts:
    total = sum(parts.values())
    lines.append(f"  the {epochs}-epoch run at this pace, {total:.0f} s: " + ", ".join(
        f"{name} {sec:.0f} s ({sec / total:.0%})" for name, sec in parts.items()))
  return lines


# ----------------------------------------------------------------------------- the run


def paper_error(model: str = "all_cnn_c") -> float | None:
  sys.path.insert(0, REPO)
  from allconv_jax import paper  # pure data

  return paper.PAPER_TEST_ERROR.get((model, "cifar10", False))


def readme_line(results: dict[str, Any], total_sec: float) -> str:
  """'All-CNN-C, paper protocol, <GPU>: test error X % (paper 9.08 %), N minutes'."""
  gpu = results.get("devices", "?").split(" x ", 1)[-1]
  error = 100 * (1 - results["test_accuracy"])
  paper = paper_error(results.get("model", "all_cnn_c"))
  return (f"All-CNN-C, paper protocol, {gpu}: test error {error:.2f} % (paper "
          f"{paper if paper is not None else '?'} %), {total_sec / 60:.1f} minutes")


def trainer_argv(args: argparse.Namespace, workdir: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, "main.py"), f"--config={CONFIG}",
          f"--workdir={workdir}", "--config.data.source=local",
          f"--config.data.dir={os.path.abspath(args.data_dir)}", *run_overrides(args)]


def prepare_workdir(args: argparse.Namespace, workdir: str) -> str:
  """Where the run resumes from: this machine's workdir, a carried pack, or nothing."""
  if complete_steps(workdir):
    return f"resuming in {workdir} (this machine's workdir, newest checkpoint step " \
           f"{complete_steps(workdir)[-1]})"
  parts = packed_parts(args.resume_from)
  if parts:
    if os.path.isdir(workdir):
      shutil.rmtree(workdir)
    unpack(parts, workdir, args.workroot)
    return (f"resuming from the carried pack {', '.join(os.path.basename(p) for p in parts)} "
            f"in {args.resume_from} (checkpoint step {complete_steps(workdir)[-1]})")
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)  # a start that saved nothing
  return "a fresh run"


def previous_state(args: argparse.Namespace, mode: str, device: dict[str, Any]) -> dict:
  """The timing.json of this run's earlier commands: the workroot's (a warm machine) or the
  carried one; {} when none is of this mode and device."""
  for folder in (args.workroot, args.resume_from):
    state = read_json(os.path.join(folder, TIMING))
    if isinstance(state, dict) and state.get("mode") == mode and \
        state.get("device", {}).get("device_kind") == device["device_kind"]:
      return state
  return {}


def main_run(args: argparse.Namespace) -> int:
  """The command: preflight, timing, the run, the files."""
  t_start = time.monotonic()
  if args.end_by:
    args.budget = args.end_by - time.time()
    if args.budget < 2 * PACK_RESERVE_SEC:
      print(f"error: --end_by leaves {args.budget:.0f} s (at least {2 * PACK_RESERVE_SEC:g} s "
            "needed)", file=sys.stderr, flush=True)
      return EXIT_USAGE
  end = t_start + args.budget if args.budget else None
  mode = "dry_run" if args.dry_run else "device"
  os.makedirs(args.out, exist_ok=True)
  for name in (*OUTPUTS, *[os.path.basename(p) for p in glob.glob(os.path.join(args.out,
                                                                               PACK + "*"))]):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(args.out, name))
  console = Console(os.path.join(args.out, LOG))
  stopper = Stopper()
  try:
    with stopper.installed():
      return command(args, console, stopper, t_start, end, mode)
  except Fail as e:
    console.say(f"error: {e}")
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_USAGE
  finally:
    console.close()


def command(args: argparse.Namespace, console: Console, stopper: Stopper, t_start: float,
            end: float | None, mode: str) -> int:
  console.say(f"== accelerator: {mode}, {now_iso()}, host {socket.gethostname()}, budget "
              f"{f'{args.budget:.0f} s' if args.budget else 'none'}, out {args.out}")
  problems = preflight(args)
  if problems:
    raise Fail("accelerator preflight: " + "; ".join(problems))
  device = probe_device(args, console)
  console.say(f"device: {describe_device(device)}")
  if device["platform"] == "cpu" and not args.dry_run:
    raise Fail("accelerator preflight: jax sees no accelerator (platform cpu); on a CPU use "
               "--dry_run")
  state = previous_state(args, mode, device)
  segments: list[dict[str, Any]] = list(state.get("runs", []))
  state = {"mode": mode, "config": CONFIG, "overrides": run_overrides(args), "device": device,
           "timing": state.get("timing"), "runs": segments}
  timing_path = os.path.join(args.out, TIMING)
  workroot_timing = os.path.join(args.workroot, TIMING)

  def save_state() -> None:
    write_json(timing_path, state)
    write_json(workroot_timing, state)

  do_timing = args.timing if args.timing is not None else state["timing"] is None
  if do_timing:
    state["timing"] = run_timing(args, console, stopper, end)
    save_state()
  elif state["timing"]:
    console.say(f"== timing: reusing the timing of {state['timing'].get('when', 'earlier')}")
  for line in timing_summary(state["timing"]):
    console.say(line)
  if stopper.requested.is_set():
    save_state()
    console.say("accelerator: stopped by a signal before the run")
    return EXIT_SIGNAL
  if not args.run:
    save_state()
    return EXIT_FINISHED
  return train(args, console, stopper, state, save_state, end)


def timing_summary(timing: dict[str, Any] | None) -> list[str]:
  """A few lines: each timed configuration, PyTorch's figures and the ratios."""
  if not timing:
    return ["timing: none"]
  lines = []
  for r in timing.get("jax", []):
    if "error" in r:
      lines.append(f"JAX {r['dtype']} batch {r['batch_size']}: {r['error']}")
      continue
    peak = f", {r['peak_fraction']:.1%} of the nominal peak" if r.get("peak_fraction") else ""
    lines.append(f"JAX {r['dtype']} batch {r['batch_size']}: compile {r['compile_sec']:.1f} s, "
                 f"epoch of {r['steps']} steps {r['epoch_sec']:.2f} s ({r['step_ms']:.2f} "
                 f"ms/step), {r['images_per_sec']:,.0f} images/s, {r['tflops']:.1f} TFLOP/s"
                 f"{peak}; eval {r['eval_images_per_sec']:,.0f} images/s")
  for r in timing.get("torch", []):
    lines.append(f"PyTorch {r['dtype']} batch {r['batch_size']}: " + (
        r["error"] if "error" in r else
        f"{r['images_per_sec']:,.0f} images/s ({r['format']}, {r['precision']})"))
  for r in timing.get("ratios", []):
    lines.append(f"ratio JAX / PyTorch, {r['dtype']} batch {r['batch_size']}: {r['ratio']:.2f} "
                 f"(goal >= {GOAL_RATIO:g}: {'met' if r['goal_met'] else 'missed'})")
  return lines


def train(args: argparse.Namespace, console: Console, stopper: Stopper, state: dict[str, Any],
          save_state: Callable[[], None], end: float | None) -> int:
  """The run: resume or start, supervised to its deadline, then the files and the summary."""
  workdir = os.path.join(args.workroot, "dry_run" if args.dry_run else "run")
  how = prepare_workdir(args, workdir)
  records = read_metrics(os.path.join(workdir, METRICS))
  if not complete_steps(workdir):
    state["runs"].clear()  # a fresh run: earlier commands' segments were of another run
  done = max((r["epoch"] for r in records), default=0)
  sizes = DRY_RUN if args.dry_run else DEVICE
  record = timed(state["timing"], args.dtype, sizes["batch_size"])
  steps = max(1, (CIFAR10_TRAIN - DEVICE["validation_size"]) // DEVICE["batch_size"]) \
      if not args.dry_run else (record or {}).get("steps", 1)
  measured = [s["breakdown"].get("epoch_sec") for s in state["runs"]
              if s.get("breakdown", {}).get("epoch_sec")]
  epoch_sec = epoch_estimate(record, steps, sizes["validation_size"],
                             measured[-1] if measured else None)
  time_left = end - time.monotonic() if end else None
  plan = make_plan(args.epochs - done, args.epochs, epoch_sec,
                   record["compile_sec"] if record else None, not records, time_left)
  console.say(f"== run: {CONFIG} {' '.join(run_overrides(args))}; {how}; {done} of "
              f"{args.epochs} epochs done")
  console.say(plan_line(plan))
  if plan.get("fits") is False and plan.get("epochs_this_command") == 0 and done < args.epochs:
    console.say("accelerator: too little time left in this command to train an epoch; run the "
                "same command again with a larger --budget")
    state["plan"] = plan
    save_state()
    return EXIT_DEADLINE
  soft, hard = deadlines(end, epoch_sec)
  t0 = now_iso()
  outcome = supervise(trainer_argv(args, workdir), console, env=child_env(args), soft=soft,
                      hard=hard, stopper=stopper)
  records = read_metrics(os.path.join(workdir, METRICS))
  after = max((r["epoch"] for r in records), default=0)
  results = read_json(os.path.join(workdir, RESULTS))
  finished = outcome.code == 0 and isinstance(results, dict) and results.get("epochs") == \
      args.epochs
  status = "finished" if finished else "stopped" if outcome.code == 130 else "failed"
  segment = {"segment": len(state["runs"]) + 1, "started": t0, "how": how,
             "budget_sec": args.budget or None, "plan": plan, "exit_code": outcome.code,
             "stop": outcome.stop, "status": status, "epochs_before": done,
             "epochs_after": after,
             "breakdown": breakdown(outcome.lines, outcome.wall_sec, records, record,
                                    sizes["validation_size"], args.checkpoint_every,
                                    args.epochs)}
  state["runs"].append(segment)
  state["plan"] = plan
  if os.path.exists(os.path.join(workdir, METRICS)):
    shutil.copyfile(os.path.join(workdir, METRICS), os.path.join(args.out, METRICS))
  packed: list[str] = []
  if finished:
    shutil.copyfile(os.path.join(workdir, RESULTS), os.path.join(args.out, RESULTS))
  else:
    packed = pack(workdir, args.out, args.workroot)
  state["summary"] = summary(state, results if finished else None)
  save_state()
  for line in time_lines(segment["breakdown"], args.epochs):
    console.say(line)
  for line in final_lines(state, segment, packed, args):
    console.say(line)
  if finished:
    return EXIT_FINISHED
  if status == "stopped":
    return EXIT_SIGNAL if outcome.stop == "signal" else EXIT_DEADLINE
  return EXIT_FAILED


def plan_line(plan: dict[str, Any]) -> str:
  if plan.get("needed_sec") is None:
    return f"plan: {plan.get('note')}"
  head = (f"plan: {plan['epochs_left']} epoch(s) left at ~{plan['epoch_sec_est']:.3f} s each "
          f"+ ~{plan['startup_sec_est']:.0f} s start-up and compile: ~{plan['needed_sec']:.0f} s"
          f" (the whole {plan['epochs']}-epoch run ~{plan['full_run_sec_est'] / 60:.1f} min)")
  if plan["time_left_sec"] is None:
    return head + "; no deadline"
  if plan["fits"]:
    return head + f"; fits in the {plan['time_left_sec']:.0f} s left"
  return (head + f"; does not fit in the {plan['time_left_sec']:.0f} s left: about "
          f"{plan['epochs_this_command']} epoch(s) now, then a second command of about "
          f"{plan['next_command_sec_est']:.0f} s resumes")


def summary(state: dict[str, Any], results: dict[str, Any] | None) -> dict[str, Any]:
  """The run so far: its commands' trainer wall time, the goals, the README line."""
  segs = state["runs"]
  total = sum(s["breakdown"]["trainer_wall_sec"] for s in segs)
  last = segs[-1]["breakdown"] if segs else {}
  out: dict[str, Any] = {"commands": len(segs), "trainer_wall_sec_total": total,
                         "finished": results is not None,
                         "epochs_done": segs[-1]["epochs_after"] if segs else 0,
                         "goal_sec": GOAL_SEC, "moonshot_sec": MOONSHOT_SEC}
  if last.get("projected_full_run_sec"):
    # a resumed command starts warm (caches): take the slowest start of the run's commands
    starts = [s["breakdown"]["startup_sec"] + s["breakdown"]["compile_sec_est"] for s in segs
              if s["breakdown"].get("compile_sec_est") is not None]
    out["projected_full_run_sec"] = (last["projected_full_run_sec"] + max(starts)
                                     - last["startup_sec"] - last["compile_sec_est"])
  judged = total if results is not None and len(segs) == 1 else out.get("projected_full_run_sec")
  if judged:
    out["judged_sec"] = judged
    out["goal_met"] = judged < GOAL_SEC
    out["moonshot_met"] = judged < MOONSHOT_SEC
  if results is not None:
    out["test_accuracy"] = results["test_accuracy"]
    out["test_error_percent"] = 100 * (1 - results["test_accuracy"])
    out["devices"] = results.get("devices")
    out["readme_line"] = readme_line(results, total)
  return out


def final_lines(state: dict[str, Any], segment: dict[str, Any], packed: list[str],
                args: argparse.Namespace) -> list[str]:
  """The summary printed last (the device tool returns the end of the output)."""
  s = state["summary"]
  lines = ["== accelerator summary", f"device: {describe_device(state['device'])}"]
  lines += timing_summary(state["timing"])
  lines.append(f"run: {segment['status']} ({segment['stop'] or 'no stop'}), epochs "
               f"{segment['epochs_before']} -> {segment['epochs_after']} of {args.epochs}, this "
               f"command's trainer {segment['breakdown']['trainer_wall_sec']:.1f} s, all commands "
               f"{s['trainer_wall_sec_total']:.1f} s")
  if "judged_sec" in s:
    which = "measured" if s["finished"] and s["commands"] == 1 else "projected"
    lines.append(f"speed: the {args.epochs}-epoch run, compile included: {which} "
                 f"{s['judged_sec'] / 60:.2f} min (goal < {GOAL_SEC / 60:g} min: "
                 f"{'met' if s['goal_met'] else 'missed'}; moonshot < {MOONSHOT_SEC / 60:g} "
                 f"min: {'met' if s['moonshot_met'] else 'missed'})")
  if s.get("readme_line"):
    label = "README (a dry run: not a result)" if args.dry_run else "README"
    lines.append(f"{label}: {s['readme_line']}")
  files = sorted(os.listdir(args.out))
  lines.append(f"files in {args.out}: {', '.join(files)}")
  if segment["status"] != "finished" and packed:
    lines.append(f"resume: copy every file above into {args.resume_from}/ (or keep the machine "
                 f"warm), carry it, and run the same command again"
                 + (f" (about {state['plan']['next_command_sec_est']:.0f} s)"
                    if state["plan"].get("next_command_sec_est") else ""))
  elif segment["status"] != "finished":
    lines.append("resume: no complete checkpoint to pack; running the same command again "
                 "starts the run afresh")
  return lines


# ----------------------------------------------------------------------------- the program


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="docs/accelerator.md says how a device session calls it.")
  parser.add_argument("--out", default=os.environ.get("OUT"),
                      help="folder for the files that come back (default: $OUT)")
  parser.add_argument("--budget", type=float, default=540.0,
                      help="seconds this command may take from its start (0: no deadline); "
                           "the device tool's limit is 600 s a command, and .gpu/run.sh takes "
                           "some of it first")
  parser.add_argument("--end_by", type=float, default=0.0,
                      help="unix time by which this command must end, instead of --budget "
                           "(e.g. $(($(date +%%s)+570)) before .gpu/run.sh: its set-up counts)")
  parser.add_argument("--data_dir", default="/tmp/cifar",
                      help="folder holding cifar-10-batches-py/ (.gpu/run.sh makes /tmp/cifar)")
  parser.add_argument("--workroot", default="/tmp/allconv_accelerator",
                      help="the run's workdir, XLA cache and statistics (not sent back)")
  parser.add_argument("--resume_from", default=os.path.join(REPO, "workdirs", "accelerator"),
                      help="folder with the files an earlier command sent back (its "
                           "workdir.tar and timing.json), carried to resume")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                      help="the run's compute dtype (parameters stay float32)")
  parser.add_argument("--epochs", type=int, default=None,
                      help=f"epochs of the run (default {PAPER_EPOCHS}; 1 with --dry_run)")
  parser.add_argument("--checkpoint_every", type=int, default=25,
                      help="a checkpoint every this many epochs (and at each new best)")
  parser.add_argument("--eval_batch_size", type=int, default=None,
                      help="evaluation batch (default 1000: the validation set in one batch)")
  parser.add_argument("--extra_batch", type=int, default=0,
                      help="also time bfloat16 at this batch size (0: no)")
  parser.add_argument("--timing", action=argparse.BooleanOptionalAction, default=None,
                      help="time JAX and PyTorch first (default: unless an earlier command of "
                           "this run did)")
  parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                      help="time PyTorch's eager All-CNN-C as the anchor")
  parser.add_argument("--run", action=argparse.BooleanOptionalAction, default=True,
                      help="train after the timing")
  parser.add_argument("--timing_steps", type=int, default=0,
                      help="steps per timed JAX chunk (default: an epoch's, 4 with --dry_run)")
  parser.add_argument("--torch_steps", type=int, default=0,
                      help="steps per timed PyTorch run (default 100, 2 with --dry_run)")
  parser.add_argument("--dry_run", action="store_true",
                      help="the same program at width x0.05 on a CPU (tiny data in --data_dir)")
  parser.add_argument("--time_jax", default="", help=argparse.SUPPRESS)  # the timing child
  args = parser.parse_args(argv)
  if args.time_jax:
    return args
  if not args.out:
    parser.error("--out is required (or set $OUT)")
  if args.epochs is None:
    args.epochs = 1 if args.dry_run else PAPER_EPOCHS
  if args.eval_batch_size is None:
    args.eval_batch_size = (DRY_RUN if args.dry_run else DEVICE)["eval_batch_size"]
  for name in ("epochs", "checkpoint_every", "eval_batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  for name in ("budget", "end_by", "extra_batch", "timing_steps", "torch_steps"):
    if getattr(args, name) < 0:
      parser.error(f"--{name} must be >= 0")
  if args.budget and args.budget < 2 * PACK_RESERVE_SEC:
    parser.error(f"--budget must be 0 or at least {2 * PACK_RESERVE_SEC:g} s")
  args.out = os.path.abspath(args.out)
  args.workroot = os.path.abspath(args.workroot)
  args.resume_from = os.path.abspath(args.resume_from)
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.time_jax:
    return time_jax_child(args.time_jax)
  return main_run(args)


if __name__ == "__main__":
  sys.exit(main())
