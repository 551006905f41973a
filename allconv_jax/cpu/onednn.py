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

The cache is trusted only as far as it is the user's alone (docs/robustness.md): the folder
must be owned by this user and not writable by group or others (else this process builds into
a fresh private temporary folder, with one warning line); the library must be a regular file,
owned by the user, not group/other-writable, whose sha256 equals its `.sha256` manifest written
after the build. Anything else (missing, foreign, truncated, mismatching) is rebuilt and
atomically replaced, never loaded; the bytes hashed are the bytes loaded (one open file).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
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
STEM = "onednn_conv-"  # every library, manifest and temporary of the cache
MANIFEST = ".sha256"  # "<sha256>  <library name>": sha256sum -c reads it too
LOCK = "build.lock"
Pads = tuple[tuple[int, int], tuple[int, int]]


def _prefix() -> str | None:
  """The installation prefix holding oneDNN's header and library (pip's data files)."""
  for prefix in (sys.prefix, site.getuserbase()):
    if (os.path.exists(os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp"))
        and os.path.exists(os.path.join(prefix, "lib", "libdnnl.so"))):
      return prefix
  return None


def _cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(base):  # the XDG rule: a relative path is ignored
    base = os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "allconv-jax", "onednn")


def _name(compiler: str, prefix: str) -> str:
  """The library's file name: a key of the source, jaxlib, the compiler and oneDNN's version."""
  with open(SOURCE, "rb") as f:
    key = hashlib.sha256(f.read())
  library = os.path.realpath(os.path.join(prefix, "lib", "libdnnl.so"))  # names its version
  key.update(f"{jaxlib.__version__} {compiler} {library}".encode())
  return f"{STEM}{key.hexdigest()[:16]}.so"


def _distrust(st: os.stat_result, what: str) -> str | None:
  """Why a file or folder is not this user's alone (foreign, group/other-writable), or None."""
  if st.st_uid != os.geteuid():
    return f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
  if st.st_mode & 0o022:
    return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
  return None


def _open_folder() -> tuple[int, str, str | None]:
  """(fd, path, warning) of the folder to build and load in: the cache folder, created 0o700,
  where it is this user's alone (warning None); else a fresh private temporary folder for this
  process, to delete after loading, and the warning line saying why."""
  folder = _cache_dir()
  try:
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  except OSError as e:
    why = f"it cannot be opened ({e.strerror or e})"
  else:
    why = _distrust(os.fstat(fd), "it")
    if why is None:
      return fd, folder, None
    os.close(fd)
  temp = tempfile.mkdtemp(prefix="allconv-jax-onednn-")  # 0o700, a fresh name
  warning = (f"warning: not loading the oneDNN library from {folder}: {why}; building it in "
             f"{temp} for this process instead (make the folder yours alone to cache it)")
  return os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), temp, warning


@contextlib.contextmanager
def _locked(folder: int) -> Iterator[None]:
  """The folder's build lock: one process checks, builds or replaces its files at a time."""
  fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
               dir_fd=folder)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _remove_stale(folder: int) -> None:
  """Deletes the temporaries (files and build folders) of earlier writers. Called under the
  lock, so none is writing: a temporary there was left by a process that died (a signal's exit
  skips `finally`)."""
  for entry in os.listdir(folder):
    if entry.startswith(STEM) and entry.endswith(".tmp"):
      _remove(folder, entry)


def _remove(folder: int, entry: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    if stat.S_ISDIR(os.stat(entry, dir_fd=folder, follow_symlinks=False).st_mode):
      shutil.rmtree(entry, dir_fd=folder)
    else:
      os.unlink(entry, dir_fd=folder)


def _open_trusted(folder: int, name: str) -> int | None:
  """A read-only fd of `name`, if it is a regular file (not a symlink) of this user's alone."""
  try:  # O_NONBLOCK: a FIFO planted under the name must not hang the open
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 dir_fd=folder)
  except OSError:
    return None
  st = os.fstat(fd)
  if not stat.S_ISREG(st.st_mode) or _distrust(st, name) is not None:
    os.close(fd)
    return None
  return fd


