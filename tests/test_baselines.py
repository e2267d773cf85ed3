"""The baselines as rules: EWC (`cljax.rules.ewc`), experience replay (`cljax.rules.er`) and the
reservoir buffer it can use (`cljax.memory.write_reservoir`).

Compared against: the diagonal Fisher and the penalty's gradient computed by hand in float64
(numpy; jax.grad of the written-out penalty), ER's gradient as the gradient of the mean loss over
the batch and its sample concatenated, and reservoir sampling's defining property (every example
seen is kept with probability N / n).
"""

import jax
import jax.numpy as jnp
import numerics
import numpy as np
import optax
import pytest

from cljax import memory, tasks
from cljax.errors import CljaxError
from cljax.networks import finetune_start
from cljax.rules import registry
from cljax.rules.base import HParams, StepContext, TaskEndContext, independent
from cljax.rules.er import BUFFERS, er, replay_sample
from cljax.rules.ewc import FISHERS, ewc, fisher_diagonal
from cljax.train import Config, make_train

D, C = 5, 3  # a tiny linear network: logits = x W + b


def linear_apply(params, x):
  return x @ params["W"] + params["b"]


def tiny_params(rng, dtype=np.float64):
  return {"W": rng.normal(size=(D, C)).astype(dtype), "b": rng.normal(size=C).astype(dtype)}


def hand_example_grads(params, x, y):
  """Per-example gradients of softmax cross-entropy: dW_j = x_j (p_j - e_y)', db_j = p_j - e_y."""
  logits = x @ params["W"] + params["b"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  delta = p - np.eye(C)[y]
  return {"W": x[:, :, None] * delta[:, None, :], "b": delta}


@pytest.mark.parametrize("kind", ["empirical", "batch_squared"])
def test_fisher_equals_the_hand_computed_one(kind):
  rng = np.random.default_rng(0)
  params = tiny_params(rng)
  x, y = rng.normal(size=(10, D)), rng.integers(0, C, 10)
  valid = np.arange(10) < 7  # the memory's last slots are not filled
  per = hand_example_grads(params, x[valid], y[valid])
  if kind == "empirical":  # the mean of squared per-example gradients
    want = {k: np.mean(g**2, axis=0) for k, g in per.items()}
  else:  # the GEM code's: the square of the mean gradient
    want = {k: np.mean(g, axis=0) ** 2 for k, g in per.items()}
  with jax.enable_x64(True):  # float64 on both sides: agreement to ~1e-15, not to float32 rounding
    got = fisher_diagonal(
      linear_apply, jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y), valid, kind
    )
    got = jax.tree.map(np.asarray, got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-14)
  assert not np.allclose(got["W"], 0)


def test_fisher_of_an_empty_memory_is_zero():
  params = jax.tree.map(jnp.asarray, tiny_params(np.random.default_rng(1), np.float32))
  x, y = jnp.ones((4, D)), jnp.zeros(4, jnp.int32)
  for kind in FISHERS:
    F = fisher_diagonal(linear_apply, params, x, y, jnp.zeros(4, bool), kind)
    assert all(not np.asarray(f).any() for f in jax.tree.leaves(F))


def tiny_memory(rng, n_tasks=3, n_memories=4, filled_tasks=2):
  mem = memory.empty_memory(n_tasks, n_memories, D)
  x = rng.normal(size=(n_tasks, n_memories, D)).astype(np.float32)
  y = rng.integers(0, C, (n_tasks, n_memories)).astype(np.int32)
  filled = np.zeros((n_tasks, n_memories), bool)
  filled[:filled_tasks] = True
  filled[filled_tasks - 1, -1] = False  # one slot of the last filled task is empty
  return mem._replace(x=jnp.asarray(x), y=jnp.asarray(y), filled=jnp.asarray(filled))


def test_ewc_step_is_the_gradient_of_the_written_out_penalty():
  rng = np.random.default_rng(2)
  rule = ewc()
  mem = tiny_memory(rng)
  state = rule.init(tiny_params(rng, np.float32), 3)
  anchors, fishers = [], []
  with jax.enable_x64(True):
    for t in range(2):  # two finished tasks, each at its own parameters
      theta_t = jax.tree.map(jnp.asarray, tiny_params(rng))
      mem64 = jax.tree.map(lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, mem)
      state = rule.end_task(
        jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state),
        TaskEndContext(jnp.int32(t), theta_t, jax.random.key(0), mem64, linear_apply),
      )
      anchors.append(theta_t)
      fishers.append(
        fisher_diagonal(linear_apply, theta_t, mem64.x[t], mem64.y[t], mem64.filled[t])
      )
    theta = jax.tree.map(jnp.asarray, tiny_params(rng))
    lam = 3.0

    def penalty(p):  # memory_strength / 2 * sum_k sum_i F_k,i (theta_i - theta_k,i)^2
      terms = [
        jax.tree.map(lambda f, q, a: jnp.sum(f * (q - a) ** 2), F, p, A)
        for F, A in zip(fishers, anchors, strict=True)
      ]
      return lam / 2 * sum(sum(jax.tree.leaves(t)) for t in terms)

    g = jax.tree.map(jnp.zeros_like, theta)
    ctx = StepContext(
      jnp.int32(2),
      theta,
      mem.x[2, :1],
      mem.y[2, :1],
      mem,
      HParams(1.0, lam),
      jax.random.key(0),
      linear_apply,
    )
    got, counters, _ = rule.update(g, ctx, state)
    want = jax.grad(penalty)(theta)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-10, atol=1e-14)
  assert counters == {}  # ewc reports no counters


