"""Sharpness-aware minimisation (SAM).

Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", ICLR 2021,
https://arxiv.org/abs/2010.01412.

Objective: max_{‖ε‖ ≤ ρ} L(θ + ε) ≈ L(θ + ρ ĝ), ĝ = g / ‖g‖.
Update: ``∇L(θ + ρ ĝ)`` — the finite-difference gradient norm penalty with
α = 1 and r = ρ. With ``group_size=m`` each group of m examples takes its own
perturbation (m-sharpness; the original per-device SAM). With bfloat16 layers
on float32 parameters, ``split_perturbation`` makes the layers see ρ ĝ
rather than its rounding against θ (`precision`, docs/mixed_precision.md).
"""

from __future__ import annotations

import jax

from gnp import _checks
from gnp.penalties import _base
from gnp.penalties.gradient_norm import perturbed_gradients


def sam(
    loss_fn: _base.LossFn,
    *,
    rho: jax.typing.ArrayLike,
    group_size: int | None = None,
    split_perturbation: bool = False,
) -> _base.GradientFn:
  """Sharpness-aware minimisation: the gradient at θ + ρ g/‖g‖.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``. Both passes use the same ``key``.
    rho: the neighbourhood radius (≥ 0); may be a traced scalar.
    group_size: m for m-sharpness (must divide the batch size); None = one
      perturbation for the whole batch.
    split_perturbation: evaluate each low-precision ``nn.Dense``/``nn.Conv``
      (e.g. bfloat16 on float32 parameters) at θ + ρ ĝ as
      f(x; θ) + f(x; ρ ĝ), so that it sees ρ ĝ, not its rounding against θ
      (`gnp.penalties.precision`). No effect where no layer computes in a
      narrower dtype than its parameters.

  Returns:
    A `GradientFn`. Its ``loss`` is the sharpness-aware loss L(θ + ρ ĝ); aux
    comes from the unperturbed pass. Stats hold ``task_loss`` (L(θ)),
    ``penalty`` (the sharpness L(θ + ρ ĝ) − L(θ)) and ``grad_norm`` (‖∇L(θ)‖).

  Raises:
    ValueError: negative ``rho`` or a bad ``group_size``.

  Example:
    >>> import jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> (loss, _), grads = gnp.penalties.sam(loss_fn, rho=0.05)(
    ...     jnp.ones(3), jnp.eye(3), None)
  """
  _checks.check_nonnegative("rho", rho)
  _checks.check_positive_int("group_size", group_size, allow_none=True)

  def body(params, batch, key):
    loss, aux, _, grad_norm, _, perturbed_loss, perturbed_grads = (
        perturbed_gradients(loss_fn, params, batch, key, rho,
                            split=split_perturbation)
    )
    stats = {
        "task_loss": loss,
        "penalty": perturbed_loss - loss,
        "grad_norm": grad_norm,
    }
    return perturbed_loss, aux, perturbed_grads, stats

  name = f"sam(rho={rho}" + (", split_perturbation=True)"
                             if split_perturbation else ")")
  return _base.GradientFn(name, _base.in_groups(body, group_size))
