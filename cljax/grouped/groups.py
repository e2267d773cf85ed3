"""Groups of hidden units and the per-parameter weights of Grouped GEM's constraint rows.

A grouping of a hidden layer with H units is an int32 assignment (H,) with values in
[0, num_groups): unit j belongs to group assignment[j]. Groups are made once (after task 0) by
`random_groups`, `unit_groups` or `cluster_groups` (`make_groupings` does every hidden layer).

Grouped GEM splits each past task i's memory gradient g_i of cljax's MLP (hidden_0 ... hidden_{L-1},
out; `cljax.models`) into 1 + L G rows, in this order:

  rest row      hidden_0's kernel and bias (the first layer is never grouped)
  row (l, k)    the kernel rows of layer l+1 (hidden_{l+1}, or out for the last hidden layer) that
                read group k's units (Flax kernels are (in, out): row j reads unit j), plus the
                WHOLE bias of layer l+1 when group k is not empty (the research code's quirk)

With 2 hidden layers and 20 groups that is 41 rows; with 1 hidden layer, the rest row and one row
per group of hidden_0's units as read by `out`. With bias_once=True the biases of layers 1..L are
instead counted once, in the rest row. The constraint row of task i is

  row_i = rest + sum_{l, k} h[i, l, k] row (l, k) = g_i * w_i    (elementwise)

where `group_param_weights` builds w_i from h[i] (L, G) and the assignments without ever forming
the (1 + L G, p) rows: 1 on hidden_0; h[l, assignment_l[j]] on kernel row j of layer l+1; on layer
l+1's bias, sum_k h[l, k] over the non-empty groups k (or 1 with bias_once). `dense_group_rows`
is the dense construction, a reference for tests and benchmarks.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cljax.errors import CljaxError, concrete_value, is_int

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
GROUPING_METHODS = ("random", "unit", "cluster")
"""Accepted values of `make_groupings(method=...)`."""
DEFAULT_MAX_BYTES = 2**28
"""`dense_group_rows` refuses to build rows larger than this (256 MiB) unless told otherwise."""


def _check_counts(n_units: object, num_groups: object) -> None:
  if not is_int(n_units) or n_units < 1:
    raise CljaxError(f"n_units must be an int >= 1, got {n_units!r}.")
  if not is_int(num_groups) or num_groups < 1:
    raise CljaxError(f"num_groups must be an int >= 1, got {num_groups!r}.")
  if num_groups > n_units:
    raise CljaxError(
      f"num_groups ({num_groups}) exceeds the layer's {n_units} units: every group needs a unit. "
      f"Use num_groups <= {n_units}, or unit_groups for one unit per group."
    )


# --------------------------------------------------------------------------------------------
# Groupings.


def random_groups(key: jax.Array, n_units: int, num_groups: int) -> jax.Array:
  """A random balanced partition: units in a random order are dealt to groups 0, 1, ..., G-1, 0, ...

  Every group gets floor(H/G) or ceil(H/G) units (none is empty); the same key gives the same
  grouping.

  Args:
    key: a PRNG key.
    n_units: H (static int >= 1).
    num_groups: G (static int, 1 <= G <= H).

  Returns:
    (H,) int32 assignment.
  """
  _check_counts(n_units, num_groups)
  order = jax.random.permutation(key, n_units)
  dealt = jnp.arange(n_units, dtype=jnp.int32) % num_groups
  return jnp.zeros((n_units,), jnp.int32).at[order].set(dealt)


def unit_groups(n_units: int) -> jax.Array:
  """One unit per group: assignment[j] = j, num_groups = n_units. Returns (H,) int32."""
  _check_counts(n_units, 1)
  return jnp.arange(n_units, dtype=jnp.int32)


def _sq_distances(x: jax.Array, c: jax.Array) -> jax.Array:
  """|x_i - c_k|^2 (n, G), clipped at 0 (the expansion can go slightly negative)."""
  cross = jnp.matmul(x, c.T, precision=_HIGHEST)
  d = jnp.sum(x * x, -1)[:, None] - 2.0 * cross + jnp.sum(c * c, -1)[None, :]
  return jnp.maximum(d, 0.0)


def cluster_groups(
  unit_weights: jax.Array, num_groups: int, iters: int = 20, max_size: int | None = None
) -> jax.Array:
  """Deterministic k-means of the units' weight vectors (e.g. each unit's incoming weights).

  Algorithm (no randomness; ties always go to the lowest index):
    1. Farthest-point initialisation: the first centre is the unit farthest from the mean of all
       units; each next centre is the unit farthest from its nearest chosen centre.
    2. `iters` Lloyd iterations: assign every unit to its nearest centre, move each centre to the
       mean of its units. A centre left with no unit is moved onto a unit far from its own
       centre: the e-th empty cluster gets the e-th farthest unit.
    3. Final assignment to the nearest centre; with max_size, to the nearest centre that still
       has room: the (unit, centre) pairs are taken in increasing distance (ties: lower unit, then
       lower centre) and a pair is kept when its unit is unplaced and its group holds fewer than
       max_size units. Every group then has at most max_size units, which bounds the padded
       group size S of the relatedness statistics (`relatedness.group_vectors`).
  Squared Euclidean distances, no feature scaling. Without max_size, units with identical vectors
  always share a group, so with fewer than G distinct vectors some groups stay empty ("about" G
  groups); the caller masks empty groups (`group_sizes`). Non-finite weights are treated as 0.

  Args:
    unit_weights: (H, d) one row per unit (`hidden_unit_weights` gives kernel column + bias).
    num_groups: G (static int, 1 <= G <= H).
    iters: number of Lloyd iterations (static int >= 0).
    max_size: optional cap on a group's units (static int, ceil(H / G) <= max_size <= H); None:
      no cap.

  Returns:
    (H,) int32 assignment.
  """
  x = jnp.asarray(unit_weights)
  if x.ndim != 2:
    raise CljaxError(f"unit_weights must have shape (n_units, d), got {x.shape}.")
  _check_counts(x.shape[0], num_groups)
  if not is_int(iters) or iters < 0:
    raise CljaxError(f"iters must be an int >= 0, got {iters!r}.")
  check_max_size(max_size, x.shape[0], num_groups)
  x = x.astype(jnp.result_type(x, jnp.float32))
  x = jnp.where(jnp.isfinite(x), x, 0.0)
  n = x.shape[0]

  def add_centre(k, state):
    centres, nearest = state
    idx = jnp.argmax(nearest)
    centres = centres.at[k].set(x[idx])
    d = jnp.sum(jnp.square(x - x[idx]), -1)
    return centres, jnp.minimum(nearest, d)

  first_d = jnp.sum(jnp.square(x - jnp.mean(x, 0)), -1)
  centres = jnp.zeros((num_groups, x.shape[1]), x.dtype)
  # Step 1 with `nearest` starting at the distances to the mean: the first pick is the farthest.
  centres, _ = jax.lax.fori_loop(0, num_groups, add_centre, (centres, first_d))

  def lloyd(_, centres):
    d = _sq_distances(x, centres)
    assign = jnp.argmin(d, axis=1)
    onehot = jax.nn.one_hot(assign, num_groups, dtype=x.dtype)  # (n, G)
    counts = jnp.sum(onehot, 0)
    sums = jnp.matmul(onehot.T, x, precision=_HIGHEST)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    empty = counts == 0
    own = jnp.take_along_axis(d, assign[:, None], 1)[:, 0]
    far = jnp.argsort(-own, stable=True)  # farthest units first
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, n - 1)
    return jnp.where(empty[:, None], x[far[rank]], means)

  centres = jax.lax.fori_loop(0, iters, lloyd, centres)
  d = _sq_distances(x, centres)
  if max_size is None or max_size >= n:
    return jnp.argmin(d, axis=1).astype(jnp.int32)
  return _capped_assignment(d, max_size)


def check_max_size(max_size: object, n_units: int, num_groups: int) -> None:
  """Refuse a group-size cap that is not an int in [ceil(H / G), H] (None: no cap)."""
  if max_size is None:
    return
  least = -(-n_units // num_groups)
  if not is_int(max_size) or not least <= max_size <= n_units:
    raise CljaxError(
      f"max_size must be an int in [ceil(H / G), H] = [{least}, {n_units}] (G groups must hold "
      f"all {n_units} units), got {max_size!r}."
    )


def _capped_assignment(d: jax.Array, max_size: int) -> jax.Array:
  """Greedy nearest-centre assignment with at most max_size units per group; d (H, G)."""
  n, num_groups = d.shape
  order = jnp.argsort(d.reshape(-1), stable=True)  # row-major: ties go to lower unit, centre

  def place(i, state):
    assign, counts = state
    unit, group = order[i] // num_groups, order[i] % num_groups
    ok = (assign[unit] < 0) & (counts[group] < max_size)
    assign = assign.at[unit].set(jnp.where(ok, group, assign[unit]))
    return assign, counts.at[group].add(ok.astype(counts.dtype))

  start = (jnp.full((n,), -1, jnp.int32), jnp.zeros((num_groups,), jnp.int32))
  assign, _ = jax.lax.fori_loop(0, n * num_groups, place, start)
  return assign


def group_sizes(assignment: jax.Array, num_groups: int) -> jax.Array:
  """(G,) int32 number of units in each group (values outside [0, G) are not counted)."""
  assignment = jnp.asarray(assignment)
  if assignment.ndim != 1:
    raise CljaxError(f"assignment must have shape (n_units,), got {assignment.shape}.")
  if not is_int(num_groups) or num_groups < 1:
    raise CljaxError(f"num_groups must be an int >= 1, got {num_groups!r}.")
  return jnp.sum(jax.nn.one_hot(assignment, num_groups, dtype=jnp.int32), axis=0)


# --------------------------------------------------------------------------------------------
# The MLP's layers.


def mlp_layers(params: PyTree) -> list[str]:
  """Layer names [hidden_0, ..., hidden_{L-1}, out] of a cljax MLP params tree; else CljaxError."""
  if not isinstance(params, Mapping):
    raise CljaxError(f"params must be an MLP's params dict, got {type(params).__name__}.")
  if "params" in params and len(params) == 1:
    raise CljaxError("got the variables dict: pass variables['params'].")
  keys = set(params)
  n_hidden = sum(1 for k in keys if isinstance(k, str) and k.startswith("hidden_"))
  names = [f"hidden_{i}" for i in range(n_hidden)] + ["out"]
  if n_hidden < 1 or keys != set(names):
    raise CljaxError(
      "params must be a cljax MLP's (`cljax.models.MLP`): layers hidden_0, ..., hidden_{L-1} "
      f"(L >= 1) and out; got layers {sorted(map(str, keys))}."
    )
  width = None
  for name in names:
    layer = params[name]
    if not isinstance(layer, Mapping) or set(layer) != {"kernel", "bias"}:
      got = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
      raise CljaxError(f"layer {name} must hold exactly 'kernel' and 'bias', got {got}.")
    k_shape, b_shape = np.shape(layer["kernel"]), np.shape(layer["bias"])
    if len(k_shape) != 2 or b_shape != (k_shape[1],):
      raise CljaxError(
        f"layer {name} must have kernel (in, out) and bias (out,); got {k_shape} and {b_shape}."
      )
    if width is not None and k_shape[0] != width:
      raise CljaxError(f"layer {name} reads {k_shape[0]} inputs but the layer before has {width}.")
    width = k_shape[1]
  return names


def check_assignments(
  names: list[str], params: PyTree, assignments: Sequence[jax.Array], num_groups: int
) -> list[jax.Array]:
  """The assignments as int32 arrays, one (H_l,) per hidden layer, in [0, num_groups)."""
  n_hidden = len(names) - 1
  if isinstance(assignments, jax.Array | np.ndarray) or len(assignments) != n_hidden:
    got = len(assignments) if isinstance(assignments, Sequence) else type(assignments).__name__
    raise CljaxError(
      f"assignments must be a list with one (H_l,) array per hidden layer ({n_hidden}), got {got}."
    )
  out = []
  for li, a in enumerate(assignments):
    a = jnp.asarray(a)
    h = np.shape(params[names[li]]["bias"])[0]
    if a.shape != (h,) or not jnp.issubdtype(a.dtype, jnp.integer):
      raise CljaxError(
        f"assignments[{li}] must be an int array of shape ({h},) for hidden_{li}; got {a.dtype} "
        f"{a.shape}."
      )
    concrete = concrete_value(a)
    if concrete is not None and (concrete.min() < 0 or concrete.max() >= num_groups):
      raise CljaxError(
        f"assignments[{li}] values must be in [0, {num_groups}), got {concrete.min()} to "
        f"{concrete.max()}."
      )
    out.append(a)
  return out


def hidden_unit_weights(params: PyTree) -> list[jax.Array]:
  """Each hidden layer's unit vectors: for hidden_l, (H_l, in_l + 1) = [kernel[:, j], bias[j]]."""
  names = mlp_layers(params)
  return [
    jnp.concatenate([params[n]["kernel"].T, params[n]["bias"][:, None]], axis=1) for n in names[:-1]
  ]


