"""PyTorch reference for allconv_jax.tools.benchmark: All-CNN-C train steps on random data.

Not a project dependency; kept for reproducing the comparison in docs/performance.md and as
the anchor of benchmarks/accelerator.py on a GPU. Needs only torch and numpy, e.g. in a
throwaway venv:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
  /tmp/torchvenv/bin/python benchmarks/torch_baseline.py --steps=20
  /tmp/torchvenv/bin/python benchmarks/torch_baseline.py --format=channels_last --bf16
  python3 benchmarks/torch_baseline.py --device=cuda --bf16 --no-bias --json=/tmp/torch.json

The network is the paper's All-CNN-C as allconv_jax builds it: dropout 0.2 on the input,
conv3x3 96, 96, 96/2, dropout 0.5, conv3x3 192, 192, 192/2, dropout 0.5, conv3x3 192 (valid),
conv1x1 192, conv1x1 10, a ReLU after every convolution (the class layer's too), global average
(`--width_multiplier` scales the hidden widths as allconv_jax's models.scaled_width does;
`--no-bias` drops the convolution biases, as configs/recipe_neon.py does).
One eager step: forward, cross-entropy, backward, SGD (momentum 0.9, weight decay 0.001).

`--device=cuda` (the default `auto` picks CUDA where torch sees a GPU) keeps the data on the GPU,
lets cuDNN pick its fastest algorithms (`cudnn.benchmark`) and synchronizes before reading the
clock; float32 is PyTorch's default precision there (cuDNN may use TF32 for float32
convolutions: the JSON's `precision` says so); `--bf16` is autocast to bfloat16 on either device.
Both memory formats are timed by default (NCHW, then channels_last), each the median over
--repeats timed runs; the last line, `train images/s: <number>`, is the faster one, the figure
`python -m allconv_jax.tools.benchmark --torch_images_per_sec=...` compares with. `--json=FILE`
also writes every figure to FILE.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
from torch import nn


def scaled_width(width: int, multiplier: float) -> int:
  """A hidden width scaled by the width multiplier, rounded, at least 1 (models.scaled_width)."""
  return max(1, int(round(width * multiplier)))


def all_cnn_c(num_classes: int = 10, width_multiplier: float = 1.0,
              bias: bool = True) -> nn.Sequential:
  """All-CNN-C (Springenberg et al., 2015, Table 2)."""
  a, b = scaled_width(96, width_multiplier), scaled_width(192, width_multiplier)

  def conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias), nn.ReLU(inplace=True)]

  return nn.Sequential(
      nn.Dropout(0.2),
      *conv(3, a, 3), *conv(a, a, 3), *conv(a, a, 3, stride=2), nn.Dropout(0.5),
      *conv(a, b, 3), *conv(b, b, 3), *conv(b, b, 3, stride=2), nn.Dropout(0.5),
      *conv(b, b, 3, pad=0), *conv(b, b, 1, pad=0), *conv(b, num_classes, 1, pad=0),
      nn.AdaptiveAvgPool2d(1), nn.Flatten())


def pick_device(name: str) -> torch.device:
  """The device of --device: 'auto' is CUDA where torch sees a GPU, else the CPU."""
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  if name == "cuda" and not torch.cuda.is_available():
    raise SystemExit("error: --device=cuda: torch sees no CUDA device "
                     f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
  return torch.device(name)


def device_name(device: torch.device) -> str:
  """'NVIDIA H200' or the CPU's name."""
  if device.type == "cuda":
    return torch.cuda.get_device_name(device)
  return platform.processor() or platform.machine() or "cpu"


def synchronize(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def images_per_sec(args: argparse.Namespace, device: torch.device,
                   channels_last: bool) -> dict[str, Any]:
  """Median train images/s of --repeats timed runs of --steps eager steps in one memory format."""
  torch.manual_seed(args.seed)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = all_cnn_c(width_multiplier=args.width_multiplier, bias=args.bias).to(
      device=device, memory_format=fmt)
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.001)
  loss_fn = nn.CrossEntropyLoss()
  pool = 4 * args.batch_size
  images = torch.randn(pool, 3, 32, 32, device=device).contiguous(memory_format=fmt)
  labels = torch.randint(0, 10, (pool,), device=device)

  def step(i: int) -> torch.Tensor:
    sl = slice((i % 4) * args.batch_size, (i % 4 + 1) * args.batch_size)
    x, y = images[sl], labels[sl]
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
      loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()

  name = "channels_last" if channels_last else "NCHW"
  threads = f"{torch.get_num_threads()} thread(s)" if device.type == "cpu" else device_name(device)
  print(f"torch {torch.__version__}, {device.type} ({threads}), {name}"
        f"{', bf16 autocast' if args.bf16 else ''}, batch {args.batch_size}", flush=True)
  t = time.perf_counter()
  for i in range(args.warmup):
    step(i)
  synchronize(device)
  warmup_s = time.perf_counter() - t
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for i in range(args.steps):
      loss = step(i)
    float(loss)  # waits for the device
    synchronize(device)
    times.append(time.perf_counter() - t)
  run_s = statistics.median(times)
  ips = args.steps * args.batch_size / run_s
  print(f"timed: {args.repeats} run(s) of {args.steps} steps: "
        f"{', '.join(f'{t:.3f}' for t in times)} s (median {run_s / args.steps * 1e3:.2f} "
        f"ms/step): {ips:.1f} images/s", flush=True)
  return {"format": name, "images_per_sec": ips, "step_ms": run_s / args.steps * 1e3,
          "run_sec": times, "warmup_sec": warmup_s}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  parser.add_argument("--format", choices=("both", "nchw", "channels_last"), default="both",
                      help="memory format(s) to time; with both, the faster one is reported")
  parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
  parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where to train (auto: CUDA if torch sees a GPU)")
  parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                      help="convolution biases (--no-bias: none, as configs/recipe_neon.py)")
  parser.add_argument("--width_multiplier", type=float, default=1.0,
                      help="hidden widths x this (1.0: the paper's 96 and 192)")
  parser.add_argument("--json", default="", help="also write the figures to this JSON file")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for name in ("batch_size", "steps", "warmup", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  if not args.width_multiplier > 0:
    parser.error("--width_multiplier must be > 0")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = pick_device(args.device)
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms, as XLA autotunes
  formats = {"both": (False, True), "nchw": (False,), "channels_last": (True,)}[args.format]
  runs = [images_per_sec(args, device, f) for f in formats]
  best = max(runs, key=lambda r: r["images_per_sec"])
  if len(runs) > 1:
    print(f"faster: {best['format']} (" + ", ".join(
        f"{r['format']} {r['images_per_sec']:.1f}" for r in runs) + " images/s)", flush=True)
  out = {"torch": torch.__version__, "device": device.type, "device_name": device_name(device),
         "dtype": "bfloat16" if args.bf16 else "float32",
         "precision": ("bf16 autocast" if args.bf16 else
                       "tf32 convolutions" if device.type == "cuda"
                       and torch.backends.cudnn.allow_tf32 else "float32"),
         "batch_size": args.batch_size, "width_multiplier": args.width_multiplier,
         "bias": args.bias, "steps": args.steps, "repeats": args.repeats, "runs": runs,
         "format": best["format"], "images_per_sec": best["images_per_sec"],
         "step_ms": best["step_ms"]}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
      f.write("\n")
  print(f"train images/s: {best['images_per_sec']:.1f}", flush=True)
  return out


if __name__ == "__main__":
  main()
