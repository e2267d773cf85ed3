"""Grouped GEM's relatedness state across a run: groups, per-task covariances and the multipliers h.

The run (`cljax.train`) scans over tasks t = 0..T-1 and their steps; Grouped GEM carries a
`GroupedState` of fixed shapes in that scan and moves it with three pure, jit-safe transitions
(t may be traced; nothing branches on it in Python):

  grouped_init   the empty state for T tasks, L hidden layers of H units, G groups
  observe        one training batch: during task 0, add its examples to a reservoir of
                 cov_first_task_buffer examples; during task t > 0, add them to the current task's
                 running covariance (L, G) and, every cov_recompute_every batches of the task,
                 recompute h from it against the frozen covariances of the past tasks k < t
  end_task       end of task 0: form the groups from the params (`groups.make_groupings`)
                 and freeze task 0's covariance, computed from the reservoir with those groups;
                 end of task t > 0: freeze the current covariance into slot t and reset it

The statistics of a (task, layer l, group k) are the covariance of the vector [a_k, e]
(`relatedness.group_vectors`): the group's activations padded to S slots, then the extra
vector e: the label as a number (E = 1), or with if_output_cov the network's outputs (logits,
E = n_classes). With r = `relatedness_divergence` of the current and every past covariance,

  h = transform_relatedness(relatedness_weights(r, past, reverse=ewc_reverse), past, ...)

of shape (T, L, G), past = (k < t). What h is when there is nothing to compute it from:
  * during task 0 (no past task): h = 0 everywhere (there is no constraint row);
  * during task t > 0 before its first recompute (no statistic of task t yet): h = 1 on every past
    task and non-empty group, 0 elsewhere: plain GEM rows (what `transform_relatedness` gives for
    uniform weights, and with ignore_relatedness always).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax.errors import CljaxError, is_int
from cljax.grouped.groups import (
  GROUPING_METHODS,
  group_sizes,
  make_groupings,
  mlp_layers,
)
from cljax.grouped.relatedness import (
  CovState,
  cov_from_buffer,
  cov_init,
  cov_update,
  cov_value,
  group_vectors,
  relatedness_divergence,
  relatedness_weights,
  transform_relatedness,
)

PyTree = Any


def _flag(default: Any, help: str, **meta: Any) -> Any:
  """A field whose default and help text the command line takes (meta: flag, its name; type)."""
  return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class GroupedConfig:
  """Static settings of Grouped GEM's relatedness (hashable; closed over, never traced).

  Attributes:
    num_groups: G, groups per hidden layer (about G for "cluster": some may stay empty; exactly
      n_hiddens for "unit", which sets the count itself).
    grouping: "cluster" (deterministic k-means of the units' incoming weights), "random" or
      "unit" (one unit per group), see `groups.make_groupings`.
    cov_first_task_buffer: N, task 0's reservoir size (examples kept to compute its covariance
      once the groups exist).
    cov_recompute_every: recompute h every this many batches of a task t > 0.
    if_output_cov: the extra vector is the network's outputs (E = n_classes), not the label.
    ewc_reverse: softmax over past tasks of +r (most different tasks weigh more), not -r.
    sub_mean, margin: `transform_relatedness`'s options.
    ignore_relatedness: h = 1 on every past task and non-empty group (no divergence computed).
    bias_once: count the biases of grouped layers once (`groups.group_param_weights`);
      not used here, carried for the engine.
    cluster_iters: Lloyd iterations of the "cluster" grouping.
    cluster_max_size: at most this many units per "cluster" group (None: 2 ceil(H/G), at most
      H). It is the padded group size S of the statistics, so it sets the size n = S + E of the
      covariances whose eigendecompositions every recompute takes: uncapped (H) the seed's MLP
      would decompose 101 x 101 matrices per (task, layer, group) instead of 11 x 11.
  """

  num_groups: int = _flag(
    20,
    "groups of hidden units per layer, formed after task 0 (with --create_group_per_unit: "
    "n_hiddens)",
  )
  grouping: str = "cluster"  # the command line's --create_random_groups / --create_group_per_unit
  cov_first_task_buffer: int = _flag(100, "task 0's examples kept (reservoir) for its covariance")
  cov_recompute_every: int = _flag(
    20, "recompute the task relatedness every this many steps of a task"
  )
  if_output_cov: bool = _flag(False, "covariances with the network's outputs instead of the label")
  ewc_reverse: bool = _flag(
    False, "weigh the most different past tasks most (softmax of +divergence)"
  )
  sub_mean: bool = _flag(
    True, "subtract each task and layer's mean weight over its groups", flag="gem_sub_mean"
  )
  margin: float = _flag(
    0.0, "added to every multiplier h after its re-centring to mean 1", flag="relatedness_margin"
  )
  ignore_relatedness: bool = _flag(
    False, "multipliers h = 1: the rows of plain GEM", flag="gem_ignore_relatedness"
  )
  bias_once: bool = _flag(
    False, "count each next layer's bias once (False: once per group, as the research code's rows)"
  )
  cluster_iters: int = _flag(20, "Lloyd iterations of the clustering")
  cluster_max_size: int | None = _flag(
    None, "at most this many units per cluster group (default 2 ceil(H/G))", type=int
  )

  def __post_init__(self):
    if self.grouping not in GROUPING_METHODS:
      raise CljaxError(
        f"unknown grouping {self.grouping!r}: choose one of {', '.join(GROUPING_METHODS)}."
      )
    for name in ("num_groups", "cov_first_task_buffer", "cov_recompute_every"):
      v = getattr(self, name)
      if not is_int(v) or v < 1:
        raise CljaxError(f"{name} must be an int >= 1, got {v!r}.")
    if not is_int(self.cluster_iters) or self.cluster_iters < 0:
      raise CljaxError(f"cluster_iters must be an int >= 0, got {self.cluster_iters!r}.")
    for name in ("if_output_cov", "ewc_reverse", "sub_mean", "ignore_relatedness", "bias_once"):
      if not isinstance(getattr(self, name), bool):
        raise CljaxError(f"{name} must be a bool, got {getattr(self, name)!r}.")
    if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float, np.floating)):
      raise CljaxError(f"margin must be a float, got {self.margin!r}.")
    if not math.isfinite(self.margin):
      raise CljaxError(f"margin must be finite, got {self.margin!r}.")
    if self.grouping != "cluster" and self.cluster_iters != 20:
      raise CljaxError(
        f"cluster_iters applies only to grouping 'cluster', not {self.grouping!r}: leave it at 20."
      )
    if self.grouping != "cluster" and self.cluster_max_size is not None:
      raise CljaxError(
        f"cluster_max_size applies only to grouping 'cluster', not {self.grouping!r} (whose "
        "groups are balanced): leave it unset."
      )
    if self.cluster_max_size is not None and (
      not is_int(self.cluster_max_size) or self.cluster_max_size < 1
    ):
      raise CljaxError(f"cluster_max_size must be an int >= 1, got {self.cluster_max_size!r}.")
    if self.ignore_relatedness:
      for name, default in (("ewc_reverse", False), ("if_output_cov", False), ("margin", 0.0)):
        if getattr(self, name) != default:
          raise CljaxError(
            f"ignore_relatedness sets h = 1 whatever the relatedness, so {name} has no effect: "
            f"leave it at {default}."
          )


def n_extra(config: GroupedConfig, n_classes: int) -> int:
  """E, the size of the extra vector: n_classes with if_output_cov, else 1 (the label)."""
  return n_classes if config.if_output_cov else 1


def max_group_size(config: GroupedConfig, n_hiddens: int) -> int:
  """S, the padded group size: ceil(H/G) for "random", "unit"; cluster_max_size for "cluster".

  The "cluster" default is min(H, 2 ceil(H/G)).
  """
  balanced = -(-n_hiddens // _num_groups(config, n_hiddens))
  if config.grouping != "cluster":
    return balanced
  if config.cluster_max_size is None:
    return min(n_hiddens, 2 * balanced)
  return config.cluster_max_size


def _num_groups(config: GroupedConfig, n_hiddens: int) -> int:
  return n_hiddens if config.grouping == "unit" else config.num_groups


class GroupedState(NamedTuple):
  """Grouped GEM's carry: T tasks, L hidden layers of H units, G groups of at most S units.

  n = S + E is the size of a group vector (`relatedness.group_vectors`), N the reservoir.
  """

  assignments: jax.Array  # (L, H) int32 group of each unit (zeros until formed)
  formed: jax.Array  # () bool: groups made (after task 0)
  past_cov: CovState  # batch (T, L, G), vectors (n,): frozen statistics of finished tasks
  cur_cov: CovState  # batch (L, G): the current task's running statistics (t > 0)
  buf_act: jax.Array  # (N, L, H) float32 task 0's reservoir of hidden activations
  buf_extra: jax.Array  # (N, E) float32 and their extra vectors
  buf_seen: jax.Array  # () int32 task 0 examples offered to the reservoir (min(., N) held)
  since: jax.Array  # () int32 batches of the current task since its last recompute
  h: jax.Array  # (T, L, G) float32 current multipliers of the grouped rows


def check_sizes(config: GroupedConfig, n_hiddens: int) -> None:
  """Refuse settings that do not fit hidden layers of n_hiddens units, in one line each."""
  if config.grouping == "unit" and config.num_groups != n_hiddens:
    raise CljaxError(
      f"grouping 'unit' sets the group count to n_hiddens ({n_hiddens}): set num_groups = "
      f"{n_hiddens}, got {config.num_groups}."
    )
  if config.num_groups > n_hiddens:
    raise CljaxError(
      f"num_groups ({config.num_groups}) exceeds n_hiddens ({n_hiddens}): every group needs a "
      f"unit; use num_groups <= {n_hiddens}."
    )
  least = -(-n_hiddens // _num_groups(config, n_hiddens))
  if config.grouping == "cluster" and not least <= max_group_size(config, n_hiddens) <= n_hiddens:
    raise CljaxError(
      f"cluster_max_size must be in [ceil(H/G), H] = [{least}, {n_hiddens}] (G groups of at most "
      f"that many units must hold all H units), got {config.cluster_max_size}."
    )


def grouped_init(
  config: GroupedConfig, n_tasks: int, n_hiddens: int, n_layers: int, n_classes: int
) -> GroupedState:
  """The empty state of a run: no groups, no statistics, h = 0 (task 0 has no past task).

  Args:
    config: the method's settings.
    n_tasks: T, the run's tasks (static int >= 1, as all sizes).
    n_hiddens: H, every hidden layer's width.
    n_layers: L, the hidden layers.
    n_classes: the network's outputs.

  Returns:
    A `GroupedState` whose shapes never change during the run.
  """
  for name, v in (
    ("n_tasks", n_tasks),
    ("n_hiddens", n_hiddens),
    ("n_layers", n_layers),
    ("n_classes", n_classes),
  ):
    if not is_int(v) or v < 1:
      raise CljaxError(f"{name} must be an int >= 1, got {v!r}.")
  check_sizes(config, n_hiddens)
  T, L, H = n_tasks, n_layers, n_hiddens
  G = _num_groups(config, H)
  E = n_extra(config, n_classes)
  n = max_group_size(config, H) + E
  N = config.cov_first_task_buffer
  return GroupedState(
    assignments=jnp.zeros((L, H), jnp.int32),
    formed=jnp.zeros((), bool),
    past_cov=cov_init(n, batch_shape=(T, L, G)),
    cur_cov=cov_init(n, batch_shape=(L, G)),
    buf_act=jnp.zeros((N, L, H), jnp.float32),
    buf_extra=jnp.zeros((N, E), jnp.float32),
    buf_seen=jnp.zeros((), jnp.int32),
    since=jnp.zeros((), jnp.int32),
    h=jnp.zeros((T, L, G), jnp.float32),
  )


def _sizes(state: GroupedState) -> tuple[int, int, int, int, int, int]:
  """(T, L, H, G, S, E) of a state (static)."""
  T, L, G = state.past_cov.count.shape
  H = state.assignments.shape[1]
  E = state.buf_extra.shape[1]
  return T, L, H, G, state.cur_cov.mean.shape[-1] - E, E


def group_mask(state: GroupedState) -> jax.Array:
  """(L, G) bool: the non-empty groups of each hidden layer (all False before they are formed)."""
  G = state.past_cov.count.shape[-1]
  sizes = jax.vmap(lambda a: group_sizes(a, G))(state.assignments)
  return (sizes > 0) & state.formed


def plain_h(state: GroupedState, t: jax.Array) -> jax.Array:
  """(T, L, G) h of plain GEM rows for task t: 1 on past tasks k < t and non-empty groups."""
  T = state.h.shape[0]
  past = jnp.arange(T) < t
  return (past[:, None, None] & group_mask(state)[None]).astype(state.h.dtype)


def _vectors(state: GroupedState, activations: jax.Array, extra: jax.Array):
  """Group vectors (B, L, G, n) and validity mask (L, G, n) of a batch, with the state's groups."""
  _, _, _, G, S, _ = _sizes(state)
  vec, mask = jax.vmap(lambda a, g: group_vectors(a, extra, g, G, S))(
    activations, state.assignments
  )  # (L, B, G, n), (L, G, n)
  return jnp.swapaxes(vec, 0, 1), mask


