"""The one exception type cljax raises for bad input, so callers and the CLI report it cleanly."""


class CljaxError(ValueError):
  """Bad input or configuration: the message names the problem and the fix."""
