r"""The accelerator run of issue 27 in one command (docs/accelerator.md): preflight, the device,
two timed epochs of full-width All-CNN-C in float32 and bfloat16 against PyTorch's eager
All-CNN-C, then the paper's protocol (configs/recipe_neon.py, 350 epochs) until a deadline, where
the trainer gets SIGTERM, saves a checkpoint and exits. What a resume needs is packed under OUT;
the same command resumes the run. Exit status: 0 finished, 3 stopped at the deadline (run the
same command again), 130 stopped by a signal (packed all the same), 2 preflight error, 1 failure.

  bash .gpu/run.sh python3 benchmarks/accelerator.py --out=$OUT --end_by=$(($(date +%s)+570))
  python3 benchmarks/accelerator.py --dry_run --data_dir=/tmp/tiny_cifar --out=/tmp/acc/out \
      --workroot=/tmp/acc/work --resume_from=/tmp/acc/carry       # the same, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/recipe_neon.py"  # Gaussian std 0.05, no biases, rate 0.05, GCN + ZCA
LOG, TIMING, METRICS, RESULTS, PACK = ("accelerator.log", "timing.json", "metrics.jsonl",
                                       "results.json", "workdir.tar")
CHECKSUMS = "allconv_sha256.json"  # written into a checkpoint step once its save is complete
EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_DEADLINE, EXIT_SIGNAL = 0, 1, 2, 3, 130
PACK_SEC = 15.0  # the command's last seconds: the trainer is gone; pack, write, exit
STOP_SEC = 40.0  # before those, from the deadline's SIGTERM: the epoch's end, a save, the exit
GOAL_SEC, MOONSHOT_SEC, GOAL_RATIO = 300.0, 120.0, 2.0
# train.py's epoch as one lax.scan: dispatches of the batch order, the scan and the validation
# scan; reads that wait for the device: the scan's metrics and step counter, the validation
# metrics, the record's learning rate, the finiteness check.
ROUND_TRIPS = {"dispatches": 3, "device_to_host_reads": 5}
SIZES = {False: {"width": 1.0, "batch": 128, "val": 1000, "epochs": 350, "torch_steps": 100},
         True: {"width": 0.05, "batch": 32, "val": 64, "epochs": 1, "torch_steps": 2}}  # dry run
LOG_FILE: list[Any] = []  # OUT/accelerator.log once open: our lines and the children's output
CHILD: list[subprocess.Popen] = []  # the newest child
SIGNALLED: list[int] = []  # SIGTERM and SIGINT received


class Fail(Exception):
  """A preflight or usage problem: one `error:` line, exit 2."""


def say(title: str, value: Any = "") -> None:
  """`title: value` (a dict as `key value, ...`, numbers to 3 decimals) on stdout and in the log."""
  def text(v: Any) -> str:
    return str(round(v, 3) if isinstance(v, float) else v)
  if value != "":
    title += ": " + (", ".join(f"{k} {text(v)}" for k, v in value.items())
                     if isinstance(value, dict) else text(value))
  for f in (sys.stdout, *LOG_FILE):
    print(title, file=f, flush=True)


def read_json(path: str) -> Any:
  with contextlib.suppress(OSError, json.JSONDecodeError), open(path) as f:
    return json.load(f)
  return None


def write_json(path: str, obj: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The run's metrics.jsonl records (flat JSON objects, one a line)."""
  with contextlib.suppress(FileNotFoundError), open(os.path.join(workdir, METRICS)) as f:
    return [json.loads(x) for x in f if x.rstrip().endswith("}")]  # not one a kill cut short
  return []


def overrides(args: argparse.Namespace) -> list[str]:
  """What the run adds to CONFIG: one scan dispatch an epoch (log_every_steps past an epoch's
  382 steps), the validation set in one batch, fewer and smaller saves."""
  s = SIZES[args.dry_run]
  flags = [f"--config.num_epochs={args.epochs}", f"--config.model.dtype={args.dtype}",
           "--config.log_every_steps=10000", f"--config.eval_batch_size={s['val']}",
           "--config.tensorboard=False", "--config.checkpoint.keep=1",
           "--config.checkpoint.every_epochs=25"]
  return flags + ([f"--config.model.width_multiplier={s['width']}",
                   f"--config.batch_size={s['batch']}", f"--config.data.validation_size="
                   f"{s['val']}", "--config.model.conv_impl=xla"] if args.dry_run else [])


