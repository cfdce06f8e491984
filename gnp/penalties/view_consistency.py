"""Gradient variance regularisation between two augmented views (GVR).

Two views x¹, x² of the same examples share the labels y. With
g^v = ∇_W L(x^v, y), the gradient of view v's mean loss with respect to a
selected part W of the parameters (by default the last layer, which keeps it
cheap), the objective is

    J(θ) = L(x¹) + L(x²) + α Σ_k ‖g¹_k − g²_k‖²,

and its gradient flows to *all* parameters (double backpropagation through
g¹ − g² = ∇_W (L(x¹) − L(x²)), one backward pass).

The two views are concatenated along the batch axis and ``loss_fn`` runs once
on the 2B examples, so batch statistics see both views; ``aux`` is that call's.
``key`` is split into a key for ``views`` and one for ``loss_fn``.

Gradient accumulation (``loss_fn`` an `accumulation.AccumulatedLoss`): the
difference d = g¹ − g² is a sum over microbatches, d = Σ_j d_j, d_j the
gradient with respect to W of microbatch j's share of L(x¹) − L(x²), and

    ∇J = ∇L(x¹) + ∇L(x²) + 2α (∂d/∂θ)ᵀ d = Σ_j ∇_θ [L_j + 2α ⟨d_j(θ), d⟩],

d held constant inside the bracket. So a first pass sums the d_j (first
order, one microbatch at a time) and a second differentiates the bracket
microbatch by microbatch, each microbatch holding examples of both views.
(Differentiating through the accumulated loss gives the same step, but
reverse mode over its rematerialised backward pass keeps every microbatch's
activations: on the mnist1d MLP with k = 4, 1.1 times the whole batch's
temporary memory, in twice its time.)

Mixed precision: the parameters are not perturbed; g¹ − g² comes out of one
backward pass, accumulated before it is rounded, so bfloat16 layers round it
as they round any gradient (docs/mixed_precision.md).
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from optax import tree_utils as otu

from gnp import _checks
from gnp.penalties import _base
from gnp.penalties import accumulation

Views = Callable[[_base.Batch, jax.Array], tuple[_base.Batch, _base.Batch]]


def _sub_jaxpr(eqn):
  """The one sub-jaxpr of a call-like equation whose inputs and outputs line
  up with the equation's (jit, remat, custom_jvp/vjp, scan), or None."""
  subs = [
      v.jaxpr if isinstance(v, jex.ClosedJaxpr) else v
      for v in eqn.params.values()
      if isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr))
  ]
  if len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):
    if len(subs[0].outvars) == len(eqn.outvars):
      return subs[0]
  return None


def _data_depths(jaxpr, depth: dict, sources: dict, entry: dict) -> None:
  """Walks `jaxpr` forward, tracking how parameters enter the data stream.

  depth: variable -> longest chain of primitives from the batch (data-derived
    variables only); sources: variable -> the parameter indices a
    data-free variable is computed from (a cast kernel, an L2 sum);
    entry: parameter index -> the smallest data depth at which it meets data.
  Both dicts are updated in place; call-like equations are followed inside.
  """
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if isinstance(v, jex.Var)]
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      inner_depth = {s: depth[v] for s, v in zip(sub.invars, eqn.invars)
                     if isinstance(v, jex.Var) and v in depth}
      inner_sources = {s: sources[v] for s, v in zip(sub.invars, eqn.invars)
                       if isinstance(v, jex.Var) and v in sources}
      _data_depths(sub, inner_depth, inner_sources, entry)
      for outer, inner in zip(eqn.outvars, sub.outvars):
        if isinstance(inner, jex.Var) and inner in inner_depth:
          depth[outer] = inner_depth[inner]
        elif isinstance(inner, jex.Var) and inner in inner_sources:
          sources[outer] = inner_sources[inner]
      continue
    data = [depth[v] for v in ins if v in depth]
    params = frozenset().union(*(sources[v] for v in ins if v in sources))
    if data:
      for i in params:
        entry[i] = min(entry.get(i, max(data)), max(data))
      for v in eqn.outvars:
        depth[v] = 1 + max(data)
    elif params:
      for v in eqn.outvars:
        sources[v] = params


def last_layer(loss_fn: _base.LossFn, params, batch, key) -> list[bool]:
  """Which leaves of `params` form the layer nearest the per-example losses.

  In the traced loss, each parameter first meets the data (the batch) after
  some chain of operations; the parameter whose first meeting is deepest (the
  last layer's bias, or kernel) and its siblings under the same parent in the
  params tree form the layer. Terms computed from the parameters alone, such
  as an L2 penalty, do not move a parameter's first meeting, and the order of
  dict keys (which JAX tree utilities rebuild sorted) plays no part. Runs at
  trace time only. Returns a mask over `jax.tree.leaves(params)`.
  """
  shapes = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree
  )
  traced = jax.make_jaxpr(lambda p, b, k: loss_fn(p, b, k)[0])(
      shapes(params), shapes(batch), None if key is None else shapes(key)
  )
  paths = [path for path, _ in jax.tree.leaves_with_path(params)]
  num_batch = len(jax.tree.leaves(batch))
  invars = traced.jaxpr.invars
  sources = {v: frozenset([i]) for i, v in enumerate(invars[: len(paths)])}
  depth = {v: 0 for v in invars[len(paths): len(paths) + num_batch]}
  entry = {}
  _data_depths(traced.jaxpr, depth, sources, entry)
  if not entry:
    raise ValueError("no parameter meets the batch; cannot find a last layer.")
  deepest = max(entry.values())
  parents = {paths[i][:-1] for i, d in entry.items() if d == deepest}
  return [path[:-1] in parents for path in paths]


