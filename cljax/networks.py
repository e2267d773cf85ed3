"""How a run's network meets its tasks: one shared MLP, one MLP per task, one head per task.

    net = make_network(n_hiddens, n_layers, init, n_tasks=T, dim=D, per_task=..., classes=...)
    params = net.init(key)
    logits = net.apply(params, net.tag(x, t))       # x (B, D) of task t

- shared (the default): every task trains and is evaluated on one MLP; tag is the identity.
- per_task (GEM's "independent"): T MLPs of n_hiddens // T units each, stacked on a leading axis
  (`init` vmaps the MLP's init over T keys); task t trains and is scored on MLP t only, so the
  other MLPs get exactly zero gradient.
- classes (a task-incremental stream, `tasks.TaskStream.classes` (T, C)): task t's logits are
  its classes' only, the others at -inf (its head).

With per_task or classes, an example carries its task: `tag` appends t as one more column, so the
episodic memory keeps each example's task with it and every loss built on `apply` (the batch's,
the memory gradients', ER's replay, EWC's Fisher) uses the example's own network and head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax.errors import CljaxError
from cljax.models import MLP, make_mlp

PyTree = Any


class Network(NamedTuple):
  """A run's network (see the module docstring).

  init(key) -> params; apply(params, x (N, D + tagged)) -> (N, C) logits; tag(x (B, D), t) -> the
  rows apply takes; model: the MLP of one task (all tasks when shared); per_task, tagged: bools.
  """

  init: Callable[[jax.Array], PyTree]
  apply: Callable[[PyTree, jax.Array], jax.Array]
  tag: Callable[[jax.Array, jax.Array], jax.Array]
  model: MLP
  per_task: bool
  tagged: bool


def make_network(
  n_hiddens: int,
  n_layers: int,
  init: str,
  *,
  n_tasks: int,
  dim: int,
  per_task: bool = False,
  classes: jax.Array | None = None,
) -> Network:
  """The network of a run of n_tasks tasks of dim-sized inputs (static shapes; jit-safe)."""
  model = task_mlp(n_hiddens, n_layers, init, n_tasks=n_tasks, per_task=per_task)
  tagged = per_task or classes is not None
  if classes is not None and classes.shape[1] != model.n_outputs:
    raise CljaxError(
      f"the network has {model.n_outputs} outputs but the split has {classes.shape[1]} classes."
    )

  def init_fn(key):
    one = lambda k: model.init(k, jnp.zeros((1, dim), jnp.float32))["params"]  # noqa: E731
    return jax.vmap(one)(jax.random.split(key, n_tasks)) if per_task else one(key)

  def apply(params, x):
    if not tagged:
      return model.apply({"params": params}, x)
    t, x = x[:, -1].astype(jnp.int32), x[:, :-1]
    if per_task:  # each example through its own task's MLP
      logits = jax.vmap(lambda ti, xi: model.apply({"params": task_params(params, ti)}, xi[None]))(
        t, x
      )[:, 0]
    else:
      logits = model.apply({"params": params}, x)
    if classes is not None:
      logits = jnp.where(classes[t], logits, -jnp.inf)
    return logits

  def tag(x, t):
    if not tagged:
      return x
    return jnp.concatenate([x, jnp.full((x.shape[0], 1), t, x.dtype)], axis=1)

  return Network(init_fn, apply, tag, model, per_task, tagged)


def task_mlp(n_hiddens: int, n_layers: int, init: str, *, n_tasks: int, per_task: bool) -> MLP:
  """The MLP one task runs on: n_hiddens units, or n_hiddens // n_tasks with per_task."""
  if per_task and n_hiddens < n_tasks:
    raise CljaxError(
      f"independent splits n_hiddens over the tasks (n_hiddens // n_tasks units each): "
      f"n_hiddens {n_hiddens} < n_tasks {n_tasks}; raise n_hiddens or lower n_tasks."
    )
  return make_mlp(n_hiddens // n_tasks if per_task else n_hiddens, n_layers, init=init)


def task_params(params: PyTree, t: jax.Array) -> PyTree:
  """MLP t of per-task stacked parameters (leaves (T, ...) -> (...)); t may be traced."""
  return jax.tree.map(lambda a: a[t], params)


def finetune_start(params: PyTree, t: jax.Array) -> PyTree:
  """GEM's --finetune yes: MLP t starts as MLP t - 1 (from task 1 on); t may be traced."""
  prev = jnp.maximum(t - 1, 0)
  return jax.tree.map(lambda a: a.at[t].set(jnp.where(t > 0, a[prev], a[t])), params)


def task_has_label(classes: jax.Array, y: jax.Array) -> jax.Array:
  """(T, N) whether label y[n] is one of task t's classes (False for the padding label -1)."""
  return (y[None, :] >= 0) & jnp.take(classes, jnp.maximum(y, 0), axis=1)
