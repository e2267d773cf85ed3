"""cljax.train: every variant on small real Fashion-MNIST runs, and the equalities of the math."""

import math

import chex
import conftest
import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest

from cljax import tasks
from cljax.errors import CljaxError
from cljax.memory import Memory, write_memory
from cljax.memory_grads import mean_loss, past_grad_sum, past_slot_counts
from cljax.models import make_mlp
from cljax.rules import registry, single
from cljax.rules.base import StepContext
from cljax.train import Config, HParams, make_evaluate, make_train, schedule

VARIANTS = tuple(registry.VARIANTS)

N_TASKS, TEST = conftest.ENGINE_TASKS, 500
config, run = conftest.engine_config, conftest.engine_run


@pytest.fixture(scope="module")
def stream(real_stream):
  return real_stream


SHORT = 40


@pytest.fixture(scope="module")
def short_stream(real_fashion_dir):
  """3 tasks x 40 examples: a horizon short enough to compare two programs' trajectories."""
  return conftest.real_permutation_stream(
    real_fashion_dir, n_tasks=N_TASKS, samples_per_task=SHORT, test_samples=100
  )


@pytest.mark.realdata
@pytest.mark.parametrize("variant,ref", [(v, "pooled") for v in VARIANTS] + [("agem", "task_mean")])
def test_every_variant_learns_and_counts_consistently(stream, variant, ref):
  result = run(stream, config(variant, agem_ref=ref))
  R, b = np.asarray(result.acc), np.asarray(result.baseline)
  assert R.shape == (N_TASKS, N_TASKS) and b.shape == (N_TASKS,)
  assert np.all(np.diag(R) > 0.3), R  # chance is 0.1
  assert np.all(np.asarray(result.finite))
  c = jax.tree.map(np.asarray, result.counters)
  steps, chunk, n_chunks = schedule(config(variant).config, stream)
  np.testing.assert_array_equal(c["steps"], steps)
  assert np.all(np.isfinite(c["mean_loss"])) and np.all(c["mean_loss"] > 0)
  qp_rule = variant in ("gem", "agem_old", "agem_qp_mean", "gem_grouped", "agem_qp_grouped")
  # What each rule reports (`cljax.rules.Counters`) beside the engine's steps and mean_loss.
  own = set(c) - {"steps", "mean_loss"}
  if variant in ("single", "independent", "ewc"):  # g is never changed: nothing to report
    assert own == set()
  elif variant == "er":  # every step of tasks 1.. replays past memories
    assert own == {"replayed"}
    assert c["replayed"][0] == 0 and np.all(c["replayed"][1:] == steps)
  else:
    qp_names = {"qp_iterations", "qp_iterations_max", "kkt_max", "qp_failures"}
    assert own == {"violations", "projections"} | (qp_names if qp_rule else set())
    assert np.all(c["projections"] <= c["steps"]) and np.all(c["violations"] <= c["steps"])
    assert c["violations"][0] == 0 and c["projections"][0] == 0  # no past task during task 0
    assert np.all(c["violations"][1:] > 0), c["violations"]  # conflicts on permuted tasks
  if qp_rule:
    assert np.all(c["qp_iterations"] >= c["projections"])
    assert np.all(c["qp_iterations_max"] <= c["qp_iterations"])
    assert np.all(c["qp_iterations_max"][1:] >= 1)  # a maximum over steps, not a sum
    assert np.all(c["qp_failures"] == 0) and np.all(c["kkt_max"] <= 1e-3)
  if variant in ("agem", "agem_grouped"):
    np.testing.assert_array_equal(c["projections"], c["violations"])  # conditional projection
  # The curve's last point of each task is the matrix row; its steps are the chunk ends.
  np.testing.assert_array_equal(np.asarray(result.curve)[:, -1], R)
  expected = (np.arange(N_TASKS)[:, None] * steps) + chunk * (1 + np.arange(n_chunks))[None]
  np.testing.assert_array_equal(
    np.asarray(result.curve_step), np.minimum(expected, steps * (1 + np.arange(N_TASKS))[:, None])
  )


