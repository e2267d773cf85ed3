"""The rule interface: what a continual-learning method does to each step's gradient.

A rule is a factory's product, shaped like an optax transformation: the factory closes over the
method's settings and returns a `Rule` of pure functions,

    state = rule.init(params, n_tasks)
    g_new, counters, state = rule.update(g, ctx, state)   # every training step
    state = rule.end_task(state, ctx_end)                  # after each task (optional)

`g` is the batch gradient (a pytree like the parameters), `ctx` a `StepContext`: the task t,
the batch, the episodic memory (with the batch written), the parameters, the traced
hyper-parameters and the step's PRNG key; `cljax.memory_grads` computes the per-task memory
gradients from it. The engine (`cljax.train.make_train`) applies SGD to g_new.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax.memory import Memory, past_mask

PyTree = Any


class HParams(NamedTuple):
  """Hyper-parameters that do not change shapes: traced, so a sweep over them compiles once.

  extra: a rule's own (`Rule.hparams`), name -> () array; None when it declares none.
  """

  lr: jax.Array  # () SGD learning rate
  memory_strength: jax.Array  # () GEM's margin
  extra: dict[str, jax.Array] | None = None


class StepContext(NamedTuple):
  """What a rule may read at one training step (all arrays traced inside the compiled run).

  t: () int32 the current task; params: the parameters before the step; x (B, D), y (B,): the
  batch; memory: the episodic memory, the batch already written; hparams: `HParams`; key: the
  step's PRNG key; apply: apply(params, x) -> logits, the network; memory_grads: the run's way
  of computing memory gradients (static; `cljax.memory_grads.MODES`: "factored" where the
  network allows, else "explicit"), which a rule built without its own mode follows.
  """

  t: jax.Array
  params: PyTree
  x: jax.Array
  y: jax.Array
  memory: Memory
  hparams: HParams
  key: jax.Array
  apply: Callable[[PyTree, jax.Array], jax.Array]
  memory_grads: str = "factored"

  @property
  def past(self) -> jax.Array:
    """(T,) bool: the past tasks k < t."""
    return past_mask(self.memory, self.t)


class TaskEndContext(NamedTuple):
  """What a rule's end_task may read (traced).

  t: () the finished task; params; key: a PRNG key; memory: the episodic memory, task t's slots
  written; apply: apply(params, x) -> logits, the network.
  """

  t: jax.Array
  params: PyTree
  key: jax.Array
  memory: Memory | None = None
  apply: Callable[[PyTree, jax.Array], jax.Array] | None = None


Counters = dict[str, jax.Array]
"""What a rule did at one step: named () scalars, reduced per task by the engine by their names:
a name ending in `_max` is the task's maximum, in `_mean` the mean over its steps, any other the
sum over its steps (a bool counts the steps it was true). Recorded per task in
`RunResult.counters` (beside the engine's own "steps" and "mean_loss") and in results.json."""


class Rule(NamedTuple):
  """A continual-learning method as pure functions (see the module docstring).

  init(params, n_tasks) -> state; update(g, ctx, state) -> (g_new, Counters, state), the counters
  the same names at every step ({} for none);
  end_task(state, TaskEndContext) -> state, or None (nothing to do at task ends);
  summary(state) -> a pytree recorded at each task end before end_task (`RunResult.h`), or None;
  uses_memory: whether the engine fills the episodic memory (else it keeps one unused slot);
  memory_writes: how it fills it, "ring" (GEM's ring buffer per task, `cljax.memory.write_memory`,
  before the step) or "reservoir" (one pool over all tasks, `write_reservoir`, after the step);
  hparams: the rule's own traced hyper-parameters, name -> default (read as
  `ctx.hparams.extra[name]`; a sweep over them compiles once), or None.

  What it needs of the network, declared (the engine reads these, never a rule's name):
  networks: "shared" (one network), "per_task" (one per task, a head per task on a split
  stream: GEM's independent) or "per_task_finetune" (the same, network t starting as t - 1);
  hidden_units: it reads the hidden units of cljax's MLP itself, from per-example factors (the
  grouped rules): cljax's MLP only, memory_grads factored, one shared network, no multi-head
  form;
  cpu_devices: whether one program may split its runs across several CPU devices (False: its
  steps block XLA's CPU threads, a LAPACK call, and a sweep must not).
  """

  init: Callable[[PyTree, int], Any]
  update: Callable[[PyTree, StepContext, Any], tuple[PyTree, Counters, Any]]
  end_task: Callable[[Any, TaskEndContext], Any] | None = None
  summary: Callable[[Any], Any] | None = None
  uses_memory: bool = True
  memory_writes: str = "ring"
  hparams: Mapping[str, float] | None = None
  networks: str = "shared"
  hidden_units: bool = False
  cpu_devices: bool = True


NETWORKS = ("shared", "per_task", "per_task_finetune")  # what `Rule.networks` may declare


def stateless(
  update: Callable[[PyTree, StepContext], tuple[PyTree, Counters]], *, uses_memory=True
) -> Rule:
  """A Rule without state from update(g, ctx) -> (g_new, Counters)."""

  def rule_update(g, ctx, state):
    g_new, counters = update(g, ctx)
    return g_new, counters, state

  return Rule(init=lambda params, n_tasks: None, update=rule_update, uses_memory=uses_memory)


def projection_counters(violated: jax.Array, projected: jax.Array) -> Counters:
  """A projection's counters: violations (its trigger fired), projections (g was changed)."""
  return {"violations": violated, "projections": projected}


def qp_counters(violated: jax.Array, projected: jax.Array, info: Any) -> Counters:
  """The counters of a step that ran the dual QP (`info`: its `cljax.qp.QPInfo`).

  The projection's, the QP's iterations (summed and the task's maximum), its worst KKT residual
  and its failures (a projected step whose QP did not converge).
  """
  iterations = info.iterations.astype(jnp.int32)
  return {
    **projection_counters(violated, projected),
    "qp_iterations": iterations,
    "qp_iterations_max": iterations,
    "kkt_max": info.kkt.astype(jnp.float32),
    "qp_failures": projected & ~info.converged,
  }


def cond_or_zeros(
  pred: jax.Array,
  fn: Callable[..., tuple[Any, Any]],
  kept: Callable[..., Any],
  *operands: Any,
  prepare: Callable[[], Any] | None = None,
) -> tuple[Any, Any]:
  """fn(*operands) -> (a, b) where pred, else (kept(*operands), zeros shaped like b).

  b's structure (e.g. a rule's counters, known only once traced) comes from fn's branch, which
  lax.cond traces first; a JAX tracing the other branch first gets it from eval_shape, after
  prepare() (what fn memoises must be made in this trace, not in eval_shape's).
  """
  traced = {}

  def taken(*args):
    a, b = fn(*args)
    traced["b"] = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), b)
    return a, b

  def other(*args):
    if "b" not in traced:
      if prepare is not None:
        prepare()
      traced["b"] = jax.eval_shape(fn, *args)[1]
    return kept(*args), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), traced["b"])

  return jax.lax.cond(pred, taken, other, *operands)


def when_past(
  ctx: StepContext, project: Callable[[], tuple[PyTree, Counters]], g: PyTree
) -> tuple[PyTree, Counters]:
  """project() from task 1 on; on task 0 (no past task to protect) g unchanged, counters 0."""
  return cond_or_zeros(ctx.t > 0, project, lambda: g)


def single() -> Rule:
  """Plain SGD on the current task: g unchanged, no memory (GEM's "single")."""
  return stateless(lambda g, ctx: (g, {}), uses_memory=False)


def independent(finetune: bool = False) -> Rule:
  """GEM's independent: plain SGD on one network per task; finetune: network t starts as t - 1."""
  return single()._replace(networks="per_task_finetune" if finetune else "per_task")
