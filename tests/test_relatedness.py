"""cljax.grouped.relatedness against scipy's logm (float64), np.cov and numpy transcriptions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.errors import CljaxError
from cljax.grouped.relatedness import (
  cov_from_buffer,
  cov_init,
  cov_update,
  cov_value,
  group_vectors,
  relatedness_divergence,
  relatedness_weights,
  transform_relatedness,
  von_neumann_divergence,
)

# Jitted once per shape: eager mode would compile every primitive on its own (slow on this CPU).
vn = jax.jit(von_neumann_divergence)
rel = jax.jit(relatedness_divergence, static_argnums=2)


def spd(rng, n, *, rank=None, scale=1.0):
  """A random symmetric PSD matrix (rank-deficient when rank < n)."""
  X = rng.standard_normal((n, rank or n + 2))
  return scale * X @ X.T / X.shape[1]


def vn_logm(A, B):
  """float64 reference: tr(A logm A - A logm B - A + B)."""
  la, lb = scipy.linalg.logm(A), scipy.linalg.logm(B)
  return float(np.real(np.trace(A @ la - A @ lb - A + B)))


def r_reference(C1, C2, n_extra):
  sym = vn_logm(C1, C2) + vn_logm(C2, C1)
  s = C1.shape[0] - n_extra
  sym_x = vn_logm(C1[:s, :s], C2[:s, :s]) + vn_logm(C2[:s, :s], C1[:s, :s]) if s else 0.0
  return max(0.0, 0.5 * (sym - sym_x))


# ---------------------------------------------------------------------------------------------
# Von Neumann divergence.


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rank", [None, 2, 0])
def test_divergence_of_a_matrix_with_itself_is_zero(dtype, rank):
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(0)
    A = spd(rng, 5, rank=rank).astype(dtype) if rank != 0 else np.zeros((5, 5), dtype)
    d = vn(A, A)
    assert d.dtype == dtype
    tol = 1e-10 if dtype == np.float64 else 1e-4
    assert abs(float(d)) <= tol * max(1.0, np.trace(A))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), rank=st.integers(1, 8))
def test_divergence_is_nonnegative(seed, n, rank):
  rng = np.random.default_rng(seed)
  A, B = spd(rng, n, rank=rank), spd(rng, n, rank=rank, scale=3.0)
  d = float(vn(A.astype(np.float32), B.astype(np.float32)))
  assert np.isfinite(d)
  assert d >= -1e-4 * (np.trace(A) + np.trace(B))


@pytest.mark.parametrize("seed", range(4))
def test_divergence_matches_scipy_logm_in_float64(seed):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    A, B = spd(rng, 6), spd(rng, 6, scale=2.0)
    want = vn_logm(A, B)
    got = float(vn(A, B, floor=1e-12))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_divergence_float32_is_close_to_float64_reference():
  rng = np.random.default_rng(7)
  A, B = spd(rng, 6), spd(rng, 6, scale=0.5)
  got = float(vn(A.astype(np.float32), B.astype(np.float32)))
  np.testing.assert_allclose(got, vn_logm(A, B), rtol=1e-4)


def test_divergence_floors_singular_matrices_and_flags_non_finite():
  A = np.diag([1.0, 0.0, -1e-9]).astype(np.float32)  # singular, slightly negative eigenvalue
  B = np.eye(3, dtype=np.float32)
  floor = 1e-6
  d = float(vn(A, B, floor=floor))
  a = np.array([1.0, floor, floor])  # the divergence of the floored matrices
  np.testing.assert_allclose(d, np.sum(a * np.log(a) - a + 1.0), rtol=1e-5)
  assert np.isfinite(float(vn(B, A)))
  assert np.isnan(float(vn(np.full((3, 3), np.nan, np.float32), B)))
  assert np.isnan(float(vn(B, np.diag([np.inf, 1.0, 1.0]))))


def test_divergence_batches_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  A = np.stack([spd(rng, 4) for _ in range(6)]).reshape(2, 3, 4, 4).astype(np.float32)
  B = np.stack([spd(rng, 4) for _ in range(6)]).reshape(2, 3, 4, 4).astype(np.float32)
  batched = vn(A, B)
  assert batched.shape == (2, 3)
  loop = np.array([[vn(A[i, j], B[i, j]) for j in range(3)] for i in range(2)])
  mapped = jax.jit(jax.vmap(jax.vmap(von_neumann_divergence)))(A, B)
  np.testing.assert_allclose(batched, loop, rtol=1e-5)
  np.testing.assert_allclose(mapped, loop, rtol=1e-5)
  # leading axes broadcast: one A against a stack of B
  one_vs_many = [float(vn(A[0, 0], B[0, j])) for j in range(3)]
  np.testing.assert_allclose(vn(A[0, 0], B[0]), one_vs_many, rtol=1e-6)


@pytest.mark.parametrize(
  ("A", "B", "floor", "match"),
  [
    (np.ones((3, 2)), np.ones((3, 2)), 1e-6, "square"),
    (np.eye(3), np.eye(2), 1e-6, "same size"),
    (np.eye(3), np.eye(3), 0.0, "floor"),
    (np.eye(3), np.eye(3), np.nan, "floor"),
  ],
)
def test_divergence_bad_input(A, B, floor, match):
  with pytest.raises(CljaxError, match=match):
    von_neumann_divergence(A, B, floor=floor)


# ---------------------------------------------------------------------------------------------
# Relatedness divergence r.


@pytest.mark.parametrize(("seed", "n_extra"), [(0, 1), (1, 1), (2, 3)])
def test_relatedness_divergence_matches_logm_formula(seed, n_extra):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    n = 5
    pairs = [(spd(rng, n), spd(rng, n, scale=1.5)) for _ in range(3)]
    C1 = np.stack([p[0] for p in pairs])
    C2 = np.stack([p[1] for p in pairs])
    got = rel(C1, C2, n_extra, floor=1e-12)
    want = [r_reference(a, b, n_extra) for a, b in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_relatedness_divergence_is_zero_for_equal_or_no_extra():
  rng = np.random.default_rng(3)
  C = spd(rng, 4).astype(np.float32)
  assert abs(float(rel(C, C, 1))) <= 1e-5
  assert float(rel(C, spd(rng, 4), 0)) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_padding_invariance(seed):
  """A group of s units padded to S slots (garbage in the pad) gives the unpadded r."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    s, S, E = 2, 5, 2
    C1, C2 = spd(rng, s + E), spd(rng, s + E, scale=2.0)
    ref = rel(C1, C2, E)
    keep = np.r_[np.arange(s), S + np.arange(E)]  # where the real dims sit in the padded layout

    def pad(C):
      P = rng.standard_normal((S + E, S + E)) * 100  # garbage, even NaN, in the padding
      P[s:S, s] = np.nan
      P[np.ix_(keep, keep)] = C
      return P

    mask = np.zeros(S + E, bool)
    mask[keep] = True
    got = rel(pad(C1), pad(C2), E, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    with jax.enable_x64(False):
      got32 = rel(pad(C1).astype(np.float32), pad(C2).astype(np.float32), E, mask)
      np.testing.assert_allclose(got32, ref, rtol=1e-3, atol=1e-4)


def test_relatedness_of_singular_and_non_finite_covariances_is_finite():
  rng = np.random.default_rng(4)
  n = 4
  x = rng.standard_normal((2, n))  # 2 examples: rank-1 covariance
  rank1 = np.cov(x.T, bias=True)
  cases = [
    (rank1, spd(rng, n)),
    (np.zeros((n, n)), spd(rng, n)),
    (np.zeros((n, n)), np.zeros((n, n))),
    (np.full((n, n), np.nan), spd(rng, n)),
    (np.diag([np.inf, 1.0, 1.0, 1.0]), spd(rng, n)),
    (spd(rng, n, scale=1e30), spd(rng, n, scale=1e-30)),
  ]
  C1 = np.stack([c[0] for c in cases]).astype(np.float32)
  C2 = np.stack([c[1] for c in cases]).astype(np.float32)
  r = np.asarray(jax.jit(lambda a, b: relatedness_divergence(a, b, 1))(C1, C2))
  assert np.all(np.isfinite(r)) and np.all(r >= 0)
  assert r[3] == 0.0 and r[4] == 0.0  # non-finite: no evidence of a difference
  assert r[0] > 0.0
  w = relatedness_weights(np.broadcast_to(r[:, None, None], (6, 2, 3)), np.ones(6, bool))
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(np.sum(w, 0), 1.0, rtol=1e-6)


def test_relatedness_divergence_broadcasts_current_against_past_tasks():
  rng = np.random.default_rng(5)
  T, L, G, n = 3, 2, 4, 3
  cur = np.stack([spd(rng, n) for _ in range(L * G)]).reshape(L, G, n, n).astype(np.float32)
  past = np.stack([spd(rng, n) for _ in range(T * L * G)]).reshape(T, L, G, n, n)
  past = past.astype(np.float32)
  mask = rng.random((G, n)) < 0.8
  mask[:, -1] = True
  r = rel(cur, past, 1, mask)
  assert r.shape == (T, L, G)
  for t, li, g in itertools.product(range(T), range(L), range(G)):
    one = rel(cur[li, g], past[t, li, g], 1, mask[g])
    np.testing.assert_allclose(r[t, li, g], one, rtol=1e-5, atol=1e-6)
  f = jax.jit(jax.vmap(lambda p: relatedness_divergence(cur, p, 1, mask)))
  np.testing.assert_allclose(f(past), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"n_extra": 5}, "n_extra"),
    ({"n_extra": -1}, "n_extra"),
    ({"n_extra": 1.0}, "n_extra"),
    ({"n_extra": 1, "mask": np.ones(3, bool)}, "mask"),
    ({"n_extra": 1, "floor": -1.0}, "floor"),
  ],
)
def test_relatedness_divergence_bad_input(kwargs, match):
  with pytest.raises(CljaxError, match=match):
    relatedness_divergence(np.eye(4), np.eye(4), **kwargs)
  with pytest.raises(CljaxError, match="broadcast"):
    relatedness_divergence(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)), 1)


