"""Gradient norm variance regularisation (GNVR).

Objective: J(θ) = L(θ) + λ · Var_i ‖∇_θ ℓ_i(θ)‖₂, the variance over the B
examples of the batch with ``ddof`` degrees of freedom removed (unbiased,
ddof = 1, by default, as `torch.var`):

    Var = Σ_i (n_i − mean(n))² / (B − ddof),   n_i = ‖∇ℓ_i(θ)‖.

The update is ∇J, so the penalty is differentiated through the per-example
gradient norms (a second-order derivative).

Per-example norms, by ``method``:

* ``"vmap"``: per-example gradients with ``jax.vmap(jax.grad(ℓ))``, where ℓ
  calls ``loss_fn`` on a batch of one example with the step's key. Exact for
  any model, but it materialises B gradients. Layers that mix examples
  (batch normalisation in training mode) see a batch of one there, so
  "per-example gradient" means the gradient of that one-example loss.
* ``"ghost"``: ghost norms (`gnp.penalties.ghost` has the mathematics,
  `gnp.penalties.ghost_jaxpr` how the uses are found): from the inputs and
  output cotangents of each linear use of a parameter (a dense layer, a
  convolution, an additive bias) found in the jaxpr of ``loss_fn``, which
  runs once on the whole batch; no per-example gradient of the whole model
  is formed. Any JAX model (Flax linen or NNX, Equinox, plain
  ``jax.numpy``), but exact only where every parameter reaches the losses
  through such uses and examples do not interact; anything else (an
  embedding gather, a norm's scale, batch normalisation in training mode,
  ...) raises a ValueError that names the parameter and the primitive.
  An L2 term in the loss keeps this path when it is declared with
  `gnp.penalties.with_l2` (as the training system's ``optimizer.l2`` is):
  its part of each n_i is added analytically.
* ``"auto"`` (default): ``"ghost"`` where it applies, ``"vmap"`` otherwise.
  Decided when the gradient function is traced, from the model's structure.

Randomness differs between the two: ``"ghost"`` takes ℓ_i from the one
batched call of ``loss_fn`` (the call that also gives L and aux), so example i
sees the same dropout mask in its norm as in L; ``"vmap"`` calls ``loss_fn``
once per example with the same key, so each example's dropout mask is drawn
for a batch of one and differs from the batched call's (and repeats across
examples). Without randomness (or with ``key=None``) they agree to rounding.

The norm's square root has derivative 0 at 0 here, so an example with zero
gradient contributes no NaN.

Gradient accumulation (``loss_fn`` an `accumulation.AccumulatedLoss` of k
microbatches): the per-example norms are computed on each microbatch with
the loss it wraps, and the step is still the whole batch's. As
Σ_i (n_i − n̄) = 0,

    ∇ Var = 2/(B − ddof) Σ_i (n_i − n̄) (∇n_i − ∇n̄)
          = 2/(B − ddof) Σ_i (n_i − n̄) ∇n_i,

a sum over examples once the mean n̄ is known. So a first pass computes
every n_i (first order, one microbatch at a time), giving n̄ and Var, and a
second differentiates, microbatch by microbatch, L_j / k + λ Σ_{i ∈ j}
(n_i − n̄)² / (B − ddof) with n̄ held constant; the gradients summed over j
are ∇J.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from gnp import _checks
from gnp.penalties import _base
from gnp.penalties import accumulation
from gnp.penalties import ghost


def vmap_per_example_norms(loss_fn: _base.LossFn, params, batch, key):
  """‖∇ℓ_i(θ)‖ for every example i, from B materialised per-example gradients.

  Differentiable in `params`. Returns (mean loss L(θ) and aux from one batched
  call of `loss_fn`, [B] norms, the mean of the per-example gradients, i.e.
  ∇L(θ) for a model that treats examples independently).
  """
  loss, aux = _base.mean_loss_fn(loss_fn, batch, key)(params)

  def example_loss(p, example):
    losses, _ = loss_fn(p, jax.tree.map(lambda x: x[None], example), key)
    return losses[0]

  per_example_grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(
      params, batch
  )
  squared = sum(
      jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1)
      for g in jax.tree.leaves(per_example_grads)
  )
  mean_grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example_grads)
  return loss, aux, _base.safe_sqrt(squared), mean_grad


def auto_per_example_norms(loss_fn: _base.LossFn, params, batch, key):
  """Ghost norms where the ghost path accepts the model, else vmap."""
  try:
    return ghost.per_example_norms(loss_fn, params, batch, key)
  except ghost.UnsupportedModelError as e:
    # Logged once per trace: the vmap path can cost tens of plain steps.
    logging.getLogger(__name__).warning(
        "GNVR: no ghost norms (%s); using per-example gradients (vmap).", e)
    return vmap_per_example_norms(loss_fn, params, batch, key)


# method name -> (loss_fn, params, batch, key)
#   -> (mean loss, aux, per-example norms [B], mean gradient)
PER_EXAMPLE_NORMS: dict[str, Callable] = {
    "auto": auto_per_example_norms,
    "ghost": ghost.per_example_norms,
    "vmap": vmap_per_example_norms,
}


def gradient_norm_variance(
    loss_fn: _base.LossFn,
    *,
    lam: jax.typing.ArrayLike,
    ddof: int = 1,
    method: str = "auto",
) -> _base.GradientFn:
  """The gradient of L(θ) + λ · Var_i ‖∇ℓ_i(θ)‖ (GNVR).

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``.
    lam: the penalty weight λ (≥ 0); may be a traced scalar.
    ddof: the variance divides by B − ddof (1: unbiased; 0: population).
    method: how per-example gradient norms are computed, one of
      ``PER_EXAMPLE_NORMS``: ``"auto"`` (ghost norms where every parameter
      is used linearly, see `ghost_jaxpr`, else vmap), ``"ghost"`` or
      ``"vmap"``; see the module docstring, also for how ``key`` is used.

  Returns:
    A `GradientFn`. Its ``loss`` is the objective J; aux comes from
    ``loss_fn`` on the whole batch. Stats hold ``task_loss``, ``penalty`` (the
    variance), ``grad_norm`` (‖∇L‖) and ``mean_example_grad_norm`` (mean_i n_i).

  Raises:
    ValueError: negative ``lam`` or ``ddof``, an unknown ``method``, or (when
      called) a batch of B ≤ ddof examples, or a model that ``"ghost"`` cannot
      handle exactly (`ghost.UnsupportedModelError`).

  Example:
    >>> import jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> grad_fn = gnp.penalties.gradient_norm_variance(loss_fn, lam=0.1)
    >>> (loss, _), grads = grad_fn(jnp.ones(3), jnp.eye(3), None)
  """
  _checks.check_nonnegative("lam", lam)
  if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
    raise ValueError(f"ddof must be a non-negative integer, got ddof={ddof!r}.")
  if method not in PER_EXAMPLE_NORMS:
    raise ValueError(
        f"unknown method={method!r}; choose one of {sorted(PER_EXAMPLE_NORMS)}."
    )
  per_example_norms = PER_EXAMPLE_NORMS[method]

  def body(params, batch, key):
    size = _base.batch_size(batch)
    if size <= ddof:
      raise ValueError(
          f"the variance with ddof={ddof} needs more than {ddof} examples; "
          f"the batch has {size}."
      )

    if isinstance(loss_fn, accumulation.AccumulatedLoss):
      return accumulated(params, batch, key)

    def objective(p):
      loss, aux, norms, mean_grad = per_example_norms(loss_fn, p, batch, key)
      variance = jnp.sum((norms - jnp.mean(norms)) ** 2) / (size - ddof)
      stats = {
          "task_loss": loss,
          "penalty": variance,
          "grad_norm": otu.tree_norm(mean_grad),
          "mean_example_grad_norm": jnp.mean(norms),
      }
      return loss + lam * variance, aux, stats

    return _base.value_and_grad_with_stats(objective, params)

  def accumulated(params, batch, key):
    # The two passes of the module docstring.
    size, steps = _base.batch_size(batch), loss_fn.steps
    norms_of = lambda p, b, k: per_example_norms(loss_fn.loss_fn, p, b, k)
    _, norms = loss_fn.sequential(
        lambda b, k: ((), norms_of(params, b, k)[2]), batch, key)
    norms = jax.lax.stop_gradient(norms)
    mean_norm = jnp.mean(norms)
    variance = jnp.sum((norms - mean_norm) ** 2) / (size - ddof)

    def microbatch(b, k):
      def surrogate(p):
        loss, aux, norms, mean_grad = norms_of(p, b, k)
        deviation = jnp.sum((norms - mean_norm) ** 2) / (size - ddof)
        return loss / steps + lam * deviation, (loss, aux, mean_grad)

      (_, (loss, aux, mean_grad)), grads = jax.value_and_grad(
          surrogate, has_aux=True)(params)
      return (loss, mean_grad, grads), aux

    (loss, mean_grad, grads), aux = loss_fn.sequential(microbatch, batch, key)
    loss = loss / steps
    stats = {
        "task_loss": loss,
        "penalty": variance,
        "grad_norm": otu.tree_norm(mean_grad) / steps,
        "mean_example_grad_norm": mean_norm,
    }
    return loss + lam * variance, aux, grads, jax.lax.stop_gradient(stats)

  return _base.GradientFn(
      f"gradient_norm_variance(lam={lam}, ddof={ddof}, method={method!r})", body
  )
