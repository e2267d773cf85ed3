"""The command line (`python -m cljax`) and cljax.run_folder: parsing, runs on tiny data, files."""

import io
import json
import math
import os
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout

import conftest
import numpy as np
import pytest

from cljax import __main__ as cli
from cljax import data, run_folder, train
from cljax import run_setup as setup
from cljax.errors import CljaxError
from cljax.rules.registry import VARIANTS

# The seed's command (end of its section 3), verbatim.
SEED_COMMAND = (
  "python main.py --model Agem --n_tasks 10 --lr 0.01 --n_memories 10 --memory_strength 10 "
  "--n_layers 2 --n_hiddens 100 --data_path data/ --save_path results/ --batch_size 1 "
  "--log_every 100 --samples_per_task 1000 --cuda no --seed 3 --beta 0.03 --gamma 1.0 "
  "--memories 200 --replay_batch_size 10 --batches_per_example 10 --forgetting_mode False "
  "--forgetting_task_ids 0,5 --forgetting_resee_size 100 --sign_attacked -1.0 --num_groups 20 "
  "--cov_recompute_every 20 --create_random_groups False --divergence von_Neumann "
  "--if_output_cov False --cov_first_task_buffer 100 --data_file "
  "fashion_mnist_permutations_reduced.pt --ewc_reverse False --create_group_per_unit False"
)
SEED_ARGV = shlex.split(SEED_COMMAND)[2:]
N_TASKS = 3
RECORD_KEYS = {
  "schema",
  "variant",
  "config",
  "train_config",
  "rule_settings",
  "n_tasks",
  "matrix",
  "baseline",
  "curves",
  "counters",
  "finite",
  "diverged_at_task",
  "gem_stats",
  "paper_stats",
  "seed_line",
  "versions",
  "timings",
  "device",
  "argv",
  "unused_flags",
  "stream",
  "schedule",
  "compile_cache",
}
PNGS = {run_folder.MATRIX_PNG, run_folder.CURVES_PNG}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """200 train / 50 test random IDX examples."""
  directory = tmp_path_factory.mktemp("idx")
  conftest.write_idx_dir(directory, n_train=200, n_test=50, seed=7)
  return str(directory)


def tiny_argv(data_dir, save_path, variant, *extra):
  """A run that compiles and runs in seconds: 3 tasks of 30 examples, a 2 x 12 MLP."""
  argv = ["--model", variant, "--data_path", data_dir, "--save_path", str(save_path)]
  argv += ["--n_tasks", str(N_TASKS), "--samples_per_task", "30", "--n_hiddens", "12"]
  return [*argv, "--log_every", "10", "--n_memories", "5", *extra]


def run_cli(capsys, argv):
  status = cli.main(argv)
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def printed_matrix(out, n_tasks):
  """The accuracy matrix from the seed line that the CLI prints."""
  line = next(x for x in out.splitlines() if "Final Accuracy:" in x)
  values = [float(v) for v in line.split(" Final Accuracy:")[0].split()]
  return np.array(values).reshape(n_tasks, n_tasks)


