"""The continual-learning run: GEM / A-GEM variants as one jit-compiled scan over tasks and steps.

`make_train(config)` closes over a static `Config` and returns `train(key, stream, hparams)`:

    run = jax.jit(make_train(config))
    result = run(jax.random.key(3), stream)           # RunResult: (T, T) accuracies and counters

Structure: a `lax.scan` over tasks; within a task a scan over chunks of `log_every` steps, each a
scan over the chunk's training steps followed by an evaluation of all T test sets.
Every shape is fixed: the episodic memory is (T, n_memories, D) from the start, past tasks are a
mask, so the run compiles once whatever T is.

One training step (GEM's `observe`): write the batch into task t's ring-buffer memory, take the
gradient g of the batch loss, compute what the variant needs from the memories of past tasks
(with the current parameters), project g, and apply SGD.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax import tasks
from cljax.errors import CljaxError
from cljax.example_grads import example_grads, gram, weighted_grad
from cljax.grouped_rows import example_scales, grouped_row_sum, grouped_terms
from cljax.grouped_state import (
  GroupedConfig,
  check_sizes,
  end_task,
  extra_vector,
  group_mask,
  grouped_init,
  hidden_activations,
  observe,
)
from cljax.models import make_mlp
from cljax.projections import (
  agem_project,
  gem_dual,
  gem_project,
  project_orthogonal,
  tree_vdot,
)

GROUPED_VARIANTS = ("gem_grouped", "agem_grouped", "agem_qp_grouped")
VARIANTS = ("single", "gem", "agem", "agem_old", "agem_new", "agem_qp_mean", *GROUPED_VARIANTS)
AGEM_REFS = ("pooled", "task_mean")
MEMORY_GRADS = ("factored", "explicit")
REFERENCE_ROWS = ("mean", "sum")
TRIGGERS = ("reference", "per_task")
PROJECTIONS = ("conditional", "unconditional", "qp")
# The task-mean A-GEM family: each variant is a (reference row, trigger, projection) preset.
AGEM_RULES = {
  "agem": ("mean", "reference", "conditional"),  # the A-GEM paper's rule (agem_ref task_mean)
  "agem_old": ("sum", "reference", "qp"),  # the seed's way 1
  "agem_new": ("mean", "per_task", "unconditional"),  # the seed's way 2
  "agem_qp_mean": ("mean", "per_task", "qp"),  # the seed's way 3
}
_MEMORY_VARIANTS = frozenset(VARIANTS) - {"single"}


@dataclasses.dataclass(frozen=True)
class Config:
  """Static settings of a run (hashable; closed over, never traced).

  Attributes:
    variant: one of VARIANTS (see `project_step` for each rule).
    batch_size: examples per step (GEM: 1).
    lr: SGD learning rate (default for `HParams.lr`).
    n_memories: episodic-memory slots per task.
    memory_strength: GEM's margin, v >= memory_strength in the dual QP (default for HParams).
    n_layers, n_hiddens: the MLP's hidden layers and width.
    init: "gem" (the GEM code's Xavier uniform, zero biases), "torch" (nn.Linear's default) or
      "flax" (see `cljax.models.MLP`).
    agem_ref: A-GEM's reference gradient: "pooled" (a sample of replay_batch_size examples of the
      pooled memory of past tasks, as the A-GEM paper) or "task_mean" (mean of per-task memory
      gradients).
    replay_batch_size: the pooled sample's size.
    log_every: evaluate all tasks every log_every steps of a task (0: only at task ends).
    eps: ridge on the QP's Gram matrix (official GEM code: 1e-3).
    eval_batch_size: test examples per evaluation batch (bounds the evaluation's memory).
    qp_max_iter: the QP solver's iteration cap.
    reference_row, trigger, projection: override the variant's preset in `AGEM_RULES` (None:
      the preset), for the task-mean A-GEM family (agem with agem_ref task_mean, agem_old,
      agem_new, agem_qp_mean). reference_row: "mean" or "sum" of the per-task memory gradients
      r_k = grad L_k (k < t). trigger: when g may change: "reference" (<g, ref> < 0) or
      "per_task" (GEM's check: some <g, r_k> < 0). projection: "conditional" (the paper's
      g - min(0, <g, ref>) / |ref|^2 ref), "unconditional" (remove the ref component whatever its
      sign) or "qp" (GEM's dual QP on the one row: g + v ref, v >= memory_strength).
    grouped: the grouped variants' settings (`cljax.grouped_state.GroupedConfig`): groups of
      hidden units formed after task 0, relatedness of tasks per group, and the rows' weights.
      gem_grouped: GEM's QP (margin 0) over the t grouped rows g_k * w_k; agem_grouped: the
      paper's conditional projection on their mean; agem_qp_grouped (the seed's attempt): that
      mean row into GEM's QP under GEM's per-task trigger, margin = the mean of h over past
      tasks, layers and non-empty groups (1 + GroupedConfig.margin by construction of h).
      memory_strength is not read by them.
    memory_grads: how past-task memory gradients are computed. "factored" (default): one forward
      and backward pass over the whole (T x n_memories) memory, kept as per-example factors
      (`cljax.example_grads`): GEM's P = G G', q = G g and G'v come from small matrix products
      and no (t, p) row is formed. "explicit": one backward pass per past task, rows as pytrees,
      and `gem_project` on them (the direct transcription; works for any differentiable model).
      Both compute the same numbers up to float rounding.
  """

  variant: str = "agem_new"
  batch_size: int = 1
  lr: float = 0.01
  n_memories: int = 10
  memory_strength: float = 10.0
  n_layers: int = 2
  n_hiddens: int = 100
  init: str = "gem"
  agem_ref: str = "pooled"
  replay_batch_size: int = 10
  log_every: int = 100
  eps: float = 1e-3
  eval_batch_size: int = 2000
  qp_max_iter: int = 1000
  memory_grads: str = "factored"
  reference_row: str | None = None
  trigger: str | None = None
  projection: str | None = None
  grouped: GroupedConfig = dataclasses.field(default_factory=GroupedConfig)

  @property
  def agem_rule(self) -> tuple[str, str, str]:
    """(reference_row, trigger, projection) of a task-mean A-GEM family run: preset + overrides."""
    preset = AGEM_RULES.get(self.variant, (None, None, None))
    overrides = (self.reference_row, self.trigger, self.projection)
    return tuple(o if o is not None else p for o, p in zip(overrides, preset, strict=True))

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise CljaxError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}.")
    if self.agem_ref not in AGEM_REFS:
      raise CljaxError(f"unknown agem_ref {self.agem_ref!r}: choose one of {', '.join(AGEM_REFS)}.")
    if self.memory_grads not in MEMORY_GRADS:
      raise CljaxError(
        f"unknown memory_grads {self.memory_grads!r}: choose one of {', '.join(MEMORY_GRADS)}."
      )
    for name, choices in (
      ("reference_row", REFERENCE_ROWS),
      ("trigger", TRIGGERS),
      ("projection", PROJECTIONS),
    ):
      value = getattr(self, name)
      if value is None:
        continue
      if value not in choices:
        raise CljaxError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}.")
      pooled = self.variant == "agem" and self.agem_ref != "task_mean"
      if self.variant not in AGEM_RULES or pooled:
        raise CljaxError(
          f"{name} applies to the task-mean A-GEM family ({', '.join(AGEM_RULES)}; agem with "
          f"agem_ref task_mean), not to {self.variant}"
          + (f" with agem_ref {self.agem_ref}." if self.variant == "agem" else ".")
        )
    if not self.lr > 0:
      raise CljaxError(f"lr must be > 0, got {self.lr}.")
    if self.memory_strength < 0:
      raise CljaxError(f"memory_strength must be >= 0, got {self.memory_strength}.")
    if self.eps < 0:
      raise CljaxError(f"eps must be >= 0, got {self.eps}.")
    for name in ("batch_size", "eval_batch_size", "qp_max_iter"):
      if getattr(self, name) < 1:
        raise CljaxError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if not isinstance(self.grouped, GroupedConfig):
      raise CljaxError(
        f"grouped must be a cljax.grouped_state.GroupedConfig, got {type(self.grouped).__name__}."
      )
    if self.variant in GROUPED_VARIANTS:
      if self.memory_grads != "factored":
        raise CljaxError(
          f"{self.variant} builds its grouped rows from per-example factors: use memory_grads "
          "'factored'."
        )
      check_sizes(self.grouped, self.n_hiddens)
    elif self.grouped != GroupedConfig():
      raise CljaxError(
        f"grouped settings apply to the grouped variants ({', '.join(GROUPED_VARIANTS)}), not to "
        f"{self.variant}: leave grouped at its default."
      )
    if self.variant in _MEMORY_VARIANTS and self.n_memories < 1:
      raise CljaxError(f"variant {self.variant!r} needs n_memories >= 1, got {self.n_memories}.")
    if self.variant == "agem" and self.agem_ref == "pooled" and self.replay_batch_size < 1:
      raise CljaxError(f"replay_batch_size must be >= 1, got {self.replay_batch_size}.")
    if self.log_every < 0:
      raise CljaxError(
        f"log_every must be >= 0 (0: evaluate only at task ends), got {self.log_every}."
      )
    make_mlp(self.n_hiddens, self.n_layers, init=self.init)  # validates the network's settings


class HParams(NamedTuple):
  """Hyper-parameters that do not change shapes: traced, so a sweep over them compiles once."""

  lr: jax.Array  # () SGD learning rate
  memory_strength: jax.Array  # () GEM's margin


class Memory(NamedTuple):
  """GEM's episodic memory: n_memories slots per task, filled as a ring buffer.

  x: (T, M, D) float32 examples (already transformed); y: (T, M) int32 labels;
  filled: (T, M) bool, slots written so far; cursor: () int32, the next slot (shared across
  tasks, as GEM's `mem_cnt`).
  """

  x: jax.Array
  y: jax.Array
  filled: jax.Array
  cursor: jax.Array


class TrainState(NamedTuple):
  """The scan's carry."""

  params: Any  # Flax params pytree
  opt_state: Any  # optax state
  memory: Memory
  step: jax.Array  # () int32 global step count (all tasks)
  diverged: jax.Array  # () bool: parameters went non-finite; later steps are skipped
  grouped: Any = None  # grouped variants: `cljax.grouped_state.GroupedState`; else None


class StepStats(NamedTuple):
  """Per-step diagnostics, reduced per task into `TaskCounters`."""

  ran: jax.Array  # () bool: a real step (not padding, not after divergence)
  loss: jax.Array  # () batch loss before the update
  violated: jax.Array  # () bool: the variant's trigger fired (a constraint was violated)
  projected: jax.Array  # () bool: g was changed
  qp_iterations: jax.Array  # () int32 (0 without a QP)
  kkt: jax.Array  # () the QP's KKT residual (0 without a QP)
  qp_failed: jax.Array  # () bool: a QP ran and did not converge


class TaskCounters(NamedTuple):
  """Per-task counts, each (T,): what the projections did while training that task."""

  steps: jax.Array
  violations: jax.Array
  projections: jax.Array
  qp_iterations: jax.Array  # summed over the task's steps
  qp_iterations_max: jax.Array
  kkt_max: jax.Array  # the worst KKT residual
  qp_failures: jax.Array
  mean_loss: jax.Array


class RunResult(NamedTuple):
  """What a run returns (all arrays; leading batch axes under vmap).

  acc: (T, T) R[i, j] = test accuracy on task j after training task i (= curve[:, -1]).
  baseline: (T,) accuracies before any training (for forward transfer).
  curve: (T, C, T) accuracies on all tasks after each of task i's C chunks of log_every steps.
  curve_step: (T, C) the global step count at each curve point.
  counters: TaskCounters.
  finite: (T,) whether the parameters were finite after each task.
  params: the final parameters.
  h: grouped variants: (T, T, L, G) the multipliers h in use at the end of each task t (row k
    for past tasks k < t, zero elsewhere; `cljax.grouped_state`); None for the other variants.
  """

  acc: jax.Array
  baseline: jax.Array
  curve: jax.Array
  curve_step: jax.Array
  counters: TaskCounters
  finite: jax.Array
  params: Any
  h: Any = None


def default_hparams(config: Config) -> HParams:
  """The config's lr and memory_strength as float32 arrays."""
  return HParams(
    jnp.asarray(config.lr, jnp.float32), jnp.asarray(config.memory_strength, jnp.float32)
  )


def schedule(config: Config, stream: tasks.TaskStream) -> tuple[int, int, int]:
  """(steps per task, steps per evaluation chunk, chunks per task) for this stream.

  Steps per task = samples_per_task // batch_size (a last partial batch is dropped). All tasks are
  evaluated before training and after every chunk of log_every steps of a task, the last chunk
  ending the task: when log_every divides the steps per task these are exactly GEM's evaluation
  points (`i % log_every == 0` and the end). A last, shorter chunk is padded with skipped steps.
  """
  samples = stream.train_idx.shape[1]
  if config.batch_size > samples:
    raise CljaxError(
      f"batch_size {config.batch_size} is larger than samples_per_task {samples}: lower batch_size."
    )
  steps = samples // config.batch_size
  chunk = steps if config.log_every == 0 else min(config.log_every, steps)
  return steps, chunk, math.ceil(steps / chunk)


def _cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def make_evaluate(config: Config) -> Callable[[Any, tasks.TaskStream], jax.Array]:
  """Return evaluate(params, stream) -> (T,) test accuracy on every task (pure; the caller jits)."""
  model = make_mlp(config.n_hiddens, config.n_layers, init=config.init)

  def evaluate(params, stream: tasks.TaskStream) -> jax.Array:
    """(T,) test accuracy on every task.

    Each task's pixel map A_t is linear, so it is folded into the first layer instead of applied
    to the images: (A_t x) W = x (A_t' W). All T tasks then share one matrix product with the base
    test images, in batches of eval_batch_size examples (memory: batch x T x n_hiddens floats).
    """
    n_test = stream.test_x.shape[0]
    bs = min(config.eval_batch_size, n_test)
    n_batches = math.ceil(n_test / bs)
    pad = n_batches * bs - n_test
    task_params = jax.vmap(lambda i, w: _fold_pixel_map(params, i, w))(stream.pix_idx, stream.pix_w)
    x_all = jnp.pad(stream.test_x, ((0, pad), (0, 0))).reshape(n_batches, bs, -1)
    y_all = jnp.pad(stream.test_y, (0, pad), constant_values=-1).reshape(n_batches, bs)

    def one_batch(args):
      x, y = args
      x = x.astype(jnp.float32) * tasks.PIXEL_SCALE
      logits = jax.vmap(lambda p: model.apply({"params": p}, x))(task_params)  # (T, bs, classes)
      return jnp.sum(jnp.argmax(logits, axis=-1) == y[None], axis=1)  # padding: y = -1

    correct = jnp.sum(jax.lax.map(one_batch, (x_all, y_all)), axis=0)
    return correct.astype(jnp.float32) / n_test

  return evaluate


def make_train(config: Config, *, progress: Callable[[Any, Any], None] | None = None):
  """Return train(key, stream, hparams=None) -> RunResult, to be jitted (and vmapped) by the caller.

  The returned function takes a PRNG key (model init and A-GEM's memory samples), a
  `tasks.TaskStream`, and optional `HParams` (default: the config's).

  Args:
    config: the static `Config`.
    progress: optional host function progress(t, acc_row) called once at the end of each task
      (through `jax.debug.callback`, outside the steps), e.g. to print a progress line.
  """
  model = make_mlp(config.n_hiddens, config.n_layers, init=config.init)
  variant = config.variant
  grouped = variant in GROUPED_VARIANTS

  def batch_loss(params, x, y):
    return jnp.mean(_cross_entropy(model.apply({"params": params}, x), y))

  def weighted_loss(params, x, y, w):
    """Sum over examples of w * CE: x (..., D), y (...), w (...) non-negative weights."""
    logits = model.apply({"params": params}, x.reshape(-1, x.shape[-1]))
    return jnp.sum(w.reshape(-1) * _cross_entropy(logits, y.reshape(-1)))

  def past_weights(memory: Memory, t: jax.Array) -> jax.Array:
    """(T, M) weights of task k's mean memory loss: 1 / (its filled slots) on them, 0 for k >= t."""
    w = (memory.filled & (jnp.arange(memory.x.shape[0]) < t)[:, None]).astype(jnp.float32)
    return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)

  def apply(params, x):
    return model.apply({"params": params}, x)

  def past_grads(params, memory: Memory, t: jax.Array, x, y, checks: bool):
    """The summed memory gradient of past tasks and, with checks, GEM's per-task checks.

    Returns sum_{k<t} grad L_k (the seed's "accumulated" memory loss gradient) and the (T,) checks
    <g, grad L_k> (0 for k >= t; None without checks), L_k = task k's mean memory loss with the
    current parameters and g the gradient of the batch (x, y)'s mean loss.
    """
    if config.memory_grads == "factored":
      T_all = memory.x.shape[0]

      def factored(memory: Memory):
        w = past_weights(memory, t)
        mem = memory_factors(params, memory)
        row_sum = weighted_grad(params, mem, w.reshape(-1))
        if not checks:
          return row_sum, None
        dots = factored_checks(params, mem, w, x, y)
        return row_sum, jnp.zeros((T_all,), dots.dtype).at[: dots.shape[0]].set(dots)

      return on_past_slots(factored, memory, t)

    # explicit: one past task at a time, so the work grows with the number of past tasks, not
    # with T; each check is a forward-mode derivative of L_k along g (no p-length dot product).
    w = past_weights(memory, t)
    g = jax.grad(batch_loss)(params, x, y) if checks else None

    def body(k, carry):
      row_sum, dots = carry
      loss_k = lambda p: weighted_loss(p, memory.x[k], memory.y[k], w[k])  # noqa: E731
      row_sum = jax.tree.map(jnp.add, row_sum, jax.grad(loss_k)(params))
      if checks:
        dots = dots.at[k].set(jax.jvp(loss_k, (params,), (g,))[1])
      return row_sum, dots

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((memory.x.shape[0],), jnp.float32))
    row_sum, dots = jax.lax.fori_loop(0, t, body, init)
    return row_sum, dots if checks else None

  def on_past_slots(fn, memory: Memory, t: jax.Array):
    """fn(memory of the first n tasks only) for the smallest compiled n >= t (t >= 1).

    The factored step's work is proportional to the task slots it reads, and only tasks k < t
    matter; a `lax.switch` over a few slot counts (`past_slot_counts`, at most _N_BUCKETS,
    whatever T is) skips most unused slots while every shape stays static.
    """
    sizes = past_slot_counts(memory.x.shape[0])
    if len(sizes) == 1:
      return fn(memory)
    branches = [
      lambda n=n: fn(Memory(memory.x[:n], memory.y[:n], memory.filled[:n], memory.cursor))
      for n in sizes
    ]
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes), t), branches)

  def memory_factors(params, memory: Memory):
    """Per-example gradient factors of every slot of `memory` (unused slots get weight 0)."""
    D = memory.x.shape[-1]
    return example_grads(apply, params, memory.x.reshape(-1, D), memory.y.reshape(-1))

  def factored_checks(params, mem, w, x, y):
    """(T,) <g, grad L_k> = sum_i w_ki mean_b K_ib, K the memory x batch gradient Gram."""
    k_mb = gram(params, mem, example_grads(apply, params, x, y))  # (T * M, B)
    return jnp.sum(w * jnp.mean(k_mb, axis=1).reshape(w.shape), axis=1)

  def gem_step(g, params, memory: Memory, t: jax.Array, x, y, hp: HParams):
    """GEM: one constraint row grad L_k per past task k < t, the dual QP, g~ = g + G'v."""
    past = jnp.arange(memory.x.shape[0]) < t
    qp_args = {
      "margin": hp.memory_strength,
      "mask": past,
      "eps": config.eps,
      "max_iter": config.qp_max_iter,
    }
    if config.memory_grads == "explicit":
      return gem_project(g, past_rows(params, memory, t), **qp_args)

    def factored(memory: Memory):
      w = past_weights(memory, t)  # (n, M): row k = sum_i w_ki grad l_i
      n, M = w.shape
      mem = memory_factors(params, memory)
      K = gram(params, mem).reshape(n, M, n, M)
      P = jnp.einsum("km,kmln,ln->kl", w, K, w)
      q = factored_checks(params, mem, w, x, y)
      v, info = gem_dual(P, q, **{**qp_args, "mask": past[:n]})

      def add_rows(_):
        return jax.tree.map(jnp.add, g, weighted_grad(params, mem, (v[:, None] * w).reshape(-1)))

      return jax.lax.cond(info.projected, add_rows, lambda _: g, None), info

    return on_past_slots(factored, memory, t)

  def grouped_step(g, params, memory: Memory, t: jax.Array, x, y, gstate):
    """The grouped variants: row_k = g_k * w_k, w_k from h[k] through the unit-to-group map.

    The rows are never formed: their Gram matrix, their dots with g and their weighted sums come
    from the memory examples' gradient factors with per-example input scales
    (`cljax.grouped_rows`).
    """
    past = jnp.arange(memory.x.shape[0]) < t
    assignments = [gstate.assignments[layer] for layer in range(gstate.assignments.shape[0])]

    def factored(memory: Memory):
      w = past_weights(memory, t)  # (n, M)
      n, M = w.shape
      mem = memory_factors(params, memory)
      S = (jnp.eye(n, dtype=w.dtype)[:, :, None] * w[None]).reshape(n, n * M)  # task k's slots
      h = gstate.h[:n]
      scales = example_scales(
        params, assignments, h, jnp.repeat(jnp.arange(n), M), bias_once=config.grouped.bias_once
      )
      P, q = grouped_terms(params, mem, scales, S, example_grads(apply, params, x, y))
      mask = past[:n]
      if variant == "gem_grouped":
        v, info = gem_dual(P, q, mask=mask, eps=config.eps, max_iter=config.qp_max_iter)

        def add_rows(_):
          return jax.tree.map(jnp.add, g, grouped_row_sum(params, mem, scales, S, v))

        g_new = jax.lax.cond(info.projected, add_rows, lambda _: g, None)
        return g_new, _qp_stats(info.violated, info.projected, info.qp)
      n_past = jnp.maximum(t, 1).astype(jnp.float32)
      ref = grouped_row_sum(params, mem, scales, S, jnp.where(mask, 1.0 / n_past, 0.0))
      if variant == "agem_grouped":
        return _agem_conditional(g, ref)
      any_conflict = jnp.any((q < 0) & mask)  # agem_qp_grouped: GEM's per-task check
      # The seed's averaged h: the mean over past tasks and non-empty groups. Each column of h
      # has mean 1 + margin over the past tasks (`transform_relatedness`), so this is 1 + margin
      # whatever the relatedness (until the first recompute of a task: plain rows, 1).
      valid = mask[:, None, None] & group_mask(gstate)[None]
      margin = jnp.sum(jnp.where(valid, h, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
      return one_row_qp(g, ref, margin, any_conflict)

    return on_past_slots(factored, memory, t)

  def past_rows(params, memory: Memory, t: jax.Array):
    """GEM's constraint rows grad L_k, k < t, as a pytree with a leading axis T (zero for k >= t).

    One task at a time, so the work grows with the number of past tasks, not with T.
    """
    w = past_weights(memory, t)
    rows = jax.tree.map(lambda z: jnp.zeros((memory.x.shape[0], *z.shape), z.dtype), params)

    def body(k, rows):
      row = jax.grad(weighted_loss)(params, memory.x[k], memory.y[k], w[k])
      return jax.tree.map(lambda buf, r: buf.at[k].set(r), rows, row)

    return jax.lax.fori_loop(0, t, body, rows)

  def pooled_ref(params, memory: Memory, past: jax.Array, key: jax.Array):
    """A-GEM's reference gradient, on a sample of the pooled memory of past tasks.

    replay_batch_size examples are drawn uniformly without replacement (Gumbel top-k) from the
    filled slots of tasks k < t, as the A-GEM paper samples its episodic memory.
    """
    avail = (memory.filled & past[:, None]).reshape(-1)
    k = min(config.replay_batch_size, avail.shape[0])
    scores = jnp.where(avail, jax.random.gumbel(key, avail.shape), -jnp.inf)
    _, idx = jax.lax.top_k(scores, k)
    w = avail[idx].astype(jnp.float32)
    w = w / jnp.maximum(jnp.sum(w), 1.0)
    x = memory.x.reshape(-1, memory.x.shape[-1])[idx]
    y = memory.y.reshape(-1)[idx]
    return jax.grad(weighted_loss)(params, x, y, w)

  def one_row_qp(g, ref, margin, trigger):
    """GEM's dual QP on the single row ref (v >= margin) -> (g~, StepStats fields).

    trigger: when the QP may run (None: its own check, <g, ref> < 0).
    """
    g_new, info = gem_project(
      g,
      jax.tree.map(lambda r: r[None], ref),
      margin=margin,
      eps=config.eps,
      trigger=trigger,
      max_iter=config.qp_max_iter,
    )
    return g_new, _qp_stats(info.violated if trigger is None else trigger, info.projected, info.qp)

  def project_step(
    g, params, memory: Memory, t: jax.Array, x, y, hp: HParams, key: jax.Array, gstate=None
  ):
    """The variant's rule: (g of batch (x, y), memory of tasks k < t) -> (g~, StepStats fields)."""
    past = jnp.arange(memory.x.shape[0]) < t
    if variant == "single":
      return g, _no_projection()

    if variant == "agem" and config.agem_ref == "pooled":
      return _agem_conditional(g, pooled_ref(params, memory, past, key))

    if variant == "gem":
      g_new, info = gem_step(g, params, memory, t, x, y, hp)
      return g_new, _qp_stats(info.violated, info.projected, info.qp)

    if grouped:
      return grouped_step(g, params, memory, t, x, y, gstate)

    # The task-mean A-GEM family: a reference row, a trigger, a projection (`Config.agem_rule`).
    reference, trigger, projection = config.agem_rule
    per_task = trigger == "per_task"
    row_sum, dots = past_grads(params, memory, t, x, y, per_task)
    ref = row_sum
    if reference == "mean":
      ref = jax.tree.map(lambda r: r / jnp.maximum(t, 1).astype(r.dtype), row_sum)
    any_conflict = jnp.any((dots < 0) & past) if per_task else None  # GEM's per-task check

    if projection == "qp":  # GEM's QP on the one row, margin v >= memory_strength
      return one_row_qp(g, ref, hp.memory_strength, any_conflict)

    conflict = tree_vdot(g, ref) < 0  # the reference trigger
    fired = any_conflict if per_task else conflict
    if projection == "conditional":  # the paper's rule: only a conflicting g is changed
      g_new, projected = agem_project(g, ref), fired & conflict
    else:  # unconditional: remove the ref component whatever its sign
      g_new, projected = project_orthogonal(g, ref), fired
    g_new = jax.tree.map(lambda a, b: jnp.where(fired, a, b), g_new, g)
    return g_new, _closed_form_stats(fired, projected)

  evaluate = make_evaluate(config)

  def train(key: jax.Array, stream: tasks.TaskStream, hparams: HParams | None = None) -> RunResult:
    hp = default_hparams(config) if hparams is None else hparams
    T = stream.train_idx.shape[0]
    D = stream.train_x.shape[1]
    steps, chunk, n_chunks = schedule(config, stream)
    init_key, step_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, D), jnp.float32))["params"]
    opt = optax.sgd(hp.lr)
    M = config.n_memories if variant in _MEMORY_VARIANTS else 1
    memory = Memory(
      x=jnp.zeros((T, M, D), jnp.float32),
      y=jnp.zeros((T, M), jnp.int32),
      filled=jnp.zeros((T, M), bool),
      cursor=jnp.zeros((), jnp.int32),
    )
    gstate = None
    if grouped:
      n_classes = params["out"]["bias"].shape[0]
      gstate = grouped_init(config.grouped, T, config.n_hiddens, config.n_layers, n_classes)
    state = TrainState(
      params, opt.init(params), memory, jnp.zeros((), jnp.int32), jnp.zeros((), bool), gstate
    )

    def train_step(state: TrainState, t, j) -> tuple[TrainState, StepStats]:
      x, y = tasks.train_batch(stream, t, j, config.batch_size)
      memory = write_memory(state.memory, t, x, y) if variant in _MEMORY_VARIANTS else state.memory
      loss, g = jax.value_and_grad(batch_loss)(state.params, x, y)
      key = jax.random.fold_in(step_key, state.step)
      gstate = state.grouped
      if grouped:  # the task statistics of the grouped variants, with the current parameters
        acts, logits = hidden_activations(state.params, x)
        extra = extra_vector(config.grouped, y, logits)
        gstate = observe(gstate, config.grouped, acts, extra, t, jax.random.fold_in(key, 1))
      g, (violated, projected, qp_it, kkt, qp_failed) = jax.lax.cond(
        t > 0,  # no past task yet: nothing to project against
        lambda: project_step(g, state.params, memory, t, x, y, hp, key, state.grouped),
        lambda: (g, _no_projection()),
      )
      updates, opt_state = opt.update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      finite = _tree_all_finite(params)
      new = TrainState(params, opt_state, memory, state.step + 1, ~finite, gstate)
      return new, StepStats(jnp.ones((), bool), loss, violated, projected, qp_it, kkt, qp_failed)

    def skip_step(state: TrainState, t, j) -> tuple[TrainState, StepStats]:
      del t, j
      zero = StepStats(*(jnp.zeros((), d) for d in _STEP_DTYPES))
      return state, zero

    def step(state: TrainState, xs):
      t, j = xs
      valid = (j < steps) & ~state.diverged
      return jax.lax.cond(valid, train_step, skip_step, state, t, jnp.minimum(j, steps - 1))

    def chunk_then_eval(state: TrainState, xs):
      t, c = xs
      js = c * chunk + jnp.arange(chunk)
      state, stats = jax.lax.scan(step, state, (jnp.full((chunk,), t), js))
      return state, (evaluate(state.params, stream), state.step, stats)

    def task(state: TrainState, t):
      state, (curve, curve_step, stats) = jax.lax.scan(
        chunk_then_eval, state, (jnp.full((n_chunks,), t), jnp.arange(n_chunks))
      )
      stats = jax.tree.map(lambda a: a.reshape(-1), stats)  # (C * chunk,)
      h_used = state.grouped.h if grouped else None
      if grouped:  # groups after task 0; the task's statistics frozen
        key = jax.random.fold_in(jax.random.fold_in(step_key, _GROUP_KEY), t)
        state = state._replace(
          grouped=end_task(state.grouped, config.grouped, t, state.params, key)
        )
      if progress is not None:
        jax.debug.callback(progress, t, curve[-1])
      return state, (curve, curve_step, _reduce(stats), _tree_all_finite(state.params), h_used)

    baseline = evaluate(state.params, stream)
    state, (curve, curve_step, counters, finite, h) = jax.lax.scan(task, state, jnp.arange(T))
    return RunResult(curve[:, -1], baseline, curve, curve_step, counters, finite, state.params, h)

  return train


