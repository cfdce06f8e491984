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
kernel ``mask`` (gradient mask ⊙ Σ_t a_tᵀ δ_t) forces the outer form. A layer
applied several times (shared weights) has the sum over its calls as its
gradient: the calls' positions are concatenated, T = Σ_calls T_c. The
per-example squared norm is the sum over every parameter leaf.

The inputs a are captured, and δ obtained, without editing the model: the loss
function runs once on the whole batch inside `flax.linen.intercept_methods`;
each `nn.Dense` / `nn.Conv` call records its input and returns its output plus
a zero "probe", and one backward pass of Σ_i ℓ_i gives, as the probes'
cotangents, δ for every example at once (∂Σ_j ℓ_j/∂z_i = ∂ℓ_i/∂z_i, since
examples do not interact). Everything is ordinary JAX, so the norms are
differentiable and GNVR's second-order gradient flows through a and δ.

What is supported, checked at trace time by `analyze` (an
`UnsupportedModelError`, a ValueError, names what is not): every parameter
leaf that the per-example losses depend on must be the kernel or bias of a
plain `nn.Dense` or `nn.Conv` (1-, 2-, 3-D; any strides, padding, dilations,
feature groups, masks; no custom ``dot_general``/``conv_general_dilated``/
``promote_dtype``) that receives it unchanged from ``params`` (not cast or
otherwise transformed inside ``loss_fn``, not inside a lifted transform such
as ``nn.remat`` or ``nn.scan``) and is used nowhere else (an ``nn.Embed``, a
norm's scale, a raw ``self.param``, an L2 term written into ``loss_fn`` are
all refused; one declared with `gnp.penalties.with_l2` is not, see below).
This is established from the traced loss: the supported layers' outputs are
replaced by stand-ins that depend on their inputs only, and any parameter
still reaching the losses is reported. `nn.BatchNorm` in training
mode is refused: it mixes examples, so per-example gradients are ill-defined.
Each supported layer's input and output must carry the examples along their
leading axis (checked for its size, B); ops that mix examples outside modules
(a batch-wise normalisation written inline) cannot be detected, and make δ the
cotangent of the summed loss rather than of ℓ_i.

An L2 term that every example shares, ½ · l2 · ‖θ_K‖² declared with
`gnp.penalties.with_l2` (θ_K: θ on the leaves the term covers, 0 elsewhere),
adds the same l2 · θ_K to every example's gradient. With ∇ℓ_i the gradient
without it,

    ‖∇ℓ_i + l2 θ_K‖² = ‖∇ℓ_i‖² + 2 l2 ⟨∇ℓ_i, θ_K⟩ + l2² ‖θ_K‖²,

and the cross term comes per layer from the pass already made: z_t − b =
a_t W is linear in W, so ⟨∂ℓ_i/∂W, W⟩ = Σ_t ⟨a_tᵀ δ_t, W⟩ = Σ_t δ_t · (z_t −
b), and ⟨∂ℓ_i/∂b, b⟩ = Σ_t δ_t · b; a layer with kernel and bias both in K
gives Σ_t δ_t · z_t. It holds for anything whose output is linear in the
kernel (a masked kernel, feature groups; several calls add up) and costs one
product with each layer's output, no further pass. Leaves in K that the
losses do not use have ∇ℓ_i = 0 there and add to ‖θ_K‖² only. The forward
pass adds the term to the losses, so its backward passes (∇L, clipping's
second pass) include l2 θ_K as well.

Norms are computed in the layer's compute dtype promoted to at least float32
(the cross term from the layer's output, so to that output's precision).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from gnp import errors
from gnp.penalties import _base

Branch = Literal["auto", "gram", "outer"]
BRANCHES = ("auto", "gram", "outer")
SUPPORTED = "nn.Dense, nn.Conv"
# Call primitives whose one sub-jaxpr lines up with the equation's inputs and
# outputs and is also what differentiation sees, so liveness may look inside.
# (Not custom_jvp/vjp: their derivative rules may use inputs the primal
# ignores; there every input counts as used.)
_CALL_PRIMITIVES = frozenset(["jit", "closed_call", "remat2"])


