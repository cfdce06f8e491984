"""A multilayer perceptron and a small convolutional network.

Both compute in ``dtype`` (e.g. ``jnp.bfloat16``) on float32 parameters, as
the CIFAR models do, and return logits in at least float32. Their ``dtype``
defaults to None, Flax's "the dtype of the inputs and parameters", so float64
tests compute in float64.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gnp.errors import ConfigError


class MLP(nn.Module):
  """Dense layers of the given widths; the last width is the output size.

  Inputs are flattened past the batch axis; the activation follows every layer
  but the last. ``MLP((256, 256, 10))`` on mnist1d is the 40→256→256→10 MLP.

  Attributes:
    features: the width of each Dense layer, the number of logits last.
    activation: applied after every layer but the last.
    dtype: computation dtype, e.g. ``jnp.bfloat16``, or None for that of the
      inputs and parameters; parameters are float32 and the logits at least
      float32 whatever it is.
  """

  features: Sequence[int]
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # Nothing differs in training; taken so all models match.
    x = jnp.asarray(jnp.reshape(x, (x.shape[0], -1)), self.dtype)
    for i, width in enumerate(self.features):
      x = nn.Dense(width, dtype=self.dtype)(x)
      if i < len(self.features) - 1:
        x = self.activation(x)
    return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))


class CNN(nn.Module):
  """Convolutions, each followed by a halving max-pool, then a Dense head.

  Inputs are ``[B, *spatial, C]`` with ``ndim`` spatial axes: ``[B, H, W, C]``
  images for ``ndim=2``, ``[B, T, C]`` signals for ``ndim=1``. Inputs without
  the channel axis, such as mnist1d's ``[B, T]``, get one of size 1. Kernels
  are 3 wide along each spatial axis (3×3 for images; ``(3, 1, features[0])``
  first for mnist1d, a 1-D convolution), and every max-pool, 2 wide with
  stride 2, halves each spatial axis (rounding down).

  Attributes:
    features: the width of each convolution.
    num_classes: number of logits.
    ndim: number of spatial axes, at least 1.
    activation: applied after every convolution, before its pooling.
    dtype: computation dtype, e.g. ``jnp.bfloat16``, or None for that of the
      inputs and parameters; parameters are float32 and the logits at least
      float32 whatever it is.
  """

  features: Sequence[int] = (16, 32)
  num_classes: int = 10
  ndim: int = 2
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = None

  def __post_init__(self):
    # A 0-D "convolution" is a Dense layer over the whole input, and its
    # max-pool does nothing: refuse it rather than build it silently.
    if self.ndim < 1:
      raise ConfigError(
          f"CNN ndim must be >= 1 (its spatial axes); got {self.ndim}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # Nothing differs in training; taken so all models match.
    if x.ndim == self.ndim + 1:
      x = x[..., None]  # No channel axis, e.g. [B, T] signals: one channel.
    if x.ndim != self.ndim + 2:
      raise ValueError(
          f"CNN with ndim={self.ndim} takes inputs [batch, {self.ndim} spatial"
          f" axes(, channels)]; got shape {x.shape}"
      )
    # Each max-pool halves (rounding down) every spatial axis; refuse inputs
    # too small for them rather than pool down to an empty feature map.
    needed = 2 ** len(self.features)
    if min(x.shape[1:-1]) < needed:
      raise ConfigError(
          f"CNN with {len(self.features)} convolutions (features; a config's"
          f" model.hidden) pools each spatial axis {len(self.features)} times,"
          f" so needs inputs at least {needed} long; got spatial shape"
          f" {x.shape[1:-1]}"
      )
    x = jnp.asarray(x, self.dtype)
    window = (2,) * self.ndim
    for width in self.features:
      x = nn.Conv(width, kernel_size=(3,) * self.ndim, dtype=self.dtype)(x)
      x = nn.max_pool(self.activation(x), window, strides=window)
    x = jnp.reshape(x, (x.shape[0], -1))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
