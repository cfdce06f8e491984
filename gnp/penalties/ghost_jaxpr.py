"""The linear uses of the parameters in a traced loss (its jaxpr).

The mathematics is `gnp.penalties.ghost`'s (Goodfellow 2015, arXiv
1510.01799): a parameter W' used linearly as z = a W' at T positions per
example has the per-example gradient Σ_t a_tᵀ δ_t, δ_t = ∂ℓ_i/∂z_t, whose
squared norm is Σ_{t,t'} (a_t·a_t')(δ_t·δ_t') (Gram form) or the squared
norm of that P×Q matrix (outer form), whichever costs less. The linear
uses are found in the jaxpr of ``loss_fn``, not in a library's layers, so
the model may be written with Flax linen or NNX (``nnx.merge`` inside
``loss_fn``), Equinox or plain ``jax.numpy``: any function of a pytree of
parameters.

`analyze` traces ``loss_fn(params, batch, key)`` to a jaxpr and follows two
things through every equation the per-example losses depend on:

* where the examples are: every batch leaf carries them on axis 0; each
  primitive moves that axis (transpose, reshape, broadcast, dot_general, conv,
  gather, pooling, ...) or keeps it (elementwise ops). A primitive that
  combines different examples (a reduction over the examples' axis, as a
  batch normalisation in training mode does) is refused: per-example
  gradients are ill-defined there. So is a primitive whose effect on the
  axis is not known here.
* which values are a parameter leaf seen through a *view*: casts, reshapes,
  transposes, size-1 broadcasts, negation and scaling by a constant (a
  kernel mask). A view may reach the losses only as

  - one operand of a ``dot_general`` whose other operand carries the
    examples on an axis it does not contract (a dense layer on vectors or
    sequences, an einsum; the dot_general's batch dimensions are the groups
    G of the mathematics, so per-position kernels as in ``ConvLocal`` are
    exact too),
  - the kernel (rhs) of a ``conv_general_dilated`` whose lhs carries the
    examples on its batch dimension (any strides, padding, dilations,
    feature groups; the input patches come from the equation's own
    geometry), or
  - an additive bias: ``add``/``sub`` with an operand carrying the examples,
    broadcast over them (after at most one broadcast_in_dim).

  Any other use (a gather — an embedding —, a norm's scale multiplying the
  activations, an L2 term, a parameter inside ``scan``/``while``/``cond`` or
  a ``custom_jvp``/``custom_vjp`` function) is refused, naming the
  parameter's path and the primitive.

`jit`, `closed_call` and `remat` (``jax.checkpoint``) calls are followed
inside; where a parameter enters one, its body is evaluated inline (under
`remat` the ghost forward pass then keeps its activations).

`gnp.penalties.ghost` evaluates the jaxpr with the linear uses found here
(`Plan`) and computes the norms.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from gnp import errors
from gnp.penalties import _base


class UnsupportedModelError(errors.UserError, ValueError):
  """The ghost path cannot compute this model's per-example norms exactly."""


# Primitives that map each position of their output to the same position of
# their operands (operands of rank 0 or with size-1 axes broadcast).
_ELEMENTWISE = frozenset("""
    abs acos acosh add and asin asinh atan atan2 atanh bessel_i0e bessel_i1e
    cbrt ceil clamp clz complex conj convert_element_type cos cosh
    digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma igammac
    imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne
    neg nextafter not or polygamma population_count pow real reduce_precision
    rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh
    xor zeta
""".split())
# Primitives whose every output is its operand (placement, vma typing).
_IDENTITY = frozenset(
    "copy copy_p device_put layout_constraint mesh_cast optimization_barrier "
    "pcast pvary reshard sharding_constraint".split())
