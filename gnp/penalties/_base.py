"""What every regulariser shares: the calling convention and small helpers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from optax import tree_utils as otu

from gnp import _checks

Params = Any
Batch = Any
Aux = Any
Stats = dict[str, jax.Array]
# loss_fn(params, batch, key) -> (per-example losses of shape [B], aux)
LossFn = Callable[[Params, Batch, jax.Array | None], tuple[jax.Array, Aux]]
# The method body: (params, batch, key) -> (objective, aux, grads, stats)
_Body = Callable[[Params, Batch, Any], tuple[jax.Array, Aux, Params, Stats]]


@dataclasses.dataclass(frozen=True, eq=False)
class GradientFn:
  """A regulariser's gradient function.

  Calling it, ``grad_fn(params, batch, key)``, returns ``((loss, aux), grads)``
  exactly like ``jax.value_and_grad(mean_loss, has_aux=True)``: ``loss`` is the
  scalar objective of the method, ``aux`` the loss function's aux and
  ``grads`` the update direction, a tree like ``params``.

  ``grad_fn.with_stats(params, batch, key)`` returns
  ``((loss, aux), grads, stats)`` where ``stats`` is a dict of scalars with
  ``task_loss`` (the mean loss L(θ) at the unperturbed parameters),
  ``penalty`` (the unscaled penalty term), ``grad_norm`` (‖∇L(θ)‖) wherever
  the method computes ∇L, and the further keys each method documents. Under
  ``jax.jit`` the two calls compile to the same program, minus the unused
  statistics.
  """

  name: str
  _body: _Body

  def with_stats(self, params: Params, batch: Batch, key=None):
    loss, aux, grads, stats = self._body(params, batch, key)
    return (loss, aux), grads, stats

  def __call__(self, params: Params, batch: Batch, key=None):
    (loss, aux), grads, _ = self.with_stats(params, batch, key)
    return (loss, aux), grads

  def __repr__(self) -> str:
    return f"GradientFn({self.name})"


@dataclasses.dataclass(frozen=True, eq=False)
class WithL2:
  """A loss function with an L2 term that every example shares; `with_l2`."""

  loss_fn: LossFn  # The per-example losses without the term.
  l2: jax.typing.ArrayLike
  mask: Any = None  # None, a tree of bools like params, or params -> one.

  def in_term(self, params: Params) -> list[bool]:
    """Per leaf of ``params`` (``jax.tree.leaves`` order): is it in K?"""
    leaves = jax.tree.leaves(params)
    mask = self.mask(params) if callable(self.mask) else self.mask
    if mask is None:
      return [True] * len(leaves)
    if jax.tree.structure(mask) != jax.tree.structure(params):
      raise ValueError(
          "with_l2's mask must have the structure of params; got "
          f"{jax.tree.structure(mask)} for {jax.tree.structure(params)}.")
    flags = jax.tree.leaves(mask)
    if not all(isinstance(flag, (bool, np.bool_)) for flag in flags):
      raise ValueError("with_l2's mask must hold Python bools (which leaves "
                       f"the term covers), got {flags}.")
    return [bool(flag) for flag in flags]

  def weights(self, params: Params) -> list[jax.Array]:
    """The leaves θ_K that the term covers."""
    return [leaf for leaf, used in zip(jax.tree.leaves(params),
                                       self.in_term(params)) if used]

  def term(self, params: Params) -> jax.Array:
    """½ · l2 · ‖θ_K‖², the scalar each example's loss gets."""
    return 0.5 * self.l2 * otu.tree_norm(self.weights(params), squared=True)

  def __call__(self, params: Params, batch: Batch, key=None):
    losses, aux = self.loss_fn(params, batch, key)
    return losses + self.term(params), aux