def on_signal(signum: int, _: Any) -> None:
  """SIGTERM goes on to the child (Ctrl-C in a terminal reaches it by itself)."""
  SIGNALLED.append(signum)
  if signum == signal.SIGTERM and CHILD and SIGNALLED.count(signal.SIGTERM) == 1:
    CHILD[0].send_signal(signal.SIGTERM)  # (a no-op once it has exited)


def run_child(argv: list[str], env: dict[str, str], stop_at: float,
              grace: float = 5.0) -> tuple[int, bool]:
  """Runs `argv`, its output into the log: SIGTERM at `stop_at` (time.monotonic()), SIGKILL
  `grace` seconds later. Returns its exit status and whether the deadline stopped it."""
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=LOG_FILE[0], stderr=subprocess.STDOUT)
  CHILD[:] = [proc]
  if SIGNALLED:  # a stop asked for before it started
    proc.send_signal(signal.SIGTERM)
  try:
    return proc.wait(timeout=max(0.0, stop_at - time.monotonic())), False
  except subprocess.TimeoutExpired:
    say(f"accelerator: the deadline: SIGTERM to {os.path.basename(argv[1])}")
    if not SIGNALLED:  # (a second SIGTERM would make the trainer exit without saving)
      proc.send_signal(signal.SIGTERM)
  try:
    return proc.wait(timeout=grace), True
  except subprocess.TimeoutExpired:
    say("accelerator: no exit: SIGKILL (the newest complete checkpoint is kept)")
    proc.kill()
    return proc.wait(), True


# ----------------------------------------------------------------------------- 1. preflight


def preflight(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
  """The CIFAR-10 folder; the trainer's modules and jax's device, from a child (this process
  never holds the device). Fail says what is missing."""
  if not any(os.path.exists(os.path.join(args.data_dir, m)) for m in (
      "cifar-10-batches-py/test_batch", "cifar-10-batches-bin/test_batch.bin")):
    raise Fail(f"accelerator preflight: no CIFAR-10 in --data_dir={args.data_dir} (cifar-10-"
               "batches-py/ or cifar-10-batches-bin/; .gpu/run.sh rebuilds it in /tmp/cifar)")
  probe = ("import json, flax, optax, orbax.checkpoint, ml_collections, absl, jax, jaxlib; d = "
           "jax.devices(); print(json.dumps({'platform': d[0].platform, 'device_kind': d[0]."
           "device_kind, 'count': len(d), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__}))")
  try:
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=180, check=True).stdout
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
    tail = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
    raise Fail(f"accelerator preflight: {(tail.strip().splitlines() or [str(e)])[-1]} (on the "
               "accelerator machine: run ../shared/gpu/prepare.sh here, carry .gpu and start "
               "with bash .gpu/run.sh)") from None
  device = json.loads(out.strip().splitlines()[-1])
  if device["platform"] == "cpu" and not args.dry_run:
    raise Fail("accelerator preflight: jax sees no accelerator (platform cpu); use --dry_run")
  return device


# ----------------------------------------------------------------------------- 2. timing


def time_jax(spec: dict[str, Any]) -> None:
  """The timing child: per dtype, train.py's jitted epoch chunk compiled, run once untimed and
  once timed, and the evaluation (allconv_jax.tools.benchmark); records into spec['out']."""
  from allconv_jax import cli, errors
  from allconv_jax.tools import benchmark

  records = []
  for dtype in ("float32", "bfloat16"):
    try:
      config = cli.config_from_file(CONFIG, [*spec["overrides"], f"--config.model.dtype={dtype}"])
      out = benchmark.benchmark(config, spec["steps"], warmup=1, repeats=1)
      records.append({"dtype": dtype, "batch_size": config.batch_size, "steps": spec["steps"],
                      "step_ms": out["chunk_sec"][0] / spec["steps"] * 1e3, **{k: out[k] for k in (
                          "compile_sec", "images_per_sec", "eval_images_per_sec", "tflops")}})
    except Exception as e:  # noqa: BLE001 - said; the next dtype still runs
      say(f"error: JAX timing {dtype}: {errors.one_line(e)}")
    write_json(spec["out"], records)


