"""Many runs of one variant in one compiled call: seeds and hyper-parameters as a batch axis.

    streams = stack_streams([tasks.make_stream(dataset, seed=s, ...) for s in seeds])
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    hp = grid_hparams(config, lr=[0.01] * len(seeds))           # (S,) leaves, traced
    results = jax.jit(make_sweep(config, strategy="map"))(keys, streams, hp)
    results.acc                                                 # (S, T, T)

Every run i gets keys[i], stream i and hyper-parameters i; `Config` (shapes, variant) is shared
and static, so a grid over lr and memory_strength compiles once. Streams of different seeds
share their base images: only the per-task indices and pixel maps are stacked.

Strategies: "map" runs the runs one after another inside the compiled call (`lax.map`, optionally
`batch_size` at a time, vmapped); "vmap" runs all at once. `experiments/bench_sweep.py` measures
their cost per run. On a 2-core CPU (4 seeds of gem): map 1.06x a plain run per run, vmap 1.55x,
map/2 1.72x (a batch-1 step is latency-bound and its batched kernels are slower on a CPU), so the
default is "map" on CPUs and "vmap" on accelerators, where batching fills the device.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax.errors import CljaxError
from cljax.tasks import TaskStream
from cljax.train import Config, HParams, RunResult, make_train

STRATEGIES = ("map", "vmap")
_PER_RUN_FIELDS = ("train_idx", "pix_idx", "pix_w")  # what differs between seeds' streams


def stack_streams(streams: Sequence[TaskStream]) -> TaskStream:
  """One TaskStream for S runs: per-run fields stacked on a leading axis, shared ones kept once.

  train_idx, pix_idx and pix_w get a leading axis S. The images and labels must be the same
  arrays (values) in every stream, e.g. streams of one dataset with different seeds and no
  test_samples subset; anything else is refused.
  """
  if not streams:
    raise CljaxError("stack_streams needs at least one stream.")
  first = streams[0]
  for name in TaskStream._fields:
    if name in _PER_RUN_FIELDS:
      shapes = {np.shape(getattr(s, name)) for s in streams}
      if len(shapes) > 1:
        raise CljaxError(
          f"streams disagree on {name} shapes {sorted(shapes)}: a sweep needs the same n_tasks "
          "and samples_per_task in every run."
        )
    elif not all(np.array_equal(getattr(s, name), getattr(first, name)) for s in streams[1:]):
      raise CljaxError(
        f"streams differ in {name}: a sweep shares the images, so build every stream from the "
        "same dataset (and without a per-seed test_samples subset)."
      )
  stacked = {n: jnp.stack([jnp.asarray(getattr(s, n)) for s in streams]) for n in _PER_RUN_FIELDS}
  return first._replace(**stacked)


def stream_axes() -> TaskStream:
  """The in_axes (for vmap) of a stacked stream: 0 for per-run fields, None for shared ones."""
  return TaskStream(*(0 if n in _PER_RUN_FIELDS else None for n in TaskStream._fields))


def grid_hparams(config: Config, n_runs: int, **values: Sequence[float]) -> HParams:
  """HParams with leading axis n_runs: each field from `values` (n_runs numbers) or the config's.

  Example: grid_hparams(config, 4, lr=[0.01, 0.01, 0.03, 0.03]).
  """
  unknown = set(values) - set(HParams._fields)
  if unknown:
    raise CljaxError(
      f"cannot sweep {sorted(unknown)} in one compile: only {', '.join(HParams._fields)} are "
      "traced; other settings change shapes or the program (variant, n_memories, n_tasks, ...)."
    )
  fields = []
  for name in HParams._fields:
    v = np.asarray(values.get(name, [getattr(config, name)] * n_runs), np.float32)
    if v.shape != (n_runs,):
      raise CljaxError(f"{name} needs {n_runs} values (one per run), got shape {v.shape}.")
    fields.append(jnp.asarray(v))
  return HParams(*fields)


def default_strategy(platform: str | None = None) -> str:
  """The measured-fastest strategy for a platform (default: JAX's default backend)."""
  platform = jax.default_backend() if platform is None else platform
  return "map" if platform == "cpu" else "vmap"


def make_sweep(
  config: Config, *, strategy: str | None = None, batch_size: int | None = None
) -> Callable[[jax.Array, TaskStream, HParams], RunResult]:
  """Return sweep(keys (S,), stacked stream, hparams (S,)) -> RunResult with a leading axis S.

  Args:
    config: the static `Config` shared by all runs.
    strategy: "map" (lax.map over runs, `batch_size` at a time; None: one at a time) or "vmap";
      None: `default_strategy()`.
    batch_size: with "map", how many runs are vmapped together per iteration.
  """
  strategy = default_strategy() if strategy is None else strategy
  if strategy not in STRATEGIES:
    raise CljaxError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
  if batch_size is not None and (strategy != "map" or batch_size < 1):
    raise CljaxError("batch_size is for strategy 'map' and must be >= 1.")
  train = make_train(config)

  def sweep(keys: jax.Array, streams: TaskStream, hparams: HParams) -> RunResult:
    n_runs = keys.shape[0]
    for name in _PER_RUN_FIELDS:
      if getattr(streams, name).shape[0] != n_runs:
        raise CljaxError(
          f"{n_runs} keys but {getattr(streams, name).shape[0]} streams: use stack_streams "
          "with one stream per run."
        )
    if strategy == "vmap":
      return jax.vmap(train, in_axes=(0, stream_axes(), 0))(keys, streams, hparams)
    per_run = {n: getattr(streams, n) for n in _PER_RUN_FIELDS}

    def one(args: tuple[Any, ...]) -> RunResult:
      key, fields, hp = args
      return train(key, streams._replace(**fields), hp)

    return jax.lax.map(one, (keys, per_run, hparams), batch_size=batch_size)

  return sweep
