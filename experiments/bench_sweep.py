"""Sweep benchmark: the cost per run of S seeds in one compiled call, relative to one plain run.

Strategies (cljax.sweep.make_sweep): "map" (lax.map, one run after another inside the call),
"map/B" (lax.map vmapping B runs at a time) and "vmap" (all S at once). A plain run is
jax.jit(make_train(config)) on one seed; a Python loop of plain runs costs S x that. Medians of
--repeats calls after a warm-up, compile time separately; all in one process, side by side.

    python experiments/bench_sweep.py [--variant gem] [--seeds 4] [--n_tasks 10] [--out FILE]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from cljax import data, tasks
from cljax.results import write_atomic
from cljax.sweep import grid_hparams, make_sweep, stack_streams
from cljax.train import Config, default_hparams, make_train


def timed(fn, repeats):
  fn()  # warm
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="gem")
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--n_tasks", type=int, default=10)
  parser.add_argument("--samples_per_task", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

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
  config = Config(variant=args.variant, agem_ref="task_mean")  # the seed's settings otherwise
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  stacked, hp = stack_streams(streams), grid_hparams(config, len(seeds))

  t0 = time.perf_counter()
  plain = jax.jit(make_train(config)).lower(keys[0], streams[0], default_hparams(config)).compile()
  rows = [("plain run (1 seed)", time.perf_counter() - t0, None)]
  plain_s = timed(
    lambda: jax.block_until_ready(plain(keys[0], streams[0], default_hparams(config))),
    args.repeats,
  )
  rows[0] = (*rows[0][:2], plain_s)
  for name, strategy, batch in [
    ("map", "map", None),
    ("map/2", "map", 2),
    (f"vmap ({len(seeds)})", "vmap", None),
  ]:
    t0 = time.perf_counter()
    fn = jax.jit(make_sweep(config, strategy=strategy, batch_size=batch))
    fn = fn.lower(keys, stacked, hp).compile()
    compile_s = time.perf_counter() - t0
    total = timed(lambda fn=fn: jax.block_until_ready(fn(keys, stacked, hp)), args.repeats)
    rows.append((name, compile_s, total))

  lines = [
    f"Sweep of {len(seeds)} seeds, variant {args.variant}, {args.n_tasks} tasks x "
    f"{args.samples_per_task} samples (the seed's settings otherwise), {os.cpu_count()} CPUs, "
    f"jax {jax.__version__} on {jax.devices()[0].platform}; medians of {args.repeats}.",
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