def _reservoir_add(state: GroupedState, activations: jax.Array, extra: jax.Array, key: jax.Array):
  """Algorithm R over the batch's examples, in order.

  Example c (0-based, counted over all of task 0) goes to slot c while c < N, else to slot
  j = randint(fold_in(key, c), (), 0, c + 1) when j < N (dropped otherwise).
  """
  N = state.buf_act.shape[0]

  def add(carry, example):
    buf_act, buf_extra, c = carry
    a, e = example
    j = jax.random.randint(jax.random.fold_in(key, c), (), 0, c + 1)
    slot = jnp.where(c < N, c, j)
    slot = jnp.where(slot < N, slot, N)  # N: out of range, dropped
    buf_act = buf_act.at[slot].set(a, mode="drop")
    buf_extra = buf_extra.at[slot].set(e, mode="drop")
    return (buf_act, buf_extra, c + 1), None

  (buf_act, buf_extra, seen), _ = jax.lax.scan(
    add, (state.buf_act, state.buf_extra, state.buf_seen), (jnp.swapaxes(activations, 0, 1), extra)
  )
  return state._replace(buf_act=buf_act, buf_extra=buf_extra, buf_seen=seen)


def relatedness_h(state: GroupedState, config: GroupedConfig, t: jax.Array) -> jax.Array:
  """Task t's multipliers h (T, L, G): its covariance against the frozen ones of tasks k < t.

    r = relatedness_divergence(cov_value(cur_cov), cov_value(past_cov), E, mask)   (T, L, G)
    h = transform_relatedness(relatedness_weights(r, past, reverse=ewc_reverse), past,
                              sub_mean, margin, ignore, group_mask)

  (population covariances, ddof = 0). With ignore_relatedness no divergence is computed.
  """
  T, _, _, G, S, E = _sizes(state)
  past = jnp.arange(T) < t
  groups = group_mask(state)
  if config.ignore_relatedness:
    weights = jnp.zeros(state.h.shape, state.h.dtype)
  else:
    sizes = jax.vmap(lambda a: group_sizes(a, G))(state.assignments)  # (L, G)
    mask = jnp.concatenate(
      [jnp.arange(S) < sizes[..., None], jnp.ones((*sizes.shape, E), bool)], axis=-1
    )  # (L, G, n)
    r = relatedness_divergence(cov_value(state.cur_cov), cov_value(state.past_cov), E, mask)
    weights = relatedness_weights(r, past, reverse=config.ewc_reverse)
  h = transform_relatedness(
    weights,
    past,
    sub_mean=config.sub_mean,
    margin=config.margin,
    ignore=config.ignore_relatedness,
    group_mask=groups,
  )
  return h.astype(state.h.dtype)


