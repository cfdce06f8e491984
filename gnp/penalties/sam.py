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

Adaptive SAM (ASAM; Kwon, Kim, Park & Choi, "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
Networks", ICML 2021, https://arxiv.org/abs/2102.11600). The neighbourhood is
the ellipsoid ‖T⁻¹ε‖ ≤ ρ with the normalisation operator T = |θ| + η
(elementwise), so that rescaling weights in a way that leaves the loss
unchanged (a ReLU layer's weights by a, the next layer's by 1/a) rescales the
neighbourhood with them. The first-order maximiser of L(θ + ε) over it is

    ε = ρ · T² ⊙ g / ‖T ⊙ g‖,

and the update is ∇L(θ + ε). ‖T ⊙ g‖ = 0 gives ε = 0 (the plain gradient),
never NaN. η > 0 keeps a zero weight perturbable; the paper's value is 0.01.

Which parameters T scales. The paper's elementwise operator is
T = diag(|θ_1|, …, |θ_k|) + η I over all k parameters, and that is what is
implemented here: every leaf, biases included. The authors' code
(github.com/SamsungLabs/ASAM, ``asam.py``) scales only parameters whose
PyTorch name contains "weight" (convolution and linear kernels and the
BatchNorm scale) and leaves biases and BatchNorm's shift at T = 1, giving
them a much larger perturbation relative to the kernels'; its radii (ρ = 0.5
on CIFAR-10, 1.0 on CIFAR-100) were tuned that way (an author's note on
github.com/davda54/sam issue 37: with biases normalised too, ρ = 2.0 did
best on CIFAR-10). Its class default is η = 0.01 (the command line of its
``example_cifar.py`` defaults to 0.0).
"""

from __future__ import annotations

import jax

from gnp import _checks
from gnp.penalties import _base
from gnp.penalties.gradient_norm import check_adaptive
from gnp.penalties.gradient_norm import perturbed_gradients


def sam(
    loss_fn: _base.LossFn,
    *,
    rho: jax.typing.ArrayLike,
    group_size: int | None = None,
    split_perturbation: bool = False,
    adaptive: bool = False,
    eta: float = 0.01,
) -> _base.GradientFn:
  """Sharpness-aware minimisation: the gradient at θ + ρ g/‖g‖.

  With ``adaptive`` (ASAM), the gradient at θ + ρ T² ⊙ g / ‖T ⊙ g‖,
  T = |θ| + η elementwise.

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
    adaptive: ASAM's perturbation ρ T² ⊙ g / ‖T ⊙ g‖, T = |θ| + η, on every
      parameter (module docstring). Radii are larger than SAM's.
    eta: η ≥ 0, the floor of T (the paper's 0.01). Static. Ignored unless
      ``adaptive``.

  Returns:
    A `GradientFn`. Its ``loss`` is the sharpness-aware loss L(θ + ε); aux
    comes from the unperturbed pass. Stats hold ``task_loss`` (L(θ)),
    ``penalty`` (the sharpness L(θ + ε) − L(θ)) and ``grad_norm`` (‖∇L(θ)‖).

  Raises:
    ValueError: negative ``rho``, a bad ``group_size``, a non-bool
      ``adaptive`` or a negative or infinite ``eta``.

  References:
    Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412;
    Kwon et al., ICML 2021, https://arxiv.org/abs/2102.11600.

  Example:
    >>> import jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> (loss, _), grads = gnp.penalties.sam(loss_fn, rho=0.05)(
    ...     jnp.ones(3), jnp.eye(3), None)
  """
  _checks.check_nonnegative("rho", rho)
  _checks.check_positive_int("group_size", group_size, allow_none=True)
  check_adaptive(adaptive, eta)

  def body(params, batch, key):
    loss, aux, _, grad_norm, _, perturbed_loss, perturbed_grads, _ = (
        perturbed_gradients(loss_fn, params, batch, key, rho,
                            split=split_perturbation, adaptive=adaptive,
                            eta=eta)
    )
    stats = {
        "task_loss": loss,
        "penalty": perturbed_loss - loss,
        "grad_norm": grad_norm,
    }
    return perturbed_loss, aux, perturbed_grads, stats

  name = (f"sam(rho={rho}" + (f", adaptive=True, eta={eta}" if adaptive else "")
          + (", split_perturbation=True)" if split_perturbation else ")"))
  return _base.GradientFn(name, _base.in_groups(body, group_size))