class UnsupportedModelError(errors.UserError, ValueError):
  """The ghost path cannot compute this model's per-example norms exactly."""


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a supported layer in the traced loss, found by `analyze`.

  ``kernel`` and ``bias`` index ``jax.tree.leaves(params)`` (``bias`` None
  when the layer has none).
  """

  path: str
  kind: str  # "dense" or "conv"
  kernel: int | None
  bias: int | None
  out_shape: tuple[int, ...]
  out_dtype: jnp.dtype


def _module_path(module) -> str:
  return "/".join(module.path) or type(module).__name__


def _leaf_paths(params) -> list[str]:
  return [
      jax.tree_util.keystr(path, simple=True, separator="/")
      for path, _ in jax.tree.leaves_with_path(params)
  ]


def _kind(module) -> str | None:
  """"dense"/"conv" for a layer the ghost path handles exactly, else None."""
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


def _check_not_batch_norm_in_training(module, args, kwargs) -> None:
  if not isinstance(module, nn.BatchNorm):
    return
  passed = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  use_running_average = (module.use_running_average if passed is None
                         else passed)
  if not use_running_average:
    raise UnsupportedModelError(
        f"nn.BatchNorm at '{_module_path(module)}' runs in training mode: it "
        "normalises with the statistics of the whole batch, so each example's "
        "loss depends on the other examples and per-example gradients are "
        "ill-defined. Use use_running_average=True, or method='vmap', which "
        "gives each example a batch of its own."
    )


def _layer_leaves(module, index: dict[int, int]):
  """(kernel, bias) leaf indices of a supported layer's parameters (bias None
  for a layer without one), or None unless every one of them is a leaf of
  params, unchanged.

  A layer whose kernel is, say, ``2 * params[...]["kernel"]`` while its bias
  is a leaf must not count as supported: its stand-in would hide the
  kernel's use, and the norms would miss the kernel's gradient. With None
  the layer runs as it is, and `analyze` reports its parameters as used
  elsewhere.
  """
  variables = module.variables.get("params", {})
  leaves = {name: index.get(id(variables[name]))
            for name in ("kernel", "bias") if name in variables}
  if not leaves or None in leaves.values():
    return None
  return leaves.get("kernel"), leaves.get("bias")


def _layer_input(args, kwargs):
  return args[0] if args else kwargs["inputs"]


def _kernel_size(module) -> tuple[int, ...]:
  size = module.kernel_size
  return (size,) if isinstance(size, int) else tuple(size)


def _check_leading_axis(module, kind: str, x, y, size: int) -> None:
  # A convolution's input needs a batch axis besides its spatial and feature
  # axes (Flax accepts unbatched inputs, whose leading axis is spatial).
  least = 2 if kind == "dense" else len(_kernel_size(module)) + 2
  if jnp.ndim(x) < least or jnp.shape(x)[0] != size or jnp.shape(y)[0] != size:
    raise UnsupportedModelError(
        f"layer '{_module_path(module)}' is applied to an input of shape "
        f"{jnp.shape(x)}: the ghost path needs the B={size} examples along the "
        "leading axis of every layer input. Use method='vmap'."
    )


def _live_inputs(jaxpr, live_outputs) -> list[bool]:
  """Which inputs of `jaxpr` the outputs marked live depend on (conservative:
  inside any primitive but plain calls, every input counts as used)."""
  live = {v for v, used in zip(jaxpr.outvars, live_outputs)
          if used and isinstance(v, jex.Var)}
  for eqn in reversed(jaxpr.eqns):
    outs = [v in live for v in eqn.outvars]
    if not any(outs):
      continue
    subs = [v.jaxpr if isinstance(v, jex.ClosedJaxpr) else v
            for v in eqn.params.values()
            if isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr))]
    if (eqn.primitive.name in _CALL_PRIMITIVES and len(subs) == 1
        and len(subs[0].invars) == len(eqn.invars)
        and len(subs[0].outvars) == len(eqn.outvars)):
      ins = _live_inputs(subs[0], outs)
    else:
      ins = [True] * len(eqn.invars)
    live.update(v for v, used in zip(eqn.invars, ins)
                if used and isinstance(v, jex.Var))
  return [v in live for v in jaxpr.invars]


def analyze(loss_fn: _base.LossFn, params, batch, key) -> tuple[LayerCall, ...]:
  """The supported layer calls of the loss, in call order; trace time only.

  Raises:
    UnsupportedModelError: some parameter reaches the per-example losses other
      than through a supported layer, a batch normalisation in training mode,
      or a layer without the examples on its leading axis.
  """
  if isinstance(loss_fn, _base.WithL2):  # Its term uses no layer.
    loss_fn = loss_fn.loss_fn
  size = _base.batch_size(batch)
  paths = _leaf_paths(params)
  calls: list[LayerCall] = []
  index: dict[int, int] = {}  # id of a traced parameter leaf -> its position
  owners: dict[int, str] = {}  # leaf -> the unsupported module that holds it

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    _check_not_batch_norm_in_training(module, args, kwargs)
    kind = _kind(module)
    leaves = _layer_leaves(module, index) if kind else None
    if leaves is None:
      variables = module.variables.get("params", {})
      owner = f"{type(module).__name__} at '{_module_path(module)}'"
      if kind:
        transformed = [name for name, value in variables.items()
                       if id(value) not in index]
        owner += (f", whose {' and '.join(transformed)} "
                  f"{'is' if len(transformed) == 1 else 'are'} not a "
                  "parameter leaf as given")
      for value in variables.values():
        if id(value) in index:
          owners[index[id(value)]] = owner
      return next_fun(*args, **kwargs)
    x = _layer_input(args, kwargs)
    y = next_fun(*args, **kwargs)
    _check_leading_axis(module, kind, x, y, size)
    calls.append(LayerCall(_module_path(module), kind, *leaves,
                           tuple(y.shape), y.dtype))
    # A stand-in that depends on the layer's input only: in the traced losses
    # the layer's own use of its parameters then drops out, and a parameter
    # that still reaches the losses is used somewhere else.
    return jnp.zeros_like(y) + 0 * jnp.sum(x).astype(y.dtype)

  def stand_in_losses(p, b, k):
    index.update({id(leaf): i for i, leaf in enumerate(jax.tree.leaves(p))})
    with nn.intercept_methods(interceptor):
      losses, _ = loss_fn(p, b, k)
    return losses

  shapes = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)
  traced = jax.make_jaxpr(stand_in_losses)(
      shapes(params), shapes(batch), None if key is None else shapes(key))
  live = _live_inputs(traced.jaxpr, [True] * len(traced.jaxpr.outvars))
  used_elsewhere = [i for i in range(len(paths)) if live[i]]
  if used_elsewhere:
    described = "; ".join(
        f"'{paths[i]}'" + (f" (of {owners[i]})" if i in owners else "")
        for i in used_elsewhere)
    raise UnsupportedModelError(
        f"the ghost path cannot compute exact per-example gradient norms: "
        f"parameter {described} reaches the per-example losses other than as "
        f"the kernel or bias of a supported layer ({SUPPORTED}), or is "
        "transformed inside loss_fn before the layer uses it (an L2 term: "
        "declare it with gnp.penalties.with_l2). Use method='vmap' "
        "(method='auto' falls back to it)."
    )
  return tuple(calls)


def _rows(call: LayerCall, module, x, delta, norm_dtype):
  """(A [B, T, G, P], D [B, T, G, Q]): inputs and cotangents per position."""
  size = x.shape[0]
  if call.kind == "dense":
    a = x.astype(call.out_dtype)
    groups = 1
  else:
    # Patches from the layer's own geometry (its padding, strides, dilations,
    # extra batch axes), by an identity kernel: channel c·K + j of the result
    # is input channel c at kernel offset j.
    kernel_size = _kernel_size(module)
    window = math.prod(kernel_size)
    channels = x.shape[-1]
    groups = module.feature_group_count
    patcher = nn.Conv(
        features=channels * window, kernel_size=kernel_size,
        strides=module.strides, padding=module.padding,
        input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation, feature_group_count=channels,
        use_bias=False, dtype=call.out_dtype,
        precision=jax.lax.Precision.HIGHEST)
    eye = jnp.eye(window, dtype=call.out_dtype).reshape(
        kernel_size + (1, window))
    identity = jnp.tile(eye, (1,) * (len(kernel_size) + 1) + (channels,))
    a = patcher.apply({"params": {"kernel": identity}},
                      x.astype(call.out_dtype))
  a = a.reshape(size, -1, groups, a.shape[-1] // groups).astype(norm_dtype)
  d = delta.reshape(size, -1, groups, delta.shape[-1] // groups)
  return a, d.astype(norm_dtype)


def _gram_is_cheaper(positions: int, p: int, q: int) -> bool:
  """FLOPs per example and group: T²(P + Q + 1) against T·P·Q + P·Q."""
  return positions * positions * (p + q + 1) <= positions * p * q + p * q


def _mask_rows(mask, groups: int, p: int, q: int):
  """A conv kernel mask [*K, C_in/G, C_out] laid out as the outer form's
  [G, P, Q], P ordered (input channel, kernel offset) like the patches."""
  window = math.prod(mask.shape[:-2])
  mask = mask.reshape(window, mask.shape[-2], groups, q)
  return jnp.transpose(mask, (2, 1, 0, 3)).reshape(groups, p, q)


def _kernel_squared_norms(rows, masks, branch: Branch, with_bias: bool):
  """‖Σ_calls Σ_t a_tᵀ δ_t‖² per example for one kernel: [B].

  With ``with_bias`` (the calls share one bias too) ‖Σ_calls Σ_t δ_t‖² is
  added, folded into the Gram form as a constant input feature 1.
  """
  if any(mask is not None for mask in masks) or branch == "outer":
    # A mask multiplies each call's gradient entry-wise: only the outer form
    # can apply it.
    kernel = bias = 0
    for (a, d), mask in zip(rows, masks):
      grad = jnp.einsum("btgp,btgq->bgpq", a, d)
      if mask is not None:
        grad = grad * _mask_rows(mask, *grad.shape[1:]).astype(grad.dtype)
      kernel, bias = kernel + grad, bias + jnp.sum(d, axis=1)
    squared = jnp.sum(kernel ** 2, axis=(1, 2, 3))
    return squared + jnp.sum(bias ** 2, axis=(1, 2)) if with_bias else squared
  a = jnp.concatenate([a for a, _ in rows], axis=1)
  d = jnp.concatenate([d for _, d in rows], axis=1)
  positions, p, q = a.shape[1], a.shape[-1], d.shape[-1]
  if branch == "auto" and not _gram_is_cheaper(positions, p, q):
    return _kernel_squared_norms(rows, masks, "outer", with_bias)
  if positions == 1:  # (‖a‖² + 1)‖δ‖² per group, on [B, G, ·] arrays
    a, d = a[:, 0], d[:, 0]
    return jnp.sum((jnp.sum(a ** 2, axis=-1) + with_bias)
                   * jnp.sum(d ** 2, axis=-1), axis=-1)
  gram_a = jnp.einsum("btgp,bsgp->bgts", a, a) + with_bias
  gram_d = jnp.einsum("btgq,bsgq->bgts", d, d)
  return jnp.sum(gram_a * gram_d, axis=(1, 2, 3))


def _shared_term_squared(shared: _base.WithL2, params, calls, outputs, deltas,
                         dtype):
  """2 l2 ⟨∇ℓ_i, θ_K⟩ + l2² ‖θ_K‖² for every example: [B].

  A sum that is slightly negative by rounding (∇ℓ_i ≈ −l2 θ_K) gives a
  norm of 0: `_base.safe_sqrt` takes it as 0.
  """
  leaves = jax.tree.leaves(params)
  in_term = shared.in_term(params)
  cross = 0
  for call, z, delta in zip(calls, outputs, deltas):
    norm_dtype = jnp.promote_types(call.out_dtype, jnp.float32)
    d = delta.reshape(delta.shape[0], -1, delta.shape[-1]).astype(norm_dtype)
    kernel = call.kernel is not None and in_term[call.kernel]
    bias = call.bias is not None and in_term[call.bias]
    if kernel:  # Σ_t δ_t · z_t: ⟨∂ℓ_i/∂W, W⟩ + ⟨∂ℓ_i/∂b, b⟩.
      cross += jnp.sum(d * z.reshape(d.shape).astype(norm_dtype), axis=(1, 2))
    if call.bias is not None and kernel != bias:  # ± Σ_t δ_t · b.
      b = leaves[call.bias].astype(norm_dtype)
      cross += (1 if bias else -1) * jnp.sum(d, axis=1) @ b
  weights = sum(jnp.sum(jnp.square(w.astype(dtype)))
                for w in shared.weights(params))
  l2 = shared.l2
  return jnp.asarray(l2 * (2 * cross + l2 * weights), dtype)


def per_example_norms(
    loss_fn: _base.LossFn,
    params,
    batch,
    key,
    *,
    branch: Branch = "auto",
    calls: tuple[LayerCall, ...] | None = None,
):
  """‖∇ℓ_i(θ)‖ for every example i by ghost norms; differentiable in params.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``; it is called
      once, on the whole batch, with ``key``. A `gnp.penalties.with_l2` loss
      keeps its L2 term in the losses, the gradient and the norms (module
      docstring).
    params: the parameters θ.
    batch: the batch; every leaf has the B examples along its leading axis.
    key: passed to ``loss_fn`` unchanged.
    branch: ``"auto"`` picks the Gram or the outer form per kernel by cost;
      ``"gram"`` or ``"outer"`` force one (a masked kernel is always outer).
    calls: the result of `analyze` when the caller already has it.

  Returns:
    (mean loss L(θ), aux of that batched call, [B] norms, ∇L(θ)).

  Raises:
    UnsupportedModelError: see `analyze`; also when ``loss_fn`` calls its
      layers differently from one trace to the next (a jitted ``loss_fn``
      whose cached trace skips the interception).
  """
  losses, aux, norms, summed_grad, _ = per_example_norms_with_pullback(
      loss_fn, params, batch, key, branch=branch, calls=calls)
  size = _base.batch_size(batch)
  mean_grad = jax.tree.map(lambda g: g / size, summed_grad)
  return jnp.mean(losses), aux, norms, mean_grad


def per_example_norms_with_pullback(
    loss_fn: _base.LossFn,
    params,
    batch,
    key,
    *,
    branch: Branch = "auto",
    calls: tuple[LayerCall, ...] | None = None,
):
  """`per_example_norms`, and the forward pass's pullback for reuse.

  Returns ([B] per-example losses, aux, [B] norms, ∇Σ_i ℓ_i(θ), pullback),
  where ``pullback(w)`` with ``w`` of shape [B] is ∇_θ Σ_i w_i ℓ_i(θ): one
  more backward pass through the forward pass already made (per-example
  clipping weights each example by its clip factor this way). Arguments and
  errors as `per_example_norms`.
  """
  if branch not in BRANCHES:
    raise ValueError(f"unknown branch={branch!r}; choose one of {BRANCHES}.")
  shared = loss_fn if isinstance(loss_fn, _base.WithL2) else None
  if shared is not None:
    loss_fn = shared.loss_fn
  if calls is None:
    calls = analyze(loss_fn, params, batch, key)
  size = _base.batch_size(batch)
  modules = []

  def forward(p, probes):
    index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(p))}
    inputs, outputs, masks = [], [], []

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      leaves = None
      if context.method_name == "__call__" and _kind(module):
        leaves = _layer_leaves(module, index)
      if leaves is None:
        return next_fun(*args, **kwargs)
      k = len(inputs)
      if k >= len(calls) or (calls[k].path, calls[k].kernel,
                             calls[k].bias) != (_module_path(module), *leaves):
        raise UnsupportedModelError(
            f"layer '{_module_path(module)}' was not called as when loss_fn "
            "was analysed; loss_fn must trace the same layers every time.")
      inputs.append(_layer_input(args, kwargs))
      masks.append(getattr(module, "mask", None))
      modules.append(module)
      outputs.append(next_fun(*args, **kwargs))
      return outputs[-1] + probes[k]

    with nn.intercept_methods(interceptor):
      losses, aux = loss_fn(p, batch, key)
    if len(inputs) != len(calls):
      raise UnsupportedModelError(
          f"loss_fn called {len(inputs)} supported layers, {len(calls)} when "
          "analysed: the layer calls must be traced every time (a jitted "
          "loss_fn reuses its trace and escapes the interception).")
    if jnp.ndim(losses) != 1:
      raise ValueError(
          "loss_fn must return per-example losses of shape [B]; got shape "
          f"{jnp.shape(losses)}.")
    if shared is not None:
      losses = losses + shared.term(p)
    return losses, (aux, inputs, outputs, masks)

  probes = [jnp.zeros(call.out_shape, call.out_dtype) for call in calls]
  losses, backward, (aux, inputs, outputs, masks) = jax.vjp(
      forward, params, probes, has_aux=True)
  # One backward pass of Σ_i ℓ_i: the probes' cotangents are every example's
  # δ, the parameters' the summed gradient (for the grad_norm statistic).
  summed_grad, deltas = backward(jnp.ones_like(losses))

  rows = [
      _rows(call, module, x, delta,
            jnp.promote_types(call.out_dtype, jnp.float32))
      for call, module, x, delta in zip(calls, modules, inputs, deltas)
  ]
  kernels, biases = {}, {}
  for k, call in enumerate(calls):
    if call.kernel is not None:
      kernels.setdefault(call.kernel, []).append(k)
    if call.bias is not None:
      biases.setdefault(call.bias, []).append(k)
  squared = jnp.zeros(size, jnp.promote_types(losses.dtype, jnp.float32))
  for ks in kernels.values():
    bias = calls[ks[0]].bias
    with_bias = biases.get(bias) == ks  # the usual layer: one kernel, one bias
    if with_bias:
      del biases[bias]
    squared += _kernel_squared_norms(
        [rows[k] for k in ks], [masks[k] for k in ks], branch, with_bias)
  for ks in biases.values():
    bias_grad = sum(jnp.sum(rows[k][1], axis=1) for k in ks)
    squared += jnp.sum(bias_grad ** 2, axis=(1, 2))
  if shared is not None:
    squared += _shared_term_squared(shared, params, calls, outputs, deltas,
                                    squared.dtype)
  pullback = lambda weights: backward(weights)[0]
  return losses, aux, _base.safe_sqrt(squared), summed_grad, pullback
