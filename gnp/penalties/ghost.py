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
kernel and bias together give (‖a‖² + 1)‖δ‖². Where T(P+Q) > PQ it is
cheaper to form the per-example kernel gradient Σ_t a_tᵀ δ_t of this one layer (outer form,
~TPQ) and take its norm; each layer takes whichever needs fewer FLOPs (which
also needs less memory: the Gram form wins only where 2T² < PQ/2). A
convolution with ``feature_group_count`` G is G independent P×Q blocks with
P = C_in/G · prod(kernel_size), Q = C_out/G, and the squared norms add up. A
kernel scaled or masked entry-wise, M ⊙ W, has the gradient
M ⊙ Σ_t a_tᵀ δ_t, and only the outer form can apply M. A layer
applied several times (shared weights) has the sum over its calls as its
gradient: the calls' positions are concatenated, T = Σ_calls T_c. The
per-example squared norm is the sum over every parameter leaf.

The inputs a are captured, and δ obtained, without editing the model:
`gnp.penalties.ghost_jaxpr` finds every linear use of a parameter in the
jaxpr of the loss, for a model written with any JAX library (Flax linen or
NNX, Equinox, plain ``jax.numpy``), and says what it supports and what it
refuses. Here a small interpreter evaluates that jaxpr once, on the whole
batch, recording each use's input a and adding a zero "probe" to its
output z; one backward pass of Σ_i ℓ_i gives, as the probes' cotangents, δ
for every example at once (∂Σ_j ℓ_j/∂z_i = ∂ℓ_i/∂z_i, since examples do not
interact, which the analysis establishes). Everything is ordinary JAX: the
norms are differentiable (GNVR's second-order gradient flows through a and
δ) and work under ``jit``, ``vmap`` (a population of parameter sets),
sharded batches and ``shard_map`` (there the probes vary across devices as
the outputs they are added to do, so each device's δ are its own
examples').

Per parameter leaf: if its every use is a dot_general or conv with the same
layout through a norm-preserving view (no scaling: the usual case), the
uses' positions are concatenated and `_kernel_squared_norms` takes the Gram
or outer form by cost; a bias added straight to each such use's output (so
that it shares its δ: the usual dense or convolution layer) joins them as
the constant input feature 1. Otherwise (a scaled or masked kernel, a leaf
used under two different layouts, any other bias) each use's per-example
gradient is formed in the view's layout (outer form), pulled back to the
leaf through the transpose of the view (a linear map), and summed over the
uses before the norm is taken. Norms are computed in the use's compute
dtype promoted to at least float32.

An L2 term that every example shares, ½ · l2 · ‖θ_K‖² declared with
`gnp.penalties.with_l2` (θ_K: θ on the leaves the term covers, 0 elsewhere),
adds the same l2 · θ_K to every example's gradient. With ∇ℓ_i the gradient
without it,

    ‖∇ℓ_i + l2 θ_K‖² = ‖∇ℓ_i‖² + 2 l2 ⟨∇ℓ_i, θ_K⟩ + l2² ‖θ_K‖²,

