"""Which learning rates train All-CNN-C, by initialization and biases (the fidelity issue's map).

  python benchmarks/trainability.py --root=/tmp/allconv/trainability --width=0.25 \
      --inits=he_normal,caffe_xavier,gaussian --biases=on,off \
      --learning_rates=0.25,0.1,0.05,0.01 -- --config.data.source=local \
      --config.data.dir=/tmp/cifar --config.num_epochs=4 --config.data.max_train_examples=10000

Each (init, biases) pair is one `python -m allconv_jax.tools.sweep` over the rates, in
ROOT/w<width>/<init>_bias-<on|off>/ (finished points are skipped, so the command resumes). Then
ROOT/w<width>/trainability.md gets one row per point: validation accuracy per epoch, test
accuracy, wall seconds and a verdict (see `verdict`). Dead runs list their layers' fractions of
dead ReLU channels (results.json 'dead_relu_fraction').
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def verdict(workdir: str, records: list[dict], results: dict | None) -> str:
  """'dead' (at the end every class map is zero on every image of the first validation batch,
  so the logits are zero), 'diverged' (stopped on a non-finite loss), 'learning' (the last
  epoch's training loss is at least 0.05 below ln(10)), 'plateau' (alive, still at about
  ln(10)) or 'unfinished'."""
  if results is None:
    log = os.path.join(workdir, "sweep.log")
    diverged = os.path.exists(log) and "training diverged" in open(log).read()
    return "diverged" if diverged else "unfinished"
  if results["dead_relu_fraction"].get("classifier") == 1.0:
    return "dead"
  return "learning" if records[-1]["train_loss"] < math.log(10) - 0.05 else "plateau"


def layer_order(name: str) -> tuple[int, str]:
  """Network order of a ReLU layer's name: stage 1, stage 2, the head, the class layer."""
  for rank, prefix in enumerate(("stage1_", "stage2_", "head_", "classifier")):
    if name.startswith(prefix):
      return rank, name.replace("reduce", "zz")  # a stage's reduce conv comes last
  return 9, name


def row(setting: str, workdir: str, rate: str) -> str | None:
  """One markdown row for the point in `workdir` (None if it was never started)."""
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  path = os.path.join(workdir, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else None
  if not os.path.exists(workdir):
    return None
  state = verdict(workdir, records, results)
  losses = " / ".join(f"{r['train_loss']:.3f}" for r in records)
  vals = " / ".join(f"{100 * r['val_accuracy']:.1f}" for r in records if r.get("val_accuracy")
                    is not None)
  test = f"{100 * results['test_accuracy']:.2f}" if results else "-"
  dead = ""
  if results and state == "dead":
    fractions = sorted(results["dead_relu_fraction"].items(), key=lambda kv: layer_order(kv[0]))
    dead = ", ".join(f"{k} {100 * v:.0f}%" for k, v in fractions)
  secs = f"{results['wall_time_sec']:.0f}" if results else "-"
  return f"| {setting} | {rate} | {losses} | {vals} | {test} | {state} | {secs} | {dead} |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--width", default="0.25")
  parser.add_argument("--inits", default="he_normal,caffe_xavier,gaussian")
  parser.add_argument("--biases", default="on,off")
  parser.add_argument("--learning_rates", default="0.25,0.1,0.05,0.01")
  parser.add_argument("--table_only", action="store_true")
  args, overrides = parser.parse_known_args()
  overrides = [o for o in overrides if o != "--"]
  base = os.path.join(os.path.abspath(args.root), f"w{args.width}")
  rates = args.learning_rates.split(",")
  lines = ["| init, biases | lr | train loss per epoch | val. accuracy per epoch (%) | test (%) | "
           "verdict | s | dead ReLU channels per layer |", "|---|---|---|---|---|---|---|---|"]
  for init in args.inits.split(","):
    for bias in args.biases.split(","):
      root = os.path.join(base, f"{init}_bias-{bias}")
      if not args.table_only:
        subprocess.run([sys.executable, "-m", "allconv_jax.tools.sweep",
                        "--configs=configs/all_cnn_c.py", f"--learning_rates={args.learning_rates}",
                        f"--root={root}", f"--config.model.width_multiplier={args.width}",
                        f"--config.model.kernel_init={init}",
                        f"--config.model.use_bias={bias == 'on'}", "--config.tensorboard=False",
                        *overrides], cwd=REPO, check=False)
      for rate in rates:
        workdir = os.path.join(root, "all_cnn_c", f"lr{float(rate)!r}")
        line = row(f"{init}, biases {bias}", workdir, rate)
        lines += [line] if line else []
  table = "\n".join(lines) + "\n"
  with open(os.path.join(base, "trainability.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
