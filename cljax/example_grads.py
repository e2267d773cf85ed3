"""Per-example gradients of a network of Dense layers, held in factored form instead of as rows.

For example i and a Dense layer l (z = a W + b) the gradient of the example's loss l_i is

    dl_i/dW_l = a_{l,i} d_{l,i}'      dl_i/db_l = d_{l,i}      d_{l,i} = dl_i/dz_{l,i}

so the gradients of E examples are held by each layer's inputs A_l (E, n_in) and output deltas
D_l (E, n_out), (n_in + n_out) numbers per example and layer instead of n_in x n_out. From them,
without forming any p-length row:

    gram            K_ij = <grad l_i, grad l_j> = sum_l (a_{l,i}.a_{l,j} + 1)(d_{l,i}.d_{l,j})
    weighted_grad   sum_i c_i grad l_i = {W_l: A_l' (c * D_l), b_l: D_l' c}

GEM's constraint rows are weighted sums of per-example gradients (row k = sum_i S_ki grad l_i), so
its dual terms are P = S K S' and q = G g, and its update is g + G'v = g + weighted_grad(S'v): work
(E^2 + E)(n_in + n_out) per layer. On a CPU the (t, p) x (p, t) product G G' of explicit rows is
what makes GEM's step slow; these are all small, well-shaped matrix products.

Exact for any Flax model whose parameters all belong to `nn.Dense` layers, each applied once to a
(E, n_in) input (cljax's MLP, whatever its depth and width); anything else is refused with an
error naming the layer.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cljax.errors import CljaxError

PyTree = Any
Path = tuple[str, ...]
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


class ExampleGrads(NamedTuple):
  """The gradients of E examples' losses, layer by layer (dicts keyed by the Dense layer's path).

  inputs[path]: (E, n_in) the layer's inputs a; deltas[path]: (E, n_out) dl_i/dz; loss: (E,).
  """

  inputs: dict[Path, jax.Array]
  deltas: dict[Path, jax.Array]
  loss: jax.Array


def _dense_input(context: Any, args: tuple, kwargs: dict) -> jax.Array | None:
  if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
    return args[0] if args else kwargs["inputs"]
  return None


def path_names(key_path) -> tuple[str, ...]:
  """A pytree key path as a tuple of names, e.g. ("hidden_0", "kernel")."""
  return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def _dense_layers(params: PyTree) -> dict[Path, int]:
  """Path -> output width of every Dense layer in params; refuses any other parameter."""
  leaves = [
    (path_names(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  layers = {n[:-1]: leaf.shape[1] for n, leaf in leaves if n[-1] == "kernel" and leaf.ndim == 2}
  for n, _ in leaves:
    if n[:-1] not in layers or n[-1] not in ("kernel", "bias"):
      raise CljaxError(
        f"parameter {'/'.join(n)} is not a Dense layer's kernel or bias: per-example gradient "
        "factors cover only networks of nn.Dense layers."
      )
  return layers


def example_grads(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array) -> ExampleGrads:
  """The factors of the cross-entropy gradients of E examples: one forward and backward pass.

  Args:
    apply_fn: apply_fn(params, x) -> (E, classes) logits, e.g. `lambda p, x: mlp.apply({"params":
      p}, x)`; every parameter must belong to an nn.Dense layer applied once.
    params: the parameters (p numbers in all).
    x: (E, n_in) examples.
    y: (E,) int labels.

  Returns:
    ExampleGrads: per-layer inputs and deltas, and the (E,) losses l_i.
  """
  layers = _dense_layers(params)

  def total_loss(offsets):
    inputs = {}

    def hook(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      a = _dense_input(context, args, kwargs)
      if a is None:
        return out
      path = tuple(context.module.path)
      if path in inputs:
        raise CljaxError(f"Dense layer {path} is applied twice: per-example factors need once.")
      if a.ndim != 2:
        raise CljaxError(f"Dense layer {path} gets a {a.ndim}-d input; factors need (E, n_in).")
      inputs[path] = a
      return out + offsets[path]

    with nn.intercept_methods(hook):
      logits = apply_fn(params, x)
    if set(inputs) != set(layers):
      raise CljaxError(f"Dense layers {sorted(set(layers) - set(inputs))} were not applied.")
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(losses), (losses, inputs)

  dtype = jnp.result_type(x, jnp.float32)
  zeros = {path: jnp.zeros((x.shape[0], width), dtype) for path, width in layers.items()}
  # Each example's loss depends only on its own row of z, so d(sum_i l_i)/dz_i = dl_i/dz_i.
  deltas, (losses, inputs) = jax.grad(total_loss, has_aux=True)(zeros)
  return ExampleGrads(inputs, deltas, losses)


def has_bias(params: PyTree, path: Path) -> bool:
  """Whether the layer at path (a tuple of names) has a bias."""
  node = params
  for key in path:
    node = node[key]
  return "bias" in node


def gram(params: PyTree, a: ExampleGrads, b: ExampleGrads | None = None) -> jax.Array:
  """K_ij = <grad l_i, grad l_j> for i in a, j in b (default: a): (E_a, E_b).

  K = sum over layers of (A_a A_b' + 1) * (D_a D_b'), the 1 for the bias (dropped without one).
  params only tells which layers have a bias.
  """
  b = a if b is None else b
  terms = []
  for path, A in a.inputs.items():
    inner = A @ b.inputs[path].T + (1.0 if has_bias(params, path) else 0.0)
    terms.append(inner * (a.deltas[path] @ b.deltas[path].T))
  return sum(terms)


def weighted_grad(params: PyTree, eg: ExampleGrads, c: jax.Array) -> PyTree:
  """sum_i c_i grad l_i as a pytree like params: W_l = A_l' (c * D_l), b_l = D_l' c. c: (E,)."""

  def leaf(key_path, p):
    *layer, name = path_names(key_path)
    A, D = eg.inputs[tuple(layer)], eg.deltas[tuple(layer)]
    cd = c[:, None].astype(D.dtype) * D
    return (A.T @ cd if name == "kernel" else jnp.sum(cd, axis=0)).astype(p.dtype)

  return jax.tree_util.tree_map_with_path(leaf, params)
