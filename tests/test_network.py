"""Any Flax module through the engine (`cljax.networks.from_module`, `make_train(network=...)`).

Compared against: the built-in MLP's program (a copy of it handed in from outside must run the
same program, bit for bit), the folded evaluation (the generic one maps the images: equal up to
argmax flips within a float32 bound derived from the layers), the definition of per-task networks
(finished tasks keep their accuracy exactly) and of heads (untrained classes keep their logits'
parameters), and the one-line refusals.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest
from conftest import real_permutation_stream

from cljax import networks, tasks
from cljax.errors import CljaxError
from cljax.models import make_mlp
from cljax.rules import registry, single
from cljax.train import Config, make_evaluate, make_train, resolve_config


class SmallCNN(nn.Module):
  """A CNN defined outside cljax: two strided convolutions and a Dense head."""

  n_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
    return nn.Dense(self.n_classes)(x.reshape(x.shape[0], -1))


class Skip(nn.Module):
  """Dense layers only, but the image is read twice: factored yes, folded no."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x))) + nn.Dense(10, name="skip")(x)


class WithBatchNorm(nn.Module):
  """State (BatchNorm's averages) but no train keyword to switch it."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.BatchNorm(use_running_average=True)(x.reshape(x.shape[0], -1)))


GREY = (28, 28, 1)


def cnn(n_classes=10):
  return networks.from_module(SmallCNN(n_classes), input_shape=GREY, n_classes=n_classes)


@pytest.fixture(scope="module")
def stream(small_dataset):
  return tasks.make_stream(
    small_dataset, protocol="permutations", n_tasks=2, samples_per_task=40, seed=0
  )


@pytest.fixture(scope="module")
def split_stream(small_dataset):
  return tasks.make_stream(small_dataset, protocol="split", n_tasks=2, samples_per_task=20, seed=0)


def config(**kw):
  return Config(**{"n_memories": 8, "log_every": 0, "lr": 0.05, **kw})


# --- what is detected ---------------------------------------------------------------------------


def test_detected_properties():
  c = cnn()
  assert (c.first_dense, c.dense_only, c.mlp, c.n_inputs) == (None, False, False, 784)
  copy = networks.from_module(make_mlp(), input_shape=(784,), n_classes=10)
  assert (copy.first_dense, copy.dense_only, copy.mlp) == (("hidden_0",), True, False)
  skip = networks.from_module(Skip(), input_shape=GREY, n_classes=10)
  assert (skip.first_dense, skip.dense_only) == (None, True)  # the image also reaches "skip"
  built_in = networks.mlp_network(100, 2, "gem")
  assert (built_in.first_dense, built_in.dense_only, built_in.mlp) == (("hidden_0",), True, True)


def test_memory_grads_auto_follows_the_network():
  assert resolve_config(Config()).memory_grads == "factored"  # the MLP
  assert resolve_config(Config(), cnn()).memory_grads == "explicit"
  skip = networks.from_module(Skip(), input_shape=GREY, n_classes=10)
  assert resolve_config(Config(), skip).memory_grads == "factored"
  with pytest.raises(CljaxError, match="memory_grads factored needs a network of Dense layers"):
    resolve_config(Config(memory_grads="factored"), cnn())


# --- runs ---------------------------------------------------------------------------------------


def test_a_copy_of_the_mlp_from_outside_runs_the_built_in_program(stream):
  # from_module(MLP) detects what mlp_network declares: the same program, bit for bit.
  cfg, gem = config(), registry.make("gem")
  built_in = jax.jit(make_train(cfg, gem))(jax.random.key(0), stream)
  copy = networks.from_module(make_mlp(), input_shape=(784,), n_classes=10)
  outside = jax.jit(make_train(cfg, gem, network=copy))(jax.random.key(0), stream)
  for a, b in zip(jax.tree.leaves(built_in), jax.tree.leaves(outside), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def fashion(real_fashion_dir):
  return real_permutation_stream(
    real_fashion_dir, n_tasks=2, samples_per_task=200, test_samples=300
  )


@pytest.mark.realdata
@pytest.mark.parametrize("variant", ["gem", "ewc"])
def test_a_cnn_from_outside_trains_with_a_memory_rule_and_a_penalty_rule(fashion, variant):
  cfg = config(memory_strength=0.5 if variant == "gem" else 10.0, lr=0.1, batch_size=2)
  result = jax.jit(make_train(cfg, registry.make(variant), network=cnn()))(
    jax.random.key(0), fashion
  )
  assert bool(jnp.all(result.finite)) and result.acc.shape == (2, 2)
  assert result.params["Conv_0"]["kernel"].shape == (3, 3, 1, 4)  # the module's own parameters
  np.testing.assert_array_equal(result.counters["steps"], [100, 100])
  if variant == "gem":  # GEM's QP ran on the CNN's explicit memory gradients
    assert result.counters["violations"][1] > 0 and result.counters["qp_failures"][1] == 0
  # It learned: each task well above chance (0.1) right after training it.
  assert result.acc[0, 0] > 0.25 and result.acc[1, 1] > 0.25, result.acc


def test_per_task_copies_and_heads_wrap_any_module(stream, split_stream):
  # independent: one CNN per task; a finished task's network is never touched again.
  independent = registry.make("independent")
  result = jax.jit(make_train(config(), independent, network=cnn()))(jax.random.key(0), stream)
  assert result.params["Conv_0"]["kernel"].shape == (2, 3, 3, 1, 4)
  np.testing.assert_array_equal(result.acc[1, 0], result.acc[0, 0])
  # split: task t's logits are its classes'; classes no task holds keep their init exactly.
  key = jax.random.key(0)
  result = jax.jit(make_train(config(), registry.make("gem"), network=cnn()))(key, split_stream)
  init = cnn().init(jax.random.split(key)[0])
  untouched = ~np.asarray(split_stream.classes).any(0)  # classes 4..9
  assert untouched.sum() == 6
  np.testing.assert_array_equal(
    result.params["Dense_0"]["kernel"][:, untouched], init["Dense_0"]["kernel"][:, untouched]
  )
  assert not np.array_equal(result.params["Dense_0"]["kernel"], init["Dense_0"]["kernel"])


# --- the evaluation -----------------------------------------------------------------------------


def mlp_logit_atol(params, x):
  """Per example, a bound on |folded - mapped| logits of the MLP on inputs x (N, D) >= 0.

  The first layer sums D products in two orders (`numerics.sum_atol` of |x| |W|, per unit). A
  later layer carries the differences e through W (relu is 1-Lipschitz): as sum_atol, bounded
  probabilistically, rounding errors being independent across units, sqrt(e^2 |W|^2), plus its
  own rounding of its sums of the two (different) inputs, twice its sum bound.
  """
  names = [k for k in params if k.startswith("hidden_")] + ["out"]
  h, err = np.abs(np.asarray(x, np.float64)), None
  for name in names:
    W = np.abs(np.asarray(params[name]["kernel"], np.float64))
    pre = h @ W + np.abs(np.asarray(params[name]["bias"]))
    own = np.vectorize(lambda v, n=W.shape[0] + 1: numerics.sum_atol(v, n))(pre)
    err = own if err is None else np.sqrt(err**2 @ W**2) + 2 * own
    h = pre
  return err.max(axis=1)


@pytest.mark.realdata
def test_generic_evaluation_equals_the_folded_one_on_the_mlp(fashion):
  # Two programs: the MLP's first layer folded with each task's map vs each task's mapped images.
  # An example can change its argmax only when its top two logits are within twice the bound.
  cfg = config(eval_batch_size=70)  # several batches and a padded last one
  stream = fashion
  params = jax.jit(make_train(cfg, single()))(jax.random.key(1), stream).params  # real margins
  generic = networks.mlp_network(100, 2, "gem")._replace(first_dense=None)
  folded = np.asarray(jax.jit(make_evaluate(cfg))(params, stream))
  mapped = np.asarray(jax.jit(make_evaluate(cfg, generic))(params, stream))
  n = stream.test_x.shape[0]
  for t in range(2):
    x, _ = tasks.eval_set(stream, t)
    logits = np.sort(np.asarray(generic.apply(params, x)), axis=1)
    close = np.sum(logits[:, -1] - logits[:, -2] <= 2 * mlp_logit_atol(params, x))
    assert abs(folded[t] - mapped[t]) * n <= close, (t, folded[t], mapped[t], close)
    assert close <= n // 10  # the bound is tight enough to mean something
  assert folded.min() > 0.0 and folded.max() < 1.0


def test_a_split_stream_is_scored_per_head_by_the_generic_evaluation(split_stream):
  cfg = config()
  net = networks.mlp_network(100, 2, "gem")
  params = net.init(jax.random.key(2))
  folded = np.asarray(jax.jit(make_evaluate(cfg))(params, split_stream))
  mapped = np.asarray(
    jax.jit(make_evaluate(cfg, net._replace(first_dense=None)))(params, split_stream)
  )
  # Identity maps: both read the same images; 0/1 accuracies per head differ only by rounding.
  np.testing.assert_allclose(mapped, folded, atol=2 / split_stream.test_x.shape[0])


# --- refusals -----------------------------------------------------------------------------------


def one_line(info):
  message = str(info.value)
  assert "\n" not in message, message
  return message


@pytest.mark.parametrize(
  "module,input_shape,n_classes,match",
  [
    (SmallCNN(), GREY, 7, r"maps \(B, 28, 28, 1\) inputs to \(2, 10\), not \(B, 7\) logits"),
    (SmallCNN(), (784,), 10, "SmallCNN fails on inputs of shape"),
    (WithBatchNorm(), GREY, 10, r"\(a module with state takes Flax's train keyword"),
    (lambda x: x, GREY, 10, "network must be a flax.linen.Module, got function"),
    (SmallCNN(), (28, 28.0), 10, "input_shape must be a tuple of positive ints"),
  ],
)
def test_a_module_that_does_not_work_is_refused_in_one_line(module, input_shape, n_classes, match):
  with pytest.raises(CljaxError, match=match) as info:
    networks.from_module(module, input_shape=input_shape, n_classes=n_classes)
  one_line(info)


def test_a_network_that_does_not_fit_the_stream_is_refused_in_one_line(stream, split_stream):
  colour = networks.from_module(SmallCNN(), input_shape=(32, 32, 3), n_classes=10)
  with pytest.raises(CljaxError, match=r"takes 32 x 32 x 3 inputs \(3072 values\)") as info:
    jax.jit(make_train(config(), registry.make("gem"), network=colour)).lower(
      jax.random.key(0), stream
    )
  assert "but the stream's examples have 784" in one_line(info)
  five = cnn(n_classes=5)
  with pytest.raises(CljaxError, match="has 5 outputs but the stream has 10 classes") as info:
    jax.jit(make_train(config(), registry.make("er"), network=five)).lower(
      jax.random.key(0), split_stream
    )
  one_line(info)


@pytest.mark.parametrize("variant", ["gem_grouped", "agem_grouped"])
def test_a_grouped_variant_refuses_another_network_in_one_line(variant):
  with pytest.raises(CljaxError, match="the rule groups the hidden Dense units") as info:
    make_train(Config(), registry.make(variant), network=cnn())
  assert "SmallCNN" in one_line(info)


def test_the_engine_reads_what_a_rule_declares_not_its_name(stream):
  """independent as a rule made by hand is the registry's independent, bit for bit: the
  per-task networks and the finetune start come from `Rule.networks`, not a name."""
  from cljax import rules

  for finetune in ("no", "yes"):
    built_in = jax.jit(make_train(config(), registry.make("independent", finetune=finetune)))
    declared = jax.jit(make_train(config(), rules.independent(finetune == "yes")))
    a, b = built_in(jax.random.key(1), stream), declared(jax.random.key(1), stream)
    np.testing.assert_array_equal(np.asarray(a.acc), np.asarray(b.acc))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  hidden = rules.single()._replace(hidden_units=True)  # a rule reading the MLP's hidden units
  with pytest.raises(CljaxError, match="the rule groups the hidden Dense units") as info:
    make_train(config(), hidden, network=cnn())
  one_line(info)
