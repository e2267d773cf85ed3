"""A network written outside cljax, run through the public engine: a small Flax CNN.

The CNN below knows nothing of cljax; `cljax.networks.from_module` checks it on the images'
shape and detects what the engine needs (here: no Dense layer reads the flat image first, so the
evaluation maps each task's images; convolutions, so the memory gradients are explicit). It is
trained with gem, agem, er and ewc on permuted Fashion-MNIST, each printing GEM's seed line.

    python experiments/custom_network.py                                 # 10 tasks x 1000
    python experiments/custom_network.py --n_tasks 3 --samples_per_task 200   # a shorter one
"""

import argparse
import sys
import time

import flax.linen as nn
import jax

import cljax
from cljax.networks import from_module


class CNN(nn.Module):
  """Two 3 x 3 convolutions of stride 2 (8 and 16 channels, ReLU), then a Dense layer of logits."""

  n_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, 28, 28, 1) images -> (B, n_classes) logits."""
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
    return nn.Dense(self.n_classes)(x.reshape(x.shape[0], -1))


# Each method with the settings it is usually run with on permuted MNIST (GEM's margin 0.5;
# the A-GEM paper's reference sample of 256; EWC's strength as `make paper`'s middle one).
METHODS = {  # name -> (the engine's settings, the rule's: `cljax.rules.make`'s)
  "gem": (dict(memory_strength=0.5), {}),
  "agem": ({}, dict(replay_batch_size=256)),
  "er": ({}, {}),
  "ewc": (dict(memory_strength=1.0), {}),
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n_tasks", type=int, default=10)
  parser.add_argument("--samples_per_task", type=int, default=1000)
  parser.add_argument("--n_memories", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=10)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_path", default=None)
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
  args = parser.parse_args(argv)
  stream = cljax.make_stream(
    cljax.load_dataset("fashion_mnist", data_path=args.data_path),
    protocol="permutations",
    n_tasks=args.n_tasks,
    samples_per_task=args.samples_per_task,
    seed=args.seed,
  )
  network = from_module(CNN(), input_shape=(28, 28, 1), n_classes=10)
  print(
    f"CNN on permuted Fashion-MNIST, {args.n_tasks} tasks x {args.samples_per_task}: evaluation "
    f"{'folded' if network.first_dense else 'mapped'}, memory gradients "
    f"{'factored' if network.dense_only else 'explicit'}"
  )
  for name in args.methods.split(","):
    engine, own = METHODS[name]
    config = cljax.Config(
      **engine,
      n_memories=args.n_memories,
      batch_size=args.batch_size,
      lr=args.lr,
      log_every=0,
    )
    start = time.perf_counter()
    train = cljax.make_train(config, cljax.rules.make(name, **own), network=network)
    result = jax.jit(train)(jax.random.key(args.seed), stream)
    line = cljax.format_seed_line(result.acc, result.baseline).splitlines()[-1]
    print(f"{name:5s} {line}  ({time.perf_counter() - start:.1f} s with its compile)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
