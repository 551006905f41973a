"""An independent float64 NumPy model of the 12 All Convolutional Nets, forward and backward.

Written for the tests from the definitions alone: the paper's Tables 1 and 2 (Springenberg et
al., 2015) and Caffe's layers. It uses no `lax.conv*`, no Flax and none of allconv_jax's layers;
parameter names follow the project's tree ('backbone/stage1_conv1', 'classifier') only so that
the two can be compared.

- convolution: cross-correlation by im2col with explicit (low, high) padding per side; the
  'symmetric' convention pads (k-1)/2 on every side (Caffe, PyTorch), 'tf_same' pads as
  TensorFlow's SAME (the odd pixel after the image);
- ReLU with three backward rules: 'standard', 'guided' (Springenberg et al., section 3.4),
  'deconvnet' (Zeiler and Fergus);
- max-pooling as Caffe's 3x3 stride-2 ceil-mode pool without padding: windows start at 0, 2,
  ..., the last one clipped at the border; the gradient goes to the window's first maximum;
- global average, softmax cross-entropy averaged over the batch;
- the backward pass derived by hand: gradients of the mean loss for every parameter, or of any
  linear function of the logits for the input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# The paper's base nets: each stage's kernels (widths 96, then 192), before its pooling.
STAGE_KERNELS = {"a": (5,), "b": (5, 1), "c": (3, 3)}


@dataclasses.dataclass(frozen=True)
class Op:
  kind: str  # 'conv' or 'pool'
  name: str = ""
  features: int = 0
  kernel: int = 1
  stride: int = 1
  valid: bool = False  # no padding at all (the head's 3x3 convolution)


def network(name: str, width: float, classes: int) -> list[Op]:
  """The layers of network `name` ('all_cnn_c', ...), as Tables 1 and 2 of the paper list them."""
  variant, base = name.rsplit("_", 1)
  ops: list[Op] = []
  for s, full in ((1, 96), (2, 192)):
    w = max(1, int(round(full * width)))
    convs = [Op("conv", f"stage{s}_conv{i}", w, k) for i, k in enumerate(STAGE_KERNELS[base], 1)]
    if variant == "model":  # conv layers, then 3x3 max-pool stride 2
      ops += [*convs, Op("pool")]
    elif variant == "strided_cnn":  # no pool; the stage's last conv gets stride 2
      ops += [*convs[:-1], dataclasses.replace(convs[-1], stride=2)]
    elif variant == "convpool_cnn":  # an extra 3x3 conv before the pool
      ops += [*convs, Op("conv", f"stage{s}_conv{len(convs) + 1}", w, 3), Op("pool")]
    elif variant == "all_cnn":  # the pool becomes a 3x3 conv with stride 2
      ops += [*convs, Op("conv", f"stage{s}_reduce", w, 3, 2)]
    else:
      raise ValueError(name)
  head = max(1, int(round(192 * width)))
  return [*ops, Op("conv", "head_conv1", head, 3, valid=True), Op("conv", "head_conv2", head, 1),
          Op("conv", "classifier", classes, 1)]


def pads(size: int, kernel: int, stride: int, convention: str, valid: bool) -> tuple[int, int]:
  """(low, high) zero padding of one spatial axis."""
  if valid:
    return 0, 0
  if convention == "symmetric":
    return (kernel - 1) // 2, (kernel - 1) // 2
  out = -(-size // stride)  # TensorFlow SAME: ceil(size / stride) outputs
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int,
                 pad: tuple[int, int]) -> tuple[np.ndarray, tuple]:
  """y[n, i, j, o] = sum over (a, c, ch) of xpad[n, s*i + a, s*j + c, ch] w[a, c, ch, o] + b[o]."""
  n, h, wd, cin = x.shape
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
  oh, ow = (h + sum(pad) - k) // stride + 1, (wd + sum(pad) - k) // stride + 1
  cols = np.empty((n, oh, ow, k, k, cin))
  for a in range(k):
    for c in range(k):
      cols[:, :, :, a, c, :] = xp[:, a:a + stride * (oh - 1) + 1:stride,
                                  c:c + stride * (ow - 1) + 1:stride, :]
  cols = cols.reshape(n * oh * ow, k * k * cin)
  y = cols @ w.reshape(k * k * cin, -1)
  if b is not None:
    y = y + b
  return y.reshape(n, oh, ow, -1), (cols, x.shape, xp.shape, stride, pad, k)


def conv_backward(g: np.ndarray, w: np.ndarray, cache: tuple) -> tuple[np.ndarray, ...]:
  """(dx, dw, db) from the output gradient g: col2im of g w^T, cols^T g, and g's sum."""
  cols, x_shape, xp_shape, stride, pad, k = cache
  n, oh, ow, cout = g.shape
  g2 = g.reshape(-1, cout)
  dw = (cols.T @ g2).reshape(w.shape)
  db = g2.sum(axis=0)
  dcols = (g2 @ w.reshape(-1, cout).T).reshape(n, oh, ow, k, k, x_shape[3])
  dxp = np.zeros(xp_shape)
  for a in range(k):
    for c in range(k):
      dxp[:, a:a + stride * (oh - 1) + 1:stride, c:c + stride * (ow - 1) + 1:stride, :] += \
          dcols[:, :, :, a, c, :]
  return dxp[:, pad[0]:pad[0] + x_shape[1], pad[0]:pad[0] + x_shape[2], :], dw, db