and the cross term comes per use from the pass already made: a use's output
z is linear in the leaf's view (a kernel: z = f(a; V(W)); a bias: z = x +
V(b)), so its part of ⟨∂ℓ_i/∂W, W⟩ is Σ δ · z over example i's entries (for
a bias, Σ δ · V(b)). It costs one product with each use's output, no further
pass. Leaves in K that the losses do not use have ∇ℓ_i = 0 there and add to
‖θ_K‖² only. The forward pass adds the term to the losses, so its backward
passes (∇L, clipping's second pass) include l2 θ_K as well. An L2 term
written into ``loss_fn`` is refused like any other non-linear use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from gnp.penalties import _base
from gnp.penalties import ghost_jaxpr

Branch = Literal["auto", "gram", "outer"]
BRANCHES = ("auto", "gram", "outer")
UnsupportedModelError = ghost_jaxpr.UnsupportedModelError
analyze = ghost_jaxpr.analyze


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


# Evaluation ---------------------------------------------------------------


@dataclasses.dataclass
class _Chain:
  """A parameter's view as a function of the leaf (casts left out, so it
  runs in any float dtype), and the broadcast that follows it, if any."""

  fn: Callable
  expand: tuple | None = None  # (shape, broadcast_dimensions)


def _bind(eqn, invals):
  bound = eqn.primitive.get_bind_params(eqn.params)
  # Older JAX returns (subfuns, params), newer the params alone.
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*subfuns, *invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _extend(chain: _Chain, eqn, invals, k, kind) -> _Chain:
  """The chain of the view that `eqn` (a `_VIEWS` primitive) makes of it."""
  if kind == "cast":
    return chain
  if kind == "expand":
    return _Chain(chain.fn, (eqn.params["shape"],
                             eqn.params["broadcast_dimensions"]))
  others = list(invals)

  def fn(leaf):
    args = [jnp.asarray(x, leaf.dtype) if j != k else chain.fn(leaf)
            for j, x in enumerate(others)]
    # Under shard_map the leaf may vary across devices where the parameter
    # did not (a per-example gradient does).
    axes = frozenset().union(*(_varying_axes(jax.typeof(a)) for a in args))
    return _bind(eqn, [_vary(a, axes) for a in args])[0]

  return _Chain(fn)


class _Interpreter:
  """Evaluates a `Plan`'s jaxpr with probes added at its sites."""

  def __init__(self, plan: ghost_jaxpr.Plan, probes):
    self.plan = plan
    self.sites = {site.path: (n, site) for n, site in enumerate(plan.sites)}
    self.probes = probes
    self.inputs = [None] * len(plan.sites)  # a for "dot" / "conv"
    # For the L2 cross term: z for "dot" / "conv", the bias's view V(b),
    # whose product with δ is the use's part of ⟨∂ℓ_i/∂θ, θ⟩.
    self.linear = [None] * len(plan.sites)
    self.chains = [None] * len(plan.sites)

  def run(self, jaxpr, consts, args, chains, prefix=()):
    env, chain_of = {}, {}
    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x, c in zip(jaxpr.invars, args, chains):
      env[v] = x
      if c is not None:
        chain_of[v] = c
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
    for i, eqn in enumerate(jaxpr.eqns):
      path = prefix + (i,)
      invals = [read(v) for v in eqn.invars]
      in_chains = [chain_of.get(v) if isinstance(v, jex.Var) else None
                   for v in eqn.invars]
      out_chains = [None] * len(eqn.outvars)
      if path in self.plan.inline:
        sub, sub_consts = ghost_jaxpr.sub_jaxpr(eqn)
        outs, out_chains = self.run(sub, sub_consts, invals, in_chains, path)
      elif path in self.sites:
        n, site = self.sites[path]
        outs = _bind(eqn, invals)
        self.linear[n] = (invals[site.operand] if site.kind == "bias"
                          else outs[0])
        outs = [outs[0] + self.probes[n]]
        self.chains[n] = in_chains[site.operand]
        if site.kind != "bias":
          self.inputs[n] = invals[1 - site.operand]
      else:
        outs = _bind(eqn, invals)
        kind = self.plan.views.get(path)
        if kind == "identity":
          out_chains = in_chains
        elif kind is not None:
          k = next(j for j, c in enumerate(in_chains) if c is not None)
          out_chains = [_extend(in_chains[k], eqn, invals, k, kind)]
      for v, x, c in zip(eqn.outvars, outs, out_chains):
        if isinstance(v, jex.Var):  # A dropped output is never read.
          env[v] = x
          if c is not None:
            chain_of[v] = c
    return ([read(v) for v in jaxpr.outvars],
            [chain_of.get(v) if isinstance(v, jex.Var) else None
             for v in jaxpr.outvars])


def _dot_rows(site: ghost_jaxpr.Site, x, delta):
  """(A [B, T, G, P], D [B, T, G, Q]) of a dot_general site."""
  _, _, _, x_contract, x_batch, x_free = ghost_jaxpr.dot_layout(site)
  size = x.shape[site.batch_axis]
  positions = [d for d in x_free if d != site.batch_axis]
  groups = math.prod(x.shape[d] for d in x_batch)
  a = jnp.transpose(x, (site.batch_axis, *positions, *x_batch, *x_contract))
  a = a.reshape(size, -1, groups, math.prod(x.shape[d] for d in x_contract))
  z_groups, w_axes, x_axes = ghost_jaxpr.dot_out_axes(site)
  z_batch = x_axes[x_free.index(site.batch_axis)]
  z_positions = [x_axes[j] for j, d in enumerate(x_free)
                 if d != site.batch_axis]
  d = jnp.transpose(delta, (z_batch, *z_positions, *z_groups, *w_axes))
  return a, d.reshape(size, a.shape[1], groups, -1)


def _conv_rows(site: ghost_jaxpr.Site, x, delta):
  """(A [B, T, G, P], D [B, T, G, Q]) of a conv_general_dilated site, P
  ordered (input channel within the group, kernel offset)."""
  p = site.eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  spatial = len(lhs_spec) - 2
  w_shape = site.eqn.invars[1].aval.shape
  kernel_size = tuple(w_shape[d] for d in rhs_spec[2:])
  window = math.prod(kernel_size)
  x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  size, channels = x.shape[0], x.shape[-1]
  # Patches by an identity kernel: channel c·K + j of the result is input
  # channel c at kernel offset j.
  eye = jnp.eye(window, dtype=x.dtype).reshape(kernel_size + (1, window))
  identity = jnp.tile(eye, (1,) * (spatial + 1) + (channels,))
  last = spatial + 1
  a = jax.lax.conv_general_dilated(
      x, identity, window_strides=p["window_strides"], padding=p["padding"],
      lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
      dimension_numbers=jax.lax.ConvDimensionNumbers(
          (0, last, *range(1, last)), (last, spatial, *range(spatial)),
          (0, last, *range(1, last))),
      feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
  groups = p["feature_group_count"]
  a = a.reshape(size, -1, groups, a.shape[-1] // groups)
  d = jnp.transpose(delta, (out_spec[0], *out_spec[2:], out_spec[1]))
  return a, d.reshape(size, a.shape[1], groups, -1)


def _rows(site: ghost_jaxpr.Site, x, delta, dtype):
  rows = _dot_rows if site.kind == "dot" else _conv_rows
  return rows(site, x.astype(dtype), delta.astype(dtype))


def _view_grads(site: ghost_jaxpr.Site, a, d):
  """Per-example gradients [B, *W'.shape] in the layout of the view W' that
  the site uses, from its rows (outer form)."""
  grad = jnp.einsum("btgp,btgq->bgpq", a, d)
  w_shape = site.eqn.invars[site.operand].aval.shape
  size = grad.shape[0]
  if site.kind == "dot":
    w_batch, w_contract, w_free, *_ = ghost_jaxpr.dot_layout(site)
    order = [*w_batch, *w_contract, *w_free]
    grad = grad.reshape(size, *(w_shape[j] for j in order))
  else:
    rhs_spec = site.eqn.params["dimension_numbers"][1]
    kernel_size = [w_shape[j] for j in rhs_spec[2:]]
    spatial = len(kernel_size)
    groups, _, q = grad.shape[1], grad.shape[2], grad.shape[3]
    grad = grad.reshape(size, groups, -1, *kernel_size, q)
    grad = jnp.transpose(grad, (0, *range(3, 3 + spatial), 2, 1, 3 + spatial))
    grad = grad.reshape(size, *kernel_size, -1, groups * q)
    order = [*rhs_spec[2:], rhs_spec[1], rhs_spec[0]]
  return jnp.transpose(grad, (0, *(1 + order.index(j)
                                   for j in range(len(w_shape)))))


def _bias_view_grads(site: ghost_jaxpr.Site, delta, dtype):
  """[B, *w1] per-example gradients of a bias site's operand w, with w1 its
  shape with the examples' axis set to 1 (the axis stays, holding B)."""
  z_shape = site.out_aval.shape
  w_aval = site.eqn.invars[site.operand].aval
  w1 = list(w_aval.shape) if w_aval.ndim else [1] * len(z_shape)
  w1[site.batch_axis] = 1
  axes = tuple(j for j in range(len(z_shape)) if j != site.batch_axis
               and w1[j] == 1 and z_shape[j] != 1)
  return jnp.sum(delta.astype(dtype), axis=axes, keepdims=True), tuple(w1)


def _pull_back(chain: _Chain, grads, leaf_shape, dtype, batch_axis=0,
               w1=None):
  """The per-example gradients [B, *leaf_shape] of the leaf from those of
  its view (examples on `batch_axis`), through the view's transpose."""

  def view(leaf):
    w = chain.fn(leaf)
    if chain.expand is not None:
      shape, dims = chain.expand
      shape = list(shape)
      shape[batch_axis] = 1
      w = jax.lax.broadcast_in_dim(w, shape, dims)
    return w.reshape(w1) if w1 is not None else w

  leaf = _vary(jnp.zeros(leaf_shape, dtype), _varying_axes(jax.typeof(grads)))
  _, pullback = jax.vjp(view, leaf)
  if w1 is None:
    return jax.vmap(lambda g: pullback(g)[0])(grads)
  return jax.vmap(lambda g: pullback(jnp.expand_dims(g, batch_axis))[0],
                  in_axes=batch_axis)(grads)


def _varying_axes(aval) -> frozenset:
  """The shard_map mesh axes along which values of type `aval` vary."""
  manual = getattr(aval, "manual_axis_type", None)  # Since JAX 0.9; vma before.
  return frozenset(manual.varying if manual is not None
                   else getattr(aval, "vma", ()))


def _vary(x, axes):
  """`x`, cast to vary along `axes` too (a no-op outside shard_map)."""
  missing = tuple(sorted(axes - _varying_axes(jax.typeof(x))))
  if not missing:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)


def _folded_biases(sites, by_leaf, fast) -> dict[int, int]:
  """kernel leaf -> bias leaf, where the bias leaf's every use is added to
  the output of one of the kernel leaf's uses, one bias use each, so its
  per-example gradient folds into the kernel's rows as a feature 1 (the
  usual dense or convolution layer: one fewer reduction per layer)."""
  folded = {}
  for leaf, ns in by_leaf.items():
    follows = [sites[n].follows for n in ns]
    if (all(sites[n].kind == "bias" and sites[n].preserving for n in ns)
        and None not in follows):
      kernel = sites[follows[0]].leaf
      if kernel in fast and sorted(follows) == by_leaf[kernel]:
        folded[kernel] = leaf
  return folded


def _zeros_like(aval):
  """Zeros of `aval`'s type. Under shard_map a probe varies across devices
  as its site's output does: an invariant probe's cotangent would be summed
  over the devices' examples."""
  return _vary(jnp.zeros(aval.shape, aval.dtype), _varying_axes(aval))


def per_example_norms_with_pullback(
    loss_fn: _base.LossFn,
    params,
    batch,
    key,
    *,
    branch: Branch = "auto",
    plan: ghost_jaxpr.Plan | None = None,
):
  """`per_example_norms`, and the forward pass's pullback for reuse.

  Returns ([B] per-example losses, aux, [B] norms, ∇Σ_i ℓ_i(θ), pullback),
  where ``pullback(w)`` with ``w`` of shape [B] is ∇_θ Σ_i w_i ℓ_i(θ): one
  more backward pass through the forward pass already made (per-example
  clipping weights each example by its clip factor this way). Arguments and
  errors as `per_example_norms`.
  """
  if branch not in BRANCHES:
    raise ValueError(
        f"unknown branch={branch!r}; choose one of {BRANCHES}.")
  shared = loss_fn if isinstance(loss_fn, _base.WithL2) else None
  if shared is not None:
    loss_fn = shared.loss_fn
  if plan is None:
    plan = ghost_jaxpr.analyze(loss_fn, params, batch, key)
  leaves, treedef = jax.tree.flatten(params)
  data = jax.tree.leaves(batch) + jax.tree.leaves(key)
  interpreter = None

  def forward(p, probes):
    nonlocal interpreter
    interpreter = _Interpreter(plan, probes)
    outs, _ = interpreter.run(plan.jaxpr.jaxpr, plan.jaxpr.consts, p + data,
                              [_Chain(lambda w: w) for _ in p]
                              + [None] * len(data))
    losses, aux = jax.tree.unflatten(plan.out_tree, outs)
    if shared is not None:
      losses = losses + shared.term(treedef.unflatten(p))
    return losses, (aux, interpreter.inputs, interpreter.linear)

  probes = [_zeros_like(site.out_aval) for site in plan.sites]
  losses, backward, (aux, inputs, linear) = jax.vjp(forward, leaves, probes,
                                                    has_aux=True)
  # One backward pass of Σ_i ℓ_i: the probes' cotangents are every example's
  # δ, the parameters' the summed gradient.
  summed_leaves, deltas = backward(jnp.ones_like(losses))
  chains = interpreter.chains
  norm_dtype = jnp.promote_types(losses.dtype, jnp.float32)
  squared = jnp.zeros(losses.shape, norm_dtype)
  by_leaf: dict[int, list[int]] = {}
  for n, site in enumerate(plan.sites):
    by_leaf.setdefault(site.leaf, []).append(n)
  fast = {leaf for leaf, ns in by_leaf.items()
          if all(plan.sites[n].kind != "bias" and plan.sites[n].preserving
                 for n in ns)
          and len({plan.sites[n].signature for n in ns}) == 1}
  folded = _folded_biases(plan.sites, by_leaf, fast)
  for leaf, ns in by_leaf.items():
    if leaf in folded.values():
      continue  # Added with its kernel's.
    sites = [plan.sites[n] for n in ns]
    dtype = jnp.promote_types(
        jnp.result_type(*(s.out_aval.dtype for s in sites)), jnp.float32)
    if leaf in fast:
      rows = [_rows(s, inputs[n], deltas[n], dtype) for n, s in zip(ns, sites)]
      squared += _kernel_squared_norms(
          rows, branch, leaf in folded).astype(norm_dtype)
      continue
    grad = 0
    for n, site in zip(ns, sites):
      if site.kind == "bias":
        g, w1 = _bias_view_grads(site, deltas[n], dtype)
        grad += _pull_back(chains[n], g, jnp.shape(leaves[leaf]), dtype,
                           site.batch_axis, w1)
      else:
        g = _view_grads(site, *_rows(site, inputs[n], deltas[n], dtype))
        grad += _pull_back(chains[n], g, jnp.shape(leaves[leaf]), dtype)
    squared += jnp.sum(jnp.reshape(grad, (grad.shape[0], -1)) ** 2,
                       axis=1).astype(norm_dtype)
  if shared is not None:
    squared += _shared_term_squared(shared, params, plan.sites, linear,
                                    deltas, norm_dtype)
  pullback = lambda weights: treedef.unflatten(backward(weights)[0])
  return (losses, aux, _base.safe_sqrt(squared), treedef.unflatten(
      summed_leaves), pullback)


def _shared_term_squared(shared: _base.WithL2, params, sites, linear, deltas,
                         dtype):
  """2 l2 ⟨∇ℓ_i, θ_K⟩ + l2² ‖θ_K‖² for every example: [B].

  Each use of a leaf in K adds Σ δ · z (a kernel; z linear in its view) or
  Σ δ · V(b) (a bias) over example i's entries (module docstring). A sum
  that is slightly negative by rounding (∇ℓ_i ≈ −l2 θ_K) gives a norm of 0:
  `_base.safe_sqrt` takes it as 0.
  """
  in_term = shared.in_term(params)
  cross = 0
  for site, value, delta in zip(sites, linear, deltas):
    if not in_term[site.leaf]:
      continue
    product = (delta.astype(dtype) * jnp.broadcast_to(value, delta.shape)
               .astype(dtype))
    product = jnp.moveaxis(product, site.out_axis, 0)
    cross += jnp.sum(product.reshape(product.shape[0], -1), axis=1)
  weights = sum(jnp.sum(jnp.square(w.astype(dtype)))
                for w in shared.weights(params))
  return jnp.asarray(shared.l2 * (2 * cross + shared.l2 * weights), dtype)


def per_example_norms(loss_fn: _base.LossFn, params, batch, key, *,
                      branch: Branch = "auto",
                      plan: ghost_jaxpr.Plan | None = None):
  """‖∇ℓ_i(θ)‖ for every example i by ghost norms; differentiable in params.

  Args:
    loss_fn: ``loss_fn(params, batch, key) -> (losses, aux)``, any JAX
      function (Flax linen or NNX, Equinox, plain ``jax.numpy``); it is
      traced once by `ghost_jaxpr.analyze` and evaluated once, on the whole
      batch, with ``key``.
    params: the parameters θ, any pytree.
    batch: the batch; every leaf has the B examples along its leading axis.
    key: passed to ``loss_fn`` unchanged.
    branch: ``"auto"`` picks the Gram or the outer form per kernel by cost;
      ``"gram"`` or ``"outer"`` force one (a scaled or masked kernel, or one
      used under two layouts, is always outer).
    plan: the result of `ghost_jaxpr.analyze` when the caller has it.

  Returns:
    (mean loss L(θ), aux of that batched call, [B] norms, ∇L(θ)).

  Raises:
    UnsupportedModelError: see `ghost_jaxpr.analyze`; it names the
      parameter and the primitive the ghost path cannot account for.
  """
  losses, aux, norms, summed_grad, _ = per_example_norms_with_pullback(
      loss_fn, params, batch, key, branch=branch, plan=plan)
  size = losses.shape[0]
  return (jnp.mean(losses), aux, norms,
          jax.tree.map(lambda g: g / size, summed_grad))

