"""The past tasks' memory gradients with the current parameters, from a rule's `StepContext`.

For each past task k < t, r_k = grad L_k, L_k task k's mean loss on its memory slots (weights
`cljax.memory.past_weights`). Two ways to compute what the rules need:

- factored: one forward and backward pass over the memory, kept as per-example factors
  (`cljax.example_grads`): the Gram matrix R R', the checks R g and R'w come from small matrix
  products, and no (t, p) row is formed;
- explicit: one backward pass per past task (works for any differentiable model), rows as pytrees.

Both compute the same numbers up to float rounding. The factored work is kept proportional to the
past tasks with static shapes: `past_grad_sum` loops over blocks of tasks (`task_blocks`, one
compiled body), and `on_past_slots` runs a function on the first n task slots only, n the smallest
of a few compiled counts >= t (for terms that need all past examples at once, e.g. GEM's Gram).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from cljax.example_grads import ExampleGrads, example_grads, gram, has_bias, weighted_grad
from cljax.memory import Memory, first_tasks, past_weights

if TYPE_CHECKING:
  from cljax.rules.base import StepContext

PyTree = Any
MODES = ("factored", "explicit")
N_BUCKETS = 4  # compiled slot counts of `on_past_slots`


def weighted_loss(ctx: StepContext, params: PyTree, x, y, w) -> jax.Array:
  """Sum over examples of w * CE: x (..., D), y (...), w (...) non-negative weights."""
  logits = ctx.apply(params, x.reshape(-1, x.shape[-1]))
  return jnp.sum(
    w.reshape(-1) * optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1))
  )


def mean_loss(apply: Callable, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
  """The mean cross-entropy of apply(params, x) (B, classes) against labels y (B,)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y))


def batch_loss(ctx: StepContext, params: PyTree) -> jax.Array:
  """The mean loss of the step's batch."""
  return mean_loss(ctx.apply, params, ctx.x, ctx.y)


def past_slot_counts(n_tasks: int) -> tuple[int, ...]:
  """The task-slot counts the factored memory work is compiled for: ceil(T b / 4), b = 1..4.

  With T = 10: (3, 5, 8, 10), so a step with t past tasks reads the memory of the smallest count
  >= t (5.9 task slots on average over t = 1..9 instead of 10), with a constant number of compiled
  variants whatever T is.
  """
  return tuple(sorted({math.ceil(n_tasks * b / N_BUCKETS) for b in range(1, N_BUCKETS + 1)}))


def on_past_slots(fn: Callable[[StepContext], Any], ctx: StepContext) -> Any:
  """fn(ctx with the memory of the first n tasks only), n the smallest compiled count >= t >= 1.

  Only tasks k < t matter; a `lax.switch` over `past_slot_counts` skips most unused slots while
  every shape stays static.
  """
  sizes = past_slot_counts(ctx.memory.x.shape[0])
  if len(sizes) == 1:
    return fn(ctx)
  branches = [lambda n=n: fn(ctx._replace(memory=first_tasks(ctx.memory, n))) for n in sizes]
  return jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes), ctx.t), branches)


def memory_factors(ctx: StepContext) -> ExampleGrads:
  """Per-example gradient factors of every slot of ctx.memory (unused slots get weight 0)."""
  m = ctx.memory
  return example_grads(ctx.apply, ctx.params, m.x.reshape(-1, m.x.shape[-1]), m.y.reshape(-1))


def batch_factors(ctx: StepContext) -> ExampleGrads:
  """Per-example gradient factors of the step's batch."""
  return example_grads(ctx.apply, ctx.params, ctx.x, ctx.y)


def factored_checks(
  ctx: StepContext, mem: ExampleGrads, w: jax.Array, batch: ExampleGrads | None = None
) -> jax.Array:
  """(n,) <g, r_k> = sum_i w_ki mean_b K_ib, K the memory x batch gradient Gram; w (n, M).

  batch: the step batch's factors (`batch_factors(ctx)`, computed here when None).
  """
  batch = batch_factors(ctx) if batch is None else batch
  k_mb = gram(ctx.params, mem, batch)  # (n * M, B)
  return jnp.sum(w * jnp.mean(k_mb, axis=1).reshape(w.shape), axis=1)


