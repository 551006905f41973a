"""oneDNN convolutions (allconv_jax/cpu/onednn.py): they equal XLA's forward pass and gradients
(float32: 1e-4; bfloat16: no further from float32 than XLA's bfloat16), keep flax.linen.Conv's
parameters, `model.conv_impl` chooses them where they can run, and the build cache loads only
a library this user built (docs/robustness.md). The 12 networks with oneDNN convolutions
against the float64 NumPy model: tests/test_reference.py.

The cache tests build for real once (the module fixture `built`); elsewhere $CXX is a stand-in
compiler that copies that library, so each "build" takes milliseconds and is logged."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from allconv_jax import cpu, models
from allconv_jax.config import get_config
from allconv_jax.cpu import onednn
from allconv_jax.errors import UserError
from tests import helpers

DN = ("NHWC", "HWIO", "NHWC")
# (image size, kernel, strides, pads, input channels): the nets' 3x3 and 5x5 layers, Caffe's
# symmetric and TF's SAME pads for stride 2, VALID, and a lopsided case.
CASES = [(9, 3, (1, 1), ((1, 1), (1, 1)), 5), (10, 3, (2, 2), ((1, 1), (1, 1)), 4),
         (10, 3, (2, 2), ((0, 1), (0, 1)), 4), (8, 3, (1, 1), ((0, 0), (0, 0)), 6),
         (11, 5, (2, 2), ((2, 2), (2, 2)), 3), (9, 3, (2, 1), ((2, 0), (1, 2)), 3)]


@pytest.mark.parametrize("size, kernel, strides, pads, cin", CASES)
def test_forward_and_gradients_equal_xla(size, kernel, strides, pads, cin):
  helpers.require_onednn()
  seed = 4 * (size * kernel + strides[0])
  x = helpers.normal(seed, (3, size, size, cin))
  w = helpers.normal(seed + 1, (kernel, kernel, cin, 7))
  b = helpers.normal(seed + 2, (7,))

  def xla(x, w, b):
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN) + b

  def ours(x, w, b):
    return onednn.conv(x, w, b, strides, pads)

  y = jax.jit(xla)(x, w, b)
  got = jax.jit(ours)(x, w, b)
  assert got.shape == y.shape
  np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-5 * float(jnp.abs(y).max()))
  g = helpers.normal(seed + 3, y.shape)
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
  options = models.ConvOptions(kernel_init="he_uniform", bias_init=0.1,
                               convolutions=cpu.Convolutions("onednn"))
  plain = dataclasses.replace(options, convolutions=cpu.Convolutions())
  for kernel, kind in ((3, onednn.Conv), (5, onednn.Conv), (1, nn.Conv)):
    layer = models.Conv("c", 8, kernel, stride=2)
    assert type(options.make(layer)) is kind
    x = jnp.ones((2, 9, 9, 3))
    params = options.make(layer).init(jax.random.key(0), x)
    want = plain.make(layer).init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, want)
    equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, want)
    assert all(jax.tree.leaves(equal)), "the same initial parameters as flax.linen.Conv"


def test_conv_impl_setting(monkeypatch):
  helpers.require_onednn()
  config = get_config()
  assert config.model.conv_impl == "auto"
  bf16 = onednn.unsupported("bfloat16") is None
  for setting, dtype, want in (("auto", "float32", True), ("xla", "float32", False),
                               ("onednn", "float32", True), ("auto", "bfloat16", bf16)):
    assert (cpu.choose(setting, "auto", dtype).backend == "onednn") is want, (setting, dtype)
  with pytest.raises(UserError, match="conv_impl=onednn cannot run here: oneDNN convolutions "
                     "take float32 or bfloat16, not float16"):
    cpu.choose("onednn", "auto", "float16")
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(UserError, match="cannot run here: 4 devices, and oneDNN runs on one"):
    cpu.choose("onednn", "auto", "float32")
  assert cpu.choose("auto", "auto", "float32").backend == "xla"
  with pytest.raises(UserError, match="unknown model.conv_impl 'fast'"):
    cpu.choose("fast", "auto", "float32")


def network_loss_and_grads(name: str, options: models.ConvOptions) -> Any:
  init = models.AllConvNet(arch=name, num_classes=10, width_multiplier=0.25)
  model = models.AllConvNet(arch=name, num_classes=10, width_multiplier=0.25, options=options)
  params = models.init_params(init, jax.random.key(1))
  x = helpers.normal(0, (16, 32, 32, 3))
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
  for backend in ("xla", "onednn"):
    got = network_loss_and_grads(name, models.ConvOptions(
        dtype=jnp.bfloat16, convolutions=cpu.Convolutions(backend, polyphase=True)))
    assert abs(float(got[0]) - float(exact[0])) <= 1e-3 * abs(float(exact[0])), backend
    errors[backend] = [float(jnp.abs(a - b).max() / jnp.abs(b).max())
                       for a, b in zip(got[1:], exact[1:], strict=True)]
  assert max(errors["onednn"]) <= 1.5 * max(errors["xla"]), errors
  assert np.median(errors["onednn"]) <= 1.5 * np.median(errors["xla"]), errors


def test_onednn_on_two_devices_is_one_line_before_any_compute(tmp_path):
  r = helpers.run_main("--config=configs/all_cnn_c.py", f"--workdir={tmp_path / 'w'}",
                       "--config.data.source=synthetic", "--config.model.conv_impl=onednn",
                       timeout=120, env={"JAX_PLATFORMS": "cpu",
                                         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and (
      "model.conv_impl=onednn cannot run here: 2 devices, and oneDNN runs on one"
      in lines[0]), r.stderr
  assert not (tmp_path / "w").exists()


# The build cache's trust model.


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
  """A library compiled for real (about 8 s), once for this module's cache tests."""
  helpers.require_onednn()
  path = str(tmp_path_factory.mktemp("built") / "onednn_conv.so")
  onednn._compile(onednn._compiler(), onednn._prefix(), path)
  return path


