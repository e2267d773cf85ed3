"""GEM (Lopez-Paz & Ranzato 2017): one constraint row r_k per past task and the dual QP.

    min_v 1/2 v'(R R' + eps I)v + (R g)'v   s.t. v >= margin,   g~ = g + R'v

(`cljax.projections.gem_dual`), R the (t, p) rows of the past tasks' memory gradients. With the
factored memory gradients the rows are never formed: R R', R g and R'v come from per-example
factors (`cljax.memory_grads`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax import memory_grads
from cljax.example_grads import weighted_grad
from cljax.memory import past_weights
from cljax.projections import gem_dual, gem_project
from cljax.rules.base import Rule, StepContext, qp_counters, stateless, when_past


def gem(mode: str | None = None, *, eps: float = 1e-3, max_iter: int = 1000) -> Rule:
  """GEM's rule: margin = the traced memory_strength.

  mode: "factored" or "explicit" memory-gradient rows (None: the run's, `StepContext.memory_grads`);
  eps: the ridge on the rows' Gram matrix; max_iter: the dual solver's iteration cap.
  """

  def project(g, ctx: StepContext):
    past = ctx.past
    qp_args = {
      "margin": ctx.hparams.memory_strength,
      "mask": past,
      "eps": eps,
      "max_iter": max_iter,
    }
    if (mode or ctx.memory_grads) == "explicit":
      g_new, info = gem_project(g, memory_grads.past_rows(ctx), **qp_args)
      return g_new, qp_counters(info.violated, info.projected, info.qp)

    # The factored terms are computed on the first n task slots (`on_past_slots`) and padded to
    # T: the QP is solved once at size T (masked), not once per compiled slot count.
    T, M = ctx.memory.x.shape[:2]
    batch = memory_grads.batch_factors(ctx)  # once, outside the compiled slot counts

    def terms(c: StepContext):
      w = past_weights(c.memory, c.t)  # (n, M): row k = sum_i w_ki grad l_i
      mem = memory_grads.memory_factors(c)
      pad = T - w.shape[0]
      P = jnp.pad(memory_grads.task_gram(c, mem, w), ((0, pad), (0, pad)))
      q = jnp.pad(memory_grads.factored_checks(c, mem, w, batch), (0, pad))
      rows = [(0, pad * M)]
      return P, q, jax.tree.map(lambda a: jnp.pad(a, rows + [(0, 0)] * (a.ndim - 1)), mem)

    P, q, mem = memory_grads.on_past_slots(terms, ctx)
    v, info = gem_dual(P, q, **qp_args)

    def add_rows(c: StepContext):  # g + G'v on the same first n task slots
      n = c.memory.x.shape[0]
      rows = jax.tree.map(lambda a: a[: n * M], mem)
      coef = (v[:n, None] * past_weights(c.memory, c.t)).reshape(-1)
      return jax.tree.map(jnp.add, g, weighted_grad(c.params, rows, coef))

    g_new = jax.lax.cond(
      info.projected, lambda: memory_grads.on_past_slots(add_rows, ctx), lambda: g
    )
    return g_new, qp_counters(info.violated, info.projected, info.qp)

  return stateless(lambda g, ctx: when_past(ctx, lambda: project(g, ctx), g))
