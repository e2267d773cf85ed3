"""The continual-learning run: any rule as one jit-compiled scan over tasks and steps.

`make_train(config, rule, network=None)` closes over the engine's static `Config`, a
`cljax.rules.Rule` (the built-in ones by name: `cljax.rules.registry.make`) and a
`cljax.networks.Network` (default: GEM's MLP from the config) and returns
`train(key, stream, hparams)`:

    run = jax.jit(make_train(config, registry.make("gem")))
    result = run(jax.random.key(3), stream)           # RunResult: (T, T) accuracies and counters
    net = cljax.networks.from_module(MyCNN(), input_shape=(28, 28, 1), n_classes=10)
    result = jax.jit(make_train(config, rule, network=net))(jax.random.key(3), stream)

Structure: a `lax.scan` over tasks; within a task a scan over chunks of `log_every` steps, each a
scan over the chunk's training steps followed by an evaluation of all T test sets.
Every shape is fixed: the episodic memory is (T, n_memories, D) from the start, past tasks are a
mask, so the run compiles once whatever T is.

One training step (GEM's `observe`): write the batch into task t's ring-buffer memory, take the
gradient g of the batch loss, let the rule change it (`rule.update`, which reads the memories of
past tasks with the current parameters), and apply SGD. At each task end, `rule.end_task`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import data, tasks
from cljax.errors import CljaxError
from cljax.memory import Memory, empty_memory, write_memory, write_reservoir
from cljax.memory_grads import MODES as MEMORY_GRADS
from cljax.memory_grads import mean_loss
from cljax.models import INIT_SCHEMES, make_mlp
from cljax.networks import (
  Network,
  TaskNetwork,
  check_fits,
  finetune_start,
  get_path,
  mlp_network,
  set_path,
  task_has_label,
  task_network,
  task_params,
)
from cljax.rules.base import (
  NETWORKS,
  HParams,
  Rule,
  StepContext,
  TaskEndContext,
  cond_or_zeros,
  single,
)

# --optimizer: lr -> an optax GradientTransformation (lr traced: a sweep over it compiles once).
OPTIMIZERS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
  "sgd": optax.sgd,  # GEM's
  "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
  "adam": optax.adam,
}


def _flag(default: Any, help: str, **meta: Any) -> Any:
  """A Config field whose default, help text (and choices) the command line takes as its flag's.

  meta: flag (the flag's name when not the field's), gem (one of GEM's own flags), choices.
  """
  return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class Config:
  """The engine's static settings of a run (hashable; closed over, never traced).

  A rule's own settings are its factory's arguments (`cljax.rules`; the built-in ones by name:
  `cljax.rules.registry.make`), not fields here.

  Attributes:
    batch_size: examples per step (GEM: 1).
    n_epochs: passes over each task's samples (GEM's --n_epochs; 1); epochs after the first
      reshuffle them (`tasks.batch_rows`). Evaluation points stay every log_every steps of a
      task (its epochs together) and its end.
    lr: the learning rate (default for `HParams.lr`).
    n_memories: episodic-memory slots per task (read when the rule uses the memory).
    memory_strength: the rules' strength hyper-parameter (default for `HParams.memory_strength`):
      GEM's margin, v >= memory_strength in the dual QP; EWC's penalty strength.
    n_layers, n_hiddens: the MLP's hidden layers and width (the default network).
    init: "gem" (the GEM code's Xavier uniform, zero biases), "torch" (nn.Linear's default) or
      "flax" (see `cljax.models.MLP`).
    log_every: evaluate all tasks every log_every steps of a task (0: only at task ends).
    eval_batch_size: test examples per evaluation batch (bounds the evaluation's memory).
    optimizer: a name in OPTIMIZERS, the optax transformation that applies the rule's gradient
      at lr ("sgd": GEM's); `make_train(optimizer=...)` takes any other.
    memory_grads: how past-task memory gradients are computed (rules read it as
      `StepContext.memory_grads`). "factored": one forward and backward pass over the whole
      (T x n_memories) memory, kept as per-example factors (`cljax.example_grads`): GEM's
      P = G G', q = G g and G'v come from small matrix products and no (t, p) row is formed;
      networks of Dense layers only (the MLP). "explicit": one backward pass per past task, rows
      as pytrees, and `gem_project` on them (the direct transcription; works for any
      differentiable network). Both compute the same numbers up to float rounding. "auto"
      (default): factored where the network allows (`Network.dense_only`), else explicit
      (`resolve_config`).
  """

  batch_size: int = _flag(1, "examples per SGD step", gem=True)
  n_epochs: int = _flag(
    1, "passes over each task's samples, reshuffled after the first (GEM's)", gem=True
  )
  lr: float = _flag(0.01, "SGD learning rate", gem=True)
  n_memories: int = _flag(10, "memory slots per task", gem=True)
  memory_strength: float = _flag(
    10.0,
    "GEM's QP margin (gem, agem_old, agem_qp_mean, --projection qp); EWC's penalty strength",
    gem=True,
  )
  n_layers: int = _flag(2, "hidden layers of the MLP", gem=True)
  n_hiddens: int = _flag(100, "units per hidden layer", gem=True)
  init: str = _flag(
    "gem",
    "parameter init: gem (the GEM code's Xavier uniform), torch (nn.Linear's) or flax",
    choices=INIT_SCHEMES,
  )
  log_every: int = _flag(
    100, "evaluate all tasks every this many steps (0: at task ends only)", gem=True
  )
  eval_batch_size: int = _flag(2000, "test examples per evaluation batch")
  optimizer: str = _flag(
    "sgd",
    "the optimiser (optax): sgd (GEM's), momentum (SGD with momentum 0.9) or adam, at --lr",
    choices=tuple(OPTIMIZERS),
  )
  memory_grads: str = _flag(
    "auto",
    "memory gradients from per-example factors (fast; networks of Dense layers, the MLP) or one "
    "backward pass per past task (explicit rows; any network); the same numbers up to rounding. "
    "auto: factored where the network allows",
    choices=("auto", *MEMORY_GRADS),
  )

  def __post_init__(self):
    for field in dataclasses.fields(self):  # every field that declares its choices
      choices, value = field.metadata.get("choices"), getattr(self, field.name)
      if choices is not None and value not in choices:
        raise CljaxError(f"unknown {field.name} {value!r}: choose one of {', '.join(choices)}.")
    # Non-finite settings are refused here: nan passes every comparison and the run would diverge.
    for name, strict in (("lr", True), ("memory_strength", False)):
      value = getattr(self, name)
      if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise CljaxError(
          f"{name} must be a finite number {'>' if strict else '>='} 0, got {value}."
        )
    for name in ("batch_size", "n_epochs", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise CljaxError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.n_memories < 0:
      raise CljaxError(f"n_memories must be >= 0, got {self.n_memories}.")
    if self.log_every < 0:
      raise CljaxError(
        f"log_every must be >= 0 (0: evaluate only at task ends), got {self.log_every}."
      )
    make_mlp(self.n_hiddens, self.n_layers, init=self.init)  # validates the network's settings


class TrainState(NamedTuple):
  """The scan's carry."""

  params: Any  # Flax params pytree
  opt_state: Any  # optax state
  memory: Memory
  step: jax.Array  # () int32 global step count (all tasks)
  diverged: jax.Array  # () bool: parameters went non-finite; later steps are skipped
  rule_state: Any = None  # the rule's state (grouped variants: `cljax.grouped.state.GroupedState`)
  model_state: Any = None  # a stateful network's (BatchNorm's running averages), else None


class StepStats(NamedTuple):
  """Per-step diagnostics, reduced per task into the run's counters (`reduce_counters`)."""

  ran: jax.Array  # () bool: a real step (not padding, not after divergence)
  loss: jax.Array  # () batch loss before the update
  counters: Any  # the rule's `cljax.rules.Counters` of the step ({} for none)


ENGINE_COUNTERS = ("steps", "mean_loss")  # the engine's own per-task counters


class RunResult(NamedTuple):
  """What a run returns (all arrays; leading batch axes under vmap).

  acc: (T, T) R[i, j] = test accuracy on task j after training task i (= curve[:, -1]).
  baseline: (T,) accuracies before any training (for forward transfer).
  curve: (T, C, T) accuracies on all tasks after each of task i's C chunks of log_every steps.
  curve_step: (T, C) the global step count at each curve point.
  counters: {name: (T,)} per task: the engine's steps (real steps run) and mean_loss (the
    batch loss before each step, averaged), then what the rule reported (`cljax.rules.Counters`;
    e.g. GEM's violations, projections, qp_iterations, qp_iterations_max, kkt_max, qp_failures).
  finite: (T,) whether the parameters were finite after each task.
  params: the final parameters.
  h: the rule's `summary` of its state at the end of each task t, stacked (None without one).
    Grouped variants: (T, T, L, G) the multipliers h in use (row k for past tasks k < t, zero
    elsewhere; `cljax.grouped.state`).
  model_state: a stateful network's final state (BatchNorm's running averages, what
    `make_evaluate`'s evaluate reads); None otherwise.
  """

  acc: jax.Array
  baseline: jax.Array
  curve: jax.Array
  curve_step: jax.Array
  counters: dict[str, jax.Array]
  finite: jax.Array
  params: Any
  h: Any = None
  model_state: Any = None


def default_hparams(config: Config, rule: Rule | None = None) -> HParams:
  """The config's lr and memory_strength, and the rule's own defaults (`Rule.hparams`), float32.

  jax arrays (`run_setup.run_hparams` makes numpy ones, for a sweep that sets its device count
  before JAX's backend starts).
  """
  extra = None
  if rule is not None and rule.hparams:
    extra = {name: jnp.asarray(v, jnp.float32) for name, v in rule.hparams.items()}
  return HParams(
    jnp.asarray(config.lr, jnp.float32), jnp.asarray(config.memory_strength, jnp.float32), extra
  )


def schedule(config: Config, stream: tasks.TaskStream) -> tuple[int, int, int]:
  """(steps per task, steps per evaluation chunk, chunks per task) for this stream.

  Steps per task = n_epochs x (samples_per_task // batch_size) (a last partial batch is dropped;
  each epoch after the first reshuffles the task's samples, `tasks.batch_rows`). All tasks are
  evaluated before training and after every chunk of log_every steps of a task, the last chunk
  ending the task: when log_every divides the steps per task these are exactly GEM's evaluation
  points (`i % log_every == 0` and the end). A last, shorter chunk is padded with skipped steps.
  """
  samples = stream.train_idx.shape[1]
  if config.batch_size > samples:
    raise CljaxError(
      f"batch_size {config.batch_size} is larger than samples_per_task {samples}: lower batch_size."
    )
  steps = config.n_epochs * (samples // config.batch_size)
  chunk = steps if config.log_every == 0 else min(config.log_every, steps)
  return steps, chunk, math.ceil(steps / chunk)


def resolve_config(config: Config, network: Network | None = None) -> Config:
  """The config with memory_grads "auto" made what the network allows (None: the MLP).

  auto is "factored" where every parameter is a Dense layer's (`Network.dense_only`: the MLP),
  else "explicit"; what a run records (`results.json`'s train_config).

  Raises:
    CljaxError: memory_grads "factored" for a network it cannot take (one line).
  """
  dense = network is None or network.dense_only
  if config.memory_grads == "factored" and not dense:
    raise CljaxError(
      f"memory_grads factored needs a network of Dense layers, each applied once to (B, n_in) "
      f"rows; {type(network.module).__name__} is not one: use memory_grads auto or explicit."
    )
  if config.memory_grads != "auto":
    return config
  return dataclasses.replace(config, memory_grads="factored" if dense else "explicit")


def check_rule(
  config: Config,
  rule: Rule,
  network: Network | None = None,
  *,
  name: str = "the rule",
  split: bool = False,
) -> None:
  """Refuse, in one line, a run the engine cannot make of this rule (`make_train` calls it).

  Not a Rule; declarations the engine cannot follow (`Rule.memory_writes`, `Rule.networks`); a
  memory rule without memory slots; what its declared needs rule out: `Rule.hidden_units` reads
  cljax's MLP's hidden units from per-example factors (the MLP only, memory_grads factored, no
  split stream), per-task networks carry no network state. config: memory_grads resolved
  (`resolve_config`); network None: cljax's MLP; name: the rule's, for the messages; split: the
  stream is split (task-incremental; otherwise refused when traced).
  """
  if not isinstance(rule, Rule):
    raise CljaxError(
      f"make_train takes a cljax.rules.Rule, got {type(rule).__name__} (a built-in one by name: "
      "cljax.rules.registry.make)."
    )
  if rule.memory_writes not in ("ring", "reservoir"):
    raise CljaxError(
      f"unknown memory_writes {rule.memory_writes!r} of the rule: choose ring or reservoir."
    )
  if rule.networks not in NETWORKS:
    raise CljaxError(
      f"unknown networks {rule.networks!r} of the rule: choose {', '.join(NETWORKS)}."
    )
  if rule.uses_memory and config.n_memories < 1:
    raise CljaxError(f"{name} reads the episodic memory: n_memories must be >= 1, got 0.")
  if network is not None and rule.hidden_units and not network.mlp:
    raise CljaxError(
      f"{name} groups the hidden Dense units of cljax's MLP, which a "
      f"{type(network.module).__name__} does not have: use another variant, or the MLP "
      "(network None)."
    )
  if rule.hidden_units and config.memory_grads == "explicit":
    raise CljaxError(
      f"{name} builds its rows from per-example factors: use memory_grads 'factored'."
    )
  if network is not None and network.stateful and rule.networks != "shared":
    raise CljaxError(
      f"{name} trains one {type(network.module).__name__} per task, and its state "
      f"({', '.join(network.state)}) is not carried per task: use a network without, or another "
      "variant."
    )
  if split:
    _check_split(rule, name)


def _check_split(rule: Rule, name: str) -> None:
  if rule.hidden_units:
    raise CljaxError(
      f"{name} reads the network's hidden units itself and has no multi-head form: use "
      "protocol permutations or rotations, or another variant."
    )


def make_evaluate(
  config: Config, network: Network | None = None, rule: Rule | None = None
) -> Callable[..., jax.Array]:
  """Return evaluate(params, stream, model_state=None) -> (T,) test accuracy on every task.

  network: the run's `Network` (None: the config's MLP); rule: the run's, whose `networks` says
  one network or one per task (None: one shared network); model_state: a stateful
  network's (its running averages, read in evaluation mode; None: their initial values). Pure;
  the caller jits.
  """
  per_task = rule is not None and rule.networks != "shared"

  def evaluate(params, stream: tasks.TaskStream, model_state: Any = None) -> jax.Array:
    """(T,) test accuracy on every task, in batches of eval_batch_size test examples.

    With a first Dense layer on the flat image (`Network.first_dense`, the MLP's hidden_0): each
    task's pixel map A_t is linear, so it is folded into that layer instead of applied to the
    images, (A_t x) W = x (A_t' W), and all T tasks share the base test images (memory: batch x
    T x the layer's width). Otherwise each task's images are mapped and run through the
    network, one task at a time (memory: batch x D); on a split stream, whose maps are the
    identity, one pass of a shared network scores every task. Per-task networks (independent):
    task t is scored on network t. A split stream: task t on its classes' test examples, with
    its head (`networks`).
    """
    T, n_test = stream.pix_idx.shape[0], stream.test_x.shape[0]
    net = network_of(config, T, stream.test_x.shape[1], stream.classes, network, rule).network
    if net.stateful and model_state is None:
      model_state = net.init_state()
    bs = min(config.eval_batch_size, n_test)
    n_batches = math.ceil(n_test / bs)
    pad = n_batches * bs - n_test
    path = net.first_dense if stream.norm is None else None  # the fold reads x / 255
    if path is not None:
      kernels = jax.vmap(tasks.fold_pixel_map, in_axes=(0 if per_task else None, 0, 0))(
        get_path(params, path)["kernel"], stream.pix_idx, stream.pix_w
      )  # (T, D, H)
    x_all = jnp.pad(stream.test_x, ((0, pad), (0, 0))).reshape(n_batches, bs, -1)
    y_all = jnp.pad(stream.test_y, (0, pad), constant_values=-1).reshape(n_batches, bs)

    def folded_logits(x):  # (T, bs, classes): task t's folded first layer on the base images
      x = x.astype(jnp.float32) * tasks.PIXEL_SCALE

      def task_logits(kernel, p):
        return net.apply(set_path(p, path, {**get_path(p, path), "kernel": kernel}), x)

      return jax.vmap(task_logits, in_axes=(0, 0 if per_task else None))(kernels, params)

    def mapped_logits(x):  # (T, bs, classes): task t's images through its map, task by task
      if stream.classes is not None and not per_task:
        return net.apply_eval(params, model_state, tasks.scale_pixels(x, stream.norm))[None]

      def task_logits(t):
        x_t = tasks.apply_transform(x, stream.pix_idx[t], stream.pix_w[t], stream.norm)
        return net.apply_eval(task_params(params, t) if per_task else params, model_state, x_t)

      return jax.lax.map(task_logits, jnp.arange(T))

    def one_batch(args):
      x, y = args
      logits = folded_logits(x) if path is not None else mapped_logits(x)
      if stream.classes is None:
        return jnp.sum(jnp.argmax(logits, axis=-1) == y[None], axis=1)  # padding: y = -1
      # Multi-head: task t's head is its classes' logits, scored on its classes' examples.
      logits = jnp.where(stream.classes[:, None, :], logits, -jnp.inf)
      scored = task_has_label(stream.classes, y)  # (T, bs); padding: no task's
      return jnp.sum(scored & (jnp.argmax(logits, axis=-1) == y[None]), axis=1)

    correct = jnp.sum(jax.lax.map(one_batch, (x_all, y_all)), axis=0)
    if stream.classes is None:
      return correct.astype(jnp.float32) / n_test
    counts = jnp.sum(task_has_label(stream.classes, stream.test_y), axis=1)
    return correct.astype(jnp.float32) / jnp.maximum(counts, 1).astype(jnp.float32)

  return evaluate


class TaskOutput(NamedTuple):
  """What one task of a run gives (`make_train` stacks them over the tasks into a RunResult).

  curve: (C, T) accuracies after each of its C chunks; curve_step: (C,) the global step at each;
  counters: {name: ()} the task's counters (`RunResult.counters`); finite: () the parameters
  finite at its end; summary: the rule's `summary` of its state before its end_task (None
  without one).
  """

  curve: jax.Array
  curve_step: jax.Array
  counters: dict[str, jax.Array]
  finite: jax.Array
  summary: Any = None


class _Run(NamedTuple):
  """One run's pieces, traced for a key, a stream and hyper-parameters (`_run_parts`)."""

  initial_state: Callable[[], TrainState]
  evaluate: Callable[[TrainState], jax.Array]
  chunk: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Any]]
  start_task: Callable[[TrainState, jax.Array], TrainState]
  end_task: Callable[[TrainState, jax.Array, Any], tuple[TrainState, TaskOutput]]
  n_tasks: int
  n_chunks: int


Optimizer = Callable[[jax.Array], optax.GradientTransformation]


def _run_parts(
  config: Config, rule: Rule, network: Network | None, optimizer: Optimizer | None = None
):
  """parts(key, stream, hparams) -> _Run: the run's pieces, shared by the scan and the driver."""
  config = resolve_config(config, network)
  check_rule(config, rule, network)
  evaluate = make_evaluate(config, network, rule)

  def parts(key: jax.Array, stream: tasks.TaskStream, hparams: HParams | None) -> _Run:
    hp = default_hparams(config, rule) if hparams is None else hparams
    if rule.hparams and hp.extra is None:  # the rule's own at their defaults
      hp = hp._replace(extra=default_hparams(config, rule).extra)
    T, D = stream.train_idx.shape[0], stream.train_x.shape[1]
    steps, chunk, n_chunks = schedule(config, stream)
    init_key, step_key = jax.random.split(key)
    net = network_of(config, T, D, stream.classes, network, rule)
    apply = net.apply

    def batch_loss(params, x, y):
      return mean_loss(apply, params, x, y)

    def stateful_loss(params, model_state, x, y):  # the batch's pass updates the averages
      logits, model_state = net.apply_train(params, model_state, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), model_state

    def memory_passes(params, model_state, memory, t):
      """Each past task's memory through the network in training mode, as GEM's observe.

      Under a cond, so that no loop runs at t = 0: the zero-trip loop made a one-task ResNet
      program's step 6x slower on this CPU (0.44 s vs 0.06 s).
      """

      def one(k, model_state):
        return net.apply_train(params, model_state, memory.x[k])[1]

      return jax.lax.cond(
        t > 0, lambda: jax.lax.fori_loop(0, t, one, model_state), lambda: model_state
      )

    made = {}

    def opt():  # made on first use: the initial state's parameters first, as the run's program
      if "opt" not in made:
        made["opt"] = (OPTIMIZERS[config.optimizer] if optimizer is None else optimizer)(hp.lr)
      return made["opt"]

    def initial_state() -> TrainState:
      params = net.init(init_key)
      opt_state = opt().init(params)  # the optimiser made here: its -lr op where it always was
      memory = empty_memory(T, config.n_memories if rule.uses_memory else 1, D + int(net.tagged))
      zero = jnp.zeros((), jnp.int32)
      model_state = net.network.init_state() if net.network.stateful else None
      return TrainState(
        params,
        opt_state,
        memory,
        zero,
        jnp.zeros((), bool),
        rule.init(params, T),
        model_state,
      )

    def train_step(state: TrainState, t, j) -> tuple[TrainState, StepStats]:
      epochs = jax.random.fold_in(step_key, _EPOCH_KEY) if config.n_epochs > 1 else None
      x, y = tasks.train_batch(stream, t, j, config.batch_size, shuffle_key=epochs)
      x = net.tag(x, t)  # with its task as a last column when the network needs it
      memory = state.memory
      if rule.uses_memory and rule.memory_writes == "ring":  # before the step, as GEM's observe
        memory = write_memory(memory, t, x, y)
      model_state = state.model_state
      if net.network.stateful:
        if rule.uses_memory:
          model_state = memory_passes(state.params, model_state, memory, t)
        (loss, model_state), g = jax.value_and_grad(stateful_loss, has_aux=True)(
          state.params, model_state, x, y
        )
      else:
        loss, g = jax.value_and_grad(batch_loss)(state.params, x, y)
      key = jax.random.fold_in(step_key, state.step)
      ctx = StepContext(t, state.params, x, y, memory, hp, key, apply, config.memory_grads)
      g, counters, rule_state = rule.update(g, ctx, state.rule_state)
      _check_counters(counters)
      if rule.uses_memory and rule.memory_writes == "reservoir":  # after: never replays x itself
        memory = write_reservoir(memory, x, y, jax.random.fold_in(key, _RESERVOIR_KEY))
      updates, opt_state = opt().update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      new = TrainState(
        params,
        opt_state,
        memory,
        state.step + 1,
        ~_tree_all_finite(params),
        rule_state,
        model_state,
      )
      return new, StepStats(jnp.ones((), bool), loss, counters)

    def step(state: TrainState, xs):
      t, j = xs
      j = jnp.minimum(j, steps - 1)
      valid = (xs[1] < steps) & ~state.diverged
      return cond_or_zeros(valid, train_step, lambda state, t, j: state, state, t, j, prepare=opt)

    def chunk_then_eval(state: TrainState, t, c):
      """Chunk c of task t (log_every steps), then the evaluation of all tasks."""
      js = c * chunk + jnp.arange(chunk)
      state, stats = jax.lax.scan(step, state, (jnp.full((chunk,), t), js))
      return state, (evaluate(state.params, stream, state.model_state), state.step, stats)

    def start_task(state: TrainState, t) -> TrainState:
      if rule.networks == "per_task_finetune":
        state = state._replace(params=finetune_start(state.params, t))
      return state

    def end_task(state: TrainState, t, chunks) -> tuple[TrainState, TaskOutput]:
      """The task's end: its chunks' outputs (stacked) reduced, then the rule's end_task."""
      curve, curve_step, stats = chunks
      stats = jax.tree.map(lambda a: a.reshape(-1), stats)  # (C * chunk,)
      summary = None if rule.summary is None else rule.summary(state.rule_state)
      if rule.end_task is not None:
        key = jax.random.fold_in(jax.random.fold_in(step_key, _TASK_END_KEY), t)
        end = TaskEndContext(t, state.params, key, state.memory, apply)
        state = state._replace(rule_state=rule.end_task(state.rule_state, end))
      out = TaskOutput(
        curve, curve_step, reduce_counters(stats), _tree_all_finite(state.params), summary
      )
      return state, out

    return _Run(
      initial_state,
      lambda state: evaluate(state.params, stream, state.model_state),
      chunk_then_eval,
      start_task,
      end_task,
      T,
      n_chunks,
    )

  return parts


def make_train(
  config: Config,
  rule: Rule,
  *,
  network: Network | None = None,
  optimizer: Optimizer | None = None,
  progress: Callable[[Any, Any], None] | None = None,
):
  """Return train(key, stream, hparams=None) -> RunResult, to be jitted (and vmapped) by the caller.

  The returned function takes a PRNG key (model init and the rule's random choices), a
  `tasks.TaskStream`, and optional `HParams` (default: the config's). The whole run is one
  program: a scan over tasks (`make_task_runner` drives the same pieces task by task).

  Args:
    config: the engine's static `Config` (network, memory, schedule, optimiser).
    rule: the `cljax.rules.Rule` to run (a built-in one by name: `cljax.rules.registry.make`).
    network: the `cljax.networks.Network` to train (`from_module` makes one of any Flax
      module); None: GEM's MLP from the config's n_layers, n_hiddens and init. A network that
      does not fit the stream's examples or classes is refused in one line when traced, before
      compiling.
    optimizer: optimizer(lr) -> an optax GradientTransformation applying the rule's gradient
      (lr traced, `HParams.lr`); None: config.optimizer's (`OPTIMIZERS`; GEM's SGD).
    progress: optional host function progress(t, acc_row) called once at the end of each task
      (through `jax.debug.callback`, outside the steps; a program holding it is not cached).
  """
  parts = _run_parts(config, rule, network, optimizer)

  def train(key: jax.Array, stream: tasks.TaskStream, hparams: HParams | None = None) -> RunResult:
    run = parts(key, stream, hparams)
    state = run.initial_state()

    def chunk(state: TrainState, xs):
      return run.chunk(state, *xs)

    def task(state: TrainState, t):
      state = run.start_task(state, t)
      state, chunks = jax.lax.scan(
        chunk, state, (jnp.full((run.n_chunks,), t), jnp.arange(run.n_chunks))
      )
      state, out = run.end_task(state, t, chunks)
      if progress is not None:
        jax.debug.callback(progress, t, out.curve[-1])
      return state, out

    baseline = run.evaluate(state)
    state, outputs = jax.lax.scan(task, state, jnp.arange(run.n_tasks))
    return _result(baseline, outputs, state)

  return train


class TaskRunner(NamedTuple):
  """A run driven from Python, chunk by chunk, each piece one program (`make_task_runner`).

  start(key, stream, hparams) -> (TrainState, baseline (T,)); start_task(state, t, key, stream,
  hparams) -> state; chunk(state, t, c, key, stream, hparams) -> (state, (acc (T,), step (),
  StepStats of its log_every steps)); end_task(state, t, chunks, key, stream, hparams) ->
  (state, TaskOutput), chunks: the task's chunk outputs stacked (`stack`); finish(baseline,
  outputs, state) -> RunResult, outputs: the T TaskOutputs (host arrays). t and c are int32
  arrays, so each piece compiles once for the whole run.
  """

  start: Callable[..., tuple[TrainState, jax.Array]]
  start_task: Callable[..., TrainState]
  chunk: Callable[..., tuple[TrainState, Any]]
  end_task: Callable[..., tuple[TrainState, TaskOutput]]
  finish: Callable[[Any, list[TaskOutput], TrainState], RunResult]


def make_task_runner(
  config: Config,
  rule: Rule,
  *,
  network: Network | None = None,
  optimizer: Optimizer | None = None,
) -> TaskRunner:
  """The run of `make_train` as pieces to drive from Python (see `TaskRunner`); the caller jits.

  The pieces are the scan's own bodies, so a driven run computes what `make_train` computes
  (tested bit for bit on this machine). Driving it, a caller sees each evaluation as it comes
  (progress with the compilation cache on: no host callback in any program) and holds the
  state between tasks (checkpoints).
  """
  parts = _run_parts(config, rule, network, optimizer)

  def start(key, stream, hparams=None):
    run = parts(key, stream, hparams)
    state = run.initial_state()
    return state, run.evaluate(state)

  def start_task(state, t, key, stream, hparams=None):
    return parts(key, stream, hparams).start_task(state, t)

  def chunk(state, t, c, key, stream, hparams=None):
    return parts(key, stream, hparams).chunk(state, t, c)

  def end_task(state, t, chunks, key, stream, hparams=None):
    return parts(key, stream, hparams).end_task(state, t, chunks)

  def finish(baseline, outputs, state):
    return _result(baseline, stack(outputs), state)

  return TaskRunner(start, start_task, chunk, end_task, finish)


def stack(items: Sequence[Any]) -> Any:
  """Pytrees with the same structure -> one pytree, each leaf stacked on a new leading axis."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *items)


def _result(baseline: jax.Array, outputs: TaskOutput, state: TrainState) -> RunResult:
  """The RunResult of a run's baseline, its task outputs stacked over the tasks, its end state."""
  return RunResult(
    outputs.curve[:, -1],
    baseline,
    outputs.curve,
    outputs.curve_step,
    outputs.counters,
    outputs.finite,
    state.params,
    outputs.summary,
    state.model_state,
  )


def network_of(
  config: Config,
  n_tasks: int,
  dim: int,
  classes: jax.Array | None = None,
  network: Network | None = None,
  rule: Rule | None = None,
  name: str = "the rule",
) -> TaskNetwork:
  """The run's `cljax.networks.TaskNetwork`: network (None: the config's MLP) over its tasks.

  Per task for a rule that declares it (`Rule.networks`: independent), with a head per task on a
  split stream (classes); a rule reading the hidden units itself (`Rule.hidden_units`: the
  grouped variants) has neither. rule None: one shared network; name: the rule's in messages.

  Raises:
    CljaxError: a hidden-units rule on a split stream, or a network that does not fit the stream.
  """
  rule = single() if rule is None else rule
  if classes is not None:
    _check_split(rule, name)
  per_task = rule.networks != "shared"
  if network is None:
    network = mlp_network(
      config.n_hiddens,
      config.n_layers,
      config.init,
      n_tasks=n_tasks,
      per_task=per_task,
      n_inputs=dim,
      n_classes=data.NUM_CLASSES if classes is None else int(classes.shape[1]),
    )
  check_fits(network, dim=dim, classes=classes, n_labels=data.NUM_CLASSES)
  return task_network(network, n_tasks=n_tasks, per_task=per_task, classes=classes)


_TASK_END_KEY = 0x7FFFFFFF  # folded into the step key for the rules' task-end random choices
_RESERVOIR_KEY = 0x7FFFFFFE  # folded into a step's key for the reservoir's slot draws
_EPOCH_KEY = 0x7FFFFFFD  # folded into the step key for the epochs' reshuffles


def _check_counters(counters: Any) -> None:
  """A rule's counters: a dict of () scalars, none named as the engine's own (one line)."""
  if not isinstance(counters, dict) or any(
    not isinstance(k, str) or getattr(v, "shape", None) != () for k, v in counters.items()
  ):
    raise CljaxError(
      "a rule's update must return its counters as a dict of name -> () scalar ({} for none), "
      f"got {jax.tree.map(lambda v: getattr(v, 'shape', v), counters)!r}."
    )
  clash = sorted(set(counters) & set(ENGINE_COUNTERS))
  if clash:
    raise CljaxError(f"a rule's counters may not be named {', '.join(clash)}: the engine's own.")


def reduce_counters(stats: StepStats) -> dict[str, jax.Array]:
  """A task's counters from its steps' stats (leading axis the steps).

  The engine's steps and mean_loss, then each of the rule's by its name (`cljax.rules.Counters`):
  `*_max` the maximum, `*_mean` the mean over the real steps, any other the sum (skipped steps
  count 0).
  """
  ran = stats.ran
  n = jnp.maximum(jnp.sum(ran), 1)
  out = {"steps": jnp.sum(ran), "mean_loss": jnp.sum(jnp.where(ran, stats.loss, 0.0)) / n}
  for name, v in stats.counters.items():
    if name.endswith("_max"):
      out[name] = jnp.max(v)
    elif name.endswith("_mean"):
      out[name] = jnp.sum(jnp.where(ran, v, 0)) / n
    else:
      out[name] = jnp.sum(v)
  return out


def _tree_all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
