"""The 12 networks: parameter counts from the paper's layer lists, shapes, dropout, options."""

import dataclasses
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allconv_jax import cpu, models
from allconv_jax.config import get_config, validate
from allconv_jax.cpu import polyphase
from allconv_jax.errors import UserError
from tests import helpers


def conv(cin: int, cout: int, k: int) -> int:
  return k * k * cin * cout + cout


def expected_params(name: str, classes: int) -> int:
  """Our own arithmetic from the issue's layer lists (not read back from the model)."""
  variant, base = name.rsplit("_", 1)
  kernels = {"a": [5], "b": [5, 1], "c": [3, 3]}[base]
  total, cin = 0, 3
  for width in (96, 192):
    for k in kernels:
      total += conv(cin, width, k)
      cin = width
    if variant in ("convpool_cnn", "all_cnn"):  # the extra / replacing 3x3 convolution
      total += conv(width, width, 3)
  return total + conv(192, 192, 3) + conv(192, 192, 1) + conv(192, classes, 1)


ALL = [f"{v}_{b}" for b in "abc" for v in ("model", "strided_cnn", "convpool_cnn", "all_cnn")]


OPTION_FIELDS = {f.name for f in dataclasses.fields(models.ConvOptions)}


def make(name: str = "all_cnn_c", classes: int = 10, polyphase_grad: bool = False,
         **kw) -> models.AllConvNet:
  """A network with XLA convolutions (the polyphase strided input gradient if asked); keywords
  that name ConvOptions fields (dtype, kernel_init, ...) go there."""
  options = models.ConvOptions(convolutions=cpu.Convolutions("xla", polyphase_grad),
                               **{k: kw.pop(k) for k in list(kw) if k in OPTION_FIELDS})
  return models.AllConvNet(arch=name, num_classes=classes, options=options, **kw)


def shapes(model: models.AllConvNet):
  return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))


def test_twelve_names():
  assert sorted(models.MODEL_NAMES) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("classes", [10, 100])
def test_parameter_counts(name, classes):
  assert models.count_params(shapes(make(name, classes))) == expected_params(name, classes)


def test_all_cnn_c_count_is_the_known_one():
  assert expected_params("all_cnn_c", 10) == 1_369_738


@pytest.mark.parametrize("name", ["model_a", "strided_cnn_b", "convpool_cnn_c", "all_cnn_c"])
def test_output_shapes_and_feature_map(name):
  x = jnp.ones((2, 32, 32, 3))
  for classes in (10, 100):
    model = make(name, classes, width_multiplier=0.1)
    params = models.init_params(model, jax.random.key(1))
    logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
    assert logits.shape == (2, classes) and logits.dtype == jnp.float32
    inter = state["intermediates"]
    assert inter["backbone"]["head_conv2_act"][0].shape == (2, 6, 6, 19)  # 192 * 0.1 -> 19
    assert inter["classifier_act"][0].shape == (2, 6, 6, classes)


@pytest.mark.parametrize("name", ALL)
def test_map_before_class_layer_is_6x6x192(name):
  out = jax.eval_shape(
      lambda: make(name).apply({"params": models.init_params(make(name), jax.random.key(0))},
                               jnp.zeros((1, 32, 32, 3)), mutable=["intermediates"]))
  assert out[1]["intermediates"]["backbone"]["head_conv2_act"][0].shape == (1, 6, 6, 192)


def test_layer_lists_follow_the_transformations():
  def kinds(name):
    return [(type(layer).__name__, getattr(layer, "kernel", None), getattr(layer, "stride", None))
            for layer in models.layer_list(name) if not isinstance(layer, models.Dropout)]
  head = [("Conv", 3, 1), ("Conv", 1, 1)]
  assert kinds("model_c") == [("Conv", 3, 1)] * 2 + [("MaxPool", None, None)] + \
      [("Conv", 3, 1)] * 2 + [("MaxPool", None, None)] + head
  assert kinds("strided_cnn_c") == [("Conv", 3, 1), ("Conv", 3, 2)] * 2 + head
  assert kinds("convpool_cnn_b") == [("Conv", 5, 1), ("Conv", 1, 1), ("Conv", 3, 1),
                                     ("MaxPool", None, None)] * 2 + head
  assert kinds("all_cnn_a") == [("Conv", 5, 1), ("Conv", 3, 2)] * 2 + head
  dropouts = [layer.rate for layer in models.layer_list("all_cnn_c")
              if isinstance(layer, models.Dropout)]
  assert dropouts == [0.2, 0.5, 0.5]


