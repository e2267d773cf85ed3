"""A box-constrained convex QP solver in pure JAX: the dual of GEM's projection, without quadprog.

Solves

    min_v  1/2 v'Pv + q'v   s.t.  lower <= v <= upper          (P: (t, t) symmetric PSD)

by accelerated projected gradient (FISTA with adaptive restart, step 1/L, L = the largest eigenvalue
of P), then polishes the result exactly by a few primal-dual active-set steps. Shapes never change:
rows switched off by `mask` are fixed at v = 0, so a run with a fixed-size memory compiles once.

The solution is differentiable: `jax.grad`/`jax.jvp` use implicit differentiation of the KKT
conditions on the active set (as for any QP solver, the derivative is that of the active piece; it
needs the free block of P to be non-singular, e.g. eps > 0 in GEM).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.projections


class QPInfo(NamedTuple):
  """Diagnostics of one solve (scalars; leading batch axes under vmap).

  Attributes:
    iterations: projected-gradient iterations run (int32).
    converged: whether the final KKT residual is within tolerance (bool).
    polished: whether the active-set polish was kept (bool).
    kkt: the natural residual max_i |v_i - clip(v_i - r_i / L)| * L / scale, r = Pv + q, scale =
      max(|q|_inf, L eps_mach): zero exactly when v is optimal; it bounds the three parts below.
    stationarity: max |r_i| over free coordinates, and over coordinates at a bound the size of the
      wrong-signed part of r_i (a negative multiplier), relative to scale.
    feasibility: the largest violation of lower <= v <= upper (absolute).
    complementarity: max_i of max(r_i, 0) (v_i - lower_i) + max(-r_i, 0) (upper_i - v_i), relative
      to scale * (|v|_inf + scale / L).
  """

  iterations: jax.Array
  converged: jax.Array
  polished: jax.Array
  kkt: jax.Array
  stationarity: jax.Array
  feasibility: jax.Array
  complementarity: jax.Array


def default_tol(dtype: jnp.dtype) -> float:
  """Relative KKT tolerance for a dtype: 1e-10 in float64, 1e-6 in float32 and below."""
  return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-6


def _scale(P: jax.Array, q: jax.Array, L: jax.Array) -> jax.Array:
  """The residuals' unit: the size of the gradient r = Pv + q at the problem's scale."""
  tiny = jnp.finfo(q.dtype).tiny
  return jnp.maximum(jnp.max(jnp.abs(q), initial=0.0), L * jnp.finfo(q.dtype).eps) + tiny


def kkt_residuals(
  P: jax.Array,
  q: jax.Array,
  lower: jax.Array,
  upper: jax.Array,
  v: jax.Array,
  *,
  active_tol: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """KKT residuals of v for min 1/2 v'Pv + q'v s.t. lower <= v <= upper.

  Args:
    P: (t, t) symmetric PSD matrix.
    q: (t,) linear term.
    lower: (t,) lower bounds.
    upper: (t,) upper bounds (may be +inf).
    v: (t,) candidate solution.
    active_tol: a coordinate within this distance of a bound counts as at the bound.

  Returns:
    (kkt, stationarity, feasibility, complementarity), as defined in `QPInfo`.
  """
  L = _lipschitz(P)
  return _kkt(P, q, lower, upper, v, L, _scale(P, q, L), active_tol)


def _kkt(P, q, lower, upper, v, L, scale, active_tol=0.0):
  r = P @ v + q
  step = jnp.where(L > 0, 1.0 / jnp.maximum(L, jnp.finfo(q.dtype).tiny), 0.0)
  kkt = jnp.max(
    jnp.abs(v - optax.projections.projection_box(v - step * r, lower, upper)), initial=0.0
  )
  kkt = kkt * L / scale
  at_lo = v - lower <= active_tol
  at_up = upper - v <= active_tol
  stat = jnp.where(at_lo, jnp.maximum(-r, 0.0), jnp.abs(r))
  stat = jnp.where(at_up, jnp.maximum(r, 0.0), stat)
  stat = jnp.where(at_lo & at_up, 0.0, stat)
  feas = jnp.maximum(jnp.maximum(lower - v, v - upper), 0.0)
  slack_lo = jnp.where(jnp.isfinite(lower), v - lower, 0.0)
  slack_up = jnp.where(jnp.isfinite(upper), upper - v, 0.0)
  comp = jnp.maximum(r, 0.0) * jnp.maximum(slack_lo, 0.0) + jnp.maximum(-r, 0.0) * jnp.maximum(
    slack_up, 0.0
  )
  comp_unit = scale * (jnp.max(jnp.abs(v), initial=0.0) + scale / jnp.maximum(L, scale))
  return (
    kkt,
    jnp.max(stat, initial=0.0) / scale,
    jnp.max(feas, initial=0.0),
    jnp.max(comp, initial=0.0) / comp_unit,
  )


def _lipschitz(P: jax.Array) -> jax.Array:
  """The largest eigenvalue of the symmetric PSD matrix P (0 for an empty or zero matrix)."""
  if P.shape[0] == 0:
    return jnp.zeros((), P.dtype)
  return jnp.maximum(jnp.linalg.eigvalsh(P)[-1], 0.0)


def _fista(P, q, lower, upper, v0, L, scale, tol, max_iter):
  """Accelerated projected gradient with gradient-based adaptive restart (O'Donoghue & Candès)."""
  step = 1.0 / jnp.maximum(L, jnp.finfo(q.dtype).tiny)

  def cond(state):
    _, _, _, it, res = state
    return (it < max_iter) & (res > tol)

  def body(state):
    v, y, k, it, _ = state
    v_new = optax.projections.projection_box(y - step * (P @ y + q), lower, upper)
    # Gradient mapping at y: zero iff y is optimal. In units of the gradient, relative to scale.
    res = jnp.max(jnp.abs(y - v_new), initial=0.0) * L / scale
    restart = jnp.vdot(y - v_new, v_new - v) > 0
    k_new = jnp.where(restart, 1.0, (1.0 + jnp.sqrt(1.0 + 4.0 * k * k)) / 2.0)
    y_new = jnp.where(restart, v_new, v_new + ((k - 1.0) / k_new) * (v_new - v))
    return v_new, y_new, k_new.astype(k.dtype), it + 1, res

  one = jnp.ones((), q.dtype)
  init = (v0, v0, one, jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, q.dtype))
  v, _, _, it, _ = jax.lax.while_loop(cond, body, init)
  return v, it