def fake_compiler(where, library: str, hang: bool = False) -> tuple[str, Any]:
  """($CXX, its log): a stand-in compiler that copies `library` to its -o path, logging each
  call first; with `hang`, it sleeps instead (a build to interrupt)."""
  script, log = where / ("hanging-cxx" if hang else "cxx"), where / "cxx.log"
  script.write_text(f"""#!{sys.executable}
import shutil, sys, time
out = sys.argv[sys.argv.index("-o") + 1]
with open({str(log)!r}, "a") as f:
  f.write(out + "\\n")
if {hang}:
  time.sleep(120)
shutil.copyfile({library!r}, out)
""")
  script.chmod(0o755)
  return str(script), log


def calls(log) -> int:
  return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """This test's own $XDG_CACHE_HOME and temporary folder; the oneDNN cache folder's path."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  return tmp_path / "xdg" / "allconv-jax" / "onednn"


def library_in_cache(cxx: str) -> bytes:
  """The bytes of the verified library onednn._library gives from the (trusted) cache folder,
  building it there if it must."""
  folder, path, warning = onednn._open_folder()
  try:
    assert warning is None, warning
    fd = onednn._library(folder, path, cxx, onednn._prefix())
    try:
      return os.read(fd, 1 << 30)
    finally:
      os.close(fd)
  finally:
    os.close(folder)


def manifest_of(data: bytes, name: str) -> str:
  return f"{hashlib.sha256(data).hexdigest()}  {name}\n"


def test_missing_builds_nothing(cache):
  reason = onednn.missing()
  assert reason is None or reason.startswith(("oneDNN", "no C++ compiler")), reason
  assert not cache.parent.exists(), "missing() created the cache"


def test_load_builds_once_into_a_private_folder_then_verifies(built, cache, tmp_path):
  cxx, log = fake_compiler(tmp_path, built)
  old = os.umask(0)  # the folder is private whatever the umask
  try:
    lib = onednn._dlopen(cxx, onednn._prefix())
  finally:
    os.umask(old)
  assert hasattr(lib, "AllconvConvWeightGradBF16") and calls(log) == 1
  assert stat.S_IMODE(cache.stat().st_mode) == 0o700
  name = onednn._name(cxx, onednn._prefix())
  assert sorted(os.listdir(cache)) == sorted([name, name + ".sha256", "build.lock"])
  data = (cache / name).read_bytes()
  assert data == open(built, "rb").read()
  assert (cache / (name + ".sha256")).read_text() == manifest_of(data, name)  # sha256sum -c
  assert not (cache / name).stat().st_mode & 0o022
  onednn._dlopen(cxx, onednn._prefix())
  assert calls(log) == 1, "a verified library is loaded, not rebuilt"


def plant(cache, name: str, state: str, good: bytes, elsewhere) -> None:
  """Puts under the library's name what an attacker or an accident could leave there."""
  bad = b"\x7fELF not the library this user built"
  lib, manifest = cache / name, cache / (name + ".sha256")
  if state == "symlink":  # to a file with a matching manifest
    (elsewhere / "lib.so").write_bytes(bad)
    lib.symlink_to(elsewhere / "lib.so")
    manifest.write_text(manifest_of(bad, name))
  elif state == "group-writable":
    lib.write_bytes(bad)
    lib.chmod(0o775)
    manifest.write_text(manifest_of(bad, name))
  elif state == "manifest group-writable":
    lib.write_bytes(bad)
    manifest.write_text(manifest_of(bad, name))
    manifest.chmod(0o666)
  elif state == "truncated":
    lib.write_bytes(good[: len(good) // 2])
    manifest.write_text(manifest_of(good, name))
  elif state == "no manifest":
    lib.write_bytes(bad)
  elif state == "wrong manifest":
    lib.write_bytes(bad)
    manifest.write_text(manifest_of(good, name))
  else:
    raise ValueError(state)


@pytest.mark.parametrize("state", ["no manifest", "wrong manifest", "truncated", "symlink",
                                   "group-writable", "manifest group-writable"])
def test_an_unverified_library_is_rebuilt_never_loaded(state, built, cache, tmp_path):
  cxx, log = fake_compiler(tmp_path, built)
  good = open(built, "rb").read()
  name = onednn._name(cxx, onednn._prefix())
  cache.mkdir(parents=True, mode=0o700)
  plant(cache, name, state, good, tmp_path)
  assert library_in_cache(cxx) == good and calls(log) == 1
  lib = os.lstat(cache / name)
  assert stat.S_ISREG(lib.st_mode) and not lib.st_mode & 0o022, "atomically replaced"
  assert (cache / name).read_bytes() == good
  assert (cache / (name + ".sha256")).read_text() == manifest_of(good, name)


def test_a_shared_cache_folder_is_not_loaded_from(built, cache, tmp_path, capsys):
  """A group-writable folder: a library there with a matching manifest is not loaded; the
  process builds in a private temporary folder, says so in one line, and deletes it after."""
  cxx, log = fake_compiler(tmp_path, built)
  name = onednn._name(cxx, onednn._prefix())
  cache.mkdir(parents=True)
  cache.chmod(0o775)
  bad = b"\x7fELF not the library this user built"
  (cache / name).write_bytes(bad)
  (cache / (name + ".sha256")).write_text(manifest_of(bad, name))
  lib = onednn._dlopen(cxx, onednn._prefix())  # the planted file would raise OSError
  assert hasattr(lib, "AllconvConvForwardF32") and calls(log) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(
      f"warning: not loading the oneDNN library from {cache}: it is writable by group or "
      "others (mode 775); building it in "), err
  assert sorted(os.listdir(cache)) == sorted([name, name + ".sha256"]), "nothing written there"
  assert not os.listdir(tmp_path / "tmp"), "the private folder is deleted after loading"


def test_a_foreign_cache_folder_is_not_used(cache, monkeypatch):
  cache.mkdir(parents=True)
  uid = os.geteuid()
  monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # as if another user owned the folder
  folder, temp, warning = onednn._open_folder()
  os.close(folder)
  assert temp != str(cache) and stat.S_IMODE(os.stat(temp).st_mode) == 0o700
  assert warning.startswith(f"warning: not loading the oneDNN library from {cache}: it is "
                            f"owned by uid {uid}, not by this user (uid {uid + 1})")
  assert not os.listdir(temp) and not os.listdir(cache)


def test_a_library_without_the_convolutions_is_one_line_not_a_traceback(cache, tmp_path):
  """The limit of the trust model: a library the user's own account put in the cache with a
  matching manifest is loaded. If it lacks the convolutions, that is an OSError (one line, and
  `auto` falls back to XLA), not an AttributeError traceback."""
  helpers.require_onednn()
  (tmp_path / "stub.c").write_text("int allconv_stub = 1;\n")
  stub = str(tmp_path / "stub.so")
  subprocess.run([onednn._compiler(), "-shared", "-fPIC", "-x", "c++", str(tmp_path / "stub.c"),
                  "-o", stub], check=True)
  cxx, log = fake_compiler(tmp_path, stub)  # "builds" the stub, manifest and all
  code = ("from allconv_jax import cpu\n"  # a process of its own: dlopen reuses a loaded path
          "print(cpu.choose('auto', 'auto', 'float32'))\n")
  r = helpers.run([sys.executable, "-c", code], timeout=120,
                  env={"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CXX": cxx})
  assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
  assert "backend='xla'" in r.stdout and "has no AllconvConv" in r.stdout, r.stdout
  assert "so it is not this installation's build" in r.stdout and calls(log) == 1


def test_a_truncated_library_is_rebuilt_by_the_next_process(built, cache, tmp_path):
  """A library cut short in the cache crashed every later run with a bus error; now the next
  process rebuilds it and runs a convolution."""
  cxx, log = fake_compiler(tmp_path, built)
  name = onednn._name(cxx, onednn._prefix())
  library_in_cache(cxx)
  good = (cache / name).read_bytes()
  with open(cache / name, "r+b") as f:
    f.truncate(len(good) // 3)
  code = ("import jax, jax.numpy as jnp, numpy as np\n"
          "from allconv_jax.cpu import onednn\n"
          "onednn.load()\n"
          "x, w, b = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)), jnp.arange(4.0)\n"
          "pads = ((1, 1), (1, 1))\n"
          "want = jax.lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=('NHWC', "
          "'HWIO', 'NHWC')) + b\n"
          "np.testing.assert_allclose(onednn.conv(x, w, b, (1, 1), pads), want, rtol=1e-6)\n"
          "print('ok')\n")
  r = helpers.run([sys.executable, "-c", code], timeout=120,
                  env={"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CXX": cxx})
  assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
  assert calls(log) == 2 and (cache / name).read_bytes() == good


def test_the_next_build_deletes_an_interrupted_builds_temporaries(built, cache, tmp_path):
  """Ctrl-C during the build (main.py's handler exits with os._exit: no `finally` runs) leaves
  its build folder; the next build deletes it, and temporaries of writers killed mid-write,
  under the lock."""
  hanging, log = fake_compiler(tmp_path, built, hang=True)
  code = ("import signal\n"
          "from allconv_jax.errors import exit_now\n"
          "signal.signal(signal.SIGINT, exit_now)\n"
          "from allconv_jax.cpu import onednn\n"
          "onednn.load()\n")
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "CXX": hanging}
  p = subprocess.Popen([sys.executable, "-c", code], cwd=helpers.ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       start_new_session=True)  # its own process group, as a terminal's job
  try:
    deadline = time.monotonic() + 60
    while calls(log) == 0 and p.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    assert calls(log) == 1, "the build did not start"
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the process and its compiler
    _, err = p.communicate(timeout=60)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  assert p.returncode == 130 and err.startswith("interrupted:"), (p.returncode, err)
  left = f"{onednn._name(hanging, onednn._prefix())}.{p.pid}.build.tmp"
  assert sorted(os.listdir(cache)) == ["build.lock", left], "the killed build's folder stays"
  cxx, log = fake_compiler(tmp_path, built)
  name = onednn._name(cxx, onednn._prefix())
  for entry in (f"{name}.999999.tmp", f"{name}.sha256.999999.tmp"):  # a kill while writing
    (cache / entry).write_bytes(b"")
  assert library_in_cache(cxx) == open(built, "rb").read()
  assert sorted(os.listdir(cache)) == sorted([name, name + ".sha256", "build.lock"])


@pytest.mark.parametrize("compiler", ["false", "/no/such/compiler"])
def test_a_failed_build_leaves_no_library(compiler, cache, tmp_path):
  folder, path, _ = onednn._open_folder()
  try:
    expected = "exited with status 1$" if compiler == "false" else "No such file"
    with pytest.raises(OSError, match=expected):
      onednn._library(folder, path, compiler, onednn._prefix() or str(tmp_path))
  finally:
    os.close(folder)
  assert os.listdir(cache) == ["build.lock"], "no library, no temporary, no build folder"


def test_a_failed_build_says_why_in_one_short_line(tmp_path):
  """A compiler that fails with pages of errors: the reason (which `auto` logs and records)
  is one line with the exit status and the compiler's last line, not the command or the pages."""
  script = tmp_path / "failing-cxx"
  script.write_text("#!/bin/sh\nfor i in $(seq 50); do echo \"In file $i: noise\" >&2; done\n"
                    "echo 'ld: cannot find -ldnnl' >&2\nexit 1\n")
  script.chmod(0o755)
  with pytest.raises(OSError) as e:
    onednn._compile(str(script), str(tmp_path), str(tmp_path / "out.so"))
  assert str(e.value) == "failing-cxx exited with status 1: ld: cannot find -ldnnl"
