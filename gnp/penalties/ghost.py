"""Exact per-example gradient norms from layer inputs and output cotangents.

"Ghost norms" (Goodfellow 2015, arXiv 1510.01799; the trick behind DP-SGD
ghost clipping): the gradient of example i's loss ℓ_i with respect to a
linear layer's kernel is a sum over the T positions t at which the layer is
applied (T = 1 for a dense layer on a vector, the output pixels of a
convolution),

    ∂ℓ_i/∂W = Σ_t a_tᵀ δ_t,    a_t ∈ R^P the layer's input at t (for a
                                convolution, the input patch under the kernel),
                                δ_t = ∂ℓ_i/∂z_t ∈ R^Q, z_t = a_t W + b,

and its squared norm needs neither that P×Q matrix nor B copies of it:

    ‖Σ_t a_tᵀ δ_t‖² = Σ_{t,t'} (a_t·a_t')(δ_t·δ_t')   (Gram form, ~T²(P+Q)),
    ‖∂ℓ_i/∂b‖²    = ‖Σ_t δ_t‖²  = Σ_{t,t'} 1 · (δ_t·δ_t'),

so a bias is a constant input feature 1 and, for T = 1, a dense layer's
kernel and bias together give (‖a‖² + 1)‖δ‖². Where T(P+Q) > PQ it is cheaper to form
the per-example kernel gradient Σ_t a_tᵀ δ_t of this one layer (outer form,
~TPQ) and take its norm; each layer takes whichever needs fewer FLOPs (which
also needs less memory: the Gram form wins only where 2T² < PQ/2). A
convolution with ``feature_group_count`` G is G independent P×Q blocks with
P = C_in/G · prod(kernel_size), Q = C_out/G, and the squared norms add up. A
kernel scaled or masked entry-wise, M ⊙ W, has the gradient
M ⊙ Σ_t a_tᵀ δ_t, and only the outer form can apply M. A layer
applied several times (shared weights) has the sum over its calls as its
gradient: the calls' positions are concatenated, T = Σ_calls T_c. The
per-example squared norm is the sum over every parameter leaf.

The inputs a are captured, and δ obtained, without editing the model: the
loss function runs once on the whole batch; each linear use of a parameter
records its input and returns its output plus a zero "probe", and one
backward pass of Σ_i ℓ_i gives, as the probes' cotangents, δ for every
example at once (∂Σ_j ℓ_j/∂z_i = ∂ℓ_i/∂z_i, since examples do not interact).
Everything is ordinary JAX, so the norms are differentiable and GNVR's
second-order gradient flows through a and δ. `gnp.penalties.ghost_jaxpr`
finds the linear uses in the jaxpr of the loss, for a model written with any
JAX library, and says what it supports and what it refuses; this module has
the arithmetic, and the Flax linen helpers `gnp.penalties.precision` uses to
recognise the same plain ``nn.Dense`` / ``nn.Conv`` layers.

Norms are computed in the layer's compute dtype promoted to at least float32.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from gnp import errors

Branch = Literal["auto", "gram", "outer"]
BRANCHES = ("auto", "gram", "outer")


class UnsupportedModelError(errors.UserError, ValueError):
  """The ghost path cannot compute this model's per-example norms exactly."""


def _leaf_paths(params) -> list[str]:
  """'a/b/c' for each leaf of `params`, in `jax.tree.leaves` order."""
  return [
      jax.tree_util.keystr(path, simple=True, separator="/")
      for path, _ in jax.tree.leaves_with_path(params)
  ]


def _gram_is_cheaper(positions: int, p: int, q: int) -> bool:
  """FLOPs per example and group: T²(P + Q + 1) against T·P·Q + P·Q."""
  return positions * positions * (p + q + 1) <= positions * p * q + p * q


def _kernel_squared_norms(rows, branch: Branch, with_bias: bool = False):
  """‖Σ_calls Σ_t a_tᵀ δ_t‖² per example for one kernel: [B].

  ``rows`` holds (A [B, T, G, P], D [B, T, G, Q]) for each call, all in the
  same coordinates; ``branch`` "auto" takes the cheaper form. With
  ``with_bias`` (the calls share one bias too, laid out as Q) ‖Σ_calls Σ_t
  δ_t‖² is added, folded into the Gram form as a constant input feature 1.
  """
  if branch == "outer":
    kernel = sum(jnp.einsum("btgp,btgq->bgpq", a, d) for a, d in rows)
    squared = jnp.sum(kernel ** 2, axis=(1, 2, 3))
    if with_bias:
      bias = sum(jnp.sum(d, axis=1) for _, d in rows)
      squared += jnp.sum(bias ** 2, axis=(1, 2))
    return squared
  a = jnp.concatenate([a for a, _ in rows], axis=1)
  d = jnp.concatenate([d for _, d in rows], axis=1)
  positions, p, q = a.shape[1], a.shape[-1], d.shape[-1]
  if branch == "auto" and not _gram_is_cheaper(positions, p, q):
    return _kernel_squared_norms(rows, "outer", with_bias)
  if positions == 1:  # (‖a‖² + 1)‖δ‖² per group, on [B, G, ·] arrays
    a, d = a[:, 0], d[:, 0]
    return jnp.sum((jnp.sum(a ** 2, axis=-1) + with_bias)
                   * jnp.sum(d ** 2, axis=-1), axis=-1)
  gram_a = jnp.einsum("btgp,bsgp->bgts", a, a) + with_bias
  gram_d = jnp.einsum("btgq,bsgq->bgts", d, d)
  return jnp.sum(gram_a * gram_d, axis=(1, 2, 3))


# Flax linen layers, as `gnp.penalties.precision` recognises them.


def _module_path(module) -> str:
  return "/".join(module.path) or type(module).__name__


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


def _layer_input(args, kwargs):
  return args[0] if args else kwargs["inputs"]
