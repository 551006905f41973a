"""The CPU backend: which code runs the convolutions, and how a step is compiled on a CPU.

XLA's own convolutions, compiled the same way on every platform, are the reference. On a CPU
three optional speed-ups apply, all chosen here and nowhere else:

- oneDNN convolutions (`onednn.py`, `csrc/onednn_conv.cc`), called from the jitted step through
  the XLA FFI: no layout transposes for the weight gradients, AMX tiles for bfloat16
  (`model.conv_impl`);
- the polyphase input gradient of strided convolutions (`polyphase.py`): no multiplications by
  the zeros of a dilated gradient (`model.strided_grad`);
- one dispatch per SGD step instead of a `lax.scan` chunk, and YNNPACK kept off convolutions
  (`scan_steps`, `step_compiler_options`).

`choose` resolves the two settings for this machine once per run and says why; `conv_layer` is
the Flax layer a network's convolutions are built with. A GPU or TPU run never builds or loads
oneDNN. Each choice gives the same arithmetic to float rounding (tests/test_reference.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from allconv_jax.cpu import onednn, polyphase
from allconv_jax.errors import UserError

CONV_IMPLS = ("auto", "xla", "onednn")
STRIDED_GRADS = ("auto", "xla", "polyphase")
Padding = str | tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Convolutions:
  """Which code runs a network's convolutions; a run logs it and records it in results.json."""
  backend: str = "xla"  # 'xla' or 'onednn' (layers with a spatial kernel; 1x1 layers stay XLA)
  polyphase: bool = False  # strided input gradients in XLA from polyphase.py
  reason: str = "model.conv_impl=xla"  # why, in a few words

  @property
  def name(self) -> str:
    """'onednn+polyphase', 'xla', ...: what a resumed run compares with the record."""
    return self.backend + ("+polyphase" if self.polyphase else "")

  def record(self, dtype: str) -> dict[str, str]:
    """What results.json keeps of it (with the compute dtype)."""
    return {"backend": self.backend, "strided_grad": "polyphase" if self.polyphase else "xla",
            "dtype": dtype, "reason": self.reason}

  def describe(self) -> str:
    """One line for the run's log."""
    return (f"{'oneDNN' if self.backend == 'onednn' else 'XLA'} convolutions, "
            f"{'polyphase' if self.polyphase else 'XLA'} strided input gradients "
            f"({self.reason})")


def choose(conv_impl: str, strided_grad: str, dtype: str) -> Convolutions:
  """Resolves model.conv_impl and model.strided_grad on this machine.

  `auto` takes oneDNN on a single-device CPU where it builds and runs `dtype`; building and
  loading it is the explicit step `onednn.load()`, done here once per process (about 8 s the
  first time on a machine, then a verified cached library). UserError where conv_impl=onednn
  cannot run.
  """
  if conv_impl not in CONV_IMPLS:
    raise UserError(f"unknown model.conv_impl {conv_impl!r}; valid: {', '.join(CONV_IMPLS)}")
  if strided_grad not in STRIDED_GRADS:
    raise UserError(f"unknown model.strided_grad {strided_grad!r}; valid: "
                    f"{', '.join(STRIDED_GRADS)}")
  on_cpu = jax.default_backend() == "cpu"
  polyphase_grad = strided_grad == "polyphase" or (strided_grad == "auto" and on_cpu)
  if conv_impl == "xla":
    return Convolutions("xla", polyphase_grad, "model.conv_impl=xla")
  why_not = (f"the backend is {jax.default_backend()}, not the CPU" if not on_cpu
             else f"{jax.device_count()} devices, and oneDNN runs on one"
             if jax.device_count() != 1 else onednn.missing() or _load_and_try(dtype))
  if why_not is None:
    return Convolutions("onednn", polyphase_grad,
                        f"model.conv_impl={conv_impl}: a single-device CPU with oneDNN")
  if conv_impl == "onednn":
    raise UserError(f"model.conv_impl=onednn cannot run here: {why_not}")
  return Convolutions("xla", polyphase_grad, f"model.conv_impl=auto: {why_not}")


def _load_and_try(dtype: str) -> str | None:
  """Builds (first use) and loads oneDNN, then tries `dtype` on this CPU; None or why not."""
  try:
    onednn.load()
  except OSError as e:
    return f"the oneDNN convolutions did not build or load: {' '.join(str(e).split())[:300]}"
  return onednn.unsupported(dtype)


def conv_layer(convs: Convolutions, *, features: int, kernel: int, stride: int,
               padding: Padding, use_bias: bool, kernel_init: Callable[..., jax.Array],
               bias_init: Callable[..., jax.Array], dtype: Any, name: str) -> nn.Module:
  """The Flax convolution of one layer: float32 parameters 'kernel' (HWIO) and 'bias' whichever
  code runs it, so checkpoints do not depend on the choice; compute in `dtype`."""
  if convs.backend == "onednn" and kernel > 1:
    return onednn.Conv(features, (kernel, kernel), strides=stride, padding=padding,
                       use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                       dtype=dtype, name=name)
  conv_fn = (polyphase.conv_general_dilated if convs.polyphase
             else jax.lax.conv_general_dilated)
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, use_bias=use_bias,
                 kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                 param_dtype=jnp.float32, conv_general_dilated=conv_fn, name=name)


def scan_steps() -> bool:
  """Whether a chunk of SGD steps runs as one `lax.scan` (GPU/TPU) or as a loop of jitted steps.

  XLA:CPU runs convolutions inside a while loop (a rolled scan) about 40x slower than the same
  step jitted alone (4 vs 154 images/s, quarter-width All-CNN-C, jaxlib 0.10.2), so on the CPU
  each step is its own dispatch; the arithmetic is the same either way.
  """
  return jax.default_backend() != "cpu"


# XLA:CPU hands convolutions to YNNPACK by default; its weight-gradient convolutions ran ~3x
# slower than XLA's own (Eigen) ones here, so on the CPU only reductions and dots go to YNNPACK.
YNNPACK_OFF_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def step_compiler_options() -> dict[str, str] | None:
  """The compiler options of the CPU's jitted steps: YNNPACK_OFF_CONVOLUTIONS where this jaxlib
  accepts them (they are experimental), else None (XLA's defaults)."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=YNNPACK_OFF_CONVOLUTIONS).lower(
        np.float32(0)).compile()
  except Exception:  # noqa: BLE001 - an unknown option or enum value: keep XLA's defaults
    return None
  return YNNPACK_OFF_CONVOLUTIONS
