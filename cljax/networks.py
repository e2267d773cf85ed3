"""The network a run trains: any Flax module (`Network`), and how it meets the run's tasks.

    net = from_module(MyCNN(), input_shape=(28, 28, 1), n_classes=10)   # a researcher's own
    run = jax.jit(cljax.make_train(config, network=net))
    net = mlp_network(n_hiddens=100, n_layers=2, init="gem")              # the default: GEM's MLP

A `Network` is the module and what the engine reads of it, declared (the built-in MLP) or
detected on probes when it is made (`from_module`):

- first_dense: the path of an nn.Dense layer that reads the flat image and nothing else does.
  A task's pixel map A_t is linear, so the evaluation folds it into that kernel,
  (A_t x) W = x (A_t' W), and scores all tasks on the base images; else it maps each task's
  images and runs the network on them, task by task (`cljax.train.make_evaluate`).
- dense_only: every parameter is an nn.Dense's, each layer applied once to (E, n_in) rows: the
  memory gradients can be per-example factors (`cljax.example_grads`); else one backward pass
  per past task ("explicit").
- mlp: cljax's own MLP, whose hidden units the grouped variants group; they refuse others.
- state: the module's mutable collections besides its parameters (BatchNorm's "batch_stats",
  e.g. `cljax.resnet.ResNet18`), which the run carries. Such a module takes Flax's `train`
  keyword. `apply` (what the rules differentiate, memory gradients included) runs in training
  mode: each call normalises with the statistics of the rows it is given, as PyTorch's
  `train()`, and leaves the running averages alone; `apply_train` also returns them updated
  (the engine's passes: the step's batch, and before it, as the GEM code's `observe`, each past
  task's memory); `apply_eval` uses them (PyTorch's `eval()`).

The stream's rows are flat (B, D) floats, D = prod(input_shape); `apply` gives the module its
(B, *input_shape) view. A run wraps the network for its tasks (`task_network`):

- shared (the default): every task trains and is evaluated on one network; tag is the identity.
- per_task (GEM's "independent"): T copies of the network, stacked on a leading axis (`init`
  vmaps the module's init over T keys); task t trains and is scored on copy t only, so the
  others get exactly zero gradient. The MLP's copies have n_hiddens // T units each
  (`mlp_network(..., n_tasks=T, per_task=True)`); another module's are the module as given.
- classes (a task-incremental stream, `tasks.TaskStream.classes` (T, C)): task t's logits are
  its classes' only, the others at -inf (its head).

With per_task or classes, an example carries its task: `tag` appends t as one more column, so the
episodic memory keeps each example's task with it and every loss built on `apply` (the batch's,
the memory gradients', ER's replay, EWC's Fisher) uses the example's own network and head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax import tasks
from cljax.errors import CljaxError
from cljax.example_grads import example_grads
from cljax.models import make_mlp

PyTree = Any
Path = tuple[str, ...]


class Network(NamedTuple):
  """A classifier the engine can train (see the module docstring).

  module: a `flax.linen.Module`, module.apply({"params": p}, x (B, *input_shape)) -> (B,
  n_classes) logits; input_shape: one example's shape as the module takes it ((784,) for the
  MLP, (28, 28, 1) for a CNN on grey 28 x 28 images); n_classes: its outputs; first_dense: the
  path of the Dense layer the evaluation folds the pixel maps into, or None; dense_only: memory
  gradients may be factored; mlp: cljax's own MLP (the grouped variants' hidden units); state:
  the names of its mutable collections (() without).
  """

  module: nn.Module
  input_shape: tuple[int, ...]
  n_classes: int
  first_dense: Path | None = None
  dense_only: bool = False
  mlp: bool = False
  state: tuple[str, ...] = ()

  @property
  def stateful(self) -> bool:
    """Whether the module carries state besides its parameters (BatchNorm's averages)."""
    return bool(self.state)

  @property
  def n_inputs(self) -> int:
    """D = prod(input_shape): the length of a stream's flat example rows."""
    return math.prod(self.input_shape)

  def _variables(self, key: jax.Array) -> PyTree:
    x = jnp.zeros((1, *self.input_shape), jnp.float32)
    if self.stateful:
      return self.module.init(key, x, train=False)
    return self.module.init(key, x)

  def init(self, key: jax.Array) -> PyTree:
    """The module's parameters (`variables["params"]`) for one example of input_shape."""
    return self._variables(key)["params"]

  def init_state(self) -> PyTree:
    """The module's initial state: {collection: its variables} (BatchNorm: means 0, variances 1)."""
    variables = self._variables(jax.random.key(0))  # the parameter draws are dead code under jit
    return {name: variables[name] for name in self.state}

  def _shaped(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[0], *self.input_shape)
    return x if x.shape == shape else x.reshape(shape)

  def apply(self, params: PyTree, x: jax.Array) -> jax.Array:
    """(B, D) flat rows (or (B, *input_shape)) -> (B, n_classes) logits (training mode)."""
    if self.stateful:  # the averages, created fresh and dropped, are not read in training mode
      variables = {"params": params}
      return self.module.apply(variables, self._shaped(x), train=True, mutable=list(self.state))[0]
    return self.module.apply({"params": params}, self._shaped(x))

  def apply_train(self, params: PyTree, state: PyTree, x: jax.Array) -> tuple[jax.Array, PyTree]:
    """(logits, state updated by x's batch statistics): a stateful network's training pass."""
    logits, updated = self.module.apply(
      {"params": params, **state}, self._shaped(x), train=True, mutable=list(self.state)
    )
    return logits, {name: updated[name] for name in self.state}

  def apply_eval(self, params: PyTree, state: PyTree, x: jax.Array) -> jax.Array:
    """Logits in evaluation mode (a stateful network's running averages; else `apply`)."""
    if not self.stateful:
      return self.apply(params, x)
    return self.module.apply({"params": params, **state}, self._shaped(x), train=False)


def mlp_network(
  n_hiddens: int,
  n_layers: int,
  init: str,
  *,
  n_tasks: int = 1,
  per_task: bool = False,
  n_inputs: int = 784,
  n_classes: int = 10,
) -> Network:
  """GEM's MLP (`cljax.models.MLP`) as a Network: its properties declared, not probed.

  With per_task, one task's MLP of n_hiddens // n_tasks units (GEM's "independent").

  Raises:
    CljaxError: bad sizes, or per_task with n_hiddens < n_tasks.
  """
  if per_task and n_hiddens < n_tasks:
    raise CljaxError(
      f"independent splits n_hiddens over the tasks (n_hiddens // n_tasks units each): "
      f"n_hiddens {n_hiddens} < n_tasks {n_tasks}; raise n_hiddens or lower n_tasks."
    )
  width = n_hiddens // n_tasks if per_task else n_hiddens
  model = make_mlp(width, n_layers, n_classes, init=init, n_inputs=n_inputs)
  return Network(model, (n_inputs,), n_classes, ("hidden_0",), dense_only=True, mlp=True)


def from_module(module: nn.Module, *, input_shape: tuple[int, ...], n_classes: int) -> Network:
  """Any Flax module as a Network; what the engine reads of it is detected on small probes.

  Args:
    module: a `flax.linen.Module` whose apply({"params": p}, x (B, *input_shape)) returns
      (B, n_classes) logits.
    input_shape: one example's shape, e.g. (28, 28, 1); flat rows of prod(input_shape) values
      (height, width, channel order) reach it reshaped to it. A module with mutable
      collections (BatchNorm's) takes Flax's train keyword and runs with its state (module
      docstring).
    n_classes: the number of logits.

  Returns:
    The Network, with first_dense and dense_only detected (module docstring): first_dense when
    folding a random linear pixel map into that Dense layer's kernel gives the logits of mapping
    the images (to float32 rounding), dense_only when the per-example gradient factors trace.

  Raises:
    CljaxError: not a Flax module, a bad input_shape or n_classes, a module that fails on
      input_shape (a stateful one: with train=True) or returns other than (B, n_classes)
      logits. One line each.
  """
  if not isinstance(module, nn.Module):
    raise CljaxError(f"network must be a flax.linen.Module, got {type(module).__name__}.")
  if not (
    isinstance(input_shape, tuple)
    and input_shape
    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
  ):
    raise CljaxError(f"input_shape must be a tuple of positive ints, got {input_shape!r}.")
  if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
    raise CljaxError(f"n_classes must be an int >= 2, got {n_classes!r}.")
  name = type(module).__name__
  x = jnp.zeros((2, *input_shape), jnp.float32)
  shape = ", ".join(map(str, input_shape))
  try:
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    state = tuple(sorted(set(variables) - {"params"}))
    if state:  # training mode, its batch statistics into the mutable collections
      out, _ = jax.eval_shape(
        lambda v: module.apply(v, x, train=True, mutable=list(state)), variables
      )
    else:
      out = jax.eval_shape(module.apply, variables, x)
  except CljaxError:
    raise
  except Exception as e:  # the module's own error, in one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    hint = ""
    if isinstance(e, TypeError) and "train" in first:
      hint = " (a module with state takes Flax's train keyword: __call__(self, x, train))"
    raise CljaxError(
      f"{name} fails on inputs of shape (B, {shape}): {type(e).__name__}: {first}{hint}"
    ) from None
  if not hasattr(out, "shape") or tuple(out.shape) != (2, n_classes):
    got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
    raise CljaxError(
      f"{name} maps (B, {', '.join(map(str, input_shape))}) inputs to {got}, not (B, "
      f"{n_classes}) logits: give n_classes its number of outputs."
    )
  net = Network(module, tuple(input_shape), n_classes, state=state)
  if net.stateful:  # batch statistics mix the examples: neither the fold nor the factors hold
    return net
  return net._replace(first_dense=_detect_first_dense(net), dense_only=_factorable(net))


def _factorable(net: Network) -> bool:
  """Whether the per-example gradient factors trace on net (every layer a Dense, each once)."""
  params = jax.eval_shape(net.init, jax.random.key(0))
  x = jnp.zeros((2, net.n_inputs), jnp.float32)
  try:
    jax.eval_shape(lambda p: example_grads(net.apply, p, x, jnp.zeros((2,), jnp.int32)), params)
  except CljaxError:
    return False
  return True


def _dense_calls(net: Network, params: PyTree, x: jax.Array) -> list[tuple[Path, jax.Array]]:
  """(path, input) of every nn.Dense call of net.apply(params, x), in call order."""
  calls = []

  def hook(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      calls.append((tuple(context.module.path), args[0] if args else kwargs["inputs"]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(hook):
    net.apply(params, x)
  return calls


def _detect_first_dense(net: Network) -> Path | None:
  """The Dense layer a pixel map folds into, or None: checked on a probe (module docstring).

  The probe: a random map of K = 2 pixels with random weights (no permutation, whose symmetric
  functions of the image would pass unchanged) and random parameters; the folded and the mapped
  logits must agree to 1e-3 of their scale, where float32 rounding differs by ~1e-6 and a layer
  that also reads the image elsewhere by O(1).
  """
  keys = jax.random.split(jax.random.key(0), 4)
  D = net.n_inputs
  params = net.init(keys[0])
  x = jax.random.uniform(keys[1], (3, D), jnp.float32, -1.0, 1.0)
  calls = _dense_calls(net, params, x)
  if not calls:
    return None
  path, inputs = calls[0]
  if inputs.shape != (3, D) or not bool(jnp.array_equal(inputs, x)):
    return None
  x8 = jax.random.randint(keys[2], (3, D), 0, 256).astype(jnp.uint8)
  pix_idx = jax.random.randint(keys[3], (D, 2), 0, D)
  pix_w = jax.random.uniform(jax.random.fold_in(keys[3], 1), (D, 2))
  mapped = net.apply(params, tasks.apply_transform(x8, pix_idx, pix_w))
  kernel = tasks.fold_pixel_map(get_path(params, path)["kernel"], pix_idx, pix_w)
  folded_params = set_path(params, path, {**get_path(params, path), "kernel": kernel})
  folded = net.apply(folded_params, x8.astype(jnp.float32) * tasks.PIXEL_SCALE)
  scale = 1.0 + float(jnp.max(jnp.abs(mapped)))
  return path if float(jnp.max(jnp.abs(folded - mapped))) <= 1e-3 * scale else None


def get_path(tree: PyTree, path: Path) -> PyTree:
  """tree[path[0]][path[1]]... (a nested dict's node)."""
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: PyTree, path: Path, value: PyTree) -> PyTree:
  """A copy of the nested dict tree with the node at path replaced by value."""
  if not path:
    return value
  return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


class TaskNetwork(NamedTuple):
  """A run's network over its tasks (see the module docstring).

  init(key) -> params; apply(params, x (N, D + tagged)) -> (N, C) logits; tag(x (B, D), t) -> the
  rows apply takes; network: the `Network` of one task (all tasks when shared); per_task, tagged;
  apply_train(params, state, x (N, D + tagged)) -> (logits, state): a stateful network's pass
  that updates its running averages (`Network.apply_train`, with the heads).
  """

  init: Callable[[jax.Array], PyTree]
  apply: Callable[[PyTree, jax.Array], jax.Array]
  tag: Callable[[jax.Array, jax.Array], jax.Array]
  network: Network
  per_task: bool
  tagged: bool
  apply_train: Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]]


def task_network(
  network: Network,
  *,
  n_tasks: int,
  per_task: bool = False,
  classes: jax.Array | None = None,
) -> TaskNetwork:
  """The network over n_tasks tasks: per task (T copies), with a head per task (classes (T, C)).

  Raises:
    CljaxError: the network's outputs are not the split's classes, or per_task copies of a
      stateful network.
  """
  tagged = per_task or classes is not None
  if per_task and network.stateful:
    raise CljaxError(
      f"independent trains one {type(network.module).__name__} per task, and its state "
      f"({', '.join(network.state)}) is not carried per task: use a network without, or another "
      "variant."
    )
  if classes is not None and classes.shape[1] != network.n_classes:
    raise CljaxError(
      f"the network has {network.n_classes} outputs but the split has {classes.shape[1]} classes."
    )

  def init_fn(key):
    return jax.vmap(network.init)(jax.random.split(key, n_tasks)) if per_task else network.init(key)

  def apply(params, x):
    if not tagged:
      return network.apply(params, x)
    t, x = x[:, -1].astype(jnp.int32), x[:, :-1]
    if per_task:  # each example through its own task's network
      one = lambda ti, xi: network.apply(task_params(params, ti), xi[None])  # noqa: E731
      logits = jax.vmap(one)(t, x)[:, 0]
    else:
      logits = network.apply(params, x)
    if classes is not None:
      logits = jnp.where(classes[t], logits, -jnp.inf)
    return logits

  def tag(x, t):
    if not tagged:
      return x
    return jnp.concatenate([x, jnp.full((x.shape[0], 1), t, x.dtype)], axis=1)

  def apply_train(params, state, x):
    if not tagged:
      return network.apply_train(params, state, x)
    t, x = x[:, -1].astype(jnp.int32), x[:, :-1]
    logits, state = network.apply_train(params, state, x)
    return jnp.where(classes[t], logits, -jnp.inf), state

  return TaskNetwork(init_fn, apply, tag, network, per_task, tagged, apply_train)


def check_fits(network: Network, *, dim: int, classes: jax.Array | None, n_labels: int) -> None:
  """Refuses, in one line, a network that does not fit a stream of dim-long rows.

  classes: the split's (T, C) or None; n_labels: the labels' range without a split.
  """
  if network.n_inputs != dim:
    shape = " x ".join(map(str, network.input_shape))
    raise CljaxError(
      f"the network takes {shape} inputs ({network.n_inputs} values) but the stream's examples "
      f"have {dim}: give from_module the input_shape of the data."
    )
  n = n_labels if classes is None else int(classes.shape[1])
  if network.n_classes != n:
    raise CljaxError(
      f"the network has {network.n_classes} outputs but the stream has {n} classes: give "
      f"from_module n_classes={n}."
    )


def task_params(params: PyTree, t: jax.Array) -> PyTree:
  """Network t of per-task stacked parameters (leaves (T, ...) -> (...)); t may be traced."""
  return jax.tree.map(lambda a: a[t], params)


def finetune_start(params: PyTree, t: jax.Array) -> PyTree:
  """GEM's --finetune yes: network t starts as network t - 1 (from task 1 on); t may be traced."""
  prev = jnp.maximum(t - 1, 0)
  return jax.tree.map(lambda a: a.at[t].set(jnp.where(t > 0, a[prev], a[t])), params)


def task_has_label(classes: jax.Array, y: jax.Array) -> jax.Array:
  """(T, N) whether label y[n] is one of task t's classes (False for the padding label -1)."""
  return (y[None, :] >= 0) & jnp.take(classes, jnp.maximum(y, 0), axis=1)
