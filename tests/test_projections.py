"""cljax.projections against the seed's project2cone2 (numpy + quadprog) and the closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quadprog
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.errors import CljaxError
from cljax.projections import (
  agem_project,
  gem_dual,
  gem_project,
  project_orthogonal,
  ravel,
  ravel_rows,
  tree_vdot,
  unravel_rows,
)

T_MAX, DIM = 5, 12


def project2cone2(gradient, memories, margin=0.5, eps=1e-3):
  """GEM's reference (official code, with the eps ridge): memories (t, p), gradient (p,)."""
  M = np.asarray(memories, np.float64)
  g = np.asarray(gradient, np.float64)
  t = M.shape[0]
  P = M @ M.T
  P = 0.5 * (P + P.T) + np.eye(t) * eps
  q = M @ g * -1
  v = quadprog.solve_qp(P, q, np.eye(t), np.zeros(t) + margin)[0]
  return v @ M + g


def conflicting(rng, t, p=DIM):
  G = rng.standard_normal((t, p))
  g = -G[: max(1, t // 2)].mean(0) + 0.5 * rng.standard_normal(p)
  return g, G


def tree_of(flat):
  """A params-like pytree of a flat (..., 12) array: {'w': (..., 3, 2), 'b': (..., 6)}."""
  lead = flat.shape[:-1]
  return {"w": flat[..., :6].reshape(*lead, 3, 2), "b": flat[..., 6:]}


_gem64 = jax.jit(
  lambda g, G, mask, margin: gem_project(g, G, margin=margin, mask=mask, eps=1e-3)[0]
)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, T_MAX), margin=st.sampled_from([0.0, 0.5]))
def test_gem_project_matches_project2cone2(seed, t, margin):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    g, G = conflicting(rng, t)
    if not np.any(G @ g < 0):
      return  # GEM only projects on a conflict; the no-conflict case is tested below
    ref = project2cone2(g, G, margin=margin)
    Gp = np.full((T_MAX, DIM), np.nan)  # unused slots hold garbage
    Gp[:t] = G
    out = _gem64(g, Gp, np.arange(T_MAX) < t, margin)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-8 * np.abs(g).max())


@pytest.mark.parametrize("seed", range(3))
def test_gem_project_float32_against_float64_reference(seed):
  rng = np.random.default_rng(seed)
  g, G = conflicting(rng, 9, p=2000)
  g, G = (0.01 * g).astype(np.float32), (0.01 * G).astype(np.float32)
  out, info = jax.jit(lambda g, G: gem_project(g, G, margin=0.5))(g, G)
  assert out.dtype == jnp.float32
  ref = project2cone2(g, G, margin=0.5)
  rel = np.abs(np.asarray(out) - ref).max() / np.abs(g).max()
  assert rel <= 1e-4
  assert bool(info.projected) and bool(info.qp.converged)


def test_pytree_and_flat_inputs_agree():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    g, G = conflicting(rng, 4)
    flat, info_flat = gem_project(g, G, margin=0.5)
    tree, info_tree = gem_project(tree_of(g), tree_of(G), margin=0.5)
    np.testing.assert_allclose(np.asarray(ravel(tree)[0]), np.asarray(ravel(tree_of(flat))[0]))
    assert bool(info_flat.projected) and bool(info_tree.projected)
    rows = ravel_rows(tree_of(G))
    assert rows.shape == (4, DIM)
    back = unravel_rows(rows, tree_of(g))
    chex.assert_trees_all_close(back, tree_of(jnp.asarray(G)))


def test_no_conflict_returns_g_exactly():
  rng = np.random.default_rng(1)
  G = rng.standard_normal((3, DIM)).astype(np.float32)
  g = G.sum(0) * 10  # <g, row> > 0 for these rows with overwhelming probability
  assert np.all(G @ g > 0)
  for margin in (0.0, 10.0):
    out, info = gem_project(g, G, margin=margin)
    np.testing.assert_array_equal(np.asarray(out), g)
    assert not bool(info.violated) and not bool(info.projected)
  # With only_if_violated=False the margin moves g along the memory gradients (seed way 3).
  out, _ = gem_project(g, G, margin=10.0, only_if_violated=False)
  assert np.all(G @ (np.asarray(out) - g) > 0)
  out, _ = gem_project(g, G, margin=0.0, only_if_violated=False)
  np.testing.assert_array_equal(np.asarray(out), g)


