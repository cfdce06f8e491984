"""Gradient accumulation: a batch's loss evaluated microbatch by microbatch.

Cut a batch of B examples into k microbatches of b = B / k. The mean loss is
the mean of the microbatches' mean losses, L(θ) = (1/k) Σ_j L_j(θ), and so
is each of its derivatives: ∇L = (1/k) Σ_j ∇L_j, H v = (1/k) Σ_j H_j v, and
so on to any order. `accumulate(loss_fn, k)` is a loss function that
evaluates the k microbatches in sequence (`jax.lax.scan`), each one's pass
rematerialised (`jax.checkpoint`). Every derivative of it is the whole
batch's, up to rounding; gradients, Hessian-vector products (forward over
reverse) and their gradients (reverse over forward over reverse) keep the
activations of one microbatch instead of the batch's, but reverse over
reverse does not (below). A regulariser handed it in place of ``loss_fn``
computes its whole-batch step in less memory:

* The first-order methods (plain, SAM, finite-difference GNP; GC and NGS
  transform the gradient afterwards) take `value_and_grad`, which sums each
  microbatch's gradient as it goes and recomputes nothing: a plain step
  costs what it costs on the whole batch. SAM and GNP run it twice, at θ and
  at θ + r ĝ, ĝ from the accumulated whole-batch gradient.
* Exact GNP (a Hessian-vector product, forward over reverse) and the
  Hessian penalty (reverse over forward over reverse) differentiate through
  the accumulated loss; the checkpoint makes each backward pass recompute
  its microbatch's forward pass.
* GNVR, per-example clipping and GVR run their own computation on each
  microbatch, with the loss this one wraps (`AccumulatedLoss.sequential`),
  after a first pass for what the step needs from the whole batch: GNVR's
  mean norm, clipping's median and MAD, GVR's gradient difference (reverse
  mode over the rematerialised backward pass, which GVR's gradient of a
  gradient would be, keeps every microbatch's activations). Their modules
  have the mathematics; their steps equal the whole batch's too.

Which examples. Microbatch j holds examples j, j + k, j + 2k, … (the batch
viewed as [B/k, k] and transposed). A batch split over D devices in
contiguous blocks of B/D examples then gives every device B/(Dk) examples of
every microbatch when k divides B/D, so nothing moves between devices.

Randomness. Microbatch j's loss gets the key ``fold_in(key, j)`` (None stays
None): dropout masks are drawn per microbatch and differ from those of the
whole batch's pass. Keys drawn outside the loss (Hessian probes, GVR's views)
are the whole batch's.

Layers that mix examples. Batch normalisation in training mode normalises
each microbatch with that microbatch's statistics, as accumulation in
PyTorch does, so with it the loss is not the whole batch's. The loss
function's aux comes back stacked along a leading axis of k, one entry per
microbatch (`gnp.step` averages the running statistics over it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from gnp import _checks
from gnp.penalties import _base


@dataclasses.dataclass(frozen=True, eq=False)
class AccumulatedLoss:
  """``loss_fn`` over ``steps`` microbatches in sequence; a loss function.

  Calling it, ``(params, batch, key) -> (losses, aux)``, gives the [B]
  losses in the batch's order and aux stacked over the microbatches.
  """

  loss_fn: _base.LossFn
  steps: int

  def split(self, batch: _base.Batch) -> _base.Batch:
    """[B, ...] leaves -> [k, B/k, ...]: microbatch j is examples j + k i."""
    size = _base.batch_size(batch)
    if size % self.steps:
      raise ValueError(
          f"{self.steps} microbatches do not divide the batch of {size}.")
    return jax.tree.map(
        lambda x: jnp.swapaxes(
            x.reshape((size // self.steps, self.steps) + x.shape[1:]), 0, 1),
        batch)

  def merge(self, stacked):
    """`split`'s inverse: [k, B/k, ...] leaves -> [B, ...] in batch order."""
    return jax.tree.map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), stacked)

  def keys(self, key):
    """Microbatch j's key, ``fold_in(key, j)``, stacked; None for None."""
    return _base.fold_in_each(key, self.steps)

  def sequential(self, fn: Callable, batch: _base.Batch, key) -> tuple[Any,
                                                                        Any]:
    """Runs ``fn(microbatch, key_j) -> (summed, stacked)`` on each microbatch.

    One microbatch at a time (`jax.lax.scan`); returns the sum over the
    microbatches of ``summed`` (a running sum: one copy in memory) and
    ``stacked`` stacked along a leading axis of k.
    """
    xs = (self.split(batch), self.keys(key))
    first = jax.tree.map(lambda x: x[0], xs)
    summed_shape = jax.eval_shape(lambda xs: fn(*xs)[0], first)

    def step(total, xs):
      summed, stacked = fn(*xs)
      return jax.tree.map(jnp.add, total, summed), stacked

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), summed_shape)
    return jax.lax.scan(step, zeros, xs)

  def __call__(self, params, batch, key):
    # Rematerialised, so that a backward pass through the scan keeps each
    # microbatch's inputs, not its activations (prevent_cse is not needed
    # inside a scan, and it would hinder XLA's optimisations).
    loss = jax.checkpoint(self.loss_fn, prevent_cse=False)
    _, (losses, aux) = self.sequential(
        lambda b, k: ((), loss(params, b, k)), batch, key)
    if jnp.ndim(losses) != 2:
      raise ValueError(
          "loss_fn must return per-example losses of shape [B]; got shape "
          f"{jnp.shape(losses)[1:]} for a microbatch.")
    return self.merge(losses), aux

  def __repr__(self) -> str:
    return f"accumulate({self.loss_fn!r}, steps={self.steps})"


