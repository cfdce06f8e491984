"""Gradient norm penalty (GNP).

Zhao, Zhang & Hu, "Penalizing Gradient Norm for Efficiently Improving
Generalization in Deep Learning", ICML 2022, https://arxiv.org/abs/2202.03599.

Objective: J(θ) = L(θ) + λ ‖∇L(θ)‖₂, with gradient
∇J = g + λ H g / ‖g‖, where g = ∇L(θ) and H = ∇²L(θ).

* Finite difference (the paper's method, the default). With a radius r and
  α = λ / r, H ĝ ≈ (∇L(θ + r ĝ) − g) / r, ĝ = g / ‖g‖, so
  ``update = (1 − α) g + α ∇L(θ + r ĝ)``: two forward and backward passes.
  α = 1 is SAM with ρ = r. ``normalize_first`` mixes ĝ instead of g
  (``(1 − α) ĝ + α ∇L(θ + r ĝ)``), the default of the official code since 2024.
* Exact: H ĝ is one Hessian-vector product, forward-over-reverse
  (`jax.linearize` of `jax.grad`, i.e. `jax.jvp` of `jax.grad` that shares the
  primal pass), and ``update = g + λ H ĝ`` with λ = α r. The finite-difference
  update approaches it as r → 0 with λ fixed, with error O(r).
* m-sharpness: with ``group_size=m`` the batch is cut into groups of m
  examples and each group takes its own perturbation (and penalty ‖∇L_j‖);
  the update is the mean over groups.
* bfloat16 layers on float32 parameters round θ + r ĝ to bfloat16, losing
  most of r ĝ; ``split_perturbation`` makes them see it (`precision`). The
  exact update needs no split: its tangent ĝ is cast on its own scale. See
  docs/mixed_precision.md for what either costs and achieves.
* Adaptive (``adaptive=True``; ASAM's geometry, Kwon et al., ICML 2021,
  https://arxiv.org/abs/2102.11600). With T = |θ| + η elementwise, the
  perturbation is taken in the ellipsoid ‖T⁻¹ε‖ ≤ r instead of the ball
  ‖ε‖ ≤ r; its first-order maximiser is r d, d = T² ⊙ g / ‖T ⊙ g‖ (in place
  of ĝ). The finite difference then computes
  ``(1 − α) g + α ∇L(θ + r d) = g + λ H d + O(r)``, and H d =
  H T² g / ‖T ⊙ g‖ = ∇_θ ‖T ⊙ ∇L(θ)‖ with T held constant (H is symmetric and
  T diagonal: ∇ ½‖T g‖² = H T² g). So adaptive GNP is the gradient of

      J(θ) = L(θ) + λ ‖T ⊙ ∇L(θ)‖,   T = |θ| + η held constant,

  the gradient norm in the adaptive geometry: ‖T ⊙ g‖ is the dual norm of
  the ellipsoid, max_{‖T⁻¹ε‖ ≤ r} εᵀg = r ‖T ⊙ g‖, the first-order adaptive
  sharpness. ``exact=True`` computes it with one Hessian-vector product along
  d, ``update = g + λ H d``, which the finite difference approaches as r → 0
  with error O(r). Neither differentiates T itself (that would add
  λ sign(θ) ⊙ T ⊙ g² / ‖T ⊙ g‖): ASAM's second pass does not either, its
  perturbation is a constant there. T applies to every parameter, biases
  included — the paper's elementwise operator; see `gnp.penalties.sam` for
  how the official code differs. The penalty reported is ‖T ⊙ g‖.

‖g‖ = 0 (a batch fit perfectly, a dead network) gives ĝ = 0, never NaN; so
does ‖T ⊙ g‖ = 0 with ``adaptive`` (d = 0: no perturbation).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from gnp import _checks
from gnp.penalties import _base
from gnp.penalties import accumulation
from gnp.penalties import precision


def _mix(a, b, weight_a, weight_b):
  """weight_a · a + weight_b · b, in the dtype of `a`'s leaves."""
  return jax.tree.map(
      lambda x, y: (weight_a * x + weight_b * y).astype(x.dtype), a, b
  )


def check_adaptive(adaptive, eta) -> None:
  """ValueError unless ``adaptive`` is a bool and ``eta`` finite and ≥ 0."""
  if not isinstance(adaptive, bool):
    raise ValueError(f"adaptive must be True or False, got {adaptive!r}.")
  _checks.check_nonnegative("eta", eta)
  if not isinstance(eta, jax.core.Tracer) and not math.isfinite(float(eta)):
    raise ValueError(f"eta must be finite, got eta={eta}.")