# ---------------------------------------------------------------------------------------------
# Streaming covariance.


@pytest.mark.parametrize("ddof", [0, 1])
def test_streaming_covariance_matches_np_cov_with_masks(ddof):
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    G, n = 3, 4
    state = cov_init(n, batch_shape=(G,), dtype=jnp.float64)
    update = jax.jit(cov_update)
    kept = [[] for _ in range(G)]
    for size in (5, 1, 7, 3):
      x = rng.standard_normal((size, G, n)) * 2.0 + 3.0
      mask = rng.random((size, G)) < 0.7
      x_garbage = np.where(mask[..., None], x, np.nan)  # masked examples may hold NaN
      state = update(state, x_garbage, mask)
      for g in range(G):
        kept[g].append(x[mask[:, g], g])
    cov = cov_value(state, ddof=ddof)
    for g in range(G):
      xs = np.concatenate(kept[g])
      assert float(state.count[g]) == len(xs)
      np.testing.assert_allclose(state.mean[g], xs.mean(0), rtol=1e-12)
      want = np.cov(xs.T, ddof=ddof) if len(xs) > ddof else np.zeros((n, n))
      np.testing.assert_allclose(cov[g], want, rtol=1e-10, atol=1e-12)


def test_streaming_covariance_example_mask_and_empty_batches():
  rng = np.random.default_rng(8)
  x = rng.standard_normal((6, 2, 3)).astype(np.float32)
  state = cov_init(3, batch_shape=(2,))
  np.testing.assert_array_equal(cov_value(state), 0.0)
  same = cov_update(state, x, np.zeros(6, bool))
  np.testing.assert_array_equal(same.m2, state.m2)
  mask = np.array([True, False, True, True, False, True])
  state = cov_update(state, x, mask)  # a (B,) mask applies to every group
  for g in range(2):
    np.testing.assert_allclose(
      cov_value(state)[g], np.cov(x[mask, g].T, bias=True), rtol=1e-5, atol=1e-6
    )


