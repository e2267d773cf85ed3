"""The grouped variants in the engine (cljax.train): identities with their plain parents, one
compile, the settings that change the rows, and bad configurations.

Compared against: the plain variants' runs (gem, agem task_mean, agem_qp_mean), which the grouped
ones must reproduce when every multiplier h is 1 and the biases are counted once.
"""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_trees_close_after

from cljax import tasks
from cljax.errors import CljaxError
from cljax.grouped.state import GroupedConfig
from cljax.rules.registry import GROUPED_VARIANTS
from cljax.train import Config, HParams, make_train

N_TASKS, SAMPLES, TEST, HIDDEN = 3, 100, 200, 20
# Plain rows: h = 1 on every past task and group, each bias once.
PLAIN = dict(ignore_relatedness=True, bias_once=True, cov_first_task_buffer=30)
GROUPED = dict(num_groups=4, cov_recompute_every=10, cov_first_task_buffer=30)


@pytest.fixture(scope="module")
def stream(request):
  return conftest.real_permutation_stream(
    request.getfixturevalue("real_fashion_dir"),
    n_tasks=N_TASKS,
    samples_per_task=SAMPLES,
    test_samples=TEST,
  )


def config(variant, **kw):
  """The run's `conftest.EngineSetup`: the engine's Config and the rule's settings from kw."""
  base = dict(n_hiddens=HIDDEN, n_memories=5, log_every=0, lr=0.05)
  return conftest.EngineSetup(Config(), variant).replace(**{**base, **kw})


_cache = {}


def run(stream, cfg, key=0):
  if (cfg, key) not in _cache:
    _cache[(cfg, key)] = jax.jit(make_train(cfg.config, cfg.rule()))(jax.random.key(key), stream)
  return _cache[(cfg, key)]


STEPS = N_TASKS * SAMPLES  # the trajectories' horizon (batch 1)
GEM_PARENT = dict(variant="gem", memory_strength=0.0)


@pytest.mark.realdata
@pytest.mark.parametrize(
  ("grouped", "parent", "grouping"),
  [  # every variant, and both groupings (with plain rows the grouping changes the path only)
    ("gem_grouped", GEM_PARENT, "random"),
    ("gem_grouped", GEM_PARENT, "cluster"),
    ("agem_grouped", dict(variant="agem", agem_ref="task_mean"), "cluster"),
    # the averaged h of plain rows is 1: the QP's margin
    ("agem_qp_grouped", dict(variant="agem_qp_mean", memory_strength=1.0), "random"),
  ],
)
def test_plain_rows_reproduce_the_parent_variant(stream, grouped, parent, grouping):
  num_groups = 4
  want = run(stream, config(**parent))
  got = run(
    stream,
    config(grouped, grouped=GroupedConfig(num_groups=num_groups, grouping=grouping, **PLAIN)),
  )
  # Two programs (grouped rows vs plain ones): rounding bounded over STEPS steps; the same
  # projections (exactly) say no decision flipped within that horizon.
  assert_trees_close_after(got.params, want.params, STEPS)
  np.testing.assert_allclose(got.acc, want.acc, atol=0.006)  # at most one test example of 200
  c, w = jax.tree.map(np.asarray, (got.counters, want.counters))
  np.testing.assert_array_equal(c["projections"], w["projections"])
  assert np.all(c["projections"][1:] > 0)  # the test exercises projections


@pytest.mark.realdata
def test_bias_quirk_changes_the_rows(stream):
  """The research code's rows carry each next layer's whole bias once per group: another run."""
  once = run(stream, config("gem_grouped", grouped=GroupedConfig(grouping="random", **PLAIN)))
  quirk = dict(PLAIN, bias_once=False)
  every = run(stream, config("gem_grouped", grouped=GroupedConfig(grouping="random", **quirk)))
  assert not np.allclose(once.params["out"]["bias"], every.params["out"]["bias"], atol=1e-4)


