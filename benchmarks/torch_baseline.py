"""PyTorch reference for `python -m allconv_jax.benchmark`: All-CNN-C train steps, random data.

Not a project dependency; kept for reproducing the comparison in the README ("Speed and
benchmarks"). Needs only torch and numpy, e.g. in a throwaway venv:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
  /tmp/torchvenv/bin/python benchmarks/torch_baseline.py --steps=20
  /tmp/torchvenv/bin/python benchmarks/torch_baseline.py --format=channels_last --bf16

The network is the paper's All-CNN-C as allconv_jax builds it: dropout 0.2 on the input,
conv3x3 96, 96, 96/2, dropout 0.5, conv3x3 192, 192, 192/2, dropout 0.5, conv3x3 192 (valid),
conv1x1 192, conv1x1 10, a ReLU after every convolution (the class layer's too), global average.
One eager step: forward, cross-entropy, backward, SGD (momentum 0.9, weight decay 0.001).
Both memory formats are timed by default (NCHW, then channels_last: oneDNN's blocked NHWC
kernels), each the median over --repeats timed runs; the last line, `train images/s: <number>`,
is the faster one, the figure `python -m allconv_jax.benchmark --torch_images_per_sec=...`
compares with.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def all_cnn_c(num_classes: int = 10) -> nn.Sequential:
  """All-CNN-C (Springenberg et al., 2015, Table 2)."""
  def conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=pad), nn.ReLU(inplace=True)]

  return nn.Sequential(
      nn.Dropout(0.2),
      *conv(3, 96, 3), *conv(96, 96, 3), *conv(96, 96, 3, stride=2), nn.Dropout(0.5),
      *conv(96, 192, 3), *conv(192, 192, 3), *conv(192, 192, 3, stride=2), nn.Dropout(0.5),
      *conv(192, 192, 3, pad=0), *conv(192, 192, 1, pad=0), *conv(192, num_classes, 1, pad=0),
      nn.AdaptiveAvgPool2d(1), nn.Flatten())


def images_per_sec(args: argparse.Namespace, channels_last: bool) -> float:
  """Median train images/s of --repeats timed runs of --steps eager steps in one memory format."""
  torch.manual_seed(args.seed)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = all_cnn_c().to(memory_format=fmt)
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.001)
  loss_fn = nn.CrossEntropyLoss()
  pool = 4 * args.batch_size
  images = torch.randn(pool, 3, 32, 32).contiguous(memory_format=fmt)
  labels = torch.randint(0, 10, (pool,))

  def step(i: int) -> torch.Tensor:
    sl = slice((i % 4) * args.batch_size, (i % 4 + 1) * args.batch_size)
    x, y = images[sl], labels[sl]
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
      loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()

  name = "channels_last" if channels_last else "NCHW"
  print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {name}"
        f"{', bf16 autocast' if args.bf16 else ''}, batch {args.batch_size}", flush=True)
  for i in range(args.warmup):
    step(i)
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for i in range(args.steps):
      loss = step(i)
    float(loss)
    times.append(time.perf_counter() - t)
  run_s = statistics.median(times)
  ips = args.steps * args.batch_size / run_s
  print(f"timed: {args.repeats} run(s) of {args.steps} steps: "
        f"{', '.join(f'{t:.3f}' for t in times)} s (median {run_s / args.steps * 1e3:.2f} "
        f"ms/step): {ips:.1f} images/s", flush=True)
  return ips


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
  parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  parser.add_argument("--format", choices=("both", "nchw", "channels_last"), default="both",
                      help="memory format(s) to time; with both, the faster one is reported")
  parser.add_argument("--bf16", action="store_true", help="CPU autocast to bfloat16")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  formats = {"both": (False, True), "nchw": (False,), "channels_last": (True,)}[args.format]
  results = {("channels_last" if f else "NCHW"): images_per_sec(args, f) for f in formats}
  best = max(results, key=results.get)
  if len(results) > 1:
    print("faster: " + best + " (" + ", ".join(f"{k} {v:.1f}" for k, v in results.items())
          + " images/s)", flush=True)
  print(f"train images/s: {results[best]:.1f}", flush=True)


if __name__ == "__main__":
  main()
