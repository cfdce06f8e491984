"""Robust per-example gradient clipping (METHODS.md §7).

Each example's gradient is clipped to a threshold before the batch mean, so
that a few examples with outlying gradients (mislabelled ones, on noisy
labels) cannot dominate the update. With n_i = ‖∇ℓ_i(θ)‖ and a threshold τ,

    update = (1/B) Σ_i c_i ∇ℓ_i(θ),   c_i = min(1, τ / n_i)   (c_i = 1 if n_i = 0),

and τ is either fixed (``max_norm``) or robust (``outlier_mads`` = k):

    τ = median_i(n_i) + k · 1.4826 · MAD,   MAD = median_i |n_i − median_j(n_j)|,

1.4826 · MAD being the normal-consistent robust estimate of the norms'
standard deviation: with k = 3, "more than three robust standard deviations
above the median". τ and the c_i are held constant (no derivative flows
through them), so the update is a reweighted gradient, not the gradient of
an objective; the loss reported is L(θ) = mean_i ℓ_i(θ). This is the
per-example clipping of DP-SGD (Abadi et al., CCS 2016,
https://arxiv.org/abs/1607.00133) without the noise, with the robust
threshold of METHODS.md §7 as the alternative to a fixed one. What it can be
expected to do on noisy labels is an open question that the studies answer
empirically: Menon et al. ("Can gradient clipping mitigate label noise?",
ICLR 2020, https://openreview.net/forum?id=rklB76EKPr) prove that per-example
gradient clipping — for a linear model, a Huberised loss — is not robust to
symmetric label noise in general, and propose clipping the loss's gradient
with respect to the prediction instead ("partially Huberised" losses), which
is not what is implemented here.

How, by ``method``:

* ``"ghost"`` ("ghost clipping": Li et al., "Large Language Models Can Be
  Strong Differentially Private Learners", ICLR 2022,
  https://arxiv.org/abs/2110.05679; Bu et al., ICML 2023): one forward pass, one
  backward pass of Σ_i ℓ_i that yields every n_i by ghost norms
  (`gnp.penalties.ghost` has the mathematics, `gnp.penalties.ghost_jaxpr`
  what it supports: any JAX model whose every parameter is used linearly, as
  a dense or convolution kernel or an additive bias), then a second backward
  pass through the same forward pass,
  of Σ_i c_i ℓ_i / B with the c_i constant: ∇ of it is the update. No
  per-example gradient of the whole model is formed. An L2 term declared
  with `gnp.penalties.with_l2` keeps this path; it is part of every ℓ_i, so
  each example's l2 θ_K enters its n_i and is clipped with it: update =
  (1/B) Σ_i c_i (∇ℓ_i + l2 θ_K), as with ``"vmap"``.
* ``"vmap"``: per-example gradients with ``jax.vmap(jax.grad(ℓ))`` (ℓ calls
  ``loss_fn`` on a batch of one with the step's key), clipped and averaged
  directly. Any model, but B gradients in memory; layers that mix examples
  (batch normalisation in training mode) see a batch of one there, so the
  "per-example gradient" is that of the one-example loss. The loss and aux
  come from one batched call.
* ``"auto"`` (default): ``"ghost"`` where it applies, else ``"vmap"``,
  decided when the gradient function is traced (as GNVR's ``auto``).

Gradient accumulation (``loss_fn`` an `accumulation.AccumulatedLoss` of k
microbatches): the update is a sum over examples, so each microbatch
contributes (1/B) Σ_{i ∈ j} c_i ∇ℓ_i, computed as above with the loss the
accumulated one wraps, and the update is the whole batch's. A fixed τ needs
nothing else; the robust τ needs the whole batch's median and MAD, so a
first pass computes every n_i, one microbatch at a time, then τ.

Statistics: ``penalty`` is the fraction of the batch that was clipped
(n_i > τ) — there is no penalty term; this is what a researcher watches —,
``threshold`` τ, and ``mean_example_grad_norm`` mean_i n_i. There is no
``grad_norm``: ∇L itself is never formed (the ghost path's first backward
pass would give it only at the cost of its weight gradients).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp

from gnp import _checks
from gnp.penalties import _base
from gnp.penalties import accumulation
from gnp.penalties import ghost

# MAD × 1.4826 estimates the standard deviation of normally distributed data.
MAD_TO_STD = 1.4826
METHODS = ("auto", "ghost", "vmap")


def threshold(norms, *, max_norm=None, outlier_mads=None):
  """τ: ``max_norm``, or median(n) + outlier_mads · 1.4826 · MAD(n)."""
  if max_norm is not None:
    return jnp.asarray(max_norm, norms.dtype)
  median = jnp.median(norms)
  mad = jnp.median(jnp.abs(norms - median))
  return median + outlier_mads * MAD_TO_STD * mad


def clip_factors(norms, tau):
  """c_i = min(1, τ / n_i), 1 where n_i ≤ τ (so n_i = 0 gives 1, no NaN)."""
  clipped = norms > tau
  return jnp.where(clipped, tau / jnp.where(clipped, norms, 1.0), 1.0)


def _ghost(loss_fn, params, batch, key):
  """(losses [B], aux, norms [B], pullback) from one forward pass."""
  losses, aux, norms, _, pullback = ghost.per_example_norms_with_pullback(
      loss_fn, params, batch, key)
  return losses, aux, norms, pullback


def _vmap(loss_fn, params, batch, key):
  """(losses [B], aux, norms [B], pullback) from per-example gradients."""
  losses, aux = loss_fn(params, batch, key)

  def example_loss(p, example):
    example_losses, _ = loss_fn(p, jax.tree.map(lambda x: x[None], example),
                                key)
    return example_losses[0]

  per_example_grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(
      params, batch)
  squared = sum(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1)
                for g in jax.tree.leaves(per_example_grads))

  def pullback(weights):
    return jax.tree.map(
        lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1),
        per_example_grads)

  return losses, aux, _base.safe_sqrt(squared), pullback


def _auto(loss_fn, params, batch, key):
  try:
    return _ghost(loss_fn, params, batch, key)
  except ghost.UnsupportedModelError as e:
    # Logged once per trace: per-example gradients can cost tens of steps.
    logging.getLogger(__name__).warning(
        "per-example clipping: no ghost norms (%s); using per-example "
        "gradients (vmap).", e)
    return _vmap(loss_fn, params, batch, key)


_PATHS: dict[str, Callable] = {"auto": _auto, "ghost": _ghost, "vmap": _vmap}


def _check_threshold(name, value, *, strict):
  if isinstance(value, jax.core.Tracer):
    _checks.check_nonnegative(name, value)  # Its shape only.
    return
  try:
    concrete = float(value)
  except (TypeError, ValueError):
    concrete = math.nan
  if not (math.isfinite(concrete) and (concrete > 0 if strict
                                       else concrete >= 0)):
    raise ValueError(f"{name} must be finite and {'> 0' if strict else '≥ 0'},"
                     f" got {name}={value!r}.")


def per_example_clipping(
    loss_fn: _base.LossFn,
    *,
    max_norm: jax.typing.ArrayLike | None = None,
    outlier_mads: jax.typing.ArrayLike | None = None,
    method: str = "auto",
) -> _base.GradientFn:
  """Per-example gradients clipped to τ, then averaged.

  ``update = (1/B) Σ_i min(1, τ / ‖∇ℓ_i‖) ∇ℓ_i``, τ fixed or robust
  (median + k · 1.4826 · MAD of the per-example norms), held constant.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``.
    max_norm: a fixed threshold τ > 0; may be a traced scalar.
    outlier_mads: k ≥ 0 for the robust τ = median(n) + k · 1.4826 · MAD(n)
      over the batch (k = 0 clips to the median norm); may be a traced
      scalar. Exactly one of ``max_norm`` and ``outlier_mads`` is given.
    method: ``"auto"`` (ghost norms and a second backward pass where every
      parameter is used linearly, see `ghost_jaxpr`, else vmap), ``"ghost"`` or
      ``"vmap"``; see the module docstring, also for how ``key`` is used.

  Returns:
    A `GradientFn`. Its ``loss`` is L(θ) = mean_i ℓ_i(θ) and its aux the
    loss function's from one call on the whole batch. Stats hold
    ``task_loss`` (L(θ)), ``penalty`` (the fraction of examples clipped,
    n_i > τ), ``threshold`` (τ) and ``mean_example_grad_norm`` (mean_i n_i).

  Raises:
    ValueError: neither or both thresholds, ``max_norm`` ≤ 0,
      ``outlier_mads`` < 0, either not finite, an unknown ``method``, or (when
      called) a model that ``"ghost"`` cannot handle exactly
      (`ghost.UnsupportedModelError`).

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
    https://arxiv.org/abs/1607.00133 (per-example clipping); Li et al.,
    ICLR 2022, https://arxiv.org/abs/2110.05679 (ghost clipping); Menon et
    al., "Can gradient clipping mitigate label noise?", ICLR 2020,
    https://openreview.net/forum?id=rklB76EKPr.

  Example:
    >>> import jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> grad_fn = gnp.penalties.per_example_clipping(loss_fn, max_norm=1.0)
    >>> (loss, _), grads = grad_fn(jnp.ones(3), jnp.eye(3), None)
  """
  if (max_norm is None) == (outlier_mads is None):
    raise ValueError(
        "give exactly one threshold: max_norm (a fixed τ) or outlier_mads (τ ="
        " median + k·1.4826·MAD of the per-example norms); got max_norm="
        f"{max_norm!r}, outlier_mads={outlier_mads!r}.")
  if max_norm is not None:
    _check_threshold("max_norm", max_norm, strict=True)
  else:
    _check_threshold("outlier_mads", outlier_mads, strict=False)
  if method not in _PATHS:
    raise ValueError(f"unknown method={method!r}; choose one of {METHODS}.")
  path = _PATHS[method]

  def body(params, batch, key):
    if isinstance(loss_fn, accumulation.AccumulatedLoss):
      return accumulated(params, batch, key)
    losses, aux, norms, pullback = path(loss_fn, params, batch, key)
    if jnp.ndim(losses) != 1:
      raise ValueError(
          "loss_fn must return per-example losses of shape [B]; got shape "
          f"{jnp.shape(losses)}.")
    norms = jax.lax.stop_gradient(norms)
    tau = threshold(norms, max_norm=max_norm, outlier_mads=outlier_mads)
    factors = clip_factors(norms, tau)
    grads = pullback((factors / losses.shape[0]).astype(losses.dtype))
    loss = jnp.mean(losses)
    stats = {
        "task_loss": loss,
        "penalty": jnp.mean((norms > tau).astype(norms.dtype)),
        "threshold": tau,
        "mean_example_grad_norm": jnp.mean(norms),
    }
    return loss, aux, grads, jax.lax.stop_gradient(stats)

  def accumulated(params, batch, key):
    # Microbatch by microbatch with the wrapped loss (module docstring).
    size, inner = _base.batch_size(batch), loss_fn.loss_fn
    tau = None  # A fixed τ: `threshold` casts it to the norms' dtype.
    if outlier_mads is not None:
      _, norms = loss_fn.sequential(
          lambda b, k: ((), path(inner, params, b, k)[2]), batch, key)
      tau = threshold(jax.lax.stop_gradient(norms).reshape(-1),
                      outlier_mads=outlier_mads)

    def microbatch(b, k):
      losses, aux, norms, pullback = path(inner, params, b, k)
      norms = jax.lax.stop_gradient(norms)
      fixed = threshold(norms, max_norm=max_norm) if tau is None else tau
      factors = clip_factors(norms, fixed)
      grads = pullback((factors / size).astype(losses.dtype))
      sums = (jnp.sum(losses), jnp.sum((norms > fixed).astype(norms.dtype)),
              jnp.sum(norms))
      return (grads, sums), aux

    (grads, (loss, clipped, norm)), aux = loss_fn.sequential(
        microbatch, batch, key)
    loss, clipped, norm = loss / size, clipped / size, norm / size
    tau = threshold(norm, max_norm=max_norm) if tau is None else tau
    stats = {"task_loss": loss, "penalty": clipped, "threshold": tau,
             "mean_example_grad_norm": norm}
    return loss, aux, grads, jax.lax.stop_gradient(stats)

  which = (f"max_norm={max_norm}" if max_norm is not None
           else f"outlier_mads={outlier_mads}")
  return _base.GradientFn(
      f"per_example_clipping({which}, method={method!r})", body)