_N_BUCKETS = 4
_GROUP_KEY = 0x7FFFFFFF  # folded into the step key for the grouped variants' random choices


def past_slot_counts(T: int) -> tuple[int, ...]:
  """The task-slot counts the factored memory step is compiled for: ceil(T b / 4), b = 1..4.

  With T = 10: (3, 5, 8, 10), so a step with t past tasks reads the memory of the smallest count
  >= t (5.9 task slots on average over t = 1..9 instead of 10), with a constant number of compiled
  variants whatever T is.
  """
  return tuple(sorted({math.ceil(T * b / _N_BUCKETS) for b in range(1, _N_BUCKETS + 1)}))


def write_memory(memory: Memory, t: jax.Array, x: jax.Array, y: jax.Array) -> Memory:
  """Write a batch into task t's memory, as GEM's ring buffer.

  The first min(B, M - cursor) examples go to slots cursor, cursor + 1, ...; the cursor wraps to 0
  when it reaches M and is shared by all tasks (GEM's `mem_cnt`). x: (B, D), y: (B,).
  """
  M, B = memory.x.shape[1], x.shape[0]
  slots = memory.cursor + jnp.arange(B)
  fits = slots < M
  slots = jnp.where(fits, slots, M)  # out of range: dropped
  mx = memory.x.at[t, slots].set(x, mode="drop")
  my = memory.y.at[t, slots].set(y, mode="drop")
  mf = memory.filled.at[t, slots].set(True, mode="drop")
  cursor = memory.cursor + jnp.sum(fits)
  return Memory(mx, my, mf, jnp.where(cursor >= M, 0, cursor).astype(jnp.int32))