def run_timing(args: argparse.Namespace, env: dict[str, str], end: float) -> dict[str, Any]:
  """JAX in one child, then PyTorch at the same batch and precisions (benchmarks/
  torch_baseline.py); in 45 % of the time left at most, so that the run keeps the larger part."""
  s, t0 = SIZES[args.dry_run], time.monotonic()
  cap, out = t0 + 0.45 * (end - t0), os.path.join(args.workroot, "timing_jax.json")
  write_json(out, [])
  spec = {"steps": 4 if args.dry_run else 49_000 // s["batch"], "out": out,
          "overrides": [f for f in overrides(args) if "model.dtype" not in f]}
  say("== timing: JAX in float32 and bfloat16, then PyTorch eager at the same batch")
  run_child([sys.executable, "-c", f"from benchmarks import accelerator; accelerator.time_jax("
             f"{spec!r})"], env, cap)
  timing: dict[str, Any] = {"jax": read_json(out) or [], "torch": [],
                            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  for dtype in ("float32", "bfloat16") if importlib.util.find_spec("torch") else ():
    path = os.path.join(args.workroot, f"torch_{dtype}.json")
    code, _ = run_child([sys.executable, os.path.join(REPO, "benchmarks", "torch_baseline.py"),
                         f"--batch_size={s['batch']}", f"--steps={s['torch_steps']}", "--no-bias",
                         f"--device={'cpu' if args.dry_run else 'cuda'}", f"--json={path}",
                         f"--width_multiplier={s['width']}",
                         *(["--bf16"] if dtype == "bfloat16" else [])], env, cap)
    if code == 0 and isinstance(record := read_json(path), dict):
      timing["torch"].append(record)
  torch_ips = {t["dtype"]: t["images_per_sec"] for t in timing["torch"]}
  timing["ratio_to_pytorch"] = {j["dtype"]: j["images_per_sec"] / torch_ips[j["dtype"]]
                                for j in timing["jax"] if j["dtype"] in torch_ips}
  timing["wall_sec"] = time.monotonic() - t0
  return timing


# ----------------------------------------------------------------------------- 3. the run


def complete_steps(workdir: str) -> list[int]:
  """Checkpoint steps whose save finished (their checksum file exists), oldest first."""
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                if os.path.exists(os.path.join(folder, n, CHECKSUMS)))


def prepare_workdir(args: argparse.Namespace, workdir: str) -> str:
  """The carried pack (what the last command sent back) if there is one, else what this
  machine's workdir holds (a warm machine's, or nothing)."""
  carried = os.path.join(args.resume_from, PACK)
  if not os.path.exists(carried):
    return "resuming in this machine's workdir" if complete_steps(workdir) else "a fresh run"
  shutil.rmtree(workdir, ignore_errors=True)
  with tarfile.open(carried) as tar:
    tar.extractall(workdir, filter="data")
  return f"resuming from the carried pack {carried}"


def pack(workdir: str, out: str) -> bool:
  """OUT/workdir.tar: the newest complete checkpoint (9.7 MiB at full width: one file under the
  16 MiB the device tool returns), config.json and metrics.jsonl; not the GCN + ZCA statistics
  (37 MB; the resumed run fits them again) nor older checkpoints."""
  steps = complete_steps(workdir)
  if steps:
    with tarfile.open(os.path.join(out, PACK), "w") as tar:
      for name in ("config.json", METRICS, f"checkpoints/{steps[-1]}"):
        tar.add(os.path.join(workdir, name), arcname=name)
  return bool(steps)


def breakdown(mine: list[dict[str, Any]], step0: int, elapsed0: float, wall: float,
              args: argparse.Namespace, timing: dict[str, Any]) -> dict[str, Any]:
  """Where one trainer command's time went, in seconds (the last three: of an epoch), from its
  metrics records (each epoch's images/s and the loop's elapsed seconds) and the timed step."""
  out: dict[str, Any] = {"trainer_wall_sec": wall, "epochs_trained": len(mine)}
  if len(mine) < 2:
    return out
  s, loop = SIZES[args.dry_run], mine[-1]["elapsed_sec"] - elapsed0
  steps = [step0] + [r["step"] for r in mine]
  epochs = [(b - a) * s["batch"] / r["images_per_sec"]
            for a, b, r in zip(steps, steps[1:], mine, strict=False)]
  epoch = statistics.median(epochs[1:])
  out.update(outside_epochs_sec=wall - loop, compile_sec=max(epochs[0] - epoch, 0.0),
             epoch_sec=epoch, saves_and_logging_per_epoch_sec=(loop - sum(epochs)) / len(epochs))
  if timed := next((r for r in timing["jax"] if r["dtype"] == args.dtype), None):
    out["sgd_steps_sec"] = mine[-1]["step"] // mine[-1]["epoch"] * timed["step_ms"] / 1e3
    out["validation_sec"] = s["val"] / timed["eval_images_per_sec"]
    out["rest_sec"] = epoch - out["sgd_steps_sec"] - out["validation_sec"]  # host round trips
  return out


