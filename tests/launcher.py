"""Python child processes for the tests, started from a pre-imported interpreter.

A fresh `python main.py ...` spends about 1.5 s of CPU importing jax, flax, optax and orbax
before it runs a line of ours; the suite starts dozens. Here one "fork server" per test process
imports them once (without starting a jax backend, so XLA_FLAGS still apply per child), generates
the synthetic CIFAR-10 set once (a per-process cache, data/synthetic.py), and forks a child for
each command. A child is a real process: its own pid, cwd, environment, argv,
signals, stdin/stdout/stderr pipes and exit status, and it runs the script, `-m` module or `-c`
code as `__main__`, then exits the way CPython does (a SystemExit's code or message, a
traceback and 1 for an exception, death by SIGINT for an uncaught KeyboardInterrupt, atexit
handlers and non-daemon threads first). tests/test_launcher.py compares it with fresh
interpreters. A child's own Python commands (the sweep's and the study's main.py points) go to the
same server. Tests of what happens while an interpreter imports ask for `fresh=True`;
ALLCONV_TEST_FORK_SERVER=0 starts every command as a fresh interpreter.

`popen` and `run` take the subset of subprocess.Popen's and subprocess.run's arguments that the
tests use; commands that are not `[sys.executable, script | -m module | -c code, ...]` go to
subprocess unchanged.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported once by the server: what every test command imports first. Never a module that a
# test runs with -m and defines flags on import (allconv_jax.benchmark).
PRELOAD = ("jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "ml_collections",
           "absl.app", "absl.flags", "absl.logging", "numpy", "allconv_jax.launch",
           "tests.launcher")

SERVER_PATH = "ALLCONV_TEST_FORK_SERVER_PATH"  # the socket, for children's own commands
_POPEN = subprocess.Popen  # subprocess's own, also where route_python_commands replaced it

SERVER = r'''
import json, os, select, signal, socket, struct, sys
for name in sys.argv[2].split(","):
  __import__(name)
from jax._src import xla_bridge
assert not xla_bridge._backends, "a preloaded module started a jax backend"
from allconv_jax.data import synthetic
synthetic.make_synthetic("cifar10", "fine")  # the tiny runs' data, generated once for every child
from allconv_jax import onednn
onednn.unavailable()  # oneDNN loaded and its FFI targets registered once (no thread started yet)
assert not xla_bridge._backends, "loading oneDNN started a jax backend"

def serve(path):
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(16)
  wake_r, wake_w = os.pipe()
  os.set_blocking(wake_w, False)
  signal.set_wakeup_fd(wake_w)
  signal.signal(signal.SIGCHLD, lambda *_: None)
  print("ready", flush=True)
  children = {}
  while True:
    ready, _, _ = select.select([listener, wake_r, sys.stdin], [], [], 1.0)
    if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
      os.unlink(path)  # the test process is gone: leave no socket or folder behind
      os.rmdir(os.path.dirname(path))
      return
    if wake_r in ready:
      os.read(wake_r, 1024)
    if listener in ready:
      conn, _ = listener.accept()
      head, fds, _, _ = socket.recv_fds(conn, 4, 3)
      size, = struct.unpack("!I", head)
      data = b""
      while len(data) < size:
        data += conn.recv(size - len(data))
      pid = os.fork()
      if pid == 0:
        listener.close(); conn.close(); os.close(wake_r); os.close(wake_w)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.stdin.close()
        child(json.loads(data), fds)
      for fd in fds:
        os.close(fd)
      conn.sendall(b"PID %d\n" % pid)
      children[pid] = conn
    while children:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if pid == 0:
        break
      conn = children.pop(pid)
      try:
        conn.sendall(b"EXIT %d\n" % os.waitstatus_to_exitcode(status))
      except OSError:
        pass
      conn.close()

def child(request, fds):
  import atexit, io, runpy, threading, traceback, types
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
  for fd in set(fds):
    if fd > 2:
      os.close(fd)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  from tests import launcher
  launcher.route_python_commands()
  unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
  def stream(fd, **kw):
    return io.TextIOWrapper(open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False),
                            encoding="utf-8", write_through=unbuffered, **kw)
  sys.stdin = sys.__stdin__ = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")
  sys.stdout = sys.__stdout__ = stream(1)
  sys.stderr = sys.__stderr__ = stream(2, errors="backslashreplace", line_buffering=True)
  extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  code, interrupted = 0, False
  try:
    kind, target, args = request["kind"], request["target"], request["args"]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    if kind == "script":
      sys.argv = [target, *args]
      sys.path[:1] = [os.path.dirname(os.path.abspath(target)), *extra]
      runpy.run_path(target, run_name="__main__")
    elif kind == "module":
      sys.argv = [target, *args]
      sys.path[:1] = [os.getcwd(), *extra]
      sys.modules.pop(target, None)
      runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
      sys.argv = ["-c", *args]
      sys.path[:1] = ["", *extra]
      exec(compile(target, "<string>", "exec"), main.__dict__)
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      code = e.code or 0
    else:
      print(e.code, file=sys.stderr)
      code = 1
  except KeyboardInterrupt:
    traceback.print_exc()
    interrupted = True
  except BaseException:
    traceback.print_exc()
    code = 1
  try:
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    if interrupted:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)

serve(sys.argv[1])
'''


class _Server:
  """The fork server of this test process, started on first use."""

  def __init__(self) -> None:
    folder = tempfile.mkdtemp(prefix="allconv-fork-")
    if len(folder) > 90:  # a Unix socket's path holds at most 107 bytes
      folder = tempfile.mkdtemp(prefix="allconv-fork-", dir="/tmp")
    self.path = os.path.join(folder, "s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    self.proc = _POPEN([sys.executable, "-c", SERVER, self.path, ",".join(PRELOAD)], cwd=ROOT,
                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()
    if line.strip() != "ready":
      raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")
    atexit.register(self.close)

  def close(self) -> None:
    """Stops the server and removes its socket's folder."""
    self.proc.kill()
    self.proc.wait()
    shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