def test_cov_from_buffer_is_one_update():
  rng = np.random.default_rng(9)
  buf = rng.standard_normal((100, 5)).astype(np.float32)
  filled = np.arange(100) < 37
  state = cov_from_buffer(buf, filled)
  np.testing.assert_allclose(cov_value(state), np.cov(buf[:37].T, bias=True), rtol=1e-4, atol=1e-5)
  two = cov_update(cov_update(cov_init(5), buf[:20]), buf[20:37])
  np.testing.assert_allclose(cov_value(two), cov_value(state), rtol=1e-4, atol=1e-6)


def test_covariance_bad_input():
  with pytest.raises(CljaxError, match="n must be"):
    cov_init(0)
  with pytest.raises(CljaxError, match="x must have shape"):
    cov_update(cov_init(3, batch_shape=(2,)), np.zeros((4, 3)))
  with pytest.raises(CljaxError, match="mask must have shape"):
    cov_update(cov_init(3), np.zeros((4, 3)), np.ones(5, bool))


# ---------------------------------------------------------------------------------------------
# Padded group vectors.


def test_group_vectors_pads_each_group_and_appends_extra():
  rng = np.random.default_rng(10)
  B, H, G, S = 4, 7, 3, 4
  act = rng.standard_normal((B, H)).astype(np.float32)
  labels = rng.integers(0, 10, (B, 1)).astype(np.float32)
  assignment = np.array([2, 0, 2, 1, 0, 2, 2], np.int32)  # sizes 2, 1, 4
  vec, mask = jax.jit(group_vectors, static_argnums=(3, 4))(act, labels, assignment, G, S)
  assert vec.shape == (B, G, S + 1) and mask.shape == (G, S + 1)
  for k in range(G):
    units = np.flatnonzero(assignment == k)
    np.testing.assert_array_equal(vec[:, k, : len(units)], act[:, units])
    np.testing.assert_array_equal(vec[:, k, len(units) : S], 0.0)
    np.testing.assert_array_equal(vec[:, k, S], labels[:, 0])
    np.testing.assert_array_equal(mask[k], np.r_[np.arange(S) < len(units), True])


