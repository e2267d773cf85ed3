"""Shared fixtures: generated IDX files, a small synthetic dataset, the real Fashion-MNIST files.

The suite compiles many whole runs, and compiling (not running) is most of its time; many tests
compile the very same program (the same configuration in several modules, the plain run again in a
sweep's worker processes). JAX's persistent compilation cache, in a folder made for this session
and removed after it, compiles each program once: a program loaded from the cache is the same
executable, so results are unchanged bit for bit. Worker processes get the folder through the
environment (JAX_COMPILATION_CACHE_DIR, and CLJAX_CACHE_DIR for the command lines). Every program
is cached, however quick its compile (JAX's default skips those under 1 s, which are most of the
suite's small runs, compiled again in other test files and processes).

The suite compiles at LLVM optimisation level 1 instead of 2 (`golden_runs.SUITE_XLA_FLAG`, in
XLA_FLAGS for this process and its subprocesses): compiling is most of the suite's time, level 1
compiles a third faster and its programs run as fast at these sizes. It may round differently
from level 2 (one of the golden runs does), which no test depends on: two programs are compared
within bounds, and the same program with itself.
"""

import atexit
import dataclasses
import gzip
import os
import shutil
import struct
import tempfile
import types
from typing import Any

import golden_runs

os.environ["XLA_FLAGS"] = golden_runs.with_suite_flag(os.environ.get("XLA_FLAGS", ""))

import jax
import numpy as np
import pytest

from cljax import data, tasks

# pytest-xdist's workers inherit the folder of the process that made it; only that one removes it.
_XLA_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if not _XLA_CACHE:
  _XLA_CACHE = tempfile.mkdtemp(prefix="cljax-tests-xla-cache-")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE  # for subprocesses and workers
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # subprocesses too
os.environ["CLJAX_CACHE_DIR"] = _XLA_CACHE  # the CLIs' cache too, never the user's ~/.cache/cljax
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

REAL_FASHION_DIR = data.DEFAULT_DATA_PATH


def idx_bytes(array, *, dtype_code=0x08, magic_zero=b"\x00\x00"):
  """IDX encoding of a uint8 array: magic, big-endian dims, payload."""
  array = np.asarray(array, dtype=np.uint8)
  header = magic_zero + bytes([dtype_code, array.ndim])
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.tobytes()


def write_idx_file(path, array=None, *, raw=None, gz=None, **kwargs):
  """Writes an IDX file (gzipped if the name ends in .gz, unless gz says otherwise)."""
  payload = raw if raw is not None else idx_bytes(array, **kwargs)
  if gz if gz is not None else str(path).endswith(".gz"):
    payload = gzip.compress(payload)
  with open(path, "wb") as f:
    f.write(payload)
  return path


def write_idx_dir(directory, *, n_train=60, n_test=20, seed=0, gz=True):
  """Writes the 4 standard IDX files of a small random dataset; returns the arrays written."""
  rng = np.random.default_rng(seed)
  arrays = {
    ("train", "images"): rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    ("train", "labels"): rng.integers(0, 10, (n_train,), dtype=np.uint8),
    ("test", "images"): rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    ("test", "labels"): rng.integers(0, 10, (n_test,), dtype=np.uint8),
  }
  os.makedirs(directory, exist_ok=True)
  for key, array in arrays.items():
    name = data.IDX_FILES[key] + (".gz" if gz else "")
    write_idx_file(os.path.join(directory, name), array)
  return arrays


@pytest.fixture
def idx_tools():
  """The IDX helpers: .encode(array, ...), .write(path, array, ...), .write_dir(directory, ...)."""
  return types.SimpleNamespace(encode=idx_bytes, write=write_idx_file, write_dir=write_idx_dir)


@pytest.fixture
def idx_dir(tmp_path):
  """A directory of small valid gzipped IDX files; yields (path, arrays)."""
  directory = tmp_path / "idx"
  return str(directory), write_idx_dir(directory)


@pytest.fixture
def no_data_env(monkeypatch):
  """Unsets $CLJAX_DATA so path resolution is the test's own."""
  monkeypatch.delenv(data.DATA_PATH_ENV, raising=False)


