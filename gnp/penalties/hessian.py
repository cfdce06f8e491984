"""Hessian Frobenius-norm regularisation, by Hutchinson's estimator.

For v with independent Rademacher (±1) entries, E_v ‖H v‖² = ‖H‖_F², where
H = ∇²L(θ). With K fresh probes every step, the objective is

    J(θ) = L(θ) + λ · (1/K) Σ_k ‖H v_k‖²,

an unbiased estimate of L + λ ‖H‖_F² whose gradient is an unbiased estimate of
∇(L + λ ‖H‖_F²). H v is a forward-over-reverse product, and ∇J differentiates
through it (third-order derivatives); the penalty's gradient must not stop at
the Hessian-vector product, and here it does not.

Randomness: ``key`` is split into a key for ``loss_fn`` and one for the probes.

Mixed precision: nothing is perturbed. v enters as a tangent, and ±1 is exact
in bfloat16, so bfloat16 layers round H v only as they round any gradient
(docs/mixed_precision.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from optax import tree_utils as otu

from gnp import _checks
from gnp.penalties import _base


def rademacher_like(key, tree):
  """A tree like `tree` with independent ±1 entries in each leaf's dtype.

  Every random bit is a sign: one 32-bit draw makes 32 entries. Drawing one
  word per entry (`jax.random.rademacher`) cost as much as a whole gradient
  of the mnist1d MLP.
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [x.size for x in leaves]
  total = sum(sizes)
  words = jax.random.bits(key, (-(-total // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  bits = bits.reshape(-1)[:total]
  out, start = [], 0
  for x, size in zip(leaves, sizes):
    chunk = bits[start:start + size].reshape(x.shape)
    out.append((1 - 2 * chunk.astype(jnp.int32)).astype(x.dtype))
    start += size
  return jax.tree.unflatten(treedef, out)


def hessian_frobenius(
    loss_fn: _base.LossFn, *, lam: jax.typing.ArrayLike, num_probes: int = 1
) -> _base.GradientFn:
  """The gradient of L(θ) + λ · mean_k ‖H v_k‖², Rademacher probes v_k.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``.
    lam: the penalty weight λ (≥ 0); may be a traced scalar.
    num_probes: K, the number of probes per step.

  Returns:
    A `GradientFn` that needs a PRNG ``key``. Its ``loss`` is J; stats hold
    ``task_loss``, ``penalty`` (mean_k ‖H v_k‖², the estimate of ‖H‖_F²) and
    ``grad_norm`` (‖∇L‖).

  Raises:
    ValueError: negative ``lam`` or a ``num_probes`` that is not a positive
      integer.

  Example:
    >>> import jax, jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w), None)
    >>> grad_fn = gnp.penalties.hessian_frobenius(loss_fn, lam=0.01)
    >>> (loss, _), grads = grad_fn(jnp.ones(3), jnp.eye(3), jax.random.key(0))
  """
  _checks.check_nonnegative("lam", lam)
  _checks.check_positive_int("num_probes", num_probes)

  def body(params, batch, key):
    if key is None:
      raise ValueError("hessian_frobenius needs a PRNG key for its probes.")
    loss_key, probe_key = jax.random.split(key)
    value_and_grad = jax.value_and_grad(
        _base.mean_loss_fn(loss_fn, batch, loss_key), has_aux=True
    )
    probes = jax.vmap(lambda k: rademacher_like(k, params))(
        jax.random.split(probe_key, num_probes)
    )

    def objective(p):
      def with_probe(v):
        # One jvp gives the loss, its gradient (primal, shared across probes
        # by vmap) and H v (tangent).
        ((loss, aux), grads), (_, hvp) = jax.jvp(value_and_grad, (p,), (v,))
        return loss, aux, grads, otu.tree_norm(hvp, squared=True)

      if num_probes == 1:  # vmap over one probe costs ~25% of the step.
        loss, aux, grads, penalty = with_probe(
            jax.tree.map(lambda v: v[0], probes))
      else:
        loss, aux, grads, squared_norms = jax.vmap(
            with_probe, out_axes=(None, None, None, 0)
        )(probes)
        penalty = jnp.mean(squared_norms)
      stats = {
          "task_loss": loss,
          "penalty": penalty,
          "grad_norm": otu.tree_norm(grads),
      }
      return loss + lam * penalty, aux, stats

    return _base.value_and_grad_with_stats(objective, params)

  return _base.GradientFn(
      f"hessian_frobenius(lam={lam}, num_probes={num_probes})", body
  )
