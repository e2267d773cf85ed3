"""Gradient projections of GEM and A-GEM: pure functions, pytree in, pytree out.

Notation: g is the proposed gradient (a pytree, p numbers in all), G holds t memory gradients as the
rows of a (t, p) matrix or as a pytree whose leaves carry a leading axis t, and g_ref is one
reference gradient. Every function is safe under jit, vmap, scan and grad, and never prints or
syncs with the host.

Which rule each variant of the seed note uses:

  paper A-GEM (Chaudhry et al. 2019)   `agem_project`: project only when <g, g_ref> < 0
  seed way 2, "new version"            `project_orthogonal`: always remove the g_ref component
                                       (the caller decides when, from GEM's per-task check)
  seed ways 1 and 3, "old version" and `gem_project` with one row (summed or mean memory
  "another way"                        gradient) and margin = memory_strength
  GEM (Lopez-Paz & Ranzato 2017)       `gem_project` with one row per past task

Non-finite input is never silently repaired: if g, g_ref or an unmasked row of G holds NaN or Inf,
the result is NaN everywhere (and the QP reports converged=False), so a diverging run is seen.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cljax.errors import CljaxError, concrete_value
from cljax.qp import QPInfo, solve_box_qp

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def ravel(tree: PyTree) -> tuple[jax.Array, Any]:
  """Flatten a parameter pytree to a (p,) vector; returns (flat, unravel) as `ravel_pytree`."""
  return ravel_pytree(tree)


def ravel_rows(rows: PyTree) -> jax.Array:
  """Flatten a pytree whose leaves have a leading axis t into a (t, p) matrix, row by row."""
  return jax.vmap(lambda row: ravel_pytree(row)[0])(rows)


def unravel_rows(flat_rows: jax.Array, like: PyTree) -> PyTree:
  """Inverse of `ravel_rows`: (t, p) matrix -> pytree shaped like `like` with a leading axis t."""
  unravel = ravel_pytree(like)[1]
  return jax.vmap(unravel)(flat_rows)


def _as_arrays(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.asarray, tree)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """<a, b> summed over the leaves of two pytrees of the same structure (full precision)."""
  leaves = [
    jnp.vdot(x, y, precision=_HIGHEST)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return sum(leaves, jnp.zeros((), jnp.result_type(*leaves))) if leaves else jnp.zeros(())


def _axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
  """Return y + alpha x, leaf by leaf, in y's dtypes."""
  return jax.tree.map(lambda xl, yl: (yl + alpha * xl).astype(yl.dtype), x, y)


def _check_same_shapes(g: PyTree, other: PyTree, name: str, *, leading: bool) -> int | None:
  """Check that `other` has g's structure (with a leading axis when `leading`); return that axis."""
  g_def, o_def = jax.tree.structure(g), jax.tree.structure(other)
  if g_def != o_def:
    raise CljaxError(
      f"{name} must have the same pytree structure as g: g is {g_def}, {name} is {o_def}."
    )
  g_shapes = [np.shape(x) for x in jax.tree.leaves(g)]
  o_shapes = [np.shape(x) for x in jax.tree.leaves(other)]
  t = None
  for gs, os in zip(g_shapes, o_shapes, strict=True):
    want = os[1:] if leading else os
    if want != gs or (leading and len(os) == 0):
      lead = "(t, *g.shape) per leaf" if leading else "g's shape"
      raise CljaxError(
        f"shape mismatch: g has shapes {g_shapes}, {name} has shapes {o_shapes}; "
        f"{name} must have {lead}."
      )
    if leading:
      if t is not None and os[0] != t:
        raise CljaxError(f"{name}'s leaves disagree on the number of rows t: shapes {o_shapes}.")
      t = os[0]
  return t


def _check_nonnegative(value: Any, name: str) -> None:
  """Refuse a negative concrete value; traced values (e.g. swept under vmap) are not checked."""
  concrete = concrete_value(value)
  if concrete is not None and np.any(concrete < 0):
    raise CljaxError(f"{name} must be >= 0, got {value}.")


def agem_project(g: PyTree, g_ref: PyTree) -> PyTree:
  """A-GEM (Chaudhry et al. 2019, eq. 11): project g onto the half-space {z : <z, g_ref> >= 0}.

    g~ = g                                      if <g, g_ref> >= 0
    g~ = g - (<g, g_ref> / <g_ref, g_ref>) g_ref  otherwise

  g_ref = 0 returns g (no division by zero, finite gradients under grad).

  Args:
    g: proposed gradient, any pytree of arrays.
    g_ref: reference gradient (e.g. on a sample of the episodic memory), same structure and shapes.

  Returns:
    g~, same structure, shapes and dtypes as g.
  """
  _check_same_shapes(g, g_ref, "g_ref", leading=False)
  return _remove_component(_as_arrays(g), _as_arrays(g_ref), only_if_negative=True)