def test_strided_dropout_follows_the_strided_conv():
  names = [layer.name for layer in models.layer_list("strided_cnn_a")]
  assert names.index("stage1_dropout") == names.index("stage1_conv1") + 1


def test_dropout_only_in_training():
  model = make(width_multiplier=0.1)
  params = models.init_params(model, jax.random.key(0))
  x = helpers.normal(2, (4, 32, 32, 3))
  e1 = model.apply({"params": params}, x, train=False)
  e2 = model.apply({"params": params}, x, train=False)
  np.testing.assert_array_equal(e1, e2)
  t1 = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
  t2 = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(t1, t2)
  no_drop = make(width_multiplier=0.1, input_dropout=0.0, dropout=0.0)
  t3 = no_drop.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(t3, e1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, dtype", [((4, 9, 7, 5), jnp.float32), ((3, 5), jnp.float32),
                                          ((2, 6, 6, 4), jnp.bfloat16)])
def test_flat_mask_dropout_is_flax_dropout_bit_for_bit(shape, dtype):
  """The network's dropout draws its mask flat (a faster compile); the numbers are Flax's."""
  x = jnp.asarray(helpers.normal(7, shape), dtype)
  for rate in (0.2, 0.5):
    for seed in (0, 1):
      rngs = {"dropout": jax.random.key(seed)}
      want = nn.Dropout(rate, deterministic=False, name="d").apply({}, x, rngs=rngs)
      got = models.FlatMaskDropout(rate, name="d").apply({}, x, True, rngs=rngs)
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert models.FlatMaskDropout(0.5).apply({}, x, False) is x


def test_width_multiplier_rounds_and_keeps_one():
  assert models.scaled_width(96, 0.25) == 24 and models.scaled_width(192, 0.001) == 1
  p = shapes(make(width_multiplier=0.25))
  assert p["backbone"]["stage1_conv1"]["kernel"].shape == (3, 3, 3, 24)
  assert p["backbone"]["head_conv2"]["kernel"].shape == (1, 1, 48, 48)


def test_bfloat16_compute_float32_params():
  model = make(width_multiplier=0.1, dtype=jnp.bfloat16)
  params = models.init_params(model, jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  x = helpers.normal(1, (2, 32, 32, 3))
  logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
  assert logits.dtype == jnp.float32
  assert state["intermediates"]["backbone"]["stage1_conv1_act"][0].dtype == jnp.bfloat16
  ref = make(width_multiplier=0.1).apply({"params": params}, x)
  np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.05)


def test_he_normal_and_zero_bias_defaults():
  params = models.init_params(make(), jax.random.key(0))
  k = params["backbone"]["stage2_conv2"]["kernel"]
  assert float(jnp.std(k)) == pytest.approx(np.sqrt(2 / (9 * 192)), rel=0.05)
  assert float(jnp.max(jnp.abs(k))) > 2.5 * np.sqrt(2 / (9 * 192))  # untruncated normal
  assert all(float(jnp.abs(layer["bias"]).max()) == 0.0
             for layer in params["backbone"].values())
  other = models.init_params(make(bias_init=0.1, kernel_init="glorot_uniform"),
                             jax.random.key(0))
  assert float(other["classifier"]["bias"][0]) == pytest.approx(0.1)


def test_final_relu_switch():
  x = helpers.normal(5, (8, 32, 32, 3))
  on = make(width_multiplier=0.1, bias_init=-10.0)  # every class map negative
  params = models.init_params(on, jax.random.key(0))
  assert float(jnp.abs(on.apply({"params": params}, x)).max()) == 0.0
  off = make(width_multiplier=0.1, bias_init=-10.0, final_relu=False)
  assert float(off.apply({"params": params}, x).max()) < 0


def test_class_layer_is_a_separate_submodule():
  p = shapes(make())
  assert set(p) == {"backbone", "classifier"}
  assert p["classifier"]["kernel"].shape == (1, 1, 192, 10)