@pytest.mark.realdata
@pytest.mark.parametrize("variant,ref", [("gem", "pooled"), ("agem_new", "pooled")])
def test_factored_memory_gradients_equal_explicit_rows(short_stream, variant, ref):
  # Per-example gradient factors (P = S K S', q, G'v from small products) against one backward
  # pass per past task and gem_project on the explicit rows: two programs, the same run up to
  # float rounding. gem covers the Gram, the checks and G'v; agem_new the checks and the summed
  # row. Horizon: 3 x 40 steps, short enough that no trigger flips (the counters are equal), so
  # the parameters drift apart by rounding only (`numerics.trajectory_atol`).
  cfg = config(variant, agem_ref=ref, log_every=0)
  factored = run(short_stream, cfg)
  explicit = run(short_stream, cfg.replace(memory_grads="explicit"))
  numerics.assert_trees_close_after(factored.params, explicit.params, steps=N_TASKS * SHORT)
  for name in ("violations", "projections", "steps"):
    np.testing.assert_array_equal(factored.counters[name], explicit.counters[name], err_msg=name)


@pytest.mark.realdata
def test_same_seed_same_result_and_other_seed_differs(stream):
  # The same program twice (one compiled function), bit for bit; another seed differs.
  cfg = config("agem", agem_ref="pooled")
  train = jax.jit(make_train(cfg.config, cfg.rule()))
  a = train(jax.random.key(1), stream)
  b = train(jax.random.key(1), stream)
  c = train(jax.random.key(2), stream)
  np.testing.assert_array_equal(np.asarray(a.acc), np.asarray(b.acc))
  chex.assert_trees_all_equal(a.params, b.params)
  assert not np.array_equal(np.asarray(a.acc), np.asarray(c.acc))


@pytest.mark.realdata
def test_folded_evaluation_equals_transforming_the_images(stream):
  cfg = config("single")
  result = run(stream, cfg)
  model = make_mlp(cfg.config.n_hiddens, cfg.config.n_layers)
  for t in range(N_TASKS):
    x, y = tasks.eval_set(stream, t)
    pred = jnp.argmax(model.apply({"params": result.params}, x), axis=-1)
    direct = float(jnp.mean(pred == y))
    assert float(result.acc[-1, t]) == pytest.approx(direct, abs=2.0 / TEST)
  # The public evaluate is the one the run uses; odd batch sizes pad without counting padding.
  for bs in (TEST, 7):
    acc = jax.jit(make_evaluate(Config(eval_batch_size=bs)))(result.params, stream)
    np.testing.assert_allclose(np.asarray(acc), np.asarray(result.acc[-1]), atol=2.0 / TEST)


@pytest.mark.realdata
def test_one_compile_and_no_growth_with_tasks(short_stream):
  stream = short_stream
  cfg = config("gem", log_every=0)
  sizes = []
  for T in (8, 12):  # tasks repeated: only the shapes matter here (both: 4 memory variants)

    def tiled(a, T=T):
      return jnp.concatenate([a] * math.ceil(T / a.shape[0]))[:T]

    more = stream._replace(
      train_idx=tiled(stream.train_idx), pix_idx=tiled(stream.pix_idx), pix_w=tiled(stream.pix_w)
    )
    jaxpr = jax.make_jaxpr(make_train(cfg.config, cfg.rule()))(jax.random.key(0), more)
    sizes.append(len(str(jaxpr)))
  assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[0]  # the program does not unroll over tasks

  traces = []

  def counted(key, stream):
    traces.append(1)
    return make_train(cfg.config, cfg.rule())(key, stream).acc

  f = jax.jit(counted)
  f(jax.random.key(0), stream)
  f(jax.random.key(1), stream)
  assert len(traces) == 1


