"""Time per SGD step of GEM's reduced ResNet-18 (`cljax.resnet`), the split CIFAR-100 network.

One step as GEM's `single` takes it on split CIFAR-100: a batch of --batch_size 32 x 32 x 3
images, BatchNorm in training mode (batch statistics, running averages updated), the
cross-entropy of the task's 5 logits, the gradient and an SGD update, jit-compiled. Also the
forward and backward of --memory examples (one past task's GEM memory gradient, 256 in the GEM
paper). Random images: the time, not the data, is measured. Compile separately; median of
--repeats calls.

    python experiments/bench_resnet.py [--batch_size 10] [--memory 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from cljax.models import param_count
from cljax.resnet import ResNet18


def make_step(model, lr=0.1):
  def loss(params, stats, x, y):
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    head = jnp.arange(logits.shape[-1]) < 5  # the task's 5 classes
    logits = jnp.where(head, logits, -jnp.inf)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

  def step(params, stats, x, y):
    (_, updates), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x, y)
    params = jax.tree.map(lambda p, d: p - lr * d, params, g)
    return params, updates["batch_stats"]

  def memory_grad(params, stats, x, y):
    return jax.grad(lambda p: loss(p, stats, x, y)[0])(params)

  return jax.jit(step), jax.jit(memory_grad)


def timed(fn, args, repeats):
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=10)
  parser.add_argument("--memory", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  model = ResNet18()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 3072)), train=False)
  params, stats = variables["params"], variables["batch_stats"]
  step, memory_grad = make_step(model)
  device = jax.devices()[0]
  print(f"ResNet-18 (nf 20, 100 classes): {param_count(params):,} parameters; {device.platform}")
  for name, fn, n in (
    ("train step", step, args.batch_size),
    ("memory gradient", memory_grad, args.memory),
  ):
    x = jax.random.uniform(jax.random.key(1), (n, 3072))
    y = jax.random.randint(jax.random.key(2), (n,), 0, 5)
    compile_s, run_s = timed(fn, (params, stats, x, y), args.repeats)
    print(
      f"{name:16s} batch {n:4d}: {1000 * run_s:8.2f} ms (median of {args.repeats}), "
      f"compile {compile_s:.1f} s"
    )


if __name__ == "__main__":
  main()