def _fold_pixel_map(params, pix_idx: jax.Array, pix_w: jax.Array):
  """Params whose first layer reads base images instead of the task's transformed ones.

  W'[j] = sum over (i, k) with pix_idx[i, k] = j of pix_w[i, k] W[i], so x W' = (A x) W for the
  task's pixel map A (pix_idx, pix_w: (D, K)).
  """
  kernel = params["hidden_0"]["kernel"]  # (D, H)
  contrib = pix_w[..., None] * kernel[:, None, :]  # (D, K, H)
  folded = jax.ops.segment_sum(
    contrib.reshape(-1, kernel.shape[1]), pix_idx.reshape(-1), num_segments=kernel.shape[0]
  )
  return {**params, "hidden_0": {**params["hidden_0"], "kernel": folded}}


def _qp_stats(violated, projected, info):
  return (
    violated,
    projected,
    info.iterations.astype(jnp.int32),
    info.kkt.astype(jnp.float32),
    projected & ~info.converged,
  )


def _closed_form_stats(fired: jax.Array, projected: jax.Array) -> tuple[jax.Array, ...]:
  """The project_step stats of a rule without a QP: no iterations, no KKT residual, no failure.

  Created lazily: importing cljax must not initialise a JAX backend, so that a caller can still
  choose the CPU device count (`jax_num_cpu_devices`).
  """
  return fired, projected, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), jnp.zeros((), bool)


