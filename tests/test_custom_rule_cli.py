"""A rule written outside cljax wherever a built-in goes: the CLI, the sweeps; optax optimisers.

Compared against: the built-in single at half the learning rate (a rule that halves the
gradient is the same SGD run bit for bit: x 0.5 is exact in floating point), a custom optimiser
callable against the same optimiser by name, and the one-line refusals.
"""

import dataclasses
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import __main__ as cli
from cljax import rules, run_folder, sweep_cli
from cljax import run_setup as setup
from cljax.errors import CljaxError
from cljax.sweep import grid_hparams, make_sweep, stack_streams
from cljax.train import Config, make_train

RULES = textwrap.dedent(
  """
  import jax
  import jax.numpy as jnp
  from cljax import rules

  def halve():
    def update(g, ctx):  # its own counters: summed, the task's maximum, the mean over steps
      counters = {"halved": jnp.ones((), bool), "task_max": ctx.t, "task_mean": 1.0 * ctx.t}
      return jax.tree.map(lambda a: 0.5 * a, g), counters

    return rules.stateless(update, uses_memory=False)

  def scaled():  # g times its own traced hyper-parameter (--hparam scale=...)
    def update(g, ctx, state):
      return jax.tree.map(lambda a: ctx.hparams.extra["scale"] * a, g), {}, state

    return rules.Rule(
      init=lambda p, t: None, update=update, uses_memory=False, hparams={"scale": 1.0}
    )

  def with_config(config):
    assert config.batch_size >= 1
    return halve()

  def not_a_rule():
    return 3

  def fails():
    raise ValueError("no such setting\\nsecond line")
  """
)
SHORT = ["--n_tasks", "2", "--samples_per_task", "60", "--log_every", "0", "--no_plots"]


@pytest.fixture
def rules_module(tmp_path, monkeypatch):
  (tmp_path / "my_rules.py").write_text(RULES)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  return tmp_path


def matrix(folder, name):
  with open(os.path.join(folder, name, run_folder.RESULTS_JSON)) as f:
    return json.load(f)["matrix"]


@pytest.mark.realdata
def test_a_rule_from_a_module_runs_from_the_cli(real_fashion_dir, rules_module):
  data = ["--data_path", real_fashion_dir, "--save_path", str(rules_module)]
  for factory in ("halve", "with_config"):
    assert cli.main([*SHORT, *data, "--rule", f"my_rules:{factory}", "--lr", "0.02"]) == 0
  assert cli.main([*SHORT, *data, "--model", "single", "--lr", "0.01"]) == 0
  halved = matrix(rules_module, "rule-my_rules.halve_fashion_mnist_permutations_seed3")
  assert halved == matrix(
    rules_module, "rule-my_rules.with_config_fashion_mnist_permutations_seed3"
  )
  assert halved == matrix(rules_module, "single_fashion_mnist_permutations_seed3")
  with open(
    rules_module / "rule-my_rules.halve_fashion_mnist_permutations_seed3" / "results.json"
  ) as f:
    counters = json.load(f)["counters"]  # what the rule reported, reduced per task by name
  assert counters["steps"] == [60, 60] and counters["halved"] == [60, 60]
  assert counters["task_max"] == [0, 1] and counters["task_mean"] == [0.0, 1.0]


@pytest.mark.realdata
def test_a_rule_from_a_module_runs_in_a_two_seed_sweep(real_fashion_dir, rules_module, capsys):
  argv = [*SHORT, "--data_path", real_fashion_dir, "--save_path", str(rules_module)]
  argv += ["--rule", "my_rules:halve", "--seeds", "2", "--strategy", "map", "--resume"]
  assert sweep_cli.main(argv) == 0
  captured = capsys.readouterr()
  out = captured.out
  assert "--resume is a single run's: a sweep resumes from its records by itself" in captured.err
  folder = rules_module / "sweeps" / "rule-my_rules.halve_fashion_mnist_permutations"
  assert f"sweep folder: {folder}" in out
  records = [n for n in os.listdir(folder / "runs") if n.endswith(".json")]
  assert len(records) == 2, os.listdir(folder)
  assert (
    "| halved | task_max | task_mean | diverged |" in out
  )  # the rule's counters, in the summary
  with open(folder / "summary.json") as f:
    (row,) = json.load(f)["rows"]
  assert row["counters"]["halved"]["mean"] == 1.0  # every step of tasks 1..
  assert row["counters"]["task_max"]["mean"] == 1.0 and row["counters"]["task_mean"]["mean"] == 1.0


