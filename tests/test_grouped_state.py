"""cljax.grouped.state: a small jitted fake run against numpy covariances and direct formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.errors import CljaxError
from cljax.grouped.groups import group_sizes, make_groupings
from cljax.grouped.relatedness import (
  relatedness_divergence,
  relatedness_weights,
  transform_relatedness,
)
from cljax.grouped.state import (
  GroupedConfig,
  end_task,
  extra_vector,
  grouped_init,
  hidden_activations,
  max_group_size,
  observe,
)
from cljax.models import make_mlp

T, L, H, G, C, D = 3, 2, 6, 3, 4, 5  # tasks, hidden layers, units, groups, classes, inputs
S_CLUSTER = 4  # the default cap of a cluster group, min(H, 2 ceil(H / G))
STEPS, B, EVERY, N = 5, 2, 2, 12  # steps per task, batch, cov_recompute_every, reservoir
CFG = GroupedConfig(num_groups=G, cov_first_task_buffer=N, cov_recompute_every=EVERY)
MODEL = make_mlp(H, L, C, n_inputs=D)
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, D)))["params"]

obs = jax.jit(observe, static_argnums=1)
end = jax.jit(end_task, static_argnums=1)


def data(seed):
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((T, STEPS, B, D)).astype(np.float32)
  ys = rng.integers(0, C, (T, STEPS, B)).astype(np.int32)
  return xs, ys


TRACES = {}


def make_run(cfg):
  """The engine's shape of use: scan over tasks, scan over steps, observe, end_task."""

  def run(params, xs, ys, key):
    TRACES[cfg] = TRACES.get(cfg, 0) + 1
    state = grouped_init(cfg, T, H, L, C)

    def task(state, inp):
      t, xt, yt = inp

      def step(state, inp):
        j, x, y = inp
        acts, logits = hidden_activations(params, x)
        k = jax.random.fold_in(key, t * STEPS + j)
        state = observe(state, cfg, acts, extra_vector(cfg, y, logits), t, k)
        return state, (state.h, state.since)

      state, hist = jax.lax.scan(step, state, (jnp.arange(STEPS), xt, yt))
      state = end_task(state, cfg, t, params, jax.random.fold_in(key, 999))
      return state, hist

    return jax.lax.scan(task, state, (jnp.arange(T), xs, ys))

  return jax.jit(run)


@functools.cache
def fake_run(cfg, seed=1):
  xs, ys = data(seed)
  state, (h, since) = make_run_cached(cfg)(PARAMS, xs, ys, jax.random.key(seed))
  return xs, ys, state, np.asarray(h), np.asarray(since)


@functools.cache
def make_run_cached(cfg):
  return make_run(cfg)


# ---------------------------------------------------------------------------------------------
# numpy references.


def np_forward(params, x):
  """Post-ReLU hidden activations (L, B, H) and logits, float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  acts = []
  for layer in range(L):
    x = np.maximum(x @ p[f"hidden_{layer}"]["kernel"] + p[f"hidden_{layer}"]["bias"], 0.0)
    acts.append(x)
  return np.stack(acts), x @ p["out"]["kernel"] + p["out"]["bias"]


def np_group_vectors(acts, extra, assign, S):
  out = np.zeros((acts.shape[0], G, S + extra.shape[1]))
  for k in range(G):
    units = np.flatnonzero(assign == k)
    out[:, k, : len(units)] = acts[:, units]
    out[:, k, S:] = extra
  return out


def np_task_cov(x, y, assignments, S=S_CLUSTER, output=False):
  """(L, G, n, n) population covariances of one task's group vectors; x (M, D), y (M,)."""
  acts, logits = np_forward(PARAMS, x.astype(np.float64))
  extra = logits if output else y[:, None].astype(np.float64)
  return np.stack(
    [
      np.stack([np.cov(v, rowvar=False, bias=True) for v in np.swapaxes(vec, 0, 1)])
      for vec in (np_group_vectors(a, extra, g, S) for a, g in zip(acts, assignments, strict=True))
    ]
  )


def divergence_mask(assignments, S=S_CLUSTER, E=1):
  sizes = np.stack([np.bincount(a, minlength=G) for a in assignments])  # (L, G)
  return np.concatenate([np.arange(S) < sizes[..., None], np.ones((L, G, E), bool)], -1)


# ---------------------------------------------------------------------------------------------
# The fake run.


def test_run_compiles_once_keeps_shapes_and_gives_finite_h():
  run = make_run_cached(CFG)
  _, _, state, h, _ = fake_run(CFG)
  xs, ys = data(7)
  state2, _ = run(PARAMS, xs, ys, jax.random.key(7))
  assert TRACES[CFG] == 1
  init = grouped_init(CFG, T, H, L, C)
  for a, b, c in zip(
    jax.tree.leaves(init), jax.tree.leaves(state), jax.tree.leaves(state2), strict=True
  ):
    assert a.shape == b.shape == c.shape and a.dtype == b.dtype == c.dtype
  assert h.shape == (T, STEPS, T, L, G) and np.isfinite(h).all()
  assert bool(state.formed)