_REDUCTIONS = frozenset("""
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or
    reduce_xor argmax argmin
""".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_WINDOWED = frozenset(
    "reduce_window_sum reduce_window_max reduce_window_min reduce_window"
    .split())
# Calls whose one sub-jaxpr lines up with the equation's inputs and outputs.
_CALLS = frozenset("jit pjit closed_call core_call remat2 checkpoint".split())
# The same, with a derivative rule of their own: followed to find the
# examples, refused where a parameter enters (inlining would drop the rule).
_CUSTOM = frozenset(
    "custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr".split())
# Views of a parameter: linear maps of it, which `ghost` transposes.
_VIEWS = frozenset(
    "convert_element_type reshape transpose squeeze broadcast_in_dim neg mul "
    "div".split())


@dataclasses.dataclass(frozen=True)
class _Param:
  """A parameter leaf through a view (the state of a jaxpr variable)."""

  leaf: int
  signature: tuple  # the view's ops, casts left out
  preserving: bool  # a relabelling of the leaf's entries (no scale, no mask)
  # (shape, broadcast_dimensions) of a broadcast to more entries, after which
  # only an additive bias may follow.
  expanded: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Site:
  """One linear use of a parameter in the traced loss, found by `analyze`.

  ``path`` locates the equation: its index in the jaxpr, preceded by the
  indices of the calls it sits inside.
  """

  path: tuple[int, ...]
  kind: str  # "dot", "conv" or "bias"
  leaf: int  # index into jax.tree.leaves(params)
  operand: int  # which operand of the equation is the parameter's view
  batch_axis: int  # the examples' axis of the other operand (= of z for bias)
  signature: tuple  # equal signatures: rows in the same coordinates
  preserving: bool
  eqn: Any  # the jaxpr equation
  # For a bias added to a dot/conv site's output z, laid out as z's features
  # (and groups) and broadcast over its examples and positions: that site's
  # index. Its gradient is then Σ_t δ_t, a constant input feature 1.
  follows: int | None = None
  out_axis: int | None = None  # the examples' axis of the output z

  @property
  def out_aval(self):
    return self.eqn.outvars[0].aval


@dataclasses.dataclass(frozen=True)
class Plan:
  """The traced loss and the linear uses of its parameters."""

  jaxpr: Any  # ClosedJaxpr of (params, batch, key) -> (losses, aux) leaves
  out_tree: Any
  sites: tuple[Site, ...]
  inline: frozenset  # paths of calls to evaluate inline
  views: dict  # path of a view equation -> "cast" | "expand" | "linear"
  paths: tuple[str, ...]  # the parameter leaves' paths


def _leaf_paths(params) -> list[str]:
  """'a/b/c' for each leaf of `params`, in `jax.tree.leaves` order."""
  return [
      jax.tree_util.keystr(path, simple=True, separator="/")
      for path, _ in jax.tree.leaves_with_path(params)
  ]


def _where(eqn) -> str:
  try:  # The user's source line, where this JAX can tell.
    from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
    where = source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ""
  return f" at {where}" if where else ""


def _describe(eqn) -> str:
  ins = ", ".join(str(v.aval.str_short()) for v in eqn.invars
                  if hasattr(v.aval, "str_short"))
  return f"{eqn.primitive.name}({ins}){_where(eqn)}"


def sub_jaxpr(eqn):
  """(Jaxpr, consts) of a call equation's one sub-jaxpr."""
  subs = [v for v in eqn.params.values()
          if isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr))]
  if len(subs) != 1:
    return None
  sub = subs[0]
  if isinstance(sub, jex.ClosedJaxpr):
    return sub.jaxpr, list(sub.consts)
  return sub, []


def _live(jaxpr, live_out) -> set:
  """The variables that the outputs marked live depend on."""
  live = {v for v, used in zip(jaxpr.outvars, live_out)
          if used and isinstance(v, jex.Var)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if isinstance(v, jex.Var))
  return live