def _sha256(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  with os.fdopen(fd, "rb", closefd=False) as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _verified(folder: int, name: str) -> int | None:
  """A read-only fd of library `name` if it is trusted and its sha256 is the one its manifest
  `name.sha256` records; None if anything is missing, foreign or different."""
  manifest = _open_trusted(folder, name + MANIFEST)
  if manifest is None:
    return None
  try:
    want = os.read(manifest, 4096).decode("ascii", "replace").split()[:1]
  finally:
    os.close(manifest)
  fd = _open_trusted(folder, name)
  if fd is None:
    return None
  if want != [_sha256(fd)]:
    os.close(fd)
    return None
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _write(folder: int, name: str, data: bytes, mode: int) -> None:
  """Writes `name` atomically: a recognizable temporary (`name.PID.tmp`), synced, renamed."""
  tmp = f"{name}.{os.getpid()}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
               dir_fd=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp, dir_fd=folder)
    raise


def _compile(compiler: str, prefix: str, out: str) -> None:
  """Compiles the library to the path `out`; OSError with the compiler's exit status and the
  last line of its complaint (the whole of it can run to pages)."""
  lib = os.path.join(prefix, "lib")
  cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", SOURCE, "-o", out,
         f"-I{jax.ffi.include_dir()}", f"-I{os.path.join(prefix, 'include')}", f"-L{lib}",
         "-ldnnl", f"-Wl,-rpath,{lib}"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    last = (done.stderr.strip().splitlines() or [""])[-1].strip()[:200]
    raise OSError(f"{os.path.basename(compiler)} exited with status {done.returncode}"
                  + (f": {last}" if last else ""))


def _build(folder: int, path: str, name: str, compiler: str, prefix: str) -> bytes:
  """The library's bytes, compiled in a temporary build folder of the cache folder
  (`NAME.PID.build.tmp`, deleted after; an earlier writer's by the next build)."""
  build = f"{name}.{os.getpid()}.build.tmp"
  os.mkdir(build, 0o700, dir_fd=folder)
  try:
    _compile(compiler, prefix, os.path.join(path, build, "onednn_conv.so"))
    fd = os.open(os.path.join(build, "onednn_conv.so"),
                 os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    with os.fdopen(fd, "rb") as f:
      return f.read()
  finally:
    _remove(folder, build)


def _library(folder: int, path: str, compiler: str, prefix: str) -> int:
  """A read-only fd of the verified library in the folder (`folder` its fd, `path` its path),
  built there first (under the folder's lock) where it is missing or fails its checks. The
  library, then its manifest, are each replaced atomically: a kill leaves the old pair, a
  mismatch (rebuilt by the next process) or the new pair."""
  name = _name(compiler, prefix)
  with _locked(folder):
    _remove_stale(folder)
    fd = _verified(folder, name)
    if fd is None:
      data = _build(folder, path, name, compiler, prefix)
      _write(folder, name, data, 0o700)
      _write(folder, name + MANIFEST,
             f"{hashlib.sha256(data).hexdigest()}  {name}\n".encode(), 0o600)
      with contextlib.suppress(OSError):  # the renames' durability; not every file system
        os.fsync(folder)
      fd = _verified(folder, name)
      if fd is None:
        raise OSError(f"the oneDNN library built as {name} fails its own check")
  return fd


def _dlopen(compiler: str, prefix: str) -> ctypes.CDLL:
  """The verified library, loaded through the very file descriptor whose bytes were hashed."""
  folder, path, warning = _open_folder()
  if warning:
    print(warning, file=sys.stderr, flush=True)
  try:
    fd = _library(folder, path, compiler, prefix)
    try:
      return ctypes.CDLL(f"/proc/self/fd/{fd}")
    finally:
      os.close(fd)
  finally:
    os.close(folder)
    if warning:  # a private temporary folder: the loaded library stays mapped
      shutil.rmtree(path, ignore_errors=True)


def missing() -> str | None:
  """Why the oneDNN convolutions cannot be built here (platform, package, compiler), or None.
  A cheap check: it builds, loads and creates nothing."""
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
  """Builds the library if this machine's cache lacks a verified one, loads it and registers its
  FFI targets (once per process); OSError saying why it cannot."""
  reason = missing()
  if reason is not None:
    raise OSError(reason)
  # libgomp reads this once, when oneDNN loads it: its idle threads sleep instead of spinning,
  # leaving the cores to XLA's threads between convolutions (and to other processes).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  lib = _dlopen(_compiler(), _prefix())
  for role, op in ROLES.items():
    for dtype, suffix in DTYPES.items():
      symbol = f"AllconvConv{op}{suffix}"
      try:
        function = getattr(lib, symbol)
      except AttributeError:  # a library that is not this source's build
        raise OSError(f"the oneDNN library loaded from {_cache_dir()} has no {symbol}, so it "
                      "is not this installation's build: delete that folder") from None
      jax.ffi.register_ffi_target(_target(role, dtype), jax.ffi.pycapsule(function),
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