def make_groupings(
  params: PyTree,
  num_groups: int,
  *,
  method: str = "cluster",
  key: jax.Array | None = None,
  iters: int = 20,
  max_size: int | None = None,
) -> list[jax.Array]:
  """One assignment per hidden layer of an MLP (after task 0).

  method: "random" (`random_groups`, one key per layer split from key), "unit" (`unit_groups`;
  num_groups must then be the widest layer's size, so h is (L, G)), or "cluster" (`cluster_groups`
  of `hidden_unit_weights`, iters Lloyd iterations, at most max_size units per group).
  """
  names = mlp_layers(params)
  widths = [int(np.shape(params[n]["bias"])[0]) for n in names[:-1]]
  if method not in GROUPING_METHODS:
    raise CljaxError(f"method must be one of {GROUPING_METHODS}, got {method!r}.")
  if method == "unit":
    if num_groups != max(widths):
      raise CljaxError(
        f"unit groups make one group per unit: num_groups must be {max(widths)} (the widest "
        f"hidden layer), got {num_groups!r}."
      )
    return [unit_groups(w) for w in widths]
  if method == "random":
    if key is None:
      raise CljaxError("method='random' needs a PRNG key.")
    keys = jax.random.split(key, len(widths))
    return [random_groups(k, w, num_groups) for k, w in zip(keys, widths, strict=True)]
  return [cluster_groups(u, num_groups, iters, max_size) for u in hidden_unit_weights(params)]


