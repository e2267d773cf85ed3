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
Initialisation is Flax's (lecun normal), not PyTorch's. The engine runs it as any stateful
network (`cljax.networks.from_module`, its BatchNorm averages the run's state; `--network
resnet18`).

The convolutions' gradients are written out (`conv`): as autodiff emits them, the input and
kernel gradients are convolutions in non-canonical layouts, which XLA:CPU canonicalises outside
loops but runs through a naive loop nest inside a `lax.scan` body (18x slower here: jax issue
12868). `conv`'s backward states them as canonical NHWC / HWIO convolutions; the same math.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMAGE_SHAPE = (32, 32, 3)
_DIMS = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Y = x * kernel: x (B, H, W, I), kernel (k, k, I, O), stride s, zero padding p on each side.

  Returns (B, (H + 2p - k) // s + 1, ..., O). Its gradients, in canonical layouts:
  dx = dilate_s(dy) * flip(kernel)' (in / out swapped, padding k - 1 - p), and
  dkernel[a, b, i, o] = sum_{n,h,w} x_pad[n, s h + a, s w + b, i] dy[n, h, w, o], a convolution
  of x (channels as its batch) with dy (the batch as its input features) dilated by s.
  """
  return lax.conv_general_dilated(
    x, kernel, (stride, stride), ((pad, pad),) * 2, dimension_numbers=_DIMS
  )


def _conv_fwd(x, kernel, stride, pad):
  return conv(x, kernel, stride, pad), (x, kernel)


def _conv_bwd(stride, pad, residuals, dy):
  x, kernel = residuals
  k, size = kernel.shape[0], x.shape[1]
  unused = (size + 2 * pad - k) % stride  # input rows past the last window
  lo, hi = k - 1 - pad, k - 1 - pad + unused
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))  # (k, k, O, I)
  dx = lax.conv_general_dilated(
    dy, flipped, (1, 1), ((lo, hi),) * 2, lhs_dilation=(stride, stride), dimension_numbers=_DIMS
  )
  dkernel = lax.conv_general_dilated(
    jnp.transpose(x, (3, 1, 2, 0)),  # (I, H, W, B)
    jnp.transpose(dy, (1, 2, 0, 3)),  # (h, w, B, O)
    (1, 1),
    ((pad, pad - unused),) * 2,
    rhs_dilation=(stride, stride),
    dimension_numbers=_DIMS,
  )  # (I, k, k, O)
  return dx, jnp.transpose(dkernel, (1, 2, 0, 3))


conv.defvjp(_conv_fwd, _conv_bwd)


def _flax_conv(lhs, rhs, window_strides, padding, *args, **kwargs):
  """nn.Conv's convolution hook: `conv` for the square, symmetric case the ResNet uses."""
  (s, s2), ((p, p1), (p2, p3)) = window_strides, padding
  if s != s2 or not p == p1 == p2 == p3 or any(a not in (None, 1, (1, 1)) for a in args[:2]):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
  return conv(lhs, rhs, s, p)


def _conv(features: int, k: int, stride: int, name: str) -> nn.Conv:
  return nn.Conv(
    features,
    (k, k),
    (stride, stride),
    padding=((k // 2, k // 2),) * 2,
    use_bias=False,
    conv_general_dilated=_flax_conv,
    name=name,
  )


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
    out = nn.relu(_batch_norm(train, "bn1")(_conv(self.planes, 3, self.stride, "conv1")(x)))
    out = _batch_norm(train, "bn2")(_conv(self.planes, 3, 1, "conv2")(out))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = _batch_norm(train, "shortcut_bn")(_conv(self.planes, 1, self.stride, "shortcut_conv")(x))
    return nn.relu(out + x)


class ResNet18(nn.Module):
  """GEM's reduced ResNet-18: nf base filters (GEM: 20), n_classes logits (CIFAR-100: 100)."""

  n_classes: int = 100
  nf: int = 20

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, 3072) or (N, 32, 32, 3) images -> (N, n_classes) logits."""
    x = x.reshape(x.shape[0], *IMAGE_SHAPE)
    out = _conv(self.nf, 3, 1, "conv1")(x)
    out = nn.relu(_batch_norm(train, "bn1")(out))
    for stage, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
      for block in range(2):
        out = BasicBlock(
          self.nf * mult, stride if block == 0 else 1, name=f"layer{stage + 1}_{block}"
        )(out, train)
    out = jnp.mean(out, axis=(1, 2))  # the 4 x 4 average pool of a 4 x 4 map
    return nn.Dense(self.n_classes, name="linear")(out)
