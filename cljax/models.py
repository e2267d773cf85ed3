"""The GEM paper's fully connected network as a `flax.linen` MLP, initialised as the GEM code."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.errors import CljaxError

INIT_SCHEMES = ("gem", "torch", "flax")
"""Accepted values of `MLP.init_scheme` / `make_mlp(init=...)`."""


def _uniform(bound: float) -> jax.nn.initializers.Initializer:
  """Initializer drawing i.i.d. from U[-bound, bound), like `torch.nn.init.uniform_`."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def _is_int(v: object) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _validate(
  n_hiddens: object, n_layers: object, n_outputs: object, init: object, n_inputs: object
) -> None:
  """Raises CljaxError naming the first bad architecture argument and how to fix it."""
  for name, v in (
    ("n_hiddens", n_hiddens),
    ("n_layers", n_layers),
    ("n_outputs", n_outputs),
    ("n_inputs", n_inputs),
  ):
    if not _is_int(v) or v < 1:
      raise CljaxError(f"{name} must be an int >= 1; got {v!r}. Pass a positive layer size/count.")
  if init not in INIT_SCHEMES:
    raise CljaxError(
      f"init must be one of {INIT_SCHEMES}; got {init!r}. Use 'gem' for the PyTorch GEM code's "
      "Xavier init, 'torch' for nn.Linear's default, or 'flax' for Flax's Dense default."
    )


