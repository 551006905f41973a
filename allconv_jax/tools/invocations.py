"""The invocation log of a run made by a tool: one JSON line per main.py process in the run's
workdir (invocations.jsonl): its command, the code's git commit, the machine and the wall time."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence

from allconv_jax import cli

INVOCATIONS = "invocations.jsonl"


def git_commit() -> str | None:
  """The repository's HEAD commit, with '+changes' if the working tree differs; None outside git."""
  try:
    head = subprocess.run(["git", "-C", cli.REPO_ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "-C", cli.REPO_ROOT, "status", "--porcelain", "-uno"],
                           capture_output=True, text=True, check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+changes" if dirty else "")


def machine() -> str:
  """The CPU model, core count and memory of this machine: 'Intel Xeon ..., 2 cores, 24 GiB'."""
  model = platform.processor() or platform.machine()
  memory = ""
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
    with open("/proc/meminfo") as f:
      kib = int(f.readline().split()[1])
      memory = f", {kib / 2**20:.0f} GiB"
  return f"{model}, {os.cpu_count()} cores{memory}"


def log_invocation(workdir: str, command: Sequence[str], started: float, returncode: int) -> None:
  """Appends one main.py invocation (command, commit, machine, wall time) to invocations.jsonl."""
  record = {"command": " ".join(command), "git_commit": git_commit(), "machine": machine(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_sec": round(time.time() - started, 1), "returncode": returncode}
  with open(os.path.join(workdir, INVOCATIONS), "a") as f:
    f.write(json.dumps(record) + "\n")
