"""GEM's reduced ResNet-18 for split CIFAR-100, as a `flax.linen` module.

The GEM code's `ResNet18(nclasses, nf=20)` (`model/common.py`): a 3x3 convolution to nf channels,
four stages of two basic blocks with nf, 2 nf, 4 nf, 8 nf channels (strides 1, 2, 2, 2), a 4x4
average pool and a linear layer to the classes. A basic block is

    out = relu(bn(conv3x3(x, stride)));  out = bn(conv3x3(out));  out = relu(out + shortcut(x))

with shortcut(x) = bn(conv1x1(x, stride)) where the stride or the width changes, else x. The
convolutions have no bias; BatchNorm as PyTorch's (momentum 0.1, eps 1e-5): batch statistics in
training (`train=True`, updating the running averages in the `batch_stats` collection), the
running averages in evaluation. Inputs are flat (N, 3072) rows of 32 x 32 x 3 images in height,
width, channel order (TFDS's; the GEM code's tensors are channel first), or (N, 32, 32, 3).
Initialisation is Flax's (lecun normal), not PyTorch's.

Not yet wired into the engine (`cljax.train`): its BatchNorm state is the next step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGE_SHAPE = (32, 32, 3)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  # PyTorch's momentum 0.1 updates running = 0.9 running + 0.1 batch: Flax's momentum is the 0.9.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
  """ResNet's basic block (see the module docstring); planes output channels."""

  planes: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C) -> (N, H / stride, W / stride, planes)."""
    conv = lambda k, s, name: nn.Conv(  # noqa: E731
      self.planes, (k, k), (s, s), padding=((k // 2, k // 2),) * 2, use_bias=False, name=name
    )
    out = nn.relu(_batch_norm(train, "bn1")(conv(3, self.stride, "conv1")(x)))
    out = _batch_norm(train, "bn2")(conv(3, 1, "conv2")(out))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = _batch_norm(train, "shortcut_bn")(conv(1, self.stride, "shortcut_conv")(x))
    return nn.relu(out + x)


class ResNet18(nn.Module):
  """GEM's reduced ResNet-18: nf base filters (GEM: 20), n_classes logits (CIFAR-100: 100)."""

  n_classes: int = 100
  nf: int = 20

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, 3072) or (N, 32, 32, 3) images -> (N, n_classes) logits."""
    x = x.reshape(x.shape[0], *IMAGE_SHAPE)
    out = nn.Conv(self.nf, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
    out = nn.relu(_batch_norm(train, "bn1")(out))
    for stage, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
      for block in range(2):
        out = BasicBlock(
          self.nf * mult, stride if block == 0 else 1, name=f"layer{stage + 1}_{block}"
        )(out, train)
    out = jnp.mean(out, axis=(1, 2))  # the 4 x 4 average pool of a 4 x 4 map
    return nn.Dense(self.n_classes, name="linear")(out)