def test_create_model_from_config_and_unknown_name():
  config = get_config()
  convolutions = cpu.Convolutions("xla", True, "a test")
  model = models.create_model(config.model, 100, convolutions, relu_rule="guided")
  assert model.arch == "all_cnn_c" and model.num_classes == 100 and model.relu_rule == "guided"
  assert model.options.convolutions is convolutions
  config.model.name = "all_cnn_d"  # config.validate, run before any model is built, names them
  with pytest.raises(UserError, match="^unknown model.name 'all_cnn_d'; valid names: model_a"):
    validate(config)


def test_flops_match_the_brief():
  assert models.train_flops_per_image("all_cnn_c", 1.0, 10) == pytest.approx(1.62e9, rel=0.01)


def test_summary_is_the_layer_table_and_the_parameter_count():
  text = models.summary(models.create_model(get_config().model, 10, cpu.Convolutions()))
  assert text.splitlines()[-1] == "total parameters: 1,369,738"
  assert "backbone/stage2_reduce" in text and "classifier" in text


@pytest.mark.slow
def test_summary_cli_honours_overrides_without_tensorflow():
  """`main.py --summary` (the program: a bare config name, an override, its output) neither
  imports TensorFlow nor builds data."""
  hide = "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None"
  code = (f"{hide}; sys.argv = ['main.py', *sys.argv[1:]]; import runpy; "
          "runpy.run_path('main.py', run_name='__main__')")
  r = helpers.run([sys.executable, "-c", code, "--config=all_cnn_c", "--summary",
                   "--config.data.dataset=cifar100"])
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip().splitlines()[-1] == f"total parameters: {1_369_738 + 90 * 193:,}"
  assert "backbone/stage2_reduce" in r.stdout and "classifier" in r.stdout


def test_unknown_model_names_are_one_line():
  """What main.py (--summary or not) prints after 'error: ' for an unknown model.name."""
  config = get_config()
  config.model.name = "model_d"
  with pytest.raises(UserError) as e:
    validate(config)
  assert str(e.value) == "unknown model.name 'model_d'; valid names: " + ", ".join(ALL)


# (input size, kernel, stride, padding): the paper's layers (3x3/2 SAME on 32 and 16, 5x5/2 and
# 1x1/2 of the strided A and B nets) and odd cases (odd sizes, VALID, stride 3, uneven pads).
POLYPHASE_CASES = [(32, 3, 2, "SAME"), (16, 3, 2, "SAME"), (32, 5, 2, "SAME"), (16, 1, 2, "SAME"),
                   (15, 3, 2, "SAME"), (9, 3, 2, "VALID"), (11, 5, 2, "VALID"),
                   (13, 3, 3, "SAME"), (10, 3, 2, ((2, 0), (0, 3)))]


@pytest.mark.parametrize("size, kernel, stride, padding", POLYPHASE_CASES)
def test_polyphase_gradients_equal_autodiff(size, kernel, stride, padding):
  dn = ("NHWC", "HWIO", "NHWC")
  seed = 3 * (size * kernel + stride)
  x = helpers.normal(seed, (2, size, size, 3))
  w = helpers.normal(seed + 1, (kernel, kernel, 3, 4))

  def ref(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)

  def ours(x, w):
    return polyphase.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)

  y = ref(x, w)
  np.testing.assert_array_equal(ours(x, w), y)
  g = helpers.normal(seed + 2, y.shape)
  want = jax.grad(lambda x, w: jnp.vdot(ref(x, w), g), (0, 1))(x, w)
  got = jax.grad(lambda x, w: jnp.vdot(ours(x, w), g), (0, 1))(x, w)
  assert "custom_vjp" in str(jax.make_jaxpr(ours)(x, w))
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_polyphase_leaves_unstrided_convolutions_to_lax():
  x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2))
  jaxpr = str(jax.make_jaxpr(lambda x, w: polyphase.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, w))
  assert "custom_vjp" not in jaxpr and "conv_general_dilated" in jaxpr


@pytest.mark.parametrize("name", [pytest.param("strided_cnn_a", marks=pytest.mark.slow),
                                  pytest.param("strided_cnn_b", marks=pytest.mark.slow),
                                  "all_cnn_c"])
