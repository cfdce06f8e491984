"""The unregularised gradient: the baseline every method is compared with.

Objective: L(θ) = mean_i ℓ_i(θ). Update: ∇L(θ).
"""

import jax
from optax import tree_utils as otu

from gnp.penalties import _base
from gnp.penalties import accumulation


def plain(loss_fn: _base.LossFn) -> _base.GradientFn:
  """The gradient of the mean loss, `jax.value_and_grad` in gnp's convention.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``.

  Returns:
    A `GradientFn`; its stats hold ``task_loss``, ``penalty`` (always 0) and
    ``grad_norm``.

  Example:
    >>> import jax, jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: ((x @ w) ** 2, None)
    >>> (loss, _), g = gnp.penalties.plain(loss_fn)(jnp.ones(2), jnp.eye(2), None)
    >>> print(loss, g)
    1.0 [1. 1.]
  """

  def body(params, batch, key):
    (loss, aux), grads = accumulation.value_and_grad(loss_fn, batch, key)(
        params)
    stats = {
        "task_loss": loss,
        "penalty": jax.numpy.zeros_like(loss),
        "grad_norm": otu.tree_norm(grads),
    }
    return loss, aux, grads, stats

  return _base.GradientFn("plain", body)