@pytest.mark.parametrize("tree", [False, True])
def test_agem_closed_form_equals_one_row_qp(tree):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    for _ in range(5):
      g, m = rng.standard_normal(DIM), rng.standard_normal(DIM)
      if g @ m >= 0:
        m = -m
      closed = agem_project(tree_of(g) if tree else g, tree_of(m) if tree else m)
      qp, info = gem_project(
        tree_of(g) if tree else g, tree_of(m[None]) if tree else m[None], margin=0.0, eps=0.0
      )
      assert bool(info.projected)
      chex.assert_trees_all_close(closed, qp, atol=1e-10)
      expected = g - (g @ m) / (m @ m) * m
      want = ravel(tree_of(expected) if tree else expected)[0]
      np.testing.assert_allclose(np.asarray(ravel(closed)[0]), np.asarray(want))


def test_agem_is_conditional_and_orthogonal_is_not():
  rng = np.random.default_rng(3)
  g = rng.standard_normal(DIM).astype(np.float32)
  m = g + 0.1 * rng.standard_normal(DIM).astype(np.float32)  # <g, m> > 0: no conflict
  np.testing.assert_array_equal(np.asarray(agem_project(g, m)), g)
  out = np.asarray(project_orthogonal(g, m))
  assert abs(out @ m) <= 1e-5 * np.linalg.norm(g) * np.linalg.norm(m)
  assert np.linalg.norm(out - g) > 0.1
  # With a conflict, both agree.
  np.testing.assert_allclose(agem_project(g, -m), project_orthogonal(g, -m), rtol=1e-6)


@pytest.mark.parametrize("fn", [agem_project, project_orthogonal])
def test_zero_reference_returns_g_with_finite_gradients(fn):
  g = jnp.arange(1.0, 5.0)
  zero = jnp.zeros(4)
  np.testing.assert_array_equal(np.asarray(fn(g, zero)), np.asarray(g))
  grads = jax.grad(lambda g, r: jnp.sum(fn(g, r) ** 2), argnums=(0, 1))(g, zero)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in grads)


def test_zero_and_duplicate_rows_stay_finite():
  rng = np.random.default_rng(4)
  g, G = conflicting(rng, 6)
  G[2] = 0.0
  G[4] = G[0]
  g, G = g.astype(np.float32), G.astype(np.float32)
  for eps in (0.0, 1e-3):
    out, info = gem_project(g, G, margin=0.0, eps=eps)
    assert np.all(np.isfinite(np.asarray(out)))
    assert bool(info.qp.converged)
    assert np.all(G @ np.asarray(out) >= -1e-3 * np.abs(g).max())


