"""Sweeps from the command line (cljax.sweep_cli) and their records (cljax.sweep_folder).

The sweeps run in subprocesses, so that JAX starts there with two host CPU devices (the runs are
split across them); the plain runs they are compared with run in this process.
"""

import json
import os
import signal
import subprocess
import sys
import time

import conftest
import numpy as np
import pytest

from cljax import __main__ as cli
from cljax import run_folder, sweep_cli, sweep_folder
from cljax.errors import CljaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  directory = tmp_path_factory.mktemp("idx")
  conftest.write_idx_dir(directory, n_train=200, n_test=50, seed=7)
  return str(directory)


def flags(data_dir, save, *extra, n_tasks=3, samples=30):
  argv = ["--model", "gem", "--data_path", data_dir, "--save_path", str(save), "--no_plots"]
  argv += ["--n_tasks", str(n_tasks), "--samples_per_task", str(samples), "--n_hiddens", "12"]
  return [*argv, "--log_every", "10", "--n_memories", "5", "--memory_strength", "0.5", *extra]


def child_env():
  """This process's environment for a sweep process, less any host device count in XLA_FLAGS.

  The sweep sets its own device count; other XLA flags (an ISA limit) are kept.
  """
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": " ".join(kept)}


def sweep(argv, **kw):
  """Runs `python -m cljax.sweep_cli argv` in a fresh process (2 workers or 2 host devices)."""
  env = child_env()
  return subprocess.run(
    [sys.executable, "-m", "cljax.sweep_cli", "--workers", "2", "--devices", "2", *argv],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
    **kw,
  )


def run_files(folder):
  runs = os.path.join(folder, sweep_folder.RUNS_DIR)
  return sorted(n for n in os.listdir(runs) if n.endswith(".json"))


def load(folder, name):
  with open(os.path.join(folder, sweep_folder.RUNS_DIR, name)) as f:
    return json.load(f)


def test_sweep_equals_plain_runs_exactly_and_resumes_only_missing_records(tiny_data, tmp_path):
  folder = str(tmp_path / "sweep")
  argv = flags(tiny_data, tmp_path, "--seeds", "2", "--lr", "0.01,0.05", "--sweep_dir", folder)
  done = sweep(argv)
  assert done.returncode == 0, done.stderr
  assert "4 to run" in done.stdout and "2 worker process(es)" in done.stdout
  names = run_files(folder)
  assert names == [f"lr{lr}_ms0.5_seed{s}.json" for lr in ("0.01", "0.05") for s in (0, 1)]
  first = {n: load(folder, n) for n in names}

  # Each record equals the same seed and lr run alone by `python -m cljax`, exactly (CPU).
  for lr, seed in (("0.01", 1), ("0.05", 0)):
    plain_argv = flags(tiny_data, tmp_path / "plain", "--seed", str(seed), "--lr", lr)
    assert cli.main(plain_argv) == 0
    name = run_folder.run_name("gem", "fashion_mnist", "permutations", seed)
    with open(tmp_path / "plain" / name / run_folder.RESULTS_JSON) as f:
      plain = json.load(f)
    record = first[f"lr{lr}_ms0.5_seed{seed}.json"]
    assert record["matrix"] == plain["matrix"]
    assert record["counters"] == plain["counters"]
  assert first[names[0]]["matrix"] != first[names[1]]["matrix"]  # the seeds differ

  # Damage three records: remove one, truncate one, edit a number in one; keep the fourth.
  kept = os.path.join(folder, sweep_folder.RUNS_DIR, names[3])
  kept_mtime = os.stat(kept).st_mtime_ns
  os.remove(os.path.join(folder, sweep_folder.RUNS_DIR, names[0]))
  path = os.path.join(folder, sweep_folder.RUNS_DIR, names[1])
  with open(path, "rb") as f:
    head = f.read(200)
  with open(path, "wb") as f:
    f.write(head)
  edited = load(folder, names[2])
  edited["gem_stats"]["final"] = 0.99
  with open(os.path.join(folder, sweep_folder.RUNS_DIR, names[2]), "w") as f:
    json.dump(edited, f)

  again = sweep(argv)
  assert again.returncode == 0, again.stderr
  assert "1 already recorded, 3 to run" in again.stdout
  assert "unreadable" in again.stderr and "checksum mismatch" in again.stderr
  assert os.stat(kept).st_mtime_ns == kept_mtime  # not run again
  volatile = {"timings": None, "checksum": None}  # when it finished; the checksum covers it
  for name in names:  # same seed, same result
    assert load(folder, name) | volatile == first[name] | volatile

  with open(os.path.join(folder, sweep_folder.SUMMARY_JSON)) as f:
    summary = json.load(f)
  assert [r["n"] for r in summary["rows"]] == [2, 2]
  finals = [first[n]["gem_stats"]["final"] for n in names[:2]]
  assert summary["rows"][0]["final"]["mean"] == pytest.approx(np.mean(finals))
  assert summary["rows"][0]["final"]["std"] == pytest.approx(np.std(finals, ddof=1))
  forgetting = [first[n]["paper_stats"]["forgetting"] for n in names[:2]]
  assert summary["rows"][0]["forgetting"]["mean"] == pytest.approx(np.mean(forgetting))
  with open(os.path.join(folder, sweep_folder.SUMMARY_MD)) as f:
    assert "| 0.01 | 0.5 | 2 |" in f.read()

  # The same folder with other fixed settings is refused, naming the difference.
  other = sweep([*argv, "--n_memories", "6"])
  assert other.returncode == 2
  assert "refusing to mix" in other.stderr and "n_memories: 5 -> 6" in other.stderr
  assert len(other.stderr.strip().splitlines()) == 1
  # A rule's setting is one too (the manifest's rule_settings): gem's ridge eps.
  ridge = sweep([*argv, "--eps", "0.01"])
  assert ridge.returncode == 2 and "eps: 0.001 -> 0.01" in ridge.stderr, ridge.stderr