def ascent_direction(params, grads, adaptive=False, eta=0.01):
  """(d, ‖g‖, ‖T ⊙ g‖): the unit ascent direction and the norms.

  Without ``adaptive``, d = ĝ = g / ‖g‖ and the third value is ‖g‖. With it,
  T = |θ| + η and d = T² ⊙ g / ‖T ⊙ g‖ = T ⊙ u, u = T ⊙ g / ‖T ⊙ g‖ (ASAM):
  the maximiser of εᵀg over the ellipsoid ‖T⁻¹ε‖ ≤ 1. A zero norm gives
  d = 0, never NaN.

  T is divided by s = max T first (d = s T' ⊙ u', T' = T / s), which changes
  nothing mathematically, so that a large η does not overflow ‖T ⊙ g‖ in
  float32 and silently zero the perturbation.
  """
  if not adaptive:
    direction, grad_norm = _base.safe_normalize(grads)
    return direction, grad_norm, grad_norm
  scale = jax.tree.map(lambda p: jnp.abs(p) + eta, params)  # T
  largest = jnp.max(jnp.stack([jnp.max(t) for t in jax.tree.leaves(scale)]))
  largest = jnp.where(largest > 0, largest, 1.0)  # T = 0 (θ = 0, η = 0): d = 0.
  scale = jax.tree.map(lambda t: t / largest, scale)  # T' = T / s ∈ [0, 1]
  unit, scaled_norm = _base.safe_normalize(
      jax.tree.map(lambda t, g: t * g, scale, grads))
  direction = jax.tree.map(lambda p, t, u: (largest * t * u).astype(p.dtype),
                           params, scale, unit)
  return direction, otu.tree_norm(grads), largest * scaled_norm


def perturbed_gradients(loss_fn, params, batch, key, radius, split=False,
                        adaptive=False, eta=0.01, when=None):
  """The two passes shared by finite-difference GNP and SAM.

  Returns (loss, aux, g, ‖g‖, d, perturbed loss, ∇L(θ + radius d), ‖T ⊙ g‖)
  with d and the last norm from `ascent_direction` (d = ĝ and ‖g‖ unless
  ``adaptive``); `aux` comes from the unperturbed pass (its batch statistics
  are the ones to keep). With `split`, low-precision layers see the
  perturbation exactly (`precision.value_and_grad_at`); without such layers
  nothing changes. With ``when`` (a boolean scalar), the second pass runs
  only where it is true, under ``lax.cond``; where it is false, the
  perturbed loss and gradient are L(θ) and ∇L(θ) (RST's plain step, which
  so shares the first pass with SAM's and adds nothing to it).
  """
  if split and isinstance(loss_fn, accumulation.AccumulatedLoss):
    raise ValueError(
        "split_perturbation=True does not support an accumulated loss "
        "(gnp.penalties.accumulate); use one or the other.")
  # An accumulated loss sums the microbatches' gradients, at θ and at
  # θ + radius d alike: two accumulation passes, d from the whole batch's g.
  value_and_grad = accumulation.value_and_grad(loss_fn, batch, key)
  calls = []
  if split:
    (loss, aux), grads = jax.value_and_grad(
        _base.mean_loss_fn(precision.recording(loss_fn, calls), batch, key),
        has_aux=True)(params)
  else:
    (loss, aux), grads = value_and_grad(params)
  direction, grad_norm, scaled_norm = ascent_direction(params, grads,
                                                       adaptive, eta)

  def second_pass():
    if calls:
      shift = jax.tree.map(lambda p, d: (radius * d).astype(p.dtype), params,
                           direction)
      (perturbed_loss, _), perturbed_grads = precision.value_and_grad_at(
          _base.mean_loss_fn(loss_fn, batch, key), params, shift,
          calls=calls)
    else:
      perturbed = _mix(params, direction, 1.0, radius)
      (perturbed_loss, _), perturbed_grads = value_and_grad(perturbed)
    return perturbed_loss, perturbed_grads

  if when is None:
    perturbed_loss, perturbed_grads = second_pass()
  else:
    perturbed_loss, perturbed_grads = jax.lax.cond(
        when, second_pass, lambda: (loss, grads))
  return (loss, aux, grads, grad_norm, direction, perturbed_loss,
          perturbed_grads, scaled_norm)