def _active_set_solve(P, q, lower, upper, at_lo, at_up):
  """Solve the KKT system with the coordinates in at_lo / at_up fixed at their bound.

  Free coordinates F solve P_FF v_F = -(q_F + P_FA v_A). Shapes stay (t, t): fixed coordinates get
  identity rows.
  """
  fixed = at_lo | at_up
  v_fixed = jnp.where(at_lo, lower, jnp.where(at_up, upper, 0.0))
  free = ~fixed
  M = jnp.where(free[:, None] & free[None, :], P, 0.0) + jnp.diag(fixed.astype(P.dtype))
  rhs = jnp.where(free, -(q + P @ v_fixed), v_fixed)
  return jnp.where(free, jnp.linalg.solve(M, rhs), v_fixed)


def _polish(P, q, lower, upper, v, L, scale, kkt, steps):
  """Refine v by primal-dual active-set steps (a semismooth Newton method on the KKT residual).

  Each step guesses the active set from u = v - r / L (u <= lower: at lower; u >= upper: at upper;
  after the first step this is Hintermüller-Ito-Kunisch's rule: keep a bound while its multiplier
  has the right sign, add one when a free coordinate leaves the box), then solves the KKT system
  exactly on it. It stops after `steps` steps, or as soon as a step guesses the same active set as
  the step before (the method's fixed point: the solve would repeat). The best clipped iterate by
  KKT residual is kept, so the polish never makes the answer worse.
  """

  def guess(v):
    u = v - (P @ v + q) / L
    return u <= lower, u >= upper

  def cond(carry):
    i, _, _, _, active, previous = carry
    return (i < steps) & (
      (i == 0) | jnp.any(active[0] != previous[0]) | jnp.any(active[1] != previous[1])
    )

  def step(carry):
    i, v, best_v, best_kkt, active, _ = carry
    v_new = _active_set_solve(P, q, lower, upper, *active)
    finite = jnp.all(jnp.isfinite(v_new))
    candidate = optax.projections.projection_box(v_new, lower, upper)
    k_new = _kkt(P, q, lower, upper, candidate, L, scale)
    better = finite & (k_new[0] < best_kkt[0])
    best_v = jnp.where(better, candidate, best_v)
    best_kkt = jax.tree.map(lambda a, b: jnp.where(better, a, b), k_new, best_kkt)
    # Iterate unclipped: a free coordinate that left the box is then caught as active.
    v = jnp.where(finite, v_new, best_v)
    return i + 1, v, best_v, best_kkt, guess(v), active

  active = guess(v)
  init = (jnp.zeros((), jnp.int32), v, v, kkt, active, active)
  _, _, best_v, best_kkt, _, _ = jax.lax.while_loop(cond, step, init)
  return best_v, best_kkt


