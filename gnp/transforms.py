"""Gradient Centralisation (GC) and neuron-wise Gradient Standardisation (NGS).

Both act on each output neuron's fan-in slice of a weight gradient. Flax
stores kernels as ``(in, out)`` (Dense) and ``(..., in, out)`` (Conv), so the
fan-in is every axis but the LAST. ``optax.centralize`` follows PyTorch's
``(out, in, ...)`` layout and averages over every axis but the FIRST; on a
Flax kernel it therefore centres each input unit's slice across output units,
which is not Gradient Centralisation. The transformations here use the Flax
layout.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from gnp import _checks


def _per_output_neuron(
    fn: Callable[[jax.Array, tuple[int, ...]], jax.Array], conv_only: bool
) -> optax.GradientTransformation:
  """Applies ``fn(g, fan_in_axes)`` to every weight leaf of the updates."""
  # Biases and norm scales (ndim <= 1) have no fan-in; Dense kernels are 2-D,
  # so excluding them leaves only convolution kernels (the paper's GCC).
  min_ndim = 3 if conv_only else 2

  def leaf_fn(g):
    if jnp.ndim(g) < min_ndim:
      return g
    # Hyperparameters may be float32 arrays; keep low-precision leaves as is.
    return fn(g, tuple(range(g.ndim - 1))).astype(g.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(leaf_fn, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def centralize(*, conv_only: bool = False) -> optax.GradientTransformation:
  """Centralises each output neuron's gradient over its fan-in (Flax layout).

  For every weight leaf ``g`` with ``g.ndim > 1`` (``> 2`` if ``conv_only``)::

    g <- g - mean(g, axis=range(g.ndim - 1), keepdims=True)

  ``optax.centralize`` differs: it subtracts the mean over every axis but the
  FIRST (PyTorch's ``(out, in, ...)`` layout) and is therefore wrong for Flax
  kernels, where it centres each input unit's slice across output units.

  Args:
    conv_only: if True, only convolution kernels (``ndim > 2``) are centralised
      (the paper's GCC variant); Dense kernels pass through.

  Returns:
    A :class:`optax.GradientTransformation` with an ``optax.EmptyState``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gnp
    >>> opt = optax.chain(gnp.transforms.centralize(), optax.adam(1e-3))
    >>> g = jnp.array([[1., 2.], [3., 6.]])
    >>> tx = gnp.transforms.centralize()
    >>> print(tx.update(g, tx.init(g))[0])
    [[-1. -2.]
     [ 1.  2.]]

  References:
    Yong et al., `Gradient Centralization: A New Optimization Technique for
    Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
  """
  return _per_output_neuron(
      lambda g, axes: g - g.mean(axes, keepdims=True), conv_only
  )


def standardize(
    eps: jax.typing.ArrayLike = 1e-8, *, conv_only: bool = False
) -> optax.GradientTransformation:
  """Standardises each output neuron's gradient over its fan-in (Flax layout).

  For every weight leaf ``g`` with ``g.ndim > 1`` (``> 2`` if ``conv_only``),
  with ``axes = range(g.ndim - 1)`` and the population (``ddof=0``) std::

    g <- (g - mean(g, axes)) / (std(g, axes) + eps)

  ``optax.centralize`` reduces over every axis but the FIRST (PyTorch's
  ``(out, in, ...)`` layout) and is therefore wrong for Flax kernels, where it
  centres each input unit's slice across output units; here the fan-in is
  every axis but the LAST.

  Args:
    eps: non-negative constant added to the std. With ``eps = 0`` a neuron
      whose fan-in gradient is constant (a dead ReLU's: all zeros) gets a
      zero gradient, not NaN.
    conv_only: if True, only convolution kernels (``ndim > 2``) are
      standardised; Dense kernels pass through.

  Returns:
    A :class:`optax.GradientTransformation` with an ``optax.EmptyState``.

  Raises:
    ValueError: if ``eps`` is a concrete negative number or NaN.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gnp
    >>> opt = optax.chain(gnp.transforms.standardize(), optax.adam(1e-3))
    >>> g = jnp.array([[1., 2.], [3., 6.]])
    >>> tx = gnp.transforms.standardize()
    >>> print(tx.update(g, tx.init(g))[0])
    [[-1. -1.]
     [ 1.  1.]]

  References:
    Yong et al., `Gradient Centralization: A New Optimization Technique for
    Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
  """
  _checks.check_nonnegative("eps", eps)

  def fn(g, axes):
    centred = g - g.mean(axes, keepdims=True)
    scale = g.std(axes, keepdims=True) + eps
    # A neuron whose gradient is constant over its fan-in (a dead ReLU's is
    # all zeros) centres to zeros; with eps = 0 that is 0 / 0, which must
    # stay 0 rather than turn the whole update NaN.
    return jnp.where(scale > 0, centred / jnp.where(scale > 0, scale, 1), 0)

  return _per_output_neuron(fn, conv_only)
