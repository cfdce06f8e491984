"""ResNets with BasicBlocks and the CIFAR stem; ResNet-18.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385. The CIFAR variant (as in the common PyTorch
implementations, e.g. kuangliu/pytorch-cifar) replaces the ImageNet stem (7×7
conv stride 2, max-pool) by a single 3×3 conv with stride 1, so 32×32 inputs
keep their resolution through the first stage.

Convolutions have no bias (the BatchNorm after each one has its own shift)
and Kaiming-normal fan-out initialisation; with that, ResNet-18 has
11,173,962 parameters for 10 classes and 11,220,132 for 100, the same as the
PyTorch model.

Batch statistics live in the ``"batch_stats"`` collection: train with
``model.apply(variables, x, train=True, mutable=["batch_stats"])``, which
returns ``(logits, {"batch_stats": ...})``; evaluate with ``train=False``,
which uses the running averages.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), which the
# CIFAR ResNet/WRN/VGG recipes were tuned with: plain (untruncated) normal with
# variance 2 / (kernel area × output channels).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(
    train: bool, dtype: Any, name: str | None = None
) -> nn.BatchNorm:
  """BatchNorm as PyTorch sets it up: momentum 0.1 there is 0.9 here."""
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      name=name,
  )


class BasicBlock(nn.Module):
  """Two 3×3 convs with a residual connection (He et al., Figure 2)."""

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(
        nn.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype
    )
    residual = x
    y = conv(self.filters, (3, 3), strides=self.strides)(x)
    y = nn.relu(batch_norm(train, self.dtype)(y))
    y = conv(self.filters, (3, 3))(y)
    y = batch_norm(train, self.dtype)(y)
    if residual.shape != y.shape:
      # Option B of He et al.: a projection only where the shape changes.
      residual = conv(
          self.filters, (1, 1), strides=self.strides, name="proj_conv"
      )(residual)
      residual = batch_norm(train, self.dtype, name="proj_bn")(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A CIFAR ResNet of BasicBlocks.

  Stage ``i`` has ``stage_sizes[i]`` blocks of width ``num_filters · 2**i``;
  every stage but the first halves the resolution in its first block. Global
  average pooling then a Dense head give the logits, in float32 whatever the
  computation ``dtype`` (parameters are always float32).

  Attributes:
    stage_sizes: number of BasicBlocks in each stage.
    num_filters: width of the stem and the first stage.
    num_classes: number of logits.
    dtype: computation dtype, e.g. ``jnp.bfloat16``.
  """

  stage_sizes: Sequence[int]
  num_filters: int = 64
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(
        self.num_filters,
        (3, 3),
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=self.dtype,
        name="stem",
    )(x)
    x = nn.relu(batch_norm(train, self.dtype)(x))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.num_filters * 2**i, strides, self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, jnp.float32)


class ResNet18(ResNet):
  """ResNet-18: BasicBlocks [2, 2, 2, 2], widths 64-128-256-512."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