def _check_batch(state: GroupedState, activations: Any, extra: Any) -> tuple[jax.Array, jax.Array]:
  _, L, H, _, _, E = _sizes(state)
  if isinstance(activations, Sequence):
    shapes = [np.shape(a) for a in activations]
    if len(activations) != L or len(set(shapes)) > 1:
      raise CljaxError(
        f"activations must be {L} arrays (B, {H}), one per hidden layer; got shapes {shapes}."
      )
    activations = jnp.stack(activations)
  activations, extra = jnp.asarray(activations), jnp.asarray(extra)
  if activations.ndim != 3 or activations.shape[0] != L or activations.shape[2] != H:
    raise CljaxError(
      f"activations must have shape (L, B, H) = ({L}, B, {H}), got {activations.shape}."
    )
  B = activations.shape[1]
  if extra.shape != (B, E):
    raise CljaxError(
      f"extra must have shape (B, E) = ({B}, {E}) (labels[:, None], or the outputs with "
      f"if_output_cov), got {extra.shape}."
    )
  return activations.astype(jnp.float32), extra.astype(jnp.float32)


def observe(
  state: GroupedState,
  config: GroupedConfig,
  activations: jax.Array | Sequence[jax.Array],
  extra: jax.Array,
  t: jax.Array | int,
  key: jax.Array,
) -> GroupedState:
  """Take one training batch of task t into the statistics; recompute h when it is due.

  t = 0: the examples go to the reservoir (`buf_*`, Algorithm R, draws from key); since and h
  stay. t > 0: the batch's group vectors update cur_cov, since += 1, and when since reaches
  cov_recompute_every, h = `relatedness_h(state, config, t)` and since = 0: h is recomputed after
  batches k, 2k, ... of the task (k = cov_recompute_every).

  Args:
    state: the run's `GroupedState`.
    config: the settings the state was made with.
    activations: (L, B, H) post-ReLU hidden activations (`hidden_activations`), or a list of L
      (B, H) arrays.
    extra: (B, E) labels[:, None] as floats, or the outputs with if_output_cov (`extra_vector`).
    t: the current task (int or traced int).
    key: a PRNG key (used during task 0 only).

  Returns:
    The new state, same shapes.
  """
  activations, extra = _check_batch(state, activations, extra)
  t = jnp.asarray(t, jnp.int32)

  def first_task(s: GroupedState) -> GroupedState:
    return _reservoir_add(s, activations, extra, key)

  def later_task(s: GroupedState) -> GroupedState:
    vec, _ = _vectors(s, activations, extra)
    s = s._replace(cur_cov=cov_update(s.cur_cov, vec), since=s.since + 1)
    due = s.since >= config.cov_recompute_every
    return jax.lax.cond(
      due,
      lambda s: s._replace(h=relatedness_h(s, config, t), since=jnp.zeros_like(s.since)),
      lambda s: s,
      s,
    )

  return jax.lax.cond(t == 0, first_task, later_task, state)


