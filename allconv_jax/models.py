"""The All Convolutional Net family (Springenberg et al., 2015, Tables 1 and 2).

Three base nets (A, B, C) and three transformations of them (section 2 of the paper):

- ``model``:        the base net, each stage followed by a 3x3 max-pool with stride 2.
- ``strided_cnn``:  the pool removed, the convolution just before it given stride 2.
- ``convpool_cnn``: an extra 3x3 convolution of the stage's width just before each pool.
- ``all_cnn``:      each pool replaced by a 3x3 convolution of the stage's width with stride 2.

A network is a tuple of layer specs (`layer_list`); one Flax module (`AllConvNet`) runs any of
them. The class layer is the submodule ``classifier``, everything before it is ``backbone``, so
transfer learning can swap the one and freeze the other by name. Each convolution's output
(after its ReLU) is sown into the 'intermediates' collection: `intermediates['backbone'][
'stage2_conv1_act']`, and the class maps (after the final ReLU, if any) as
`intermediates['classifier_act']`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from allconv_jax import cpu
from allconv_jax.errors import UserError

# Kernel sizes of each stage's convolutions; stage widths are 96 then 192.
BASE_STAGES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "a": ((5,), (5,)),
    "b": ((5, 1), (5, 1)),
    "c": ((3, 3), (3, 3)),
}
STAGE_WIDTHS = (96, 192)
HEAD_WIDTH = 192
VARIANTS = ("model", "strided_cnn", "convpool_cnn", "all_cnn")
MODEL_NAMES = tuple(f"{v}_{b}" for b in BASE_STAGES for v in VARIANTS)
KERNEL_INITS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal",
                "caffe_xavier", "gaussian", "torch_default")
# Where a strided convolution's padding goes: (k-1)/2 on every side as Caffe and PyTorch pad
# (windows start at pixel -1 for a 3x3), or TF/Keras "SAME" (windows start at pixel 0, the odd
# pixel of padding after the image). Stride-1 convolutions with odd kernels pad alike in both.
PADDINGS = ("symmetric", "tf_same")
RELU_RULES = ("standard", "guided", "deconvnet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Conv:
  """A convolution followed by a ReLU ('SAME': keeps the size at stride 1; 'VALID': no pad)."""
  name: str
  features: int
  kernel: int
  stride: int = 1
  padding: str = "SAME"


def conv_padding(layer: Conv, convention: str) -> str | tuple[tuple[int, int], tuple[int, int]]:
  """The padding Flax gets for `layer` under a padding convention (see PADDINGS)."""
  if layer.padding == "VALID" or convention == "tf_same":
    return layer.padding
  pad = (layer.kernel - 1) // 2
  return ((pad, pad), (pad, pad))


@dataclasses.dataclass(frozen=True)
class MaxPool:
  """3x3 max-pooling with stride 2 ("same" padding: 32 -> 16 -> 8)."""
  name: str


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Dropout with a fixed rate; active only in training."""
  name: str
  rate: float


Layer = Conv | MaxPool | Dropout


def article(name: str) -> str:
  """'an all_cnn_c', 'a model_a'."""
  return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def scaled_width(width: int, multiplier: float) -> int:
  """A hidden width scaled by the width multiplier, rounded, at least 1."""
  return max(1, int(round(width * multiplier)))


