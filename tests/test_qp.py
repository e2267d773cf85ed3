"""cljax.qp.solve_box_qp against quadprog.solve_qp (the reference GEM uses) and KKT conditions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quadprog
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.qp import kkt_residuals, solve_box_qp

T_MAX, DIM = 6, 10  # fixed shapes: hypothesis varies the active rows through the mask, one compile


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def quadprog_box(P, q, lower, upper):
  """min 1/2 v'Pv + q'v s.t. lower <= v <= upper with quadprog (constraints C'v >= b)."""
  t = len(q)
  finite_up = np.isfinite(upper)
  C = np.concatenate([np.eye(t), -np.eye(t)[:, finite_up]], axis=1)
  b = np.concatenate([lower, -upper[finite_up]])
  return quadprog.solve_qp(P, -q, C, b)[0]


def random_problem(rng, t, p=DIM, *, eps=1e-3, conflict=True):
  G = rng.standard_normal((t, p))
  g = rng.standard_normal(p)
  if conflict:  # make some rows conflict with g, so bounds are active and inactive
    g = -G[: max(1, t // 2)].mean(0) + 0.5 * g
  return G @ G.T + eps * np.eye(t), G @ g


def objective(P, q, v):
  return 0.5 * v @ P @ v + q @ v


@settings(max_examples=60, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  t=st.integers(1, T_MAX),
  margin=st.sampled_from([0.0, 0.5, 2.0]),
  boxed=st.booleans(),
)
def test_matches_quadprog_float64(seed, t, margin, boxed):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    P, q = random_problem(rng, t)
    lower = np.full(t, margin)
    upper = lower + rng.uniform(0.1, 3.0, t) if boxed else np.full(t, np.inf)
    v_ref = quadprog_box(P, q, lower, upper)
    # Pad to T_MAX with garbage in the unused slots: the mask must make them irrelevant.
    Pp = np.full((T_MAX, T_MAX), np.nan)
    Pp[:t, :t] = P
    qp_ = np.full(T_MAX, np.nan)
    qp_[:t] = q
    lo = np.zeros(T_MAX)
    lo[:t] = lower
    up = np.full(T_MAX, np.inf)
    up[:t] = upper
    mask = np.arange(T_MAX) < t
    v, info = _solve64(Pp, qp_, lo, up, mask)
    v = np.asarray(v)
    assert v.dtype == np.float64
    np.testing.assert_array_equal(v[t:], 0.0)
    np.testing.assert_allclose(v[:t], v_ref, rtol=1e-8, atol=1e-9 * (1 + np.abs(v_ref).max()))
    gap = objective(P, q, v[:t]) - objective(P, q, v_ref)
    assert abs(gap) <= 1e-10 * (1 + abs(objective(P, q, v_ref)))
    assert bool(info.converged)
    assert float(info.kkt) <= 1e-10
    assert float(info.feasibility) <= 1e-12


_solve64 = jax.jit(lambda P, q, lo, up, mask: solve_box_qp(P, q, lo, up, mask=mask))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("t", [1, 3, 20])
def test_matches_quadprog_float32(seed, t):
  rng = np.random.default_rng(seed)
  P, q = random_problem(rng, t, p=50)
  v_ref = quadprog_box(P, q, np.zeros(t), np.full(t, np.inf))
  v, info = jax.jit(solve_box_qp)(P.astype(np.float32), q.astype(np.float32))
  assert v.dtype == jnp.float32
  scale = np.abs(v_ref).max() + 1e-3
  np.testing.assert_allclose(np.asarray(v), v_ref, atol=1e-4 * scale)
  assert bool(info.converged)


def test_kkt_conditions_hold_at_the_solution(x64):
  rng = np.random.default_rng(0)
  P, q = random_problem(rng, 8)
  v, info = solve_box_qp(P, q, 0.3)
  v = np.asarray(v)
  r = P @ v + q
  assert np.all(v >= 0.3 - 1e-12)  # primal feasibility
  free = v > 0.3 + 1e-9
  assert free.any() and (~free).any()  # the problem has active and inactive bounds
  np.testing.assert_allclose(r[free], 0.0, atol=1e-9 * np.abs(q).max())  # stationarity
  assert np.all(r[~free] >= -1e-9 * np.abs(q).max())  # dual feasibility (multiplier >= 0)
  kkt, stat, feas, comp = kkt_residuals(P, q, np.full(8, 0.3), np.full(8, np.inf), v)
  assert max(float(kkt), float(stat), float(feas), float(comp)) <= 1e-10
  assert float(info.kkt) == pytest.approx(float(kkt), abs=1e-14)


def test_kkt_residuals_detect_a_wrong_answer(x64):
  rng = np.random.default_rng(1)
  P, q = random_problem(rng, 5)
  v, _ = solve_box_qp(P, q)
  lo, up = np.zeros(5), np.full(5, np.inf)
  wrong = np.asarray(v) + 0.1
  assert float(kkt_residuals(P, q, lo, up, wrong)[0]) > 1e-3
  infeasible = np.full(5, -1.0)
  assert float(kkt_residuals(P, q, lo, up, infeasible)[2]) == pytest.approx(1.0)


def test_ill_conditioned_converges_through_the_polish(x64):
  # Rank-5 rows, t = 40, eps = 1e-3: condition number ~1e7, too slow for projected gradient alone.
  rng = np.random.default_rng(2)
  G = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 200))
  g = -G[:10].mean(0) + 0.3 * rng.standard_normal(200)
  P, q = G @ G.T + 1e-3 * np.eye(40), G @ g
  v, info = solve_box_qp(P, q, max_iter=200)
  v_ref = quadprog_box(P, q, np.zeros(40), np.full(40, np.inf))
  assert bool(info.polished) and bool(info.converged)
  np.testing.assert_allclose(G.T @ np.asarray(v), G.T @ v_ref, atol=1e-8 * np.abs(g).max())


def test_singular_problem_that_quadprog_refuses(x64):
  # Duplicate and zero rows without the eps ridge: P is singular.
  rng = np.random.default_rng(3)
  G = rng.standard_normal((6, 30))
  G[3:5] = G[0:2]
  G[5] = 0.0
  g = -G[0] + 0.1 * rng.standard_normal(30)
  P, q = G @ G.T, G @ g
  with pytest.raises(ValueError, match="positive definite"):
    quadprog_box(P, q, np.zeros(6), np.full(6, np.inf))
  v, info = solve_box_qp(P, q)
  assert np.all(np.isfinite(np.asarray(v)))
  assert bool(info.converged) and float(info.kkt) <= 1e-10
  # The primal answer g + G'v is unique: equal to quadprog's on the de-duplicated rows.
  Gu = G[:3]
  v_ref = quadprog_box(Gu @ Gu.T, Gu @ g, np.zeros(3), np.full(3, np.inf))
  np.testing.assert_allclose(G.T @ np.asarray(v), Gu.T @ v_ref, atol=1e-9)


def test_mask_change_does_not_retrace():
  rng = np.random.default_rng(4)
  P, q = random_problem(rng, T_MAX)
  P, q = P.astype(np.float32), q.astype(np.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def solve(mask):
    return solve_box_qp(P, q, mask=mask)[0]

  for t in range(1, T_MAX + 1):
    v = solve(jnp.arange(T_MAX) < t)
    assert np.all(np.asarray(v)[t:] == 0)


def test_jit_vmap_and_loop_agree(x64):
  rng = np.random.default_rng(5)
  problems = [random_problem(rng, 4) for _ in range(6)]
  Ps = np.stack([p for p, _ in problems])
  qs = np.stack([q for _, q in problems])
  batched, _ = jax.jit(jax.vmap(lambda P, q: solve_box_qp(P, q, 0.1)))(Ps, qs)
  for i, (P, q) in enumerate(problems):
    if i >= 2:  # op by op is slow: the first two suffice
      break
    with jax.disable_jit():
      eager, _ = solve_box_qp(P, q, 0.1)
    np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(eager), rtol=1e-12, atol=1e-14)
  jitted = jax.jit(lambda P, q: solve_box_qp(P, q, 0.1)[0])
  for i, (P, q) in enumerate(problems):
    np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(jitted(P, q)), rtol=1e-12)


