"""oneDNN convolutions (allconv_jax/onednn.py): they build here, equal XLA's forward pass and
gradients (float32: 1e-4; bfloat16: no further from float32 than XLA's bfloat16), keep
flax.linen.Conv's parameters, and `model.conv_impl` chooses them where they can run. The 12
networks with oneDNN convolutions against the float64 NumPy model: tests/test_reference.py."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allconv_jax import models, onednn
from allconv_jax.errors import UserError
from configs import default
from tests import helpers, launcher

DN = ("NHWC", "HWIO", "NHWC")
# (image size, kernel, strides, pads, input channels): the nets' 3x3 and 5x5 layers, Caffe's
# symmetric and TF's SAME pads for stride 2, VALID, and a lopsided case.
CASES = [(9, 3, (1, 1), ((1, 1), (1, 1)), 5), (10, 3, (2, 2), ((1, 1), (1, 1)), 4),
         (10, 3, (2, 2), ((0, 1), (0, 1)), 4), (8, 3, (1, 1), ((0, 0), (0, 0)), 6),
         (11, 5, (2, 2), ((2, 2), (2, 2)), 3), (9, 3, (2, 1), ((2, 0), (1, 2)), 3)]


@pytest.mark.parametrize("size, kernel, strides, pads, cin", CASES)
def test_forward_and_gradients_equal_xla(size, kernel, strides, pads, cin):
  helpers.require_onednn()
  keys = jax.random.split(jax.random.key(size * kernel + strides[0]), 4)
  x = jax.random.normal(keys[0], (3, size, size, cin))
  w = jax.random.normal(keys[1], (kernel, kernel, cin, 7))
  b = jax.random.normal(keys[2], (7,))

  def xla(x, w, b):
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN) + b

  def ours(x, w, b):
    return onednn.conv(x, w, b, strides, pads)

  y = jax.jit(xla)(x, w, b)
  got = jax.jit(ours)(x, w, b)
  assert got.shape == y.shape
  np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-5 * float(jnp.abs(y).max()))
  g = jax.random.normal(keys[3], y.shape)
  grad = jax.jit(jax.grad(lambda x, w, b: jnp.vdot(ours(x, w, b), g), (0, 1, 2)))
  assert "allconv_onednn_conv_f_float32" in jax.jit(ours).lower(x, w, b).as_text()
  hlo = grad.lower(x, w, b).as_text()  # the forward pass is not needed there
  assert all(f"allconv_onednn_conv_{role}_float32" in hlo for role in "dw")
  want = jax.jit(jax.grad(lambda x, w, b: jnp.vdot(xla(x, w, b), g), (0, 1, 2)))(x, w, b)
  for a, b_ in zip(grad(x, w, b), want, strict=True):
    assert a.shape == b_.shape and a.dtype == b_.dtype
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5 * float(jnp.abs(b_).max()))


def test_spatial_kernels_go_to_onednn_with_flax_parameters():
  helpers.require_onednn()
  options = models.ConvOptions(onednn=True, kernel_init="he_uniform", bias_init=0.1)
  plain = dataclasses.replace(options, onednn=False)
  for kernel, kind in ((3, onednn.Conv), (5, onednn.Conv), (1, nn.Conv)):
    layer = models.Conv("c", 8, kernel, stride=2)
    assert type(options.make(layer)) is kind
    x = jnp.ones((2, 9, 9, 3))
    params = options.make(layer).init(jax.random.key(0), x)
    want = plain.make(layer).init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, want)
    equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, want)
    assert all(jax.tree.leaves(equal)), "the same initial parameters as flax.linen.Conv"


@pytest.mark.parametrize("compiler", ["false", "/no/such/compiler"])
def test_a_failed_build_leaves_no_library(compiler, tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  with pytest.raises(OSError, match="failed" if compiler == "false" else "No such file"):
    onednn._build(compiler, onednn._prefix() or str(tmp_path))
  assert not [f for f in os.listdir(tmp_path / "allconv-jax" / "onednn")
              if not f.endswith(".lock")]


def test_conv_impl_setting(monkeypatch):
  helpers.require_onednn()
  config = default.get_config()
  assert config.model.conv_impl == "auto"
  bf16 = onednn.unsupported("bfloat16") is None
  for setting, dtype, want in (("auto", "float32", True), ("xla", "float32", False),
                               ("onednn", "float32", True), ("auto", "bfloat16", bf16)):
    config.model.conv_impl, config.model.dtype = setting, dtype
    assert models.create_model(config.model, 10).options.onednn is want
  with pytest.raises(UserError, match="conv_impl=onednn cannot run here: oneDNN convolutions "
                     "take float32 or bfloat16, not float16"):
    models.use_onednn("onednn", "float16")
  config.model.conv_impl, config.model.dtype = "onednn", "float32"
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(UserError, match="it runs on one device, not 4"):
    models.create_model(config.model, 10)
  config.model.conv_impl = "auto"
  assert models.create_model(config.model, 10).options.onednn is False
  config.model.conv_impl = "fast"
  with pytest.raises(UserError, match="unknown model.conv_impl 'fast'"):
    models.create_model(config.model, 10)


def network_loss_and_grads(name: str, options: models.ConvOptions) -> Any:
  init = models.AllConvNet(arch=name, num_classes=10, width_multiplier=0.25)
  model = models.AllConvNet(arch=name, num_classes=10, width_multiplier=0.25, options=options)
  params = models.init_params(init, jax.random.key(1))
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  labels = jnp.arange(16) % 10

  def loss(params):
    logits = model.apply({"params": params}, x).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  return jax.tree.leaves(jax.jit(jax.value_and_grad(loss))(params))


@pytest.mark.parametrize("name", ["model_a", "strided_cnn_b", "all_cnn_c"])
def test_bfloat16_is_as_close_to_float32_as_xlas_bfloat16(name):
  """The stated tolerance for bfloat16: the loss within 1e-3 of float32's, and the gradients'
  relative errors against float32 (max and median over the parameters) at most 1.5x those of
  XLA's own bfloat16 convolutions."""
  helpers.require_onednn()
  if onednn.unsupported("bfloat16"):
    pytest.skip(onednn.unsupported("bfloat16"))
  exact = network_loss_and_grads(name, models.ConvOptions())
  errors = {}
  for key, on in (("xla", False), ("onednn", True)):
    got = network_loss_and_grads(name, models.ConvOptions(dtype=jnp.bfloat16, onednn=on,
                                                          polyphase_grad=True))
    assert abs(float(got[0]) - float(exact[0])) <= 1e-3 * abs(float(exact[0])), key
    errors[key] = [float(jnp.abs(a - b).max() / jnp.abs(b).max())
                   for a, b in zip(got[1:], exact[1:], strict=True)]
  assert max(errors["onednn"]) <= 1.5 * max(errors["xla"]), errors
  assert np.median(errors["onednn"]) <= 1.5 * np.median(errors["xla"]), errors


def test_onednn_on_two_devices_is_one_line_before_any_compute(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  r = launcher.run([sys.executable, os.path.join(helpers.ROOT, "main.py"),
                    "--config=configs/all_cnn_c.py", f"--workdir={tmp_path / 'w'}",
                    "--config.data.source=synthetic", "--config.model.conv_impl=onednn"],
                   cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and (
      "model.conv_impl=onednn cannot run here: it runs on one device, not 2" in lines[0]), r.stderr
  assert not (tmp_path / "w").exists()