_server: list[str | None] = []  # this process's server's socket, once known


def _server_path() -> str | None:
  """The socket of this process's fork server (started now if need be); None if it cannot
  start here, and then commands run as fresh interpreters."""
  if not _server:
    inherited = os.environ.get(SERVER_PATH)
    if inherited and os.path.exists(inherited):
      _server.append(inherited)
    else:
      try:
        _server.append(_Server().path)
      except (OSError, RuntimeError) as e:
        print(f"tests/launcher.py: no fork server ({e}); fresh interpreters", file=sys.stderr)
        _server.append(None)
  return _server[0]


def route_python_commands() -> None:
  """In a forked child: subprocess.Popen sends Python commands (sweep.py's main.py points) to
  the same fork server, and everything else (git) to subprocess as before."""
  def routed(args: Any, *positional: Any, **kw: Any) -> Any:
    request = None if positional or isinstance(args, str) else _request(args)
    if request is None:
      return _POPEN(args, *positional, **kw)
    return popen(args, cwd=kw.get("cwd") or os.getcwd(), env=kw.get("env"),
                 stdout=kw.get("stdout"), stderr=kw.get("stderr"),
                 text=bool(kw.get("text") or kw.get("universal_newlines")))

  subprocess.Popen = routed


def _request(args: Sequence[str]) -> dict[str, Any] | None:
  """What to run for `args`, or None if it is not a plain Python command."""
  if len(args) < 2 or args[0] != sys.executable:
    return None
  if args[1] in ("-c", "-m"):
    if len(args) < 3:
      return None
    kind = "code" if args[1] == "-c" else "module"
    return {"kind": kind, "target": args[2], "args": list(args[3:])}
  if args[1].startswith("-"):
    return None
  return {"kind": "script", "target": args[1], "args": list(args[2:])}