def _no_projection() -> tuple[jax.Array, ...]:
  """The project_step stats of a step that does not project."""
  false = jnp.zeros((), bool)
  return _closed_form_stats(false, false)


def _agem_conditional(g, ref) -> tuple[Any, tuple[jax.Array, ...]]:
  """The A-GEM paper's rule: g - min(0, <g, ref>) / |ref|^2 ref, with its stats."""
  violated = tree_vdot(g, ref) < 0
  return agem_project(g, ref), _closed_form_stats(violated, violated)


_STEP_DTYPES = StepStats(bool, jnp.float32, bool, bool, jnp.int32, jnp.float32, bool)


def _reduce(stats: StepStats) -> TaskCounters:
  ran = stats.ran
  return TaskCounters(
    steps=jnp.sum(ran),
    violations=jnp.sum(stats.violated),
    projections=jnp.sum(stats.projected),
    qp_iterations=jnp.sum(stats.qp_iterations),
    qp_iterations_max=jnp.max(stats.qp_iterations),
    kkt_max=jnp.max(stats.kkt),
    qp_failures=jnp.sum(stats.qp_failed),
    mean_loss=jnp.sum(jnp.where(ran, stats.loss, 0.0)) / jnp.maximum(jnp.sum(ran), 1),
  )


def _tree_all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
