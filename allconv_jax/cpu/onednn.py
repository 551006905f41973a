"""oneDNN convolutions on the CPU, called from the jitted step through the XLA FFI.

XLA:CPU (jaxlib 0.10.2) runs a convolution's weight gradient in Eigen, which needs the
activations transposed from (N, H, W, C) to (C, H, W, N) and the output gradient to
(H, W, N, D) first: memory-bound copies of up to 50 MB per layer at batch 128, 19 % of the
All-CNN-C step. oneDNN (what PyTorch runs on the CPU) reads NHWC as it is, for the forward pass,
the input gradient and the weight gradient alike, and in bfloat16 it uses the AMX tiles of the
CPUs that have them (XLA:CPU converts bfloat16 to float32). `csrc/onednn_conv.cc`
wraps its three primitives, in float32 and bfloat16, as FFI handlers: the forward pass adds the
bias, the weight gradient also returns the bias's (in float32; XLA:CPU reduces a bfloat16
gradient through slow reduce-window trees). `conv` is the operation with its `jax.custom_vjp`;
`Conv` is the Flax layer, with `flax.linen.Conv`'s parameters, that `cpu.conv_layer` gives the
layers with a spatial kernel (XLA makes 1x1 layers matrix products).

The library is compiled on first use (about 8 s) with the system's C++ compiler against the
oneDNN of the pip packages `onednn-cpu-gomp` and `onednn-devel-cpu-gomp` (x86-64 Linux; in
requirements.txt), into `$XDG_CACHE_HOME/allconv-jax/onednn/` (`~/.cache/...`), one file per
source, jaxlib, compiler and oneDNN version. `missing()` says why it cannot be built here,
without building; `load()` builds (first use), loads and registers it; `unsupported(dtype)`
tries a dtype on this CPU.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "onednn_conv.cc")
ROLES = {"f": "Forward", "d": "InputGrad", "w": "WeightGrad"}
DTYPES = {"float32": "F32", "bfloat16": "BF16"}
INSTALL = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"
Pads = tuple[tuple[int, int], tuple[int, int]]


def _prefix() -> str | None:
  """The installation prefix holding oneDNN's header and library (pip's data files)."""
  for prefix in (sys.prefix, site.getuserbase()):
    if (os.path.exists(os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp"))
        and os.path.exists(os.path.join(prefix, "lib", "libdnnl.so"))):
      return prefix
  return None


def _cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "allconv-jax", "onednn")


def _build(compiler: str, prefix: str) -> str:
  """The compiled library's path, built now (under a file lock) if this cache lacks it."""
  with open(SOURCE, "rb") as f:
    key = hashlib.sha256(f.read())
  library = os.path.realpath(os.path.join(prefix, "lib", "libdnnl.so"))  # names its version
  key.update(f"{jaxlib.__version__} {compiler} {library}".encode())
  folder = _cache_dir()
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"onednn_conv-{key.hexdigest()[:16]}.so")
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others then find it done
    if not os.path.exists(path):
      fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
      os.close(fd)
      lib = os.path.join(prefix, "lib")
      cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", SOURCE, "-o", tmp,
             f"-I{jax.ffi.include_dir()}", f"-I{os.path.join(prefix, 'include')}", f"-L{lib}",
             "-ldnnl", f"-Wl,-rpath,{lib}"]
      try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
          raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, path)  # whole or absent: never a half-written library
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
  return path


def missing() -> str | None:
  """Why the oneDNN convolutions cannot be built here (platform, package, compiler), or None.
  A cheap check: it builds and loads nothing."""
  if not sys.platform.startswith("linux"):
    return "oneDNN convolutions are built for Linux only"
  if _prefix() is None:
    return f"oneDNN is not installed ({INSTALL})"
  if _compiler() is None:
    return "no C++ compiler (g++ or $CXX) to build the oneDNN convolutions"
  return None


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def load() -> None:
  """Builds the library if this machine's cache lacks it, loads it and registers its FFI
  targets (once per process); OSError saying why it cannot."""
  reason = missing()
  if reason is not None:
    raise OSError(reason)
  # libgomp reads this once, when oneDNN loads it: its idle threads sleep instead of spinning,
  # leaving the cores to XLA's threads between convolutions (and to other processes).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  lib = ctypes.CDLL(_build(_compiler(), _prefix()))
  for role, op in ROLES.items():
    for dtype, suffix in DTYPES.items():
      jax.ffi.register_ffi_target(_target(role, dtype),
                                  jax.ffi.pycapsule(getattr(lib, f"AllconvConv{op}{suffix}")),
                                  platform="cpu")