class Child:
  """A forked command: the part of subprocess.Popen the tests use."""

  def __init__(self, path: str, args: Sequence[str], request: dict[str, Any], stdout: Any,
               stderr: Any, text: bool) -> None:
    self.args, self.returncode, self.stdout, self.stderr = list(args), None, None, None
    null = os.open(os.devnull, os.O_RDWR)
    out_w = err_w = None
    if stdout == subprocess.PIPE:
      r, out_w = os.pipe()
      self.stdout = open(r, "r" if text else "rb")
    if stderr == subprocess.PIPE:
      r, err_w = os.pipe()
      self.stderr = open(r, "r" if text else "rb")
    elif stderr == subprocess.STDOUT:
      err_w = out_w
    ends = [null, out_w if out_w is not None else 1, err_w if err_w is not None else 2]
    keep = [fd for fd in {null, out_w, err_w} if fd is not None]
    request["env"][SERVER_PATH] = path  # the child's own Python commands come here too
    data = json.dumps(request).encode()
    self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self.conn.connect(path)
    socket.send_fds(self.conn, [struct.pack("!I", len(data))], ends)
    self.conn.sendall(data)
    for fd in keep:
      os.close(fd)
    self._buffer, self._waiting = b"", False
    self.pid = int(self._line().split()[1])

  def _line(self, timeout: float | None = None) -> str:
    while b"\n" not in self._buffer:
      self.conn.settimeout(timeout)  # again after a signal handler's poll() changed it
      chunk = self.conn.recv(64)
      if not chunk:
        raise RuntimeError("the fork server went away")
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return line.decode()

  def wait(self, timeout: float | None = None) -> int:
    if self.returncode is None:
      self._waiting = True
      try:
        self.returncode = int(self._line(timeout).split()[1])
      except TimeoutError:
        raise subprocess.TimeoutExpired(self.args, timeout) from None
      finally:
        self._waiting = False
      self.conn.close()
    return self.returncode

  def poll(self) -> int | None:
    if self._waiting:  # called from a signal handler that interrupted wait()
      return None
    try:
      return self.wait(timeout=0.001)
    except subprocess.TimeoutExpired:
      return None

  def __enter__(self) -> Child:
    return self

  def __exit__(self, *_: Any) -> None:
    self._close_streams()
    self.wait()

  def _close_streams(self) -> None:
    for f in (self.stdout, self.stderr):
      if f is not None:
        f.close()

  def send_signal(self, sig: int) -> None:
    if self.returncode is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def communicate(self, input: None = None, timeout: float | None = None) -> tuple[Any, Any]:
    """Reads stdout and stderr to their ends, then waits for the exit status (no input)."""
    assert input is None, "a forked child's stdin is /dev/null"
    results: dict[str, Any] = {}
    readers = [threading.Thread(target=lambda n=n, f=f: results.__setitem__(n, f.read()),
                                daemon=True)
               for n, f in (("out", self.stdout), ("err", self.stderr)) if f is not None]
    for t in readers:
      t.start()
    for t in readers:
      t.join(timeout)
      if t.is_alive():
        raise subprocess.TimeoutExpired(self.args, timeout)
    self._close_streams()
    self.wait(timeout)
    return results.get("out"), results.get("err")


def enabled() -> bool:
  return os.environ.get("ALLCONV_TEST_FORK_SERVER", "1") != "0"


def popen(args: Sequence[str], *, cwd: str = ROOT, env: dict[str, str] | None = None,
          stdout: Any = None, stderr: Any = None, text: bool = True, fresh: bool = False) -> Any:
  """subprocess.Popen(args, cwd=, env=, stdout=, stderr=, text=) through the fork server;
  `fresh`: a new interpreter, for tests of what happens while it imports."""
  request = _request(args) if enabled() and not fresh else None
  path = _server_path() if request is not None else None
  if request is None or path is None:
    return _POPEN(args, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text)
  request.update(cwd=os.path.abspath(cwd), env=dict(os.environ if env is None else env))
  return Child(path, args, request, stdout, stderr, text)


def run(args: Sequence[str], *, cwd: str = ROOT, env: dict[str, str] | None = None,
        capture_output: bool = True, text: bool = True, timeout: float | None = None
        ) -> subprocess.CompletedProcess:
  """subprocess.run(args, cwd=, env=, capture_output=, text=, timeout=) through the server."""
  pipe = subprocess.PIPE if capture_output else None
  proc = popen(args, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  return subprocess.CompletedProcess(args, proc.returncode, out, err)