def test_polyphase_network_gradients_equal_xla(name):
  x = helpers.normal(0, (2, 32, 32, 3))
  fast = make(name, width_multiplier=0.125, polyphase_grad=True)
  plain = make(name, width_multiplier=0.125, polyphase_grad=False)
  params = models.init_params(plain, jax.random.key(1))

  def loss(model, params, x):
    return jnp.sum(model.apply({"params": params}, x) ** 2)

  want = jax.grad(functools.partial(loss, plain), (0, 1))(params, x)
  got = jax.grad(functools.partial(loss, fast), (0, 1))(params, x)
  assert "custom_vjp" in str(jax.make_jaxpr(functools.partial(loss, fast))(params, x))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_strided_grad_setting():
  """model.strided_grad: 'auto' takes the polyphase gradient on the CPU only."""
  config = get_config()
  assert config.model.strided_grad == "auto"
  on_cpu = jax.default_backend() == "cpu"
  assert cpu.choose("xla", "auto", "float32").polyphase == on_cpu
  for setting, want in (("xla", False), ("polyphase", True)):
    chosen = cpu.choose("xla", setting, "float32")
    assert (chosen.backend, chosen.polyphase) == ("xla", want)
    assert chosen.name == "xla" + ("+polyphase" if want else "")
  with pytest.raises(UserError, match="unknown model.strided_grad 'fast'"):
    cpu.choose("xla", "fast", "float32")
  config.model.strided_grad = "fast"
  with pytest.raises(UserError, match="'model.strided_grad' must be one of auto, xla, polyphase"):
    validate(config)


def test_dead_relu_fractions_in_layer_order():
  model = make(width_multiplier=0.1, bias_init=-10.0)  # every pre-activation negative
  params = models.init_params(model, jax.random.key(0))
  dead = models.dead_relu_fractions(model, params, jnp.ones((3, 32, 32, 3)) * 0.01)
  names = [layer.name for layer in models.layer_list("all_cnn_c", 0.1)
           if isinstance(layer, models.Conv)]
  assert list(dead) == [*names, "classifier"] and all(f == 1.0 for f in dead.values())
  model = make(width_multiplier=0.1, final_relu=False)
  params = models.init_params(model, jax.random.key(0))
  images = helpers.normal(1, (8, 32, 32, 3))
  alive = models.dead_relu_fractions(model, params, images)
  assert "classifier" not in alive and alive["stage1_conv1"] < 1.0


@pytest.mark.parametrize("init,std", [("caffe_xavier", (1 / 27) ** 0.5),
                                      ("gaussian", 0.05), ("he_normal", (2 / 27) ** 0.5)])
def test_kernel_initializers_variance(init, std):
  """Caffe's xavier filler: uniform, variance 1/fan_in; neon's Gaussian: std 0.05."""
  w = models.kernel_initializer(init, 0.05)(jax.random.key(0), (3, 3, 3, 20000))
  assert abs(float(jnp.std(w)) / std - 1) < 0.01 and abs(float(jnp.mean(w))) < 0.01 * std
  if init == "caffe_xavier":
    assert float(jnp.max(jnp.abs(w))) <= (3 / 27) ** 0.5


@pytest.mark.parametrize("init", models.KERNEL_INITS)
def test_kernel_initializers_are_flax_initializers_bit_for_bit(init):
  """Kernels are drawn as (H*W, I, O) for a faster compile: the values and their fans are
  those of the library initializer on the HWIO shape."""
  for shape in [(3, 3, 5, 7), (1, 1, 6, 10), (5, 2, 3, 4)]:
    key = jax.random.key(sum(shape))
    want = models.library_initializer(init, 0.05)(key, shape, jnp.float32)
    got = models.kernel_initializer(init, 0.05)(key, shape, jnp.float32)
    np.testing.assert_array_equal(got, want)


def test_no_bias_switch_removes_every_bias():
  params = shapes(make(use_bias=False))
  names = ["/".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert names and all(n.endswith("/kernel") for n in names)
  assert models.count_params(params) == expected_params("all_cnn_c", 10) - (
      3 * 96 + 5 * 192 + 10)  # three convs of 96, five of 192, the class layer
