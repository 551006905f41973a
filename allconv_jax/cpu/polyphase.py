"""Strided convolutions whose input gradient avoids XLA:CPU's slow dilated convolution.

The input gradient of a stride-s convolution is, in autodiff, a convolution of the output
gradient dilated by s (s - 1 zeros between its pixels). XLA:CPU runs that convolution over the
zeros too: for All-CNN-C's two 3x3 stride-2 layers it took 2.8x to 5.8x the forward time
(jaxlib 0.10.2, 2 cores, batch 128). `conv_general_dilated` here is a drop-in for
`lax.conv_general_dilated` (Flax's `nn.Conv(conv_general_dilated=...)`) with the same forward
and weight gradient but a polyphase input gradient: each of the s x s phases of the input
(rows r, r+s, ... and columns q, q+s, ...) is touched only by the kernel taps a with
a = r + pad (mod s), so its gradient is one stride-1 convolution of the undilated output gradient
with those taps, and the phases are interleaved back. Same arithmetic as the forward pass, no
multiplications by zero; the result equals autodiff's to float rounding (tests/test_models.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]


def _phase_taps(kernel: int, stride: int, pad_low: int, phase: int) -> tuple[list[int], int]:
  """Taps a (ascending) that reach input index s*t + phase, and c with output i = t - c - m."""
  first = (phase + pad_low) % stride
  taps = list(range(first, kernel, stride))
  return taps, (first - phase - pad_low) // stride


def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Sequence[tuple[int, int]],
          precision: Any) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC,
                                  precision=precision)


def _crop_negative(x: jax.Array, low_h: int, high_h: int, low_w: int, high_w: int) -> jax.Array:
  """Crops x where a pad is negative (the convolution itself pads where it is positive)."""
  return x[:, max(-low_h, 0):x.shape[1] - max(-high_h, 0),
           max(-low_w, 0):x.shape[2] - max(-high_w, 0)]


def polyphase_input_grad(g: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
                         in_hw: tuple[int, int], precision: Any = None) -> jax.Array:
  """d(conv(x, w))/dx applied to g, as strides[0] * strides[1] stride-1 convolutions of g."""
  (sh, sw), (kh, kw) = strides, w.shape[:2]
  n, oh, ow, _ = g.shape
  th, tw = -(-in_hw[0] // sh), -(-in_hw[1] // sw)  # rows and columns per phase
  w_t = jnp.swapaxes(w, 2, 3)  # correlate g's output channels into x's input channels
  rows = []
  for r in range(sh):
    taps_h, c_h = _phase_taps(kh, sh, pads[0][0], r)
    cols = []
    for q in range(sw):
      taps_w, c_w = _phase_taps(kw, sw, pads[1][0], q)
      if not taps_h or not taps_w:  # e.g. a 1x1 kernel with stride 2: odd pixels get nothing
        cols.append(jnp.zeros((n, th, tw, w.shape[2]), g.dtype))
        continue
      kernel = w_t[jnp.array(taps_h[::-1])][:, jnp.array(taps_w[::-1])]
      low_h, low_w = c_h + len(taps_h) - 1, c_w + len(taps_w) - 1
      high_h = th + len(taps_h) - 2 - low_h - (oh - 1)
      high_w = tw + len(taps_w) - 2 - low_w - (ow - 1)
      cols.append(_conv(_crop_negative(g, low_h, high_h, low_w, high_w), kernel, (1, 1),
                        tuple((max(lo, 0), max(hi, 0)) for lo, hi in
                              ((low_h, high_h), (low_w, high_w))), precision))
    rows.append(jnp.stack(cols, axis=3))  # (n, th, tw, sw, c)
  dx = jnp.stack(rows, axis=2)  # (n, th, sh, tw, sw, c)
  dx = dx.reshape(n, th * sh, tw * sw, -1)
  return dx[:, :in_hw[0], :in_hw[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def polyphase_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
                   precision: Any = None) -> jax.Array:
  """An NHWC/HWIO convolution (explicit pads) with the polyphase input gradient."""
  return _conv(x, w, strides, pads, precision)


def _polyphase_fwd(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
                   precision: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _conv(x, w, strides, pads, precision), (x, w)


def _polyphase_bwd(strides: tuple[int, int], pads: Pads, precision: Any,
                   res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, w = res
  _, weight_vjp = jax.vjp(lambda w: _conv(x, w, strides, pads, precision), w)
  (dw,) = weight_vjp(g)
  dx = polyphase_input_grad(g, w, strides, pads, x.shape[1:3], precision)
  return dx.astype(x.dtype), dw


polyphase_conv.defvjp(_polyphase_fwd, _polyphase_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, with the polyphase input gradient for strided 2-d convs.

  Only plain strided NHWC/HWIO convolutions take the polyphase path; anything else (stride 1,
  dilation, groups, other layouts) is handed to lax unchanged.
  """
  strides = tuple(window_strides)
  plain = (len(strides) != 2 or all(s == 1 for s in strides) or lhs.ndim != 4
           or any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
           or feature_group_count != 1 or batch_group_count != 1
           or preferred_element_type is not None
           or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           != lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
  if plain:
    return lax.conv_general_dilated(
        lhs, rhs, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return polyphase_conv(lhs, rhs, strides, pads, precision)