def check_model_name(name: str) -> tuple[str, str]:
  """Splits a model name such as 'all_cnn_c' into (variant, base); UserError if unknown."""
  if name not in MODEL_NAMES:
    raise UserError(f"unknown model.name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  variant, base = name.rsplit("_", 1)
  return variant, base


def layer_list(name: str, width_multiplier: float = 1.0, input_dropout: float = 0.2,
               dropout: float = 0.5) -> tuple[Layer, ...]:
  """The backbone's layers (everything before the class layer) of network `name`."""
  variant, base = check_model_name(name)
  layers: list[Layer] = [Dropout("input_dropout", input_dropout)]
  for s, (kernels, width) in enumerate(zip(BASE_STAGES[base], STAGE_WIDTHS, strict=True), 1):
    w = scaled_width(width, width_multiplier)
    convs = [Conv(f"stage{s}_conv{i}", w, k) for i, k in enumerate(kernels, 1)]
    if variant == "model":
      layers += [*convs, MaxPool(f"stage{s}_pool")]
    elif variant == "strided_cnn":
      layers += [*convs[:-1], dataclasses.replace(convs[-1], stride=2)]
    elif variant == "convpool_cnn":
      layers += [*convs, Conv(f"stage{s}_conv{len(convs) + 1}", w, 3), MaxPool(f"stage{s}_pool")]
    else:  # all_cnn
      layers += [*convs, Conv(f"stage{s}_reduce", w, 3, stride=2)]
    layers.append(Dropout(f"stage{s}_dropout", dropout))
  head = scaled_width(HEAD_WIDTH, width_multiplier)
  layers += [Conv("head_conv1", head, 3, padding="VALID"), Conv("head_conv2", head, 1)]
  return tuple(layers)


def kernel_initializer(name: str, std: float = 0.05) -> Callable[..., jax.Array]:
  """The kernel initializer `name`: `library_initializer(name, std)`, drawn as rank 3."""
  return functools.partial(drawn_as_rank_3, library_initializer(name, std))


def library_initializer(name: str, std: float = 0.05) -> Callable[..., jax.Array]:
  """Flax's weight initializers by name ('he_normal' is He et al.'s untruncated normal).

  'caffe_xavier' is Caffe's "xavier" filler with its default variance_norm FAN_IN: uniform on
  +-sqrt(3 / fan_in), variance 1 / fan_in (fan_in = kernel height x width x input channels).
  'gaussian' is a zero-mean normal with standard deviation `std` (neon's Gaussian(scale=0.05)).
  """
  inits = {
      "he_normal": nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
      "he_uniform": nn.initializers.variance_scaling(2.0, "fan_in", "uniform"),
      "glorot_normal": nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
      "glorot_uniform": nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
      "lecun_normal": nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
      "caffe_xavier": nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
      "gaussian": nn.initializers.normal(stddev=std),
      # PyTorch's Conv2d default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
      "torch_default": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
  }
  if name not in inits:
    raise UserError(f"unknown model.kernel_init {name!r}; valid: {', '.join(KERNEL_INITS)}")
  return inits[name]


def drawn_as_rank_3(init: Callable[..., jax.Array], key: jax.Array, shape: Sequence[int],
                    dtype: Any = jnp.float32) -> jax.Array:
  """`init`'s HWIO kernel, bit for bit, drawn as (H*W, I, O) and reshaped: the same fans and
  the same flat order of random values, but XLA:CPU compiles a rank-4 draw several times as
  slowly."""
  if len(shape) != 4:
    return init(key, shape, dtype)
  return init(key, (shape[0] * shape[1], *shape[2:]), dtype).reshape(shape)


# ReLUs with three backward rules (paper section 3): one network, three ways to backpropagate.
@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
  """ReLU whose gradient passes only where the input and the incoming gradient are positive."""
  return jnp.maximum(x, 0)


def _guided_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.maximum(x, 0), x


def _guided_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_fwd, _guided_bwd)


@jax.custom_vjp
def deconvnet_relu(x: jax.Array) -> jax.Array:
  """ReLU whose gradient is the ReLU of the incoming gradient (Zeiler & Fergus's deconvnet)."""
  return jnp.maximum(x, 0)


def _deconv_fwd(x: jax.Array) -> tuple[jax.Array, None]:
  return jnp.maximum(x, 0), None


def _deconv_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
  return (jnp.maximum(g, 0),)


deconvnet_relu.defvjp(_deconv_fwd, _deconv_bwd)


def relu(x: jax.Array, rule: str = "standard") -> jax.Array:
  """ReLU with the backward rule `rule` ('standard', 'guided' or 'deconvnet')."""
  if rule == "standard":
    return jax.nn.relu(x)
  if rule == "guided":
    return guided_relu(x)
  if rule == "deconvnet":
    return deconvnet_relu(x)
  raise ValueError(f"unknown relu rule {rule!r}; valid: {RELU_RULES}")


@dataclasses.dataclass(frozen=True)
class ConvOptions:
  """How every convolution of a network is built: init, biases, padding, dtype, and which code
  runs it (`cpu.Convolutions`: XLA, the reference, unless cpu.choose picked otherwise)."""
  kernel_init: str = "he_normal"
  init_std: float = 0.05  # for kernel_init='gaussian'
  use_bias: bool = True
  bias_init: float = 0.0
  padding: str = "symmetric"  # see PADDINGS
  dtype: Any = jnp.float32
  convolutions: cpu.Convolutions = cpu.Convolutions()

  def make(self, layer: Conv) -> nn.Module:
    """The Flax convolution of `layer` (parameters float32, compute in `dtype`)."""
    return cpu.conv_layer(self.convolutions, features=layer.features, kernel=layer.kernel,
                          stride=layer.stride, padding=conv_padding(layer, self.padding),
                          use_bias=self.use_bias,
                          kernel_init=kernel_initializer(self.kernel_init, self.init_std),
                          bias_init=nn.initializers.constant(self.bias_init), dtype=self.dtype,
                          name=layer.name)


class FlatMaskDropout(nn.Module):
  """`nn.Dropout`, bit for bit, with its mask drawn as one flat vector and then reshaped.

  Threefry numbers each random value by its flat index, so the mask is the same; but XLA:CPU
  compiles a rank-4 draw slowly: on a 2-core Zen 3 VM a tiny All-CNN-C train step compiled in
  16.3 s with `nn.Dropout`, 1.9 s with this module (docs/performance.md).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.size,)).reshape(x.shape)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class Backbone(nn.Module):
  """Runs a layer list; each conv's ReLU output is sown into 'intermediates' as '<name>_act'."""
  layers: tuple[Layer, ...]
  options: ConvOptions = ConvOptions()
  relu_rule: str = "standard"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for layer in self.layers:
      if isinstance(layer, Conv):
        x = self.options.make(layer)(x)
        x = relu(x, self.relu_rule)
        self.sow("intermediates", f"{layer.name}_act", x)
      elif isinstance(layer, MaxPool):
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      else:
        x = FlatMaskDropout(layer.rate, name=layer.name)(x, train)
    return x


