"""`--preset NAME` (cljax.presets): named defaults of `python -m cljax` and cljax.sweep_cli."""

import dataclasses
import json
import os

import conftest
import pytest

from cljax import __main__ as cli
from cljax import presets, run_folder, sweep_cli, train
from cljax import run_setup as setup
from cljax.rules import registry

NAMES = list(presets.PRESETS)


def settings_of(args):
  return {k: v for k, v in vars(args).items() if k not in ("given", "preset")}


@pytest.mark.parametrize("name", NAMES)
def test_a_preset_is_its_flags_typed_out(name):
  args, notes = setup.parse_args(["--preset", name])
  typed = [s for dest, v in presets.PRESETS[name].settings.items() for s in (f"--{dest}", str(v))]
  expected, _ = setup.parse_args(typed)
  assert settings_of(args) == settings_of(expected) and notes == []
  assert args.preset == name and args.given == {"preset": "--preset"}
  for dest, value in presets.PRESETS[name].settings.items():
    assert getattr(args, dest) == value and type(getattr(args, dest)) is type(value)


def test_the_presets_values():
  seed, _ = setup.parse_args(["--preset", "seed"])
  assert (seed.model, seed.n_tasks, seed.lr, seed.seed) == ("agem", 10, 0.01, 3)
  assert (seed.memory_strength, seed.replay_batch_size, seed.log_every) == (10.0, 10, 100)
  assert (seed.dataset, seed.protocol) == ("fashion_mnist", "permutations")
  paper, _ = setup.parse_args(["--preset", "gem_paper_mnist"])
  assert (paper.n_tasks, paper.samples_per_task, paper.batch_size, paper.lr) == (20, 1000, 10, 0.1)
  assert (paper.n_memories, paper.memory_strength, paper.n_layers, paper.n_hiddens) == (
    256,
    0.5,
    2,
    100,
  )
  assert paper.model == setup.RUN_DEFAULTS["model"] and paper.protocol == "permutations"  # not set


def test_given_flags_win_and_one_note_says_so():
  argv = ["--preset", "gem_paper_mnist", "--lr", "0.05", "--model", "gem", "--n_tasks=2"]
  args, notes = setup.parse_args(argv)
  assert (args.lr, args.n_tasks, args.model, args.n_memories) == (0.05, 2, "gem", 256)
  assert [n for n in notes if "preset" in n] == [
    "preset gem_paper_mnist: --lr 0.05 given, overrides its 0.1; --n_tasks 2 given, overrides "
    "its 20"
  ]
  _, notes = setup.parse_args(["--preset", "gem_paper_mnist", "--lr", "0.1"])  # the same value
  assert notes == []


def test_a_data_file_given_wins_over_the_presets_dataset():
  args, _ = setup.parse_args(["--preset", "seed", "--data_file", "mnist_rotations.pt"])
  assert (args.dataset, args.protocol, args.lr) == ("mnist", "rotations", 0.01)


def test_preset_settings_are_not_reported_as_unused_flags():
  args, notes = setup.parse_args(["--preset", "gem_paper_mnist", "--model", "agem_new"])
  assert notes == [] and setup.unused_flags(args) == []  # agem_new reads no memory_strength
  args, notes = setup.parse_args(["--preset", "gem_paper_mnist", "--model", "agem_new", "--beta=1"])
  assert setup.unused_flags(args) == ["--beta"]
  assert len(notes) == 1 and notes[0].endswith(": --beta")


def test_sweep_grids_win_over_the_preset():
  argv = ["--preset", "gem_paper_mnist", "--lr", "0.01,0.03", "--seeds", "2"]
  parser_argv, grid = sweep_cli.split_grid(argv)
  args, notes = setup.parse_args(parser_argv, sweep_cli.build_parser(), grid=grid)
  assert grid == {"lr": [0.01, 0.03]} and args.lr == 0.01 and args.memory_strength == 0.5
  assert notes == ["preset gem_paper_mnist: --lr 0.01,0.03 given, overrides its 0.1"]


def test_unknown_preset_is_one_line_exit_2(capsys):
  assert cli.main(["--preset", "gem_paper"]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.count("\n") == 1
  assert captured.err.startswith(
    "cljax: error: argument --preset: unknown preset 'gem_paper': choose one of " + ", ".join(NAMES)
  )


def test_help_lists_the_presets_and_their_settings(capsys):
  assert cli.main(["--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  for name in NAMES:
    assert f"{name}: {presets.PRESETS[name].about} ({presets.describe(name)})" in text


def test_a_run_records_its_preset(tmp_path, capsys):
  data_dir = tmp_path / "idx"
  conftest.write_idx_dir(data_dir, n_train=60, n_test=20, seed=3)
  tiny = ["--n_tasks", "2", "--samples_per_task", "20", "--n_memories", "4", "--n_hiddens", "8"]
  argv = ["--preset", "gem_paper_mnist", *tiny, "--log_every", "0", "--no_plots"]
  argv += ["--data_path", str(data_dir), "--save_path", str(tmp_path / "out")]
  assert cli.main(argv) == 0
  err = capsys.readouterr().err
  assert err.count("cljax: note: preset gem_paper_mnist: --n_tasks 2 given") == 1, err
  assert "flags not used" not in err
  (folder,) = os.listdir(tmp_path / "out")
  with open(tmp_path / "out" / folder / run_folder.RESULTS_JSON) as f:
    record = json.load(f)
  assert record["config"]["preset"] == "gem_paper_mnist" and record["unused_flags"] == []
  assert (record["train_config"]["lr"], record["train_config"]["batch_size"]) == (0.1, 10)
  assert record["train_config"]["n_memories"] == 4 and record["n_tasks"] == 2


def test_a_papers_method_settings_come_with_the_preset_for_that_method_only():
  # The A-GEM paper's reference sample (256) for agem; not for gem, which does not read it.
  agem, notes = setup.parse_args(["--preset", "gem_paper_mnist", "--model", "agem"])
  assert agem.replay_batch_size == 256 and notes == []
  assert setup.rule_settings(agem)["replay_batch_size"] == 256
  gem, _ = setup.parse_args(["--preset", "gem_paper_mnist", "--model", "gem"])
  assert gem.replay_batch_size == registry.SETTINGS["replay_batch_size"].default
  assert "replay_batch_size" not in setup.rule_settings(gem)  # gem does not read it
  given, notes = setup.parse_args(
    ["--preset", "gem_paper_mnist", "--model", "agem", "--replay_batch_size", "64"]
  )
  assert given.replay_batch_size == 64
  assert notes == ["preset gem_paper_mnist: --replay_batch_size 64 given, overrides its 256"]
  assert "agem: replay_batch_size 256" in presets.describe("gem_paper_mnist")
  assert "agem: replay_batch_size 256" in " ".join(setup.build_parser().format_help().split())


def test_paper_protocols_runs_what_the_preset_runs():
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
  import paper_protocols

  fields = {f.name for f in dataclasses.fields(train.Config)}
  for method, (model, own) in paper_protocols.METHODS.items():
    config, rule, settings = paper_protocols.method_setup(method)
    assert rule.networks == ("per_task" if model == "independent" else "shared")
    for dest, value in presets.settings_for("gem_paper_mnist", model).items():
      if dest in fields:
        assert getattr(config, dest) == own.get(dest, value), (method, dest)
      elif dest in settings:
        assert settings[dest] == own.get(dest, value), (method, dest)
  assert paper_protocols.method_setup("agem")[2]["replay_batch_size"] == 256