@functools.cache
def unsupported(dtype: str) -> str | None:
  """None if this CPU runs the loaded oneDNN convolutions in `dtype` ('float32' or
  'bfloat16'); else why not. bfloat16 is tried once on a tiny convolution and its gradients
  (oneDNN refuses it on CPUs without AVX-512)."""
  if dtype not in DTYPES:
    return f"oneDNN convolutions take {' or '.join(DTYPES)}, not {dtype}"
  if dtype == "float32":  # every x86-64 CPU oneDNN supports
    return None
  x, w, b = jnp.ones((1, 4, 4, 2), dtype), jnp.ones((3, 3, 2, 2), dtype), jnp.ones(2)
  try:
    jax.block_until_ready(jax.jit(jax.value_and_grad(
        lambda x, w, b: jnp.sum(conv(x, w, b, (1, 1), ((1, 1), (1, 1))).astype(jnp.float32)),
        (0, 1, 2)))(x, w, b))
  except Exception as e:  # noqa: BLE001 - oneDNN's refusal arrives as an XLA runtime error
    return f"oneDNN cannot run {dtype} convolutions on this CPU ({str(e).splitlines()[0]})"
  return None


def _target(role: str, dtype: str) -> str:
  return f"allconv_onednn_conv_{role}_{dtype}"


def _call(role: str, shapes: Sequence[jax.ShapeDtypeStruct], a: jax.Array, *rest: jax.Array,
          strides: tuple[int, int], pads: Pads) -> Any:
  """One FFI call: 'f' (x, w, bias) -> y, 'd' (dy, w) -> dx, 'w' (x, dy) -> (dw, dbias)."""
  load()  # built and registered on first use
  attrs = dict(zip(("sh", "sw", "pt", "pb", "pl", "pr"),
                   tuple(np.int64(v) for v in (*strides, *pads[0], *pads[1])), strict=True))
  out = jax.ffi.ffi_call(_target(role, jnp.dtype(a.dtype).name), tuple(shapes),
                         vmap_method="sequential")(a, *rest, **attrs)
  return out if len(shapes) > 1 else out[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv(x: jax.Array, w: jax.Array, bias: jax.Array, strides: tuple[int, int],
         pads: Pads) -> jax.Array:
  """conv(x, w) + bias: x NHWC and w HWIO both float32 or both bfloat16, bias float32, explicit
  pads; the result in x's dtype. Forward pass and gradients in oneDNN (the bias's float32)."""
  shape = lax.conv_general_shape_tuple(x.shape, w.shape, strides, pads, ("NHWC", "HWIO", "NHWC"))
  y = jax.ShapeDtypeStruct(tuple(int(d) for d in shape), x.dtype)
  return _call("f", [y], x, w, bias, strides=strides, pads=pads)


def _conv_fwd(x: jax.Array, w: jax.Array, bias: jax.Array, strides: tuple[int, int],
              pads: Pads) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return conv(x, w, bias, strides, pads), (x, w)


def _conv_bwd(strides: tuple[int, int], pads: Pads, res: tuple[jax.Array, jax.Array],
              g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  x, w = res
  dx = _call("d", [jax.ShapeDtypeStruct(x.shape, x.dtype)], g, w, strides=strides, pads=pads)
  dw, dbias = _call("w", [jax.ShapeDtypeStruct(w.shape, w.dtype),
                          jax.ShapeDtypeStruct(w.shape[3:], jnp.float32)], x, g,
                    strides=strides, pads=pads)
  return dx, dw, dbias


conv.defvjp(_conv_fwd, _conv_bwd)


class Conv(nn.Module):
  """`flax.linen.Conv` for NHWC 2-d convolutions with the same parameters (float32 'kernel' HWIO
  and 'bias'), computed in oneDNN with the bias added there; compute in `dtype`."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str | Pads = "SAME"
  use_bias: bool = True
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias
            else jnp.zeros((self.features,), jnp.float32))
    strides = (self.strides, self.strides)
    pads = (lax.padtype_to_pads(x.shape[1:3], self.kernel_size, strides, self.padding)
            if isinstance(self.padding, str) else self.padding)
    return conv(x.astype(self.dtype), kernel.astype(self.dtype), bias, strides,
                tuple((int(lo), int(hi)) for lo, hi in pads))
