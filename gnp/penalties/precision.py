"""Parameter perturbations that survive low-precision layers.

SAM and finite-difference GNP evaluate ∇L(θ + ε) with a small ε = r ĝ. With
``dtype=bfloat16`` and float32 parameters, a Flax ``nn.Dense`` or ``nn.Conv``
casts its kernel to bfloat16 inside the call, so it computes with
cast(θ + ε): an entry whose |ε_i| is below half a bfloat16 step of θ_i
(≈ 2⁻⁹|θ_i|) is not perturbed at all, and the others move by a whole step.
In ResNet-18 at initialisation with r = 0.1, 79 % of the kernel entries are
not perturbed and the perturbation the layers see has cosine 0.63 with r ĝ.

The split. Dense and Conv are linear in their parameters (kernel and bias
together), f(x; θ + ε) = f(x; θ) + f(x; ε). Evaluated as the right-hand side,
θ and ε are cast separately, each on its own scale, so the layer computes
with cast(θ) + cast(ε): the kernel of the unperturbed pass plus ε to 8
significant bits (cosine > 0.9999 with r ĝ). Both terms run the layer's own
code (padding, strides, feature groups, masks), so nothing about the layer
is re-implemented. The gradient is taken with respect to ε, which at θ + ε
equals the gradient with respect to the parameters.

Which layers: a plain ``nn.Dense`` or ``nn.Conv`` (the standard
``promote_dtype`` and ``dot_general``/``conv_general_dilated``)
whose kernel and bias are leaves of ``params`` as given, and whose
computation dtype has fewer significand bits than one of its parameters.
Every other parameter (BatchNorm's scale and bias, which Flax applies in
float32; layers in float32) is perturbed as before, as θ + ε.

What it costs and what it does not fix. Each split layer runs twice in the
perturbed pass (forward and input gradient), so that pass does 5/3 of a
pass's matrix products and a SAM or GNP step 8/6: +11 to +39 % per
ResNet-18 step in bfloat16, over three noisy runs on a 2-core CPU. The
rounding of the activations, in both passes, is untouched, and it dominates
the error of ∇L(θ + ε) − ∇L(θ): on ResNet-18 that error is ≈ √2 times the
bfloat16 error of ∇L(θ) itself, with the split or without. Hence an option
(``split_perturbation``), off by default; with it on, a model without
low-precision layers compiles to the same program as without.
docs/mixed_precision.md has the measurements.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from gnp import errors
from gnp.penalties import _base


class SplitError(errors.UserError, ValueError):
  """A low-precision layer that cannot be split, or a perturbed pass that did
  not call the layers the unperturbed pass did."""


def _kind(module) -> str | None:
  """"dense"/"conv" for a plain linen Dense/Conv (the standard
  ``promote_dtype`` and ``dot_general``/``conv_general_dilated``), else None."""
  if getattr(module, "promote_dtype", None) is not flax_dtypes.promote_dtype:
    return None
  if type(module).__call__ is nn.Dense.__call__:
    if module.dot_general is None and module.dot_general_cls is None:
      return "dense"
  if isinstance(module, nn.Conv) and type(module).__call__ is nn.Conv.__call__:
    if (module.shared_weights and module.conv_general_dilated is None
        and module.conv_general_dilated_cls is None):
      return "conv"
  return None


def _narrower(compute, stored) -> bool:
  """Whether casting `stored` values to `compute` drops significand bits."""
  if not (jnp.issubdtype(compute, jnp.floating)
          and jnp.issubdtype(stored, jnp.floating)):
    return False
  return jnp.finfo(compute).nmant < jnp.finfo(stored).nmant


def _low_precision_params(context, args, kwargs):
  """``{name: value}`` of a low-precision Dense/Conv call's parameters (a
  computation dtype narrower than one of them), else None."""
  module = context.module
  if context.method_name != "__call__":
    return None
  if not _kind(module):
    return None
  variables = module.variables.get("params", {})
  if not variables:
    return None
  x = args[0] if args else kwargs["inputs"]
  compute = flax_dtypes.canonicalize_dtype(x, *variables.values(),
                                           dtype=module.dtype)
  if not any(_narrower(compute, v.dtype) for v in variables.values()):
    return None
  return variables


def _leaves(variables, index: dict[int, int]):
  """``{name: leaf index}``, or None unless every parameter is a leaf."""
  leaves = {name: index.get(id(value)) for name, value in variables.items()}
  return None if None in leaves.values() else leaves


def _path(context) -> str:
  return "/".join(context.module.path) or type(context.module).__name__


def recording(loss_fn: _base.LossFn, calls: list[str]) -> _base.LossFn:
  """``loss_fn``, appending each low-precision layer call's path to `calls`.

  The layers run unchanged (the traced computation is the same); `calls` is
  filled while ``loss_fn`` is traced.

  Raises:
    SplitError: (when traced) a low-precision layer whose parameters are not
      leaves of the ``params`` given to ``loss_fn``: transformed inside
      ``loss_fn``, or hidden in a jitted ``loss_fn``'s own trace.
  """

  def recorded(params, batch, key):
    index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}

    def interceptor(next_fun, args, kwargs, context):
      variables = _low_precision_params(context, args, kwargs)
      if variables is not None:
        if _leaves(variables, index) is None:
          raise SplitError(
              f"layer '{_path(context)}' computes in a narrower dtype than "
              "its parameters, but they are not the leaves of params that "
              "loss_fn was given (transformed inside loss_fn, inside a lifted "
              "transform such as nn.scan or nn.remat, or loss_fn is jitted "
              "and traces its layers in a trace of its own), so the "
              "perturbation cannot be split. Pass a loss_fn that is not "
              "jitted and hands its layers the parameters unchanged.")
        calls.append(_path(context))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return loss_fn(params, batch, key)

  return recorded


def split_loss(mean_loss: Callable, params, *,
               calls: list[str] | None = None) -> Callable:
  """``shift -> mean_loss(θ + shift)``, low-precision layers split.

  Every low-precision ``nn.Dense``/``nn.Conv`` call computes
  f(x; θ) + f(x; shift); everything else sees θ + shift. Its gradient with
  respect to ``shift`` is the gradient of ``mean_loss`` at θ + shift.

  Args:
    mean_loss: ``params -> (scalar, aux)``, e.g. `_base.mean_loss_fn`.
    params: θ.
    calls: the layer paths `recording` found in the unperturbed pass; if
      given, the perturbed pass must split exactly these.

  Raises:
    SplitError: (when called) the split layers differ from ``calls``.
  """
  theta = jax.tree.leaves(params)

  def at(shift):
    shifted = jax.tree.map(jnp.add, params, shift)
    index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(shifted))}
    shifts = jax.tree.leaves(shift)
    split = []

    def interceptor(next_fun, args, kwargs, context):
      variables = _low_precision_params(context, args, kwargs)
      leaves = None if variables is None else _leaves(variables, index)
      if leaves is None:  # Also the two layer copies below: not in `index`.
        return next_fun(*args, **kwargs)
      split.append(_path(context))
      layer = context.module.clone(parent=None)

      def apply(source):
        variables = {"params": {n: source[i] for n, i in leaves.items()}}
        return layer.apply(variables, *args, **kwargs)

      return apply(theta) + apply(shifts)

    with nn.intercept_methods(interceptor):
      value, aux = mean_loss(shifted)
    if calls is not None and split != calls:
      raise SplitError(
          f"the perturbed pass split the layers {split}, the unperturbed "
          f"pass called {calls}: loss_fn must trace the same layers every "
          "time (a jitted loss_fn reuses its trace and escapes the "
          "interception).")
    return value, aux

  return at


def value_and_grad_at(
    mean_loss: Callable, params, perturbation, *, calls: list[str] | None = None
):
  """``jax.value_and_grad(mean_loss, has_aux=True)`` at θ + ε, split.

  Args:
    mean_loss: ``params -> (scalar, aux)``, e.g. `_base.mean_loss_fn`.
    params: θ.
    perturbation: ε, a tree like ``params`` in the same dtypes.
    calls: as for `split_loss`.

  Returns:
    ``((value, aux), grads)`` at θ + ε, grads a tree like ``params``.

  Raises:
    SplitError: the split layers differ from ``calls``.
  """
  return jax.value_and_grad(split_loss(mean_loss, params, calls=calls),
                            has_aux=True)(perturbation)