class _Analysis:
  """Follows the examples' axis and the parameters' views through a jaxpr."""

  def __init__(self, paths, size):
    self.paths = paths
    self.size = size
    self.sites: list[Site] = []
    self.inline: set = set()
    self.views: dict = {}
    self.site_of: dict = {}  # a dot/conv site's output variable -> its index
    self.uses = collections.Counter()  # of each variable of the jaxpr walked

  # Refusals ---------------------------------------------------------------

  def refuse_param(self, eqn, param: _Param, why: str = ""):
    raise UnsupportedModelError(
        f"the ghost path cannot compute exact per-example gradient norms: "
        f"parameter '{self.paths[param.leaf]}' reaches the per-example losses "
        f"through {_describe(eqn)}{why}. It handles a parameter (cast, "
        "reshaped, transposed or scaled by a constant) only as an operand of "
        "a dot_general or the kernel of a conv_general_dilated whose other "
        "operand carries the examples, or as an additive bias broadcast over "
        "them (an L2 term every example shares: declare it with "
        "gnp.penalties.with_l2). Use method='vmap' (method='auto' falls back "
        "to it).")

  def refuse_mixing(self, eqn, axis, why="combines different examples"):
    raise UnsupportedModelError(
        f"{_describe(eqn)} {why} (the examples are on axis {axis} of its "
        "operand): each example's loss then depends on the other examples "
        "(a normalisation across the batch, as BatchNorm in training mode?), "
        "so per-example gradients are ill-defined for the ghost path. Use "
        "method='vmap', which gives each example a batch of its own.")

  def refuse_unknown(self, eqn, why=""):
    raise UnsupportedModelError(
        f"the ghost path cannot follow the examples' axis through "
        f"{_describe(eqn)}{why}. Use method='vmap' (method='auto' falls back "
        "to it).")

  # The walk ---------------------------------------------------------------

  def walk(self, jaxpr, in_states, live_out, prefix=()):
    """The states of `jaxpr`'s outputs given its inputs' states."""
    state = {}
    for v, s in zip(jaxpr.invars, in_states):
      state[v] = s
    read = lambda v: state.get(v) if isinstance(v, jex.Var) else None
    live = _live(jaxpr, live_out)
    outer_uses, self.uses = self.uses, collections.Counter(
        v for eqn in jaxpr.eqns if any(u in live for u in eqn.outvars)
        for v in eqn.invars if isinstance(v, jex.Var))
    self.uses.update(v for v, used in zip(jaxpr.outvars, live_out)
                     if used and isinstance(v, jex.Var))
    for i, eqn in enumerate(jaxpr.eqns):
      live_here = [v in live for v in eqn.outvars]
      if not any(live_here):
        continue
      path = prefix + (i,)
      ins = [read(v) for v in eqn.invars]
      outs = self.step(eqn, ins, path, live_here)
      for v, s in zip(eqn.outvars, outs):
        # Axes computed from equation parameters may be numpy integers.
        state[v] = int(s) if isinstance(s, np.integer) else s
    self.uses = outer_uses
    return [read(v) for v in jaxpr.outvars]

  def step(self, eqn, ins, path, live):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    params = [s for s in ins if isinstance(s, _Param)]
    if all(s is None for s in ins):
      return [None] * n_out  # Constants, keys, random bits: no examples.
    if name in _IDENTITY:
      if params:
        self.views[path] = "identity"
      return list(ins)
    if name in _CALLS or name in _CUSTOM:
      return self.call(eqn, ins, path, live)
    if params:
      return [self.param_use(eqn, ins, path)]
    try:
      return self.batch_rule(eqn, ins)
    except (AttributeError, IndexError, KeyError, TypeError) as e:
      # Parameters laid out otherwise than this JAX's: unknown, not a crash,
      # so that method="auto" still has its vmap path.
      self.refuse_unknown(eqn, f" ({type(e).__name__}: {e})")

  def call(self, eqn, ins, path, live):
    sub = sub_jaxpr(eqn)
    name = eqn.primitive.name
    params = [s for s in ins if isinstance(s, _Param)]
    if sub is None or len(sub[0].invars) != len(ins):
      if params:
        self.refuse_param(eqn, params[0])
      self.refuse_unknown(eqn)
    if params and name in _CUSTOM:
      self.refuse_param(eqn, params[0], ", a function with a derivative rule "
                        "of its own")
    if params:
      self.inline.add(path)
    return self.walk(sub[0], ins, live, path)

  # Parameters -------------------------------------------------------------

  def param_use(self, eqn, ins, path):
    """A view, or a linear use (a site), of a parameter; else a refusal."""
    name = eqn.primitive.name
    which = [k for k, s in enumerate(ins) if isinstance(s, _Param)]
    param = ins[which[0]]
    if len(which) > 1:
      self.refuse_param(eqn, param, ", together with another parameter")
    k = which[0]
    others = [s for j, s in enumerate(ins) if j != k]
    batched = [s for s in others if isinstance(s, int)]
    if name in _VIEWS and not batched:
      return self.view(eqn, ins, k, param, path)
    if param.expanded and name not in ("add", "sub"):
      self.refuse_param(eqn, param, ", after a broadcast to more entries")
    site = {"dot_general": self.dot_site,
            "conv_general_dilated": self.conv_site,
            "add": self.bias_site, "sub": self.bias_site}.get(name)
    if site is not None and batched:
      axis = site(eqn, ins, k, param, path)
      # The examples' axis of the use's output, for the L2 cross term.
      self.sites[-1] = dataclasses.replace(self.sites[-1], out_axis=axis)
      return axis
    why = "" if batched else ", with no operand carrying the examples"
    self.refuse_param(eqn, param, why)

  def view(self, eqn, ins, k, param, path):
    name = eqn.primitive.name
    in_aval, out_aval = eqn.invars[k].aval, eqn.outvars[0].aval
    if name == "convert_element_type":
      if not (jnp.issubdtype(in_aval.dtype, jnp.inexact)
              and jnp.issubdtype(out_aval.dtype, jnp.inexact)):
        self.refuse_param(eqn, param, ", a cast to a non-float type")
      self.views[path] = "cast"
      return param
    if param.expanded:
      self.refuse_param(eqn, param, ", after a broadcast to more entries")
    if name in ("mul", "div"):
      if name == "div" and k != 0:
        self.refuse_param(eqn, param, ", as a divisor")
      if out_aval.shape != in_aval.shape:
        self.refuse_param(eqn, param, ", a product that broadcasts it")
    if name == "reshape" and eqn.params.get("dimensions") is not None:
      self.refuse_param(eqn, param)
    expands = (name == "broadcast_in_dim"
               and math.prod(out_aval.shape) != math.prod(in_aval.shape))
    self.views[path] = "expand" if expands else "linear"
    expanded = (tuple(in_aval.shape),
                tuple(eqn.params["broadcast_dimensions"])) if expands else None
    op = (name, tuple(out_aval.shape), tuple(
        (key, str(value)) for key, value in sorted(eqn.params.items())
        if key not in ("sharding", "out_sharding")))
    return dataclasses.replace(
        param, signature=param.signature + (op,),
        preserving=param.preserving and name not in ("mul", "div"),
        expanded=expanded)

  def check_batch(self, eqn, x_aval, axis):
    if x_aval.shape[axis] != self.size:
      self.refuse_unknown(eqn, f" (axis {axis} should hold the {self.size} "
                          "examples)")

  def dot_site(self, eqn, ins, k, param, path):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    x_state = ins[1 - k]
    x_contract, x_batch = (lc, lb) if k == 1 else (rc, rb)
    if x_state in x_contract or x_state in x_batch:
      self.refuse_param(eqn, param, ": the examples' axis of the other operand"
                        " is contracted or a batch dimension")
    self.check_batch(eqn, eqn.invars[1 - k].aval, x_state)
    w_contract, w_batch = (rc, rb) if k == 1 else (lc, lb)
    signature = ("dot", k, tuple(w_contract), tuple(w_batch),
                 tuple(eqn.invars[k].aval.shape), param.signature)
    self.site_of[eqn.outvars[0]] = len(self.sites)
    self.sites.append(Site(path, "dot", param.leaf, k, x_state, signature,
                           param.preserving, eqn))
    x_free = [d for d in range(eqn.invars[1 - k].aval.ndim)
              if d not in x_contract and d not in x_batch]
    w_free = eqn.invars[k].aval.ndim - len(w_contract) - len(w_batch)
    return len(lb) + (0 if k == 1 else w_free) + x_free.index(x_state)

  def conv_site(self, eqn, ins, k, param, path):
    lhs_spec, _, out_spec = eqn.params["dimension_numbers"]
    if k != 1 or ins[0] != lhs_spec[0]:
      self.refuse_param(eqn, param, ": the ghost path needs the parameter as "
                        "the kernel and the examples on the input's batch "
                        "dimension")
    if eqn.params["batch_group_count"] != 1:
      self.refuse_param(eqn, param, ", with batch_group_count > 1")
    self.check_batch(eqn, eqn.invars[0].aval, ins[0])
    rhs_spec = eqn.params["dimension_numbers"][1]
    signature = ("conv", tuple(rhs_spec), eqn.params["feature_group_count"],
                 tuple(eqn.invars[1].aval.shape), param.signature)
    self.site_of[eqn.outvars[0]] = len(self.sites)
    self.sites.append(Site(path, "conv", param.leaf, 1, ins[0], signature,
                           param.preserving, eqn))
    return out_spec[0]

  def bias_site(self, eqn, ins, k, param, path):
    axis = ins[1 - k]
    w_aval, z_aval = eqn.invars[k].aval, eqn.outvars[0].aval
    self.check_batch(eqn, z_aval, axis)
    if param.expanded is not None:
      shape, dims = param.expanded
      per_example = axis in dims and shape[dims.index(axis)] != 1
    else:
      per_example = w_aval.ndim and w_aval.shape[axis] != 1
    if per_example:
      self.refuse_param(eqn, param, ", one value per example")
    z_in = eqn.invars[1 - k]
    follows = self.site_of.get(z_in)
    if follows is not None and (
        self.uses[z_in] != 1  # else its δ is not the bias's
        or param.expanded is not None or w_aval.ndim != z_aval.ndim
        or [w_aval.shape[d] != 1 for d in range(z_aval.ndim)]
        != [d in feature_axes(self.sites[follows])
            for d in range(z_aval.ndim)]):
      follows = None
    self.sites.append(Site(
        path, "bias", param.leaf, k, axis, ("bias", param.signature),
        param.preserving and param.expanded is None, eqn, follows))
    return axis

  # The examples' axis -----------------------------------------------------

  def batch_rule(self, eqn, ins):
    name = eqn.primitive.name
    p = eqn.params
    n_out = len(eqn.outvars)
    axes = {s for s in ins if isinstance(s, int)}
    aval = next(v.aval for v, s in zip(eqn.invars, ins) if isinstance(s, int))
    axis = min(axes)
    if name in _ELEMENTWISE:
      if len(axes) > 1:
        self.refuse_unknown(eqn, ": its operands carry the examples on "
                            "different axes")
      return [axis] * n_out
    if len(axes) > 1 and name not in ("dot_general", "concatenate", "gather",
                                      "dynamic_update_slice", "sort", "stack"):
      self.refuse_unknown(eqn)
    if name == "broadcast_in_dim":
      return [p["broadcast_dimensions"][axis]]
    if name == "transpose":
      return [list(p["permutation"]).index(axis)]
    if name == "reshape":
      return [self.reshape_axis(eqn, aval, axis)]
    if name == "squeeze":
      return [axis - sum(d < axis for d in p["dimensions"])]
    if name in _REDUCTIONS or name == "reduce":
      dims = p.get("axes", p.get("dimensions", ()))
      if axis in dims:
        self.refuse_mixing(eqn, axis, "reduces over the examples")
      return [axis - sum(d < axis for d in dims)] * n_out
    if name in _CUMULATIVE or name == "sort" or name == "split":
      along = p.get("axis", p.get("dimension"))
      if len(axes) > 1:
        self.refuse_unknown(eqn)
      if along == axis:
        self.refuse_mixing(eqn, axis, "runs along the examples")
      return [axis] * n_out
    if name == "top_k":
      if axis == aval.ndim - 1:
        self.refuse_mixing(eqn, axis, "runs along the examples")
      return [axis] * n_out
    if name in _WINDOWED:
      trivial = (p["window_dimensions"][axis] == 1
                 and p["window_strides"][axis] == 1
                 and tuple(p["padding"][axis]) == (0, 0)
                 and p.get("base_dilation", (1,) * aval.ndim)[axis] == 1
                 and p.get("window_dilation", (1,) * aval.ndim)[axis] == 1)
      if not trivial:
        self.refuse_mixing(eqn, axis, "has a window along the examples")
      return [axis] * n_out
    if name == "rev":
      if axis in p["dimensions"]:
        self.refuse_mixing(eqn, axis, "reverses the examples")
      return [axis]
    if name == "pad":
      if tuple(p["padding_config"][axis]) != (0, 0, 0) or ins[1] is not None:
        self.refuse_mixing(eqn, axis, "pads along the examples")
      return [axis]
    if name == "slice":
      strides = p["strides"] or (1,) * aval.ndim
      if (p["start_indices"][axis], p["limit_indices"][axis],
          strides[axis]) != (0, self.size, 1):
        self.refuse_mixing(eqn, axis, "slices the examples")
      return [axis]
    if name == "dynamic_slice":
      if any(s is not None for s in ins[1:]):
        self.refuse_unknown(eqn, ": an index depends on the examples")
      if p["slice_sizes"][axis] != self.size:
        self.refuse_mixing(eqn, axis, "slices the examples")
      return [axis]
    if name == "dynamic_update_slice":
      if ins[0] != ins[1] or any(s is not None for s in ins[2:]):
        self.refuse_unknown(eqn)
      return [axis]
    if name == "stack":
      if len(axes) > 1:
        self.refuse_unknown(eqn)
      return [axis + (p["axis"] <= axis)]
    if name == "unstack":
      if p["axis"] == axis:
        self.refuse_mixing(eqn, axis, "splits the examples")
      return [axis - (p["axis"] < axis)] * n_out
    if name == "tile":
      if p["reps"][axis] != 1:
        self.refuse_mixing(eqn, axis, "repeats the examples")
      return [axis]
    if name == "concatenate":
      if len(axes) > 1:
        self.refuse_unknown(eqn)
      if p["dimension"] == axis:
        self.refuse_mixing(eqn, axis, "concatenates along the examples")
      return [axis]
    if name == "dot_general":
      return [self.dot_axis(eqn, ins)]
    if name == "conv_general_dilated":
      lhs_spec, _, out_spec = p["dimension_numbers"]
      if ins[1] is not None or p["batch_group_count"] != 1:
        self.refuse_unknown(eqn)
      if ins[0] != lhs_spec[0]:
        self.refuse_mixing(eqn, ins[0], "convolves along the examples")
      return [out_spec[0]]
    if name == "gather":
      return [self.gather_axis(eqn, ins)]
    self.refuse_unknown(eqn)

  def reshape_axis(self, eqn, aval, axis):
    if eqn.params.get("dimensions") is not None:
      self.refuse_unknown(eqn)
    before = math.prod(aval.shape[:axis])
    new = eqn.params["new_sizes"]
    for m in range(len(new)):
      if (math.prod(new[:m]) == before and new[m] == aval.shape[axis]
          and (new[m] != 1 or self.size == 1)):
        return m
    self.refuse_unknown(eqn, ": it merges or splits the examples' axis")

  def dot_axis(self, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ndims = [v.aval.ndim for v in eqn.invars]
    contract, batch = (lc, rc), (lb, rb)
    free = [[d for d in range(n) if d not in c and d not in b]
            for n, c, b in zip(ndims, contract, batch)]
    outs = set()
    for side, s in enumerate(ins):
      if s is None:
        continue
      if s in contract[side]:
        self.refuse_mixing(eqn, s, "contracts the examples")
      if s in batch[side]:
        outs.add(batch[side].index(s))
      else:
        offset = len(lb) + (0 if side == 0 else len(free[0]))
        outs.add(offset + free[side].index(s))
    if len(outs) > 1:
      self.refuse_mixing(eqn, min(outs), "pairs every example with every "
                         "other")
    return outs.pop()

  def gather_axis(self, eqn, ins):
    dn = eqn.params["dimension_numbers"]
    operand, indices = ins
    out_ndim = eqn.outvars[0].aval.ndim
    index_positions = [d for d in range(out_ndim) if d not in dn.offset_dims]
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    index_batching = tuple(getattr(dn, "start_indices_batching_dims", ()))
    if indices is not None:
      if indices == eqn.invars[1].aval.ndim - 1:
        self.refuse_unknown(eqn, ": the examples index the operand")
      if operand is not None and (
          operand not in batching
          or index_batching[batching.index(operand)] != indices):
        self.refuse_unknown(eqn, ": the examples index the operand")
      return index_positions[indices]
    # Only the operand carries the examples: they must pass whole.
    if (operand in dn.collapsed_slice_dims or operand in dn.start_index_map
        or operand in batching
        or eqn.params["slice_sizes"][operand] != self.size):
      self.refuse_mixing(eqn, operand, "selects among the examples")
    kept = [d for d in range(eqn.invars[0].aval.ndim)
            if d not in dn.collapsed_slice_dims and d not in batching]
    return dn.offset_dims[kept.index(operand)]


def analyze(loss_fn: _base.LossFn, params, batch, key) -> Plan:
  """The linear uses of the parameters in the traced loss; trace time only.

  Raises:
    UnsupportedModelError: a parameter reaches the per-example losses other
      than through a linear use the ghost path handles, or the examples
      interact (or cannot be followed) on the way to the losses; the message
      names the parameter's path and the primitive.
  """
  if isinstance(loss_fn, _base.WithL2):  # Its term is added apart.
    loss_fn = loss_fn.loss_fn
  size = _base.batch_size(batch)
  # Traced from the values' types, which under shard_map include how they
  # vary across devices (so the jaxpr has the same pvary casts).
  closed, out_shapes = jax.make_jaxpr(loss_fn, return_shape=True)(
      params, batch, key)
  losses = (out_shapes[0] if isinstance(out_shapes, tuple)
            and len(out_shapes) == 2 else None)
  if getattr(losses, "shape", None) != (size,):
    raise ValueError(
        "loss_fn must return (per-example losses of shape [B], aux); got "
        f"{out_shapes}.")
  num_params = len(jax.tree.leaves(params))
  num_batch = len(jax.tree.leaves(batch))
  in_states = ([_Param(i, (), True) for i in range(num_params)]
               + [0] * num_batch)
  in_states += [None] * (len(closed.jaxpr.invars) - len(in_states))
  paths = _leaf_paths(params)
  analysis = _Analysis(paths, size)
  live_out = [False] * len(closed.jaxpr.outvars)
  live_out[0] = True
  losses_state = analysis.walk(closed.jaxpr, in_states, live_out)[0]
  if isinstance(losses_state, _Param):
    raise UnsupportedModelError(
        f"parameter '{analysis.paths[losses_state.leaf]}' is returned as the "
        "per-example losses; the ghost path cannot account for it.")
  if losses_state not in (None, 0):
    raise UnsupportedModelError(
        f"the per-example losses carry the examples on axis {losses_state}, "
        "not along their only axis; the ghost path cannot follow them.")
  return Plan(closed, jax.tree.structure(out_shapes), tuple(analysis.sites),
              frozenset(analysis.inline), analysis.views,
              tuple(analysis.paths))


def dot_layout(site: Site):
  """For a dot site: the parameter's (batch, contracting, free) dims and the
  other operand's (contracting, batch, free) dims, paired in order."""
  (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
  k = site.operand
  w_contract, w_batch = (rc, rb) if k == 1 else (lc, lb)
  x_contract, x_batch = (lc, lb) if k == 1 else (rc, rb)
  w_ndim = site.eqn.invars[k].aval.ndim
  x_ndim = site.eqn.invars[1 - k].aval.ndim
  w_free = [d for d in range(w_ndim)
            if d not in w_contract and d not in w_batch]
  x_free = [d for d in range(x_ndim)
            if d not in x_contract and d not in x_batch]
  return (list(w_batch), list(w_contract), w_free,
          list(x_contract), list(x_batch), x_free)


def dot_out_axes(site: Site):
  """z's axes of a dot site: (its batch dimensions, the parameter's free
  dimensions, the other operand's free dimensions), in z's order."""
  w_batch, _, w_free, _, _, x_free = dot_layout(site)
  # z's axes: the batch dimensions, then lhs free, then rhs free.
  start = len(w_batch)
  w_axes = list(range(start, start + len(w_free)))
  x_axes = list(range(start, start + len(x_free)))
  if site.operand == 1:
    w_axes = [d + len(x_free) for d in w_axes]
  else:
    x_axes = [d + len(w_free) for d in x_axes]
  return list(range(start)), w_axes, x_axes


def feature_axes(site: Site) -> set:
  """The axes of a dot/conv site's output that are its rows' (G, Q)."""
  if site.kind == "conv":
    return {site.eqn.params["dimension_numbers"][2][1]}
  groups, features, _ = dot_out_axes(site)
  return {*groups, *features}