@pytest.mark.realdata
def test_traced_hparams_match_static_config(short_stream):
  # Constants folded into the program against traced arguments: two programs, compared over the
  # short horizon (`numerics.trajectory_atol`), the counters exactly.
  cfg = config("gem", log_every=0)
  static = run(short_stream, cfg)
  hp = HParams(jnp.float32(cfg.config.lr), jnp.float32(cfg.config.memory_strength))
  traced = jax.jit(make_train(cfg.config, cfg.rule()))(jax.random.key(0), short_stream, hp)
  numerics.assert_trees_close_after(traced.params, static.params, steps=N_TASKS * SHORT)
  np.testing.assert_array_equal(traced.counters["projections"], static.counters["projections"])


@pytest.mark.realdata
def test_divergence_stops_training_and_keeps_earlier_results(stream):
  # A learning rate that blows up: after the parameters go non-finite, steps are skipped.
  result = run(stream, config("single", lr=1e4))
  finite = np.asarray(result.finite)
  assert not finite.all()
  first_bad = int(np.argmin(finite))
  steps = np.asarray(result.counters["steps"])
  assert np.all(steps[first_bad + 1 :] == 0)


def gem_ring_buffer(batches, n_memories, n_tasks, dim):
  """GEM's observe(): memory_data[t, mem_cnt:endcnt] = x[:effbsz]; mem_cnt wraps at M."""
  mem = np.zeros((n_tasks, n_memories, dim), np.float32)
  lab = np.zeros((n_tasks, n_memories), np.int32)
  cnt = 0
  for t, x, y in batches:
    end = min(cnt + len(y), n_memories)
    eff = end - cnt
    mem[t, cnt:end] = x[:eff]
    lab[t, cnt:end] = y[:eff]
    cnt += eff
    if cnt == n_memories:
      cnt = 0
  return mem, lab, cnt


@pytest.mark.parametrize(
  "T,expected", [(1, (1,)), (3, (1, 2, 3)), (10, (3, 5, 8, 10)), (20, (5, 10, 15, 20))]
)
def test_past_slot_counts_cover_every_task_count_with_at_most_four_variants(T, expected):
  sizes = past_slot_counts(T)
  assert sizes == expected
  assert all(any(n >= t for n in sizes) for t in range(1, T))  # every step has a variant


