"""Run benchmark: compile cold and warm, run time against its floor, evaluation rate, peak memory.

The seed's configuration (Fashion-MNIST permutations, 10 tasks x 1000 samples, batch 1, MLP
2 x 100, n_memories 10, memory_strength 10, lr 0.01, seed 3, an evaluation every 100 steps). Each
variant runs in two fresh processes sharing an empty compilation-cache folder, so that the peak
resident memory (max RSS, data included) is the variant's own and the warm compile is what a
second `make run` pays:

  compile cold  lowering + XLA compile of the whole run, empty cache (first process)
  compile warm  the same in a second process: the program comes from JAX's persistent cache
  run           the compiled run (101 evaluations of 10 x 10,000 test images), median of --repeats
  driven        the same run driven from Python piece by piece, as `python -m cljax` runs it
                (`train.make_task_runner`: a call per chunk of log_every steps, per task start and
                end), median of --repeats: what the per-task calls cost beside the one program
  floor         the run's flops at the float32 matmul rate measured in the same process (a 2048^3
                product): 101 evaluations x 2 x 89,610 flop per test image and task, plus the
                training flops, forward + backward (6 x 89,610 flop) of the step's example and of
                the t x n_memories memory examples of the t past tasks
  run / floor   how far the run is from the machine's matmul rate
  eval          one evaluation of all 10 tasks (median of 5), GFLOP/s and its share of the rate
  train         the run minus its 101 evaluations, and per training step
  peak MB       the first process's max RSS (compiling is most of it)

agem_cnn is agem on the CNN of experiments/custom_network.py, a network from outside cljax
(`cljax.networks.from_module`): its evaluation maps each task's images (no first Dense layer to
fold them into) and its memory gradients are explicit; its flop per example is XLA's cost
analysis of the module's forward pass.

With --e2e the whole process `python -m cljax --model V` is also timed, with an empty cache and
again with a warm one (median of --e2e_repeats): what `make run VARIANT=V` costs.

    python experiments/bench_run.py [--variants ...] [--repeats 3] [--e2e] [--out FILE]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cljax import data, tasks
from cljax.networks import Network, from_module
from cljax.rules import registry
from cljax.run_folder import write_atomic
from cljax.train import Config, make_evaluate, make_task_runner, make_train, schedule, stack

VARIANTS = ["single", "agem", "agem_old", "agem_new", "agem_qp_mean", "gem", "gem_grouped"]
OTHER_NETWORKS = {"agem_cnn": "agem"}  # a row name -> the variant it runs on the CNN
PARAMS = 89_610  # the MLP 784-100-100-10's parameters: flop per example and layer pass / 2
T, S, M, EVERY = 10, 1000, 10, 100
N_EVALS = T * (S // EVERY) + 1  # GEM's schedule and the baseline


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _matmul_gflops() -> float:
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))
  return 2 * 2048**3 / _median_time(lambda: jax.block_until_ready(mm(a)), 10) / 1e9


def _cnn() -> Network:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from custom_network import CNN  # an experiment beside this one

  return from_module(CNN(), input_shape=(28, 28, 1), n_classes=10)


def _forward_flop(network: Network) -> float:
  """XLA's flop count of the network's forward pass, per example (batch 100)."""
  params = network.init(jax.random.key(0))
  x = jnp.zeros((100, network.n_inputs), jnp.float32)
  cost = jax.jit(network.apply).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / 100


def measure(variant: str, repeats: int, warm_only: bool) -> dict:
  """One variant in this process (its compilation cache set by the parent)."""
  network = _cnn() if variant in OTHER_NETWORKS else None
  stream = tasks.make_stream(
    data.load_dataset("fashion_mnist"),
    protocol="permutations",
    n_tasks=T,
    samples_per_task=S,
    seed=3,
  )
  key = jax.random.key(3)
  cfg, name = Config(log_every=EVERY), OTHER_NETWORKS.get(variant, variant)
  rule = registry.make(name, **({"agem_ref": "task_mean"} if name == "agem" else {}))
  t0 = time.perf_counter()
  run = jax.jit(make_train(cfg, rule, network=network)).lower(key, stream).compile()
  out = {"variant": variant, "compile_s": time.perf_counter() - t0}
  if warm_only:
    return out
  result = jax.block_until_ready(run(key, stream))  # warm-up
  out["run_s"] = _median_time(lambda: jax.block_until_ready(run(key, stream)), repeats)
  driven = _driven(cfg, rule, network, key, stream)
  driven()  # compiles its pieces
  out["driven_s"] = _median_time(driven, repeats)
  evaluate = jax.jit(make_evaluate(cfg, network)).lower(result.params, stream).compile()
  jax.block_until_ready(evaluate(result.params, stream))
  out["eval_s"] = _median_time(lambda: jax.block_until_ready(evaluate(result.params, stream)), 5)
  out["matmul_gflops"] = _matmul_gflops()
  forward = 2 * PARAMS if network is None else _forward_flop(network)  # per example
  eval_flop = T * stream.test_x.shape[0] * forward
  memory_examples = 0 if variant == "single" else M * sum(range(T))  # t x M, summed over tasks
  train_flop = 3 * forward * (T * S + S * memory_examples)
  out["eval_gflops"] = eval_flop / out["eval_s"] / 1e9
  out["floor_s"] = (N_EVALS * eval_flop + train_flop) / (out["matmul_gflops"] * 1e9)
  out["train_s"] = max(out["run_s"] - N_EVALS * out["eval_s"], 0.0)
  out["train_floor_s"] = train_flop / (out["matmul_gflops"] * 1e9)
  out["final"] = float(jnp.mean(result.acc[-1]))
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def _driven(cfg, rule, network, key, stream):
  """A function running the whole run piece by piece (the CLI's loop, without its printing)."""
  runner = make_task_runner(cfg, rule, network=network)
  start, start_task, chunk, end = (
    jax.jit(f) for f in (runner.start, runner.start_task, runner.chunk, runner.end_task)
  )
  _, _, n_chunks = schedule(cfg, stream)

  def run():
    state, baseline = start(key, stream)
    outputs = []
    for t in range(stream.train_idx.shape[0]):
      state = start_task(state, np.int32(t), key, stream)
      chunks = []
      for c in range(n_chunks):
        state, out = chunk(state, np.int32(t), np.int32(c), key, stream)
        chunks.append(jax.device_get(out))
      state, out = end(state, np.int32(t), stack(chunks), key, stream)
      outputs.append(jax.device_get(out))
    return runner.finish(jax.device_get(baseline), outputs, jax.device_get(state))

  return run


def _child(variant, cache, repeats, warm_only):
  cmd = [sys.executable, __file__, "--one", variant, "--repeats", str(repeats)]
  cmd += ["--warm_only"] if warm_only else []
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{variant}: failed\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _e2e(variant, repeats, trees=(None,)):
  """Whole-process wall time of `python -m cljax --model variant`: {tree: (cold, warm) medians}.

  trees: source trees to run cljax from (None: this one), interleaved within each repeat so that
  they see the same machine load.
  """
  times = {tree: ([], []) for tree in trees}
  for _ in range(repeats):
    for tree in trees:
      with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as save:
        cmd = [sys.executable, "-m", "cljax", "--model", variant, "--save_path", save]
        env = {**os.environ, "CLJAX_CACHE_DIR": cache}
        if tree is not None:
          env["PYTHONPATH"] = tree
        for kind in times[tree]:
          t0 = time.perf_counter()
          subprocess.run([*cmd, "--no_plots"], capture_output=True, check=True, env=env, cwd=tree)
          kind.append(time.perf_counter() - t0)
  return {tree: (statistics.median(c), statistics.median(w)) for tree, (c, w) in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", nargs="+", default=VARIANTS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--e2e", nargs="*", default=None, help="variants to time as whole processes")
  parser.add_argument("--e2e_repeats", type=int, default=3)
  parser.add_argument(
    "--e2e_before", default=None, help="another source tree (e.g. a git worktree) timed beside"
  )
  parser.add_argument("--out", default=None)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process
  parser.add_argument("--warm_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.one:
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print(json.dumps(measure(args.one, args.repeats, args.warm_only)))
    return

  rows = []
  for variant in args.variants:
    with tempfile.TemporaryDirectory() as cache:
      row = _child(variant, cache, args.repeats, warm_only=False)
      row["warm_compile_s"] = _child(variant, cache, args.repeats, warm_only=True)["compile_s"]
    rows.append(row)
    print(f"measured {variant}", file=sys.stderr, flush=True)

  lines = [
    "| variant | compile cold s | compile warm s | run s | driven s | floor s | run / floor | "
    "eval s | eval GFLOP/s (% of matmul) | train s (floor) | step us | peak MB |",
    "|" + " --- |" * 12,
  ]
  for r in rows:
    lines.append(
      f"| {r['variant']} | {r['compile_s']:.1f} | {r['warm_compile_s']:.2f} | {r['run_s']:.2f} | "
      f"{r['driven_s']:.2f} | "
      f"{r['floor_s']:.2f} | {r['run_s'] / r['floor_s']:.2f} | {r['eval_s']:.3f} | "
      f"{r['eval_gflops']:.0f} ({100 * r['eval_gflops'] / r['matmul_gflops']:.0f}%) | "
      f"{r['train_s']:.2f} ({r['train_floor_s']:.2f}) | {r['train_s'] / (T * S) * 1e6:.0f} | "
      f"{r['peak_rss_mb']:.0f} |"
    )
  matmul = statistics.median(r["matmul_gflops"] for r in rows) if rows else float("nan")
  lines += [
    "",
    f"Medians of {args.repeats} runs after a warm-up; float32 matmul rate {matmul:.0f} GFLOP/s "
    "(2048^3, measured in each variant's process). agem is the A-GEM paper's rule with the "
    "task-mean reference; agem_cnn the same on experiments/custom_network.py's CNN. train = run "
    "- 101 evaluations.",
  ]
  if args.e2e is not None:
    lines += [
      "",
      "| variant | tree | `python -m cljax` cold cache s | warm cache s |",
      "| --- | --- | --- | --- |",
    ]
    trees = (None,) if args.e2e_before is None else (args.e2e_before, None)
    for variant in args.e2e or ["agem_new", "gem"]:
      for tree, (cold, warm) in _e2e(variant, args.e2e_repeats, trees).items():
        lines.append(f"| {variant} | {tree or 'this one'} | {cold:.1f} | {warm:.1f} |")
    lines += [
      "",
      f"Whole process (import, data, compile, run, results), median of {args.e2e_repeats}.",
    ]
  text = "\n".join(lines)
  print(text)
  if args.out:
    write_atomic(args.out, (text + "\n").encode())


if __name__ == "__main__":
  main()
