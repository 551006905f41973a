r"""Where the CPU train step's time goes: every convolution of the compiled step, timed alone,
and every other traced XLA:CPU thunk (layout copies, elementwise fusions, library calls).

  python benchmarks/profile_step.py --config=configs/all_cnn_c.py
  python benchmarks/profile_step.py --config=configs/all_cnn_c.py --config.batch_size=32 --top=10

The step is train.py's (`steps.train_step`, jitted with `steps.cpu_compiler_options()`) on random
data. Convolution thunks carry no trace events in XLA:CPU, so each `convolution` instruction of
the optimized HLO (top level or inside a library fusion) is rebuilt from its operand shapes,
window and dimension labels as one `lax.conv_general_dilated`, jitted alone and timed; its role
(forward, input gradient, weight gradient) comes from its source metadata and output shape, its
FLOPs are 2 x output elements x window x input features per group. The other thunks are timed
inside the real step, from a profiler trace (`--xla_cpu_enable_xprof_traceme`). Prints two
Markdown tables: the biggest convolutions, then the step split into categories, with the part
that neither measurement explains. Run it on an idle machine.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from allconv_jax import cli, cpu
from allconv_jax import steps as steps_lib
from allconv_jax.errors import UserError
from allconv_jax.tools import benchmark

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The benchmark's flags (--config, --repeats, ...) and this command's own."""
  benchmark.define_flags()
  flags.DEFINE_integer("top", 15, "Convolutions listed (the slowest first).", lower_bound=1)


_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_CONV = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* convolution\(%([\w.\-]+), "
                   r"%([\w.\-]+)\)(.*)$")
_FFI = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \(?\w+\[([\d,]*)\].* custom-call\(.*"
                  r'custom_call_target="allconv_onednn_conv_([fdw])_\w+", '
                  r"operand_layout_constraints=\{(.*?)\}, api_version.*?op_name=\"([^\"]*)\"")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
ROLES = {"f": "forward", "d": "input grad", "w": "weight grad"}


@dataclasses.dataclass
class LibraryConv:
  """A oneDNN convolution (allconv_jax/cpu/onednn.py): an FFI call, timed inside the step."""
  name: str
  role: str
  layer: str
  lhs: tuple[int, ...]
  out: tuple[int, ...]
  flops: float
  ms: float = 0.0


def parse_onednn(hlo: str) -> list[LibraryConv]:
  """The oneDNN convolutions of an optimized HLO module: 2 x output-gradient elements x
  kernel taps x input channels each, whatever the role."""
  convs = []
  for line in hlo.splitlines():
    if not (m := _FFI.match(line)):
      continue
    name, out, role, operands, op = m.groups()
    shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(operands)]
    out = tuple(int(d) for d in out.split(",") if d)
    grad_like = {"f": out, "d": shapes[0], "w": shapes[1]}[role]
    kernel = out if role == "w" else shapes[1]
    flops = 2.0 * float(np.prod(grad_like)) * kernel[0] * kernel[1] * kernel[2]
    convs.append(LibraryConv(name, ROLES[role], op.split("/")[-2], shapes[0], out, flops))
  return convs


@dataclasses.dataclass
class Conv:
  """One convolution instruction of the optimized HLO."""
  name: str
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  out: tuple[int, ...]
  dtype: str
  attrs: str
  role: str = ""
  layer: str = ""
  ms: float = 0.0

  @property
  def labels(self) -> tuple[str, str, str]:
    """The lhs, rhs and output dimension labels (dim_labels=b01f_01io->b01f)."""
    lhs, rest = _field(self.attrs, "dim_labels").split("_")
    rhs, out = rest.split("->")
    return lhs, rhs, out

  @property
  def flops(self) -> float:
    """2 x output elements x multiply-adds per output (kernel elements / output features)."""
    per_output = np.prod(self.rhs) / self.rhs[self.labels[1].index("o")]
    return 2.0 * float(np.prod(self.out)) * float(per_output)


def _field(attrs: str, key: str) -> str:
  m = re.search(rf"\b{key}=([^,\s]+)", attrs)
  return m.group(1) if m else ""


