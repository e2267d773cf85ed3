"""Sweep benchmark: the cost per run of S seeds, relative to one plain run, per strategy.

Strategies: "processes" (worker processes, one per core, each running plain compiled runs:
cljax.sweep_cli's default on CPUs), "map" (cljax.sweep.make_sweep: lax.map, one run after
another inside one compiled call) and "vmap" (all at once in it); with a 1, in one process or on
one device, else one per core (map and vmap: a shard_map over the host devices). A plain run is
jax.jit(make_train(config)) on one seed. Medians of --repeats calls (the plain run and each
process after a warm-up run; a map / vmap call right after its compile; processes: the slowest
worker's share), compile time separately; all side by side in one invocation.

    python experiments/bench_sweep.py [--variant gem] [--seeds 10] [--n_tasks 10] [--out FILE]
"""

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time

import jax

_ONE_OF_MANY = "--_process" in sys.argv  # a process of the multi-process row: one device each
jax.config.update("jax_num_cpu_devices", 1 if _ONE_OF_MANY else len(os.sched_getaffinity(0)))

import jax.numpy as jnp  # noqa: E402

from cljax import data, distributed, tasks  # noqa: E402
from cljax.rules import registry  # noqa: E402
from cljax.run_folder import write_atomic  # noqa: E402
from cljax.sweep import default_strategy, grid_hparams, make_sweep, stack_streams  # noqa: E402
from cljax.train import Config, default_hparams, make_train  # noqa: E402


def timed(fn, repeats, warm=True):
  if warm:
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _stream(args, dataset, seed):
  return tasks.make_stream(
    dataset,
    protocol="permutations",
    n_tasks=args.n_tasks,
    samples_per_task=args.samples_per_task,
    seed=seed,
  )


def _rule(variant: str):
  """The built-in rule (agem with the task-mean reference), the seed's settings otherwise."""
  return registry.make(variant, **({"agem_ref": "task_mean"} if variant == "agem" else {}))


def _process_worker(args, share, barrier, results) -> None:
  """Compiles and warms the plain run, then per repeat: wait for all, run the share, report."""
  dataset = data.load_dataset("fashion_mnist")
  config, rule = Config(log_every=args.log_every), _rule(args.variant)
  run = jax.jit(make_train(config, rule))
  hp = default_hparams(config)
  t0 = time.perf_counter()
  jax.block_until_ready(run(jax.random.key(share[0]), _stream(args, dataset, share[0]), hp))
  results.put(time.perf_counter() - t0)
  streams = {s: _stream(args, dataset, s) for s in share}
  for _ in range(args.repeats):
    barrier.wait()
    t0 = time.perf_counter()
    for s in share:
      jax.block_until_ready(run(jax.random.key(s), streams[s], hp))
    results.put(time.perf_counter() - t0)


def time_processes(args, seeds, n) -> tuple[float, float]:
  """(compile + first run s, median wall s of all seeds) with n worker processes."""
  ctx = multiprocessing.get_context("spawn")
  barrier, results = ctx.Barrier(n), ctx.Queue()
  shares = [seeds[i::n] for i in range(n)]
  workers = [
    ctx.Process(target=_process_worker, args=(args, sh, barrier, results)) for sh in shares
  ]
  for w in workers:
    w.start()
  warm = max(results.get() for _ in range(n))
  walls = [max(results.get() for _ in range(n)) for _ in range(args.repeats)]
  for w in workers:
    w.join()
  return warm, statistics.median(walls)


def _bench_args(args) -> list[str]:
  return [
    *("--variant", args.variant, "--seeds", str(args.seeds), "--n_tasks", str(args.n_tasks)),
    *("--samples_per_task", str(args.samples_per_task), "--log_every", str(args.log_every)),
    *("--repeats", str(args.repeats)),
  ]


def time_distributed(args, n) -> tuple[float, float]:
  """(compile s, median call s) of one sweep over n processes' devices (cljax.distributed).

  Each process (this script with --_process) joins JAX's runtime on 127.0.0.1 and compiles the
  sweep over the global mesh (map on CPUs, vmap on accelerators); each call starts after all
  processes have met (a `distributed.gather`). Process 0's timings.
  """
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  # On accelerators, process i gets device i of this host (JAX's JAX_LOCAL_DEVICE_IDS).
  local = {"JAX_LOCAL_DEVICE_IDS": "{i}", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  local = {} if jax.default_backend() == "cpu" else local
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        *_bench_args(args),
        *("--_process", str(i), "--_of", str(n)),
        *("--_coordinator", address),
      ],
      stdout=subprocess.PIPE,
      text=True,
      env={**os.environ, **{k: v.format(i=i) for k, v in local.items()}},
    )
    for i in range(n)
  ]
  outs = [p.communicate()[0] for p in procs]
  if any(p.returncode for p in procs):
    raise SystemExit(f"a process of the multi-process row failed: {outs}")
  timings = json.loads(outs[0].strip().splitlines()[-1])
  return timings["compile_s"], timings["call_s"]


