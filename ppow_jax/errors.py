"""User-facing errors: bad files, keys or values. CLIs print them in one line and exit non-zero."""


class UserError(ValueError):
  """Bad user input (a file, a config key, a value). The message names the culprit."""
