"""The A-GEM family from three pieces: a reference row, a trigger and a projection.

    rule = agem_rule(task_mean(), per_task(), unconditional())        # the seed's way 2, agem_new

A reference row is ref(ctx, checks) -> (ref, checks (T,) or None): the row g is projected
against and, when the trigger asks for them, GEM's per-task checks <g, r_k>. A trigger decides
when g may change: fires(g, ref, checks) -> () bool, or None for "the projection's own check
<g, ref> < 0". A projection maps (g, ref, fired, ctx) -> (g~, Counters).

The variants (`cljax.rules.registry`): agem = pooled or task_mean / reference / conditional (the
A-GEM paper), agem_old = task_sum / reference / qp (the seed's way 1), agem_new = task_mean /
per_task / unconditional (way 2), agem_qp_mean = task_mean / per_task / qp (way 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax import memory_grads
from cljax.errors import CljaxError
from cljax.projections import agem_project, gem_project, project_orthogonal, tree_vdot
from cljax.rules.base import (
  Counters,
  Rule,
  StepContext,
  projection_counters,
  qp_counters,
  stateless,
  when_past,
)

PyTree = Any


class Reference(NamedTuple):
  """A reference row: row(ctx, checks) -> (ref, (T,) per-task checks or None)."""

  name: str
  row: Callable[[StepContext, bool], tuple[PyTree, jax.Array | None]]
  has_checks: bool = True  # whether it can give GEM's per-task checks


class Trigger(NamedTuple):
  """When g may change: fires(g, ref, checks, ctx) -> () bool, or None (the projection's own)."""

  name: str
  fires: Callable[[PyTree, PyTree, jax.Array | None, StepContext], jax.Array | None]
  needs_checks: bool


class Projection(NamedTuple):
  """project(g, ref, fired or None, ctx) -> (g~, Counters)."""

  name: str
  project: Callable[[PyTree, PyTree, jax.Array | None, StepContext], tuple[PyTree, Counters]]


def task_sum(mode: str | None = None) -> Reference:
  """sum_{k<t} r_k, the seed's "accumulated" memory gradient (way 1).

  mode: how the r_k are computed (`cljax.memory_grads.MODES`; None: the run's,
  `StepContext.memory_grads`).
  """
  return Reference(
    "sum",
    lambda ctx, checks: memory_grads.past_grad_sum(ctx, mode or ctx.memory_grads, checks),
  )


def task_mean(mode: str | None = None) -> Reference:
  """(1 / t) sum_{k<t} r_k, the mean of the per-task memory gradients (mode: as `task_sum`)."""

  def row(ctx, checks):
    row_sum, dots = memory_grads.past_grad_sum(ctx, mode or ctx.memory_grads, checks)
    return jax.tree.map(lambda r: r / jnp.maximum(ctx.t, 1).astype(r.dtype), row_sum), dots

  return Reference("mean", row)


def pooled(sample_size: int) -> Reference:
  """The gradient of a sample of sample_size examples of the pooled memory (the A-GEM paper)."""
  return Reference(
    "pooled", lambda ctx, checks: (memory_grads.pooled_sample_grad(ctx, sample_size), None), False
  )


def reference_trigger() -> Trigger:
  """The A-GEM paper's trigger: g may change when <g, ref> < 0."""
  return Trigger("reference", lambda g, ref, checks, ctx: None, needs_checks=False)


def per_task() -> Trigger:
  """GEM's check: g may change when it conflicts with some past task's row, <g, r_k> < 0."""
  return Trigger(
    "per_task", lambda g, ref, checks, ctx: jnp.any((checks < 0) & ctx.past), needs_checks=True
  )


def conditional() -> Projection:
  """The A-GEM paper's g - min(0, <g, ref>) / |ref|^2 ref: only a conflicting g is changed."""

  def project(g, ref, fired, ctx):
    conflict = tree_vdot(g, ref) < 0
    fired = conflict if fired is None else fired
    g_new = jax.tree.map(lambda a, b: jnp.where(fired, a, b), agem_project(g, ref), g)
    return g_new, projection_counters(fired, fired & conflict)

  return Projection("conditional", project)


def unconditional() -> Projection:
  """The seed's g - <g, ref> / |ref|^2 ref whatever the sign of <g, ref> (when triggered)."""

  def project(g, ref, fired, ctx):
    fired = tree_vdot(g, ref) < 0 if fired is None else fired
    g_new = jax.tree.map(lambda a, b: jnp.where(fired, a, b), project_orthogonal(g, ref), g)
    return g_new, projection_counters(fired, fired)

  return Projection("unconditional", project)


def one_row_qp(
  g: PyTree, ref: PyTree, margin: jax.Array, fired: jax.Array | None, *, eps: float, max_iter: int
) -> tuple[PyTree, Counters]:
  """GEM's dual QP on the single row ref, v >= margin: g~ = g + v ref (fired None: <g, ref> < 0)."""
  g_new, info = gem_project(
    g,
    jax.tree.map(lambda r: r[None], ref),
    margin=margin,
    eps=eps,
    trigger=fired,
    max_iter=max_iter,
  )
  return g_new, qp_counters(info.violated if fired is None else fired, info.projected, info.qp)


def qp(
  margin: Callable[[StepContext], jax.Array] | None = None,
  *,
  eps: float = 1e-3,
  max_iter: int = 1000,
) -> Projection:
  """GEM's dual QP on the one row; margin(ctx) (default: the traced memory_strength)."""

  def project(g, ref, fired, ctx):
    m = ctx.hparams.memory_strength if margin is None else margin(ctx)
    return one_row_qp(g, ref, m, fired, eps=eps, max_iter=max_iter)

  return Projection("qp", project)


def agem_rule(reference: Reference, trigger: Trigger, projection: Projection) -> Rule:
  """The rule g -> projection(g, reference row) when the trigger fires, from task 1 on."""
  if trigger.needs_checks and not reference.has_checks:
    raise CljaxError(
      f"the {trigger.name} trigger needs per-task checks, which the {reference.name} reference "
      "row does not give: use the reference trigger."
    )

  def update(g, ctx: StepContext):
    def project():
      ref, checks = reference.row(ctx, trigger.needs_checks)
      return projection.project(g, ref, trigger.fires(g, ref, checks, ctx), ctx)

    return when_past(ctx, project, g)

  return stateless(update)


REFERENCES = {"mean": task_mean, "sum": task_sum}
TRIGGERS = {"reference": reference_trigger, "per_task": per_task}
PROJECTIONS = {"conditional": conditional, "unconditional": unconditional, "qp": qp}
