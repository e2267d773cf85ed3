"""cljax.grouped.rows against Grouped GEM's rows formed densely (jax.grad, group_param_weights)."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from numerics import sum_atol

from cljax.errors import CljaxError
from cljax.example_grads import example_grads, gram, weighted_grad
from cljax.grouped.groups import group_param_weights
from cljax.grouped.rows import (
  example_scales,
  grouped_row_sum,
  grouped_terms,
  scaled_dots,
  scaled_gram,
  scaled_weighted_grad,
)
from cljax.models import make_mlp

T, M, G, B = 3, 4, 3, 5  # tasks, memory slots per task, groups, current batch size
# Elementwise products of h (a handful of float32 roundings, each <= u = 6e-8 relative).
SCALE_RTOL = 1e-6


class Net(nn.Module):
  """A cljax-MLP-shaped network (hidden_0, ..., out) with hidden layers of different widths."""

  widths: tuple[int, ...]
  n_outputs: int

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.relu(nn.Dense(w, bias_init=nn.initializers.normal(0.5), name=f"hidden_{i}")(x))
    return nn.Dense(self.n_outputs, bias_init=nn.initializers.normal(0.5), name="out")(x)


MODELS = {
  "2 hidden (6, 5)": (Net((6, 5), 3), (6, 5)),
  "1 hidden": (make_mlp(6, 1, 3, "torch", n_inputs=12), (6,)),
  "3 hidden": (make_mlp(5, 3, 3, "torch", n_inputs=12), (5, 5, 5)),
}


def _assignment(width, layer):
  """Units dealt to 2 of the G = 3 groups: group (layer + 2) % 3 is empty."""
  used = [k for k in range(G) if k != (layer + 2) % G]
  return jnp.asarray([used[j % 2] for j in range(width)], jnp.int32)


@functools.cache
def _problem(name):
  """Params, memory (T * M examples, task by task), a batch, h, S and the factors: made once."""
  model, widths = MODELS[name]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((T * M, 12)).astype(np.float32)
  y = rng.integers(0, 3, T * M).astype(np.int32)
  xb = rng.standard_normal((B, 12)).astype(np.float32)
  yb = rng.integers(0, 3, B).astype(np.int32)
  h = rng.uniform(0.2, 2.0, (T, len(widths), G)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
  filled = np.ones((T, M), bool)
  filled[1, 3] = filled[2, 1:] = False  # empty slots weigh 0
  S = np.eye(T)[:, :, None] * (filled / filled.sum(1, keepdims=True))[None]
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  factors = jax.jit(example_grads, static_argnums=0)
  return dict(
    apply=apply, params=params, x=x, y=y, xb=xb, yb=yb, h=jnp.asarray(h),
    task=jnp.repeat(jnp.arange(T), M), S=jnp.asarray(S.reshape(T, T * M), jnp.float32),
    assignments=[_assignment(w, li) for li, w in enumerate(widths)],
    mem=factors(apply, params, x, y), batch=factors(apply, params, xb, yb),
  )  # fmt: skip


def _dense(pb, bias_once):
  """(T, p) rows g_i * w_i, the current gradient (p,), and ravel's unravel."""
  params, apply = pb["params"], pb["apply"]

  def loss(p, x, y, w):
    return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y))

  def row(s, h_i):
    g_i = jax.grad(loss)(params, pb["x"], pb["y"], s)
    w_i = group_param_weights(params, pb["assignments"], h_i, bias_once=bias_once)
    return ravel_pytree(jax.tree.map(jnp.multiply, g_i, w_i))[0]

  R = jnp.stack([row(pb["S"][i], pb["h"][i]) for i in range(T)])
  g = jax.grad(loss)(params, pb["xb"], pb["yb"], jnp.full((B,), 1.0 / B))
  flat_g, unravel = ravel_pytree(g)
  return R, flat_g, g, unravel


def _factors(pb):
  return pb["mem"], pb["batch"]


@functools.cache
def _abs_grads(name):
  """|g_e| (float64) of each memory example (E, p) and of each current-batch example (B, p)."""
  pb = _problem(name)
  params, apply = pb["params"], pb["apply"]

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x[None]), y[None])[0]

  def per_example(x, y):
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    return np.abs(np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(grads), np.float64))

  return per_example(pb["x"], pb["y"]), per_example(pb["xb"], pb["yb"])