def step_context(rng, mem, t, batch=2):
  params = jax.tree.map(jnp.asarray, tiny_params(rng, np.float32))
  x = jnp.asarray(rng.normal(size=(batch, D)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, C, batch).astype(np.int32))
  hp = HParams(jnp.float32(0.1), jnp.float32(0.0))
  return StepContext(jnp.int32(t), params, x, y, mem, hp, jax.random.key(5), linear_apply)


def joined_gradient(ctx, x, y):
  """The gradient of the mean loss over the rows (x, y): the batch and the sample, concatenated."""

  def loss(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(linear_apply(p, x), y))

  return jax.grad(loss)(ctx.params)


@pytest.mark.parametrize("buffer", BUFFERS)
def test_er_steps_on_the_batch_joined_with_its_memory_sample(buffer):
  rng = np.random.default_rng(3)
  mem = tiny_memory(rng)  # tasks 0 and 1 filled (7 slots), task 2 empty
  ctx = step_context(rng, mem, t=1)
  R = 3
  x_s, y_s, valid = replay_sample(ctx, R, buffer)
  valid = np.asarray(valid)
  assert valid.all()  # enough slots: a full sample
  pool = np.asarray(mem.filled) & (np.arange(3)[:, None] < 1 if buffer == "ring" else True)
  pooled_rows = {tuple(r) for r in np.asarray(mem.x)[pool]}
  assert all(tuple(r) in pooled_rows for r in np.asarray(x_s))  # ring: task 0's slots only
  assert len({tuple(r) for r in np.asarray(x_s)}) == R  # without replacement
  g = joined_gradient(ctx, ctx.x, ctx.y)  # the batch's own gradient, as the engine gives it
  got, counters, _ = er(R, buffer).update(g, ctx, None)
  want = joined_gradient(ctx, jnp.concatenate([ctx.x, x_s]), jnp.concatenate([ctx.y, y_s]))
  for k in want:
    # Two float32 programs of the same mean over B + R = 5 examples: each gradient entry is a sum
    # of 5 products; the bound of such sums, with the |terms| bounded by the per-example maximum.
    per = np.abs(
      np.asarray(
        hand_example_grads(
          jax.tree.map(np.asarray, ctx.params),
          np.concatenate([ctx.x, x_s]),
          np.concatenate([ctx.y, y_s]),
        )[k]
      )
    )
    np.testing.assert_allclose(
      np.asarray(got[k]), np.asarray(want[k]), rtol=0, atol=numerics.sum_atol(per.sum(0), 5) * 4
    )
  assert bool(counters["replayed"])


def test_er_on_the_first_task_of_a_ring_memory_leaves_g_unchanged():
  rng = np.random.default_rng(4)
  mem = tiny_memory(rng)
  ctx = step_context(rng, mem, t=0)  # no past task: nothing to replay
  g = joined_gradient(ctx, ctx.x, ctx.y)
  got, counters, _ = er(3).update(g, ctx, None)
  for k in g:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(g[k]))
  assert not bool(counters["replayed"])


def stream_into_reservoir(key, n_tasks, n_memories, n_seen, batch):
  mem = memory.empty_memory(n_tasks, n_memories, 1)
  xs = jnp.arange(n_seen, dtype=jnp.float32).reshape(-1, batch, 1)

  def write(mem, args):
    i, x = args
    return memory.write_reservoir(
      mem, x, jnp.zeros(batch, jnp.int32), jax.random.fold_in(key, i)
    ), None

  mem, _ = jax.lax.scan(write, mem, (jnp.arange(xs.shape[0]), xs))
  return mem


@pytest.mark.parametrize("batch", [1, 3])
def test_reservoir_keeps_every_example_seen_with_probability_slots_over_seen(batch):
  n_tasks, n_memories, n_seen, trials = 2, 3, 30, 4000
  keys = jax.random.split(jax.random.key(0), trials)
  run = jax.jit(jax.vmap(lambda k: stream_into_reservoir(k, n_tasks, n_memories, n_seen, batch)))
  mem = run(keys)
  assert np.all(np.asarray(mem.cursor) == n_seen) and np.asarray(mem.filled).all()
  held = np.asarray(mem.x).reshape(trials, -1).astype(int)  # (trials, N): the examples kept
  assert all(len(set(row)) == n_tasks * n_memories for row in held)  # never one example twice
  kept = np.zeros(n_seen)
  for row in held:
    kept[row] += 1
  p = n_tasks * n_memories / n_seen
  # Binomial(trials, p) per example: 6 standard deviations (a false failure below 1e-8 each).
  np.testing.assert_allclose(kept / trials, p, atol=6 * np.sqrt(p * (1 - p) / trials))


