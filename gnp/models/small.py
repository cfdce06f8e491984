"""A multilayer perceptron and a small convolutional network."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Dense layers of the given widths; the last width is the output size.

  Inputs are flattened past the batch axis; the activation follows every layer
  but the last. ``MLP((256, 256, 10))`` on mnist1d is the 40→256→256→10 MLP.
  """

  features: Sequence[int]
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # Nothing differs in training; taken so all models match.
    x = jnp.reshape(x, (x.shape[0], -1))
    for i, width in enumerate(self.features):
      x = nn.Dense(width)(x)
      if i < len(self.features) - 1:
        x = self.activation(x)
    return x


class CNN(nn.Module):
  """3×3 convolutions (each followed by 2×2 max-pooling), then a Dense head.

  Inputs are ``[B, H, W, C]`` images, or ``[B, T, C]`` signals when
  ``ndim=1`` (1-D convolutions, as for mnist1d).
  """

  features: Sequence[int] = (16, 32)
  num_classes: int = 10
  ndim: int = 2
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # Nothing differs in training; taken so all models match.
    window = (2,) * self.ndim
    for width in self.features:
      x = nn.Conv(width, kernel_size=(3,) * self.ndim)(x)
      x = nn.max_pool(self.activation(x), window, strides=window)
    x = jnp.reshape(x, (x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)