# --------------------------------------------------------------------------------------------
# Constraint-row weights.


def group_param_weights(
  params: PyTree, assignments: Sequence[jax.Array], h: jax.Array, *, bias_once: bool = False
) -> PyTree:
  """The per-parameter weights w with rest + sum_{l,k} h[l, k] row (l, k) = g * w (elementwise).

    w[hidden_0] = 1 (kernel and bias)
    w[layer l+1].kernel[j, :] = h[l, assignment_l[j]]
    w[layer l+1].bias = sum_{k : group k of layer l non-empty} h[l, k]   (1 with bias_once)

  where layer l+1 is hidden_{l+1}, or out for l = L-1. Memory O(p + L G): no (rows, p) matrix.
  Under jit, assignment values outside [0, G) get weight 0 (as in `dense_group_rows`); concrete
  ones are refused.

  Args:
    params: an MLP's params (or a gradient of them): {"hidden_0", ..., "out"}; only shapes and
      dtypes are read.
    assignments: one (H_l,) int array per hidden layer, values in [0, G).
    h: (L, G) multipliers of one past task (`relatedness.transform_relatedness`); vmap over
      a leading task axis for all of them.
    bias_once: count the biases of layers 1..L once (weight 1), not once per non-empty group.

  Returns:
    A pytree like params, each leaf in that leaf's dtype.
  """
  names = mlp_layers(params)
  h = jnp.asarray(h)
  n_hidden = len(names) - 1
  if h.ndim != 2 or h.shape[0] != n_hidden:
    raise CljaxError(f"h must have shape (L, G) with L = {n_hidden} hidden layers, got {h.shape}.")
  num_groups = h.shape[1]
  assignments = check_assignments(names, params, assignments, num_groups)
  first = params[names[0]]
  weights = {names[0]: jax.tree.map(lambda p: jnp.ones(np.shape(p), p.dtype), first)}
  for li, a in enumerate(assignments):
    layer = params[names[li + 1]]
    k_dtype, b_dtype = layer["kernel"].dtype, layer["bias"].dtype
    in_range = (a >= 0) & (a < num_groups)
    row_w = jnp.where(in_range, h[li][jnp.clip(a, 0, num_groups - 1)], 0.0)  # (H_l,)
    kernel = jnp.broadcast_to(row_w[:, None], np.shape(layer["kernel"])).astype(k_dtype)
    if bias_once:
      bias_w = jnp.ones((), b_dtype)
    else:
      nonempty = group_sizes(a, num_groups) > 0
      bias_w = jnp.sum(jnp.where(nonempty, h[li], 0.0))
    bias = jnp.broadcast_to(bias_w, np.shape(layer["bias"])).astype(b_dtype)
    weights[names[li + 1]] = {"kernel": kernel, "bias": bias}
  return weights