def project_orthogonal(g: PyTree, g_ref: PyTree) -> PyTree:
  """Remove g's component along g_ref, whatever its sign: g - (<g, g_ref> / <g_ref, g_ref>) g_ref.

  This is the seed note's "new version" (`project2cone2_agem`), where the caller applies it when
  GEM's per-task check finds a conflict, even if <g, g_ref> > 0 (the paper's `agem_project` would
  then leave g alone). g_ref = 0 returns g.

  Args:
    g: proposed gradient, any pytree of arrays.
    g_ref: reference direction, same structure and shapes.

  Returns:
    g~ with <g~, g_ref> = 0; same structure, shapes and dtypes as g.
  """
  _check_same_shapes(g, g_ref, "g_ref", leading=False)
  return _remove_component(_as_arrays(g), _as_arrays(g_ref), only_if_negative=False)


def _remove_component(g: PyTree, g_ref: PyTree, *, only_if_negative: bool) -> PyTree:
  dot = tree_vdot(g, g_ref)
  sq = tree_vdot(g_ref, g_ref)
  apply = sq > 0
  if only_if_negative:
    apply &= dot < 0
  # Double where: the unused branch never divides by zero, so gradients stay finite.
  coef = jnp.where(apply, dot / jnp.where(apply, sq, 1.0), 0.0)
  coef = jnp.where(jnp.isfinite(dot) & jnp.isfinite(sq), coef, jnp.nan)
  return _axpy(-coef, g_ref, g)


class GEMInfo(NamedTuple):
  """What `gem_project` did: whether a constraint was violated and projected, and the QP's info."""

  violated: jax.Array  # bool: some unmasked row has <g, row> < 0 (or the input is non-finite)
  projected: jax.Array  # bool: the QP was applied (violated, only_if_violated=False, or trigger)
  qp: QPInfo  # the solver's diagnostics (zeros and converged=True when not projected)


def gem_terms(
  g: PyTree, G: PyTree, *, mask: jax.Array | None = None, eps: float | jax.Array = 0.0
) -> tuple[jax.Array, jax.Array]:
  """The dual QP's terms P = G G' + eps I (t, t) and q = G g (t,), leaf by leaf, no (t, p) copy.

  Masked rows (mask False) are zeroed first, so they may hold garbage (even NaN).
  """
  t = _check_same_shapes(g, G, "G", leading=True)
  rows = [x.reshape(t, -1) for x in jax.tree.leaves(G)]
  vecs = [x.reshape(-1) for x in jax.tree.leaves(g)]
  if mask is not None:
    rows = [jnp.where(mask[:, None], r, 0.0) for r in rows]
  P = sum(jnp.matmul(r, r.T, precision=_HIGHEST) for r in rows)
  q = sum(jnp.matmul(r, v, precision=_HIGHEST) for r, v in zip(rows, vecs, strict=True))
  P = P + eps * jnp.eye(t, dtype=P.dtype)
  return P, q


def gem_project(
  g: PyTree,
  G: PyTree,
  *,
  margin: float | jax.Array = 0.0,
  mask: jax.Array | None = None,
  eps: float | jax.Array = 1e-3,
  only_if_violated: bool = True,
  trigger: jax.Array | None = None,
  tol: float | None = None,
  max_iter: int = 1000,
  polish_steps: int = 8,
) -> tuple[PyTree, GEMInfo]:
  """GEM (Lopez-Paz & Ranzato 2017): the update closest to g that does not raise past-task losses.

  Solves the dual of min_z 1/2 |z - g|^2 s.t. G z >= 0, as GEM's `project2cone2`:

    v* = argmin_v 1/2 v'Pv + q'v  s.t.  v >= margin,   P = G G' + eps I,  q = G g
    g~ = g + G' v*

  `margin` is GEM's `memory_strength`: v >= margin > 0 adds at least margin x each memory gradient,
  even to rows that do not conflict. `eps` is the official GEM code's ridge (1e-3), which keeps P
  positive definite with duplicate or zero rows; the seed note's copy drops it (eps=0), which is why
  quadprog there fails with "matrix G is not positive definite" (this solver does not need it).

  Args:
    g: proposed gradient, any pytree (p numbers in all).
    G: t memory gradients: a (t, p) array when g is (p,), or g's pytree with a leading axis t.
    margin: lower bound on v (>= 0; a concrete negative value is refused).
    mask: optional (t,) bool, False for unused memory slots (their v is 0; shapes never change).
    eps: ridge added to P's diagonal (>= 0).
    only_if_violated: as GEM's training loop, return g unchanged unless some unmasked row has
      <g, row> < 0; False applies the QP always (then margin > 0 moves g even with no conflict).
    trigger: optional () bool (may be traced) that decides instead: the QP is solved and applied
      exactly when it is True (e.g. GEM's per-task check when G is one averaged row, the seed's
      way 3); overrides only_if_violated.
    tol: the solver's relative KKT tolerance (see `cljax.qp.solve_box_qp`).
    max_iter: the solver's cap on projected-gradient iterations.
    polish_steps: the solver's active-set polish steps.

  Returns:
    (g~, GEMInfo). g~ has g's structure, shapes and dtypes. With t = 0 rows, g~ = g.
  """
  t = _check_same_shapes(g, G, "G", leading=True)
  g, G = _as_arrays(g), _as_arrays(G)
  mask = _check_mask(mask, t)
  if t == 0:
    _check_nonnegative(margin, "margin (memory_strength)")
    _check_nonnegative(eps, "eps")
    info = _no_projection_info(jnp.float32)
    return g, GEMInfo(jnp.zeros((), bool), jnp.zeros((), bool), info)

  if mask is not None:  # zero unused slots once: they may hold garbage, even NaN
    G = jax.tree.map(lambda Gl: jnp.where(_expand(mask, Gl), Gl, 0.0), G)
  P, q = gem_terms(g, G)
  v, info = gem_dual(
    P,
    q,
    margin=margin,
    mask=mask,
    eps=eps,
    only_if_violated=only_if_violated,
    trigger=trigger,
    tol=tol,
    max_iter=max_iter,
    polish_steps=polish_steps,
  )

  def add_rows(_):
    return jax.tree.map(
      lambda gl, Gl: (gl + jnp.tensordot(v, Gl, 1, precision=_HIGHEST)).astype(gl.dtype), g, G
    )

  g_tilde = jax.lax.cond(info.projected, add_rows, lambda _: g, None)
  return g_tilde, info