def test_group_vectors_feed_covariances_that_equal_per_group_np_cov():
  rng = np.random.default_rng(11)
  B, H, G, S = 50, 6, 3, 3
  act = rng.standard_normal((B, H)).astype(np.float32)
  out = rng.standard_normal((B, 2)).astype(np.float32)
  assignment = np.array([0, 1, 1, 2, 0, 1], np.int32)
  f = jax.jit(lambda a, o: group_vectors(a, o, assignment, G, S))
  vec, mask = f(act, out)
  cov = jax.jit(lambda v: cov_value(cov_from_buffer(v)))(vec)  # (G, S+2, S+2)
  for k in range(G):
    units = np.flatnonzero(assignment == k)
    want = np.cov(np.concatenate([act[:, units], out], 1).T, bias=True)
    keep = np.flatnonzero(mask[k])
    np.testing.assert_allclose(cov[k][np.ix_(keep, keep)], want, rtol=1e-4, atol=1e-5)


def test_group_vectors_drop_units_in_no_group_under_jit():
  act = np.arange(8, dtype=np.float32).reshape(2, 4)
  f = jax.jit(lambda a: group_vectors(act, np.ones((2, 1)), a, 2, 2))
  vec, mask = f(np.array([0, -1, 1, 5], np.int32))  # units 1 and 3 belong to no group
  np.testing.assert_array_equal(vec[:, :, :2], [[[0, 0], [2, 0]], [[4, 0], [6, 0]]])
  np.testing.assert_array_equal(mask[:, :2], [[True, False], [True, False]])