def dense_group_rows(
  grad: PyTree,
  assignments: Sequence[jax.Array],
  num_groups: int,
  *,
  bias_once: bool = False,
  max_bytes: int = DEFAULT_MAX_BYTES,
) -> jax.Array:
  """The 1 + L G rows of one task's gradient, dense: a reference for tests and benchmarks.

  Row 0 is the rest row, row 1 + l G + k the row of group k of hidden layer l (zero when the group
  is empty), each in the order of `jax.flatten_util.ravel_pytree(grad)`. Row (l, k) holds layer
  l+1's kernel rows j with assignment_l[j] = k and, unless bias_once, layer l+1's whole bias when
  group k is not empty; with bias_once the biases of layers 1..L are in the rest row instead.
  So rest + sum_{l,k} h[l, k] row (l, k) = ravel(grad * group_param_weights(grad, ..., h)).

  Args:
    grad: a gradient of an MLP's params (any such pytree).
    assignments: one (H_l,) int array per hidden layer, values in [0, num_groups).
    num_groups: G (static int >= 1).
    bias_once: as `group_param_weights`.
    max_bytes: refuse (CljaxError) when the (1 + L G, p) result would take more bytes than this.

  Returns:
    (1 + L G, p) array in ravel_pytree's dtype.
  """
  names = mlp_layers(grad)
  if not is_int(num_groups) or num_groups < 1:
    raise CljaxError(f"num_groups must be an int >= 1, got {num_groups!r}.")
  assignments = check_assignments(names, grad, assignments, num_groups)
  n_hidden = len(names) - 1
  n_rows = 1 + n_hidden * num_groups
  leaves = jax.tree.leaves(grad)
  p = sum(int(np.prod(np.shape(x))) for x in leaves)
  itemsize = jnp.dtype(jnp.result_type(*leaves)).itemsize
  need = n_rows * p * itemsize
  if need > max_bytes:
    raise CljaxError(
      f"dense group rows would take {need:,} bytes ({n_rows} rows x {p:,} parameters x "
      f"{itemsize} bytes), over max_bytes = {max_bytes:,}. Use group_param_weights, which needs "
      "O(p + groups) memory, or pass a larger max_bytes."
    )

  def zeros_rows(tree):
    return jax.tree.map(lambda x: jnp.zeros((n_rows, *np.shape(x)), x.dtype), tree)

  rows = {name: zeros_rows(grad[name]) for name in names}
  first = grad[names[0]]
  rows[names[0]] = jax.tree.map(lambda r, x: r.at[0].set(x), rows[names[0]], first)
  for li, a in enumerate(assignments):
    name = names[li + 1]
    kernel, bias = grad[name]["kernel"], grad[name]["bias"]
    member = jax.nn.one_hot(a, num_groups, dtype=kernel.dtype).T  # (G, H_l): unit j in group k
    start = 1 + li * num_groups
    block = member[:, :, None] * kernel[None]  # (G, H_l, out)
    rows[name]["kernel"] = rows[name]["kernel"].at[start : start + num_groups].set(block)
    if bias_once:
      rows[name]["bias"] = rows[name]["bias"].at[0].set(bias)
    else:
      nonempty = (jnp.sum(member, axis=1) > 0).astype(bias.dtype)  # (G,)
      rows[name]["bias"] = (
        rows[name]["bias"].at[start : start + num_groups].set(nonempty[:, None] * bias[None])
      )
  return jax.vmap(lambda row: ravel_pytree(row)[0])(rows)
