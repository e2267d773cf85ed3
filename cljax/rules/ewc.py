"""EWC (Kirkpatrick et al. 2017): a quadratic penalty anchoring the parameters of finished tasks.

    L(theta) = L_t(theta) + memory_strength / 2 * sum_{k<t} sum_i F_k,i (theta_i - theta_k,i)^2

theta_k are the parameters at the end of task k, F_k the diagonal Fisher information there,
estimated on task k's episodic memory. The penalty's gradient is kept as two running sums, so the
state has the parameters' size whatever the number of tasks:

    memory_strength * (S theta - A),   S = sum_k F_k,   A = sum_k F_k theta_k

The Fisher estimate ("empirical", the EWC paper's): the mean over the memory's examples of the
squared per-example gradients, F = 1/n sum_j (grad l_j)^2. The GEM code squares the gradient of
the mean memory loss instead, F = (grad 1/n sum_j l_j)^2 ("batch_squared", a known deviation kept
for comparison). The GEM code also takes the task's first n_memories examples (cljax: its ring
buffer) and drops the 1/2, so its --memory_strength r is cljax's 2 r.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax.errors import CljaxError
from cljax.memory_grads import mean_loss
from cljax.rules.base import Rule, StepContext, TaskEndContext

PyTree = Any
FISHERS = ("empirical", "batch_squared")


class EWCState(NamedTuple):
  """The penalty's running sums over finished tasks (each a pytree like the parameters)."""

  fisher_sum: PyTree  # S = sum_k F_k
  anchor_sum: PyTree  # A = sum_k F_k * theta_k


def fisher_diagonal(
  apply: Callable[[PyTree, jax.Array], jax.Array],
  params: PyTree,
  x: jax.Array,
  y: jax.Array,
  valid: jax.Array,
  kind: str = "empirical",
) -> PyTree:
  """The diagonal Fisher estimate on the valid examples of (x (n, D), y (n,)), valid (n,) bool.

  empirical: 1/m sum_{j valid} (grad l_j)^2, m the valid count (per-example gradients, vmapped);
  batch_squared: (grad 1/m sum_{j valid} l_j)^2. No valid example: zeros. jit-safe.
  """
  if kind not in FISHERS:
    raise CljaxError(f"unknown fisher {kind!r}: choose one of {', '.join(FISHERS)}.")
  w = valid.astype(x.dtype) / jnp.maximum(jnp.sum(valid), 1).astype(x.dtype)
  one = lambda p, xj, yj: mean_loss(apply, p, xj[None], yj[None])  # noqa: E731  l_j
  per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)  # (n, ...) grad l_j
  if kind == "empirical":
    return jax.tree.map(lambda g: jnp.tensordot(w, jnp.square(g), axes=1), per_example)
  return jax.tree.map(lambda g: jnp.square(jnp.tensordot(w, g, axes=1)), per_example)


def ewc(fisher: str = "empirical") -> Rule:
  """EWC's rule: g + memory_strength (S theta - A); at each task end, S += F_t, A += F_t theta_t.

  memory_strength is the traced `HParams.memory_strength` (the penalty's lambda).
  """
  if fisher not in FISHERS:
    raise CljaxError(f"unknown fisher {fisher!r}: choose one of {', '.join(FISHERS)}.")

  def init(params, n_tasks):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return EWCState(zeros, zeros)

  def update(g, ctx: StepContext, state: EWCState):
    lam = ctx.hparams.memory_strength
    g_new = jax.tree.map(
      lambda gi, p, s, a: gi + lam * (s * p - a), g, ctx.params, state.fisher_sum, state.anchor_sum
    )
    return g_new, {}, state

  def end_task(state: EWCState, ctx: TaskEndContext):
    m, t = ctx.memory, ctx.t
    F = fisher_diagonal(ctx.apply, ctx.params, m.x[t], m.y[t], m.filled[t], fisher)
    return EWCState(
      jax.tree.map(jnp.add, state.fisher_sum, F),
      jax.tree.map(lambda a, f, p: a + f * p, state.anchor_sum, F, ctx.params),
    )

  return Rule(init=init, update=update, end_task=end_task)
