"""Many runs of one rule in one compiled call: seeds and hyper-parameters as a batch axis.

    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    hp = grid_hparams(config, len(seeds), lr=[...])             # (S,) leaves, traced
    results = jax.jit(make_sweep(config, rule))(keys, stack_streams(streams), hp)  # axis S

Every run i gets keys[i], stream i and hyper-parameters i; the `Config` (shapes) and the rule
are shared and static, so a grid over lr and memory_strength compiles once. Streams of different
seeds share their base images: only the per-task indices and pixel maps are stacked.

The runs are split across the devices by a shard_map; each device runs its share one after
another ("map", `lax.map`) or at once ("vmap"). On a CPU (one host device per core) a batch-1
step is latency-bound and batched kernels are slower, so "map" is the default there and "vmap"
on accelerators (`experiments/bench_sweep.py`). A run compiled inside this larger program may
round differently from the run compiled alone; `cljax.sweep_cli`'s default on CPUs, worker
processes running the plain program, is bit-identical to one-by-one runs.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax.errors import CljaxError
from cljax.networks import Network
from cljax.rules.base import Rule
from cljax.tasks import TaskStream
from cljax.train import Config, HParams, RunResult, make_train

STRATEGIES = ("map", "vmap")
_PER_RUN_FIELDS = ("train_idx", "pix_idx", "pix_w")  # what differs between seeds' streams


def _check_shared(streams: Sequence[TaskStream]) -> None:
  """Streams of one sweep: same per-run shapes, the very same images and labels."""
  if not streams:
    raise CljaxError("a sweep needs at least one stream.")
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
      if name == "classes":
        raise CljaxError(
          "streams differ in their split's classes (a random class order per seed): a sweep "
          "shares one split; use class_order label, or run the seeds one by one."
        )
      raise CljaxError(
        f"streams differ in {name}: a sweep shares the images, so build every stream from the "
        "same dataset (and without a per-seed test_samples subset)."
      )


def stack_streams(streams: Sequence[TaskStream]) -> TaskStream:
  """One TaskStream for S runs: per-run fields stacked on a leading axis, shared ones kept once.

  train_idx, pix_idx and pix_w get a leading axis S. The images and labels must be the same
  arrays (values) in every stream, e.g. streams of one dataset with different seeds and no
  test_samples subset; anything else is refused.
  """
  _check_shared(streams)
  stacked = {n: jnp.stack([jnp.asarray(getattr(s, n)) for s in streams]) for n in _PER_RUN_FIELDS}
  return streams[0]._replace(**stacked)


def stream_axes() -> TaskStream:
  """The in_axes (for vmap) of a stacked stream: 0 for per-run fields, None for shared ones."""
  return TaskStream(*(0 if n in _PER_RUN_FIELDS else None for n in TaskStream._fields))


def grid_hparams(
  config: Config, n_runs: int, rule: Rule | None = None, **values: Sequence[float]
) -> HParams:
  """HParams with leading axis n_runs: each from `values` (n_runs numbers) or its default.

  The defaults: the config's lr and memory_strength, and the rule's own (`Rule.hparams`).
  Example: grid_hparams(config, 4, lr=[0.01, 0.01, 0.03, 0.03]).
  """
  own = dict(rule.hparams) if rule is not None and rule.hparams else {}
  names = ("lr", "memory_strength", *own)
  unknown = set(values) - set(names)
  if unknown:
    raise CljaxError(
      f"cannot sweep {sorted(unknown)} in one compile: only {', '.join(names)} are traced; other "
      "settings change shapes or the program (the rule, n_memories, n_tasks, ...)."
    )
  arrays = {}
  for name in names:
    default = own[name] if name in own else getattr(config, name)
    v = np.asarray(values.get(name, [default] * n_runs), np.float32)
    if v.shape != (n_runs,):
      raise CljaxError(f"{name} needs {n_runs} values (one per run), got shape {v.shape}.")
    arrays[name] = jnp.asarray(v)
  extra = {name: arrays[name] for name in own} or None
  return HParams(arrays["lr"], arrays["memory_strength"], extra)


def default_strategy(platform: str | None = None) -> str:
  """The measured-fastest strategy per device for a platform (default: JAX's default backend)."""
  platform = jax.default_backend() if platform is None else platform
  return "map" if platform == "cpu" else "vmap"


def make_sweep(
  config: Config,
  rule: Rule,
  *,
  strategy: str | None = None,
  batch_size: int | None = None,
  devices: Sequence[jax.Device] | None = None,
  on_run: Callable[[int, RunResult], None] | None = None,
  network: Network | None = None,
) -> Callable[[jax.Array, TaskStream, HParams], RunResult]:
  """Return sweep(keys (S,), stacked stream, hparams (S,)) -> RunResult with a leading axis S.

  The runs are split across `devices` (a `shard_map` over a 1-D mesh: each device runs S / n of
  them; S is padded to a multiple of n with copies of run 0, whose results are dropped), and each
  device runs its share by `strategy`.

  Args:
    config: the static `Config` shared by all runs.
    rule: the `cljax.rules.Rule` every run applies (built-in ones: `cljax.rules.registry.make`).
    strategy: "map" (lax.map over runs, `batch_size` at a time; None: one at a time) or "vmap";
      None: `default_strategy()`.
    batch_size: with "map", how many runs are vmapped together per iteration.
    devices: the devices to split the runs across; None: all devices of the default backend
      (on a CPU, one per `jax_num_cpu_devices` / `--xla_force_host_platform_device_count`).
    network: the `cljax.networks.Network` every run trains (None: the config's MLP).
    on_run: optional host function on_run(i, result) called as each run i finishes (through
      `jax.debug.callback`, with the run's RunResult minus params, as numpy arrays), e.g. to
      write its record; it may be called from several threads at once and in any order, and
      should not raise (an exception surfaces as a runtime error of the whole call).
  """
  strategy = default_strategy() if strategy is None else strategy
  if strategy not in STRATEGIES:
    raise CljaxError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
  if batch_size is not None and (strategy != "map" or batch_size < 1):
    raise CljaxError("batch_size is for strategy 'map' and must be >= 1.")
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise CljaxError("make_sweep needs at least one device.")
  here = [d for d in devices if d.process_index == jax.process_index()]  # of this process
  if not rule.cpu_devices and len(here) > 1 and devices[0].platform == "cpu":
    # Each device's program would run its LAPACK eigh (the relatedness) at the same time; each
    # call blocks a thread of XLA's shared CPU pool while its batch waits for that pool: with as
    # many devices as threads, no thread is left and the sweep hangs (seen with 2 devices).
    raise CljaxError(
      f"the rule cannot be split across {len(here)} CPU devices (their concurrent "
      "eigendecompositions deadlock XLA's CPU thread pool): use one CPU device, or the sweep "
      "CLI's --strategy processes (its CPU default)."
    )
  train = make_train(config, rule, network=network)

  def run(index, key, stream: TaskStream, hp: HParams) -> RunResult:
    result = train(key, stream, hp)
    if on_run is not None:
      jax.debug.callback(_report(on_run), index, result._replace(params=None))
    return result

  def local(index, keys, streams: TaskStream, hparams: HParams) -> RunResult:
    """The runs of one device: index, keys, hparams and the per-run stream fields (s, ...)."""
    if strategy == "vmap":
      return jax.vmap(run, in_axes=(0, 0, stream_axes(), 0))(index, keys, streams, hparams)
    per_run = {n: getattr(streams, n) for n in _PER_RUN_FIELDS}

    def one(args: tuple[Any, ...]) -> RunResult:
      i, key, fields, hp = args
      return run(i, key, streams._replace(**fields), hp)

    return jax.lax.map(one, (index, keys, per_run, hparams), batch_size=batch_size)

  def sweep(keys: jax.Array, streams: TaskStream, hparams: HParams) -> RunResult:
    n_runs = keys.shape[0]
    if n_runs == 0:
      raise CljaxError("a sweep needs at least one run (got 0 keys).")
    for name in _PER_RUN_FIELDS:
      if getattr(streams, name).shape[0] != n_runs:
        raise CljaxError(
          f"{n_runs} keys but {getattr(streams, name).shape[0]} streams: use stack_streams "
          "with one stream per run."
        )
    for path, value in jax.tree_util.tree_leaves_with_path(hparams):
      if jnp.shape(value) != (n_runs,):
        name = jax.tree_util.keystr(path)
        raise CljaxError(f"hparams{name} needs shape ({n_runs},), got {jnp.shape(value)}.")
    index = jnp.arange(n_runs, dtype=jnp.int32)
    if len(devices) == 1:
      return local(index, keys, streams, hparams)
    n_dev = len(devices)
    padded = -(-n_runs // n_dev) * n_dev

    def pad(a, fill=None):  # to `padded` rows, with copies of row 0 (or `fill`)
      rows = jnp.broadcast_to(a[:1] if fill is None else fill, (padded - n_runs, *a.shape[1:]))
      return jnp.concatenate([a, rows])

    index = pad(index, jnp.int32(-1))  # -1: a padding run, not reported
    keys, hparams = pad(keys), jax.tree.map(pad, hparams)
    streams = streams._replace(**{n: pad(getattr(streams, n)) for n in _PER_RUN_FIELDS})
    mesh = jax.sharding.Mesh(np.array(devices), ("runs",))
    runs, shared = jax.sharding.PartitionSpec("runs"), jax.sharding.PartitionSpec()
    stream_specs = TaskStream(
      *(runs if n in _PER_RUN_FIELDS else shared for n in TaskStream._fields)
    )
    sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(runs, runs, stream_specs, runs), out_specs=runs, check_vma=False
    )
    result = sharded(index, keys, streams, hparams)
    return jax.tree.map(lambda a: a[:n_runs], result)

  return sweep


def _report(on_run: Callable[[int, RunResult], None]) -> Callable[..., None]:
  """The host side of `on_run`: numpy arrays in, padding runs (index -1) skipped."""

  def callback(index, result: RunResult) -> None:
    i = int(index)
    if i >= 0:
      on_run(i, jax.tree.map(np.asarray, result))

  return callback