def gem_dual(
  P: jax.Array,
  q: jax.Array,
  *,
  margin: float | jax.Array = 0.0,
  mask: jax.Array | None = None,
  eps: float | jax.Array = 1e-3,
  only_if_violated: bool = True,
  trigger: jax.Array | None = None,
  tol: float | None = None,
  max_iter: int = 1000,
  polish_steps: int = 8,
) -> tuple[jax.Array, GEMInfo]:
  """GEM's dual from its terms: v* for P = G G', q = G g, when the caller has them in closed form.

  `gem_project` is `gem_terms` + this + g~ = g + G'v. Callers that never form G (e.g. from
  per-example gradient factors, `cljax.example_grads`) compute P and q their own way, call this,
  and apply G'v themselves. Arguments as `gem_project`; P: (t, t) without the ridge (eps I is added
  here), q: (t,).

  Returns:
    (v, GEMInfo): v (t,) is 0 where no projection is made (not violated with only_if_violated, or a
    masked row), so g + G'v = g there.
  """
  P, q = jnp.asarray(P), jnp.asarray(q)
  t = q.shape[0] if q.ndim == 1 else -1
  if P.shape != (t, t):
    raise CljaxError(f"gem_dual needs P (t, t) and q (t,): got P {P.shape} and q {q.shape}.")
  mask = _check_mask(mask, t)
  _check_nonnegative(margin, "margin (memory_strength)")
  _check_nonnegative(eps, "eps")
  if t == 0:
    return q, GEMInfo(jnp.zeros((), bool), jnp.zeros((), bool), _no_projection_info(q.dtype))
  P = P + eps * jnp.eye(t, dtype=P.dtype)
  finite = jnp.all(jnp.isfinite(jnp.where(_outer(mask), P, 0.0))) & jnp.all(
    jnp.isfinite(q if mask is None else jnp.where(mask, q, 0.0))
  )
  conflict = q < 0 if mask is None else (q < 0) & mask
  violated = jnp.any(conflict) | ~finite

  def solve(_):
    return solve_box_qp(
      P, q, margin, mask=mask, tol=tol, max_iter=max_iter, polish_steps=polish_steps
    )

  def keep(_):
    return jnp.zeros_like(q), _no_projection_info(q.dtype)

  if trigger is not None:
    do_project = jnp.asarray(trigger, bool).reshape(())
  else:
    do_project = violated if only_if_violated else jnp.ones((), bool)
  v, info = jax.lax.cond(do_project, solve, keep, None)
  return v, GEMInfo(violated=violated, projected=do_project, qp=info)


def _check_mask(mask: jax.Array | None, t: int) -> jax.Array | None:
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != (t,):
    raise CljaxError(f"mask must have shape (t,) = ({t},), got {mask.shape}.")
  return mask.astype(bool)


def _outer(mask: jax.Array | None) -> jax.Array | bool:
  return True if mask is None else mask[:, None] & mask[None, :]


def _expand(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  return mask.reshape((-1,) + (1,) * (leaf.ndim - 1))


def _no_projection_info(dtype: Any) -> QPInfo:
  zero = jnp.zeros((), dtype)
  return QPInfo(
    iterations=jnp.zeros((), jnp.int32),
    converged=jnp.ones((), bool),
    polished=jnp.zeros((), bool),
    kkt=zero,
    stationarity=zero,
    feasibility=zero,
    complementarity=zero,
  )
