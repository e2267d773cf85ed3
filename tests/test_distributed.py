"""Multi-process sweeps (cljax.distributed, cljax.sweep_cli --coordinator): two local processes.

Each sweep process runs `python -m cljax.sweep_cli` with one host CPU device; two of them on
127.0.0.1 form one sweep over a global mesh of two devices. Tiny settings, as test_sweep_cli's.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_sweep_cli import ROOT, child_env, flags, load, run_files, tiny_data  # noqa: F401

from cljax import distributed, sweep_cli, sweep_folder
from cljax.errors import CljaxError

SAME = ("matrix", "counters", "gem_stats", "paper_stats", "curves", "diverged_at_task")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(argv, *cluster):
  """A sweep process (one host CPU device), started; its output read by `finish`."""
  return subprocess.Popen(
    [sys.executable, "-m", "cljax.sweep_cli", "--devices", "1", *argv, *cluster],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=child_env(),
    cwd=ROOT,
  )


def finish(proc, timeout=240):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def sweep_in(n, argv, timeout_s=20, num_processes=None):
  """Runs the sweep in n processes on 127.0.0.1; [(returncode, stdout, stderr)] by process id."""
  address = f"127.0.0.1:{free_port()}"
  procs = [
    start(
      argv,
      "--coordinator",
      address,
      "--num_processes",
      str(num_processes or n),
      "--process_id",
      str(i),
      "--distributed_timeout",
      str(timeout_s),
    )
    for i in range(n)
  ]
  return [finish(p) for p in procs]


def sweep_alone(argv):
  """The same sweep in one process (the reference), run to its end."""
  return subprocess.run(
    [sys.executable, "-m", "cljax.sweep_cli", *argv],
    capture_output=True,
    text=True,
    env=child_env(),
    cwd=ROOT,
    timeout=240,
  )


def test_two_processes_equal_one_and_resume(tiny_data, tmp_path):  # noqa: F811
  argv = flags(tiny_data, tmp_path, "--seeds", "4", "--strategy", "map")
  one = str(tmp_path / "one")
  done = sweep_alone(["--devices", "2", *argv, "--sweep_dir", one])
  assert done.returncode == 0, done.stderr
  two = str(tmp_path / "two")
  results = sweep_in(2, [*argv, "--sweep_dir", two])
  for code, _, err in results:
    assert code == 0, err
  assert "4 runs on 2 cpu device(s) of 2 processes" in results[0][1]
  assert "process 0: run 2/4 done" in results[0][1] and "process 1: run 2/4 done" in results[1][1]
  assert "| 0.01 | 0.5 | 4 |" in results[0][1]  # the summary, by process 0 alone
  assert "process 1 of 2 done" in results[1][1] and "| 0.01 |" not in results[1][1]
  names = run_files(two)
  assert names == run_files(one) == [f"lr0.01_ms0.5_seed{s}.json" for s in range(4)]
  for name in names:  # the same per-device program: bit for bit
    a, b = load(one, name), load(two, name)
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}, name
  with open(os.path.join(two, sweep_folder.SUMMARY_JSON)) as f:
    assert [r["n"] for r in json.load(f)["rows"]] == [4]

  # Resume: two records lost (as if their process was killed); the other two are kept.
  runs = os.path.join(two, sweep_folder.RUNS_DIR)
  kept = {n: os.stat(os.path.join(runs, n)).st_mtime_ns for n in names[1::2]}
  for name in names[::2]:
    os.remove(os.path.join(runs, name))
  again = sweep_in(2, [*argv, "--sweep_dir", two])
  for code, _, err in again:
    assert code == 0, err
  assert "2 already recorded, 2 to run" in again[0][1]
  assert run_files(two) == names
  assert {n: os.stat(os.path.join(runs, n)).st_mtime_ns for n in names[1::2]} == kept
  for name in names[::2]:
    assert load(two, name)["matrix"] == load(one, name)["matrix"]


def test_two_processes_share_the_plain_runs_of_strategy_processes(tiny_data, tmp_path):  # noqa: F811
  # --strategy processes across processes: each process runs every 2nd run in its own worker
  # (the plain compiled run), so every record equals the one-process sweep's bit for bit.
  argv = flags(tiny_data, tmp_path, "--seeds", "4", "--strategy", "processes", "--workers", "1")
  one = str(tmp_path / "one")
  done = sweep_alone([*argv, "--sweep_dir", one])
  assert done.returncode == 0, done.stderr
  two = str(tmp_path / "two")
  results = sweep_in(2, [*argv, "--sweep_dir", two])
  for code, _, err in results:
    assert code == 0, err
  for out in (results[0][1], results[1][1]):  # a share of 2 each
    assert "2 runs in 1 worker process(es), strategy processes" in out, out
  assert "| 0.01 | 0.5 | 4 |" in results[0][1]  # the summary, by process 0 alone
  names = run_files(two)
  assert names == run_files(one) == [f"lr0.01_ms0.5_seed{s}.json" for s in range(4)]
  for name in names:
    a, b = load(one, name), load(two, name)
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}, name


def test_settings_that_differ_between_processes_are_one_line(tiny_data, tmp_path):  # noqa: F811
  folder = str(tmp_path / "sweep")
  argv = flags(tiny_data, tmp_path, "--seeds", "2", "--sweep_dir", folder)
  address = f"127.0.0.1:{free_port()}"
  cluster = ["--coordinator", address, "--num_processes", "2", "--distributed_timeout", "20"]
  procs = [
    start(argv, *cluster, "--process_id", "0"),
    start([*argv, "--n_memories", "6"], *cluster, "--process_id", "1"),
  ]
  for code, _, err in (finish(p) for p in procs):  # the manifest's differences, or the folder's
    assert code == 2
    assert "the processes disagree on manifest" in err or "n_memories: " in err, err
    assert len(err.strip().splitlines()) == 1, err
  assert run_files(folder) == []


def test_unreachable_coordinator_fails_fast_in_one_line(tiny_data, tmp_path):  # noqa: F811
  argv = flags(tiny_data, tmp_path, "--seeds", "2", "--sweep_dir", str(tmp_path / "s"))
  port = free_port()  # nobody listens there
  t0 = time.perf_counter()
  code, out, err = finish(
    start(
      argv,
      *("--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "1"),
      *("--distributed_timeout", "2"),
    )
  )
  assert time.perf_counter() - t0 < 30
  assert code == 2 and out == ""
  assert f"cannot reach the coordinator 127.0.0.1:{port} within 2 s" in err
  assert len(err.strip().splitlines()) == 1, err


def test_missing_processes_fail_fast_in_one_line(tiny_data, tmp_path):  # noqa: F811
  # Process 0 of 2 alone: the other never registers (a wrong --num_processes).
  argv = flags(tiny_data, tmp_path, "--seeds", "2", "--sweep_dir", str(tmp_path / "s"))
  t0 = time.perf_counter()
  (code, out, err), *_ = sweep_in(1, argv, timeout_s=2, num_processes=2)
  assert time.perf_counter() - t0 < 40
  assert code == 2 and out == ""
  assert "process 0 could not join 2 process(es)" in err and "within 2 s" in err
  assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--coordinator", "h:1", "--num_processes", "2", "--process_id", "2"], "out of range"),
    (["--coordinator", "h:1", "--num_processes", "2", "--process_id", "-1"], "out of range"),
    (["--coordinator", "h:1", "--num_processes", "0", "--process_id", "0"], "must be >= 1"),
    (["--coordinator", "h:1", "--num_processes", "2"], "needs --num_processes and --process_id"),
    (["--coordinator", "h1", "--num_processes", "2", "--process_id", "0"], "HOST:PORT"),
    (["--num_processes", "2", "--process_id", "0"], "need --coordinator"),
    (["--distributed", "auto", "--process_id", "0"], "--distributed auto or"),
    (
      [
        *("--coordinator", "h:1", "--num_processes", "2", "--process_id", "0"),
        "--distributed_timeout",
        "0",
      ],
      "--distributed_timeout must be",
    ),
  ],
)
def test_bad_cluster_flags_are_one_line(tiny_data, tmp_path, capsys, extra, message):  # noqa: F811
  assert sweep_cli.main([*flags(tiny_data, tmp_path), *extra]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err
  assert not distributed.is_joined()


def test_one_process_helpers():
  assert distributed.process() == (0, 1)
  assert distributed.share([1, 2, 3]) == [1, 2, 3]
  assert distributed.gather("x", "v", 1.0) == ["v"]
  distributed.agree("x", "v", 1.0)
  with pytest.raises(CljaxError, match="out of range"):
    distributed.check(distributed.Cluster("h:1", 2, 5))
