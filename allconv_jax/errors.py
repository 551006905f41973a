"""The one exception type for mistakes a user can fix (config, data, checkpoints)."""


class UserError(Exception):
  """A problem the user can fix; `main.py` prints its message as one line and exits non-zero."""