class MLP(nn.Module):
  """GEM's MLP: `n_inputs -> n_hiddens x n_layers (ReLU) -> n_outputs` logits.

  The network is, for h_0 = x and l = 0..n_layers-1,

      h_{l+1} = relu(h_l @ W_l + b_l),    logits = h_L @ W_out + b_out,

  exactly the PyTorch GEM code's `MLP([n_inputs] + [n_hiddens] * n_layers + [n_outputs])`.
  With the defaults (784 -> 100 -> 100 -> 10) it has 89,610 parameters; in general

      n_inputs*H + H + (n_layers-1)*(H*H + H) + H*n_outputs + n_outputs,   H = n_hiddens.

  Param tree (`variables = model.init(key, x)`; kernels are (in, out), as Flax's Dense):

      variables["params"] = {
        "hidden_0": {"kernel": (n_inputs, H), "bias": (H,)},
        "hidden_1": {"kernel": (H, H),        "bias": (H,)},
        ...
        "hidden_{n_layers-1}": {"kernel": (H, H), "bias": (H,)},
        "out":      {"kernel": (H, n_outputs), "bias": (n_outputs,)},
      }

  Hidden unit k of layer l is column `kernel[:, k]` plus `bias[k]` of `hidden_l` (what a grouped
  GEM variant that groups by hidden unit selects); the units of `out` are the classes.

  Init (`init_scheme`):
    * "gem" (default): weights ~ U[-a, a], a = sqrt(6 / (fan_in + fan_out)), biases 0: the GEM
      code's `Xavier` applied by its `MLP` (`model/common.py`, `self.net.apply(Xavier)`), so runs
      are comparable with the PyTorch GEM code. Same as Glorot uniform.
    * "torch": every weight AND bias ~ U[-1/sqrt(fan_in), 1/sqrt(fan_in)], fan_in = the layer's
      input features, as PyTorch's `nn.Linear.reset_parameters` (kaiming_uniform with a=sqrt(5));
      what a plain `nn.Linear` gets, which the GEM code overrides.
    * "flax": Flax's Dense default, kernel lecun_normal (variance 1/fan_in), bias zero.

  The field is `init_scheme`, not `init`, because `init` would shadow `nn.Module.init`;
  `make_mlp(..., init=...)` takes the short name and validates it.

  Attributes:
    n_hiddens: Width H of every hidden layer.
    n_layers: Number of hidden layers (>= 1).
    n_outputs: Number of logits (classes).
    init_scheme: "gem", "torch" or "flax", see above.
    n_inputs: Input features; inputs must already be flattened to (B, n_inputs).
  """

  n_hiddens: int = 100
  n_layers: int = 2
  n_outputs: int = 10
  init_scheme: str = "gem"
  n_inputs: int = 784

  def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
    if self.init_scheme == "gem":
      u = _uniform(math.sqrt(6.0 / (fan_in + features)))
      return nn.Dense(features, kernel_init=u, bias_init=nn.initializers.zeros, name=name)
    if self.init_scheme == "torch":
      u = _uniform(1.0 / math.sqrt(fan_in))
      return nn.Dense(features, kernel_init=u, bias_init=u, name=name)
    return nn.Dense(features, name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits for a batch of flattened inputs.

    Args:
      x: (B, n_inputs) floating-point inputs, already flattened (the model never reshapes; use
        `x.reshape(B, -1)` for images, `x[None]` for one example).

    Returns:
      (B, n_outputs) logits (no softmax).

    Raises:
      CljaxError: bad architecture fields, or x not a floating (B, n_inputs) array. The checks
        read only static shapes/dtypes, so they run at trace time and are jit-safe.
    """
    _validate(self.n_hiddens, self.n_layers, self.n_outputs, self.init_scheme, self.n_inputs)
    if x.ndim != 2 or x.shape[-1] != self.n_inputs:
      raise CljaxError(
        f"MLP input must have shape (B, {self.n_inputs}); got {tuple(x.shape)}. Flatten images "
        f"with x.reshape(B, -1), and add a batch axis with x[None] for a single example."
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise CljaxError(
        f"MLP input must be floating point; got dtype {x.dtype}. Convert first, e.g. "
        "x.astype(jnp.float32) / 255 for uint8 pixels."
      )
    fan_in = self.n_inputs
    for layer in range(self.n_layers):
      x = nn.relu(self._dense(self.n_hiddens, fan_in, f"hidden_{layer}")(x))
      fan_in = self.n_hiddens
    return self._dense(self.n_outputs, fan_in, "out")(x)


def make_mlp(
  n_hiddens: int = 100,
  n_layers: int = 2,
  n_outputs: int = 10,
  init: str = "gem",
  *,
  n_inputs: int = 784,
) -> MLP:
  """Validated constructor for `MLP` (see its docstring for the math and the param tree).

  Args:
    n_hiddens: Width of each hidden layer, >= 1.
    n_layers: Number of hidden layers, >= 1.
    n_outputs: Number of logits, >= 1.
    init: "gem" (the GEM code's Xavier uniform, zero bias), "torch" (nn.Linear's
      U[±1/sqrt(fan_in)] for weights and biases) or "flax" (lecun_normal kernel, zero bias).
    n_inputs: Flattened input size, >= 1 (784 for 28x28 MNIST-like images).

  Returns:
    An `MLP`; `model.init(key, jnp.zeros((1, n_inputs)))` gives its variables.

  Raises:
    CljaxError: a size is not a positive int, or init is not one of INIT_SCHEMES.
  """
  _validate(n_hiddens, n_layers, n_outputs, init, n_inputs)
  return MLP(
    n_hiddens=n_hiddens,
    n_layers=n_layers,
    n_outputs=n_outputs,
    init_scheme=init,
    n_inputs=n_inputs,
  )


def param_count(params: Any) -> int:
  """Total number of scalars in a params pytree (`variables` or `variables["params"]`).

  Args:
    params: Any pytree of arrays, or of `jax.ShapeDtypeStruct`s (`jax.eval_shape(model.init, ...)`
      counts parameters without allocating them).

  Returns:
    sum over leaves of leaf.size, a Python int (89,610 for the default 784-100-100-10 MLP).
  """
  shapes = (
    leaf.shape if hasattr(leaf, "shape") else jnp.shape(leaf)
    for leaf in jax.tree_util.tree_leaves(params)
  )
  return int(sum(math.prod(shape) for shape in shapes))
