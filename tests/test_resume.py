"""Long runs as users live them: live lines with the compile cache on, checkpoints, --resume.

Compared against: the uninterrupted run of the same program on this machine (bit for bit), the
scan-over-tasks program (`make_train`: the driven pieces are its bodies), and the one-line
refusal of a checkpoint written under other settings.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cljax import __main__ as cli
from cljax import checkpoints, run_folder
from cljax.errors import CljaxError
from cljax.rules import make
from cljax.train import Config, make_task_runner, make_train, schedule, stack

SHORT = ["--model", "agem", "--n_tasks", "4", "--samples_per_task", "100", "--log_every", "50"]


def results(folder):
  (name,) = [n for n in os.listdir(folder) if not n.startswith(".")]
  with open(os.path.join(folder, name, run_folder.RESULTS_JSON)) as f:
    return json.load(f), os.path.join(folder, name)


@pytest.mark.realdata
def test_the_driven_pieces_compute_the_scan_bit_for_bit(real_stream):
  config = Config(n_memories=8, log_every=100, memory_strength=0.5, lr=0.02)
  key = jax.random.key(0)
  whole = jax.device_get(jax.jit(make_train(config, make("gem")))(key, real_stream))
  runner = make_task_runner(config, make("gem"))
  start, start_task, chunk, end = (
    jax.jit(f) for f in (runner.start, runner.start_task, runner.chunk, runner.end_task)
  )
  _, _, n_chunks = schedule(config, real_stream)
  state, baseline = start(key, real_stream)
  outputs = []
  for t in range(real_stream.train_idx.shape[0]):
    state = start_task(state, np.int32(t), key, real_stream)
    chunks = []
    for c in range(n_chunks):
      state, out = chunk(state, np.int32(t), np.int32(c), key, real_stream)
      chunks.append(out)
    state, out = end(state, np.int32(t), stack(chunks), key, real_stream)
    outputs.append(jax.device_get(out))
  driven = runner.finish(jax.device_get(baseline), outputs, jax.device_get(state))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(driven), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.realdata
def test_a_run_killed_after_its_second_task_resumes_to_the_uninterrupted_result(
  real_fashion_dir, tmp_path, capsys
):
  killed, whole = tmp_path / "killed", tmp_path / "whole"
  argv = [*SHORT, "--data_path", real_fashion_dir, "--no_plots"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "cljax", *argv, "--save_path", str(killed)],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.startswith("task 0 done"):
        assert proc.poll() is None  # a task's line, live, before the run ends (cache on)
      if line.startswith("task 1 done"):
        proc.send_signal(signal.SIGKILL)  # its checkpoint was written before the line
        break
  finally:
    proc.wait(timeout=120)
  assert proc.returncode == -signal.SIGKILL, seen
  folder = killed / os.listdir(killed)[0]
  assert checkpoints.latest(str(folder))[0] == 2 and not (folder / run_folder.RESULTS_JSON).exists()

  assert cli.main([*argv, "--save_path", str(killed), "--resume"]) == 0
  out = capsys.readouterr().out
  assert "resuming after task 1 (2 of 4 done)" in out and "task 1 done" not in out
  assert cli.main([*argv, "--save_path", str(whole)]) == 0
  resumed, resumed_folder = results(killed)
  uninterrupted, _ = results(whole)
  assert resumed["seed_line"] == uninterrupted["seed_line"]
  for key in ("matrix", "baseline", "curves", "counters", "finite"):
    assert resumed[key] == uninterrupted[key], key
  assert not os.path.exists(os.path.join(resumed_folder, checkpoints.CHECKPOINTS))  # completed


@pytest.mark.realdata
def test_a_checkpoint_of_other_settings_is_refused_in_one_line(real_fashion_dir, tmp_path, capsys):
  argv = [*SHORT, "--n_tasks", "2", "--data_path", real_fashion_dir, "--no_plots"]
  argv += ["--save_path", str(tmp_path)]
  assert cli.main([*argv, "--keep_checkpoints"]) == 0
  _, folder = results(tmp_path)
  assert checkpoints.latest(folder)[0] == 2  # kept, as asked
  capsys.readouterr()
  assert cli.main([*argv, "--resume", "--lr", "0.02"]) == 2
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.startswith("cljax: error: ")]
  assert len(lines) == 1 and "written under other settings or another stream" in lines[0], err
  assert "Traceback" not in err
  # A rule's own setting (results.json's rule_settings) is part of the settings too.
  assert cli.main([*argv, "--resume", "--replay_batch_size", "5"]) == 2
  assert "written under other settings" in capsys.readouterr().err
  assert cli.main([*argv, "--resume", "--keep_checkpoints"]) == 0  # the same settings resume


def test_a_damaged_checkpoint_is_one_line(tmp_path):
  path = tmp_path / "checkpoints" / "task_1"
  (path / "payload").mkdir(parents=True)  # the fingerprint matches, the payload is not Orbax's
  (path / checkpoints.FINGERPRINT).write_text(json.dumps({"fingerprint": "abc", "tasks_done": 1}))
  assert checkpoints.latest(str(tmp_path)) == (1, str(path))
  like = {"a": jax.ShapeDtypeStruct((3,), np.float32)}
  with pytest.raises(CljaxError, match="cannot read the checkpoint in") as info:
    checkpoints.restore(str(path), like, "abc")
  assert "\n" not in str(info.value)
  with pytest.raises(CljaxError, match="written under other settings or another stream"):
    checkpoints.restore(str(path), like, "another")