def _abs_weights(pb, h, bias_once=False):
  """|w_i| (float64, flattened like ravel_pytree) for each h[i]: (len(h), p)."""
  weights = [
    ravel_pytree(group_param_weights(pb["params"], pb["assignments"], hi, bias_once=bias_once))[0]
    for hi in h
  ]
  return np.abs(np.asarray(jnp.stack(weights), np.float64))


def _bounds(name, h, S, v, bias_once=False):
  """Rounding bounds (atol) for two programs' P, q and v'R of the rows S with multipliers h.

  Both the dense rows r_i = sum_e S_ie w_i * g_e and the factored path (per-example Grams of the
  layer factors) sum the same products, so each entry's error is below `sum_atol` of the sum of
  their absolute values:
    A_ik = sum_e |S_ie| |w_ik g_ek|     (the rows' absolute sums, n_rows x p)
    P_ij: sum_k A_ik A_jk, n = p E^2;  q_i: sum_k A_ik |g|_k, n = p E B;
    (v'R)_k: |v|'A, n = n_rows E
  with |g|_k = mean_b |g_bk| over the current batch.
  """
  mem, cur = _abs_grads(name)
  W = _abs_weights(_problem(name), h, bias_once)
  A = np.abs(np.asarray(S, np.float64)) @ mem * W
  E, p = mem.shape
  return dict(
    P=sum_atol(A @ A.T, p * E * E),
    q=sum_atol(A @ cur.mean(0), p * E * B),
    update=sum_atol(np.abs(np.asarray(v, np.float64)) @ A, len(S) * E),
  )


