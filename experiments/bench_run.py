"""Run benchmark: compile time, run time, time per training step and peak memory per variant.

The seed's configuration (Fashion-MNIST permutations, 10 tasks x 1000 samples, batch 1, MLP
2 x 100, n_memories 10, memory_strength 10, lr 0.01, seed 3). Each variant runs in its own process,
so its peak resident memory (max RSS, data included) is its own. Per variant:

  compile   jit lowering + XLA compile of the whole run (log_every 100)
  e2e       the compiled run with GEM's evaluation schedule (101 evaluations of 10 x 10,000
            test images), median of --repeats runs
  train     the run with evaluation only at task ends (log_every 0: 11 evaluations), minus those
            11 evaluations timed on their own: training steps only
  step      train / 10,000 steps
  eval      one evaluation of all 10 tasks (median), and its throughput in GFLOP/s

The floating-point floor of the training work is printed next to it: forward + backward of the
current example and of t x n_memories memory examples per step, 6 x 89,610 flop per example,
at the matmul throughput measured in the same process (a 2048^3 float32 matmul).

    python experiments/bench_run.py [--variants ...] [--repeats 3] [--out FILE]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from cljax import data, tasks
from cljax.run_folder import write_atomic
from cljax.train import Config, make_evaluate, make_train

# PyTorch GEM code on this kind of 2-core machine (torch 2.13 CPU, quadprog 0.1.14), seconds:
# end to end with log_every 100 / training only.
REFERENCE = {
  "gem": (124, 101),
  "agem_old": (104, 78),
  "agem_qp_mean": (147, 123),
  "agem_new": (40, 35),
  "agem": (39, 25),  # paper A-GEM, task-mean reference
  "single": (47, 7.7),
}
VARIANTS = ["single", *(v for v in REFERENCE if v != "single")]  # those with a PyTorch figure
PARAMS = 89_610
T, S, M = 10, 1000, 10


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(variant: str, agem_ref: str, repeats: int) -> dict:
  """One variant, in this process: the numbers of the table."""
  stream = tasks.make_stream(
    data.load_dataset("fashion_mnist"),
    protocol="permutations",
    n_tasks=T,
    samples_per_task=S,
    seed=3,
  )
  key = jax.random.key(3)
  out = {"variant": variant, "agem_ref": agem_ref if variant == "agem" else None}

  cfg = Config(variant=variant, agem_ref=agem_ref, log_every=100)
  t0 = time.perf_counter()
  e2e = jax.jit(make_train(cfg)).lower(key, stream).compile()
  out["compile_s"] = time.perf_counter() - t0
  result = jax.block_until_ready(e2e(key, stream))  # warm
  out["e2e_s"] = _median_time(lambda: jax.block_until_ready(e2e(key, stream)), repeats)

  quiet = jax.jit(make_train(Config(variant=variant, agem_ref=agem_ref, log_every=0)))
  quiet = quiet.lower(key, stream).compile()
  jax.block_until_ready(quiet(key, stream))
  quiet_s = _median_time(lambda: jax.block_until_ready(quiet(key, stream)), repeats)
  evaluate = jax.jit(make_evaluate(cfg)).lower(result.params, stream).compile()
  jax.block_until_ready(evaluate(result.params, stream))
  out["eval_s"] = _median_time(lambda: jax.block_until_ready(evaluate(result.params, stream)), 5)
  out["train_s"] = max(quiet_s - (T + 1) * out["eval_s"], 0.0)
  out["step_us"] = out["train_s"] / (T * S) * 1e6
  n_test = stream.test_x.shape[0]
  eval_flop = 2 * T * n_test * PARAMS
  out["eval_gflops"] = eval_flop / out["eval_s"] / 1e9

  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))
  out["matmul_gflops"] = 2 * 2048**3 / _median_time(lambda: jax.block_until_ready(mm(a)), 10) / 1e9
  memory_examples = 0 if variant == "single" else M * sum(range(T))  # t x M, summed over tasks
  out["train_tflop"] = 6 * PARAMS * (T * S + S * memory_examples) / 1e12
  out["floor_s"] = out["train_tflop"] * 1e12 / (out["matmul_gflops"] * 1e9)
  out["final"] = float(jnp.mean(result.acc[-1]))
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", nargs="+", default=VARIANTS)
  parser.add_argument("--agem_ref", default="task_mean", choices=["pooled", "task_mean"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process
  args = parser.parse_args()

  if args.one:
    print(json.dumps(measure(args.one, args.agem_ref, args.repeats)))
    return

  rows = []
  for variant in args.variants:
    cmd = [sys.executable, __file__, "--one", variant, "--agem_ref", args.agem_ref]
    cmd += ["--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      print(f"{variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
      continue
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"measured {variant}", file=sys.stderr, flush=True)

  header = (
    "| variant | compile s | e2e s (ref) | x faster | train s (ref) | x faster | step us | "
    "floor s | eval s | eval GFLOP/s | peak MB |"
  )
  lines = [header, "|" + " --- |" * 11]
  for r in rows:
    ref_e2e, ref_train = REFERENCE[r["variant"]]
    name = r["variant"] + (f" ({r['agem_ref']})" if r["agem_ref"] else "")
    lines.append(
      f"| {name} | {r['compile_s']:.1f} | {r['e2e_s']:.2f} ({ref_e2e}) | "
      f"{ref_e2e / r['e2e_s']:.1f} | {r['train_s']:.2f} ({ref_train}) | "
      f"{ref_train / max(r['train_s'], 1e-9):.1f} | {r['step_us']:.0f} | {r['floor_s']:.2f} | "
      f"{r['eval_s']:.3f} | {r['eval_gflops']:.0f} | {r['peak_rss_mb']:.0f} |"
    )
  matmul = statistics.median(r["matmul_gflops"] for r in rows) if rows else float("nan")
  lines.append("")
  lines.append(
    f"Medians of {args.repeats} runs after a warm-up; compile separately. Reference (ref): the "
    "PyTorch GEM code on this kind of machine. floor: training flops at the measured matmul "
    f"throughput ({matmul:.0f} GFLOP/s, 2048^3 float32). eval: one evaluation of 10 tasks x "
    "10,000 test images (2 x 89,610 flop per image). peak MB: max RSS of the variant's process."
  )
  text = "\n".join(lines)
  print(text)
  if args.out:
    write_atomic(args.out, (text + "\n").encode())


if __name__ == "__main__":
  main()