def load_record(folder):
  with open(os.path.join(folder, run_folder.RESULTS_JSON)) as f:
    return json.load(f, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def one_error_line(err):
  lines = [x for x in err.splitlines() if x.startswith("cljax: error: ")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


# --- parsing --------------------------------------------------------------------------------------


def test_seed_command_parses_verbatim():
  args, notes = setup.parse_args(SEED_ARGV)
  assert args.model == "agem" and args.agem_ref == "pooled"  # the seed's "Agem"
  assert (args.dataset, args.protocol) == ("fashion_mnist", "permutations")  # from --data_file
  assert args.n_tasks == 10 and args.samples_per_task == 1000 and args.seed == 3
  assert args.memory_strength == 10.0 and args.replay_batch_size == 10 and args.cuda == "no"
  assert args.forgetting_mode is False and args.ewc_reverse is False
  assert args.forgetting_task_ids == [0, 5] and args.sign_attacked == -1.0
  assert args.divergence == "von_Neumann" and args.memories == 200 and args.beta == 0.03
  setup.train_config(args)  # valid for the engine

  unused_notes = [n for n in notes if n.startswith("flags not used by")]
  assert len(unused_notes) == 1
  note = unused_notes[0]
  assert note.startswith("flags not used by agem (--agem_ref pooled): --memory_strength, --beta, ")
  listed = note.split(": ", 1)[1].split(", ")
  assert len(listed) == len(set(listed))
  grouped = {f"--{f}" for f in setup.GROUPED_FLAGS if f in args.given}  # agem has no groups
  assert len(grouped) == 8
  assert set(listed) == {"--memory_strength"} | {f"--{f}" for f in setup.SEED_ONLY_FLAGS} | grouped
  assert any("fashion_mnist_permutations_reduced.pt is not read" in n for n in notes)


def test_defaults_are_the_seeds_configuration():
  args, notes = setup.parse_args([])
  assert notes == [] and args.given == {}
  expected = dict(
    model="agem_new",
    dataset="fashion_mnist",
    protocol="permutations",
    n_tasks=10,
    samples_per_task=1000,
    lr=0.01,
    n_memories=10,
    memory_strength=10.0,
    n_layers=2,
    n_hiddens=100,
    batch_size=1,
    seed=3,
    log_every=100,
    save_path="results/",
    test_samples=None,
    init="gem",
    source="auto",
  )
  assert {k: getattr(args, k) for k in expected} == expected
  config = setup.train_config(args)
  assert args.model == "agem_new"
  assert (config.lr, config.batch_size, config.log_every) == (0.01, 1, 100)
  assert (config.n_memories, config.memory_strength, config.n_layers, config.n_hiddens) == (
    10,
    10.0,
    2,
    100,
  )


def test_later_flags_override_and_unused_flags_are_listed_once():
  argv = ["--model", "single", "--beta", "1", "--n_memories", "3", "--beta", "2", "--lr=0.5"]
  args, notes = setup.parse_args(argv)
  assert args.beta == 2.0 and args.lr == 0.5
  assert notes == ["flags not used by single: --beta, --n_memories"]


@pytest.mark.parametrize(
  "variant,ref,unused",
  [
    ("single", "pooled", ["--n_memories", "--memory_strength", "--replay_batch_size", "--eps"]),
    ("gem", "pooled", ["--replay_batch_size"]),
    ("agem", "pooled", ["--memory_strength", "--eps"]),
    ("agem", "task_mean", ["--memory_strength", "--replay_batch_size", "--eps"]),
    ("agem_old", "pooled", ["--replay_batch_size"]),
    ("agem_new", "pooled", ["--memory_strength", "--replay_batch_size", "--eps"]),
    ("agem_qp_mean", "pooled", ["--replay_batch_size"]),
  ],
)
def test_unused_flags_per_variant(variant, ref, unused):
  given = ["--n_memories", "5", "--memory_strength", "1", "--replay_batch_size", "4"]
  given += ["--eps", "1e-4"]
  args, _ = setup.parse_args(["--model", variant, *given, "--agem_ref", ref])
  expected = unused + (["--agem_ref"] if variant != "agem" else [])
  assert setup.unused_flags(args) == expected


@pytest.mark.parametrize(
  "name,variant", [("Agem", "agem"), ("GEM", "gem"), ("AGEM_New", "agem_new")]
)
def test_model_names_are_case_insensitive(name, variant):
  assert setup.parse_args(["--model", name])[0].model == variant


@pytest.mark.parametrize(
  "argv,dataset,protocol",
  [
    (["--data_file", "mnist_rotations.pt"], "mnist", "rotations"),
    (["--data_file", "data/mnist_permutations.pt"], "mnist", "permutations"),
    (["--data_file", "mnist_rotations.pt", "--protocol", "permutations"], "mnist", "permutations"),
    (
      ["--data_file", "x.pt", "--dataset", "mnist", "--protocol", "rotations"],
      "mnist",
      "rotations",
    ),
  ],
)
def test_data_file_sets_dataset_and_protocol_unless_given(argv, dataset, protocol):
  args, notes = setup.parse_args(argv)
  assert (args.dataset, args.protocol) == (dataset, protocol)
  assert len(notes) == 1 and "is not read" in notes[0]


def test_data_file_that_names_nothing_is_an_error():
  with pytest.raises(CljaxError, match="cannot tell the dataset and protocol from --data_file"):
    setup.parse_args(["--data_file", "cifar100.pt"])


def test_help(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--samples_per_task", "--forgetting_mode", "--agem_ref", "--no_plots"):
    assert flag in out


# --- bad input: one line on stderr, exit status 2, before any compiling ---------------------------


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--model", "icarl"], "unknown variant 'icarl': choose one of " + ", ".join(VARIANTS)),
    (["--bogus", "3"], "unknown flag: --bogus"),
    (["--lr", "0.1", "--bogus=1", "--also"], "unknown flags: --bogus, --also"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--lr", "-0.5"], "lr must be a finite number > 0, got -0.5"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (
      ["--model", "gem", "--memory_strength", "inf"],
      "memory_strength must be a finite number >= 0",
    ),
    (["--model", "gem", "--n_memories", "0"], "gem reads the episodic memory: n_memories must be"),
    (["--batch_size", "31"], "batch_size 31 is larger than samples_per_task 30"),
    (["--ewc_reverse", "yes"], "argument --ewc_reverse: expected True or False, got 'yes'"),
    (["--forgetting_task_ids", "0,x"], "expected comma-separated integers"),
    (["--cuda", "maybe"], "expected yes or no, got 'maybe'"),
    (["--n_tasks", "0"], "n_tasks must be >= 1"),
    (["--n_tasks", "x"], "invalid int value: 'x'"),
    (["--protocol", "blur"], "invalid choice: 'blur'"),
    (["--samples_per_task", "-1"], "samples_per_task must be >= 1"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--dataset", "mnist", "--data_path", "/nonexistent/dir"], "does not exist"),
    (["extra"], "unexpected argument 'extra'"),
    (
      [
        "--model",
        "gem_grouped",
        "--create_random_groups",
        "True",
        "--create_group_per_unit",
        "True",
      ],
      "contradict each other",
    ),
    (["--model", "gem_grouped", "--divergence", "KL"], "only von_Neumann"),
    (["--model", "gem_grouped", "--num_groups", "200"], "num_groups (200) exceeds n_hiddens (100)"),
    (
      ["--model", "agem_grouped", "--create_group_per_unit", "True", "--num_groups", "20"],
      "makes n_hiddens (100) groups",
    ),
    (
      ["--model", "gem_grouped", "--gem_ignore_relatedness", "True", "--ewc_reverse", "True"],
      "--ewc_reverse True would have no effect",
    ),
    (
      ["--model", "gem_grouped", "--create_random_groups", "True", "--cluster_iters", "3"],
      "--cluster_iters applies to clustered groups, not to random groups",
    ),
    (["--model", "gem_grouped", "--cluster_max_size", "3"], "cluster_max_size must be in"),
    (["--model", "agem_qp_grouped", "--memory_grads", "explicit"], "memory_grads 'factored'"),
  ],
)
def test_bad_input_is_one_line_exit_2(tiny_data, tmp_path, capsys, no_data_env, argv, match):
  base = ["--data_path", tiny_data, "--samples_per_task", "30", "--save_path", str(tmp_path)]
  status, out, err = run_cli(capsys, [*base, *argv])
  assert status == 2 and out == ""
  assert err.startswith("cljax: error: ") and err.count("\n") == 1, err
  assert match in err and "Traceback" not in err
  assert os.listdir(tmp_path) == []  # nothing written


def test_gem_data_path_without_idx_files_falls_back_with_data_file(
  tiny_data, tmp_path, capsys, monkeypatch
):
  # GEM's --data_path data/ holds .pt files: with --data_file, the default data is read instead
  # (here $CLJAX_DATA). The run stops at a bad batch size, after loading: no compiling.
  monkeypatch.setenv(data.DATA_PATH_ENV, tiny_data)
  gem_folder = tmp_path / "data"
  gem_folder.mkdir()
  argv = ["--data_path", str(gem_folder), "--data_file", "fashion_mnist_permutations_reduced.pt"]
  argv += ["--samples_per_task", "20", "--batch_size", "21"]
  status, _, err = run_cli(capsys, argv)
  assert status == 2
  assert f"cljax: note: --data_path {gem_folder} holds no IDX files" in err
  assert "batch_size 21 is larger than samples_per_task 20" in one_error_line(err)
  # Without --data_file the folder is taken at its word.
  status, _, err = run_cli(capsys, ["--data_path", str(gem_folder)])
  assert status == 2 and "IDX files missing" in one_error_line(err)


# --- runs on tiny generated data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def single_run(tiny_data, tmp_path_factory):
  """One `single` run through main: (argv, folder, status, stdout, stderr).

  Module-scoped (one compile for several tests), so it captures output itself: capsys is per test.
  """
  save = tmp_path_factory.mktemp("results")
  argv = tiny_argv(tiny_data, save, "single", "--cuda", "no", "--beta", "0.5")
  out, err = io.StringIO(), io.StringIO()
  with redirect_stdout(out), redirect_stderr(err):
    status = cli.main(argv)
  folder = os.path.join(save, run_folder.run_name("single", "fashion_mnist", "permutations", 3))
  return argv, folder, status, out.getvalue(), err.getvalue()


def test_single_run_prints_progress_the_seed_line_and_wall_time(single_run):
  _, folder, status, out, err = single_run
  assert status == 0, (out, err)
  lines = out.splitlines()
  assert lines[0].startswith("single on fashion_mnist permutations (idx: ")
  assert f"{N_TASKS} tasks x 30 samples, 50 test; seed 3; device cpu" in lines[0]
  assert lines[1].startswith("compiled in ") and f"training {N_TASKS} tasks x 30 steps" in lines[1]
  progress = [x for x in lines if x.startswith("task ")]
  assert [x.split(":")[0] for x in progress] == [
    f"task {t} done ({t + 1}/{N_TASKS})" for t in range(N_TASKS)
  ]
  seed_line = lines[2 + N_TASKS]
  assert " Final Accuracy: " in seed_line and " Backward: " in seed_line
  assert lines[3 + N_TASKS].startswith("wall time: ") and "compile" in lines[3 + N_TASKS]
  assert lines[4 + N_TASKS] == f"results: {folder}"
  assert err.count("\n") == 2, err
  assert "cljax: note: flags not used by single: --n_memories, --beta\n" in err
  assert "cljax: note: --cuda no: JAX picks the device itself; running on cpu" in err


def test_single_run_writes_results_json_and_pngs(single_run):
  argv, folder, status, out, _ = single_run
  assert status == 0
  assert sorted(os.listdir(folder)) == sorted({run_folder.RESULTS_JSON} | PNGS)  # no temp files
  for png in PNGS:
    with open(os.path.join(folder, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  record = load_record(folder)
  assert set(record) == RECORD_KEYS
  T = N_TASKS
  assert record["variant"] == "single" and record["n_tasks"] == T and record["argv"] == argv
  R = np.array(record["matrix"])
  assert R.shape == (T, T) and np.all((R >= 0) & (R <= 1))
  np.testing.assert_allclose(printed_matrix(out, T), R, atol=5e-5)  # what was printed
  assert record["seed_line"] in out
  assert np.array(record["baseline"]).shape == (T,)
  curve, step = np.array(record["curves"]["accuracy"]), np.array(record["curves"]["step"])
  assert curve.shape == (T, 3, T) and step.shape == (T, 3)
  np.testing.assert_array_equal(curve[:, -1], R)
  np.testing.assert_array_equal(step.ravel(), 10 * np.arange(1, 3 * T + 1))
  assert set(record["counters"]) == set(train.ENGINE_COUNTERS)  # single reports none of its own
  assert record["counters"]["steps"] == [30] * T
  assert record["finite"] == [True] * T and record["diverged_at_task"] is None
  assert set(record["gem_stats"]) == {"final", "backward", "forward"}
  assert set(record["paper_stats"]) == {"acc", "bwt", "fwt", "forgetting"}
  assert math.isclose(record["gem_stats"]["final"], R[-1].mean(), abs_tol=1e-6)
  assert set(record["versions"]) == {"python", *run_folder.PACKAGES}
  assert record["versions"]["cljax"] is not None
  assert set(record["timings"]) == {"data_load", "compile", "run", "total"}
  assert all(v >= 0 for v in record["timings"].values())
  assert record["device"]["platform"] == "cpu"
  config = record["config"]
  assert config["beta"] == 0.5 and config["forgetting_mode"] is None and config["cuda"] == "no"
  assert record["unused_flags"] == ["--n_memories", "--beta"]
  assert record["variant"] == "single" and record["train_config"]["n_hiddens"] == 12
  assert record["rule_settings"] == {}  # single has none
  assert record["stream"]["samples_per_task"] == 30 and record["stream"]["test_samples"] == 50
  assert record["schedule"] == {"steps_per_task": 30, "steps_per_chunk": 10, "chunks_per_task": 3}


def test_same_seed_same_matrix_and_rerun_overwrites(single_run, capsys):
  argv, folder, *_ = single_run
  first = load_record(folder)
  status, out, _ = run_cli(capsys, argv)  # the same command again, into the same folder
  assert status == 0
  second = load_record(folder)
  assert sorted(os.listdir(folder)) == sorted({run_folder.RESULTS_JSON} | PNGS)
  for key in ("matrix", "baseline", "curves", "counters", "seed_line"):
    assert second[key] == first[key], key
  np.testing.assert_allclose(printed_matrix(out, N_TASKS), first["matrix"], atol=5e-5)


def test_gem_run(tiny_data, tmp_path, capsys):
  # samples_per_task beyond the 200 examples: clamped, with one warning line.
  argv = tiny_argv(tiny_data, tmp_path, "gem", "--n_tasks", "2", "--samples_per_task", "1000")
  status, out, err = run_cli(capsys, [*argv, "--replay_batch_size", "3", "--log_every", "100"])
  assert status == 0, err
  assert err == (
    "cljax: note: flags not used by gem: --replay_batch_size\n"
    "cljax: warning: samples_per_task=1000 exceeds the 200 examples available; using 200\n"
  )
  folder = tmp_path / "gem_fashion_mnist_permutations_seed3"
  assert sorted(os.listdir(folder)) == sorted({run_folder.RESULTS_JSON} | PNGS)
  record = load_record(folder)
  np.testing.assert_allclose(printed_matrix(out, 2), record["matrix"], atol=5e-5)
  counters = record["counters"]
  assert counters["steps"] == [200, 200] and counters["violations"][0] == 0  # no past task yet
  assert counters["qp_failures"] == [0, 0]
  assert record["stream"]["samples_per_task"] == 200


@pytest.mark.parametrize(
  "variant,ref",
  [
    ("agem", "pooled"),
    ("agem_new", "pooled"),
    # The CLI's path is the same for these: marked slow, so that `-m "not slow"` skips them.
    pytest.param("agem", "task_mean", marks=pytest.mark.slow),
    pytest.param("agem_old", "pooled", marks=pytest.mark.slow),
    pytest.param("agem_qp_mean", "pooled", marks=pytest.mark.slow),
  ],
)
def test_other_variants_run_without_plots(tiny_data, tmp_path, capsys, variant, ref):
  argv = tiny_argv(tiny_data, tmp_path, variant, "--n_tasks", "2", "--agem_ref", ref)
  status, out, err = run_cli(capsys, [*argv, "--no_plots"])
  assert status == 0, err
  folder = tmp_path / run_folder.run_name(variant, "fashion_mnist", "permutations", 3, agem_ref=ref)
  assert os.listdir(folder) == [run_folder.RESULTS_JSON]
  record = load_record(folder)
  assert record["variant"] == variant and "variant" not in record["train_config"]
  assert record["finite"] == [True, True]
  if variant == "agem":
    assert record["rule_settings"]["agem_ref"] == ref
  np.testing.assert_allclose(printed_matrix(out, 2), record["matrix"], atol=5e-5)


def test_grouped_run_names_its_settings_and_records_them(tiny_data, tmp_path, capsys):
  argv = tiny_argv(tiny_data, tmp_path, "gem_grouped", "--n_tasks", "2", "--no_plots")
  argv += ["--num_groups", "3", "--cov_recompute_every", "5", "--cov_first_task_buffer", "20"]
  status, out, err = run_cli(capsys, [*argv, "--memory_strength", "1", "--bias_once", "True"])
  assert status == 0, err
  assert err == "cljax: note: flags not used by gem_grouped: --memory_strength\n"
  name = "gem_grouped-num_groups-3-cov_recompute_every-5-cov_first_task_buffer-20-bias_once-True"
  folder = tmp_path / f"{name}_fashion_mnist_permutations_seed3"
  record = load_record(folder)
  grouped = record["rule_settings"]["grouped"]
  assert grouped["num_groups"] == 3 and grouped["grouping"] == "cluster" and grouped["bias_once"]
  assert grouped["cov_first_task_buffer"] == 20 and record["finite"] == [True, True]
  np.testing.assert_allclose(printed_matrix(out, 2), record["matrix"], atol=5e-5)
  # one unit per group: --num_groups follows --n_hiddens
  args, _ = setup.parse_args(["--model", "agem_grouped", "--create_group_per_unit", "True"])
  assert setup.rule_settings(args)["grouped"].num_groups == 100


def test_divergence_keeps_results_and_exits_1(tiny_data, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # and: no matplotlib, no PNGs
  argv = tiny_argv(tiny_data, tmp_path, "single", "--lr", "1e30", "--n_hiddens", "4")
  status, out, err = run_cli(capsys, argv)
  assert status == 1
  folder = str(tmp_path / "single_fashion_mnist_permutations_seed3")
  assert one_error_line(err) == (
    "cljax: error: parameters became non-finite while training task 0; tasks 1-2 were not "
    f"trained; results so far are kept in {folder}; try a lower --lr"
  )
  assert "cljax: note: matplotlib is not installed (pip install 'cljax[plot]')" in err
  assert f"results: {folder}" in out and "Final Accuracy:" in out
  assert os.listdir(folder) == [run_folder.RESULTS_JSON]
  record = load_record(folder)
  assert record["diverged_at_task"] == 0 and record["finite"] == [False] * N_TASKS
  assert record["counters"]["steps"][1:] == [0, 0]


# --- cljax.run_folder without a run ---------------------------------------------------------------


def test_divergence_message_names_the_tasks():
  assert "task 1 was not trained; " in setup.divergence_message(0, 2, "gem", "f")
  last = setup.divergence_message(4, 5, "gem", "f")
  assert "not trained" not in last and last.endswith("try a lower --lr or --memory_strength")


def test_run_name():
  assert run_folder.run_name("gem", "mnist", "rotations", 1) == "gem_mnist_rotations_seed1"
  assert run_folder.run_name("agem", "mnist", "rotations", 1, agem_ref="task_mean") == (
    "agem_task_mean_mnist_rotations_seed1"
  )
  assert run_folder.run_name("agem_new", "mnist", "rotations", 1, agem_ref="pooled") == (
    "agem_new_mnist_rotations_seed1"
  )


def test_dumps_is_strict_json_with_null_for_non_finite():
  record = run_folder._jsonable(
    {"m": np.float32([[0.7113, np.nan], [np.inf, 1.0]]), "n": np.int32(3), "b": np.bool_(True)}
  )
  text = run_folder.dumps(record)
  assert json.loads(text) == {"m": [[0.7113, None], [None, 1.0]], "n": 3, "b": True}
  assert "[0.7113, null]" in text  # rows of numbers on one line


def test_write_atomic_replaces_and_cleans_up(tmp_path):
  path = tmp_path / "results.json"
  run_folder.write_atomic(path, b"old")
  run_folder.write_atomic(path, b"new")
  assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["results.json"]
  with pytest.raises(TypeError):
    run_folder.write_atomic(path, "not bytes")
  assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["results.json"]


def test_plots_are_pngs():
  R = np.random.default_rng(0).uniform(size=(4, 4))
  assert run_folder.plot_matrix(R).startswith(b"\x89PNG")
  curve = np.random.default_rng(1).uniform(size=(4, 2, 4))
  steps = np.arange(1, 9).reshape(4, 2) * 5
  assert run_folder.plot_curves(curve, steps, R[0]).startswith(b"\x89PNG")
