"""Task relatedness per group of hidden units: streaming covariances and von Neumann divergences.

Grouped GEM weighs each past task's constraint, group by group, by how related the task is to the
current one. For a hidden layer l and a group k of its units (`groups`), the statistics of a
task are the covariance of the vector [a_k, e]: the group's activations a_k followed by an
"extra" vector e of size E (the label as a number, E = 1, or the network's outputs, E = classes).
Groups differ in size, so every group is padded to a fixed size S with a validity mask; the
layout of a group's vector is

    [a_k (S slots, the first |group k| valid, the rest padding), e (E slots, always valid)]

and padded dimensions are made to contribute exactly 0 to every divergence (see
`relatedness_divergence`). From the covariances C (task t) and C' (past task i):

    r = max(0, 1/2 (D(C||C') + D(C'||C) - D(Cx||Cx') - D(Cx'||Cx)))    (one per layer, group)
    D(A||B) = tr(A log A - A log B - A + B)                            (von Neumann divergence)

with Cx the activations-only block (C without the E extra rows and columns): r measures how
differently the extra vector depends on the group's activations in the two tasks. The r of
all past tasks become weights by a masked softmax over past tasks (`relatedness_weights`) and the
per-(task, layer, group) multipliers h of the grouped constraints by `transform_relatedness`.

Every function works on fixed shapes (masks, never variable sizes), is safe under jit and vmap,
and batches over leading axes.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax.errors import CljaxError, concrete_value

_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_FLOOR = 1e-6
"""Eigenvalues below this are raised to it before taking logs (absolute, in covariance units)."""


# --------------------------------------------------------------------------------------------
# Von Neumann divergence.


def _check_square(A: jax.Array, name: str) -> None:
  if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
    raise CljaxError(f"{name} must be square matrices (..., n, n); got shape {A.shape}.")


def _all_finite(A: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(A), axis=(-2, -1))


def _eig(A: jax.Array, finite: jax.Array, floor: Any) -> tuple[jax.Array, jax.Array]:
  """Eigenpairs of sym(A) with eigenvalues raised to `floor`; non-finite A -> identity's."""
  n = A.shape[-1]
  A = jnp.where(finite[..., None, None], A, jnp.eye(n, dtype=A.dtype))  # eigh never sees NaN
  A = 0.5 * (A + jnp.swapaxes(A, -1, -2))
  lam, U = jnp.linalg.eigh(A)
  return jnp.maximum(lam, floor), U


