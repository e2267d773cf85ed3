"""The grouped variants: GEM's rows split by groups of hidden units, weighted by task relatedness.

Row k is g_k * w_k: task k's memory gradient with each group's weights scaled by the multiplier
h[k, layer, group] (`cljax.grouped.state`: groups formed after task 0, relatedness of the tasks'
covariances per group). The rows are never formed: their Gram matrix, their dots with g and their
weighted sums come from the memory examples' gradient factors with per-example input scales
(`cljax.grouped.rows`). The rule's state is the `GroupedState`, observed at every step (with the
current parameters) and frozen at each task end.

- gem_grouped: GEM's QP (margin 0) over the t grouped rows;
- agem_grouped: the A-GEM paper's conditional projection on their mean;
- agem_qp_grouped (the seed's attempt): that mean row into GEM's QP under GEM's per-task trigger,
  margin = the mean of h over past tasks, layers and non-empty groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax import memory_grads
from cljax.errors import CljaxError
from cljax.grouped.rows import example_scales, grouped_row_sum, grouped_terms
from cljax.grouped.state import (
  GroupedConfig,
  end_task,
  extra_vector,
  group_mask,
  grouped_init,
  hidden_activations,
  observe,
)
from cljax.memory import past_weights
from cljax.projections import gem_dual
from cljax.rules.agem import conditional, one_row_qp
from cljax.rules.base import Rule, StepContext, TaskEndContext, qp_counters, when_past

GROUPED_RULES = ("gem_grouped", "agem_grouped", "agem_qp_grouped")


def grouped(kind: str, config: GroupedConfig, *, eps: float = 1e-3, max_iter: int = 1000) -> Rule:
  """The grouped rule `kind` (one of GROUPED_RULES) on cljax's MLP (`cljax.models.MLP`).

  config: the groups and relatedness settings; eps, max_iter: the QP's ridge and iteration cap
  (gem_grouped, agem_qp_grouped). The hidden layers' count and width are read from the
  parameters at init; the rows come from per-example factors (it declares `hidden_units`: the
  engine refuses memory_grads "explicit").
  """
  if kind not in GROUPED_RULES:
    raise CljaxError(f"unknown grouped rule {kind!r}: choose one of {', '.join(GROUPED_RULES)}.")
  conditional_projection = conditional().project

  def project(g, ctx: StepContext, state):
    past = ctx.past
    T, M = ctx.memory.x.shape[:2]
    assignments = [state.assignments[layer] for layer in range(state.assignments.shape[0])]
    batch = memory_grads.batch_factors(ctx)  # once, outside the compiled slot counts

    def slot_rows(c: StepContext):
      """The first n task slots' factors, their scales and the row weights S (n, n M)."""
      w = past_weights(c.memory, c.t)  # (n, M)
      n = w.shape[0]
      S = (jnp.eye(n, dtype=w.dtype)[:, :, None] * w[None]).reshape(n, n * M)  # task k's slots
      task_of_slot = jnp.repeat(jnp.arange(n), M)
      scales = example_scales(
        c.params, assignments, state.h[:n], task_of_slot, bias_once=config.bias_once
      )
      return S, scales

    # The terms are computed on the first n task slots (`on_past_slots`) and padded to T, so the
    # QP and the projections are compiled once, not once per slot count.
    def terms(c: StepContext):
      mem = memory_grads.memory_factors(c)
      S, scales = slot_rows(c)
      P, q = grouped_terms(c.params, mem, scales, S, batch)
      pad = T - S.shape[0]
      rows = jax.tree.map(lambda a: jnp.pad(a, [(0, pad * M)] + [(0, 0)] * (a.ndim - 1)), mem)
      return jnp.pad(P, ((0, pad), (0, pad))), jnp.pad(q, (0, pad)), rows

    P, q, mem = memory_grads.on_past_slots(terms, ctx)

    def row_sum(v):  # sum_k v_k row_k, (T,) v, on the same first n task slots
      def on_slots(c: StepContext):
        S, scales = slot_rows(c)
        rows = jax.tree.map(lambda a: a[: S.shape[1]], mem)
        return grouped_row_sum(c.params, rows, scales, S, v[: S.shape[0]])

      return memory_grads.on_past_slots(on_slots, ctx)

    if kind == "gem_grouped":
      v, info = gem_dual(P, q, mask=past, eps=eps, max_iter=max_iter)
      g_new = jax.lax.cond(info.projected, lambda: jax.tree.map(jnp.add, g, row_sum(v)), lambda: g)
      return g_new, qp_counters(info.violated, info.projected, info.qp)
    n_past = jnp.maximum(ctx.t, 1).astype(jnp.float32)
    ref = row_sum(jnp.where(past, 1.0 / n_past, 0.0))
    if kind == "agem_grouped":
      return conditional_projection(g, ref, None, ctx)
    any_conflict = jnp.any((q < 0) & past)  # agem_qp_grouped: GEM's per-task check
    # The seed's averaged h: the mean over past tasks and non-empty groups. Each column of h
    # has mean 1 + margin over the past tasks (`transform_relatedness`), so this is 1 + margin
    # whatever the relatedness (until the first recompute of a task: plain rows, 1).
    valid = past[:, None, None] & group_mask(state)[None]
    margin = jnp.sum(jnp.where(valid, state.h, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return one_row_qp(g, ref, margin, any_conflict, eps=eps, max_iter=max_iter)

  def init(params, n_tasks):
    n_classes = params["out"]["bias"].shape[0]
    n_layers = sum(1 for name in params if name.startswith("hidden_"))
    n_hiddens = params["hidden_0"]["bias"].shape[0] if n_layers else 0  # refused by init
    return grouped_init(config, n_tasks, n_hiddens, n_layers, n_classes)

  def update(g, ctx: StepContext, state):
    # the task statistics, with the current parameters; the projection reads the state before
    acts, logits = hidden_activations(ctx.params, ctx.x)
    extra = extra_vector(config, ctx.y, logits)
    observed = observe(state, config, acts, extra, ctx.t, jax.random.fold_in(ctx.key, 1))
    g_new, stats = when_past(ctx, lambda: project(g, ctx, state), g)
    return g_new, stats, observed

  def task_end(state, end: TaskEndContext):
    return end_task(state, config, end.t, end.params, end.key)  # groups after task 0

  return Rule(
    init=init,
    update=update,
    end_task=task_end,
    summary=lambda state: state.h,
    hidden_units=True,
    cpu_devices=False,  # the relatedness's eigh (`Rule.cpu_devices`)
  )
