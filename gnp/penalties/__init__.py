"""Loss transformations: loss function in, gradient function out.

A loss function is ``loss_fn(params, batch, key) -> (losses, aux)`` with
``losses`` of shape ``[B]``, one loss per example, and ``aux`` any pytree.
Every regulariser here is ``make(loss_fn, **hyperparameters) -> grad_fn``, and

    (loss, aux), grads = grad_fn(params, batch, key)

returns exactly what ``jax.value_and_grad(mean_loss, has_aux=True)`` returns:
``loss`` the method's scalar objective, ``aux`` the loss function's aux and
``grads`` the update direction, a tree like ``params``. So any of them drops
into any train step in place of ``jax.value_and_grad``.

Statistics: ``(loss, aux), grads, stats = grad_fn.with_stats(params, batch,
key)``, with ``stats`` a dict of scalars: ``task_loss`` (mean loss at θ),
``penalty`` (the unscaled penalty term) and, where the method computes ∇L,
``grad_norm`` (‖∇L(θ)‖), plus keys each method documents.

Hyper-parameters that schedules change (``r``, ``alpha``, ``rho``, ``lam``,
and per-example clipping's ``max_norm`` / ``outlier_mads``) may be traced
scalars: build the gradient function inside the jitted step from
the step's schedule values and nothing recompiles.

An L2 term that every example's loss shares is best declared with
``with_l2(loss_fn, l2, mask=...)`` rather than written into ``loss_fn``:
every regulariser takes the result as a loss function, and ghost norms
(GNVR, per-example clipping) still apply to it.

Gradient accumulation: ``accumulate(loss_fn, k)`` is a loss function that
evaluates a batch in k microbatches, one after the other; every regulariser
here computes its whole-batch step from it, in less memory
(`gnp.penalties.accumulation`).

The mathematics of each method is in its module's docstring.
"""

from gnp.penalties._base import GradientFn
from gnp.penalties._base import WithL2
from gnp.penalties._base import with_l2
from gnp.penalties.accumulation import AccumulatedLoss
from gnp.penalties.accumulation import accumulate
from gnp.penalties.clipping import per_example_clipping
from gnp.penalties.gradient_norm import gradient_norm
from gnp.penalties.gradient_norm_variance import gradient_norm_variance
from gnp.penalties.hessian import hessian_frobenius
from gnp.penalties.plain import plain
from gnp.penalties.sam import sam
from gnp.penalties.view_consistency import last_layer
from gnp.penalties.view_consistency import view_consistency

__all__ = [
    "AccumulatedLoss",
    "GradientFn",
    "WithL2",
    "accumulate",
    "gradient_norm",
    "gradient_norm_variance",
    "hessian_frobenius",
    "last_layer",
    "per_example_clipping",
    "plain",
    "sam",
    "view_consistency",
    "with_l2",
]
