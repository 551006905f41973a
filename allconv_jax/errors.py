"""The one exception type for mistakes a user can fix (config, data, checkpoints)."""


class UserError(Exception):
  """A problem the user can fix; `main.py` prints its message as one line and exits non-zero."""


def one_line(e: BaseException, limit: int = 200) -> str:
  """An exception's message on one line, at most `limit` characters."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."