@pytest.mark.realdata
def test_a_rules_own_hyper_parameter_is_a_flag_of_the_run_and_of_the_sweep_grid(
  real_fashion_dir, rules_module, capsys
):
  """--hparam scale=0.5 (one run) and --hparam scale=0.5,1 (a sweep's grid, one compile per
  worker): each record equals the plain run of its value, bit for bit (the same program)."""
  data = [*SHORT, "--data_path", real_fashion_dir, "--rule", "my_rules:scaled", "--seed", "0"]
  plain = {}
  for scale in ("0.5", "1"):
    save = rules_module / f"plain{scale}"
    assert cli.main([*data, "--save_path", str(save), "--hparam", f"scale={scale}"]) == 0
    plain[scale] = matrix(save, "rule-my_rules.scaled_fashion_mnist_permutations_seed0")
  assert plain["0.5"] != plain["1"]  # the value reached the rule
  folder = rules_module / "sweep"
  argv = [*data, "--save_path", str(rules_module), "--sweep_dir", str(folder)]
  argv += ["--hparam", "scale=0.5,1", "--strategy", "processes", "--workers", "1"]
  assert sweep_cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "| lr | memory_strength | scale | n |" in out  # the grid's own column in the summary
  for scale, label in (("0.5", "0.5"), ("1", "1")):
    with open(folder / "runs" / f"lr0.01_ms10_scale{label}_seed0.json") as f:
      record = json.load(f)
    assert record["matrix"] == plain[scale]
    assert record["sweep"]["setting"]["hparams"] == {"scale": float(scale)}
    assert record["config"]["hparam"] == [f"scale={float(scale)!r}"]


@pytest.mark.parametrize(
  "argv,match",
  [
    (
      ["--hparam", "scale=2"],
      "--hparam scale: the rule has no such hyper-parameter (it declares none",
    ),
    (["--rule", "my_rules:scaled", "--hparam", "size=2"], "(it declares scale;"),
    (["--rule", "my_rules:scaled", "--hparam", "scale"], "--hparam 'scale': give NAME=VALUE"),
    (["--rule", "my_rules:scaled", "--hparam", "scale=big"], "'big' is not a number"),
  ],
)
def test_bad_hparam_values_are_one_line(rules_module, capsys, argv, match):
  for main in (cli.main, sweep_cli.main):
    assert main([*argv, "--save_path", str(rules_module / "out")]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("cljax: error: ")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
  assert not (rules_module / "out").exists()


@pytest.mark.parametrize(
  "value,match",
  [
    ("my_rules", "give MODULE:FACTORY"),
    ("no_such_module:f", "cannot import no_such_module (ModuleNotFoundError"),
    ("my_rules:absent", "my_rules has no callable absent"),
    ("my_rules:not_a_rule", "the factory returned a int, not a cljax.rules.Rule"),
    ("my_rules:fails", "the factory failed (ValueError: no such setting)"),
  ],
)
def test_bad_rule_values_are_one_line(rules_module, capsys, value, match):
  assert cli.main(["--rule", value, "--save_path", str(rules_module / "out")]) == 2
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.startswith("cljax: error: ")]
  assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
  assert not (rules_module / "out").exists()


@pytest.mark.realdata
def test_adam_through_the_engine(real_stream):
  key = jax.random.key(0)
  by_name = Config(optimizer="adam", lr=1e-3, log_every=0, n_memories=10)
  agem = rules.make("agem")
  adam = jax.jit(make_train(by_name, agem))(key, real_stream)
  given = jax.jit(make_train(by_name, agem, optimizer=optax.adam))(key, real_stream)
  for a, b in zip(jax.tree.leaves(adam), jax.tree.leaves(given), strict=True):
    np.testing.assert_array_equal(a, b)  # the name is the callable
  sgd = jax.jit(make_train(dataclasses.replace(by_name, optimizer="sgd"), agem))(key, real_stream)
  assert not np.array_equal(adam.acc, sgd.acc) and bool(np.all(adam.finite))
  assert np.all(np.asarray(adam.acc)[np.arange(3), np.arange(3)] > 0.3)  # it learns each task


def scaled_sgd() -> rules.Rule:
  """A rule with a traced hyper-parameter of its own: g times `scale`."""

  def update(g, ctx, state):
    scale = ctx.hparams.extra["scale"]
    return jax.tree.map(lambda a: scale * a, g), {}, state

  return rules.Rule(
    init=lambda p, t: None, update=update, uses_memory=False, hparams={"scale": 1.0}
  )


@pytest.mark.realdata
def test_a_rules_own_hyper_parameter_is_swept_in_one_compile(real_stream):
  config = Config(lr=0.02, log_every=0)
  rule = scaled_sgd()
  hp = grid_hparams(config, 2, rule, scale=[0.5, 1.0])
  keys = jax.vmap(jax.random.key)(jnp.asarray([0, 0]))
  sweep = jax.jit(make_sweep(config, rule, strategy="map", devices=jax.devices()[:1]))
  both = sweep(keys, stack_streams([real_stream, real_stream]), hp)  # one program, two scales
  for i, lr in enumerate((0.01, 0.02)):  # x 0.5 is exact: scale 0.5 is single at half the lr
    plain = jax.jit(make_train(dataclasses.replace(config, lr=lr), rules.single()))(
      jax.random.key(0), real_stream
    )
    np.testing.assert_array_equal(np.asarray(both.acc[i]), np.asarray(plain.acc))
  with pytest.raises(CljaxError, match=r"cannot sweep \['temperature'\]"):
    grid_hparams(config, 2, rule, temperature=[1.0, 2.0])


def test_with_a_rule_the_built_in_settings_are_reported_unused():
  # The factory reads none of --model's settings; the engine's (here --n_memories) it may read.
  argv = ["--rule", "my_rules:halve", "--model", "gem", "--eps", "0.01", "--n_memories", "5"]
  _, notes = setup.parse_args([*argv, "--reference_row", "sum", "--num_groups", "4"])
  assert notes[0] == (
    "flags not used by --rule my_rules:halve: --model, --eps, --reference_row, --num_groups"
  )
