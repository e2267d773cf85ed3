"""Grouped GEM's constraint rows from per-example gradient factors, without forming any row.

Past task i's Grouped GEM row is row_i = g_i * w_i (elementwise), with g_i = sum_e S_ie grad l_e
its memory gradient (S: (T, E) weights over E memory examples) and w_i =
`cljax.grouped.groups.group_param_weights(params, assignments, h[i])`: 1 on hidden_0; h[i, l,
assignment_l[j]] on kernel row j of layer l+1 (the layer that reads hidden layer l); beta_{i,l} =
sum_k h[i, l, k] over the non-empty groups k (or 1 with bias_once) on layer l+1's bias.

w_i scales only kernel ROWS (a layer's inputs) and the bias, so with the factors of
`cljax.example_grads` (grad W = a d', grad b = d) example e's weighted gradient at layer l+1 is

    w_i * grad l_e = {W: (u_e * a_e) d_e',  b: beta_e d_e},   u_e = h[i, l, assignment_l]  (n_in,)

and everything GEM needs comes from scaled factors, O(E (n_in + n_out)) numbers per layer:

    scaled_gram           K^w_ef = sum_l ((u_e * a_e).(u_f * a_f) + beta_e beta_f)(d_e.d_f)
    scaled_weighted_grad  sum_e c_e w_e * grad l_e = {W: (U * A)' (c * D), b: D' (c * beta)}
    grouped_terms         P_ik = <row_i, row_k> = (S K^w S')_ik,  q_i = <g, row_i>
    grouped_row_sum       sum_i v_i row_i = scaled_weighted_grad(c = S'v)

(u = 1 and beta = 1 on hidden_0). The one assumption: every example belongs to exactly one task's
row, S_ie = 0 unless e is an example of task i, so that an example's scales are those of ITS task
(`example_scales` takes each example's task; `grouped_terms` and `grouped_row_sum` check S against
it). Then row_i = sum_e S_ie (w_{task(e)} * grad l_e), and P needs no (T, p) or (groups, p) array.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax.errors import CljaxError, concrete_value
from cljax.example_grads import ExampleGrads, Path, has_bias, path_names
from cljax.grouped.groups import check_assignments, group_sizes, mlp_layers

PyTree = Any


class Scales(NamedTuple):
  """Each example's Grouped GEM weights at the grouped layers (dicts keyed by Dense layer path).

  inputs[path]: (E, n_in) u_e, the weight of each kernel row (input unit) of that layer;
  bias[path]: (E,) beta_e, the weight of that layer's bias; task: (E,) int, each example's task.
  Layers absent from the dicts (hidden_0) have weight 1.
  """

  inputs: dict[Path, jax.Array]
  bias: dict[Path, jax.Array]
  task: jax.Array


def example_scales(
  params: PyTree,
  assignments: Sequence[jax.Array],
  h: jax.Array,
  task_of_example: jax.Array,
  *,
  bias_once: bool = False,
) -> Scales:
  """Each example's weights w_{task(e)} of `group_param_weights`, kept per kernel row and bias.

    inputs[(layer l+1,)][e, j] = h[task_e, l, assignment_l[j]]
    bias[(layer l+1,)][e] = sum_{k : group k of layer l not empty} h[task_e, l, k]

  (bias 1 with bias_once) for hidden layers l = 0..L-1 (layer l+1 is hidden_{l+1}, or out for
  l = L-1). Assignment values outside [0, G) get weight 0, as in `group_param_weights`; so does,
  under jit, an example whose task is outside [0, T) (everywhere but hidden_0). Concrete values
  out of range are refused. Memory O(E sum_l H_l).

  Args:
    params: a cljax MLP's params (only shapes are read).
    assignments: one (H_l,) int array per hidden layer, values in [0, G).
    h: (T, L, G) multipliers of the past tasks (`cljax.grouped.relatedness.transform_relatedness`).
    task_of_example: (E,) int, the task of each memory example (e.g. jnp.repeat(jnp.arange(T), M)
      for a (T, M) memory flattened task by task).
    bias_once: as `group_param_weights`.

  Returns:
    Scales keyed by the Dense paths ("hidden_1",), ..., ("out",), in h's float dtype (>= float32).
  """
  names = mlp_layers(params)
  n_hidden = len(names) - 1
  h = jnp.asarray(h)
  if h.ndim != 3 or h.shape[1] != n_hidden:
    raise CljaxError(
      f"h must have shape (T, L, G) with L = {n_hidden} hidden layers, got {h.shape}."
    )
  num_tasks, _, num_groups = h.shape
  assignments = check_assignments(names, params, assignments, num_groups)
  task = jnp.asarray(task_of_example)
  if task.ndim != 1 or not jnp.issubdtype(task.dtype, jnp.integer):
    raise CljaxError(f"task_of_example must be an (E,) int array, got {task.dtype} {task.shape}.")
  concrete = concrete_value(task)
  if concrete is not None and concrete.size and (concrete.min() < 0 or concrete.max() >= num_tasks):
    raise CljaxError(
      f"task_of_example values must be in [0, {num_tasks}) (h has {num_tasks} tasks), got "
      f"{concrete.min()} to {concrete.max()}."
    )
  dtype = jnp.result_type(h.dtype, jnp.float32)
  h = h.astype(dtype)
  known = (task >= 0) & (task < num_tasks)
  safe = jnp.clip(task, 0, num_tasks - 1)
  inputs, bias = {}, {}
  for li, a in enumerate(assignments):
    in_range = (a >= 0) & (a < num_groups)
    row_w = jnp.where(in_range, h[:, li][:, jnp.clip(a, 0, num_groups - 1)], 0.0)  # (T, H_l)
    if bias_once:
      bias_w = jnp.ones((num_tasks,), dtype)
    else:
      nonempty = group_sizes(a, num_groups) > 0
      bias_w = jnp.sum(jnp.where(nonempty, h[:, li], 0.0), axis=1)  # (T,)
    path = (names[li + 1],)
    inputs[path] = jnp.where(known[:, None], row_w[safe], 0.0)
    bias[path] = jnp.where(known, bias_w[safe], 0.0)
  return Scales(inputs, bias, task)


def _check_scales(eg: ExampleGrads, scales: Scales, name: str) -> None:
  n = eg.loss.shape[0]
  if np.shape(scales.task) != (n,):
    raise CljaxError(
      f"{name}: scales are for {np.shape(scales.task)} examples but the gradients hold {n}."
    )
  for path, u in scales.inputs.items():
    if path not in eg.inputs or path not in scales.bias:
      raise CljaxError(
        f"{name}: scales name layer {path}, which the gradients (layers {sorted(eg.inputs)}) or "
        "the bias scales lack: make both from the same MLP."
      )
    if np.shape(u) != np.shape(eg.inputs[path]) or np.shape(scales.bias[path]) != (n,):
      raise CljaxError(
        f"{name}: scales of layer {path} have shapes {np.shape(u)} and "
        f"{np.shape(scales.bias[path])}; the layer's inputs are {np.shape(eg.inputs[path])}."
      )


def _scaled_factors(params, eg, scales, path):
  """(u * A, beta) of one layer: (E, n_in) and (E,) or None (no bias); u = beta = 1 if absent."""
  A = eg.inputs[path]
  if not has_bias(params, path):
    beta = None
  elif scales is None or path not in scales.bias:
    beta = jnp.ones(A.shape[:1], A.dtype)
  else:
    beta = scales.bias[path].astype(A.dtype)
  if scales is not None and path in scales.inputs:
    A = A * scales.inputs[path].astype(A.dtype)
  return A, beta


def scaled_gram(
  params: PyTree,
  eg_a: ExampleGrads,
  scales_a: Scales,
  eg_b: ExampleGrads | None = None,
  scales_b: Scales | None = None,
) -> jax.Array:
  """K^w_ef = <w_e * grad l_e, w_f * grad l_f> for e in a, f in b: (E_a, E_b).

  K^w = sum over layers of ((U_a * A_a)(U_b * A_b)' + beta_a beta_b') * (D_a D_b'), the bias term
  dropped for a layer without one. Without eg_b, b = a with scales_a; with eg_b but no scales_b,
  b's examples are unweighted (w = 1: a current batch), so K^w_ef = <w_e * grad l_e, grad l_f>.
  params only tells which layers have a bias.
  """
  _check_scales(eg_a, scales_a, "scaled_gram (a)")
  if eg_b is None:
    if scales_b is not None:
      raise CljaxError("scaled_gram: scales_b was given without eg_b.")
    eg_b, scales_b = eg_a, scales_a
  elif scales_b is not None:
    _check_scales(eg_b, scales_b, "scaled_gram (b)")
  terms = []
  for path in eg_a.inputs:
    A, beta_a = _scaled_factors(params, eg_a, scales_a, path)
    B, beta_b = _scaled_factors(params, eg_b, scales_b, path)
    inner = A @ B.T
    if beta_a is not None:
      inner = inner + beta_a[:, None] * beta_b[None, :]
    terms.append(inner * (eg_a.deltas[path] @ eg_b.deltas[path].T))
  return sum(terms)


def scaled_weighted_grad(params: PyTree, eg: ExampleGrads, scales: Scales, c: jax.Array) -> PyTree:
  """sum_e c_e w_e * grad l_e as a pytree like params. c: (E,).

  W_l = (U_l * A_l)' (c * D_l), b_l = D_l' (c * beta_l); U = beta = 1 where scales have no entry.
  """
  _check_scales(eg, scales, "scaled_weighted_grad")

  def leaf(key_path, p):
    *layer, name = path_names(key_path)
    path = tuple(layer)
    A, beta = _scaled_factors(params, eg, scales, path)
    D = eg.deltas[path]
    cd = c[:, None].astype(D.dtype) * D
    if name == "kernel":
      return (A.T @ cd).astype(p.dtype)
    return (cd.T @ beta).astype(p.dtype)

  return jax.tree_util.tree_map_with_path(leaf, params)


def scaled_dots(params: PyTree, eg: ExampleGrads, scales: Scales, g: PyTree) -> jax.Array:
  """(E,) <g, w_e * grad l_e> for a pytree g like params.

  = sum over layers of (u_e * a_e)' g_{W_l} d_e + beta_e (d_e . g_{b_l}): E (n_in n_out) work.
  """
  _check_scales(eg, scales, "scaled_dots")
  terms = []
  for path, D in eg.deltas.items():
    A, beta = _scaled_factors(params, eg, scales, path)
    node = g
    for key in path:
      node = node[key]
    term = jnp.sum((A @ node["kernel"].astype(A.dtype)) * D, axis=1)
    if beta is not None:
      term = term + beta * (D @ node["bias"].astype(D.dtype))
    terms.append(term)
  return sum(terms)


def _row_weights(S: jax.Array, scales: Scales, name: str) -> jax.Array:
  """S (T, E) with the entries of examples outside their row's task set to 0; concrete: refused."""
  S = jnp.asarray(S)
  n = np.shape(scales.task)[0]
  if S.ndim != 2 or S.shape[1] != n:
    raise CljaxError(f"{name}: S must have shape (T, {n}) (one column per example), got {S.shape}.")
  own = scales.task[None, :] == jnp.arange(S.shape[0])[:, None]  # (T, E)
  s_c, own_c = concrete_value(S), concrete_value(own)
  if s_c is not None and own_c is not None and np.any((s_c != 0) & ~own_c):
    i, e = np.argwhere((s_c != 0) & ~own_c)[0]
    raise CljaxError(
      f"{name}: S[{i}, {e}] = {s_c[i, e]} but example {e} belongs to task "
      f"{np.asarray(scales.task)[e]}: each example may weigh only in its own task's row."
    )
  return jnp.where(own, S, 0.0)


def grouped_terms(
  params: PyTree,
  mem_eg: ExampleGrads,
  scales: Scales,
  S: jax.Array,
  g: ExampleGrads | PyTree,
) -> tuple[jax.Array, jax.Array]:
  """GEM's dual terms for the grouped rows row_i = (sum_e S_ie grad l_e) * w_i.

    P = S K^w S'                      (T, T), K^w = scaled_gram(mem_eg, scales)
    q_i = <g, row_i> = sum_e S_ie <g, w_e * grad l_e>          (T,)

  Args:
    params: the MLP's params (which layers have a bias; the structure of g).
    mem_eg: factors of the E memory examples' gradients (`cljax.example_grads.example_grads`).
    scales: `example_scales` of the same E examples.
    S: (T, E) row weights, S_ie = 0 unless example e is of task i (checked when concrete; under
      jit such entries are ignored).
    g: the current gradient: an ExampleGrads of a batch (g = the mean of its gradients, as the
      factored GEM step) or a pytree like params.

  Returns:
    (P, q): (T, T) and (T,).
  """
  S = _row_weights(S, scales, "grouped_terms")
  K = scaled_gram(params, mem_eg, scales)
  P = S @ K @ S.T
  if isinstance(g, ExampleGrads):
    dots = jnp.mean(scaled_gram(params, mem_eg, scales, g), axis=1)  # (E,)
  else:
    dots = scaled_dots(params, mem_eg, scales, g)
  return P, S @ dots


def grouped_row_sum(
  params: PyTree, mem_eg: ExampleGrads, scales: Scales, S: jax.Array, v: jax.Array
) -> PyTree:
  """sum_i v_i row_i = scaled_weighted_grad(c = S'v): GEM's G'v as a pytree like params. v: (T,)."""
  S = _row_weights(S, scales, "grouped_row_sum")
  return scaled_weighted_grad(params, mem_eg, scales, S.T @ v)
