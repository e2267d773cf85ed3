"""cljax.compile_cache through `python -m cljax`: hits in a fresh process, off, an unusable folder.

Each run is a fresh process (JAX opens its persistent cache once per process) on tiny generated
data; what is asserted is counted by JAX (cache look-ups, hits, writes), never timed.
"""

import json
import os
import subprocess
import sys

import conftest
import pytest

from cljax import compile_cache, run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  directory = tmp_path_factory.mktemp("idx")
  conftest.write_idx_dir(directory, n_train=100, n_test=20, seed=3)
  return str(directory)


def run_cli(data_dir, save, cache_dir, variant, *extra, jax_cache_dir=None):
  """`python -m cljax` (2 tasks x 20 examples) in a fresh process with CLJAX_CACHE_DIR."""
  argv = ["--model", variant, "--data_path", data_dir, "--save_path", str(save), "--no_plots"]
  argv += ["--n_tasks", "2", "--samples_per_task", "20", "--test_samples", "10"]
  argv += ["--n_hiddens", "8", "--log_every", "0", *extra]
  env = {**os.environ, "PYTHONPATH": ROOT, compile_cache.CACHE_DIR_ENV: str(cache_dir)}
  if jax_cache_dir is not None:
    env[compile_cache.JAX_CACHE_DIR_ENV] = str(jax_cache_dir)
  return subprocess.run(
    [sys.executable, "-m", "cljax", *argv],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
  )


def record_of(save, variant, seed):
  name = run_folder.run_name(variant, "fashion_mnist", "permutations", seed)
  with open(os.path.join(save, name, run_folder.RESULTS_JSON)) as f:
    return json.load(f)


def wall_time_line(out):
  return next(x for x in out.splitlines() if x.startswith("wall time: "))


def test_second_run_in_a_fresh_process_loads_its_program_from_the_cache(tiny_data, tmp_path):
  cache = tmp_path / "cache"
  cold = run_cli(tiny_data, tmp_path, cache, "gem", "--n_memories", "4", "--seed", "1")
  assert cold.returncode == 0, cold.stderr
  first = record_of(tmp_path, "gem", 1)
  assert first["compile_cache"] == {"enabled": True, "dir": str(cache), "hit": False}
  assert "(from cache)" not in wall_time_line(cold.stdout)
  assert any(n.startswith("jit_chunk-") for n in os.listdir(cache))  # the run's chunk program

  # Another seed, lr and margin: traced values, the same program.
  again = ("--n_memories", "4", "--seed", "2", "--lr", "0.05", "--memory_strength", "1")
  warm = run_cli(tiny_data, tmp_path, cache, "gem", *again)
  assert warm.returncode == 0, warm.stderr
  second = record_of(tmp_path, "gem", 2)
  assert second["compile_cache"] == {"enabled": True, "dir": str(cache), "hit": True}
  assert "(from cache)" in wall_time_line(warm.stdout)
  assert second["matrix"] != first["matrix"]
  # The progress lines, live from the driver (no program holds a host callback).
  progress = [x for x in warm.stdout.splitlines() if x.startswith("task ")]
  assert [x.split(":")[0] for x in progress] == ["task 0 done (1/2)", "task 1 done (2/2)"]
  assert all(" s, accuracy " in x for x in progress)


def test_no_compile_cache_writes_no_cache_files(tiny_data, tmp_path):
  ours, jax_own = tmp_path / "cljax-cache", tmp_path / "jax-cache"
  ours.mkdir()
  done = run_cli(tiny_data, tmp_path, ours, "single", "--no_compile_cache", jax_cache_dir=jax_own)
  assert done.returncode == 0, done.stderr
  assert record_of(tmp_path, "single", 3)["compile_cache"] == {
    "enabled": False,
    "dir": None,
    "hit": False,
  }
  assert os.listdir(ours) == [] and not jax_own.exists()
  # The progress lines, with the seconds since the run started.
  progress = [x for x in done.stdout.splitlines() if x.startswith("task ")]
  assert len(progress) == 2 and all(" s, accuracy " in x for x in progress)


def test_an_unusable_cache_folder_is_one_warning_and_the_run_goes_on(tiny_data, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  done = run_cli(tiny_data, tmp_path, blocker / "cache", "single")  # under a file: even as root
  assert done.returncode == 0, done.stderr
  warnings = [x for x in done.stderr.splitlines() if x.startswith("cljax: warning: ")]
  assert len(warnings) == 1 and "Traceback" not in done.stderr, done.stderr
  assert f"compile cache folder {blocker / 'cache'}" in warnings[0]
  assert record_of(tmp_path, "single", 3)["compile_cache"]["enabled"] is False


@pytest.mark.parametrize(
  ("environ", "expected"),
  [
    ({"CLJAX_CACHE_DIR": "/a", "JAX_COMPILATION_CACHE_DIR": "/b", "XDG_CACHE_HOME": "/c"}, "/a"),
    ({"CLJAX_CACHE_DIR": "", "JAX_COMPILATION_CACHE_DIR": "/b", "XDG_CACHE_HOME": "/c"}, "/b"),
    ({"XDG_CACHE_HOME": "/c"}, "/c/cljax"),
    ({}, os.path.join(os.path.expanduser("~"), ".cache", "cljax")),
  ],
)
def test_default_dir_precedence(environ, expected):
  assert compile_cache.default_dir(environ) == expected


def test_folder_problem(tmp_path):
  assert compile_cache.folder_problem(str(tmp_path / "new" / "folder")) is None
  assert os.listdir(tmp_path / "new" / "folder") == []  # the probe leaves nothing
  (tmp_path / "f").write_text("")
  assert compile_cache.folder_problem(str(tmp_path / "f" / "sub"))