@pytest.mark.parametrize("bias_once", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_terms_and_update_equal_dense_rows(name, bias_once):
  pb = _problem(name)
  params = pb["params"]
  v = jnp.array([0.7, -0.3, 1.5])

  @jax.jit  # one compilation instead of many small eager ones
  def both(h, S):
    R, flat_g, g, _ = _dense({**pb, "h": h, "S": S}, bias_once)
    mem, batch = _factors(pb)
    scales = example_scales(params, pb["assignments"], h, pb["task"], bias_once=bias_once)
    P, q = grouped_terms(params, mem, scales, S, batch)
    _, q_tree = grouped_terms(params, mem, scales, S, g)  # the current gradient as a pytree
    update = grouped_row_sum(params, mem, scales, S, v)
    assert jax.tree.structure(update) == jax.tree.structure(params)
    return R, flat_g, P, q, q_tree, ravel_pytree(update)[0]

  R, flat_g, P, q, q_tree, update = both(pb["h"], pb["S"])
  atol = _bounds(name, pb["h"], pb["S"], v, bias_once)  # two programs: rounding bounds
  np.testing.assert_allclose(P, R @ R.T, rtol=0, atol=atol["P"])
  np.testing.assert_allclose(q, R @ flat_g, rtol=0, atol=atol["q"])
  np.testing.assert_allclose(q_tree, R @ flat_g, rtol=0, atol=atol["q"])
  np.testing.assert_allclose(update, v @ R, rtol=0, atol=atol["update"])


@pytest.mark.parametrize("bias_once", [False, True])
def test_scales_are_the_group_param_weights_of_each_examples_task(bias_once):
  pb = _problem("2 hidden (6, 5)")
  scales = example_scales(pb["params"], pb["assignments"], pb["h"], pb["task"], bias_once=bias_once)
  assert set(scales.inputs) == set(scales.bias) == {("hidden_1",), ("out",)}
  for i in range(T):
    w = group_param_weights(pb["params"], pb["assignments"], pb["h"][i], bias_once=bias_once)
    mine = np.asarray(pb["task"]) == i
    for (layer,), u in scales.inputs.items():
      want = np.tile(w[layer]["kernel"][:, 0], (M, 1))
      np.testing.assert_allclose(u[mine], want, rtol=SCALE_RTOL)
      np.testing.assert_allclose(scales.bias[(layer,)][mine], w[layer]["bias"][0], rtol=SCALE_RTOL)


@pytest.mark.parametrize("name", ["2 hidden (6, 5)", "1 hidden"])
def test_all_ones_h_with_bias_once_is_plain_gem(name):
  pb = _problem(name)
  params, S = pb["params"], pb["S"]
  mem, batch = _factors(pb)
  h = jnp.ones_like(pb["h"])
  scales = example_scales(params, pb["assignments"], h, pb["task"], bias_once=True)
  P, q = grouped_terms(params, mem, scales, S, batch)
  c = jnp.linspace(-1.0, 1.0, T * M)
  # Two programs: the bounds of _bounds (with h = 1); the per-example Gram is P's with S = I
  # (T M rows), the weighted gradient v'R's with the rows e and v = c.
  atol = _bounds(name, h, S, c[:T], bias_once=True)
  np.testing.assert_allclose(P, S @ gram(params, mem) @ S.T, rtol=0, atol=atol["P"])
  np.testing.assert_allclose(q, S @ jnp.mean(gram(params, mem, batch), 1), rtol=0, atol=atol["q"])
  per_example = _bounds(name, jnp.ones((T * M, *h.shape[1:])), np.eye(T * M), c, bias_once=True)
  np.testing.assert_allclose(
    scaled_gram(params, mem, scales), gram(params, mem), rtol=0, atol=per_example["P"]
  )
  np.testing.assert_allclose(
    ravel_pytree(scaled_weighted_grad(params, mem, scales, c))[0],
    ravel_pytree(weighted_grad(params, mem, c))[0],
    rtol=0,
    atol=per_example["update"],
  )
  # Without bias_once, each grouped bias counts once per non-empty group (2 of the 3 here).
  doubled = example_scales(params, pb["assignments"], h, pb["task"])
  for beta in doubled.bias.values():
    np.testing.assert_array_equal(beta, 2.0)


def test_scaled_dots_and_cross_gram_are_per_example_dots():
  pb = _problem("2 hidden (6, 5)")
  params = pb["params"]
  mem, batch = _factors(pb)

  @jax.jit
  def dots(h):
    scales = example_scales(params, pb["assignments"], h, pb["task"])
    # Column 0 of the cross Gram with one unweighted example is <w_e * grad l_e, grad l_0>.
    one = example_grads(pb["apply"], params, pb["xb"][:1], pb["yb"][:1])
    g_0 = weighted_grad(params, one, jnp.ones((1,)))
    assert scaled_gram(params, mem, scales, batch).shape == (T * M, B)
    return scaled_gram(params, mem, scales, one)[:, 0], scaled_dots(params, mem, scales, g_0)

  # Two programs summing the p products w_e g_e * g_0 of each entry e.
  mem_abs, cur_abs = _abs_grads("2 hidden (6, 5)")
  W = _abs_weights(pb, pb["h"][np.asarray(pb["task"])])
  atol = sum_atol((mem_abs * W) @ cur_abs[0], mem_abs.shape[1])
  np.testing.assert_allclose(*dots(pb["h"]), rtol=0, atol=atol)


def test_jit_and_vmap_over_h():
  pb = _problem("2 hidden (6, 5)")
  params, S, assignments = pb["params"], pb["S"], pb["assignments"]
  mem, batch = _factors(pb)
  v = jnp.array([0.5, 1.0, -2.0])

  def terms(h, task):
    scales = example_scales(params, assignments, h, task)
    P, q = grouped_terms(params, mem, scales, S, batch)
    return P, q, ravel_pytree(grouped_row_sum(params, mem, scales, S, v))[0]

  def atols(h):  # jit, vmap and eager are different programs: the rounding bounds
    bounds = _bounds("2 hidden (6, 5)", h, S, v)
    return bounds["P"], bounds["q"], bounds["update"]

  eager = terms(pb["h"], pb["task"])
  pairs = zip(jax.jit(terms)(pb["h"], pb["task"]), eager, atols(pb["h"]), strict=True)
  for got, want, atol in pairs:
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
  hs = jnp.stack([pb["h"], 2.0 * pb["h"][::-1]])
  batched = jax.vmap(terms, in_axes=(0, None))(hs, pb["task"])
  for k in range(2):
    for got, want, atol in zip(batched, terms(hs[k], pb["task"]), atols(hs[k]), strict=True):
      np.testing.assert_allclose(got[k], want, rtol=0, atol=atol)


def test_under_jit_off_task_weights_and_unknown_tasks_are_ignored():
  pb = _problem("1 hidden")
  params, S, assignments = pb["params"], pb["S"], pb["assignments"]
  mem, batch = _factors(pb)
  scales = example_scales(params, assignments, pb["h"], pb["task"])
  bad_S = S.at[0, M].set(5.0)  # example M is task 1's
  terms = jax.jit(lambda S: grouped_terms(params, mem, scales, S, batch))
  # The same compiled program on both: the ignored weight must not change a bit.
  for got, want in zip(terms(bad_S), terms(S), strict=True):
    np.testing.assert_array_equal(got, want)
  task = pb["task"].at[0].set(T)
  traced = jax.jit(lambda t: example_scales(params, assignments, pb["h"], t))(task)
  for u in traced.inputs.values():
    np.testing.assert_array_equal(u[0], 0.0)


def test_no_task_by_parameter_arrays():
  # A wider MLP: any (T, p) or (groups, kernel) array would exceed the largest kernel's size.
  model = make_mlp(40, 2, 10, n_inputs=200)
  x = jnp.ones((T * M, 200))
  y = jnp.zeros((T * M,), jnp.int32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  assignments = [jnp.arange(40, dtype=jnp.int32) % G] * 2
  S = jnp.repeat(jnp.eye(T), M, axis=1) / M
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731

  def step(h):
    mem = example_grads(apply, params, x, y)
    scales = example_scales(params, assignments, h, jnp.repeat(jnp.arange(T), M))
    P, q = grouped_terms(params, mem, scales, S, example_grads(apply, params, x[:B], y[:B]))
    return P, q, grouped_row_sum(params, mem, scales, S, q)

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from sizes(sub)

  jaxpr = jax.make_jaxpr(step)(jnp.ones((T, 2, G))).jaxpr
  assert max(sizes(jaxpr)) == 200 * 40  # hidden_0's kernel (the update's largest leaf)


def test_bad_input_is_refused():
  pb = _problem("2 hidden (6, 5)")
  params, assignments, h, task = pb["params"], pb["assignments"], pb["h"], pb["task"]
  mem, batch = _factors(pb)
  with pytest.raises(CljaxError, match=r"task_of_example values must be in \[0, 3\)"):
    example_scales(params, assignments, h, task.at[2].set(3))
  with pytest.raises(CljaxError, match="task_of_example must be an"):
    example_scales(params, assignments, h, task.astype(jnp.float32))
  with pytest.raises(CljaxError, match=r"h must have shape \(T, L, G\) with L = 2"):
    example_scales(params, assignments, h[0], task)
  with pytest.raises(CljaxError, match=r"h must have shape \(T, L, G\) with L = 2"):
    example_scales(params, assignments, h[:, :1], task)
  with pytest.raises(CljaxError, match=r"one .* array per hidden layer"):
    example_scales(params, assignments[:1], h, task)
  with pytest.raises(CljaxError, match=r"assignments\[1\] must be an int array of shape \(5,\)"):
    example_scales(params, [assignments[0], assignments[0]], h, task)
  with pytest.raises(CljaxError, match=r"assignments\[0\] values must be in \[0, 3\)"):
    example_scales(params, [assignments[0].at[0].set(3), assignments[1]], h, task)
  scales = example_scales(params, assignments, h, task)
  with pytest.raises(CljaxError, match="belongs to task 1"):
    grouped_terms(params, mem, scales, pb["S"].at[0, M].set(1.0), batch)
  with pytest.raises(CljaxError, match=r"S must have shape \(T, 12\)"):
    grouped_row_sum(params, mem, scales, pb["S"][:, :-1], jnp.ones((T,)))
  with pytest.raises(CljaxError, match="scales are for"):
    scaled_gram(params, batch, scales)
  with pytest.raises(CljaxError, match="scales_b was given without eg_b"):
    scaled_gram(params, mem, scales, scales_b=scales)