def test_group_vectors_bad_input():
  act, extra = np.zeros((2, 4)), np.zeros((2, 1))
  with pytest.raises(CljaxError, match="max_group_size"):
    group_vectors(act, extra, np.array([0, 0, 0, 1]), 2, 2)
  with pytest.raises(CljaxError, match=r"in \[0, 2\)"):
    group_vectors(act, extra, np.array([0, 0, 3, 1]), 2, 4)
  with pytest.raises(CljaxError, match="assignment"):
    group_vectors(act, extra, np.array([0, 1]), 2, 4)
  with pytest.raises(CljaxError, match="same B"):
    group_vectors(act, np.zeros((3, 1)), np.array([0, 0, 1, 1]), 2, 4)


# ---------------------------------------------------------------------------------------------
# Weights and the transform.


def test_relatedness_weights_softmax_over_past_tasks():
  rng = np.random.default_rng(12)
  T, L, G = 5, 2, 3
  r = rng.random((T, L, G)) * 3
  r[3:] = np.nan  # non-past rows may hold anything
  past = np.array([True, True, True, False, False])
  f = jax.jit(relatedness_weights, static_argnames="reverse")
  w = np.asarray(f(r, past))
  np.testing.assert_array_equal(w[3:], 0.0)
  np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
  e = np.exp(-r[:3])
  np.testing.assert_allclose(w[:3], e / e.sum(0), rtol=1e-5)
  # closer (smaller r) tasks weigh more; reverse flips the ordering
  wr = np.asarray(f(r, past, reverse=True))
  np.testing.assert_array_equal(np.argsort(w[:3], 0), np.argsort(-wr[:3], 0))
  np.testing.assert_array_equal(np.argsort(w[:3], 0), np.argsort(-r[:3], 0))
  np.testing.assert_allclose(wr.sum(0), 1.0, rtol=1e-6)


def test_relatedness_weights_edge_cases_and_vmap():
  r = np.array([[[0.0, np.inf]], [[np.nan, 1.0]], [[2.0, np.inf]]], np.float32)  # (3, 1, 2)
  w = relatedness_weights(r, np.ones(3, bool))
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(w[:, 0, 1], [0.0, 1.0, 0.0])
  np.testing.assert_array_equal(relatedness_weights(r, np.zeros(3, bool)), 0.0)
  rs = np.random.default_rng(13).random((4, 3, 2, 5))  # 4 runs of (T=3, L=2, G=5)
  pasts = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
  vm = jax.jit(jax.vmap(lambda r, p: relatedness_weights(r, p)))(rs, pasts)
  for i in range(4):
    np.testing.assert_allclose(vm[i], relatedness_weights(rs[i], pasts[i]), rtol=1e-6)
  with pytest.raises(CljaxError, match="past"):
    relatedness_weights(rs[0], np.ones(4, bool))
  with pytest.raises(CljaxError, match=r"\(T, L, G\)"):
    relatedness_weights(rs[0, 0], np.ones(3, bool))


def transform_numpy(w, past, sub_mean, margin, ignore, group_mask):
  """Plain transcription of transform_relatedness's docstring formula."""
  T, L, G = w.shape
  h = np.zeros_like(w)
  y = np.array(w, np.float64)
  for i, li in itertools.product(range(T), range(L)):
    ks = [k for k in range(G) if group_mask[li, k]]
    if sub_mean and ks:
      y[i, li] = y[i, li] - np.mean(y[i, li, ks])
  if ignore:
    y, margin = np.zeros_like(y), 0.0
  idx = np.flatnonzero(past)
  for li, k in itertools.product(range(L), range(G)):
    if not group_mask[li, k] or len(idx) == 0:
      continue
    col = y[idx, li, k]
    h[idx, li, k] = col - col.mean() + 1.0 + margin
  return h


