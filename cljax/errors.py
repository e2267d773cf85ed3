"""The one exception type cljax raises for bad input, and the checks its validators share."""

from typing import Any

import jax
import numpy as np


class CljaxError(ValueError):
  """Bad input or configuration: the message names the problem and the fix."""


def is_int(v: object) -> bool:
  """A Python or numpy integer, not a bool (for static sizes and counts)."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def concrete_value(x: Any) -> np.ndarray | None:
  """X as a numpy array, or None when it is traced (under jit or vmap) and cannot be checked."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
