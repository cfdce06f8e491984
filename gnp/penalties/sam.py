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

Randomized sharpness-aware training (RST; Zhao, Zhang & Hu, "Randomized
Sharpness-Aware Training for Boosting Computational Efficiency in Deep
Learning", arXiv:2203.09962, 2022; its first version is "SS-SAM: Stochastic
Scheduled Sharpness-Aware Minimization for Efficiently Training Deep Neural
Networks"). SAM's second pass is paid only on a random subset of steps: at
each step a Bernoulli trial X ~ Bernoulli(p) chooses

    update = ∇L(θ + ε)   if X = 1 (a SAM step, two forward-backward passes),
    update = ∇L(θ)       if X = 0 (a plain step, one pass),

with ε SAM's (or ASAM's) perturbation above. A step costs 1 + p passes on
average, so with c = (SAM step) / (plain step) the expected cost is
1 + p (c − 1) plain steps. The paper draws p from a scheduling function of
the iteration (it studies constant, piecewise, linear and trigonometric
ones; its abstract reports its generalisation G-RST outperforming SAM in
most cases while saving half of SAM's extra computation, 1.5 passes per
step). Here p is a constant (``probability``), which a schedule may set
per step as a traced scalar; G-RST is not implemented.

The coin is ``bernoulli(fold_in(key, _COIN_SALT), p)``: one per call, for the
whole batch (with m-sharpness too), independent of the key's other uses
(dropout; the groups' ``fold_in(key, j)``, j < B). Both kinds of step
begin with the same pass, L(θ) and g = ∇L(θ); only SAM's second pass,
∇L(θ + ε), sits under a ``lax.cond``, an XLA conditional that runs it on
the SAM steps alone under ``jax.jit``, so a plain step costs a plain step
plus the coin. Under ``jax.vmap`` with a key per member (a vmapped
population, `gnp.population`, as the studies train) the predicate is
batched, ``lax.cond`` becomes a select and the second pass always runs: the
updates are still RST's, the cost is SAM's. XLA's CPU backend runs
convolutions inside a conditional far slower (jax-ml/jax#12868), which
this layout confines to the SAM steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gnp import _checks
from gnp.penalties import _base
from gnp.penalties.gradient_norm import check_adaptive
from gnp.penalties.gradient_norm import perturbed_gradients

# fold_in data for RST's coin: no m-sharpness group index (j < B) reaches it.
_COIN_SALT = 0x5A3C0FFE


def sam(
    loss_fn: _base.LossFn,
    *,
    rho: jax.typing.ArrayLike,
    probability: jax.typing.ArrayLike | None = None,
    group_size: int | None = None,
    split_perturbation: bool = False,
    adaptive: bool = False,
    eta: float = 0.01,
) -> _base.GradientFn:
  """Sharpness-aware minimisation: the gradient at θ + ρ g/‖g‖.

  With ``adaptive`` (ASAM), the gradient at θ + ρ T² ⊙ g / ‖T ⊙ g‖,
  T = |θ| + η elementwise. With ``probability`` p (RST), that gradient with
  probability p and the plain gradient ∇L(θ) otherwise, one coin per call.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``. Both passes use the same ``key``.
    rho: the neighbourhood radius (≥ 0); may be a traced scalar.
    probability: p ∈ (0, 1] for randomized sharpness-aware training (RST,
      module docstring): the chance that a call takes the SAM step rather
      than the plain one; may be a traced scalar. The coin comes from
      ``key``, which must then not be None. None (the default): SAM on every
      call, with no coin and no conditional.
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
    With ``probability``, a plain step's ``loss`` is L(θ) and its
    ``penalty`` 0, and stats add ``sam_step``: 1.0 on a SAM step, 0.0 on a
    plain one (its mean over steps is the fraction of SAM steps).

  Raises:
    ValueError: negative ``rho``, a ``probability`` outside (0, 1], a bad
      ``group_size``, a non-bool ``adaptive`` or a negative or infinite
      ``eta``; when called, a None ``key`` with ``probability``.

  References:
    Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412;
    Kwon et al., ICML 2021, https://arxiv.org/abs/2102.11600;
    Zhao, Zhang & Hu, 2022, https://arxiv.org/abs/2203.09962 (RST).

  Example:
    >>> import jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> (loss, _), grads = gnp.penalties.sam(loss_fn, rho=0.05)(
    ...     jnp.ones(3), jnp.eye(3), None)
  """
  _checks.check_nonnegative("rho", rho)
  if probability is not None:
    _checks.check_probability("probability", probability)
  _checks.check_positive_int("group_size", group_size, allow_none=True)
  check_adaptive(adaptive, eta)

  def body_when(take_sam=None):
    def body(params, batch, key):
      loss, aux, _, grad_norm, _, perturbed_loss, perturbed_grads, _ = (
          perturbed_gradients(loss_fn, params, batch, key, rho,
                              split=split_perturbation, adaptive=adaptive,
                              eta=eta, when=take_sam)
      )
      stats = {
          "task_loss": loss,
          "penalty": perturbed_loss - loss,
          "grad_norm": grad_norm,
      }
      if take_sam is not None:  # RST: 1 on a SAM step, 0 on a plain one.
        # A plain step's loss is L(θ) itself, its penalty exactly 0.
        perturbed_loss = jnp.where(take_sam, perturbed_loss, loss)
        stats["penalty"] = jnp.where(take_sam, stats["penalty"], 0.0)
        stats["sam_step"] = take_sam.astype(loss.dtype)
      return perturbed_loss, aux, perturbed_grads, stats
    return body

  name = (f"sam(rho={rho}"
          + ("" if probability is None else f", probability={probability}")
          + (f", adaptive=True, eta={eta}" if adaptive else "")
          + (", split_perturbation=True)" if split_perturbation else ")"))
  if probability is None:
    return _base.GradientFn(name, _base.in_groups(body_when(), group_size))

  def randomized(params, batch, key):
    if key is None:
      raise ValueError(
          "sam(probability=...) draws its coin from the key; got key=None.")
    take_sam = jax.random.bernoulli(jax.random.fold_in(key, _COIN_SALT),
                                    probability)
    # One coin for the whole batch, closed over by every group's body.
    return _base.in_groups(body_when(take_sam), group_size)(params, batch,
                                                            key)

  return _base.GradientFn(name, randomized)
