"""Split CIFAR-100 under gem_paper_cifar on this machine: time per step and per evaluation.

For single, er, agem and gem with the gem_paper_cifar preset (GEM's reduced ResNet-18 with its
BatchNorm state, batch 10, 256 memories per task, 20 tasks x 250 steps, an evaluation every 100
steps of a task and at its end: 61 in all), through the engine's own compiled run:

  a, b      a training step costs a + b t at task t (t past tasks: GEM's memory gradients over
            t x 256 examples, and the GEM code's memory passes through BatchNorm): fitted from
            two runs, T = 1 of 10 steps (10 a) and T = 5 of one step per task (5 a + 10 b),
            evaluating at task ends on 10 test images only (a few ms: not subtracted)
  eval      one evaluation: every task's 10,000 test images, one pass of the shared network
  run       what a whole run implies: 250 (20 a + 190 b) + 61 eval

Real CIFAR-100 is not on this machine: the images are random uint8 of CIFAR-100's shape (32 x 32
x 3, 100 classes). A step's time does not depend on the pixel values. Medians of --repeats runs
(compile timed apart). --conv_check also times a single step inside the run's scan with Flax's
own convolution instead of `cljax.resnet.conv` (whose backward is written out in canonical
layouts).

    python experiments/bench_cifar.py [--variants single er agem gem] [--repeats 3] [--out FILE]
"""

import argparse
import statistics
import time

import jax
import numpy as np

from cljax import data, resnet, run_setup, tasks
from cljax.run_folder import write_atomic
from cljax.train import make_evaluate, make_train

VARIANTS = ["single", "er", "agem", "gem"]
T_FULL, STEPS, EVALS = 20, 250, 20 * 3 + 1  # 2500 / 10 steps; evaluations at 100, 200, 250 + 1


def synthetic_cifar100(n_train: int, n_test: int) -> data.Dataset:
  """Random uint8 images of CIFAR-100's shape with labels cycling over its classes (timing only)."""
  rng = np.random.default_rng(0)

  def split(n):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return data.Split(images, (np.arange(n) % 100).astype(np.int32))

  return data.Dataset("cifar100", split(n_train), split(n_test))


def setup(variant: str):
  argv = ["--preset", "gem_paper_cifar", "--model", variant, "--log_every", "0"]
  args, _ = run_setup.parse_args(argv)
  network = run_setup.network_for(args)
  config = run_setup.train_config(args, network)
  return config, run_setup.rule_for(args, config, network), network


def stream(dataset, n_tasks: int, samples: int, test_samples: int | None = None):
  return tasks.make_stream(
    dataset,
    protocol="split",
    n_tasks=n_tasks,
    samples_per_task=samples,
    test_samples=test_samples,
    seed=0,
    classes_per_task=5,
  )


def timed(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_seconds(config, rule, network, s, repeats: int) -> tuple[float, float]:
  """(compile s, median run s) of the compiled run on stream s."""
  key = jax.random.key(0)
  t0 = time.perf_counter()
  run = jax.jit(make_train(config, rule, network=network)).lower(key, s).compile()
  compile_s = time.perf_counter() - t0
  run(key, s)  # warm-up
  return compile_s, timed(lambda: run(key, s), repeats)


def measure(variant: str, dataset, repeats: int) -> dict:
  config, rule, network = setup(variant)
  one = stream(dataset, 1, 10 * config.batch_size, test_samples=10)
  five = stream(dataset, 5, config.batch_size, test_samples=10)
  compile_s, t1 = run_seconds(config, rule, network, one, repeats)
  _, t5 = run_seconds(config, rule, network, five, repeats)
  a = t1 / 10
  b = (t5 - 5 * a) / 10
  full = stream(dataset, T_FULL, config.batch_size)
  key = jax.random.key(0)
  params = jax.jit(network.init)(key)
  evaluate, averages = jax.jit(make_evaluate(config, network)), network.init_state()
  evaluate(params, full, averages)  # compiles
  eval_s = timed(lambda: evaluate(params, full, averages), repeats)
  train_s = STEPS * (T_FULL * a + b * T_FULL * (T_FULL - 1) / 2)
  return {
    "variant": variant,
    "compile_s": compile_s,
    "a": a,
    "b": b,
    "step_last": a + b * (T_FULL - 1),
    "eval_s": eval_s,
    "train_s": train_s,
    "run_s": train_s + EVALS * eval_s,
  }


def conv_check(dataset, repeats: int) -> tuple[float, float]:
  """Seconds per single step inside the run's scan: cljax.resnet.conv vs Flax's convolution."""
  config, rule, network = setup("single")
  s = stream(dataset, 1, 10 * config.batch_size, test_samples=10)
  own = run_seconds(config, rule, network, s, repeats)[1] / 10
  custom = resnet._flax_conv
  resnet._flax_conv = jax.lax.conv_general_dilated  # autodiff's own backward
  try:
    plain = run_seconds(config, rule, network, s, repeats)[1] / 10
  finally:
    resnet._flax_conv = custom
  return own, plain


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", nargs="+", default=VARIANTS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--conv_check", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  dataset = synthetic_cifar100(n_train=5000, n_test=10000)
  lines = [
    f"split CIFAR-100, gem_paper_cifar, {jax.devices()[0].device_kind} ({jax.default_backend()})",
    "",
    "| variant | compile s | step s at t = 0 (a) | + per past task (b) | step s at t = 19 | "
    "eval s | training h | whole run h |",
    "|" + " --- |" * 8,
  ]
  for variant in args.variants:
    r = measure(variant, dataset, args.repeats)
    lines.append(
      f"| {variant} | {r['compile_s']:.1f} | {r['a']:.3f} | {r['b']:.3f} | {r['step_last']:.3f} "
      f"| {r['eval_s']:.2f} | {r['train_s'] / 3600:.2f} | {r['run_s'] / 3600:.2f} |"
    )
    print(lines[-1], flush=True)
  lines += [
    "",
    f"Medians of {args.repeats}; a whole run: {T_FULL} tasks x {STEPS} steps, {EVALS} "
    "evaluations. Synthetic images of CIFAR-100's shape (the timing does not depend on them).",
  ]
  if args.conv_check:
    own, plain = conv_check(dataset, args.repeats)
    lines += [
      "",
      f"single's step in the scan: cljax.resnet.conv {own * 1e3:.0f} ms, Flax's convolution "
      f"{plain * 1e3:.0f} ms ({plain / own:.1f}x)",
    ]
  text = "\n".join(lines)
  print(text)
  if args.out:
    write_atomic(args.out, (text + "\n").encode())


if __name__ == "__main__":
  main()
