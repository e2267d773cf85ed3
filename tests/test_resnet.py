"""GEM's reduced ResNet-18 (`cljax.resnet`): its size, its BatchNorm conventions, its shapes.

Compared against: the parameter count of the GEM code's architecture written out layer by layer,
PyTorch's BatchNorm update (running = 0.9 running + 0.1 batch mean), and the definition of
evaluation mode (each example's logits independent of the batch it comes in).
"""

import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest
from jax import lax

from cljax import resnet
from cljax.models import param_count
from cljax.resnet import ResNet18


def gem_resnet18_params(nf=20, n_classes=100):
  """The GEM code's ResNet18(nclasses, nf): conv weights (no bias), BatchNorm scale + shift."""
  conv = lambda k, i, o: k * k * i * o  # noqa: E731
  bn = lambda c: 2 * c  # noqa: E731
  total = conv(3, 3, nf) + bn(nf)
  width = nf
  for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
    planes = nf * mult
    for block in range(2):
      s = stride if block == 0 else 1
      total += conv(3, width, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
      if s != 1 or width != planes:
        total += conv(1, width, planes) + bn(planes)
      width = planes
  return total + width * n_classes + n_classes


def init(model, batch=2):
  return model.init(jax.random.key(0), jnp.zeros((batch, 3072)), train=False)


def shapes(model):
  """The variables' shapes only (jax.eval_shape: nothing is computed)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 3072)), train=False))


def test_parameter_count_is_the_gem_codes():
  variables = shapes(ResNet18())
  assert param_count(variables["params"]) == gem_resnet18_params() == 1_109_240
  assert param_count(shapes(ResNet18(n_classes=10, nf=8))["params"]) == gem_resnet18_params(8, 10)
  assert set(variables["batch_stats"]["bn1"]) == {"mean", "var"}  # running averages, not params


def test_training_mode_updates_the_running_averages_as_pytorch():
  model = ResNet18(n_classes=5, nf=4)
  variables = init(model)
  x = jax.random.uniform(jax.random.key(1), (6, 3072))
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (6, 5)
  kernel = variables["params"]["conv1"]["kernel"]  # (3, 3, 3, nf) HWIO
  conv1 = jax.lax.conv_general_dilated(
    x.reshape(6, 32, 32, 3),
    kernel,
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  batch_mean = np.asarray(conv1).mean(axis=(0, 1, 2))
  running = np.asarray(updates["batch_stats"]["bn1"]["mean"])  # 0.9 * 0 + 0.1 * batch mean
  # Two programs of the same mean of N = 6 x 32 x 32 convolution outputs of 27 terms each: the
  # sum bound over N * 27 terms, |terms| = the mean of |kernel| * |window| sums (the abs conv).
  abs_conv = jax.lax.conv_general_dilated(
    jnp.abs(x.reshape(6, 32, 32, 3)),
    jnp.abs(kernel),
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  atol = 0.1 * numerics.sum_atol(np.asarray(abs_conv).mean(axis=(0, 1, 2)), 6 * 32 * 32 * 27)
  np.testing.assert_allclose(running, 0.1 * batch_mean, rtol=0, atol=atol)


def test_evaluation_scores_each_example_on_its_own():
  model = ResNet18(n_classes=5, nf=4)
  variables = init(model)
  x = jax.random.uniform(jax.random.key(2), (5, 3072))
  apply = jax.jit(
    lambda v, x, train: model.apply(v, x, train=train, mutable=train and ["batch_stats"]),
    static_argnums=2,
  )
  alone, together = apply(variables, x[:1], False), apply(variables, x, False)
  # The same math in two programs (batch 1 and 5): 17 convolutions of at most 9 x 32 terms and the
  # linear layer; each rounds within the sum bound (relative to its |terms|), compounded over the
  # 18 layers (BatchNorm at its initial running averages keeps the scale).
  per_layer = numerics.sum_atol(1.0, 9 * 32)
  atol = 18 * per_layer * float(np.max(np.abs(together)))
  np.testing.assert_allclose(alone[0], together[0], rtol=0, atol=atol)
  trained_alone, _ = apply(variables, x[:2], True)
  trained_together, _ = apply(variables, x, True)
  assert not np.allclose(trained_alone[0], trained_together[0], atol=1e-3)  # batch statistics


@pytest.mark.parametrize("size,k,stride", [(8, 3, 1), (8, 3, 2), (7, 3, 2), (8, 1, 2), (7, 1, 1)])
def test_conv_gradients_equal_autodiffs(size, k, stride):
  keys = jax.random.split(jax.random.key(size * 10 + k + stride), 3)
  x = jax.random.normal(keys[0], (2, size, size, 3))
  kernel = jax.random.normal(keys[1], (k, k, 3, 4))
  pad = k // 2

  def plain(x, kernel):
    dims = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(
      x, kernel, (stride,) * 2, ((pad, pad),) * 2, dimension_numbers=dims
    )

  def vjp(f, x, kernel, dy):
    y, pullback = jax.vjp(f, x, kernel)
    return y, *pullback(dy)

  custom = lambda x, kernel: resnet.conv(x, kernel, stride, pad)  # noqa: E731
  dy = jax.random.normal(keys[2], plain(x, kernel).shape)
  y, dx, dkernel = vjp(custom, x, kernel, dy)
  y0, dx0, dkernel0 = vjp(plain, x, kernel, dy)
  # The same sums in other orders: dx sums k^2 * O terms, dkernel B * h * w; their |terms| are the
  # same linear maps of the absolute values.
  _, abs_dx, abs_dkernel = vjp(plain, jnp.abs(x), jnp.abs(kernel), jnp.abs(dy))
  np.testing.assert_allclose(y, y0, rtol=0, atol=1e-6)  # the same forward call
  np.testing.assert_allclose(dx, dx0, rtol=0, atol=numerics.sum_atol(abs_dx, k * k * 4))
  n = dy.shape[0] * dy.shape[1] * dy.shape[2]
  np.testing.assert_allclose(dkernel, dkernel0, rtol=0, atol=numerics.sum_atol(abs_dkernel, n))