def end_task(
  state: GroupedState, config: GroupedConfig, t: jax.Array | int, params: PyTree, key: jax.Array
) -> GroupedState:
  """Freeze task t's statistics and set h for task t + 1 to plain GEM rows (`plain_h`).

  t = 0: form the groups, assignments = make_groupings(params, G, method=grouping, key=key,
  iters=cluster_iters, max_size=S) (stacked (L, H)), and freeze into slot 0 the covariance of the
  reservoir's min(buf_seen, N) examples with those groups (`cov_from_buffer`). t > 0: freeze
  cur_cov into slot t. Then cur_cov is emptied and since = 0.

  Args:
    state: the run's `GroupedState`.
    config: its settings.
    t: the task that ends (int or traced int).
    params: the MLP's params (`variables["params"]`) at the end of task t.
    key: a PRNG key (used by grouping "random" at t = 0).

  Returns:
    The new state, same shapes.
  """
  _, L, H, G, S, _ = _sizes(state)
  names = mlp_layers(params)
  widths = [np.shape(params[n]["bias"]) for n in names[:-1]]
  if len(widths) != L or any(w != (H,) for w in widths):
    raise CljaxError(
      f"params must be an MLP with {L} hidden layers of {H} units, got widths {widths}."
    )
  t = jnp.asarray(t, jnp.int32)

  def first_task(s: GroupedState) -> tuple[jax.Array, CovState]:
    groups = make_groupings(
      params, G, method=config.grouping, key=key, iters=config.cluster_iters, max_size=S
    )
    s = s._replace(assignments=jnp.stack(groups).astype(jnp.int32), formed=jnp.ones((), bool))
    N = s.buf_act.shape[0]
    vec, _ = _vectors(s, jnp.swapaxes(s.buf_act, 0, 1), s.buf_extra)
    filled = jnp.arange(N) < s.buf_seen
    return s.assignments, cov_from_buffer(vec, filled)

  def later_task(s: GroupedState) -> tuple[jax.Array, CovState]:
    return s.assignments, s.cur_cov

  assignments, frozen = jax.lax.cond(t == 0, first_task, later_task, state)
  past_cov = jax.tree.map(lambda p, c: p.at[t].set(c, mode="drop"), state.past_cov, frozen)
  state = state._replace(
    assignments=assignments,
    formed=state.formed | (t == 0),
    past_cov=past_cov,
    cur_cov=jax.tree.map(jnp.zeros_like, state.cur_cov),
    since=jnp.zeros_like(state.since),
  )
  return state._replace(h=plain_h(state, t + 1))


