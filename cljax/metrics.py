"""Continual-learning metrics from a (T, T) accuracy matrix: GEM's printed stats and the papers'."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax.errors import CljaxError


class GemStats(NamedTuple):
  """GEM code's three numbers (a tuple: `final, backward, forward = gem_stats(R, b)`)."""

  final: jax.Array  # () mean final accuracy
  backward: jax.Array  # () GEM code's backward transfer (averaged over all T tasks)
  forward: jax.Array  # () GEM code's forward transfer (averaged over all T tasks)


class PaperStats(NamedTuple):
  """Metrics as defined in the papers (averages over the T-1 tasks where they are defined)."""

  acc: jax.Array  # () ACC, mean final accuracy
  bwt: jax.Array  # () BWT, Lopez-Paz & Ranzato (2017)
  fwt: jax.Array  # () FWT, Lopez-Paz & Ranzato (2017)
  forgetting: jax.Array  # () average forgetting, Chaudhry et al. (2018)


def _check(R: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Validates static shapes and returns float (R, b); jit-safe (reads shapes only)."""
  r_shape, b_shape = tuple(jnp.shape(R)), tuple(jnp.shape(b))
  if len(r_shape) != 2 or r_shape[0] != r_shape[1] or r_shape[0] < 1 or b_shape != r_shape[:1]:
    raise CljaxError(
      f"metrics need a square (T, T) accuracy matrix R and a (T,) vector b of accuracies before "
      f"training, T >= 1; got R.shape={r_shape} and b.shape={b_shape}. Pass R[i, j] = accuracy on "
      "task j after training task i, and b[j] = accuracy on task j at initialisation."
    )
  R, b = jnp.asarray(R), jnp.asarray(b)
  dtype = jnp.promote_types(jnp.result_type(R, b), jnp.float32)
  return R.astype(dtype), b.astype(dtype)


def gem_stats(R: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> GemStats:
  """The three numbers the GEM code prints (`metrics.py: confusion_matrix`), bit for bit in math.

  With T tasks, R[i, j] = accuracy on task j after training task i, b[j] = accuracy on task j
  before any training:

      final    = 1/T Σ_{j<T} R[T-1, j]
      backward = 1/T Σ_{j<T} (R[T-1, j] - R[j, j])        (the j = T-1 term is 0, still counted)
      forward  = 1/T Σ_{j<T} (R[j-1, j] - b[j])           (the j = 0 term is defined as 0)

  So backward = (T-1)/T * BWT and forward = (T-1)/T * FWT of `paper_stats`. jit-safe.

  Args:
    R: (T, T) accuracy matrix, numpy or jax.
    b: (T,) accuracies before training.

  Returns:
    GemStats(final, backward, forward) of 0-d jax arrays (float32, or float64 if x64 inputs).

  Raises:
    CljaxError: R not square or b not of length T.
  """
  R, b = _check(R, b)
  fwt = jnp.concatenate([jnp.zeros((1,), R.dtype), jnp.diagonal(R, 1) - b[1:]])
  return GemStats(
    final=jnp.mean(R[-1]),
    backward=jnp.mean(R[-1] - jnp.diagonal(R)),
    forward=jnp.mean(fwt),
  )


def paper_stats(R: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> PaperStats:
  """ACC, BWT, FWT (Lopez-Paz & Ranzato, 2017) and average forgetting (Chaudhry et al., 2018).

  With T tasks, R[i, j] = accuracy on task j after training task i, b[j] before any training:

      ACC = 1/T     Σ_{j<T}      R[T-1, j]
      BWT = 1/(T-1) Σ_{j<T-1}   (R[T-1, j] - R[j, j])
      FWT = 1/(T-1) Σ_{1<=j<T}  (R[j-1, j] - b[j])
      F   = 1/(T-1) Σ_{j<T-1}    f_j,   f_j = max_{j<=l<=T-2} R[l, j] - R[T-1, j]

  For T = 1 there is nothing to average over, and BWT = FWT = F = 0 by definition. jit-safe.

  Args:
    R: (T, T) accuracy matrix, numpy or jax.
    b: (T,) accuracies before training.

  Returns:
    PaperStats(acc, bwt, fwt, forgetting) of 0-d jax arrays.

  Raises:
    CljaxError: R not square or b not of length T.
  """
  R, b = _check(R, b)
  T = R.shape[0]
  acc = jnp.mean(R[-1])
  if T == 1:
    zero = jnp.zeros((), R.dtype)
    return PaperStats(acc=acc, bwt=zero, fwt=zero, forgetting=zero)
  bwt = jnp.mean(R[-1, :-1] - jnp.diagonal(R)[:-1])
  fwt = jnp.mean(jnp.diagonal(R, 1) - b[1:])
  # Best accuracy on task j at rows l in [j, T-2]: rows l < j (before task j was trained) masked.
  rows = jnp.arange(T - 1)[:, None]
  cols = jnp.arange(T - 1)[None, :]
  past = jnp.where(rows >= cols, R[:-1, :-1], -jnp.inf)  # (T-1, T-1)
  forgetting = jnp.mean(jnp.max(past, axis=0) - R[-1, :-1])
  return PaperStats(acc=acc, bwt=bwt, fwt=fwt, forgetting=forgetting)


def format_seed_line(R: jax.Array | np.ndarray, b: jax.Array | np.ndarray) -> str:
  """GEM's result line as in the seed: R row-major, then the three `gem_stats`, on one line.

  Format: the T*T values of R row-major as '%.4f' joined by single spaces, then
  ' Final Accuracy: %.4f Backward: %.4f Forward: %.4f'. (GEM's `confusion_matrix` writes the same
  numbers to a file over several lines, with b first; the seed prints this single line, which is
  easier to grep and diff.) b is not printed; it only enters Forward. Host-side: call it on
  concrete arrays, outside jit.

  Args:
    R: (T, T) accuracy matrix.
    b: (T,) accuracies before training.

  Returns:
    The line, without a trailing newline.

  Raises:
    CljaxError: R not square or b not of length T.
  """
  final, backward, forward = (float(s) for s in gem_stats(R, b))
  values = " ".join(f"{v:.4f}" for v in np.asarray(R, dtype=np.float64).ravel())
  return f"{values} Final Accuracy: {final:.4f} Backward: {backward:.4f} Forward: {forward:.4f}"