def accumulate(loss_fn: _base.LossFn, steps: int) -> _base.LossFn:
  """``loss_fn`` evaluated in ``steps`` microbatches, one after the other.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``.
    steps: k, the number of microbatches; it must divide the batch size
      when the loss is called. 1 returns ``loss_fn`` itself.

  Returns:
    An `AccumulatedLoss` (a loss function): the same [B] losses, in the
    batch's order, with aux stacked over the k microbatches (module
    docstring). Every regulariser in `gnp.penalties` computes its whole-batch
    step from it.

  Raises:
    ValueError: ``steps`` not a positive integer.

  Example:
    >>> import jax, jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> grad_fn = gnp.penalties.sam(gnp.penalties.accumulate(loss_fn, 2),
    ...                             rho=0.05)
    >>> (loss, _), grads = grad_fn(jnp.ones(3), jnp.eye(4, 3), None)
  """
  _checks.check_positive_int("steps", steps)
  return loss_fn if steps == 1 else AccumulatedLoss(loss_fn, steps)


def value_and_grad(loss_fn: _base.LossFn, batch: _base.Batch, key) -> Callable:
  """``params -> ((L, aux), ∇L)`` of the mean loss of ``batch``.

  `jax.value_and_grad` of `_base.mean_loss_fn`; for an `AccumulatedLoss`,
  each microbatch's value and gradient in turn, summed: one forward and one
  backward pass per microbatch, none recomputed. What the first-order
  methods use; its aux is stacked over the microbatches.
  """
  if not isinstance(loss_fn, AccumulatedLoss):
    return jax.value_and_grad(_base.mean_loss_fn(loss_fn, batch, key),
                              has_aux=True)

  def accumulated(params):
    def microbatch(b, k):
      (loss, aux), grads = jax.value_and_grad(
          _base.mean_loss_fn(loss_fn.loss_fn, b, k), has_aux=True)(params)
      return (loss, grads), aux

    (loss, grads), aux = loss_fn.sequential(microbatch, batch, key)
    return (loss / loss_fn.steps, aux), otu.tree_scale(1.0 / loss_fn.steps,
                                                       grads)

  return accumulated