def _implicit_diff_identity(v, P, q, lower, upper):
  return v


_implicit_diff_identity = jax.custom_jvp(_implicit_diff_identity)


@_implicit_diff_identity.defjvp
def _implicit_diff_jvp(primals, tangents):
  """Tangent of v* from the KKT conditions on the active set A (free set F).

  Active coordinates follow their bound; free ones solve P_FF dv_F = -(dq_F + (dP v)_F + P_FA dv_A).
  """
  v, P, _, lower, upper = primals
  _, dP, dq, dlower, dupper = tangents
  tol = 8 * jnp.finfo(v.dtype).eps * (jnp.max(jnp.abs(v), initial=0.0) + 1.0)
  at_lo = v - lower <= tol
  at_up = (upper - v <= tol) & ~at_lo
  return v, _active_set_solve(P, dq + dP @ v, dlower, dupper, at_lo, at_up)


def solve_box_qp(
  P: jax.Array,
  q: jax.Array,
  lower: jax.Array | float = 0.0,
  upper: jax.Array | float = jnp.inf,
  *,
  mask: jax.Array | None = None,
  tol: float | None = None,
  max_iter: int = 1000,
  polish_steps: int = 8,
) -> tuple[jax.Array, QPInfo]:
  """Solve min_v 1/2 v'Pv + q'v  s.t.  lower <= v <= upper, with masked coordinates fixed at 0.

  Args:
    P: (t, t) symmetric positive semi-definite matrix (symmetrised as (P + P')/2).
    q: (t,) linear term.
    lower: (t,) or scalar lower bound.
    upper: (t,) or scalar upper bound (+inf allowed); lower <= upper is assumed.
    mask: optional (t,) bool; False coordinates are fixed at v = 0 (their P rows/columns and q
      entries are ignored, so they may hold garbage, even NaN).
    tol: relative KKT tolerance (see `QPInfo.kkt`); default `default_tol(dtype)`.
    max_iter: cap on projected-gradient iterations (a `lax.while_loop`).
    polish_steps: at most this many primal-dual active-set steps after the projected gradient,
      each an exact (t, t) linear solve on a guessed active set, stopping early when the guess
      repeats; the best iterate by KKT residual is kept (0: off).

  Returns:
    (v, info): the solution (t,) and a `QPInfo`. Non-finite P or q give a NaN v and
    `converged=False`.
  """
  P = jnp.asarray(P)
  q = jnp.asarray(q)
  dtype = jnp.result_type(P.dtype, q.dtype, jnp.float32)
  P, q = P.astype(dtype), q.astype(dtype)
  t = q.shape[0]
  lower = jnp.broadcast_to(jnp.asarray(lower, dtype), (t,))
  upper = jnp.broadcast_to(jnp.asarray(upper, dtype), (t,))
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    P = jnp.where(mask[:, None] & mask[None, :], P, 0.0)
    q = jnp.where(mask, q, 0.0)
    lower = jnp.where(mask, lower, 0.0)
    upper = jnp.where(mask, upper, 0.0)
  P = 0.5 * (P + P.T)
  tol = default_tol(dtype) if tol is None else tol

  sP, sq = jax.lax.stop_gradient(P), jax.lax.stop_gradient(q)
  slo, sup = jax.lax.stop_gradient(lower), jax.lax.stop_gradient(upper)
  L = _lipschitz(sP)
  scale = _scale(sP, sq, L)
  v0 = optax.projections.projection_box(jnp.zeros_like(sq), slo, sup)
  v, iterations = _fista(sP, sq, slo, sup, v0, L, scale, tol, max_iter)
  kkt = _kkt(sP, sq, slo, sup, v, L, scale)
  polished = jnp.zeros((), bool)
  if polish_steps > 0 and t > 0:
    v_pol, kkt_pol = _polish(
      sP, sq, slo, sup, v, jnp.maximum(L, jnp.finfo(dtype).tiny), scale, kkt, polish_steps
    )
    polished = kkt_pol[0] < kkt[0]
    v, kkt = v_pol, kkt_pol
  finite = jnp.all(jnp.isfinite(sP)) & jnp.all(jnp.isfinite(sq))
  v = jnp.where(finite, v, jnp.nan)
  v = _implicit_diff_identity(jax.lax.stop_gradient(v), P, q, lower, upper)
  info = QPInfo(
    iterations=iterations,
    converged=finite & (kkt[0] <= tol),
    polished=polished,
    kkt=kkt[0],
    stationarity=kkt[1],
    feasibility=kkt[2],
    complementarity=kkt[3],
  )
  return v, info