def test_reservoir_fills_its_slots_in_order_first():
  mem = stream_into_reservoir(jax.random.key(1), 2, 3, 6, 2)
  np.testing.assert_array_equal(np.asarray(mem.x).reshape(-1), np.arange(6))


@pytest.fixture(scope="module")
def stream(small_dataset):
  return tasks.make_stream(
    small_dataset, protocol="permutations", n_tasks=3, samples_per_task=40, seed=0
  )


def small(**kw):
  return Config(**{"n_hiddens": 16, "n_memories": 8, "log_every": 0, **kw})


def test_er_in_the_engine_replays_from_the_memory_it_fills(stream):
  ring = jax.jit(make_train(small(), registry.make("er")))(jax.random.key(0), stream)
  pool = jax.jit(make_train(small(), registry.make("er", replay_buffer="reservoir")))(
    jax.random.key(0), stream
  )
  # ring: nothing past on task 0, then every step replays; reservoir: written after each step, so
  # only the very first step finds it empty.
  np.testing.assert_array_equal(ring.counters["replayed"], [0, 40, 40])
  np.testing.assert_array_equal(pool.counters["replayed"], [39, 40, 40])
  assert np.all(np.asarray(ring.finite)) and np.all(np.asarray(pool.finite))


def test_ewc_in_the_engine_accumulates_a_fisher_per_finished_task(stream):
  base = ewc()

  def summary(state):
    return jax.tree.map(jnp.sum, state.fisher_sum)  # recorded at each task end, before end_task

  rule = base._replace(summary=summary)
  result = jax.jit(make_train(small(memory_strength=1.0), rule))(jax.random.key(0), stream)
  totals = np.asarray(sum(jax.tree.leaves(result.h)))  # (T,) sum of S over all parameters
  assert totals[0] == 0 and 0 < totals[1] < totals[2]  # one Fisher more per finished task
  assert set(result.counters) == {"steps", "mean_loss"}  # ewc reports no counters of its own
  assert np.all(np.asarray(result.finite))


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(variant="ewc", fisher="exact"), "unknown fisher 'exact': choose one of empirical"),
    (dict(variant="er", replay_buffer="fifo"), "unknown replay_buffer 'fifo': choose one of ring"),
    (dict(variant="er", replay_batch_size=0), "replay_batch_size must be an int >= 1"),
    (dict(variant="independent", finetune="maybe"), "unknown finetune 'maybe': choose one of yes"),
  ],
)
def test_bad_baseline_settings_are_one_line(kwargs, match):
  with pytest.raises(CljaxError, match=match) as err:
    registry.make(**kwargs)
  assert "\n" not in str(err.value)


def test_independent_leaves_finished_tasks_exactly_as_they_were(stream):
  result = jax.jit(make_train(small(n_hiddens=15), independent()))(jax.random.key(0), stream)
  R = np.asarray(result.acc)
  for t in range(3):  # network t is trained on task t only: its accuracy never moves after
    np.testing.assert_array_equal(R[t:, t], R[t, t])
  assert result.params["hidden_0"]["kernel"].shape == (3, 784, 5)  # 15 // 3 units per task


def test_finetune_starts_each_network_from_the_previous_one(stream):
  params = {"w": jnp.arange(6.0).reshape(3, 2)}
  np.testing.assert_array_equal(finetune_start(params, jnp.int32(0))["w"], params["w"])
  np.testing.assert_array_equal(finetune_start(params, jnp.int32(2))["w"], [[0, 1], [2, 3], [2, 3]])
  fresh = jax.jit(make_train(small(n_hiddens=15), independent()))(jax.random.key(0), stream)
  tuned = jax.jit(make_train(small(n_hiddens=15), registry.make("independent", finetune="yes")))(
    jax.random.key(0), stream
  )
  np.testing.assert_array_equal(fresh.acc[0], tuned.acc[0])  # before the first copy: the same
  assert not np.array_equal(fresh.acc[1, 1], tuned.acc[1, 1])


def test_independent_needs_a_unit_per_task(stream):
  with pytest.raises(CljaxError, match="n_hiddens 2 < n_tasks 3") as err:
    jax.jit(make_train(small(n_hiddens=2), independent()))(jax.random.key(0), stream)
  assert "\n" not in str(err.value)


def test_a_rule_with_an_unknown_memory_policy_is_one_line():
  rule = er(3)._replace(memory_writes="fifo")
  with pytest.raises(CljaxError, match="unknown memory_writes 'fifo' of the rule") as err:
    make_train(small(), rule)
  assert "\n" not in str(err.value)


def test_a_rule_with_an_unknown_network_form_is_one_line():
  rule = er(3)._replace(networks="per_head")
  with pytest.raises(CljaxError, match="unknown networks 'per_head' of the rule") as err:
    make_train(small(), rule)
  assert "\n" not in str(err.value)
