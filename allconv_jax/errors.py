"""How the tools fail: the one exception type for mistakes a user can fix (config, data,
checkpoints), and the exit on a stop signal outside the training loop. Standard library only,
so main.py can install that exit before its heavy imports."""

import os


class UserError(Exception):
  """A problem the user can fix; `main.py` prints its message as one line and exits non-zero."""


def one_line(e: BaseException, limit: int = 200) -> str:
  """An exception's message on one line, at most `limit` characters."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def exit_now(signum: int, _: object) -> None:
  """SIGINT/SIGTERM outside the training loop: nothing to save; exit 130 at once (an exception
  raised inside a C++ import or compilation could crash the interpreter instead)."""
  os.write(2, b"interrupted: stopped outside the training loop (any checkpoint is kept); run "
           b"the same command again, without --config.restart=True, to resume\n")
  os._exit(130)