def task_gram(ctx: StepContext, mem: ExampleGrads, w: jax.Array) -> jax.Array:
  """(n, n) the Gram matrix R R' of the task rows r_k = sum_i w_ki grad l_i; w (n, M).

  Two ways, the cheaper for the shapes (static): through the (nM, nM) example Gram K, P = w K w'
  (sum over layers of (nM)^2 (in + out) flops: small memories), or through the rows themselves,
  r_k = A_k' (w_k D_k) per layer, then R R' (nM in out + n^2 in out: many memories per task,
  e.g. 256, where K would be 5120 x 5120). The same math, rounded differently.
  """
  n, M = w.shape
  layers = [(A.shape[1], mem.deltas[path].shape[1]) for path, A in mem.inputs.items()]
  via_examples = sum((n * M) ** 2 * (i + o) for i, o in layers)
  via_rows = sum((n * M + n * n) * i * o for i, o in layers)
  if via_examples <= via_rows:
    K = gram(ctx.params, mem).reshape(n, M, n, M)
    return jnp.einsum("km,kmln,ln->kl", w, K, w)
  P = jnp.zeros((n, n), jnp.float32)
  for path, A in mem.inputs.items():
    D = mem.deltas[path].reshape(n, M, -1)
    wD = w[:, :, None] * D  # (n, M, out)
    kernel = jnp.einsum("kmi,kmo->kio", A.reshape(n, M, -1), wD).reshape(n, -1)
    P = P + kernel @ kernel.T
    if has_bias(ctx.params, path):
      bias = jnp.sum(wD, axis=1)  # (n, out)
      P = P + bias @ bias.T
  return P


def past_grad_sum(
  ctx: StepContext, mode: str = "factored", checks: bool = False
) -> tuple[PyTree, jax.Array | None]:
  """sum_{k<t} r_k and, with checks, GEM's per-task checks (T,) <g, r_k> (0 for k >= t).

  g is the gradient of the batch's mean loss; without checks the second result is None.
  """
  T_all = ctx.memory.x.shape[0]
  if mode == "factored":
    return _blocked_past_grad_sum(ctx, checks)

  # explicit: one past task at a time, so the work grows with the number of past tasks, not
  # with T; each check is a forward-mode derivative of L_k along g (no p-length dot product).
  m, params = ctx.memory, ctx.params
  w = past_weights(m, ctx.t)
  g = jax.grad(lambda p: batch_loss(ctx, p))(params) if checks else None

  def body(k, carry):
    row_sum, dots = carry
    loss_k = lambda p: weighted_loss(ctx, p, m.x[k], m.y[k], w[k])  # noqa: E731
    row_sum = jax.tree.map(jnp.add, row_sum, jax.grad(loss_k)(params))
    if checks:
      dots = dots.at[k].set(jax.jvp(loss_k, (params,), (g,))[1])
    return row_sum, dots

  init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((T_all,), jnp.float32))
  row_sum, dots = jax.lax.fori_loop(0, ctx.t, body, init)
  return row_sum, dots if checks else None


def task_blocks(n_tasks: int) -> tuple[int, int]:
  """(tasks per block, blocks): the factored memory work reads ceil(t / B) blocks of B tasks.

  B = ceil(T / N_BUCKETS), so a step with t past tasks reads at most B - 1 tasks more than t.
  """
  size = math.ceil(n_tasks / N_BUCKETS)
  return size, math.ceil(n_tasks / size)


