"""Rules as pluggable pieces (`cljax.rules`): custom rules, compositions, one compile, optax.

Compositions are compared with the registry's overrides of the same name (`registry.make`'s
reference_row, trigger, projection) as programs: the jaxprs of the two runs are equal, so their
results are the same bit for bit. That the overrides run and give the numbers they gave before
the rules were pieces is `test_golden.py`'s.
"""

import itertools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numerics
import numpy as np
import optax
import pytest

from cljax import projections, rules, tasks, transforms
from cljax.errors import CljaxError
from cljax.rules import agem, registry
from cljax.train import Config, HParams, make_train

N_TASKS, SAMPLES = 3, 40


@pytest.fixture(scope="module")
def stream(small_dataset):
  return tasks.make_stream(
    small_dataset, protocol="permutations", n_tasks=N_TASKS, samples_per_task=SAMPLES, seed=0
  )


def small(**kw):
  return Config(**{"n_hiddens": 16, "n_memories": 4, "log_every": 0, "memory_strength": 0.5, **kw})


def half_sgd() -> rules.Rule:
  """A rule written outside cljax: g / 2, never a projection, no memory."""
  return rules.stateless(lambda g, ctx: (jax.tree.map(lambda a: 0.5 * a, g), {}))


def test_a_rule_that_halves_g_equals_single_at_half_the_learning_rate(stream):
  key = jax.random.key(0)
  got = jax.jit(make_train(small(lr=0.02), half_sgd()))(key, stream)
  want = jax.jit(make_train(small(lr=0.01), rules.single()))(key, stream)
  # lr (g / 2) and (lr / 2) g are the same product (a power of 2 scales exactly), but the two
  # programs may fuse the update differently: the trajectory bound over the run's steps.
  numerics.assert_trees_close_after(got.params, want.params, steps=N_TASKS * SAMPLES)
  assert set(got.counters) == {"steps", "mean_loss"}  # the rule reports no counters of its own
  np.testing.assert_array_equal(got.counters["steps"], want.counters["steps"])


@pytest.mark.parametrize(
  "counters,match",
  [
    (lambda ctx: {"steps": ctx.t > 0}, "may not be named steps: the engine's own"),
    (lambda ctx: (ctx.t > 0,), "must return its counters as a dict of name -> \\(\\) scalar"),
    (lambda ctx: {"rows": jnp.zeros(3)}, "must return its counters as a dict"),
  ],
)
def test_bad_counters_are_refused_in_one_line(stream, counters, match):
  rule = rules.stateless(lambda g, ctx: (g, counters(ctx)))
  with pytest.raises(CljaxError, match=match) as info:
    jax.jit(make_train(small(), rule)).lower(jax.random.key(0), stream)
  assert "\n" not in str(info.value).split("\n--")[0]


COMPOSITIONS = list(itertools.product(agem.REFERENCES, agem.TRIGGERS, agem.PROJECTIONS))


@pytest.mark.parametrize("reference,trigger,projection", COMPOSITIONS)
def test_each_composition_is_the_override_of_the_same_name(stream, reference, trigger, projection):
  override = registry.make(
    "agem_new", reference_row=reference, trigger=trigger, projection=projection
  )
  rule = agem.agem_rule(
    agem.REFERENCES[reference](), agem.TRIGGERS[trigger](), agem.PROJECTIONS[projection]()
  )
  args = (jax.random.key(0), stream, HParams(jnp.float32(0.01), jnp.float32(0.5)))
  got = jax.make_jaxpr(make_train(small(), rule))(*args)
  want = jax.make_jaxpr(make_train(small(), override))(*args)
  assert str(got) == str(want)


def test_pooled_reference_refuses_the_per_task_trigger():
  with pytest.raises(CljaxError, match="per_task trigger needs per-task checks"):
    agem.agem_rule(agem.pooled(10), agem.per_task(), agem.conditional())


def test_an_unknown_grouped_rule_is_one_line():
  from cljax.grouped.state import GroupedConfig

  with pytest.raises(
    CljaxError, match="unknown grouped rule 'gem_groups': choose one of gem_grouped"
  ):
    rules.grouped("gem_groups", GroupedConfig())


def test_one_trace_for_several_seeds_and_hyper_parameters(stream):
  traced = chex.assert_max_traces(make_train(small(), registry.make("agem_new")), n=1)
  run = jax.jit(traced)
  for seed, lr in ((0, 0.01), (1, 0.05), (2, 0.02)):
    run(jax.random.key(seed), stream, HParams(jnp.float32(lr), jnp.float32(0.5)))
  chex.clear_trace_counter()


def test_a_stateful_rule_sees_every_step_and_task_end(stream):
  """A rule counting its steps and task ends: the state threads through the engine."""

  def update(g, ctx, state):
    return g, {}, state._replace(steps=state.steps + 1)

  def end_task(state, end):
    return state._replace(ends=state.ends.at[end.t].set(state.steps))

  class State(NamedTuple):
    steps: jax.Array
    ends: jax.Array

  rule = rules.Rule(
    init=lambda params, n_tasks: State(jnp.zeros((), jnp.int32), jnp.zeros((n_tasks,), jnp.int32)),
    update=update,
    end_task=end_task,
    summary=lambda state: state.ends,
    uses_memory=False,
  )
  result = jax.jit(make_train(small(), rule))(jax.random.key(0), stream)
  # summary is taken before each task's end_task: row t holds the ends of tasks < t
  want = np.array([[0, 0, 0], [SAMPLES, 0, 0], [SAMPLES, 2 * SAMPLES, 0]])
  np.testing.assert_array_equal(result.h, want)


def _tree(rng, shape=(5, 3)):
  return {
    "w": jnp.asarray(rng.normal(size=shape), jnp.float32),
    "b": jnp.asarray(rng.normal(size=3), jnp.float32),
  }


@pytest.mark.parametrize("conditional", [True, False])
def test_optax_agem_transform_equals_agem_project_then_sgd(conditional):
  rng = np.random.default_rng(0)
  params, g, ref = _tree(rng), _tree(rng), _tree(rng)
  g = jax.tree.map(lambda a, r: a - 2.0 * r, g, ref)  # conflicting: <g, ref> < 0
  tx = optax.chain(transforms.agem(conditional=conditional), optax.sgd(0.1))
  updates, _ = tx.update(g, tx.init(params), params, reference=ref)
  project = projections.agem_project if conditional else projections.project_orthogonal
  want = jax.tree.map(lambda a: -0.1 * a, project(g, ref))
  # the same operations in the same order, eagerly: the same numbers
  jax.tree.map(np.testing.assert_array_equal, updates, want)


def test_optax_gem_transform_equals_gem_project_then_sgd():
  rng = np.random.default_rng(1)
  params, g = _tree(rng), _tree(rng)
  rows = jax.tree.map(lambda a: jnp.stack([a, -a + 0.1]), _tree(rng))
  mask = jnp.array([True, True])
  tx = optax.chain(transforms.gem(margin=0.5), optax.sgd(0.1))
  updates, _ = tx.update(g, tx.init(params), params, memory_grads=rows, mask=mask)
  g_new, info = projections.gem_project(g, rows, margin=0.5, mask=mask)
  assert bool(info.projected)
  jax.tree.map(np.testing.assert_array_equal, updates, jax.tree.map(lambda a: -0.1 * a, g_new))