def train(args: argparse.Namespace, env: dict[str, str], state: dict[str, Any],
          end: float) -> int:
  """The run: resumed or started, stopped at the deadline, then finished or packed."""
  workdir = os.path.join(args.workroot, state["mode"])
  how = prepare_workdir(args, workdir)
  step0 = (complete_steps(workdir) or [0])[-1]
  state["runs"] = state["runs"] if step0 else []  # a fresh run: earlier ones were another run
  done = [r for r in read_metrics(workdir) if r["step"] <= step0]
  before = done[-1]["epoch"] if done else 0
  say(f"== run: {CONFIG} {' '.join(overrides(args))}; {how}; {before} of {args.epochs} epochs "
      f"done; SIGTERM in {end - PACK_SEC - STOP_SEC - time.monotonic():.0f} s")
  t0 = time.monotonic()
  code, deadline = run_child([
      sys.executable, os.path.join(REPO, "main.py"), f"--config={CONFIG}", f"--workdir={workdir}",
      "--config.data.source=local", f"--config.data.dir={os.path.abspath(args.data_dir)}",
      *overrides(args)], env, end - PACK_SEC - STOP_SEC, STOP_SEC)
  records, results = read_metrics(workdir), read_json(os.path.join(workdir, RESULTS))
  finished = code == 0 and isinstance(results, dict) and results.get("epochs") == args.epochs
  stop = "signal" if SIGNALLED else "deadline" if deadline else None
  state["runs"].append({
      "how": how, "exit_code": code, "stop": stop, "epochs_before": before,
      "epochs_after": records[-1]["epoch"] if records else 0,
      "status": "finished" if finished else "stopped" if stop else "failed",
      "time": breakdown([r for r in records if r["step"] > step0], step0,
                        done[-1]["elapsed_sec"] if done else 0.0, time.monotonic() - t0, args,
                        state["timing"])})
  for name in (METRICS, RESULTS) if finished else (METRICS,) if records else ():
    shutil.copyfile(os.path.join(workdir, name), os.path.join(args.out, name))
  packed = not finished and pack(workdir, args.out)
  state["summary"] = summarize(state, args, results if finished else None, packed)
  write_json(os.path.join(args.out, TIMING), state)
  say("== accelerator summary")
  for key, value in state["summary"].items():
    say(key, value)
  return (EXIT_FINISHED if finished else EXIT_SIGNAL if stop == "signal" else
          EXIT_DEADLINE if stop else EXIT_FAILED)


def summarize(state: dict[str, Any], args: argparse.Namespace, results: dict[str, Any] | None,
              packed: bool) -> dict[str, Any]:
  """The timing, this command's run, where the time went (the latest command with 2+ epochs), the
  uninterrupted run projected (the slowest start, the latest epochs) against the goals."""
  runs, run, timing = state["runs"], state["runs"][-1], state["timing"]
  met = {True: "met", False: "missed"}
  out: dict[str, Any] = {
      "device": state["device"]["device_kind"],
      **{f"JAX {r['dtype']}": {k: v for k, v in r.items() if k != "dtype"} for r in timing["jax"]},
      **{f"PyTorch {r['dtype']}": {k: r[k] for k in ("images_per_sec", "format", "precision")}
         for r in timing["torch"]},
      f"ratio JAX / PyTorch (goal {GOAL_RATIO:g})": {d: f"{r:.2f} ({met[r >= GOAL_RATIO]})" for
                                                     d, r in timing["ratio_to_pytorch"].items()}
      or "no PyTorch", "commands": len(runs),
      "run": f"{run['status']} ({run['stop'] or 'no stop'}), epochs {run['epochs_before']} -> "
             f"{run['epochs_after']} of {args.epochs}",
      "trainer_wall_sec_total": sum(x["time"]["trainer_wall_sec"] for x in runs)}
  if steady := [(i, x["time"]) for i, x in enumerate(runs, 1) if "epoch_sec" in x["time"]]:
    i, t = steady[-1]
    out["where_the_time_went"] = {"command": i, **t, "host_round_trips_per_epoch": ROUND_TRIPS}
    out["projected_sec"] = max(x["outside_epochs_sec"] + x["compile_sec"] for _, x in steady) + (
        args.epochs * (t["epoch_sec"] + t["saves_and_logging_per_epoch_sec"]))
  one = results is not None and len(runs) == 1  # measured; else the projection is judged
  if judged := out["trainer_wall_sec_total"] if one else out.get("projected_sec"):
    out["speed"] = (f"the {args.epochs}-epoch run, compile included: "
                    f"{'measured' if one else 'projected'} {judged / 60:.2f} min (goal < "
                    f"{GOAL_SEC / 60:g} min: {met[judged < GOAL_SEC]}; moonshot < "
                    f"{MOONSHOT_SEC / 60:g} min: {met[judged < MOONSHOT_SEC]})")
  if results is not None:
    out["test_error_percent"] = 100 * (1 - results["test_accuracy"])
  else:
    out["resume"] = (f"copy every file of {args.out} into {args.resume_from}/, carry it, run the"
                     " same command again" if packed else "nothing to pack: it starts afresh")
  return out