def with_l2(loss_fn: LossFn, l2: jax.typing.ArrayLike, *,
            mask=None) -> WithL2:
  """``loss_fn`` with ½ · l2 · ‖θ_K‖² added to every example's loss.

  The same for every example, so example i's gradient is ∇ℓ_i + l2 · θ_K
  (θ_K: θ on the leaves the term covers, 0 elsewhere). Every regulariser
  takes the result as a loss function like any other; declared this way,
  rather than written into ``loss_fn``, the term keeps ghost norms
  (`gnp.penalties.ghost`) available, which add its part to each n_i
  analytically:

      ‖∇ℓ_i + l2 · θ_K‖² = ‖∇ℓ_i‖² + 2 l2 ⟨∇ℓ_i, θ_K⟩ + l2² ‖θ_K‖².

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)`` without the
      term.
    l2: the coefficient (≥ 0); may be a traced scalar.
    mask: which leaves the term covers, as in optax (``add_decayed_weights``):
      a tree of Python bools with the structure of ``params``, or a function
      ``params -> such a tree``; None covers every leaf.

  Returns:
    The loss function, a `WithL2`.

  Example:
    >>> import jax, jax.numpy as jnp, gnp
    >>> loss_fn = lambda w, x, key: (jnp.sin(x @ w["kernel"]), None)
    >>> regularised = gnp.penalties.with_l2(loss_fn, 0.5)
    >>> params, x = {"kernel": jnp.ones(2)}, jnp.eye(2)
    >>> regularised.term(params)  # ½ · 0.5 · ‖θ‖², added to each ℓ_i
    Array(0.5, dtype=float32)
    >>> grad_fn = gnp.penalties.gradient_norm_variance(regularised, lam=0.1)
  """
  _checks.check_nonnegative("l2", l2)
  return WithL2(loss_fn, l2, mask)


def mean_loss_fn(loss_fn: LossFn, batch: Batch, key) -> Callable:
  """params -> (mean loss, aux): the function `jax.value_and_grad` expects."""

  def mean_loss(params):
    losses, aux = loss_fn(params, batch, key)
    if jnp.ndim(losses) != 1:
      raise ValueError(
          "loss_fn must return per-example losses of shape [B]; got shape "
          f"{jnp.shape(losses)}."
      )
    return jnp.mean(losses), aux

  return mean_loss


def value_and_grad_with_stats(objective, params):
  """Differentiates ``objective(p) -> (value, aux, stats)`` at `params`.

  Returns (value, aux, grads, stats); the statistics are not differentiated.
  """

  def with_aux(p):
    value, aux, stats = objective(p)
    return value, (aux, jax.lax.stop_gradient(stats))

  (value, (aux, stats)), grads = jax.value_and_grad(with_aux, has_aux=True)(
      params
  )
  return value, aux, grads, stats


def batch_size(batch: Batch) -> int:
  """The common leading dimension of every leaf of `batch`."""
  sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(
        "every leaf of batch must have the same leading (batch) dimension; "
        f"got sizes {sorted(sizes)}."
    )
  return sizes.pop()


def safe_normalize(tree):
  """(tree / ‖tree‖, ‖tree‖), with 0 / 0 := 0 so ‖g‖ = 0 yields no NaN."""
  norm = otu.tree_norm(tree)
  inverse = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
  return otu.tree_scale(inverse, tree), norm


def safe_sqrt(x):
  """sqrt whose derivative at 0 is 0 rather than inf (so no NaN downstream)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def fold_in_each(key, n: int):
  """``fold_in(key, j)`` for j < n, stacked; None for a None key."""
  if key is None:
    return None
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))


def in_groups(body: _Body, group_size: int | None) -> _Body:
  """Runs `body` on each group of `group_size` examples and averages.

  The batch is cut into G = B / m consecutive groups; group j gets the key
  `jax.random.fold_in(key, j)` (or None). The objective, the gradients and the
  statistics are the means over groups; `aux` is stacked along a new leading
  axis of size G, since the loss function ran once per group.
  """
  if group_size is None:
    return body

  def grouped(params, batch, key):
    size = batch_size(batch)
    if size % group_size:
      raise ValueError(
          f"group_size={group_size} does not divide the batch size {size}."
      )
    num_groups = size // group_size
    groups = jax.tree.map(
        lambda x: x.reshape((num_groups, group_size) + x.shape[1:]), batch
    )
    keys = fold_in_each(key, num_groups)
    loss, aux, grads, stats = jax.vmap(body, in_axes=(None, 0, 0))(
        params, groups, keys)
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
    return mean(loss), aux, mean(grads), mean(stats)

  return grouped