def _divergences(
  a: jax.Array, U: jax.Array, b: jax.Array, V: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(D(A||B), D(B||A)) from floored eigenpairs A = U diag(a) U', B = V diag(b) V'.

  With W_ij = (u_i . v_j)^2 (rows and columns of W sum to 1):
    D(A||B) = sum_ij W_ij a_i (log a_i - log b_j) - sum_i a_i + sum_j b_j,
  written so that equal inputs cancel term by term.
  """
  W = jnp.square(jnp.matmul(jnp.swapaxes(U, -1, -2), V, precision=_HIGHEST))
  la, lb = jnp.log(a), jnp.log(b)
  diff = la[..., :, None] - lb[..., None, :]  # log a_i - log b_j
  trace_gap = jnp.sum(b, -1) - jnp.sum(a, -1)
  d_ab = jnp.sum(W * a[..., :, None] * diff, axis=(-2, -1)) + trace_gap
  d_ba = jnp.sum(W * b[..., None, :] * -diff, axis=(-2, -1)) - trace_gap
  return d_ab, d_ba


def _floor_value(floor: Any, dtype: Any) -> jax.Array:
  try:
    concrete = float(np.asarray(floor))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
    return jnp.asarray(floor, dtype)
  if not concrete > 0 or not np.isfinite(concrete):
    raise CljaxError(f"floor must be a finite number > 0, got {floor!r}.")
  return jnp.asarray(concrete, dtype)


def _float_dtype(*arrays: jax.Array) -> Any:
  return jnp.result_type(*arrays, jnp.float32)


def von_neumann_divergence(
  A: jax.Array, B: jax.Array, *, floor: float | jax.Array = DEFAULT_FLOOR
) -> jax.Array:
  """Von Neumann divergence D(A||B) = tr(A log A - A log B - A + B) of symmetric PSD matrices.

  Computed from the eigendecompositions (`jnp.linalg.eigh`) of sym(A) = (A + A')/2 and sym(B),
  whose eigenvalues are first raised to `floor` (so tiny, zero and slightly negative eigenvalues of
  singular covariances give a finite, large divergence instead of inf/NaN). The result is then the
  exact divergence of the floored positive definite matrices: >= 0, and 0 when A = B.

  Args:
    A: (..., n, n) symmetric positive semi-definite.
    B: (..., n, n), leading axes broadcast against A's.
    floor: eigenvalue floor > 0 (absolute, in the matrices' units).

  Returns:
    (...,) divergences. NaN where A or B holds a non-finite entry (the eigendecomposition never
    sees it); `relatedness_divergence` maps those to 0.
  """
  A, B = jnp.asarray(A), jnp.asarray(B)
  _check_square(A, "A")
  _check_square(B, "B")
  if A.shape[-1] != B.shape[-1]:
    raise CljaxError(f"A and B must have the same size n: got {A.shape} and {B.shape}.")
  dtype = _float_dtype(A, B)
  try:
    lead = jnp.broadcast_shapes(A.shape[:-2], B.shape[:-2])
  except ValueError:
    raise CljaxError(f"leading axes of A {A.shape} and B {B.shape} do not broadcast.") from None
  n = A.shape[-1]
  A = jnp.broadcast_to(A.astype(dtype), (*lead, n, n))
  B = jnp.broadcast_to(B.astype(dtype), (*lead, n, n))
  floor = _floor_value(floor, dtype)
  finite_a, finite_b = _all_finite(A), _all_finite(B)
  lam, U = _eig(jnp.stack([A, B]), jnp.stack([finite_a, finite_b]), floor)  # one eigh call
  d_ab, _ = _divergences(lam[0], U[0], lam[1], U[1])
  return jnp.where(finite_a & finite_b, d_ab, jnp.nan)


def _pad_identity(C: jax.Array, mask: jax.Array) -> jax.Array:
  """Replace masked-out rows and columns of C by those of the identity (C (..., n, n))."""
  keep = mask[..., :, None] & mask[..., None, :]
  eye = jnp.eye(C.shape[-1], dtype=C.dtype)
  return jnp.where(keep, C, eye)


def relatedness_divergence(
  C1: jax.Array,
  C2: jax.Array,
  n_extra: int,
  mask: jax.Array | None = None,
  *,
  floor: float | jax.Array = DEFAULT_FLOOR,
) -> jax.Array:
  """Divergence r between two tasks' covariances of [group activations, extra], per group.

    r = max(0, 1/2 (D(C1||C2) + D(C2||C1) - D(Cx1||Cx2) - D(Cx2||Cx1)))

  D is `von_neumann_divergence` (eigenvalues floored at `floor`), Cx = C[..., :S, :S] the block
  without the last `n_extra` rows and columns (S = n - n_extra). Dimensions with mask False
  (padding) are replaced in both matrices by the identity's rows and columns, so both matrices are
  block diagonal with an identity block there, which adds 1 log 1 - 1 log 1 - 1 + 1 = 0 to every
  divergence: r equals the r of the unpadded matrices (up to rounding).

  A pair where a valid entry of C1 or C2 is not finite gets r = 0 (no evidence of a difference);
  r is always finite (an overflow to +inf becomes the dtype's largest finite value).

  Args:
    C1: (..., n, n) covariances of [activations (S), extra (E)], n = S + E.
    C2: (..., n, n), leading axes broadcast against C1's (e.g. C1 (L, G, n, n) for the current task
      against C2 (T, L, G, n, n) for all past tasks gives r (T, L, G)).
    n_extra: E, the number of trailing extra dimensions (static int, 0 <= E <= n; E = 0 gives 0).
    mask: optional (..., n) bool validity of the dimensions (broadcasts like C1's leading axes);
      default all valid. `group_vectors` returns it for padded groups.
    floor: eigenvalue floor, as `von_neumann_divergence`.

  Returns:
    (...,) r >= 0, finite.
  """
  C1, C2 = jnp.asarray(C1), jnp.asarray(C2)
  _check_square(C1, "C1")
  _check_square(C2, "C2")
  n = C1.shape[-1]
  if C2.shape[-1] != n:
    raise CljaxError(f"C1 and C2 must have the same size n: got {C1.shape} and {C2.shape}.")
  if isinstance(n_extra, bool) or not isinstance(n_extra, (int, np.integer)):
    raise CljaxError(f"n_extra must be a Python int (static), got {n_extra!r}.")
  if not 0 <= n_extra <= n:
    raise CljaxError(f"n_extra must be in [0, n] = [0, {n}], got {n_extra}.")
  dtype = _float_dtype(C1, C2)
  C1, C2 = C1.astype(dtype), C2.astype(dtype)
  floor = _floor_value(floor, dtype)
  if mask is None:
    mask = jnp.ones((n,), bool)
  mask = jnp.asarray(mask)
  if mask.ndim < 1 or mask.shape[-1] != n:
    raise CljaxError(f"mask must have shape (..., n) = (..., {n}), got {mask.shape}.")
  mask = mask.astype(bool)
  try:
    lead = jnp.broadcast_shapes(C1.shape[:-2], C2.shape[:-2], mask.shape[:-1])
  except ValueError:
    raise CljaxError(
      f"leading axes of C1 {C1.shape}, C2 {C2.shape} and mask {mask.shape} do not broadcast."
    ) from None
  if n_extra == 0:
    return jnp.zeros(lead, dtype)

  # Cx as an n x n matrix: the extra rows and columns replaced by the identity's, which adds 0 to
  # every divergence (as padding does). C1 and C2 keep their own leading axes (C1 of the current
  # task is not repeated per past task), and all their matrices go through ONE batched eigh: XLA's
  # CPU runtime may run independent LAPACK eigh calls concurrently, and each blocks a thread of the
  # intra-op pool while waiting for its batch's sub-tasks on that same pool: with as many
  # concurrent calls as threads (2 on a 2-core machine) the run deadlocks.
  keep_x = jnp.arange(n) < n - n_extra

  def padded(C: jax.Array) -> tuple[jax.Array, jax.Array]:
    lead_c = jnp.broadcast_shapes(C.shape[:-2], mask.shape[:-1])
    m = jnp.broadcast_to(mask, (*lead_c, n))
    full = _pad_identity(jnp.broadcast_to(C, (*lead_c, n, n)), m)
    return full, _pad_identity(full, m & keep_x)

  mats = [*padded(C1), *padded(C2)]  # C1, C1x, C2, C2x
  flat = jnp.concatenate([A.reshape(-1, n, n) for A in mats])
  lam, U = _eig(flat, _all_finite(flat), floor)
  cuts = np.cumsum([int(np.prod(A.shape[:-2])) for A in mats])[:-1]
  (l1, u1), (lx1, ux1), (l2, u2), (lx2, ux2) = (
    (lam_k.reshape(A.shape[:-1]), U_k.reshape(A.shape))
    for A, lam_k, U_k in zip(mats, jnp.split(lam, cuts), jnp.split(U, cuts), strict=True)
  )
  full_ok = [jnp.broadcast_to(_all_finite(A), lead) for A in mats[::2]]
  finite = full_ok[0] & full_ok[1]
  d12, d21 = _divergences(l1, u1, l2, u2)
  x12, x21 = _divergences(lx1, ux1, lx2, ux2)
  j_xy, j_x = d12 + d21, x12 + x21
  r = jnp.maximum(0.5 * (j_xy - j_x), 0.0)
  r = jnp.where(finite & ~jnp.isnan(r), r, 0.0)
  return jnp.minimum(r, jnp.finfo(dtype).max)


# --------------------------------------------------------------------------------------------
# Streaming covariance.


class CovState(NamedTuple):
  """Running moments of n-dim vectors, possibly a batch of them (leading axes `...`).

  count: (...) examples seen; mean: (..., n); m2: (..., n, n) sum of outer products of deviations
  from the mean, sum_b (x_b - mean)(x_b - mean)'.
  """

  count: jax.Array
  mean: jax.Array
  m2: jax.Array


def cov_init(n: int, *, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> CovState:
  """An empty CovState for n-dim vectors, with leading axes batch_shape (e.g. (L, G))."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise CljaxError(f"n must be an int >= 1, got {n!r}.")
  batch_shape = tuple(batch_shape)
  return CovState(
    count=jnp.zeros(batch_shape, dtype),
    mean=jnp.zeros((*batch_shape, n), dtype),
    m2=jnp.zeros((*batch_shape, n, n), dtype),
  )


def cov_update(state: CovState, x: jax.Array, mask: jax.Array | None = None) -> CovState:
  """Add a batch of examples to the running moments (Chan et al.'s parallel update).

  With the batch's count n_b = sum_b m_b, mean mu_b and M2_b = sum_b m_b (x_b - mu_b)(x_b - mu_b)'
  (m_b the example mask):

    n = n_a + n_b,  delta = mu_b - mu_a,  mu = mu_a + delta n_b / n,
    M2 = M2_a + M2_b + delta delta' n_a n_b / n.

  Masked examples may hold garbage (even NaN); a batch with no valid example leaves the state as
  it is.

  Args:
    state: CovState with leading axes `...` (count (...), mean (..., n)).
    x: (B, ..., n) examples on axis 0, e.g. `group_vectors` output (B, G, S+E) for a (G,) state.
    mask: optional (B,) or (B, ...) bool, False for examples to ignore.

  Returns:
    The updated CovState.
  """
  x = jnp.asarray(x)
  want = state.mean.shape
  if x.ndim != len(want) + 1 or x.shape[1:] != want:
    raise CljaxError(
      f"x must have shape (B, *{want}) to update a CovState of mean shape {want}; got {x.shape}."
    )
  dtype = state.mean.dtype
  batch = state.count.shape
  if mask is None:
    m = jnp.ones((x.shape[0], *batch), dtype)
  else:
    mask = jnp.asarray(mask)
    if mask.shape not in ((x.shape[0],), (x.shape[0], *batch)):
      raise CljaxError(
        f"mask must have shape ({x.shape[0]},) or {(x.shape[0], *batch)}, got {mask.shape}."
      )
    m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - 1 - mask.ndim)), x.shape[:-1])
    m = m.astype(dtype)
  x = jnp.where(m[..., None] > 0, x.astype(dtype), 0.0)

  n_b = jnp.sum(m, axis=0)
  safe_b = jnp.where(n_b > 0, n_b, 1.0)
  mu_b = jnp.sum(m[..., None] * x, axis=0) / safe_b[..., None]
  dev = (x - mu_b) * m[..., None]
  m2_b = jnp.einsum("b...i,b...j->...ij", dev, dev, precision=_HIGHEST)

  n_a = state.count
  n = n_a + n_b
  safe_n = jnp.where(n > 0, n, 1.0)
  delta = mu_b - state.mean
  mean = state.mean + delta * (n_b / safe_n)[..., None]
  m2 = (
    state.m2
    + m2_b
    + delta[..., :, None] * delta[..., None, :] * (n_a * n_b / safe_n)[..., None, None]
  )
  return CovState(count=n, mean=mean, m2=m2)


def cov_value(state: CovState, *, ddof: int = 0) -> jax.Array:
  """The covariance M2 / (count - ddof): (..., n, n); all zeros while count <= ddof.

  ddof = 0 (default) is the population covariance (1/N) sum (x - mean)(x - mean)', np.cov(...,
  bias=True); ddof = 1 is the unbiased estimate.
  """
  denom = state.count - ddof
  ok = denom > 0
  return jnp.where(ok[..., None, None], state.m2 / jnp.where(ok, denom, 1.0)[..., None, None], 0.0)


def cov_from_buffer(
  x: jax.Array, mask: jax.Array | None = None, *, dtype: Any = jnp.float32
) -> CovState:
  """The CovState of a fixed buffer of examples, e.g. the first task's reservoir.

  Same as `cov_update(cov_init(n, batch_shape=...), x, mask)`. x: (B, ..., n); mask: optional
  (B,) or (B, ...) bool, False for unfilled slots.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise CljaxError(f"x must have shape (B, ..., n), got {x.shape}.")
  return cov_update(cov_init(x.shape[-1], batch_shape=x.shape[1:-1], dtype=dtype), x, mask)


# --------------------------------------------------------------------------------------------
# Padded group vectors.


def group_vectors(
  activations: jax.Array,
  extra: jax.Array,
  assignment: jax.Array,
  num_groups: int,
  max_group_size: int,
) -> tuple[jax.Array, jax.Array]:
  """Each group's activations, padded to max_group_size S, followed by the extra vector.

  out[b, k] = [a_b at group k's units in increasing unit order, zeros to S, extra_b], so
  out[b, k, s] is unit j's activation when j is the s-th unit (0-based) of group k.

  Args:
    activations: (B, H) a hidden layer's activations.
    extra: (B, E) the extra vector per example (labels as numbers with E = 1, or the outputs).
    assignment: (H,) int group of each unit, values in [0, num_groups).
    num_groups: G (static).
    max_group_size: S (static) >= the largest group; `groups.group_sizes(...).max()` after
      the grouping is made. A concrete assignment with a larger group is refused; under jit the
      extra units are dropped.

  Returns:
    (vectors (B, G, S + E), mask (G, S + E) bool): mask is True on each group's real units and on
    the E extra slots, False on padding. Feed both to `cov_update` and `relatedness_divergence`.
  """
  activations, extra, assignment = map(jnp.asarray, (activations, extra, assignment))
  if activations.ndim != 2 or extra.ndim != 2 or extra.shape[0] != activations.shape[0]:
    raise CljaxError(
      f"activations must be (B, H) and extra (B, E) with the same B; got {activations.shape} and "
      f"{extra.shape}. Use extra = labels[:, None] for labels."
    )
  n_units = activations.shape[1]
  if assignment.shape != (n_units,) or not jnp.issubdtype(assignment.dtype, jnp.integer):
    raise CljaxError(
      f"assignment must be an int array of shape (H,) = ({n_units},), got {assignment.dtype} "
      f"{assignment.shape}."
    )
  for name, v in (("num_groups", num_groups), ("max_group_size", max_group_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise CljaxError(f"{name} must be an int >= 1 (static), got {v!r}.")
  onehot = jax.nn.one_hot(assignment, num_groups, dtype=jnp.int32)  # (H, G); out of range: 0
  sizes = jnp.sum(onehot, axis=0)
  concrete = concrete_value(assignment)
  if concrete is not None:
    if concrete.size and (concrete.min() < 0 or concrete.max() >= num_groups):
      raise CljaxError(f"assignment values must be in [0, {num_groups}), got {concrete}.")
    biggest = int(np.asarray(sizes).max(initial=0))
    if biggest > max_group_size:
      raise CljaxError(
        f"a group has {biggest} units but max_group_size is {max_group_size}: pass "
        "max_group_size >= group_sizes(assignment, num_groups).max()."
      )
  slot = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # rank of unit j in its group
  # Units in no group (out-of-range values under jit) get out-of-bounds indices: dropped.
  in_range = (assignment >= 0) & (assignment < num_groups)
  group = jnp.where(in_range, assignment, num_groups)
  slot = jnp.where(in_range, slot, max_group_size)
  dtype = _float_dtype(activations, extra)
  batch = activations.shape[0]
  padded = jnp.zeros((batch, num_groups, max_group_size), dtype)
  padded = padded.at[:, group, slot].set(activations.astype(dtype), mode="drop")
  vectors = jnp.concatenate(
    [
      padded,
      jnp.broadcast_to(extra.astype(dtype)[:, None, :], (batch, num_groups, extra.shape[1])),
    ],
    axis=-1,
  )
  unit_mask = jnp.arange(max_group_size)[None, :] < sizes[:, None]
  mask = jnp.concatenate([unit_mask, jnp.ones((num_groups, extra.shape[1]), bool)], axis=-1)
  return vectors, mask


# --------------------------------------------------------------------------------------------
# From divergences to constraint multipliers.


def _check_past(past: jax.Array, t: int) -> jax.Array:
  past = jnp.asarray(past)
  if past.shape != (t,):
    raise CljaxError(f"past must be a (T,) bool mask with T = {t}, got shape {past.shape}.")
  return past.astype(bool)


def relatedness_weights(
  r: jax.Array, past: jax.Array, *, reverse: bool | jax.Array = False
) -> jax.Array:
  """Per (layer, group), a softmax over the past tasks of -r (closer tasks weigh more).

    w[i, l, k] = past_i exp(s r[i, l, k]) / sum_{j past} exp(s r[j, l, k]),   s = -1 (s = +1
    with reverse, the research code's `ewc_reverse`: the most different tasks weigh more).

  Non-finite r are sanitised first (NaN -> 0, +inf -> the dtype's max, so its weight is 0 unless
  every past task is +inf). With no past task, all weights are 0.

  Args:
    r: (T, L, G) divergences (`relatedness_divergence`), any values in non-past rows.
    past: (T,) bool, True for the past tasks (fixed T: slots for tasks not yet seen are False).
    reverse: flip the sign (a bool, may be traced).

  Returns:
    (T, L, G) weights: >= 0, each (layer, group) column sums to 1 over the past tasks, 0 elsewhere.
  """
  r = jnp.asarray(r)
  if r.ndim != 3:
    raise CljaxError(f"r must have shape (T, L, G), got {r.shape}.")
  past = _check_past(past, r.shape[0])
  r = r.astype(_float_dtype(r))
  big = jnp.finfo(r.dtype).max
  r = jnp.nan_to_num(r, nan=0.0, posinf=big, neginf=-big)
  logits = jnp.where(jnp.asarray(reverse, bool), r, -r)
  p = past[:, None, None]
  top = jnp.max(jnp.where(p, logits, -jnp.inf), axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.where(p, jnp.exp(logits - top), 0.0)
  total = jnp.sum(e, axis=0)
  return e / jnp.where(total > 0, total, 1.0)


def transform_relatedness(
  weights: jax.Array,
  past: jax.Array,
  *,
  sub_mean: bool = True,
  margin: float | jax.Array = 0.0,
  ignore: bool = False,
  group_mask: jax.Array | None = None,
) -> jax.Array:
  """The multipliers h (T, L, G) of the grouped constraint rows, from the relatedness weights.

  With K_l the valid groups of layer l (`group_mask`, default all) and P the past tasks (t = |P|):

    y[i, l, k] = w[i, l, k] - mean_{k' in K_l} w[i, l, k']    (sub_mean; else y = w)
    y <- 0, margin <- 0                                       (ignore)
    h[i, l, k] = y[i, l, k] - mean_{i' in P} y[i', l, k] + 1 + margin
                                                      for i in P and k in K_l; else 0

  so every valid (layer, group) column of h has mean 1 + margin over the past tasks. The margin
  is added after the re-centring, as the research code adds it to its transformed relatedness
  (added before, it would cancel). ignore gives h = 1 on every past task and valid group (plain
  GEM rows with bias_once). When the weights sum to 1 over P (`relatedness_weights`),
  h = w - mean_k w + 1 + margin (sub_mean) or h = w - 1/t + 1 + margin.

  Args:
    weights: (T, L, G) relatedness weights.
    past: (T,) bool past-task mask.
    sub_mean: subtract each (task, layer)'s mean over the valid groups (static bool).
    margin: added after the re-centring (float, may be traced).
    ignore: zero the weights, h = 1 (static bool).
    group_mask: optional (L, G) bool, False for empty groups (excluded from the means, h = 0).

  Returns:
    (T, L, G) h, 0 outside past tasks and valid groups; all zeros with no past task.
  """
  w = jnp.asarray(weights)
  if w.ndim != 3:
    raise CljaxError(f"weights must have shape (T, L, G), got {w.shape}.")
  past = _check_past(past, w.shape[0])
  w = w.astype(_float_dtype(w))
  valid = jnp.ones(w.shape[1:], bool) if group_mask is None else jnp.asarray(group_mask)
  if valid.shape != w.shape[1:]:
    raise CljaxError(f"group_mask must have shape (L, G) = {w.shape[1:]}, got {valid.shape}.")
  valid = valid.astype(bool)[None]
  y = jnp.where(valid, w, 0.0)
  if sub_mean:
    n_valid = jnp.sum(valid, axis=-1, keepdims=True)
    y = y - jnp.sum(y, axis=-1, keepdims=True) / jnp.maximum(n_valid, 1)
  if ignore:
    y, margin = jnp.zeros_like(y), 0.0
  p = past[:, None, None]
  t = jnp.sum(past)
  col_mean = jnp.sum(jnp.where(p, y, 0.0), axis=0) / jnp.maximum(t, 1)
  return jnp.where(p & valid, y - col_mean + 1.0 + margin, 0.0)