def parse_convs(hlo: str, batch: int) -> list[Conv]:
  """The convolutions of an optimized HLO module, with operand shapes and roles."""
  shapes, dtypes = {}, {}
  for line in hlo.splitlines():
    if m := _DEF.match(line):
      shapes[m.group(1)] = tuple(int(d) for d in m.group(3).split(",") if d)
      dtypes[m.group(1)] = m.group(2)
  convs = []
  for line in hlo.splitlines():
    if not (m := _CONV.match(line)):
      continue
    name, out, lhs, rhs, attrs = m.groups()
    conv = Conv(name, shapes[lhs], shapes[rhs], tuple(int(d) for d in out.split(",")),
                dtypes[lhs], attrs)
    op = _field(attrs, "op_name").strip('"')
    parts = op.split("/")
    conv.layer = parts[-2] if len(parts) > 1 else ""
    if "transpose(" not in op and op:
      conv.role = "forward"
    elif conv.out[conv.labels[2].index("b")] == batch:
      conv.role = "input grad"
    else:
      conv.role = "weight grad"
    convs.append(conv)
  _name_weight_grads(convs)
  return convs


def _name_weight_grads(convs: list[Conv]) -> None:
  """Weight gradients carry no source metadata: name them after the forward convolution with
  the same kernel shape, input size and striding (b01f_01io: lhs = input as (C, H, W, N))."""
  for c in convs:
    if c.role != "weight grad" or c.layer:
      continue
    kernel = (c.out[1], c.out[2], c.out[0], c.out[3])
    strided = "rhs_dilate" in c.attrs  # a strided layer's weight gradient dilates the gradient
    matches = [f.layer for f in convs if f.role == "forward" and f.rhs == kernel
               and f.lhs[1:3] == c.lhs[1:3] and ("stride=" in f.attrs) == strided]
    c.layer = matches[0] if len(set(matches)) == 1 else ""


def _dimension_numbers(labels: tuple[str, str, str]) -> tuple[str, str, str]:
  """HLO dimension labels (b01f, 01io, b01f) as lax's NHWC-style strings."""
  lhs, rhs, out = labels
  lhs_map, rhs_map = {"b": "N", "f": "C", "0": "H", "1": "W"}, {"o": "O", "i": "I", "0": "H",
                                                                 "1": "W"}
  return ("".join(lhs_map[c] for c in lhs), "".join(rhs_map[c] for c in rhs),
          "".join(lhs_map[c] for c in out))


def _pairs(text: str, default: int) -> list[int]:
  return [int(v) for v in text.split("x")] if text else [default, default]


def conv_fn(conv: Conv) -> Any:
  """A jitted lax.conv_general_dilated equal to the instruction (window, pads, dilations)."""
  window = re.search(r"window=\{([^}]*)\}", conv.attrs)
  get = dict(item.split("=") for item in (window.group(1).split() if window else ()))
  size = _pairs(get.get("size", ""), 1)
  pads = [tuple(int(v) for v in p.split("_")) for p in get["pad"].split("x")] \
      if "pad" in get else [(0, 0)] * len(size)
  reversal = get.get("rhs_reversal")
  if reversal and "1" in reversal:
    raise ValueError(f"{conv.name}: rhs_reversal is not rebuilt")
  fn = functools.partial(
      lax.conv_general_dilated, window_strides=_pairs(get.get("stride", ""), 1), padding=pads,
      lhs_dilation=_pairs(get.get("lhs_dilate", ""), 1),
      rhs_dilation=_pairs(get.get("rhs_dilate", ""), 1),
      dimension_numbers=_dimension_numbers(conv.labels),
      feature_group_count=int(_field(conv.attrs, "feature_group_count") or 1))
  return jax.jit(fn, compiler_options=cpu.step_compiler_options())


def median_seconds(fn: Any, *args: Any, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def time_convs(convs: list[Conv], repeats: int) -> None:
  """Each convolution rebuilt alone and timed on random operands (made with NumPy: a
  jax.random program would compile again for every shape)."""
  rng = np.random.default_rng(0)
  for conv in convs:
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}[conv.dtype]
    lhs = jnp.asarray(rng.standard_normal(conv.lhs, dtype=np.float32), dtype)
    rhs = jnp.asarray(rng.standard_normal(conv.rhs, dtype=np.float32), dtype)
    conv.ms = 1e3 * median_seconds(conv_fn(conv), lhs, rhs, repeats=repeats)


