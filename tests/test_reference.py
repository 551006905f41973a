"""The project's networks against an independent float64 NumPy model (tests/numpy_reference.py).

For all 12 networks and the CIFAR-100 head, at width x0.05, in evaluation mode: the logits and
the gradient of the mean cross-entropy for every parameter agree to 1e-4 relative (float32),
under both padding conventions where they differ (the strided nets) and through both input
gradients of strided convolutions (XLA's and the polyphase one). The guided-backprop and
deconvnet rules are checked on the input gradient the visualizations use.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allconv_jax import cpu, models
from allconv_jax.config import get_config
from allconv_jax.tools import visualize
from tests import helpers
from tests import numpy_reference as ref

ALL = [f"{v}_{b}" for b in "abc" for v in ("model", "strided_cnn", "convpool_cnn", "all_cnn")]
STRIDED = [n for n in ALL if n.startswith(("strided_cnn", "all_cnn"))]
POOLED = [n for n in ALL if n not in STRIDED]
WIDTH = 0.05
RTOL = 1e-4


def slow_unless(fast: bool, *values):
  """A parameter set, marked slow unless `fast`: `pytest -m "not slow"` keeps a representative
  subset of these many combinations; the whole suite checks every one."""
  return pytest.param(*values, marks=() if fast else pytest.mark.slow)


def setup(name: str, classes: int = 10, padding: str = "symmetric", polyphase: bool = False,
          relu_rule: str = "standard", use_bias: bool = True, onednn: bool = False):
  """(model, float32 params with random biases, float64 copy by layer name, images, labels)."""
  convolutions = cpu.Convolutions(backend="onednn" if onednn else "xla", polyphase=polyphase)
  options = models.ConvOptions(padding=padding, use_bias=use_bias, convolutions=convolutions)
  model = models.AllConvNet(arch=name, num_classes=classes, width_multiplier=WIDTH,
                            options=options, relu_rule=relu_rule)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(zlib.crc32(f"{name}/{classes}".encode()))

  def draw(path, leaf):  # He-normal kernels; biases of both signs, so their gradients show
    fan_in = np.prod(leaf.shape[:-1])
    std = 0.1 if path[-1].key == "bias" else np.sqrt(2.0 / fan_in)
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  by_name = {**params["backbone"], "classifier": params["classifier"]}
  params64 = {n: {k: np.asarray(v, np.float64) for k, v in p.items()} for n, p in by_name.items()}
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  labels = np.array([3, classes - 1])
  return model, params, params64, images, labels


def assert_close(ours, theirs, what: str) -> None:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs)
  assert ours.shape == theirs.shape, what
  scale = np.max(np.abs(theirs))
  assert np.max(np.abs(ours - theirs)) <= RTOL * scale, (
      f"{what}: max |difference| {np.max(np.abs(ours - theirs)):.3g}, scale {scale:.3g}")


def check_against_reference(name: str, classes: int = 10, padding: str = "symmetric",
                            polyphase: bool = False, use_bias: bool = True,
                            onednn: bool = False) -> None:
  model, params, params64, images, labels = setup(name, classes, padding, polyphase,
                                                  use_bias=use_bias, onednn=onednn)

  def loss_fn(p):
    logits = model.apply({"params": p}, images, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  ops = ref.network(name, WIDTH, classes)
  ref_logits, ref_loss, ref_grads = ref.loss_and_grads(ops, params64, images.astype(np.float64),
                                                       labels, padding)
  assert_close(logits, ref_logits, "logits")
  assert abs(float(loss) - ref_loss) <= RTOL * abs(ref_loss)
  ours = {**grads["backbone"], "classifier": grads["classifier"]}
  assert sorted(ours) == sorted(ref_grads)
  for layer, g in ref_grads.items():
    assert sorted(ours[layer]) == sorted(g), layer
    for kind, value in g.items():
      assert np.any(value != 0), f"{layer}/{kind}: a zero reference gradient proves nothing"
      assert_close(ours[layer][kind], value, f"{layer}/{kind}")


@pytest.mark.parametrize("name", POOLED)
def test_pooled_nets_match_reference(name):
  check_against_reference(name)


@pytest.mark.parametrize("name, padding, polyphase", [
    slow_unless(padding == "symmetric", name, padding, polyphase)
    for name in STRIDED for padding in ("symmetric", "tf_same") for polyphase in (False, True)],
    ids=lambda v: {False: "xla_grad", True: "polyphase_grad"}.get(v, v))
def test_strided_nets_match_reference(name, padding, polyphase):
  check_against_reference(name, padding=padding, polyphase=polyphase)


@pytest.mark.parametrize("polyphase", [False, True], ids=["xla_grad", "polyphase_grad"])
def test_cifar100_head_matches_reference(polyphase):
  check_against_reference("all_cnn_c", classes=100, polyphase=polyphase)


@pytest.mark.parametrize("name, padding", [
    slow_unless((n, p) in (("all_cnn_c", "symmetric"), ("strided_cnn_a", "tf_same")), n, p)
    for n, p in [(n, "symmetric") for n in ALL] + [(n, "tf_same") for n in STRIDED]])
def test_onednn_convolutions_match_reference(name, padding):
  helpers.require_onednn()
  check_against_reference(name, padding=padding, onednn=True)


def test_without_biases_matches_reference():
  check_against_reference("all_cnn_b", use_bias=False, polyphase=True)


@pytest.mark.parametrize("name", ["strided_cnn_a", "all_cnn_c"])
def test_the_two_paddings_are_different_functions(name):
  """The reference tells the conventions apart: TF's SAME logits are not Caffe's."""
  model, params, params64, images, _ = setup(name, padding="tf_same")
  ours = np.asarray(model.apply({"params": params}, images, train=False), np.float64)
  symmetric, _ = ref.forward(ref.network(name, WIDTH, 10), params64, images.astype(np.float64),
                             "symmetric")
  assert np.max(np.abs(ours - symmetric)) > 100 * RTOL * np.max(np.abs(symmetric))


def test_default_config_pads_symmetrically():
  config = get_config()
  assert config.model.padding == "symmetric"
  model = models.create_model(config.model, 10, cpu.Convolutions())
  assert model.options.padding == "symmetric"


def reference_input_gradient(name: str, params64, images: np.ndarray, classes: np.ndarray,
                             rule: str) -> np.ndarray:
  return ref.input_gradient(ref.network(name, WIDTH, 10), params64, images.astype(np.float64),
                            classes, "symmetric", rule)


@pytest.mark.parametrize("name, rule", [slow_unless(name.endswith("_c"), name, rule)
                                        for name in ALL for rule in ("guided", "deconvnet")])
def test_backward_rules_input_gradient_matches_reference(name, rule):
  model, params, params64, images, _ = setup(name, relu_rule=rule, polyphase=name in STRIDED)
  classes = np.array([1, 8])

  def score(x):
    return jnp.sum(model.apply({"params": params}, x, train=False)[np.arange(2), classes])

  theirs = reference_input_gradient(name, params64, images, classes, rule)
  assert np.any(theirs != 0)
  assert_close(jax.grad(score)(jnp.asarray(images)), theirs, f"{rule} input gradient")


@pytest.mark.parametrize("rule", ["standard", "deconvnet", "guided"])
def test_visualize_maps_match_reference(rule):
  """The maps `python -m allconv_jax.tools.visualize` draws are the reference's input gradients."""
  model, params, params64, images, _ = setup("all_cnn_c", relu_rule=rule, polyphase=True)
  classes = np.array([1, 8])
  ours = visualize.input_gradients(model, params, jnp.asarray(images),
                                   [visualize.class_objective(jnp.asarray(classes))])[0]
  assert_close(ours, reference_input_gradient("all_cnn_c", params64, images, classes, rule),
               f"{rule} map")
