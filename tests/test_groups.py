"""cljax.grouped.groups: groupings, and the per-parameter weights against the dense group rows."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from cljax.errors import CljaxError
from cljax.grouped.groups import (
  cluster_groups,
  dense_group_rows,
  group_param_weights,
  group_sizes,
  hidden_unit_weights,
  make_groupings,
  random_groups,
  unit_groups,
)
from cljax.models import make_mlp

# Jitted once per shape: eager fori_loops retrace their bodies on every call.
cluster = jax.jit(cluster_groups, static_argnums=(1, 2))


def mlp_params(sizes, seed=0, dtype=np.float32):
  """A cljax-MLP-shaped params dict for layer sizes, e.g. (12, 6, 5, 3): 2 hidden layers."""
  rng = np.random.default_rng(seed)
  names = [f"hidden_{i}" for i in range(len(sizes) - 2)] + ["out"]
  return {
    name: {
      "kernel": rng.standard_normal((n_in, n_out)).astype(dtype),
      "bias": rng.standard_normal(n_out).astype(dtype),
    }
    for name, n_in, n_out in zip(names, sizes[:-1], sizes[1:], strict=True)
  }


def same_partition(a, b):
  """True when two assignments group the units the same way (labels may differ)."""
  a, b = np.asarray(a), np.asarray(b)
  return all((a[i] == a[j]) == (b[i] == b[j]) for i, j in itertools.combinations(range(len(a)), 2))


# ---------------------------------------------------------------------------------------------
# Groupings.


@pytest.mark.parametrize(("n_units", "num_groups"), [(10, 3), (7, 7), (5, 1), (100, 20)])
def test_random_groups_balanced_partition_deterministic_per_key(n_units, num_groups):
  key = jax.random.key(3)
  a = random_groups(key, n_units, num_groups)
  assert a.shape == (n_units,) and a.dtype == jnp.int32
  sizes = np.asarray(group_sizes(a, num_groups))
  assert sizes.sum() == n_units
  assert sizes.min() == n_units // num_groups and sizes.max() == -(-n_units // num_groups)
  np.testing.assert_array_equal(a, random_groups(key, n_units, num_groups))
  np.testing.assert_array_equal(
    a, jax.jit(random_groups, static_argnums=(1, 2))(key, n_units, num_groups)
  )


def test_random_groups_depend_on_the_key():
  a = random_groups(jax.random.key(0), 30, 5)
  b = random_groups(jax.random.key(1), 30, 5)
  assert not same_partition(a, b)


def test_unit_groups():
  a = unit_groups(6)
  np.testing.assert_array_equal(a, np.arange(6))
  assert a.dtype == jnp.int32
  np.testing.assert_array_equal(group_sizes(a, 6), 1)


def test_cluster_groups_recovers_well_separated_clusters():
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((4, 8)) * 10
  truth = np.repeat(np.arange(4), [7, 3, 5, 1])
  perm = rng.permutation(len(truth))
  truth = truth[perm]
  x = centres[truth] + 0.05 * rng.standard_normal((len(truth), 8))
  a = cluster_groups(x.astype(np.float32), 4, iters=10)
  assert a.dtype == jnp.int32 and a.shape == (16,)
  assert same_partition(a, truth)
  np.testing.assert_array_equal(a, cluster(x.astype(np.float32), 4, 10))
  np.testing.assert_array_equal(a, cluster(x.astype(np.float32), 4, 10))


def test_cluster_groups_cover_all_units_and_handle_degenerate_input():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((12, 5)).astype(np.float32)
  for g in (1, 3, 12):
    a = np.asarray(cluster(x, g, 5))
    assert a.min() >= 0 and a.max() < g and a.shape == (12,)
    assert np.sum(group_sizes(a, g)) == 12
  # one unit per group when G = H and all vectors differ
  assert sorted(np.asarray(cluster(x, 12, 5))) == list(range(12))
  # only 2 distinct vectors: duplicates share a group, the other groups stay empty
  dup = np.repeat(x[:2], 5, axis=0)
  a = np.asarray(cluster(dup, 4, 5))
  assert same_partition(a, np.repeat([0, 1], 5))
  # non-finite weights are treated as 0, never NaN groups
  bad = x.copy()
  bad[0, 0] = np.nan
  a = np.asarray(cluster(bad, 3, 3))
  assert a.min() >= 0 and a.max() < 3


def capped_numpy(d, cap):
  """Reference: (unit, centre) pairs by increasing distance, kept while the unit is unplaced and
  the group has room (ties: lower unit, then lower centre)."""
  n, g = d.shape
  assign, counts = -np.ones(n, int), np.zeros(g, int)
  for flat in sorted(range(n * g), key=lambda f: (d.reshape(-1)[f], f)):
    unit, group = divmod(flat, g)
    if assign[unit] < 0 and counts[group] < cap:
      assign[unit] = group
      counts[group] += 1
  return assign


def test_cluster_groups_cap_bounds_group_sizes_and_matches_greedy_reference():
  rng = np.random.default_rng(3)
  centres = rng.standard_normal((3, 6)) * 10
  truth = np.repeat(np.arange(3), [10, 4, 4])  # one cluster of 10 units
  x = (centres[truth] + 0.1 * rng.standard_normal((18, 6))).astype(np.float32)
  free = np.asarray(cluster_groups(x, 3, 10))
  assert same_partition(free, truth)  # without a cap: the big cluster stays whole
  capped = np.asarray(jax.jit(cluster_groups, static_argnums=(1, 2, 3))(x, 3, 10, 6))
  assert np.asarray(group_sizes(capped, 3)).max() <= 6
  assert np.sum(group_sizes(capped, 3)) == 18
  # the same centres, the greedy rule in numpy (final Lloyd centres = cluster means here)
  means = np.stack([x[free == k].mean(0) for k in range(3)])
  d = ((x[:, None, :] - means[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(capped, capped_numpy(d, 6))
  # a cap >= every cluster's size changes nothing
  np.testing.assert_array_equal(cluster_groups(x, 3, 10, max_size=10), free)


@pytest.mark.parametrize(
  ("call", "match"),
  [
    (lambda: cluster_groups(np.zeros((10, 2)), 3, max_size=3), r"\[4, 10\]"),
    (lambda: cluster_groups(np.zeros((10, 2)), 3, max_size=11), "max_size"),
    (lambda: cluster_groups(np.zeros((10, 2)), 3, max_size=4.0), "max_size"),
    (lambda: random_groups(jax.random.key(0), 4, 5), "exceeds"),
    (lambda: random_groups(jax.random.key(0), 4, 0), "num_groups must be an int >= 1"),
    (lambda: random_groups(jax.random.key(0), 0, 1), "n_units"),
    (lambda: random_groups(jax.random.key(0), 4, 2.0), "num_groups"),
    (lambda: unit_groups(0), "n_units"),
    (lambda: cluster_groups(np.zeros((3, 2)), 4), "exceeds"),
    (lambda: cluster_groups(np.zeros((3, 2)), 0), "num_groups"),
    (lambda: cluster_groups(np.zeros(3), 1), "unit_weights"),
    (lambda: cluster_groups(np.zeros((3, 2)), 2, iters=-1), "iters"),
    (lambda: group_sizes(np.zeros((2, 2), int), 2), "assignment"),
  ],
)
def test_grouping_bad_input(call, match):
  with pytest.raises(CljaxError, match=match):
    call()


def test_make_groupings_for_every_hidden_layer():
  params = mlp_params((12, 6, 5, 3))
  units = hidden_unit_weights(params)
  assert [u.shape for u in units] == [(6, 13), (5, 7)]
  np.testing.assert_array_equal(units[1][:, :6], params["hidden_1"]["kernel"].T)
  np.testing.assert_array_equal(units[1][:, 6], params["hidden_1"]["bias"])
  for method in ("random", "cluster"):
    groupings = make_groupings(params, 3, method=method, key=jax.random.key(0), iters=3)
    assert [g.shape for g in groupings] == [(6,), (5,)]
    assert all(int(g.max()) < 3 for g in groupings)
  assert [g.shape for g in make_groupings(params, 6, method="unit")] == [(6,), (5,)]
  with pytest.raises(CljaxError, match="method"):
    make_groupings(params, 3, method="kmeans")
  with pytest.raises(CljaxError, match="key"):
    make_groupings(params, 3, method="random")
  with pytest.raises(CljaxError, match="num_groups must be 6"):
    make_groupings(params, 3, method="unit")


# ---------------------------------------------------------------------------------------------
# Constraint-row weights against the dense rows.

SIZES = (12, 6, 5, 3)
G = 3
ASSIGNMENTS = [
  np.array([0, 1, 2, 0, 1, 2], np.int32),
  np.array([1, 0, 1, 1, 0], np.int32),  # group 2 of hidden_1 is empty
]


def weighted_row(g, assignments, h, bias_once):
  w = group_param_weights(g, assignments, h, bias_once=bias_once)
  return ravel_pytree(jax.tree.map(lambda a, b: a * b, g, w))[0]


@pytest.mark.parametrize("bias_once", [False, True])
def test_weighted_gradient_equals_dense_rows_combination(bias_once):
  with jax.enable_x64(True):
    g = mlp_params(SIZES, seed=1, dtype=np.float64)
    rows = np.asarray(dense_group_rows(g, ASSIGNMENTS, G, bias_once=bias_once))
    p = ravel_pytree(g)[0].size
    assert rows.shape == (1 + 2 * G, p)
    assert not rows[1 + G + 2].any()  # the empty group's row is zero
    h = np.random.default_rng(2).standard_normal((2, G))
    want = rows[0] + h.reshape(-1) @ rows[1:]
    got = jax.jit(lambda g, h: weighted_row(g, ASSIGNMENTS, h, bias_once))(g, h)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the rows partition g once biases are counted once
    if bias_once:
      np.testing.assert_allclose(rows.sum(0), ravel_pytree(g)[0], rtol=1e-12)


def test_weights_per_parameter_match_the_formula():
  params = mlp_params(SIZES)
  h = np.arange(6, dtype=np.float32).reshape(2, G) + 1.0  # [[1, 2, 3], [4, 5, 6]]
  w = group_param_weights(params, ASSIGNMENTS, h)
  np.testing.assert_array_equal(w["hidden_0"]["kernel"], 1.0)
  np.testing.assert_array_equal(w["hidden_0"]["bias"], 1.0)
  np.testing.assert_array_equal(w["hidden_1"]["kernel"][:, 0], [1, 2, 3, 1, 2, 3])
  np.testing.assert_array_equal(w["hidden_1"]["bias"], 1 + 2 + 3)
  np.testing.assert_array_equal(w["out"]["kernel"][:, 2], [5, 4, 5, 5, 4])
  np.testing.assert_array_equal(w["out"]["bias"], 4 + 5)  # group 2 is empty: not counted
  once = group_param_weights(params, ASSIGNMENTS, h, bias_once=True)
  np.testing.assert_array_equal(once["out"]["bias"], 1.0)
  assert jax.tree.structure(w) == jax.tree.structure(params)
  shapes = jax.tree.map(np.shape, params)
  assert jax.tree.map(np.shape, w) == shapes


def test_all_ones_with_bias_once_is_plain_gem():
  params = mlp_params(SIZES)
  w = group_param_weights(params, ASSIGNMENTS, np.ones((2, G), np.float32), bias_once=True)
  for leaf in jax.tree.leaves(w):
    np.testing.assert_array_equal(leaf, 1.0)
  # the quirk counts the bias once per non-empty group
  quirk = group_param_weights(params, ASSIGNMENTS, np.ones((2, G), np.float32))
  np.testing.assert_array_equal(quirk["hidden_1"]["bias"], 3.0)
  np.testing.assert_array_equal(quirk["out"]["bias"], 2.0)


def test_weights_vmap_over_past_tasks_with_traced_assignments():
  g = mlp_params(SIZES, seed=3)
  hs = np.random.default_rng(4).random((4, 2, G)).astype(np.float32)

  @jax.jit
  def rows_of(g, assignments, hs):
    return jax.vmap(lambda h: weighted_row(g, assignments, h, False))(hs)

  got = rows_of(g, ASSIGNMENTS, hs)
  dense = np.asarray(dense_group_rows(g, ASSIGNMENTS, G))
  for t in range(4):
    np.testing.assert_allclose(got[t], dense[0] + hs[t].reshape(-1) @ dense[1:], rtol=1e-5)


def test_one_hidden_layer_mlp():
  model = make_mlp(6, 1, 3, n_inputs=12)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]
  grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, jnp.ones((2, 12))) ** 2))(params)
  assignment = [random_groups(jax.random.key(1), 6, 2)]
  for bias_once in (False, True):
    rows = np.asarray(dense_group_rows(grad, assignment, 2, bias_once=bias_once))
    assert rows.shape == (3, ravel_pytree(grad)[0].size)
    h = np.array([[0.5, 2.0]], np.float32)
    np.testing.assert_allclose(
      weighted_row(grad, assignment, h, bias_once), rows[0] + h[0] @ rows[1:], rtol=1e-5, atol=1e-6
    )


def test_dense_rows_refuse_a_too_large_problem():
  params = mlp_params(SIZES)
  p = ravel_pytree(params)[0].size
  need = (1 + 2 * G) * p * 4
  dense_group_rows(params, ASSIGNMENTS, G, max_bytes=need)
  with pytest.raises(CljaxError, match="max_bytes"):
    dense_group_rows(params, ASSIGNMENTS, G, max_bytes=need - 1)
  # the default MLP with one group per unit: 201 rows x 89,610 floats, about 72 MB
  big = jax.eval_shape(lambda: mlp_params((784, 100, 100, 10)))
  units = [np.arange(100, dtype=np.int32)] * 2
  with pytest.raises(CljaxError, match="group_param_weights"):
    dense_group_rows(big, units, 100, max_bytes=2**20)


def bad_params():
  good = mlp_params(SIZES)
  no_out = {k: v for k, v in good.items() if k != "out"}
  no_hidden = {"out": good["out"]}
  gap = {"hidden_0": good["hidden_0"], "hidden_2": good["hidden_1"], "out": good["out"]}
  extra_leaf = {**good, "out": {**good["out"], "scale": np.ones(3)}}
  wrong_chain = {**good, "out": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}
  bad_bias = {**good, "out": {"kernel": np.zeros((5, 3)), "bias": np.zeros(4)}}
  return [
    ({"params": good}, "variables"),
    (no_out, "cljax MLP"),
    (no_hidden, "cljax MLP"),
    (gap, "cljax MLP"),
    (extra_leaf, "exactly 'kernel' and 'bias'"),
    (wrong_chain, "reads 4 inputs"),
    (bad_bias, "bias"),
    ([np.zeros(3)], "params dict"),
  ]


@pytest.mark.parametrize(("params", "match"), bad_params())
def test_weights_refuse_non_mlp_params(params, match):
  with pytest.raises(CljaxError, match=match):
    group_param_weights(params, ASSIGNMENTS, np.ones((2, G)))
  with pytest.raises(CljaxError, match=match):
    dense_group_rows(params, ASSIGNMENTS, G)


@pytest.mark.parametrize(
  ("assignments", "h", "match"),
  [
    (ASSIGNMENTS[:1], np.ones((2, G)), "one"),
    (np.stack([ASSIGNMENTS[0], ASSIGNMENTS[0]]), np.ones((2, G)), "list"),
    ([ASSIGNMENTS[0], ASSIGNMENTS[0]], np.ones((2, G)), r"shape \(5,\)"),
    ([ASSIGNMENTS[0], np.array([0, 1, 3, 0, 1])], np.ones((2, G)), r"in \[0, 3\)"),
    ([ASSIGNMENTS[0], ASSIGNMENTS[1].astype(np.float32)], np.ones((2, G)), "int array"),
    (ASSIGNMENTS, np.ones((3, G)), r"h must have shape \(L, G\)"),
    (ASSIGNMENTS, np.ones(G), r"h must have shape \(L, G\)"),
  ],
)
def test_weights_bad_assignments_or_h(assignments, h, match):
  with pytest.raises(CljaxError, match=match):
    group_param_weights(mlp_params(SIZES), assignments, h)


def test_out_of_range_assignments_under_jit_get_weight_zero_in_both_constructions():
  g = mlp_params(SIZES, seed=5)
  bad = [ASSIGNMENTS[0], np.array([1, 0, 7, 1, -1], np.int32)]  # units 2, 4: in no group
  h = np.random.default_rng(6).random((2, G)).astype(np.float32)
  got = jax.jit(lambda g, a, h: weighted_row(g, a, h, False))(g, bad, h)
  dense = jax.jit(lambda g, a: dense_group_rows(g, a, G))(g, bad)
  np.testing.assert_allclose(got, dense[0] + h.reshape(-1) @ dense[1:], rtol=1e-5)
  w = jax.jit(lambda a: group_param_weights(g, a, h))(bad)
  np.testing.assert_array_equal(w["out"]["kernel"][2], 0.0)
  np.testing.assert_array_equal(w["out"]["kernel"][4], 0.0)
