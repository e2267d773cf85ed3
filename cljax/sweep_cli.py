"""Sweeps from the command line: many seeds and (lr, memory_strength) settings of one variant.

    python -m cljax.sweep_cli --model gem --seeds 10 [--lr 0.01,0.03] [--memory_strength 0,10]

Every flag of `python -m cljax` is accepted; --lr, --memory_strength and a --rule's own
--hparam NAME=V1,V2 take comma-separated lists (their product is the grid: traced
hyper-parameters, so the grid compiles once). On a CPU the runs go to worker processes, one per
core, each running the plain compiled run (bit for bit `python -m cljax --seed s`); on
accelerators all runs are one vmapped call split across the
devices (--strategy map / vmap do that on a CPU too, one host device per core).
Each run's record is written atomically as it finishes into --sweep_dir (default
{save_path}/sweeps/{variant}_{dataset}_{protocol}); running the same command again skips the
finished records, so a killed sweep resumes. At the end: summary.md / .json / .png (mean +- std
per setting). Several processes (hosts) join one sweep with --coordinator HOST:PORT
--num_processes N --process_id I, or --distributed auto (JAX's runtime; README "Sweeps on a
cluster"). Compiled programs are kept in JAX's persistent compilation cache, as by
`python -m cljax` (the worker processes share its folder; --no_compile_cache: none).
Exit status: 0 done, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax import compile_cache, distributed, run_folder, sweep_folder, train
from cljax import run_setup as setup
from cljax.errors import CljaxError
from cljax.rules import registry
from cljax.sweep import STRATEGIES, make_sweep, stack_streams

SWEPT_FLAGS = ("lr", "memory_strength")  # `train.HParams`: traced, one compile for the grid
# Flags that fix shapes or the program: one value per sweep.
_STATIC_FLAGS = (
  "model",
  "n_tasks",
  "n_memories",
  "n_layers",
  "n_hiddens",
  "batch_size",
  "samples_per_task",
  "log_every",
  "replay_batch_size",
  "eps",
  "qp_max_iter",
  "test_samples",
  "eval_batch_size",
  "seed",
)
# How a process joins a multi-process sweep (JAX's names): not settings of the runs.
CLUSTER_FLAGS = ("coordinator", "num_processes", "process_id", "distributed", "distributed_timeout")
FINISH_TIMEOUT_S = 7 * 24 * 3600.0  # the wait at the end for the slowest process's runs


def split_grid(argv: Sequence[str]) -> tuple[list[str], dict[str, list[float]]]:
  """(argv with each swept flag's list replaced by its first value, {flag: values}).

  Raises:
    CljaxError: an empty or non-numeric list, or a list given to a flag that must be static.
  """
  out, grid = [], {}
  i = 0
  while i < len(argv):
    token = argv[i]
    name, value, has_inline = token[2:], None, False
    if token.startswith("--") and "=" in token:
      name, value = token[2:].split("=", 1)
      has_inline = True
    elif token.startswith("--") and i + 1 < len(argv):
      value = argv[i + 1]
    listed = token.startswith("--") and value is not None and "," in value
    if listed and name in _STATIC_FLAGS:
      what = "--seeds" if name == "seed" else f"one sweep per --{name} value"
      raise CljaxError(
        f"--{name} {value}: --{name} changes shapes or the compiled program, so a sweep takes "
        f"one value (use {what}); only {', '.join('--' + f for f in SWEPT_FLAGS)} are traced "
        "and take comma-separated lists."
      )
    if token.startswith("--") and name == "hparam" and value is not None:  # NAME=V1,V2
      own, values = setup.parse_hparam(value, listed=True)
      grid[f"hparam:{own}"] = list(dict.fromkeys(values))
      out += ["--hparam", f"{own}={values[0]!r}"]
      i += 1 if has_inline else 2
      continue
    if token.startswith("--") and name in SWEPT_FLAGS and value is not None:
      try:
        values = [float(v) for v in value.split(",") if v.strip()]
      except ValueError:
        raise CljaxError(f"--{name} {value}: expected comma-separated numbers.") from None
      if not values:
        raise CljaxError(f"--{name} {value!r}: an empty grid (give at least one value).")
      grid[name] = list(dict.fromkeys(values))
      out += [f"--{name}", repr(values[0])]
      i += 1 if has_inline else 2
      continue
    out.append(token)
    i += 1
  return out, grid


def grid_settings(
  args: argparse.Namespace, grid: Mapping[str, Sequence[float]]
) -> list[sweep_folder.Setting]:
  """The grid's points: the product of the --lr, --memory_strength and --hparam NAME lists."""
  own = setup.hparam_values(args)  # each NAME's first value (the parsed command line's)
  names = sorted(own)
  lists = [grid.get(f"hparam:{n}", [own[n]]) for n in names]
  return [
    sweep_folder.Setting(lr, ms, tuple(zip(names, values, strict=True)))
    for lr, ms, *values in itertools.product(
      grid.get("lr", [args.lr]), grid.get("memory_strength", [args.memory_strength]), *lists
    )
  ]


def parse_seeds(text: str) -> list[int]:
  """Seeds from --seeds: a count ("10": 0..9) or a list ("3,4,5"; "7," is seed 7 alone)."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise CljaxError(f"--seeds {text}: expected a count (10) or a list (0,3,7).") from None
  if not seeds:
    raise CljaxError(f"--seeds {text!r}: an empty sweep.")
  if "," not in text:
    if seeds[0] < 1:
      raise CljaxError(f"--seeds {text}: an empty sweep (give a count >= 1 or a list).")
    return list(range(seeds[0]))
  if len(set(seeds)) != len(seeds):
    raise CljaxError(f"--seeds {text}: a seed is listed twice.")
  return seeds


def build_parser() -> argparse.ArgumentParser:
  """`python -m cljax`'s flags plus the sweep's own."""
  p = setup.build_parser()
  p.prog = "cljax.sweep_cli"
  p.description = __doc__.split("\n\n")[0]
  g = p.add_argument_group("sweep flags")
  g.add_argument(
    "--seeds", default=None, help="a count (10: seeds 0-9) or a list (0,3,7); default: --seed"
  )
  g.add_argument(
    "--sweep_dir",
    default=None,
    help="the sweep's folder (default {save_path}/sweeps/{variant}_{dataset}_{protocol})",
  )
  g.add_argument(
    "--strategy",
    default=None,
    choices=("processes", *STRATEGIES),
    help="processes: worker processes (--workers), each run the plain compiled run, bit for bit "
    "`python -m cljax --seed s`; map / vmap: all runs in one compiled call split across the "
    "devices (--devices), each device running its share one after another / at once. Default: "
    "processes on CPUs, vmap on accelerators (measured: experiments/bench_sweep.py)",
  )
  g.add_argument(
    "--workers",
    type=int,
    default=None,
    help="worker processes of strategy processes (default: one per core)",
  )
  g.add_argument(
    "--devices",
    type=int,
    default=None,
    help="devices of strategies map / vmap (default: all; on a CPU, one host device per core)",
  )
  c = p.add_argument_group(
    "multi-process sweeps (JAX's runtime: one process per host, every process the same command)"
  )
  c.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (it listens there)")
  c.add_argument("--num_processes", type=int, default=None, help="processes in the sweep")
  c.add_argument("--process_id", type=int, default=None, help="this process: 0..num_processes-1")
  c.add_argument(
    "--distributed",
    default=None,
    choices=("auto",),
    help="auto: JAX detects the cluster (SLURM, Open MPI, TPU slices) instead of the three above",
  )
  c.add_argument(
    "--distributed_timeout",
    type=float,
    default=distributed.DEFAULT_TIMEOUT_S,
    help="seconds to reach the coordinator and to wait for the other processes at the start",
  )
  return p


def cluster_for(args: argparse.Namespace) -> distributed.Cluster | None:
  """The multi-process settings of a command line (None: one process); CljaxError if invalid."""
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if args.distributed is None and explicit == (None, None, None):
    return None
  if args.distributed is not None and explicit != (None, None, None):
    raise CljaxError("give --distributed auto or --coordinator/--num_processes/--process_id.")
  if args.distributed is None and args.coordinator is None:
    raise CljaxError("--num_processes / --process_id need --coordinator HOST:PORT.")
  cluster = distributed.Cluster(*explicit, timeout_s=args.distributed_timeout)
  distributed.check(cluster)
  return cluster


def use_cpu_devices(n: int | None) -> None:
  """Asks JAX for n host CPU devices (default: the cores available) before its backend starts.

  Has no effect once JAX has run anything in this process (then its devices are kept) or when
  XLA_FLAGS already sets the count.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  with contextlib.suppress(RuntimeError):  # the backend already runs: keep its devices
    jax.config.update("jax_num_cpu_devices", n or _cores())


def _fixed_settings(config: train.Config, args: argparse.Namespace, stream) -> dict[str, Any]:
  """What every record of a sweep folder shares: the config minus the swept values, the data."""
  cfg = dataclasses.asdict(config)
  for name in SWEPT_FLAGS:
    cfg.pop(name)
  digest = hashlib.sha256()
  for a in (stream.train_x, stream.train_y, stream.test_x, stream.test_y):
    digest.update(np.ascontiguousarray(a).tobytes())
  return {
    "variant": args.model,
    "rule_settings": setup.rule_record(args),
    **({"rule": args.rule} if args.rule else {}),  # a sweep folder of another rule is another
    "train_config": cfg,
    "dataset": args.dataset,
    "protocol": args.protocol,
    "n_tasks": args.n_tasks,
    "samples_per_task": args.samples_per_task,
    "test_samples": args.test_samples,
    "data_sha256": digest.hexdigest(),
  }


def _title(args: argparse.Namespace) -> str:
  _, what = registry.describe(args.model, args.agem_ref)
  rule = ", ".join(f"{n} {v}" for n, v in setup.name_parts(args).items() if v is not None)
  return f"{what}{' ' + rule if rule else ''} on {args.dataset} {args.protocol}"


def main(argv: Sequence[str] | None = None) -> int:
  """Runs a sweep; returns the exit status (0 done, 2 bad input or unwritable records)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    parser_argv, grid = split_grid(argv)
    args, notes = setup.parse_args(parser_argv, build_parser(), grid=grid)
    if args.seeds is not None and "seed" in args.given:
      raise CljaxError("give --seeds (a count or a list) or --seed, not both.")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    for flag in ("resume", "keep_checkpoints"):
      if flag in args.given:
        notes.append(f"--{flag} is a single run's: a sweep resumes from its records by itself")
    for name in ("devices", "workers"):
      if getattr(args, name) is not None and getattr(args, name) < 1:
        raise CljaxError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    cluster = cluster_for(args)
    network = setup.network_for(args)
    config = setup.train_config(args, network)
    rule = setup.rule_for(args, config, network)
    settings = grid_settings(args, grid)
    for s in settings:  # each grid point must be a valid config, its rule's own known
      dataclasses.replace(config, lr=s.lr, memory_strength=s.memory_strength)
      setup.run_hparams(config, rule, dict(s.extra))
  except SystemExit as e:  # --help
    return int(e.code or 0)
  except CljaxError as e:
    setup.error(e)
    return 2
  for message in notes:
    setup.note(message)
  args.argv = argv
  cache = setup.use_compile_cache(args)  # before JAX compiles anything
  use_cpu_devices(args.devices)  # before JAX starts (loading the data below starts it)
  if cluster is not None:
    try:  # before JAX's backend starts: it is then built over every process's devices
      distributed.join(cluster)
      distributed.agree("num_processes", str(distributed.process()[1]), cluster.timeout_s)
    except CljaxError as e:
      setup.error(e)
      return 2
  if args.strategy is None:  # processes on a CPU; without a CPU-only JAX, one vmapped call
    cpu = jax.default_backend() == "cpu"  # several processes: one call over all their devices
    args.strategy = ("processes" if cluster is None else "map") if cpu else "vmap"
  n_devices = min(
    len(jax.devices()), args.devices or len(jax.devices()), len(settings) * len(seeds)
  )
  if cluster is not None:
    n_devices = len(jax.devices())
  if args.strategy != "processes" and n_devices > 1 and jax.default_backend() == "cpu":
    try:  # make_sweep's check, before any data is loaded
      make_sweep(
        config, rule, strategy=args.strategy, devices=jax.devices()[:n_devices], network=network
      )
    except CljaxError as e:
      setup.error(e)
      return 2

  try:
    data_path, note = setup.data_path_for(args)
    if note:
      setup.note(note)
    streams, source, directory, messages = setup.load_streams(args, data_path, seeds)
    for message in messages:
      setup.warning(message)
    train.schedule(config, streams[0])
    base = setup.run_name(args, 0).rsplit("_seed", 1)[0]
    folder = args.sweep_dir or os.path.join(args.save_path, "sweeps", base)
    fp = sweep_folder.open_folder(folder, _fixed_settings(config, args, streams[0]))
    stream_of = dict(zip(seeds, streams, strict=True))
    finished, to_run, problems = sweep_folder.plan(folder, settings, seeds, fp)
    if cluster is not None:  # the same manifest, and the same runs to do, in every process
      plan = hashlib.sha256(repr(to_run).encode()).hexdigest()[:16]
      distributed.agree("manifest", f"fingerprint {fp} plan {plan}", cluster.timeout_s)
  except CljaxError as e:
    setup.error(e)
    if cluster is not None:  # the others stop at the manifest's handshake
      distributed.post("manifest", f"error: {e}")
    return 2
  pid, n_processes = distributed.process()
  for problem in problems if pid == 0 else []:
    setup.note(f"record not reused, running it again: {problem}")
  n_all = len(settings) * len(seeds)
  print(
    f"sweep of {args.model}: {len(settings)} setting(s) x {len(seeds)} seed(s) = {n_all} runs "
    f"in {folder}; {len(finished)} already recorded, {len(to_run)} to run",
    flush=True,
  )
  status = 0
  if args.strategy == "processes" and (share := distributed.share(to_run)):
    status = _run_processes(args, share, folder, fp, cache.dir)
  elif to_run and args.strategy != "processes":
    status = _run_one_call(
      args, config, network, rule, to_run, stream_of, folder, fp, source, directory
    )
  if cluster is not None:  # every record is written: process 0 writes the summary
    try:
      statuses = distributed.gather("finished", str(status), FINISH_TIMEOUT_S)
    except CljaxError as e:
      setup.error(e)
      return 2
    status = max(int(s) for s in statuses)
    if pid != 0:  # "read": process 0 (the key-value store's host) waits for it before leaving
      distributed.post("read", "1")
      print(f"process {pid} of {n_processes} done; process 0 writes the summary", flush=True)
      distributed.leave()
      return status
  plots = not args.no_plots and run_folder.plotting_available()
  rows, _ = sweep_folder.write_summary(folder, fp, title=_title(args), plots=plots)
  print(sweep_folder.summary_markdown(rows, _title(args)))
  print(f"sweep folder: {folder}")
  if cluster is not None:
    with contextlib.suppress(CljaxError):  # every other process has read the statuses
      distributed.gather("read", "1", cluster.timeout_s)
  distributed.leave()
  return status


def _record(args, config, setting, seed, result, started, source, directory) -> dict[str, Any]:
  """One run's record: `run_folder.make_record` with the run's own seed and hyper-parameters."""
  settings = {k: v for k, v in vars(args).items() if k not in ("given", "seeds", *CLUSTER_FLAGS)}
  settings.update(seed=seed, lr=setting.lr, memory_strength=setting.memory_strength)
  if setting.extra:  # the rule's own, this run's values
    settings["hparam"] = [f"{k}={v!r}" for k, v in setting.extra]
  return run_folder.make_record(
    result,
    dataclasses.replace(config, lr=setting.lr, memory_strength=setting.memory_strength),
    settings=settings,
    timings={"finished_after": round(time.perf_counter() - started, 3)},
    device=run_folder.device_info(),
    stream={"source": source, "data_path": directory},
    rule_settings=setup.rule_record(args),
  )


def _final(record: dict[str, Any]) -> str:
  if record["diverged_at_task"] is not None:
    return "diverged"
  return f"{record['gem_stats']['final']:.4f}"


def _worker(parser_argv, seeds, folder, fp, jobs, messages, cache_dir) -> None:
  """A worker process: the plain compiled run (as `python -m cljax`) for each job it takes.

  cache_dir: the parent's compilation cache folder (None: no cache).
  """
  _die_with_parent()
  parent = os.getppid()
  try:
    compile_cache.enable(cache_dir)  # the parent has checked the folder and warned
    args, _ = setup.parse_args(parser_argv, build_parser())
    network = setup.network_for(args)
    config = setup.train_config(args, network)
    rule = setup.rule_for(args, config, network)
    data_path, _ = setup.data_path_for(args)
    streams, source, directory, _ = setup.load_streams(args, data_path, seeds)
    stream_of = dict(zip(seeds, streams, strict=True))
    run = jax.jit(train.make_train(config, rule, network=network))
    started = time.perf_counter()
    while os.getppid() == parent and (job := jobs.get()) is not None:
      setting, seed = job
      hp = setup.run_hparams(config, rule, dict(setting.extra), setting.lr, setting.memory_strength)
      result = jax.device_get(run(jax.random.key(seed), stream_of[seed], hp))
      record = _record(args, config, setting, seed, result, started, source, directory)
      sweep_folder.write_record(folder, record, setting, seed, fp)
      messages.put(("done", setting.name, seed, _final(record)))
  except BaseException as e:  # reported by the parent, which stops the sweep
    messages.put(("error", None, None, f"{type(e).__name__}: {e}"))


def _run_processes(args, to_run, folder, fp, cache_dir) -> int:
  """Runs the missing pairs in worker processes, one per core: each the plain compiled run.

  cache_dir: the compilation cache folder of the workers (None: no cache).
  """
  n_workers = min(len(to_run), args.workers or _cores())
  print(
    f"{len(to_run)} runs in {n_workers} worker process(es), strategy processes (each run is "
    "the plain compiled run)",
    flush=True,
  )
  ctx = multiprocessing.get_context("spawn")
  jobs, messages = ctx.Queue(), ctx.Queue()
  for job in to_run:
    jobs.put(job)
  for _ in range(n_workers):
    jobs.put(None)
  seeds = sorted({seed for _, seed in to_run})
  parser_argv, _ = split_grid(args.argv)
  workers = [
    ctx.Process(
      target=_worker,
      args=(parser_argv, seeds, folder, fp, jobs, messages, cache_dir),
      daemon=True,
    )
    for _ in range(n_workers)
  ]
  start = time.perf_counter()
  for w in workers:
    w.start()
  done = 0
  try:
    while done < len(to_run):
      try:
        kind, name, seed, what = messages.get(timeout=1.0)
      except queue.Empty:
        if not any(w.is_alive() for w in workers):
          setup.error(f"the worker processes stopped after {done} of {len(to_run)} runs")
          return 2
        continue
      if kind == "error":
        setup.error(f"a worker failed ({what}); {done} run(s) recorded in {folder}")
        return 2
      done += 1
      print(
        f"run {done}/{len(to_run)} done: {name} seed {seed}, Final {what} "
        f"({time.perf_counter() - start:.1f} s)",
        flush=True,
      )
  finally:
    for w in workers:
      w.join(timeout=5)
      if w.is_alive():
        w.terminate()
  print(f"{len(to_run)} runs in {time.perf_counter() - start:.1f} s", flush=True)
  return 0


def _run_one_call(
  args, config, network, rule, to_run, stream_of, folder, fp, source, directory
) -> int:
  """Runs the missing pairs in one compiled call across the devices, recording each as it ends."""
  devices = jax.devices()  # several processes: all of theirs (a global mesh), in JAX's order
  if not distributed.is_joined():
    devices = devices[: min(len(devices), len(to_run), args.devices or len(devices))]
  pid, n_processes = distributed.process()
  tag = f"process {pid}: " if n_processes > 1 else ""
  lock, errors, done = threading.Lock(), [], [0]
  start = [time.perf_counter()]

  def on_run(i: int, result: train.RunResult) -> None:
    setting, seed = to_run[i]
    try:
      record = _record(args, config, setting, seed, result, start[0], source, directory)
      sweep_folder.write_record(folder, record, setting, seed, fp)
    except Exception as e:  # reported after the call; the other runs go on
      with lock:
        errors.append(f"{setting.name} seed {seed}: {type(e).__name__}: {e}")
      return
    with lock:
      done[0] += 1
      print(
        f"{tag}run {done[0]}/{len(to_run)} done: {setting.name} seed {seed}, Final "
        f"{_final(record)} ({time.perf_counter() - start[0]:.1f} s)",
        flush=True,
      )

  seeds = [seed for _, seed in to_run]
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  hparams = train.stack(
    [setup.run_hparams(config, rule, dict(s.extra), s.lr, s.memory_strength) for s, _ in to_run]
  )
  stacked = stack_streams([stream_of[seed] for seed in seeds])
  if n_processes > 1:  # the same values in every process, as global arrays over all devices
    keys, stacked, hparams = distributed.replicate((keys, stacked, hparams), devices)
  t0 = time.perf_counter()
  sweep = make_sweep(
    config, rule, strategy=args.strategy, devices=devices, on_run=on_run, network=network
  )
  try:
    compiled = jax.jit(sweep).lower(keys, stacked, hparams).compile()
  except CljaxError as e:
    setup.error(e)
    return 2
  across = f" of {n_processes} processes" if n_processes > 1 else ""
  print(
    f"{tag}compiled in {time.perf_counter() - t0:.1f} s; {len(to_run)} runs on {len(devices)} "
    f"{devices[0].platform} device(s){across}, strategy {args.strategy}",
    flush=True,
  )
  start[0] = time.perf_counter()
  jax.block_until_ready(compiled(keys, stacked, hparams))
  jax.effects_barrier()  # every on_run has returned
  if errors:
    setup.error(
      f"{len(errors)} record(s) could not be written ({errors[0]}); the others are in {folder}"
    )
    return 2
  print(f"{tag}{done[0]} runs in {time.perf_counter() - start[0]:.1f} s", flush=True)
  return 0


def _die_with_parent() -> None:
  """On Linux, ask for SIGKILL when the parent dies, so a killed sweep leaves no workers behind."""
  with contextlib.suppress(Exception):
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
  sys.exit(main())