def test_blocked_memory_rows_equal_one_pass_per_task_for_every_past_task_count():
  # The factored sum of the past rows and GEM's checks loop over blocks of ceil(T / 4) tasks;
  # T = 11: blocks of 3, the last one (tasks 8-10) overlaps the one before and is read at t = 10.
  # Against the explicit rows, one backward pass per task, for every t, with a task of
  # half-filled slots. Two programs: the bounds are those of the summed terms (`numerics`).
  T, M = 11, 4
  rng = np.random.default_rng(0)
  model = make_mlp(16, 2, n_inputs=20)
  params = model.init(jax.random.key(1), jnp.zeros((1, 20)))["params"]
  memory = Memory(
    jnp.asarray(rng.random((T, M, 20), np.float32)),
    jnp.asarray(rng.integers(0, 10, (T, M)), jnp.int32),
    jnp.ones((T, M), bool).at[4, 2:].set(False),
    jnp.zeros((), jnp.int32),
  )
  x, y = jnp.asarray(rng.random((1, 20), np.float32)), jnp.asarray([3])

  def terms(t, mode):
    apply = lambda p, v: model.apply({"params": p}, v)  # noqa: E731
    ctx = StepContext(t, params, x, y, memory, HParams(0.1, 0.5), jax.random.key(0), apply)
    return past_grad_sum(ctx, mode, checks=True)

  factored, explicit = (jax.jit(lambda t, m=m: terms(t, m)) for m in ("factored", "explicit"))
  g = jax.grad(lambda p: mean_loss(lambda q, v: model.apply({"params": q}, v), p, x, y))(params)
  for t in range(1, T):
    (row_f, dots_f), (row_e, dots_e) = factored(t), explicit(t)
    for a, b in zip(jax.tree.leaves(row_f), jax.tree.leaves(row_e), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=numerics.sum_atol(np.abs(b) + 1e-3, t * M))
    assert np.all(np.asarray(dots_f)[t:] == 0) and np.all(np.asarray(dots_e)[t:] == 0)
    flat = [np.concatenate([np.ravel(v) for v in jax.tree.leaves(r)]) for r in (g, row_e)]
    atol = numerics.dot_atol(*flat)
    np.testing.assert_allclose(dots_f[:t], dots_e[:t], rtol=0, atol=atol)


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_memory_ring_buffer_follows_gem(batch):
  T, M, D = 3, 4, 5
  rng = np.random.default_rng(batch)
  batches = [
    (t, rng.standard_normal((batch, D)).astype(np.float32), rng.integers(0, 10, batch))
    for t in (0, 0, 0, 1, 1, 2)
  ]
  memory = Memory(
    jnp.zeros((T, M, D)), jnp.zeros((T, M), jnp.int32), jnp.zeros((T, M), bool), jnp.int32(0)
  )
  write = jax.jit(write_memory)
  for t, x, y in batches:
    memory = write(memory, t, x, y)
  mem, lab, cnt = gem_ring_buffer(batches, M, T, D)
  np.testing.assert_array_equal(np.asarray(memory.x), mem)
  np.testing.assert_array_equal(np.asarray(memory.y), lab)
  assert int(memory.cursor) == cnt
  written = np.zeros((T, M), bool)
  cursor = 0
  for t, _, y in batches:
    end = min(cursor + len(y), M)
    written[t, cursor:end] = True
    cursor = 0 if end == M else end
  np.testing.assert_array_equal(np.asarray(memory.filled), written)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(n_memories=-1), "n_memories must be >= 0"),
    (dict(memory_strength=-1.0), "memory_strength must be a finite number >= 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(memory_strength=float("nan")), "memory_strength must be a finite number >= 0, got nan"),
    (
      dict(memory_grads="rows"),
      "unknown memory_grads 'rows': choose one of auto, factored, explicit",
    ),
    (dict(log_every=-1), "log_every must be >= 0"),
    (dict(n_layers=0), "n_layers"),
  ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(CljaxError, match=match):
    Config(**kwargs)


@pytest.mark.parametrize(
  "variant,kwargs,match",
  [
    ("nope", {}, "unknown variant 'nope': choose one of single, independent, gem"),
    ("gem", dict(eps=float("inf")), "eps must be a finite number >= 0, got inf"),
    ("gem", dict(eps=-1.0), "eps must be a finite number >= 0, got -1.0"),
    ("gem", dict(qp_max_iter=0), "qp_max_iter must be an int >= 1, got 0"),
    ("gem", dict(qp_max_iter=10.5), "qp_max_iter must be an int >= 1, got 10.5"),
    ("er", dict(replay_batch_size=0), "replay_batch_size must be an int >= 1, got 0"),
    ("agem", dict(agem_ref="x"), "unknown agem_ref 'x': choose one of pooled, task_mean"),
    ("ewc", dict(fisher="exact"), "unknown fisher 'exact'"),
    ("gem", dict(lr=0.1), "gem has no setting 'lr': the built-in rules' settings are agem_ref"),
    ("gem", dict(fisher="batch_squared"), r"gem does not read fisher \(it reads eps, "),
    ("gem_grouped", dict(grouped={}), "grouped must be a cljax.grouped.state.GroupedConfig"),
  ],
)
def test_bad_rule_settings_are_one_line(variant, kwargs, match):
  with pytest.raises(CljaxError, match=match):
    registry.make(variant, **kwargs)


def test_a_rule_that_reads_the_memory_needs_memory_slots():
  with pytest.raises(CljaxError, match="the rule reads the episodic memory: n_memories must be"):
    make_train(Config(n_memories=0), registry.make("gem"))
  make_train(Config(n_memories=0), single())  # plain SGD keeps no memory
  with pytest.raises(CljaxError, match=r"make_train takes a cljax\.rules\.Rule, got str"):
    make_train(Config(), "gem")


def test_batch_larger_than_task(small_dataset):
  stream = tasks.make_stream(small_dataset, protocol="permutations", n_tasks=2, samples_per_task=5)
  with pytest.raises(CljaxError, match="batch_size 10 is larger than samples_per_task 5"):
    schedule(Config(batch_size=10), stream)