# ----------------------------------------------------------------------------- the program


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description="The accelerator run (docs/accelerator.md).")
  p.add_argument("--out", default=os.environ.get("OUT"), required=not os.environ.get("OUT"),
                 help="the files that come back (default: $OUT)")
  p.add_argument("--end_by", type=float, default=0.0, help="unix time by which to end (default: "
                 "540 s after the start; the device tool allows 600 s a command)")
  p.add_argument("--data_dir", default="/tmp/cifar", help="holds cifar-10-batches-py/")
  p.add_argument("--workroot", default="/tmp/allconv_accelerator",
                 help="the run's workdir, XLA cache and statistics (not sent back)")
  p.add_argument("--resume_from", default=os.path.join(REPO, "workdirs", "accelerator"),
                 help="the files an earlier command sent back, carried")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="the run's compute dtype (parameters stay float32); bfloat16 lost class "
                 "channels at rate 0.05 in results/study_converged/")
  p.add_argument("--epochs", type=int, default=0, help="350; 1 with --dry_run")
  p.add_argument("--dry_run", action="store_true", help="width x0.05, batch 32, on a CPU")
  args = p.parse_args(argv)
  args.epochs = args.epochs or SIZES[args.dry_run]["epochs"]
  args.out, args.workroot = os.path.abspath(args.out), os.path.abspath(args.workroot)
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Preflight; the timing, unless an earlier command of this run did it; the run."""
  args = parse_args(argv)
  seconds = args.end_by - time.time() if args.end_by else 540.0
  end, mode = time.monotonic() + seconds, "dry_run" if args.dry_run else "run"
  os.makedirs(args.workroot, exist_ok=True)
  os.makedirs(args.out, exist_ok=True)
  for name in (LOG, TIMING, METRICS, RESULTS, PACK):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(args.out, name))
  # The children share an XLA cache and the GCN + ZCA statistics (warm: no compile, no fit).
  env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(args.workroot, "xla_cache"),
         "ALLCONV_CACHE_DIR": os.path.join(args.workroot, "statistics"), **os.environ,
         "PYTHONUNBUFFERED": "1",
         "PYTHONPATH": os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))}
  with open(os.path.join(args.out, LOG), "a") as log:
    try:
      device = preflight(args, env)
    except Fail as e:
      log.write(f"error: {e}\n")
      print(f"error: {e}", file=sys.stderr, flush=True)
      return EXIT_USAGE
    LOG_FILE.append(log)
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, on_signal)
    say(f"== accelerator: {mode}, {seconds:.0f} s to the deadline, device", device)
    old = read_json(os.path.join(args.resume_from, TIMING))
    old = old if isinstance(old, dict) and old.get("mode") == mode else {}
    state = {"mode": mode, "config": CONFIG, "overrides": overrides(args), "device": device,
             "timing": old.get("timing"), "runs": old.get("runs", [])}
    if state["timing"]:
      say(f"== timing: reusing the timing of {state['timing']['when']}")
    else:
      state["timing"] = run_timing(args, env, end)
    write_json(os.path.join(args.out, TIMING), state)
    if SIGNALLED:
      say("accelerator: stopped by a signal before the run")
      return EXIT_SIGNAL
    return train(args, env, state, end)


if __name__ == "__main__":
  sys.exit(main())
