"""cljax.example_grads against per-example gradients formed explicitly (vmap of jax.grad)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.errors import CljaxError
from cljax.example_grads import example_grads, gram, weighted_grad
from cljax.models import make_mlp
from cljax.projections import gem_dual, gem_project, ravel


def _setup(model, n_inputs, E, seed=0):
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.uniform(kx, (E, n_inputs))
  y = jax.random.randint(ky, (E,), 0, 5)
  params = model.init(kp, x[:1])["params"]
  return params, x, y


def _explicit_rows(model, params, x, y):
  """(E, p) per-example gradients of the cross-entropy, the reference."""

  def loss(p, xi, yi):
    logits = model.apply({"params": p}, xi[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

  grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
  return jax.vmap(lambda g: ravel(g)[0])(grads)


def _apply(model):
  return lambda p, x: model.apply({"params": p}, x)


class NoBias(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(6, use_bias=False, name="a")(x))
    return nn.Dense(5, name="b")(x)


_MODELS = [
  (make_mlp(7, 2, n_outputs=5, n_inputs=12), 12),
  (make_mlp(4, 1, 5, "torch", n_inputs=9), 9),
  (NoBias(), 8),
]


@pytest.mark.parametrize("model,n_inputs", _MODELS)
def test_gram_dots_and_weighted_sums_equal_explicit_rows(model, n_inputs):
  params, x, y = _setup(model, n_inputs, E=6)
  rows = _explicit_rows(model, params, x, y)
  eg = example_grads(_apply(model), params, x, y)
  np.testing.assert_allclose(
    eg.loss,
    optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y),
    rtol=1e-6,
  )
  np.testing.assert_allclose(gram(params, eg), rows @ rows.T, rtol=1e-5, atol=1e-6)
  # The cross Gram between two sets of examples.
  eg_b = example_grads(_apply(model), params, x[:2] * 0.5, y[:2])
  rows_b = _explicit_rows(model, params, x[:2] * 0.5, y[:2])
  np.testing.assert_allclose(gram(params, eg, eg_b), rows @ rows_b.T, rtol=1e-5, atol=1e-6)
  c = jnp.array([0.5, -1.0, 0.0, 2.0, 0.25, 1.0])
  summed = weighted_grad(params, eg, c)
  chex.assert_trees_all_equal_shapes_and_dtypes(summed, params)
  np.testing.assert_allclose(ravel(summed)[0], c @ rows, rtol=1e-5, atol=1e-6)


def test_repeated_calls_retrace_the_layers():
  # The layer hooks run at every trace: a second call with the same shapes, inside or outside one
  # jit, must see the layers again (a cached trace would see none).
  model = make_mlp(5, 2, n_outputs=5, n_inputs=6)
  params, x, y = _setup(model, 6, E=4)
  first = gram(params, example_grads(_apply(model), params, x, y))
  again = gram(params, example_grads(_apply(model), params, x, y))
  twice = jax.jit(lambda p: [gram(p, example_grads(_apply(model), p, x, y)) for _ in range(2)])(
    params
  )
  for K in (again, *twice):
    np.testing.assert_allclose(K, first, rtol=1e-6)


def test_safe_under_jit_and_vmap():
  model = make_mlp(5, 2, n_outputs=5, n_inputs=6)
  params, x, y = _setup(model, 6, E=4)
  f = lambda p, x: gram(p, example_grads(_apply(model), p, x, y))  # noqa: E731
  np.testing.assert_allclose(jax.jit(f)(params, x), f(params, x), rtol=1e-6)
  xs = jnp.stack([x, 2 * x, -x])
  np.testing.assert_allclose(
    jax.vmap(f, in_axes=(None, 0))(params, xs), np.stack([f(params, xi) for xi in xs]), rtol=1e-5
  )


def test_gem_dual_on_factored_terms_equals_gem_project_on_rows():
  # GEM's rows as weighted sums of per-example gradients: P = S K S', q = S K_b, g + G'v.
  model = make_mlp(8, 2, n_outputs=5, n_inputs=10)
  params, x, y = _setup(model, 10, E=9, seed=3)
  S = jnp.kron(jnp.eye(3), jnp.full((1, 3), 1 / 3))  # 3 tasks x 3 examples, task means
  mem, cur = (
    example_grads(_apply(model), params, x, y),
    example_grads(_apply(model), params, x[:1] + 1, y[:1]),
  )
  g = weighted_grad(params, cur, jnp.ones(1))
  q = S @ gram(params, mem, cur)[:, 0]
  mask = jnp.array([True, True, False])
  v, info = gem_dual(S @ gram(params, mem) @ S.T, q, margin=0.5, mask=mask, only_if_violated=False)
  ours = jax.tree.map(jnp.add, g, weighted_grad(params, mem, S.T @ v))
  rows = _explicit_rows(model, params, x, y)
  G = jax.vmap(ravel(params)[1])(S @ rows)
  ref, ref_info = gem_project(g, G, margin=0.5, mask=mask, only_if_violated=False)
  np.testing.assert_allclose(ravel(ours)[0], ravel(ref)[0], rtol=1e-4, atol=1e-6)
  assert bool(info.qp.converged) and bool(ref_info.qp.converged)
  assert float(v[2]) == 0.0  # a masked row gets no multiplier


class Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(2, (3,), name="conv")(x[..., None]).reshape(x.shape[0], -1)
    return nn.Dense(5, name="head")(x)


class Twice(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(x.shape[-1], name="shared")
    return nn.Dense(5, name="head")(layer(layer(x)))


class Scaled(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, name="head")(x) * self.param("scale", nn.initializers.ones, ())


@pytest.mark.parametrize(
  "model,match",
  [
    (Conv(), "conv/bias is not a Dense layer"),
    (Twice(), r"\('shared',\) is applied twice"),
    (Scaled(), "scale is not a Dense layer"),
  ],
)
def test_refuses_networks_it_cannot_factor(model, match):
  params, x, y = _setup(model, 6, E=3)
  with pytest.raises(CljaxError, match=match):
    example_grads(_apply(model), params, x, y)


@pytest.mark.parametrize("n_memories", [4, 40])  # the example Gram's way, the rows' way
def test_task_gram_equals_the_gram_of_explicit_rows(n_memories):
  import numerics

  from cljax import memory_grads
  from cljax.memory import Memory, past_weights
  from cljax.rules.base import HParams, StepContext

  T, D = 3, 784
  model = make_mlp(16, 2)
  params = model.init(jax.random.key(0), jnp.zeros((1, D)))["params"]
  rng = np.random.default_rng(0)
  filled = np.ones((T, n_memories), bool)
  filled[1, -1] = False
  mem = Memory(
    jnp.asarray(rng.random((T, n_memories, D)), jnp.float32),
    jnp.asarray(rng.integers(0, 10, (T, n_memories)), jnp.int32),
    jnp.asarray(filled),
    jnp.zeros((), jnp.int32),
  )
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  hp = HParams(jnp.float32(0.1), jnp.float32(0.0))
  ctx = StepContext(
    jnp.int32(T), params, mem.x[0, :1], mem.y[0, :1], mem, hp, jax.random.key(0), apply
  )
  w = past_weights(mem, ctx.t)
  P = np.asarray(memory_grads.task_gram(ctx, memory_grads.memory_factors(ctx), w))
  leaves = jax.tree.leaves(memory_grads.past_rows(ctx))  # (T, ...) each
  rows = np.concatenate([np.asarray(a, np.float64).reshape(T, -1) for a in leaves], axis=1)
  want = rows @ rows.T
  # Two programs of inner products of p-length rows: the Gram bound (Cauchy-Schwarz, diagonal).
  np.testing.assert_allclose(P, want, rtol=0, atol=numerics.gram_atol(want, rows.shape[1]))