def _blocked_past_grad_sum(ctx: StepContext, checks: bool):
  """past_grad_sum's factored form: a loop over the blocks of tasks that hold past tasks.

  Block i covers tasks [i B, (i + 1) B); its slice of the memory starts at min(i B, T - B), so
  the last block may overlap the one before: tasks already covered get weight 0 there.
  """
  m, T = ctx.memory, ctx.memory.x.shape[0]
  size, _ = task_blocks(T)
  w_all = past_weights(m, ctx.t)
  batch = batch_factors(ctx) if checks else None

  def block(i, carry):
    row_sum, dots = carry
    start = jnp.minimum(i * size, T - size)
    tasks = start + jnp.arange(size)
    piece = jax.tree.map(
      lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), (m.x, m.y, m.filled)
    )
    c = ctx._replace(memory=m._replace(x=piece[0], y=piece[1], filled=piece[2]))
    w = jax.lax.dynamic_slice_in_dim(w_all, start, size, axis=0) * (tasks >= i * size)[:, None]
    mem = memory_factors(c)
    row_sum = jax.tree.map(jnp.add, row_sum, weighted_grad(c.params, mem, w.reshape(-1)))
    if checks:
      dots = dots.at[tasks].add(factored_checks(c, mem, w, batch))
    return row_sum, dots

  init = (jax.tree.map(jnp.zeros_like, ctx.params), jnp.zeros((T,), jnp.float32))
  n_blocks = (ctx.t + size - 1) // size
  row_sum, dots = jax.lax.fori_loop(0, n_blocks, block, init)
  return row_sum, dots if checks else None


def past_rows(ctx: StepContext) -> PyTree:
  """The rows r_k, k < t, as a pytree with a leading axis T (zero for k >= t), explicitly.

  One task at a time, so the work grows with the number of past tasks, not with T.
  """
  m, params = ctx.memory, ctx.params
  w = past_weights(m, ctx.t)
  rows = jax.tree.map(lambda z: jnp.zeros((m.x.shape[0], *z.shape), z.dtype), params)

  def body(k, rows):
    row = jax.grad(lambda p: weighted_loss(ctx, p, m.x[k], m.y[k], w[k]))(params)
    return jax.tree.map(lambda buf, r: buf.at[k].set(r), rows, row)

  return jax.lax.fori_loop(0, ctx.t, body, rows)


def pooled_sample(
  memory: Memory, avail: jax.Array, key: jax.Array, sample_size: int
) -> tuple[jax.Array, jax.Array]:
  """A uniform sample without replacement (Gumbel top-k) of the memory's slots where avail.

  avail: (T, M) bool. Returns idx (k,) into the flattened (T M) slots and valid (k,) bool, with
  k = min(sample_size, T M); when fewer than k slots are available, the rest is not valid. The
  examples are `memory_rows(memory, idx)`.
  """
  flat = avail.reshape(-1)
  k = min(sample_size, flat.shape[0])
  scores = jnp.where(flat, jax.random.gumbel(key, flat.shape), -jnp.inf)
  _, idx = jax.lax.top_k(scores, k)
  return idx, flat[idx]


def memory_rows(memory: Memory, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The examples in the flattened (T M) slots idx (k,): x (k, D), y (k,)."""
  return memory.x.reshape(-1, memory.x.shape[-1])[idx], memory.y.reshape(-1)[idx]


def pooled_sample_grad(ctx: StepContext, sample_size: int) -> PyTree:
  """The mean-loss gradient of a sample of the pooled memory of the past tasks.

  sample_size examples are drawn uniformly without replacement (`pooled_sample`, ctx.key) from
  the filled slots of tasks k < t, as the A-GEM paper samples its episodic memory.
  """
  m = ctx.memory
  idx, valid = pooled_sample(m, m.filled & ctx.past[:, None], ctx.key, sample_size)
  w = valid.astype(jnp.float32)
  w = w / jnp.maximum(jnp.sum(w), 1.0)
  x, y = memory_rows(m, idx)
  return jax.grad(lambda p: weighted_loss(ctx, p, x, y, w))(ctx.params)