@pytest.fixture(scope="session")
def small_dataset():
  """A synthetic Dataset: 300 train / 50 test random 28x28 uint8 images (read-only, shared)."""
  rng = np.random.default_rng(1)
  arrays = [
    rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
    rng.integers(0, 10, (300,)).astype(np.int32),
    rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
    rng.integers(0, 10, (50,)).astype(np.int32),
  ]
  for a in arrays:
    a.setflags(write=False)
  return data.Dataset(
    name="fashion_mnist",
    train=data.Split(arrays[0], arrays[1]),
    test=data.Split(arrays[2], arrays[3]),
  )


@pytest.fixture(scope="session")
def real_fashion_dir():
  """The real Fashion-MNIST IDX directory; skipped when absent, but a failure on CI."""
  present = all(
    os.path.isfile(os.path.join(REAL_FASHION_DIR, stem + ".gz")) for stem in data.IDX_FILES.values()
  )
  if not present:
    message = (
      f"real Fashion-MNIST IDX files not in {REAL_FASHION_DIR}: run `make data` "
      "(apt-get install dataset-fashion-mnist)"
    )
    if os.environ.get("CI"):
      pytest.fail("CI is set but " + message)
    pytest.skip(message)
  return REAL_FASHION_DIR


def real_permutation_stream(directory, *, n_tasks, samples_per_task, test_samples):
  """Real Fashion-MNIST (IDX files in directory) as GEM's permuted tasks, seed 0."""
  dataset = data.load_dataset("fashion_mnist", data_path=directory, source="idx")
  return tasks.make_stream(
    dataset,
    protocol="permutations",
    n_tasks=n_tasks,
    samples_per_task=samples_per_task,
    test_samples=test_samples,
    seed=0,
  )


@pytest.fixture(scope="session")
def real_stream(real_fashion_dir):
  """Real Fashion-MNIST, 3 permuted tasks x 300 examples, 500 test examples: the engine tests'."""
  return real_permutation_stream(
    real_fashion_dir, n_tasks=ENGINE_TASKS, samples_per_task=ENGINE_SAMPLES, test_samples=500
  )


ENGINE_TASKS, ENGINE_SAMPLES = 3, 300
# The engine tests' settings: 10 memories, an evaluation every 50 steps, GEM's margin 0.5.
ENGINE_BASE = {"n_memories": 10, "log_every": 50, "memory_strength": 0.5, "lr": 0.02}


@dataclasses.dataclass(frozen=True)
class EngineSetup:
  """An engine test's run settings: the engine's `Config`, a built-in rule and its settings."""

  config: Any
  variant: str
  settings: tuple = ()  # sorted (name, value) pairs, `registry.make`'s

  def replace(self, **kw):
    """A copy with kw changed: the rule's settings (`registry.SETTINGS`) or the config's."""
    from cljax.rules import registry

    own = {k: v for k, v in kw.items() if k in registry.SETTINGS}
    config = dataclasses.replace(self.config, **{k: v for k, v in kw.items() if k not in own})
    return EngineSetup(config, self.variant, tuple(sorted({**dict(self.settings), **own}.items())))

  def rule(self):
    """The built-in rule with its settings (`registry.make`)."""
    from cljax.rules import registry

    return registry.make(self.variant, **dict(self.settings))


def engine_config(variant, **kw):
  """The engine tests' `EngineSetup`: ENGINE_BASE, overridden by kw (config or rule settings)."""
  from cljax.train import Config

  return EngineSetup(Config(), variant).replace(**{**ENGINE_BASE, **kw})


_RUNS = {}  # (id(stream), setup, key) -> (stream, result); holding stream keeps its id unique


def engine_run(stream, setup, key=0):
  """`jax.jit(make_train(setup.config, setup.rule()))(jax.random.key(key), stream)`, made once.

  Several modules check different statements on the same runs; each run (and its compile) is
  made once per session. `stream` must be a session-scoped stream (it is keyed by identity).
  """
  from cljax.train import make_train

  k = (id(stream), setup, key)
  if k not in _RUNS:
    run = jax.jit(make_train(setup.config, setup.rule()))
    _RUNS[k] = (stream, run(jax.random.key(key), stream))
  return _RUNS[k][1]
