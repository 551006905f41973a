"""Command-line plumbing shared by main.py and the allconv_jax tools: every error is one line."""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from allconv_jax.config import did_you_mean, flatten, get_config, validate
from allconv_jax.errors import UserError

# The repository holding configs/ (an editable install or a checkout); config names resolve there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(message: str, code: int = 2) -> NoReturn:
  """Prints `error: message` on stderr and exits with `code`; the libraries' log lines about
  the same failure at the interpreter's exit (say, orbax's failed writes) are not printed."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  logging.set_verbosity(logging.FATAL)
  pylogging.getLogger("asyncio").disabled = True
  sys.exit(code)


def start(extra_args: Sequence[str]) -> None:
  """Every tool's start: stray positional arguments are an error; absl logs warnings only."""
  if extra_args:
    fail(f"unexpected arguments: {' '.join(extra_args)}")
  logging.set_verbosity(logging.WARNING)


def program_help(doc: str | None) -> None:
  """Makes `doc` the --help text of a program started without one: absl prints the docstring
  of __main__, and a console command's __main__ is a generated wrapper that has none."""
  main = sys.modules.get("__main__")
  if main is not None and not (getattr(main, "__doc__", None) or "").strip():
    main.__doc__ = doc


@contextlib.contextmanager
def interruptions(*kinds: type[BaseException]) -> Iterator[None]:
  """One of `kinds` (a stop signal that was handled: a checkpoint is saved) becomes the line
  `interrupted: ...` and exit status 130."""
  try:
    yield
  except kinds as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(130)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """A UserError, an OSError (disk full, a folder removed or unwritable) or running out of
  memory becomes one `error:` line and exit status 2."""
  try:
    yield
  except UserError as e:
    fail(str(e))
  except OSError as e:
    where = f" ({e.filename})" if e.filename else ""
    fail(f"{e.strerror or type(e).__name__}{where}; nothing was left half-written (files are "
         "replaced atomically); fix it and run the same command again")
  except Exception as e:
    if "RESOURCE_EXHAUSTED" not in str(e) and not isinstance(e, MemoryError):
      raise
    fail("out of memory (RESOURCE_EXHAUSTED): lower batch_size, eval_batch_size or "
         "model.width_multiplier; a run resumes from its last checkpoint")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line (for app.run's flags_parser)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith("Error whilst parsing config file:"):
      fail(f"{lines[0]} {lines[-1]}")  # the config file's own exception, not its traceback
    fail(lines[0] if lines else type(e).__name__)


def parse_config_flags(argv: list[str]) -> list[str]:
  """Like parse_flags, and a bad `--config.*` override (ml_collections raises plain errors)
  becomes one line naming the key."""
  try:
    return parse_flags(argv)
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001 - ml_collections raises plain errors for bad overrides
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(unknown_override(argv[1:])
         or f"could not load the config file: {lines[-1] if lines else type(e).__name__}")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(other arguments, --config.a.b=v overrides) of a command line."""
  rest, overrides = [], []
  for arg in argv:
    (overrides if arg.startswith("--config.") else rest).append(arg)
  return rest, overrides


def unknown_override(args: Sequence[str]) -> str | None:
  """The error line for the first --config.KEY override naming no key of the default config."""
  known = dict(flatten(get_config()))
  for arg in args:
    key = arg.split("=", 1)[0].removeprefix("--config.")
    if arg.startswith("--config.") and key not in known:
      return (f"unknown config key {key!r} in {arg}{did_you_mean(key, known)}; "
              "see docs/config.md")
  return None


def resolve_config(spec: str) -> str:
  """A config file as every tool takes it: FILE[:ARG], where FILE is a path (from the current
  folder), a path inside the repository ('configs/all_cnn_c.py') or a bare name ('all_cnn_c');
  the result names an existing file by its absolute path. UserError if there is none."""
  name, colon, arg = spec.partition(":")
  stem = name.removesuffix(".py")
  candidates = [name, os.path.join(REPO_ROOT, name)]
  if os.sep not in name:
    candidates.append(os.path.join(REPO_ROOT, "configs", f"{stem}.py"))
  for path in candidates:
    if path and os.path.isfile(path):
      return os.path.abspath(path) + colon + arg
  raise UserError(f"config file {name} not found (a path, or a name in "
                  f"{os.path.join(REPO_ROOT, 'configs')}, e.g. all_cnn_c)")


def resolve_config_flag(argv: list[str]) -> list[str]:
  """argv with the value of --config=FILE[:ARG] (or --config FILE) resolved by resolve_config;
  one that names no file is left as it is, for the flag's own error."""

  def resolved(spec: str) -> str:
    try:
      return resolve_config(spec)
    except UserError:
      return spec

  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + resolved(arg.removeprefix("--config="))
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolved(out[i + 1])
  return out


def config_from_file(config_file: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config `--config=FILE OVERRIDES...` gives main.py, validated; UserError if bad."""
  config_file = resolve_config(config_file)
  argv = ["allconv", f"--config={config_file}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  name = os.path.basename(config_file.partition(":")[0])
  try:
    values(argv)
    config = values.config
    config.get("model")
  except flags.Error as e:
    raise UserError(f"{name}: {str(e).splitlines()[0]}") from None
  except Exception as e:  # noqa: BLE001 - ml_collections raises plain errors for bad overrides
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise UserError(unknown_override(overrides) or f"could not load {config_file}: "
                    f"{lines[-1] if lines else type(e).__name__}") from None
  try:
    validate(config)
  except UserError as e:
    raise UserError(f"{name}: {e}") from None
  return config


def load_config(value: Any) -> Any:
  """The config of a `config_flags` flag; its deferred load errors become one line."""
  if value is None:
    fail("--config is required, e.g. --config=configs/all_cnn_c.py")
  try:
    value.get("model")
  except Exception as e:  # noqa: BLE001 - config_flags defers load errors until first access
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"could not load the config file: {lines[-1] if lines else type(e).__name__}")
  return value


@contextlib.contextmanager
def signal_handler(handler: Callable[[int, Any], None]) -> Iterator[None]:
  """Installs `handler` for SIGTERM and SIGINT, restoring the previous handlers afterwards."""
  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
  """Sets an event on SIGTERM/SIGINT (main thread only), so a loop can save and stop."""
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield event
    return

  def handler(signum: int, _: Any) -> None:
    if event.is_set():  # the second signal: exit now; the last complete checkpoint is kept
      os.write(2, b"interrupted again: exiting at once; the last complete checkpoint is kept\n")
      os._exit(130)
    event.set()  # no printing here: the handler may interrupt a print of the main thread

  with signal_handler(handler):
    yield event
