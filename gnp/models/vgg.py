"""VGG-16 with BatchNorm, CIFAR variant.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, https://arxiv.org/abs/1409.1556, configuration D, with
BatchNorm after every conv (Ioffe & Szegedy, 2015). As in the common CIFAR
implementations (e.g. kuangliu/pytorch-cifar), the three-layer ImageNet
classifier is replaced by one Dense layer on the 512 features left after the
fifth max-pool of a 32×32 image.

One deliberate difference from kuangliu/pytorch-cifar: the convs have no bias,
since the BatchNorm right after each one adds its own shift; a bias there
changes nothing the network computes, yet still counts in weight decay and in
gradient and parameter norms. VGG16BN for 10 classes thus has 14,724,042
parameters: the 14,728,266 of that implementation less 4,224 conv biases.

Inputs must be at least 32×32 (five 2×2 max-pools); for larger inputs the
final feature map is averaged, so the head always sees 512 features.
Batch statistics live in the ``"batch_stats"`` collection (see
`gnp.models.resnet`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gnp.models.resnet import CONV_INIT
from gnp.models.resnet import batch_norm

# Configuration D of Simonyan & Zisserman, Table 1: conv widths, "M" max-pool.
VGG16_LAYERS = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


class VGG16BN(nn.Module):
  """VGG-16 with BatchNorm after every conv and a single Dense classifier.

  Logits are float32 whatever the computation ``dtype``; parameters are
  always float32.

  Attributes:
    num_classes: number of logits.
    dtype: computation dtype, e.g. ``jnp.bfloat16``.
  """

  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    for layer in VGG16_LAYERS:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.Conv(
            layer,
            (3, 3),
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
        )(x)
        x = nn.relu(batch_norm(train, self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, jnp.float32)