@pytest.mark.parametrize(
  ("sub_mean", "margin", "ignore", "masked"),
  [
    (True, 0.0, False, False),
    (False, 0.0, False, False),
    (True, 0.5, False, True),
    (False, 0.5, False, True),
    (True, 0.5, True, False),
  ],
)
def test_transform_relatedness_matches_numpy_formula(sub_mean, margin, ignore, masked):
  rng = np.random.default_rng(14)
  T, L, G = 5, 2, 4
  past = np.array([True, True, False, True, False])
  w = np.asarray(relatedness_weights(rng.random((T, L, G)) * 2, past))
  group_mask = rng.random((L, G)) < 0.7 if masked else np.ones((L, G), bool)
  f = jax.jit(
    lambda w, p, m, gm: transform_relatedness(
      w, p, sub_mean=sub_mean, margin=m, ignore=ignore, group_mask=gm
    )
  )
  h = f(w, past, margin, group_mask)
  want = transform_numpy(w, past, sub_mean, margin, ignore, group_mask)
  np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
  # every valid column has mean 1 + margin over the past tasks
  shift = 0.0 if ignore else margin
  np.testing.assert_allclose(np.asarray(h)[past].mean(0)[group_mask], 1.0 + shift, rtol=1e-5)
  if ignore:
    np.testing.assert_array_equal(np.asarray(h)[past][:, group_mask], 1.0)


def test_transform_relatedness_closed_form_and_no_past():
  rng = np.random.default_rng(15)
  past = np.array([True, True, True, False])
  w = np.asarray(relatedness_weights(rng.random((4, 1, 3)), past))
  h = transform_relatedness(w, past, sub_mean=False, margin=2.0)
  np.testing.assert_allclose(np.asarray(h)[:3], w[:3] - 1 / 3 + 1 + 2.0, rtol=1e-5)
  h = transform_relatedness(w, past)
  np.testing.assert_allclose(
    np.asarray(h)[:3], w[:3] - w[:3].mean(-1, keepdims=True) + 1, rtol=1e-5
  )
  np.testing.assert_array_equal(transform_relatedness(w, np.zeros(4, bool)), 0.0)
  with pytest.raises(CljaxError, match="group_mask"):
    transform_relatedness(w, past, group_mask=np.ones((2, 3), bool))


def test_pipeline_from_activations_to_multipliers_under_jit():
  """Activations -> padded group vectors -> covariances -> r -> weights -> h, finite."""
  rng = np.random.default_rng(16)
  T, L, H, G, S, B = 3, 2, 6, 3, 2, 40
  assignment = np.array([0, 1, 2, 0, 1, 2], np.int32)

  def covs(acts, labels):  # acts (L, B, H) -> cov (L, G, S+1, S+1), mask (G, S+1)
    def one(a):
      vec, mask = group_vectors(a, labels[:, None], assignment, G, S)
      return cov_value(cov_from_buffer(vec)), mask

    return jax.vmap(one)(acts)

  @jax.jit
  def run(acts_all, labels_all, past):
    cov, mask = jax.vmap(covs)(acts_all, labels_all)  # (T, L, G, n, n)
    r = relatedness_divergence(cov[-1], cov, 1, mask[0, 0])
    w = relatedness_weights(r, past)
    return r, transform_relatedness(w, past)

  acts = np.maximum(rng.standard_normal((T, L, B, H)), 0.0).astype(np.float32)
  acts[1, :, :, 0] = 0.0  # a dead unit in task 1
  labels = rng.integers(0, 10, (T, B)).astype(np.float32)
  r, h = run(acts, labels, np.array([True, True, False]))
  assert r.shape == h.shape == (T, L, G)
  assert np.all(np.isfinite(r)) and np.all(np.isfinite(h))
  np.testing.assert_allclose(r[-1], 0.0, atol=1e-4)  # the current task against itself