def _wrt_mask(wrt, loss_fn, params, batch, key) -> list[bool]:
  if wrt is None:
    return last_layer(loss_fn, params, batch, key)
  if isinstance(wrt, str):
    pattern = re.compile(wrt)
    return [
        bool(pattern.search(jax.tree_util.keystr(path, simple=True, separator="/")))
        for path, _ in jax.tree.leaves_with_path(params)
    ]
  return [bool(m) for m in jax.tree.leaves(wrt(params))]


def view_consistency(
    loss_fn: _base.LossFn,
    *,
    alpha: jax.typing.ArrayLike,
    views: Views,
    wrt: str | Callable | None = None,
) -> _base.GradientFn:
  """Gradient of L(x¹) + L(x²) + α ‖∇_W L(x¹) − ∇_W L(x²)‖² over all params.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, ``losses`` of
      shape ``[B]``.
    alpha: the penalty weight α (≥ 0; 0.01 in the original); may be traced.
    views: ``views(batch, key) -> (batch1, batch2)``, two augmented views with
      the batch's structure and size.
    wrt: the parameters W whose gradient difference is penalised: None (the
      last layer, found by `last_layer`), a regular expression searched in
      each leaf's "/"-joined path (e.g. ``"Dense_2|stage4"``), or a function
      of the params tree returning a tree of bools (as `optax.masked`).

  Returns:
    A `GradientFn` that needs a PRNG ``key``. Its ``loss`` is J. Stats hold
    ``task_loss`` ((L(x¹) + L(x²)) / 2, comparable with a one-view run),
    ``penalty`` (Σ‖g¹ − g²‖²), ``view1_loss`` and ``view2_loss``. It does not
    compute ∇L over all parameters, so there is no ``grad_norm``.

  Raises:
    ValueError: negative ``alpha``; when called, a ``wrt`` selecting nothing.
  """
  _checks.check_nonnegative("alpha", alpha)

  def body(params, batch, key):
    if key is None:
      raise ValueError("view_consistency needs a PRNG key for its views.")
    view_key, loss_key = jax.random.split(key)
    first, second = views(batch, view_key)
    size = _base.batch_size(first)
    joint = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)
    if isinstance(loss_fn, accumulation.AccumulatedLoss):
      return accumulated(params, joint, size, loss_key)
    mask = _wrt_mask(wrt, loss_fn, params, joint, loss_key)
    if not any(mask):
      raise ValueError(f"wrt={wrt!r} selects no parameter.")
    treedef = jax.tree.structure(params)

    def objective(p):
      leaves = jax.tree.leaves(p)

      def view_difference(selected):
        chosen = iter(selected)
        merged = [next(chosen) if m else x for m, x in zip(mask, leaves)]
        losses, aux = loss_fn(jax.tree.unflatten(treedef, merged), joint, loss_key)
        loss1, loss2 = jnp.mean(losses[:size]), jnp.mean(losses[size:])
        return loss1 - loss2, (loss1, loss2, aux)

      selected = [x for m, x in zip(mask, leaves) if m]
      difference, (loss1, loss2, aux) = jax.grad(view_difference, has_aux=True)(
          selected
      )
      penalty = otu.tree_norm(difference, squared=True)
      stats = {
          "task_loss": (loss1 + loss2) / 2,
          "penalty": penalty,
          "view1_loss": loss1,
          "view2_loss": loss2,
      }
      return loss1 + loss2 + alpha * penalty, aux, stats

    return _base.value_and_grad_with_stats(objective, params)

  def accumulated(params, joint, size, key):
    # The two passes of the module docstring, over the 2B examples of both
    # views; `in_first` marks view 1's.
    inner = loss_fn.loss_fn
    mask = _wrt_mask(wrt, inner, params, joint, key)
    if not any(mask):
      raise ValueError(f"wrt={wrt!r} selects no parameter.")
    treedef = jax.tree.structure(params)
    in_first = jnp.arange(2 * size) < size

    def view_difference(selected, p, microbatch, k):
      """Microbatch's share of L(x¹) − L(x²), with W = selected."""
      b, first = microbatch
      chosen = iter(selected)
      merged = [next(chosen) if m else x
                for m, x in zip(mask, jax.tree.leaves(p))]
      losses, aux = inner(jax.tree.unflatten(treedef, merged), b, k)
      loss1 = jnp.sum(jnp.where(first, losses, 0)) / size
      loss2 = jnp.sum(jnp.where(first, 0, losses)) / size
      return loss1 - loss2, (loss1, loss2, aux)

    select = lambda p: [x for m, x in zip(mask, jax.tree.leaves(p)) if m]
    difference_of = jax.grad(view_difference, has_aux=True)
    difference, _ = loss_fn.sequential(
        lambda b, k: (difference_of(select(params), params, b, k)[0], ()),
        (joint, in_first), key)

    def microbatch(b, k):
      def surrogate(p):
        d, (loss1, loss2, aux) = difference_of(select(p), p, b, k)
        return (loss1 + loss2 + 2 * alpha * otu.tree_vdot(d, difference),
                (loss1, loss2, aux))

      (_, (loss1, loss2, aux)), grads = jax.value_and_grad(
          surrogate, has_aux=True)(params)
      return (loss1, loss2, grads), aux

    (loss1, loss2, grads), aux = loss_fn.sequential(
        microbatch, (joint, in_first), key)
    penalty = otu.tree_norm(difference, squared=True)
    stats = {"task_loss": (loss1 + loss2) / 2, "penalty": penalty,
             "view1_loss": loss1, "view2_loss": loss2}
    return (loss1 + loss2 + alpha * penalty, aux, grads,
            jax.lax.stop_gradient(stats))

  return _base.GradientFn(f"view_consistency(alpha={alpha})", body)