@pytest.mark.realdata
@pytest.mark.parametrize("variant", GROUPED_VARIANTS)
def test_relatedness_reweights_the_rows_and_stays_finite(stream, variant):
  weighted = run(stream, config(variant, grouped=GroupedConfig(**GROUPED)))
  plain = run(stream, config(variant, grouped=GroupedConfig(**GROUPED, ignore_relatedness=True)))
  assert np.all(np.asarray(weighted.finite))
  assert np.all(np.isfinite(np.asarray(weighted.acc)))  # learning: test_train's every-variant test
  leaves = zip(jax.tree.leaves(weighted.params), jax.tree.leaves(plain.params), strict=True)
  assert any(not np.allclose(a, b, atol=1e-4) for a, b in leaves)
  c = jax.tree.map(np.asarray, weighted.counters)
  assert c["projections"][0] == 0 and np.all(c["projections"][1:] > 0)
  if variant != "agem_grouped":  # the QP rules report the QP's counters; a closed form has none
    assert np.all(c["qp_failures"] == 0)
  else:
    assert "qp_failures" not in c
  # h in use at each task's end: zero for tasks not yet past, 1 with a single past task (the
  # softmax over one task is 1), and mean 1 over the past tasks of every non-empty group
  h = np.asarray(weighted.h)
  assert h.shape == (N_TASKS, N_TASKS, 2, GROUPED["num_groups"]) and np.isfinite(h).all()
  assert not h[0].any() and not h[1, 1:].any() and not h[2, 2:].any()
  valid = h[1, 0] != 0
  np.testing.assert_array_equal(h[1, 0][valid], 1.0)
  np.testing.assert_allclose(h[2, :2].mean(0)[valid], 1.0, rtol=1e-5)
  assert not np.allclose(h[2, :2][:, valid], 1.0)  # the relatedness moved them
  assert run(stream, config("gem", memory_strength=0.0)).h is None


@pytest.mark.realdata
@pytest.mark.parametrize(
  "grouped",
  [
    dict(grouping="unit", num_groups=HIDDEN),  # one unit per group: 2 x 2 covariances
    dict(GROUPED, if_output_cov=True, ewc_reverse=True, margin=0.5, sub_mean=False),
    dict(GROUPED, cluster_max_size=HIDDEN),  # uncapped: S = H
  ],
)
def test_other_settings_run_finite(stream, grouped):
  result = run(stream, config("gem_grouped", grouped=GroupedConfig(**grouped)))
  assert np.all(np.asarray(result.finite)) and np.all(np.isfinite(np.asarray(result.acc)))


@pytest.mark.realdata
def test_one_hidden_layer(stream):
  """One hidden layer: the rest row is hidden_0, one row per group of its units, as out reads."""
  cfg = config("gem_grouped", n_layers=1, grouped=GroupedConfig(**GROUPED))
  result = run(stream, cfg)
  assert np.all(np.asarray(result.finite)) and np.all(np.isfinite(np.asarray(result.acc)))
  plain = config("gem_grouped", n_layers=1, grouped=GroupedConfig(grouping="random", **PLAIN))
  want = run(stream, config("gem", n_layers=1, memory_strength=0.0))
  got = run(stream, plain)
  assert_trees_close_after(got.params, want.params, STEPS)  # two programs, STEPS steps
  np.testing.assert_array_equal(got.counters["projections"], want.counters["projections"])


@pytest.mark.realdata
def test_one_compile_for_seeds_and_hyper_parameters(stream):
  cfg = config("gem_grouped", grouped=GroupedConfig(**GROUPED))
  traces = []

  def counted(key, hp):
    traces.append(1)
    return make_train(cfg.config, cfg.rule())(key, stream, hp).acc

  f = jax.jit(counted)
  a = f(jax.random.key(0), HParams(jnp.float32(0.05), jnp.float32(0.0)))
  b = f(jax.random.key(1), HParams(jnp.float32(0.02), jnp.float32(0.0)))
  assert len(traces) == 1 and not np.array_equal(a, b)
  np.testing.assert_array_equal(a, run(stream, cfg).acc)  # same seed, same result


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(variant="gem", grouped=GroupedConfig(num_groups=5)), "gem does not read grouped"),
    (dict(variant="gem_grouped", memory_grads="explicit"), "memory_grads 'factored'"),
    (dict(variant="gem_grouped", grouped=GroupedConfig(num_groups=21)), r"exceeds n_hiddens"),
    (
      dict(variant="agem_grouped", grouped=GroupedConfig(grouping="unit", num_groups=5)),
      "sets the group",
    ),
    (
      dict(variant="gem_grouped", grouped=GroupedConfig(num_groups=4, cluster_max_size=2)),
      r"= \[5, 20\]",
    ),
    (dict(variant="gem_grouped", grouped={"num_groups": 4}), "must be a cljax.grouped.state"),
  ],
)
def test_bad_settings_are_one_line(small_dataset, kwargs, match):
  # Refused when the rule is made (its settings) or traced (against the network it is given).
  small = tasks.make_stream(small_dataset, protocol="permutations", n_tasks=2, samples_per_task=4)
  with pytest.raises(CljaxError, match=match) as err:
    cfg = config(**kwargs)
    jax.jit(make_train(cfg.config, cfg.rule())).lower(jax.random.key(0), small)
  assert "\n" not in str(err.value)