def test_groups_are_make_groupings_of_the_params():
  _, _, state, _, _ = fake_run(CFG)
  S = max_group_size(CFG, H)
  want = np.stack(make_groupings(PARAMS, G, method="cluster", max_size=S))
  np.testing.assert_array_equal(state.assignments, want)
  assert S_CLUSTER == S
  assert max(int(np.max(group_sizes(a, G))) for a in want) <= S


def test_reservoir_holds_task0_examples_in_order():
  xs, ys, state, _, _ = fake_run(CFG)
  acts, _ = np_forward(PARAMS, xs[0].reshape(-1, D))
  M = STEPS * B
  assert int(state.buf_seen) == M < N
  np.testing.assert_allclose(state.buf_act[:M], np.swapaxes(acts, 0, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state.buf_extra[:M, 0], ys[0].reshape(-1))
  assert not np.asarray(state.buf_act[M:]).any()


def test_reservoir_sampling_matches_numpy_algorithm_r():
  cfg = GroupedConfig(num_groups=G, cov_first_task_buffer=3)
  state = grouped_init(cfg, T, H, L, C)
  rng = np.random.default_rng(3)
  acts = rng.standard_normal((4, L, B, H)).astype(np.float32)
  extra = rng.standard_normal((4, B, 1)).astype(np.float32)
  ref_a, ref_e, c = np.zeros((3, L, H), np.float32), np.zeros((3, 1), np.float32), 0
  for s in range(4):
    key = jax.random.key(100 + s)
    state = obs(state, cfg, acts[s], extra[s], 0, key)
    for b in range(B):
      j = int(jax.random.randint(jax.random.fold_in(key, c), (), 0, c + 1))
      slot = c if c < 3 else j
      if slot < 3:
        ref_a[slot], ref_e[slot] = acts[s, :, b], extra[s, b]
      c += 1
  assert int(state.buf_seen) == 8 and int(state.since) == 0
  np.testing.assert_array_equal(state.buf_act, ref_a)
  np.testing.assert_array_equal(state.buf_extra, ref_e)


def test_frozen_covariances_match_numpy():
  xs, ys, state, _, _ = fake_run(CFG)
  assign = np.asarray(state.assignments)
  for t in range(T):
    want = np_task_cov(xs[t].reshape(-1, D), ys[t].reshape(-1), assign)
    got = np.asarray(state.past_cov.m2[t] / state.past_cov.count[t][..., None, None])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(state.past_cov.count[t], STEPS * B)
  assert not np.asarray(state.cur_cov.count).any()


def test_recompute_every_k_steps_and_h_matches_direct_formula():
  xs, ys, state, h, since = fake_run(CFG)
  np.testing.assert_array_equal(since[0], 0)
  for t in (1, 2):
    np.testing.assert_array_equal(since[t], (np.arange(STEPS) + 1) % EVERY)
  assert not h[0].any()  # task 0: no past task
  assign = np.asarray(state.assignments)
  mask = divergence_mask(assign)
  past = np.arange(T) < 2
  plain = np.broadcast_to(past[:, None, None], (T, L, G)).astype(np.float32)
  np.testing.assert_array_equal(h[2, 0], plain)  # before the first recompute: plain GEM rows
  covs = [np_task_cov(xs[t].reshape(-1, D), ys[t].reshape(-1), assign) for t in range(T)]
  for j in range(STEPS):
    n = (j + 1) // EVERY * EVERY  # examples of task 2 behind the last recompute, in batches
    if n == 0:
      continue
    cur = np_task_cov(xs[2, :n].reshape(-1, D), ys[2, :n].reshape(-1), assign)
    r = relatedness_divergence(jnp.asarray(cur), jnp.asarray(np.stack(covs)), 1, mask)
    w = relatedness_weights(r, past)
    want = transform_relatedness(w, past, sub_mean=True, margin=0.0)
    np.testing.assert_allclose(h[2, j], want, rtol=1e-3, atol=1e-3)
  assert not np.allclose(h[2, 1], plain, atol=1e-4)  # the recompute did change h
  np.testing.assert_array_equal(h[2, 2], h[2, 1])  # and h stays until the next one


def test_ignore_relatedness_gives_plain_rows():
  cfg = GroupedConfig(
    num_groups=G, cov_first_task_buffer=N, cov_recompute_every=EVERY, ignore_relatedness=True
  )
  h = fake_run(cfg)[3]
  for t in range(T):
    past = np.arange(T) < t
    plain = np.broadcast_to(past[:, None, None], (T, L, G))
    np.testing.assert_array_equal(h[t], np.broadcast_to(plain, h[t].shape))


@pytest.mark.parametrize("grouping", ["random", "unit"])
def test_end_of_task0_groupings(grouping):
  cfg = GroupedConfig(num_groups=H if grouping == "unit" else G, grouping=grouping)
  state = grouped_init(cfg, T, H, L, C)
  key = jax.random.key(5)
  state = end(state, cfg, 0, PARAMS, key)
  want = np.stack(make_groupings(PARAMS, cfg.num_groups, method=grouping, key=key))
  np.testing.assert_array_equal(state.assignments, want)
  S = 1 if grouping == "unit" else 2
  assert state.cur_cov.mean.shape == (L, cfg.num_groups, S + 1)
  np.testing.assert_array_equal(state.h[0], 1.0)
  assert not np.asarray(state.h[1:]).any()


def test_output_covariance_uses_logits():
  cfg = GroupedConfig(num_groups=G, grouping="random", if_output_cov=True)
  state = grouped_init(cfg, T, H, L, C)
  state = end(state, cfg, 0, PARAMS, jax.random.key(2))
  x = np.random.default_rng(4).standard_normal((8, D)).astype(np.float32)
  acts, logits = hidden_activations(PARAMS, x)
  state = obs(state, cfg, list(acts), extra_vector(cfg, None, logits), 1, jax.random.key(0))
  want = np_task_cov(x, None, np.asarray(state.assignments), S=2, output=True)
  got = state.cur_cov.m2 / state.cur_cov.count[..., None, None]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The model and bad input.


def test_hidden_activations_match_the_flax_model():
  x = jax.random.normal(jax.random.key(3), (4, D))
  logits, inter = MODEL.apply({"params": PARAMS}, x, capture_intermediates=True)
  acts, got = hidden_activations(PARAMS, x)
  assert acts.shape == (L, 4, H)
  np.testing.assert_allclose(got, logits, rtol=1e-6, atol=1e-6)
  for layer in range(L):
    pre = inter["intermediates"][f"hidden_{layer}"]["__call__"][0]
    np.testing.assert_allclose(acts[layer], jax.nn.relu(pre), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"grouping": "kmeans"}, "unknown grouping"),
    ({"num_groups": 0}, "num_groups must be"),
    ({"cov_recompute_every": 0}, "cov_recompute_every must be"),
    ({"cov_first_task_buffer": 0}, "cov_first_task_buffer must be"),
    ({"ewc_reverse": 1}, "ewc_reverse must be a bool"),
    ({"margin": float("nan")}, "margin must be finite"),
    ({"grouping": "random", "cluster_iters": 5}, "cluster_iters applies only"),
    ({"grouping": "unit", "cluster_max_size": 5}, "cluster_max_size applies only"),
    ({"cluster_max_size": 0}, "cluster_max_size must be an int >= 1"),
    ({"ignore_relatedness": True, "ewc_reverse": True}, "ewc_reverse has no effect"),
    ({"ignore_relatedness": True, "if_output_cov": True}, "if_output_cov has no effect"),
  ],
)
def test_bad_configs(kwargs, match):
  with pytest.raises(CljaxError, match=match) as err:
    GroupedConfig(**kwargs)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize(
  ("cfg", "match"),
  [
    (GroupedConfig(num_groups=3, grouping="unit"), "grouping 'unit' sets the group count"),
    (GroupedConfig(num_groups=7), "num_groups \\(7\\) exceeds n_hiddens \\(6\\)"),
    (GroupedConfig(num_groups=3, cluster_max_size=1), r"cluster_max_size must be in .* = \[2, 6\]"),
    (GroupedConfig(num_groups=3, cluster_max_size=7), r"cluster_max_size must be in .* = \[2, 6\]"),
  ],
)
def test_bad_sizes(cfg, match):
  with pytest.raises(CljaxError, match=match) as err:
    grouped_init(cfg, T, H, L, C)
  assert "\n" not in str(err.value)


def test_bad_batches():
  state = grouped_init(CFG, T, H, L, C)
  with pytest.raises(CljaxError, match="activations must have shape"):
    observe(state, CFG, jnp.zeros((L, B, H + 1)), jnp.zeros((B, 1)), 0, jax.random.key(0))
  with pytest.raises(CljaxError, match="extra must have shape"):
    observe(state, CFG, jnp.zeros((L, B, H)), jnp.zeros((B,)), 0, jax.random.key(0))
  with pytest.raises(CljaxError, match="hidden layers of 6 units"):
    end_task(
      state,
      CFG,
      0,
      make_mlp(4, L, C, n_inputs=D).init(jax.random.key(0), jnp.zeros((1, D)))["params"],
      jax.random.key(0),
    )