@pytest.mark.parametrize("where", ["g", "G", "g_ref"])
def test_nonfinite_input_gives_all_nan(where):
  g = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
  G = np.array([[-1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
  if where == "g":
    g[3] = np.nan
  else:
    G[1, 2] = np.inf
  if where == "g_ref":
    assert np.all(np.isnan(np.asarray(agem_project(g, G[1]))))
    assert np.all(np.isnan(np.asarray(project_orthogonal(g, G[1]))))
    return
  out, info = gem_project(g, G)
  assert np.all(np.isnan(np.asarray(out)))
  assert bool(info.violated) and not bool(info.qp.converged)
  if where == "g":
    assert np.all(np.isnan(np.asarray(agem_project(g, G[0]))))


def test_nonfinite_garbage_in_masked_rows_is_ignored():
  g = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
  G = np.array([[-1.0, 0.0, 0.0, 1.0], [np.nan, np.inf, 0.0, 0.0]], np.float32)
  out, info = gem_project(g, G, mask=np.array([True, False]))
  ref = project2cone2(g, G[:1], margin=0.0)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  assert bool(info.qp.converged)


def test_zero_rows_returns_g():
  g = {"w": jnp.ones((3, 2)), "b": jnp.ones(6)}
  G = jax.tree.map(lambda x: jnp.zeros((0, *x.shape)), g)
  out, info = gem_project(g, G, margin=1.0)
  chex.assert_trees_all_equal(out, g)
  assert not bool(info.projected)


def test_bad_input_errors():
  g = np.zeros(4, np.float32)
  G = np.zeros((2, 4), np.float32)
  with pytest.raises(CljaxError, match=r"margin.*>= 0"):
    gem_project(g, G, margin=-1.0)
  with pytest.raises(CljaxError, match=r"eps must be >= 0"):
    gem_project(g, G, eps=-1e-3)
  with pytest.raises(CljaxError, match=r"\(4,\).*\(2, 5\)"):
    gem_project(g, np.zeros((2, 5)))
  with pytest.raises(CljaxError, match=r"\(4,\).*\(5,\)"):
    agem_project(g, np.zeros(5))
  with pytest.raises(CljaxError, match=r"structure"):
    gem_project({"a": g}, {"b": G})
  with pytest.raises(CljaxError, match=r"mask must have shape \(t,\) = \(2,\)"):
    gem_project(g, G, mask=np.ones(3, bool))
  with pytest.raises(CljaxError, match=r"gem_dual needs P \(t, t\) and q \(t,\): got P \(2, 3\)"):
    gem_dual(np.eye(2, 3), np.zeros(2))
  with pytest.raises(CljaxError, match=r"margin.*>= 0"):
    gem_dual(np.eye(2), np.zeros(2), margin=-0.5)


def test_trigger_decides_instead_of_gems_own_check():
  # The seed's way 3: one averaged row, applied when a per-task check (computed elsewhere) fires.
  rng = np.random.default_rng(2)
  G = rng.standard_normal((1, DIM)).astype(np.float32)
  g = (-G[0] + 0.1 * rng.standard_normal(DIM)).astype(np.float32)  # conflicts with the row
  out, info = gem_project(g, G, margin=0.5, trigger=False)
  np.testing.assert_array_equal(np.asarray(out), g)
  assert bool(info.violated) and not bool(info.projected)
  g_free = (
    -g
  )  # no conflict, but the trigger fires: the QP is applied as with only_if_violated=False
  fired = jax.jit(lambda g, c: gem_project(g, G, margin=0.5, trigger=c))
  out, info = fired(g_free, jnp.bool_(True))
  ref, _ = gem_project(g_free, G, margin=0.5, only_if_violated=False)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)
  assert bool(info.projected) and not bool(info.violated)


def test_tree_vdot_sums_over_leaves():
  a = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
  b = {"w": np.full((2, 3), 2.0, np.float32), "b": np.array([3.0, -1.0], np.float32)}
  assert float(tree_vdot(a, b)) == 2 * 15 + 2


def test_traced_margin_is_accepted_for_sweeps():
  rng = np.random.default_rng(5)
  g, G = conflicting(rng, 3)
  margins = jnp.array([0.0, 0.5, 2.0])
  outs = jax.vmap(lambda m: gem_project(g, G, margin=m)[0])(margins)
  for i, m in enumerate([0.0, 0.5, 2.0]):
    np.testing.assert_allclose(outs[i], project2cone2(g, G, margin=m), atol=1e-4)


def test_jit_vmap_loop_and_scan_agree():
  rng = np.random.default_rng(6)
  gs = np.stack([conflicting(rng, 3)[0] for _ in range(4)]).astype(np.float32)
  G = rng.standard_normal((3, DIM)).astype(np.float32)

  def one(g):
    return gem_project(g, G, margin=0.5)[0]

  batched = jax.jit(jax.vmap(one))(gs)
  scanned = jax.lax.scan(lambda c, g: (c, one(g)), None, gs)[1]
  for i in range(len(gs)):
    np.testing.assert_allclose(batched[i], one(gs[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scanned[i], jax.jit(one)(gs[i]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    jax.vmap(agem_project, in_axes=(0, None))(gs, G[0]),
    np.stack([agem_project(g, G[0]) for g in gs]),
    rtol=1e-6,
  )


def test_mask_change_does_not_retrace():
  rng = np.random.default_rng(7)
  g, G = conflicting(rng, T_MAX)
  g, G = g.astype(np.float32), G.astype(np.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def project(mask):
    return gem_project(g, G, margin=0.5, mask=mask)[0]

  for t in range(T_MAX + 1):
    out = project(jnp.arange(T_MAX) < t)
    if t == 0:
      np.testing.assert_array_equal(np.asarray(out), g)


def test_grad_through_gem_project_matches_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(8)
    g, G = conflicting(rng, 4)
    w = rng.standard_normal(DIM)

    @jax.jit
    def f(g, G):
      return jnp.sum(jnp.sin(gem_project(g, G, margin=0.3)[0]) * w)

    dg, dG = jax.jit(jax.grad(f, argnums=(0, 1)))(g, G)
    h = 1e-6
    for i in range(DIM):
      e = np.eye(DIM)[i] * h
      assert float(dg[i]) == pytest.approx(float((f(g + e, G) - f(g - e, G)) / (2 * h)), abs=1e-6)
    E = np.zeros_like(G)
    E[1, 3] = h
    assert float(dG[1, 3]) == pytest.approx(float((f(g, G + E) - f(g, G - E)) / (2 * h)), abs=1e-6)
