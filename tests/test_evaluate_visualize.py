"""The tools that run a trained network again: visualize (the ReLU backward rules by hand, the
rule switch, layer names, saliency grids) and evaluate (the test accuracy, image files)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from allconv_jax import checkpointing, cpu, input_pipeline, models
from allconv_jax.data import preprocessing
from allconv_jax.errors import UserError
from allconv_jax.tools import evaluate, visualize
from tests.helpers import tiny_config
from tests.tool_helpers import assert_png

# One worker for the three results-tools files (sweep, report, evaluate/visualize): they
# share conftest.py's `swept` and `model_a_run`; among the longest (scheduled first).
pytestmark = [pytest.mark.xdist_group("results_tools")]


# ----------------------------------------------------------------------------- backward rules


X = jnp.array([-1.0, 2.0, 3.0, -4.0, 0.0])
G = jnp.array([5.0, -6.0, 7.0, 8.0, 9.0])


@pytest.mark.parametrize("rule, want", [
    ("standard", [0.0, -6.0, 7.0, 0.0, 0.0]),   # g where x > 0
    ("guided", [0.0, 0.0, 7.0, 0.0, 0.0]),      # g where x > 0 and g > 0
    ("deconvnet", [5.0, 0.0, 7.0, 8.0, 9.0]),   # max(g, 0), whatever x was
])
def test_relu_backward_rules_by_hand(rule, want):
  y, vjp = jax.vjp(lambda x: models.relu(x, rule), X)
  np.testing.assert_array_equal(y, [0.0, 2.0, 3.0, 0.0, 0.0])  # the forward pass is one ReLU
  np.testing.assert_array_equal(vjp(G)[0], want)


# x -> relu(W2 relu(W1 x)): z1 = W1 x = (1, 2, -1), h = (1, 2, 0), z2 = W2 h = (3, 1).
W1 = jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
W2 = jnp.array([[1.0, 1.0, 1.0], [-1.0, 1.0, 0.0]])
X2 = jnp.array([1.0, 1.0])
G2 = jnp.array([1.0, -2.0])


@pytest.mark.parametrize("rule, want", [
    # dz2 = (1, -2); dh = W2^T dz2 = (3, -1, 1); dz1 = dh * [z1 > 0] = (3, -1, 0); W1^T dz1.
    ("standard", [3.0, -2.0]),
    # dz2 = (1, 0); dh = (1, 1, 1); dz1 = dh * [z1 > 0][dh > 0] = (1, 1, 0); W1^T dz1.
    ("guided", [1.0, 2.0]),
    # dz2 = relu(g) = (1, 0); dh = (1, 1, 1); dz1 = relu(dh) = (1, 1, 1); W1^T dz1.
    ("deconvnet", [0.0, 2.0]),
])
def test_backward_rules_through_two_layers_by_hand(rule, want):
  def net(x):
    return models.relu(W2 @ models.relu(W1 @ x, rule), rule)

  y, vjp = jax.vjp(net, X2)
  np.testing.assert_array_equal(y, [3.0, 1.0])
  np.testing.assert_array_equal(vjp(G2)[0], want)


# ----------------------------------------------------------------------------- visualize


def random_params(model, seed=0):
  """He-scaled normal weights from numpy (models.init_params takes seconds to compile on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape),
                            jnp.float32), shapes)


def test_visualize_switches_the_rule_on_the_same_network():
  config = tiny_config()
  model = models.create_model(config.model, 10, cpu.Convolutions())
  params = random_params(model)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  by_rule = visualize.rule_models(model, config.model)
  assert [m.relu_rule for m in by_rule.values()] == ["standard", "deconvnet", "guided"]
  logits = [jax.jit(m.apply)({"params": params}, images) for m in by_rule.values()]
  for other in logits[1:]:
    np.testing.assert_array_equal(other, logits[0])
  classes = jnp.array([3, 7])
  objectives = [visualize.class_objective(classes)]
  plain = jax.jit(jax.grad(
      lambda x: jnp.sum(model.apply({"params": params}, x)[jnp.arange(2), classes])))
  grads = {rule: visualize.input_gradients(m, params, images, objectives)[0]
           for rule, m in by_rule.items()}
  np.testing.assert_allclose(grads["standard"], plain(images), rtol=1e-5, atol=1e-6)
  assert not np.allclose(grads["guided"], grads["standard"])
  assert not np.allclose(grads["deconvnet"], grads["guided"])
  # Per-image targets: image 0's map depends on image 0 only.
  alone = visualize.input_gradients(by_rule["guided"], params, images[:1],
                                    [visualize.class_objective(classes[:1])])[0]
  np.testing.assert_allclose(alone[0], grads["guided"][0], rtol=1e-5, atol=1e-6)


