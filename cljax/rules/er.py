"""Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

Each step's loss is the mean over the batch joined with a sample of replay_batch_size examples of
the episodic memory:

    L = (sum_{batch} l_i + sum_{sample} l_j) / (B + n),   so   g~ = (B g + n g_mem) / (B + n)

g the batch's mean-loss gradient, g_mem the sample's, n its size (fewer while the memory holds
fewer examples; with none, g~ = g). Two buffers (`cljax.memory`): "ring", GEM's ring buffer per
task, sampled from the past tasks k < t (as A-GEM's pooled reference); "reservoir", one pool over
the whole stream (reservoir sampling, written after each step), sampled from all it holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax import memory_grads
from cljax.errors import CljaxError
from cljax.rules.base import Rule, StepContext

BUFFERS = ("ring", "reservoir")


def replay_sample(ctx: StepContext, sample_size: int, buffer: str):
  """(x (k, D), y (k,), valid (k,)): the step's replay sample (`memory_grads.pooled_sample`)."""
  m = ctx.memory
  avail = m.filled & ctx.past[:, None] if buffer == "ring" else m.filled
  idx, valid = memory_grads.pooled_sample(m, avail, ctx.key, sample_size)
  return (*memory_grads.memory_rows(m, idx), valid)


def er(replay_batch_size: int, buffer: str = "ring") -> Rule:
  """ER's rule: the gradient of the batch joined with a memory sample (see the module docstring).

  Its counter: replayed, the steps whose sample was not empty (the replay changed g).
  """
  if buffer not in BUFFERS:
    raise CljaxError(f"unknown replay buffer {buffer!r}: choose one of {', '.join(BUFFERS)}.")
  if replay_batch_size < 1:
    raise CljaxError(f"replay_batch_size must be >= 1, got {replay_batch_size}.")

  def update(g, ctx: StepContext, state):
    x, y, valid = replay_sample(ctx, replay_batch_size, buffer)
    n = jnp.sum(valid).astype(jnp.float32)
    B = jnp.float32(ctx.x.shape[0])
    w = valid.astype(jnp.float32)
    g_sum = jax.grad(lambda p: memory_grads.weighted_loss(ctx, p, x, y, w))(ctx.params)
    replayed = n > 0
    g_new = jax.tree.map(lambda a, s: jnp.where(replayed, (B * a + s) / (B + n), a), g, g_sum)
    return g_new, {"replayed": replayed}, state

  return Rule(
    init=lambda params, n_tasks: None,
    update=update,
    memory_writes="reservoir" if buffer == "reservoir" else "ring",
  )
