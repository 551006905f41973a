"""The fork server (tests/launcher.py) behaves like a fresh interpreter for the tests' commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests import launcher


@pytest.fixture(autouse=True)
def fork_server_on(monkeypatch):
  """These tests check the fork server itself, also where ALLCONV_TEST_FORK_SERVER=0."""
  monkeypatch.setenv("ALLCONV_TEST_FORK_SERVER", "1")


CASES = {
    "exit code": "import sys; print('out'); sys.exit(3)",
    "exit message": "import sys; sys.exit('error: bad')",
    "exception": "raise ValueError('nope')",
    "interrupt": "raise KeyboardInterrupt",
    "argv, cwd, env": ("import os, sys; print(sys.argv[1:], os.path.basename(os.getcwd()), "
                       "os.environ['ALLCONV_X'], os.environ.get('PYTHONUNBUFFERED'))"),
    "XLA_FLAGS apply": ("import jax; print(jax.device_count(), jax.default_backend()); "
                        "import atexit; atexit.register(print, 'atexit ran')"),
    "no tensorflow": ("import sys; "
                      "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"),
}


def fresh_and_forked(code: str, tmp_path) -> tuple[subprocess.CompletedProcess, ...]:
  env = {**os.environ, "ALLCONV_X": "x", "XLA_FLAGS": "--xla_force_host_platform_device_count=3",
         "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-c", code, "a", "--b=1"]
  fresh = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  forked = launcher.run(args, cwd=str(tmp_path), env=env, timeout=120)
  return fresh, forked


@pytest.mark.parametrize("name", CASES)
def test_a_forked_child_exits_and_prints_like_a_fresh_interpreter(name, tmp_path):
  fresh, forked = fresh_and_forked(CASES[name], tmp_path)
  assert forked.returncode == fresh.returncode, (fresh, forked)
  assert forked.stdout == fresh.stdout, (fresh, forked)
  strip = [line for line in fresh.stderr.splitlines() if not line.startswith("  ")]
  assert [line for line in forked.stderr.splitlines() if not line.startswith("  ")] == strip
  expected = {"exit code": 3, "exit message": 1, "exception": 1, "interrupt": -signal.SIGINT}
  assert fresh.returncode == expected.get(name, 0)
  if name == "XLA_FLAGS apply":
    assert forked.stdout == "3 cpu\natexit ran\n"


def test_signals_reach_a_forked_child_and_its_output_streams_live(tmp_path):
  code = "import time; print('started', flush=True); time.sleep(60)"
  proc = launcher.popen([sys.executable, "-c", code], cwd=str(tmp_path), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
  assert isinstance(proc, launcher.Child) and proc.pid != os.getpid()
  assert proc.stdout.readline() == "started\n"
  assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == -signal.SIGTERM
  with pytest.raises(subprocess.TimeoutExpired):
    launcher.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)


def test_a_childs_own_python_commands_fork_from_the_same_server(tmp_path):
  code = ("import os, subprocess, sys\n"
          "r = subprocess.run([sys.executable, '-c', 'import os; print(os.getppid())'],"
          " capture_output=True, text=True)\n"
          "e = subprocess.run(['echo', 'not python'], capture_output=True, text=True)\n"
          "print(r.returncode, int(r.stdout) != os.getpid(), e.stdout == 'not python\\n')")
  forked = launcher.run([sys.executable, "-c", code], cwd=str(tmp_path), timeout=120)
  assert forked.stdout == "0 True True\n", forked  # a sibling, not its own child; echo as before
  fresh = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
  assert fresh.stdout == "0 False True\n", fresh


def test_the_server_removes_its_socket_and_folder_when_the_test_process_goes():
  server = launcher._Server()
  folder = os.path.dirname(server.path)
  assert os.path.exists(server.path)
  server.proc.stdin.close()  # as when a pytest worker ends with os._exit
  assert server.proc.wait(timeout=60) == 0
  assert not os.path.exists(folder)
  server.close()  # the atexit path, after the server is gone, is harmless