def test_layer_names_follow_the_network_and_accept_both_spellings():
  config = tiny_config()
  model = models.create_model(config.model, 10, cpu.Convolutions())
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  paths = visualize.layer_paths(model, params)
  assert list(paths)[0] == "backbone/stage1_conv1" and list(paths)[-1] == "classifier"
  name, keys = visualize.resolve_layer(paths, "backbone/stage2_conv1")
  assert (name, visualize.resolve_layer(paths, "backbone/stage2_conv1_act")[0]) == (name, name)
  assert visualize.num_units(model, params, keys) == models.scaled_width(192, 0.05)
  with pytest.raises(UserError, match="unknown --layer"):
    visualize.resolve_layer(paths, "backbone/stage9_conv1")


@pytest.mark.slow
def test_visualize_writes_png_grids(model_a_run, tmp_path):
  out = tmp_path / "vis"
  written = visualize.visualize(model_a_run, str(out), num_images=2,
                                layer="backbone/stage2_conv1", units=(0, 3))
  names = ["predicted_class.png", "backbone_stage2_conv1_unit0.png",
           "backbone_stage2_conv1_unit3.png"]
  assert written == [str(out / n) for n in names]
  assert sorted(os.listdir(out)) == sorted(names)  # PNGs only
  for name in names:
    assert_png(out / name)
  with pytest.raises(UserError, match="out of range"):
    visualize.visualize(model_a_run, str(out), layer="classifier", units=(10,))
  with pytest.raises(UserError, match="unknown --layer"):
    visualize.visualize(model_a_run, str(out), layer="backbone/stage1_conv2")
  with pytest.raises(UserError, match="needs --layer"):
    visualize.visualize(model_a_run, str(out), units=(1,))


def test_visualize_of_a_missing_run_is_one_line(tmp_path):
  with pytest.raises(UserError, match="nope does not exist$"):
    visualize.visualize(str(tmp_path / "nope"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.slow
def test_evaluate_reproduces_the_test_accuracy_and_classifies_image_files(model_a_run, tmp_path,
                                                                          capsys):
  with open(os.path.join(model_a_run, "results.json")) as f:
    res = json.load(f)
  got = evaluate.evaluate_test_set(model_a_run, "latest", str(tmp_path / "eval"))
  assert got["accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-6)
  counts = got["confusion"]
  assert counts.sum() == res["test_images"] and (tmp_path / "eval" / "confusion.png").exists()
  assert "accuracy" in capsys.readouterr().out

  config, model, params = checkpointing.load_run(model_a_run)
  splits = input_pipeline.load_splits(config.data, config.seed)
  paths = []
  for i in range(2):
    path = str(tmp_path / f"image{i}.png")
    Image.fromarray(splits.test_images[i]).save(path)
    paths.append(path)
  ranked = evaluate.classify(model_a_run, "latest", paths)
  stats = preprocessing.load_preprocessing(os.path.join(model_a_run, "preprocessing.npz"))
  direct = evaluate.probabilities(model, params, stats, splits.test_images[:2])
  for best, p in zip(ranked, direct, strict=True):
    assert len(best) == 3 and best[0][0] == splits.class_names[int(p.argmax())]
    assert best[0][1] == pytest.approx(float(p.max()), rel=1e-5)
    assert best[0][1] >= best[1][1] >= best[2][1]
  (tmp_path / "broken.jpg").write_bytes(b"not an image")
  with pytest.raises(UserError, match="cannot read image .*broken.jpg"):
    evaluate.classify(model_a_run, "latest", [str(tmp_path / "broken.jpg")])
