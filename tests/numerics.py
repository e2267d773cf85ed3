"""Float tolerances derived from the computation, for tests that compare two programs.

Two programs that compute the same math in floating point (jit and eager, vmap and a loop,
factored and explicit gradients, a sweep and a single run) agree only to rounding: XLA's CPU
kernels differ between CPUs (vector width, FMA contraction, blocking of reductions), so the
difference is bounded by the size of what was summed, not by the size of the result. A result
that is a difference of large terms (an off-diagonal Gram entry, a parameter near 0) has no
meaningful relative tolerance of its own.

Bound used (Higham & Mary 2019, "A new approach to probabilistic rounding error analysis"): a sum
of n terms computed in any order in precision u = eps / 2 has an error below lam * sqrt(n) * u *
sum|terms| except with probability ~ 2 exp(-lam^2 (1 - u)^2 / 2); lam = 6 makes that < 1e-7. Two
programs each make such an error, so their results differ by at most twice that.
"""

from __future__ import annotations

import math

import jax
import numpy as np

LAMBDA = 6.0  # the probabilistic bound's constant: failure probability < 1e-7 per entry


def unit_roundoff(dtype=np.float32) -> float:
  """u = eps / 2 of a float dtype (2^-24 for float32)."""
  return float(np.finfo(dtype).eps) / 2


def sum_atol(abs_sum, n_terms: int, dtype=np.float32) -> float:
  """The largest difference of two programs' sums of n_terms terms whose |terms| sum to abs_sum.

  2 * LAMBDA * sqrt(n_terms) * u * abs_sum. abs_sum may be an array (the bound per entry): its
  maximum is used.
  """
  return 2 * LAMBDA * math.sqrt(max(n_terms, 1)) * unit_roundoff(dtype) * float(np.max(abs_sum))


def gram_atol(P, n_terms: int, dtype=np.float32) -> float:
  """The bound for a Gram matrix P_ij = <r_i, r_j> (or any matrix of such inner products).

  sum_k |r_ik r_jk| <= |r_i| |r_j| <= max_i P_ii (Cauchy-Schwarz), so every entry's error is
  bounded by `sum_atol(max diag P, n_terms)`, also for off-diagonal entries near 0.
  """
  return sum_atol(np.max(np.abs(np.diagonal(np.asarray(P, np.float64)))), n_terms, dtype)


def dot_atol(a, b, n_terms: int | None = None, dtype=np.float32) -> float:
  """The bound for <a, b> (flat arrays): sum|a_k b_k| <= |a| |b|; n_terms defaults to a.size."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  n = a.size if n_terms is None else n_terms
  return sum_atol(np.linalg.norm(a) * np.linalg.norm(b), n, dtype)


def trajectory_atol(leaf, steps: int, dtype=np.float32, growth: float = 4.0) -> float:
  """The bound for one parameter leaf after `steps` SGD steps of two programs.

  Each step rounds every updated parameter once more (u |leaf|) on top of the update's own
  rounding, which is at most as large for lr |g| <= |leaf|; without amplification the two
  trajectories drift apart by at most 2 * 2 u max|leaf| per step. `growth` allows for the
  mild amplification of a short horizon; a test using this states its horizon, which must be
  short enough that no decision (a projection trigger, a QP's active set) flips: it compares
  the counters exactly as well.
  """
  scale = float(np.max(np.abs(np.asarray(leaf, np.float64))))
  return growth * 2 * 2 * unit_roundoff(dtype) * scale * steps


def assert_trees_close_after(got, want, steps: int, dtype=np.float32) -> None:
  """Each leaf of got within `trajectory_atol(want's leaf, steps)` of want's (absolute)."""
  pairs = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True)
  for (path, g), w in pairs:
    atol = trajectory_atol(w, steps, dtype)
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(w), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path)
    )