def test_implicit_gradient_matches_finite_differences(x64):
  rng = np.random.default_rng(6)
  P, q = random_problem(rng, 5)
  w = rng.standard_normal(5)

  @jax.jit
  def f(args):
    v, _ = solve_box_qp(*args)
    return jnp.sum(jnp.sin(v) * w)

  args = (P, q, np.full(5, 0.2))
  grads = jax.jit(jax.grad(f))(args)
  h = 1e-6
  for k, grad in enumerate(grads):
    flat = args[k].reshape(-1)
    for i in range(flat.size):
      e = np.zeros_like(flat)
      e[i] = h
      plus, minus = list(args), list(args)
      plus[k] = (flat + e).reshape(args[k].shape)
      minus[k] = (flat - e).reshape(args[k].shape)
      fd = (f(tuple(plus)) - f(tuple(minus))) / (2 * h)
      assert float(grad.reshape(-1)[i]) == pytest.approx(float(fd), abs=1e-6)


def test_nonfinite_input_gives_nan_and_not_converged():
  P = np.eye(3, dtype=np.float32)
  q = np.array([-1.0, np.nan, 1.0], np.float32)
  solve = jax.jit(lambda P, q, mask: solve_box_qp(P, q, mask=mask))
  v, info = solve(P, q, np.ones(3, bool))
  assert np.all(np.isnan(np.asarray(v)))
  assert not bool(info.converged)
  # ... unless the non-finite entry is masked out.
  v, info = solve(P, q, np.array([True, False, True]))
  np.testing.assert_allclose(np.asarray(v), [1.0, 0.0, 0.0])
  assert bool(info.converged)


def test_empty_problem():
  v, info = solve_box_qp(np.zeros((0, 0), np.float32), np.zeros((0,), np.float32))
  assert v.shape == (0,)
  assert bool(info.converged)