def hidden_activations(params: PyTree, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The MLP's post-ReLU hidden activations and its logits (`cljax.models.MLP`'s math).

    a_0 = relu(x W_0 + b_0),  a_l = relu(a_{l-1} W_l + b_l),  logits = a_{L-1} W_out + b_out

  Args:
    params: `variables["params"]` of a cljax MLP (hidden_0..hidden_{L-1}, out).
    x: (B, n_inputs) floating inputs.

  Returns:
    (activations (L, B, H), logits (B, n_classes)).
  """
  names = mlp_layers(params)
  x = jnp.asarray(x)
  if x.ndim != 2 or x.shape[1] != np.shape(params[names[0]]["kernel"])[0]:
    raise CljaxError(
      f"x must have shape (B, {np.shape(params[names[0]]['kernel'])[0]}), got {x.shape}."
    )
  acts = []
  for name in names[:-1]:
    x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    acts.append(x)
  logits = x @ params["out"]["kernel"] + params["out"]["bias"]
  return jnp.stack(acts), logits


def extra_vector(config: GroupedConfig, y: jax.Array, logits: jax.Array) -> jax.Array:
  """(B, E) extra vectors: the logits with if_output_cov, else the labels y (B,) as floats."""
  if config.if_output_cov:
    return jnp.asarray(logits, jnp.float32)
  return jnp.asarray(y, jnp.float32)[:, None]