def build_step(config: Any) -> tuple[Any, tuple[Any, ...]]:
  """train.py's step jitted for the CPU, and arguments for it: the benchmark's model, optimizer,
  state and random batch."""
  bench = benchmark.prepare(config, steps=1, seed=0)
  images, labels, idx, key = bench.inputs
  step = jax.jit(functools.partial(steps_lib.train_step, model=bench.model, tx=bench.tx,
                                   augment=config.data.augment,
                                   translate=config.data.translate_pixels),
                 compiler_options=cpu.step_compiler_options())
  return step, (bench.state, images[idx[0]], labels[idx[0]], key)


def traced_thunks(step: Any, args: tuple[Any, ...]) -> dict[str, float]:
  """Milliseconds per XLA:CPU thunk (fusions, copies, library calls) in one traced step."""
  jax.block_until_ready(step(*args))
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    jax.block_until_ready(step(*args))
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(tmp, "**", "*.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  out: dict[str, float] = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
      out[name] += e["dur"] / 1e3
  return dict(out)


def category(name: str) -> str:
  if "transpose" in name or name.startswith("copy"):
    return "layout copies (transposes)"
  if name.startswith(("ynn_fusion", "xnn_fusion", "dot")):
    return "library dots and reductions (YNNPACK)"
  return "elementwise and other fusions"


def report(config: Any, step_ms: float, convs: list[Conv], thunks: dict[str, float],
           top: int) -> str:
  """The two Markdown tables."""
  lines = [f"{config.model.name} x{config.model.width_multiplier:g}, batch {config.batch_size}, "
           f"{config.model.dtype}, {jax.devices()[0].device_kind}, jax {jax.__version__}: "
           f"step {step_ms:.1f} ms ({config.batch_size / step_ms * 1e3:.1f} images/s)", "",
           "| convolution | role | layer | lhs -> out | GFLOP | ms | GFLOP/s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for c in sorted(convs, key=lambda c: -c.ms)[:top]:
    lines.append(f"| {c.name} | {c.role} | {c.layer or '-'} | {list(c.lhs)} -> {list(c.out)} | "
                 f"{c.flops / 1e9:.2f} | {c.ms:.1f} | {c.flops / c.ms / 1e6:.0f} |")
  groups: dict[str, float] = collections.Counter()
  flops: dict[str, float] = collections.Counter()
  for c in convs:
    groups[f"convolutions: {c.role}"] += c.ms
    flops[f"convolutions: {c.role}"] += c.flops
  for name, ms in thunks.items():
    groups[category(name)] += ms
  lines += ["", "| part of the step | ms | share | GFLOP/s |", "| --- | --- | --- | --- |"]
  for name, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
    rate = f"{flops[name] / ms / 1e6:.0f}" if flops.get(name) else "-"
    lines.append(f"| {name} | {ms:.1f} | {ms / step_ms:.0%} | {rate} |")
  rest = step_ms - sum(groups.values())
  lines.append(f"| the step minus the parts (negative: thunks overlap in the step, convolutions "
               f"timed alone) | {rest:.1f} | {rest / step_ms:.0%} | - |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  cli.start(argv[1:])
  config = cli.load_config(FLAGS.config)
  with cli.user_errors():
    if jax.default_backend() != "cpu":
      raise UserError("this profile is for the CPU step (XLA:CPU thunks)")
    step, args = build_step(config)
    hlo = step.lower(*args).compile().as_text()
    step_ms = 1e3 * median_seconds(step, *args, repeats=FLAGS.repeats)
    convs = parse_convs(hlo, config.batch_size)
    time_convs(convs, FLAGS.repeats)
    thunks = traced_thunks(step, args)
    library = parse_onednn(hlo)
    for conv in library:  # timed in the trace of the step
      conv.ms = thunks.pop(conv.name, 0.0)
    print(report(config, step_ms, [*convs, *library], thunks, FLAGS.top), flush=True)


if __name__ == "__main__":
  # Read when jax starts its backend (first use, not import): thunks get trace events.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_enable_xprof_traceme=true").strip()
  cli.program_help(__doc__)
  define_flags()
  app.run(main, argv=cli.resolve_config_flag(sys.argv), flags_parser=cli.parse_config_flags)