class AllConvNet(nn.Module):
  """One of the paper's 12 networks: backbone, 1x1 class layer, (ReLU), global average."""
  arch: str
  num_classes: int
  width_multiplier: float = 1.0
  final_relu: bool = True
  input_dropout: float = 0.2
  dropout: float = 0.5
  options: ConvOptions = ConvOptions()
  relu_rule: str = "standard"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers = layer_list(self.arch, self.width_multiplier, self.input_dropout, self.dropout)
    x = x.astype(self.options.dtype)
    x = Backbone(layers, self.options, self.relu_rule, name="backbone")(x, train)
    x = self.options.make(Conv("classifier", self.num_classes, 1))(x)
    if self.final_relu:
      x = relu(x, self.relu_rule)
    self.sow("intermediates", "classifier_act", x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def create_model(model_config: Any, num_classes: int, convolutions: cpu.Convolutions,
                 relu_rule: str = "standard") -> AllConvNet:
  """The network a validated `config.model` describes, its convolutions run by `convolutions`
  (`cpu.choose`); the caller supplies the class count."""
  options = ConvOptions(kernel_init=model_config.kernel_init, init_std=model_config.init_std,
                        use_bias=model_config.use_bias, bias_init=model_config.bias_init,
                        padding=model_config.padding, dtype=DTYPES[model_config.dtype],
                        convolutions=convolutions)
  return AllConvNet(arch=model_config.name, num_classes=num_classes,
                    width_multiplier=model_config.width_multiplier,
                    final_relu=model_config.final_relu,
                    input_dropout=model_config.input_dropout, dropout=model_config.dropout,
                    options=options, relu_rule=relu_rule)


@functools.partial(jax.jit, static_argnames=("model", "image_size"))
def init_params(model: AllConvNet, key: jax.Array, image_size: int = 32) -> Any:
  """Initial parameters for 32x32x3 inputs: one jitted computation, traced once per model and
  image size in a process (flax modules compare by their fields)."""
  x = jnp.zeros((1, image_size, image_size, 3))
  return model.init({"params": key}, x, train=False)["params"]


def dead_relu_fractions(model: AllConvNet, params: Any, images: jax.Array) -> dict[str, float]:
  """Per ReLU layer in network order, the fraction of its channels that output zero on every
  one of `images` (a dead channel passes no gradient); the class layer only with final_relu."""
  names = [layer.name for layer in layer_list(model.arch, model.width_multiplier)
           if isinstance(layer, Conv)] + (["classifier"] if model.final_relu else [])
  return dict(zip(names, map(float, _dead_fractions(model, params, images)), strict=True))


@functools.partial(jax.jit, static_argnames="model")
def _dead_fractions(model: AllConvNet, params: Any, images: jax.Array) -> list[jax.Array]:
  """dead_relu_fractions' values in network order, in one compiled computation."""
  _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
  inter = state["intermediates"]
  acts = [inter["backbone"][f"{layer.name}_act"][0]
          for layer in layer_list(model.arch, model.width_multiplier) if isinstance(layer, Conv)]
  if model.final_relu:
    acts.append(inter["classifier_act"][0])
  return [jnp.mean(jnp.max(act, axis=(0, 1, 2)) <= 0) for act in acts]


def count_params(params: Any) -> int:
  """The number of scalars in a parameter tree."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


@functools.cache
def forward_flops(name: str, width_multiplier: float, num_classes: int,
                  image_size: int = 32) -> int:
  """Multiply-adds x2 of one image's forward pass through the convolutions."""
  size, channels, flops = image_size, 3, 0
  layers: Sequence[Layer] = (*layer_list(name, width_multiplier),
                             Conv("classifier", num_classes, 1))
  for layer in layers:
    if isinstance(layer, Conv):
      size = (size - layer.kernel + 1 if layer.padding == "VALID" else
              -(-size // layer.stride))
      flops += 2 * size * size * layer.kernel * layer.kernel * channels * layer.features
      channels = layer.features
    elif isinstance(layer, MaxPool):
      size = -(-size // 2)
  return flops


def train_flops_per_image(name: str, width_multiplier: float, num_classes: int) -> int:
  """Forward + backward FLOPs of one trained image (3x the forward pass)."""
  return 3 * forward_flops(name, width_multiplier, num_classes)


def summary(model: AllConvNet) -> str:
  """A layer table (layer, output shape, parameters) and the total parameter count."""
  x = jnp.zeros((1, 32, 32, 3))
  table = nn.tabulate(model, jax.random.key(0), compute_flops=False,
                      console_kwargs={"width": 120, "force_terminal": False})(x, train=False)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  return f"{table}\ntotal parameters: {count_params(params):,}"
