"""Wide residual networks (pre-activation), e.g. WRN-28-10.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
https://arxiv.org/abs/1605.07146. A 3×3 stem conv to 16 channels, then three
stages of ``(depth - 4) / 6`` blocks of widths 16k, 32k and 64k (k = ``width``)
with strides 1, 2, 2, then BN-ReLU, global average pooling and a Dense head.
Each block is BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus a shortcut: the
identity, or a 1×1 conv of the pre-activated input where the shape changes.

Convolutions have no bias, as in the authors' code and the common PyTorch port
(xternalz/WideResNet-pytorch), so WRN-28-10 for 10 classes has the same
36,479,194 parameters.

Batch statistics live in the ``"batch_stats"`` collection (see
`gnp.models.resnet`). With ``dropout_rate > 0``, training needs an rng named
``"dropout"``: ``model.apply(..., train=True, rngs={"dropout": key})``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gnp.errors import ConfigError
from gnp.models.resnet import CONV_INIT
from gnp.models.resnet import batch_norm


class WideBlock(nn.Module):
  """A pre-activation block: (BN-ReLU-conv) twice, with dropout between."""

  filters: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(
        nn.Conv, use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype
    )
    y = nn.relu(batch_norm(train, self.dtype)(x))
    if x.shape[-1] != self.filters or self.strides != 1:
      # As in the authors' code: the projection shares the block's first
      # BN-ReLU instead of reading the raw sum of the previous block.
      shortcut = conv(
          self.filters, (1, 1), strides=self.strides, name="proj_conv"
      )(y)
    else:
      shortcut = x
    y = conv(self.filters, (3, 3), strides=self.strides)(y)
    y = nn.relu(batch_norm(train, self.dtype)(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.filters, (3, 3))(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-``depth``-``width`` for CIFAR-sized images.

  Logits are float32 whatever the computation ``dtype``; parameters are
  always float32.

  Attributes:
    depth: total number of conv layers in the main path plus 4; 6n + 4.
    width: widening factor k.
    num_classes: number of logits.
    dropout_rate: dropout between the two convs of each block (0.3 in the
      paper's dropout runs); 0 needs no rng.
    dtype: computation dtype, e.g. ``jnp.bfloat16``.
  """

  depth: int = 28
  width: int = 10
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Checked at construction so a bad config fails before any compile.
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ConfigError(
          f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40,"
          f" ...); got {self.depth}"
      )
    if self.width < 1:
      raise ConfigError(f"WideResNet width must be >= 1; got {self.width}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    blocks_per_stage = (self.depth - 4) // 6
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(
        16,
        (3, 3),
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=self.dtype,
        name="stem",
    )(x)
    for i, strides in enumerate((1, 2, 2)):
      for j in range(blocks_per_stage):
        x = WideBlock(
            filters=16 * 2**i * self.width,
            strides=strides if j == 0 else 1,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
        )(x, train)
    x = nn.relu(batch_norm(train, self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, jnp.float32)