def test_one_compiled_call_across_two_host_devices(tiny_data, tmp_path):
  folder = str(tmp_path / "sweep")
  argv = flags(tiny_data, tmp_path, "--seeds", "3", "--strategy", "map", "--sweep_dir", folder)
  done = sweep(argv)
  assert done.returncode == 0, done.stderr
  assert "3 runs on 2 cpu device(s), strategy map" in done.stdout
  assert run_files(folder) == [f"lr0.01_ms0.5_seed{s}.json" for s in range(3)]
  # Its records are reused by the default strategy (the same configuration).
  again = sweep([*argv[:-4], "--sweep_dir", folder])
  assert "3 already recorded, 0 to run" in again.stdout


def test_a_killed_sweep_resumes_with_the_missing_records(tiny_data, tmp_path):
  folder = str(tmp_path / "sweep")
  argv = flags(tiny_data, tmp_path, "--seeds", "8", "--sweep_dir", folder, n_tasks=5, samples=150)
  env = child_env()
  proc = subprocess.Popen(
    [sys.executable, "-m", "cljax.sweep_cli", "--workers", "1", *argv],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    cwd=ROOT,
  )
  try:
    for line in proc.stdout:  # kill it right after its first finished run
      if line.startswith("run 1/8 done"):
        proc.send_signal(signal.SIGKILL)
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
  time.sleep(0.1)
  written = run_files(folder)
  assert 1 <= len(written) < 8, written
  resumed = sweep(argv)
  assert resumed.returncode == 0, resumed.stderr
  assert f"{len(written)} already recorded, {8 - len(written)} to run" in resumed.stdout
  assert len(run_files(folder)) == 8
  leftovers = [
    n for n in os.listdir(os.path.join(folder, sweep_folder.RUNS_DIR)) if n.endswith(".tmp")
  ]
  assert not leftovers or all(n.startswith(".") for n in leftovers)


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--n_memories", "5,10"], "--n_memories changes shapes or the compiled program"),
    (["--seed", "1,2"], "use --seeds"),
    (["--model", "gem,agem"], "--model changes shapes"),
    (["--lr", ","], "an empty grid"),
    (["--lr", "0.1,x"], "expected comma-separated numbers"),
    (["--lr", "0.1,-1"], "lr must be a finite number > 0"),
    (["--memory_strength=-1,2"], "memory_strength must be a finite number >= 0"),
    (["--seeds", "0"], "an empty sweep"),
    (["--seeds", "1,1"], "listed twice"),
    (["--seeds", "2", "--seed", "4"], "not both"),
    (["--devices", "0"], "--devices must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
  ],
)
def test_bad_input_is_one_line(tiny_data, tmp_path, capsys, extra, message):
  assert sweep_cli.main([*flags(tiny_data, tmp_path), *extra]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err


def test_grouped_variant_refuses_several_cpu_devices_before_loading(tiny_data, tmp_path):
  argv = flags(tiny_data, tmp_path, "--model", "gem_grouped", "--num_groups", "3", "--seeds", "2")
  done = sweep([*argv, "--strategy", "map", "--devices", "2"])
  assert done.returncode == 2 and done.stdout == ""
  assert done.stderr.strip().endswith("(its CPU default).") and "deadlock" in done.stderr


def test_split_grid_and_seeds():
  argv, grid = sweep_cli.split_grid(["--lr", "0.1,0.3", "--memory_strength=0,10", "--n_tasks", "3"])
  assert argv == ["--lr", "0.1", "--memory_strength", "0.0", "--n_tasks", "3"]
  assert grid == {"lr": [0.1, 0.3], "memory_strength": [0.0, 10.0]}
  assert sweep_cli.parse_seeds("3") == [0, 1, 2]
  assert sweep_cli.parse_seeds("7,") == [7]
  assert sweep_cli.parse_seeds("4,2") == [4, 2]


def test_records_roundtrip_and_reject_foreign_or_damaged(tmp_path):
  fixed = {"variant": "gem", "n_tasks": 2}
  fp = sweep_folder.open_folder(tmp_path, fixed)
  assert sweep_folder.open_folder(tmp_path, fixed) == fp
  with pytest.raises(CljaxError, match="n_tasks: 2 -> 3"):
    sweep_folder.open_folder(tmp_path, {**fixed, "n_tasks": 3})
  setting = sweep_folder.Setting(0.01, 10.0)
  record = {
    "matrix": [[0.5, 0.1], [0.4, 0.6]],
    "gem_stats": {"final": 0.5, "backward": -0.1, "forward": 0.0},
    "counters": {"steps": [3, 3], "projections": [0, 2]},
    "diverged_at_task": None,
  }
  sweep_folder.write_record(tmp_path, record, setting, 1, fp)
  loaded, problem = sweep_folder.load_record(tmp_path, setting, 1, fp)
  assert problem is None and loaded["matrix"] == record["matrix"]
  assert sweep_folder.counter_value(loaded, "projections") == pytest.approx(2 / 3)
  _, problem = sweep_folder.load_record(tmp_path, setting, 1, "0" * 16)
  assert "made for" in problem
  # A record copied under another seed's name is not reused for that seed.
  os.replace(
    sweep_folder.record_path(tmp_path, setting, 1), sweep_folder.record_path(tmp_path, setting, 2)
  )
  assert sweep_folder.load_record(tmp_path, setting, 2, fp)[0] is None
  finished, to_run, problems = sweep_folder.plan(tmp_path, [setting], [1, 2], fp)
  assert finished == [] and to_run == [(setting, 1), (setting, 2)] and len(problems) == 1