def pool_forward(x: np.ndarray, k: int = 3, s: int = 2) -> tuple[np.ndarray, tuple]:
  """Caffe's MAX pool, pad 0, ceil mode: ceil((H - k) / s) + 1 outputs per axis."""
  n, h, w, c = x.shape
  oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
  y = np.empty((n, oh, ow, c))
  where = np.empty((n, oh, ow, c, 2), dtype=np.int64)
  for i in range(oh):
    r0, r1 = i * s, min(i * s + k, h)
    for j in range(ow):
      c0, c1 = j * s, min(j * s + k, w)
      win = x[:, r0:r1, c0:c1, :].reshape(n, -1, c)
      first = np.argmax(win, axis=1)  # the first maximum in row-major order, as Caffe's '>'
      y[:, i, j, :] = np.take_along_axis(win, first[:, None, :], axis=1)[:, 0]
      where[:, i, j, :, 0] = r0 + first // (c1 - c0)
      where[:, i, j, :, 1] = c0 + first % (c1 - c0)
  return y, (x.shape, where)


def pool_backward(g: np.ndarray, cache: tuple) -> np.ndarray:
  x_shape, where = cache
  dx = np.zeros(x_shape)
  n_idx, i_idx, j_idx, c_idx = np.indices(g.shape)
  np.add.at(dx, (n_idx, where[..., 0], where[..., 1], c_idx), g)
  return dx


def relu_backward(x: np.ndarray, g: np.ndarray, rule: str) -> np.ndarray:
  """The gradient through y = max(x, 0) under a backward rule."""
  if rule == "standard":
    return g * (x > 0)
  if rule == "guided":
    return g * (x > 0) * (g > 0)
  if rule == "deconvnet":
    return np.maximum(g, 0)
  raise ValueError(rule)


def forward(ops: list[Op], params: dict[str, dict[str, np.ndarray]], x: np.ndarray,
            convention: str, final_relu: bool = True) -> tuple[np.ndarray, list]:
  """Logits (N, classes) and the caches of every layer, for `backward`."""
  caches: list[Any] = []
  for op in ops:
    if op.kind == "pool":
      x, cache = pool_forward(x)
      caches.append(("pool", cache))
      continue
    p = params[op.name]
    pad = pads(x.shape[1], op.kernel, op.stride, convention, op.valid)
    z, cache = conv_forward(x, p["kernel"], p.get("bias"), op.stride, pad)
    relu = op.name != "classifier" or final_relu
    x = np.maximum(z, 0) if relu else z
    caches.append(("conv", op.name, cache, z if relu else None))
  caches.append(("mean", x.shape))
  return x.mean(axis=(1, 2)), caches


def backward(caches: list, params: dict[str, dict[str, np.ndarray]], dlogits: np.ndarray,
             rule: str = "standard") -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
  """(input gradient, parameter gradients) given the logits' gradient."""
  _, shape = caches[-1]
  g = np.broadcast_to(dlogits[:, None, None, :] / (shape[1] * shape[2]), shape).copy()
  grads: dict[str, dict[str, np.ndarray]] = {}
  for entry in reversed(caches[:-1]):
    if entry[0] == "pool":
      g = pool_backward(g, entry[1])
      continue
    _, name, cache, z = entry
    if z is not None:
      g = relu_backward(z, g, rule)
    g, dw, db = conv_backward(g, params[name]["kernel"], cache)
    grads[name] = {"kernel": dw, **({"bias": db} if "bias" in params[name] else {})}
  return g, grads


def loss_and_grads(ops: list[Op], params: dict[str, dict[str, np.ndarray]], x: np.ndarray,
                   labels: np.ndarray, convention: str, final_relu: bool = True) -> tuple[
                       np.ndarray, float, dict[str, dict[str, np.ndarray]]]:
  """(logits, mean softmax cross-entropy, its gradient for every parameter)."""
  logits, caches = forward(ops, params, x, convention, final_relu)
  shifted = logits - logits.max(axis=1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
  n = len(labels)
  loss = -np.mean(np.log(probs[np.arange(n), labels]))
  dlogits = probs.copy()
  dlogits[np.arange(n), labels] -= 1.0
  _, grads = backward(caches, params, dlogits / n)
  return logits, float(loss), grads


def input_gradient(ops: list[Op], params: dict[str, dict[str, np.ndarray]], x: np.ndarray,
                   classes: np.ndarray, convention: str, rule: str) -> np.ndarray:
  """d(sum over images of logit[n, classes[n]]) / d(input) under a ReLU backward rule."""
  logits, caches = forward(ops, params, x, convention)
  dlogits = np.zeros_like(logits)
  dlogits[np.arange(len(classes)), classes] = 1.0
  return backward(caches, params, dlogits, rule)[0]
