"""A rule written outside cljax, run through the public engine: loss-weighted A-GEM.

The reference row weighs each past task by its current memory loss, ref = sum_k a_k r_k with
a_k = L_k / sum_j L_j (k < t): the tasks being forgotten most pull hardest. The A-GEM paper's
conditional projection then removes g's conflicting component. Everything it reads comes from the
rule's `StepContext` through `cljax.memory_grads`.

    python experiments/custom_rule.py                 # the seed's configuration, seed 3
    python experiments/custom_rule.py --n_tasks 3 --samples_per_task 200    # a shorter one

Prints GEM's seed line of the run and, for comparison, agem's (task_mean) on the same stream.
"""

import argparse
import sys

import jax
import jax.numpy as jnp

import cljax
from cljax import memory_grads, rules
from cljax.example_grads import weighted_grad
from cljax.memory import past_weights


def loss_weighted_reference() -> rules.Reference:
  """The row sum_{k<t} (L_k / sum_j L_j) r_k, from one pass over the memory's example factors."""

  def row(ctx: rules.StepContext, checks: bool):
    def on_slots(c: rules.StepContext):
      w = past_weights(c.memory, c.t)  # (n, M): r_k = sum_i w_ki grad l_i
      mem = memory_grads.memory_factors(c)
      task_loss = jnp.sum(w * mem.loss.reshape(w.shape), axis=1)  # (n,) L_k, 0 for k >= t
      a = task_loss / jnp.maximum(jnp.sum(task_loss), 1e-12)
      return weighted_grad(c.params, mem, (a[:, None] * w).reshape(-1)), None

    return memory_grads.on_past_slots(on_slots, ctx)

  return rules.Reference("loss_weighted", row, has_checks=False)


def loss_weighted_agem() -> rules.Rule:
  return rules.agem_rule(loss_weighted_reference(), rules.reference_trigger(), rules.conditional())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n_tasks", type=int, default=10)
  parser.add_argument("--samples_per_task", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=3)
  parser.add_argument("--data_path", default=None)
  args = parser.parse_args(argv)
  dataset = cljax.load_dataset("fashion_mnist", data_path=args.data_path)
  stream = cljax.make_stream(
    dataset,
    protocol="permutations",
    n_tasks=args.n_tasks,
    samples_per_task=args.samples_per_task,
    seed=args.seed,
  )
  config = cljax.Config()  # the seed's settings
  key = jax.random.key(args.seed)
  built_in = cljax.rules.make("agem", agem_ref="task_mean")
  for name, rule in (("loss-weighted A-GEM", loss_weighted_agem()), ("agem task_mean", built_in)):
    result = jax.jit(cljax.make_train(config, rule))(key, stream)
    print(f"{name}: {cljax.format_seed_line(result.acc, result.baseline)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