def gradient_norm(
    loss_fn: _base.LossFn,
    *,
    r: jax.typing.ArrayLike,
    alpha: jax.typing.ArrayLike,
    exact: bool = False,
    normalize_first: bool = False,
    group_size: int | None = None,
    split_perturbation: bool = False,
    adaptive: bool = False,
    eta: float = 0.01,
) -> _base.GradientFn:
  """Gradient norm penalty: the gradient of L(θ) + α r ‖∇L(θ)‖.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``. Both passes use the same ``key``, so dropout masks match.
    r: the finite-difference radius (≥ 0); may be a traced scalar.
    alpha: the mixing weight (≥ 0); λ = alpha · r. May be a traced scalar.
    exact: use a Hessian-vector product instead of the finite difference.
    normalize_first: mix ĝ = g/‖g‖ rather than g (finite difference only).
    group_size: m for m-sharpness (must divide the batch size); None = the
      whole batch takes one perturbation.
    split_perturbation: evaluate each low-precision ``nn.Dense``/``nn.Conv``
      (e.g. bfloat16 on float32 parameters) at θ + r ĝ as
      f(x; θ) + f(x; r ĝ), so that it sees r ĝ, not its rounding against θ
      (`gnp.penalties.precision`; finite difference only). No effect where
      no layer computes in a narrower dtype than its parameters.
    adaptive: perturb along d = T² ⊙ g / ‖T ⊙ g‖, T = |θ| + η (ASAM's
      geometry), for the penalty λ‖T ⊙ ∇L‖ with T held constant (module
      docstring); finite difference and exact alike.
    eta: η ≥ 0, the floor of T that keeps zero weights perturbable (0.01 in
      the ASAM paper). Static. Ignored unless ``adaptive``.

  Returns:
    A `GradientFn`. Its ``loss`` is the objective L + λ‖∇L‖ (L + λ‖T ⊙ ∇L‖
    with ``adaptive``; mean over groups with ``group_size``); stats hold
    ``task_loss``, ``penalty`` (‖∇L‖, or ‖T ⊙ ∇L‖ with ``adaptive``),
    ``grad_norm`` (‖∇L‖) and, for the finite difference, ``perturbed_loss``
    L(θ + r d). With ``group_size``, aux is stacked over the B/m groups.

  Raises:
    ValueError: negative ``r`` or ``alpha``, a bad ``group_size``,
      ``normalize_first`` or ``split_perturbation`` with ``exact``,
      ``normalize_first`` with ``adaptive``, a non-bool ``adaptive`` or a
      negative or infinite ``eta``.

  References:
    Zhao, Zhang & Hu, ICML 2022, https://arxiv.org/abs/2202.03599;
    Kwon et al. (ASAM), ICML 2021, https://arxiv.org/abs/2102.11600.

  Example:
    >>> import jax, jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> grad_fn = gnp.penalties.gradient_norm(loss_fn, r=0.05, alpha=0.8)
    >>> (loss, aux), grads = grad_fn(jnp.ones(3), jnp.eye(3), None)
  """
  _checks.check_nonnegative("r", r)
  _checks.check_nonnegative("alpha", alpha)
  _checks.check_positive_int("group_size", group_size, allow_none=True)
  check_adaptive(adaptive, eta)
  if adaptive and normalize_first:
    raise ValueError(
        "normalize_first=True mixes g/‖g‖ into the update; with adaptive=True"
        " the perturbation is T²g/‖Tg‖ and that mixture is not GNP's gradient"
        " in either geometry. Use one of the two.")
  if exact and normalize_first:
    raise ValueError(
        "normalize_first=True applies to the finite-difference update only; "
        "the exact gradient of L + λ‖∇L‖ has no normalised-first form."
    )
  if exact and split_perturbation:
    raise ValueError(
        "split_perturbation=True applies to the finite-difference update "
        "only; the exact update perturbs nothing (its Hessian-vector "
        "product carries ĝ as a tangent, cast on its own scale)."
    )

  def finite_difference(params, batch, key):
    (loss, aux, grads, grad_norm, direction, perturbed_loss, perturbed_grads,
     penalty) = perturbed_gradients(loss_fn, params, batch, key, r,
                                    split=split_perturbation,
                                    adaptive=adaptive, eta=eta)
    first = direction if normalize_first else grads
    update = _mix(first, perturbed_grads, 1.0 - alpha, alpha)
    stats = {
        "task_loss": loss,
        "penalty": penalty,
        "grad_norm": grad_norm,
        "perturbed_loss": perturbed_loss,
    }
    return loss + alpha * r * penalty, aux, update, stats

  def hessian_vector(params, batch, key):
    value_and_grad = jax.value_and_grad(
        _base.mean_loss_fn(loss_fn, batch, key), has_aux=True
    )

    def grad_with_aux(p):
      (loss, aux), grads = value_and_grad(p)
      return grads, (loss, aux)

    # linearize runs the forward and backward pass once and keeps what the
    # tangent (Hessian-vector) pass needs, so g is not computed twice.
    grads, hvp, (loss, aux) = jax.linearize(grad_with_aux, params, has_aux=True)
    direction, grad_norm, penalty = ascent_direction(params, grads, adaptive,
                                                     eta)
    update = _mix(grads, hvp(direction), 1.0, alpha * r)
    stats = {"task_loss": loss, "penalty": penalty, "grad_norm": grad_norm}
    return loss + alpha * r * penalty, aux, update, stats

  body = hessian_vector if exact else finite_difference
  name = (f"gradient_norm(r={r}, alpha={alpha}, exact={exact}"
          + (f", adaptive=True, eta={eta}" if adaptive else "")
          + (", split_perturbation=True)" if split_perturbation else ")"))
  return _base.GradientFn(name, _base.in_groups(body, group_size))
