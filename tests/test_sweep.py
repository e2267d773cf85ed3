"""cljax.sweep: many runs in one compiled call equal the same runs made one by one."""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_trees_close_after

from cljax import tasks
from cljax.errors import CljaxError
from cljax.grouped.state import GroupedConfig
from cljax.sweep import default_strategy, grid_hparams, make_sweep, stack_streams
from cljax.train import Config, HParams, make_train

SEEDS = (0, 1, 2)
STEPS = 3 * 80  # each run's steps: the horizon of the trajectory bounds


def _config(variant="gem", **kw):
  """The sweep's `conftest.EngineSetup`: the engine's Config and a built-in rule's settings."""
  base = {"n_memories": 5, "log_every": 40, "memory_strength": 0.5}
  return conftest.EngineSetup(Config(), variant).replace(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(request):
  """Per-seed streams (3 tasks x 80 samples of generated images), stacked, and their keys."""
  dataset = request.getfixturevalue("small_dataset")
  streams = [
    tasks.make_stream(dataset, protocol="permutations", n_tasks=3, samples_per_task=80, seed=s)
    for s in SEEDS
  ]
  keys = jax.vmap(jax.random.key)(jnp.asarray(SEEDS))
  return streams, stack_streams(streams), keys


def _one_by_one(config, streams, keys, hparams):
  single = jax.jit(make_train(config.config, config.rule()))
  return [
    single(keys[i], streams[i], jax.tree.map(lambda a, i=i: a[i], hparams))
    for i in range(len(streams))
  ]


def test_map_sweep_equals_runs_one_by_one(runs):
  # A loop over runs is another program than one run: equal to rounding over STEPS steps, with
  # exactly the same decisions (projections, QP iterations).
  streams, stacked, keys = runs
  cfg = _config()
  hp = grid_hparams(cfg.config, len(SEEDS), lr=[0.01, 0.02, 0.05])
  swept = jax.jit(make_sweep(cfg.config, cfg.rule(), strategy="map"))(keys, stacked, hp)
  for i, ref in enumerate(_one_by_one(cfg, streams, keys, hp)):
    ours = jax.tree.map(lambda a, i=i: a[i], swept)
    assert_trees_close_after(ours.params, ref.params, STEPS)
    np.testing.assert_array_equal(ours.counters["projections"], ref.counters["projections"])
    np.testing.assert_array_equal(ours.counters["steps"], ref.counters["steps"])
  assert not np.array_equal(swept.params["out"]["bias"][0], swept.params["out"]["bias"][1])


@pytest.mark.parametrize("strategy,batch_size", [("vmap", None), ("map", 2)])
def test_batched_sweeps_equal_runs_one_by_one_up_to_rounding(runs, strategy, batch_size):
  # Batched matrix products may round differently from unbatched ones on a CPU.
  streams, stacked, keys = runs
  cfg = _config()
  hp = grid_hparams(cfg.config, len(SEEDS))
  swept = jax.jit(make_sweep(cfg.config, cfg.rule(), strategy=strategy, batch_size=batch_size))(
    keys, stacked, hp
  )
  for i, ref in enumerate(_one_by_one(cfg, streams, keys, hp)):
    ours = jax.tree.map(lambda a, i=i: a[i], swept)
    assert_trees_close_after(ours.params, ref.params, STEPS)
    np.testing.assert_allclose(ours.acc, ref.acc, atol=0.03)  # a test example of 50 may flip
    np.testing.assert_array_equal(ours.counters["steps"], ref.counters["steps"])


def test_a_grid_compiles_once(runs):
  _, stacked, keys = runs
  cfg = _config(variant="agem_qp_mean")
  traces = []

  def counted(keys, streams, hp):
    traces.append(1)
    return make_sweep(cfg.config, cfg.rule())(keys, streams, hp).acc

  f = jax.jit(counted)
  a = f(keys, stacked, grid_hparams(cfg.config, 3, memory_strength=[0.0, 0.5, 1.0]))
  b = f(keys, stacked, grid_hparams(cfg.config, 3, lr=[0.03, 0.03, 0.03]))
  assert len(traces) == 1
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_default_strategy_per_platform():
  assert default_strategy("cpu") == "map"  # measured by experiments/bench_sweep.py
  assert default_strategy("gpu") == default_strategy("tpu") == "vmap"


def test_bad_input(runs, small_dataset):
  streams, stacked, keys = runs
  cfg = _config()
  with pytest.raises(CljaxError, match="at least one stream"):
    stack_streams([])
  other = tasks.make_stream(small_dataset, protocol="permutations", n_tasks=2, samples_per_task=80)
  with pytest.raises(CljaxError, match="disagree on train_idx shapes"):
    stack_streams([streams[0], other])
  subset = tasks.make_stream(
    small_dataset, protocol="permutations", n_tasks=3, samples_per_task=80, test_samples=10
  )
  with pytest.raises(CljaxError, match="streams differ in test_x"):
    stack_streams([streams[0], subset])
  with pytest.raises(CljaxError, match=r"cannot sweep \['n_memories'\] in one compile"):
    grid_hparams(cfg.config, 3, n_memories=[1, 2, 3])
  with pytest.raises(CljaxError, match="lr needs 3 values"):
    grid_hparams(cfg.config, 3, lr=[0.1])
  with pytest.raises(CljaxError, match="unknown strategy 'pmap'"):
    make_sweep(cfg.config, cfg.rule(), strategy="pmap")
  with pytest.raises(CljaxError, match=r"hparams.lr needs shape \(3,\)"):
    make_sweep(cfg.config, cfg.rule())(keys, stacked, HParams(jnp.ones(2), jnp.ones(3)))
  with pytest.raises(CljaxError, match="2 keys but 3 streams"):
    make_sweep(cfg.config, cfg.rule())(
      keys[:2], stacked, HParams(*(jnp.ones(2) for _ in HParams._fields))
    )


@pytest.mark.parametrize("strategy", ["map", "vmap"])
def test_on_run_reports_each_run_once_with_its_results(runs, strategy):
  _, stacked, keys = runs
  cfg = _config(variant="agem_new")
  seen = {}
  sweep = make_sweep(
    cfg.config, cfg.rule(), strategy=strategy, on_run=lambda i, r: seen.setdefault(i, r)
  )
  out = jax.jit(sweep)(keys, stacked, grid_hparams(cfg.config, len(SEEDS)))
  jax.effects_barrier()
  assert sorted(seen) == list(range(len(SEEDS)))
  for i, r in seen.items():
    assert r.params is None and isinstance(r.acc, np.ndarray)
    np.testing.assert_array_equal(r.acc, out.acc[i])
    np.testing.assert_array_equal(r.counters["projections"], out.counters["projections"][i])


def test_an_empty_sweep_is_refused(runs):
  _, stacked, keys = runs
  cfg = _config()
  empty = jax.tree.map(lambda a: a[:0], stacked)
  hp = HParams(*(jnp.ones(0) for _ in HParams._fields))
  with pytest.raises(CljaxError, match="at least one run"):
    make_sweep(cfg.config, cfg.rule())(
      keys[:0],
      stacked._replace(**{n: getattr(empty, n) for n in ("train_idx", "pix_idx", "pix_w")}),
      hp,
    )


def test_grouped_variant_sweeps_on_one_device_and_refuses_several_cpu_devices(runs):
  """vmap of a grouped run (its relatedness state and eigh batched) equals the runs one by one."""
  streams, stacked, keys = runs
  grouped = GroupedConfig(num_groups=4, cov_recompute_every=10, cov_first_task_buffer=20)
  cfg = _config(variant="gem_grouped", n_hiddens=20, log_every=0, grouped=grouped)
  hp = grid_hparams(cfg.config, len(SEEDS))
  cpu = jax.devices("cpu")[0]
  out = jax.jit(make_sweep(cfg.config, cfg.rule(), strategy="vmap", devices=[cpu]))(
    keys, stacked, hp
  )
  for i, want in enumerate(_one_by_one(cfg, streams, keys, hp)):
    assert_trees_close_after(jax.tree.map(lambda a, i=i: a[i], out.params), want.params, STEPS)
  with pytest.raises(CljaxError, match="cannot be split across 2 CPU devices"):
    make_sweep(cfg.config, cfg.rule(), devices=[cpu, cpu])


def test_the_sweep_folder_knows_the_engines_own_counters():
  # sweep_folder keeps a copy (it is read without importing the engine and JAX): the same names.
  from cljax import sweep_folder, train

  assert sweep_folder.ENGINE_COUNTERS == train.ENGINE_COUNTERS