def _one_of_many(args) -> None:
  """A process of the multi-process row: prints {"compile_s", "call_s"} (JSON) as its last line."""
  distributed.join(distributed.Cluster(args._coordinator, args._of, args._process))
  dataset = data.load_dataset("fashion_mnist")
  seeds = list(range(args.seeds))
  streams = [_stream(args, dataset, s) for s in seeds]
  config, rule = Config(log_every=args.log_every), _rule(args.variant)
  devices = jax.devices()  # all processes' devices
  inputs = (jax.vmap(jax.random.key)(jnp.asarray(seeds)), stack_streams(streams))
  inputs = distributed.replicate((*inputs, grid_hparams(config, len(seeds))), devices)
  t0 = time.perf_counter()
  fn = jax.jit(make_sweep(config, rule, strategy=default_strategy(), devices=devices))
  fn = fn.lower(*inputs).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for r in range(args.repeats):
    distributed.gather(f"repeat{r}", "", 600.0)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - t0)
  distributed.gather("end", "", 600.0)
  print(json.dumps({"compile_s": compile_s, "call_s": statistics.median(times)}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="gem")
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--n_tasks", type=int, default=10)
  parser.add_argument("--samples_per_task", type=int, default=1000)
  parser.add_argument("--log_every", type=int, default=100, help="0: evaluate at task ends only")
  parser.add_argument(
    "--strategies",
    nargs="+",
    default=["processes1", "map1", "vmap1", "processes", "map", "vmap", "distributed"],
    help="processes: worker processes running plain compiled runs (cljax.sweep_cli's CPU "
    "default); map / vmap: make_sweep (one compiled call); with a 1: one process / device, else "
    "one per core; distributed: that call over a global mesh of one process per core with one "
    "device each (cljax.distributed; on accelerators: --processes with their local devices)",
  )
  parser.add_argument(
    "--processes", type=int, default=None, help="processes of distributed (default: one per core)"
  )
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--_process", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_of", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_coordinator", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._process is not None:
    _one_of_many(args)
    return

  dataset = data.load_dataset("fashion_mnist")
  seeds = list(range(args.seeds))
  streams = [
    tasks.make_stream(
      dataset,
      protocol="permutations",
      n_tasks=args.n_tasks,
      samples_per_task=args.samples_per_task,
      seed=s,
    )
    for s in seeds
  ]
  # The seed's settings otherwise.
  config, rule = Config(log_every=args.log_every), _rule(args.variant)
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  stacked, hp = stack_streams(streams), grid_hparams(config, len(seeds))

  t0 = time.perf_counter()
  plain = (
    jax.jit(make_train(config, rule)).lower(keys[0], streams[0], default_hparams(config)).compile()
  )
  rows = [("plain run (1 seed)", time.perf_counter() - t0, None)]
  plain_s = timed(
    lambda: jax.block_until_ready(plain(keys[0], streams[0], default_hparams(config))),
    args.repeats,
  )
  rows[0] = (*rows[0][:2], plain_s)
  devices = jax.devices()
  per_device = -(-len(seeds) // len(devices))
  cpu = devices[0].platform == "cpu"
  n_processes = args.processes or (len(os.sched_getaffinity(0)) if cpu else len(devices))
  candidates = {
    "processes1": ("1 process (plain runs one after another)", "processes", devices[:1]),
    "map1": ("map, 1 device", "map", devices[:1]),
    "vmap1": (f"vmap ({len(seeds)}), 1 device", "vmap", devices[:1]),
    "processes": (f"{len(devices)} processes (plain runs)", "processes", devices),
    "map": (f"map, {len(devices)} devices", "map", devices),
    "vmap": (f"vmap ({per_device} per device), {len(devices)} devices", "vmap", devices),
    "distributed": (
      f"{default_strategy()}, {n_processes} processes x 1 device (jax.distributed)",
      "distributed",
      devices,
    ),
  }
  for name, strategy, devs in (candidates[k] for k in args.strategies):
    if strategy == "distributed":
      rows.append((name, *time_distributed(args, n_processes)))
      print(rows[-1], flush=True)
      continue
    if strategy == "processes":
      rows.append((name, *time_processes(args, seeds, len(devs))))
      print(rows[-1], flush=True)
      continue
    t0 = time.perf_counter()
    fn = jax.jit(make_sweep(config, rule, strategy=strategy, devices=devs))
    fn = fn.lower(keys, stacked, hp).compile()
    compile_s = time.perf_counter() - t0
    call = lambda fn=fn: jax.block_until_ready(fn(keys, stacked, hp))  # noqa: E731
    rows.append((name, compile_s, timed(call, args.repeats, warm=False)))
    print(rows[-1], flush=True)

  lines = [
    f"Sweep of {len(seeds)} seeds, variant {args.variant}, {args.n_tasks} tasks x "
    f"{args.samples_per_task} samples, log_every {args.log_every} (the seed's settings "
    f"otherwise), {os.cpu_count()} CPUs "
    f"({len(devices)} host devices), jax {jax.__version__} on {devices[0].platform}; medians of "
    f"{args.repeats}.",
    "",
    "| strategy | compile s | call s | s per run | per run / plain run |",
    "| --- | --- | --- | --- | --- |",
  ]
  for name, compile_s, total in rows:
    runs = 1 if name.startswith("plain") else len(seeds)
    lines.append(
      f"| {name} | {compile_s:.1f} | {total:.2f} | {total / runs:.2f} | "
      f"{total / runs / plain_s:.2f} |"
    )
  text = "\n".join(lines)
  print(text)
  if args.out:
    write_atomic(args.out, (text + "\n").encode())


if __name__ == "__main__":
  main()
