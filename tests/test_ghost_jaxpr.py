"""Ghost norms found in the jaxpr, against `jax.vmap(jax.grad(ℓ))`.

Models written in plain `jax.numpy`, Flax NNX and Equinox; the Flax linen
models are `tests/test_ghost.py`'s. Float64 wherever numbers are compared
to rounding.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import gnp
from gnp.penalties import ghost
from gnp.penalties import ghost_jaxpr
from tests.helpers import assert_auto_falls_back_to_vmap
from tests.helpers import run
from tests.test_ghost import FAST_COMPILE
from tests.test_ghost import ghost_gnvr

gnvr = importlib.import_module("gnp.penalties.gradient_norm_variance")
clipping = importlib.import_module("gnp.penalties.clipping")


def _draw(rng, shapes):
  """Parameters ~ N(0, 1/fan_in) in the default float type, for a tree of
  shape tuples or of `jax.ShapeDtypeStruct`s (numpy: nothing to compile)."""
  dtype = jnp.result_type(float)

  def draw(s):
    shape = tuple(getattr(s, "shape", s))
    scale = np.sqrt(np.prod(shape[:-1]) if len(shape) > 1 else 4)
    return jnp.asarray(rng.normal(size=shape) / scale, dtype)

  is_shape = lambda s: isinstance(s, tuple) and all(
      isinstance(d, int) for d in s)
  return jax.tree.map(draw, shapes, is_leaf=is_shape)


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


# Each model: (init(rng) -> params, apply(params, x) -> logits, x shape).
def jnp_mlp():
  shapes = {"l1": {"kernel": (4, 6), "bias": (6,)},
            "l2": {"kernel": (6, 5), "bias": (5,)},
            "head": {"kernel": (5, 3), "bias": (3,)}}

  def apply(p, x):
    x = jnp.tanh(_dense(p["l1"], x))
    z = x @ p["l2"]["kernel"]  # Used twice: δ of z is not the bias's.
    x = jax.nn.relu(z + p["l2"]["bias"]) + jnp.tanh(z) + jnp.tanh(x[:, :5])
    return _dense(p["head"], x)

  return (lambda rng: _draw(rng, shapes)), apply, (4,)


def jnp_cnn():
  """A strided NHWC conv, then a grouped, dilated, strided NCHW/OIHW conv."""
  shapes = {"c1": {"kernel": (3, 3, 2, 4), "bias": (4,)},
            "c2": {"kernel": (6, 2, 2, 3), "bias": (6,)},
            "head": {"kernel": (6, 3), "bias": (3,)}}

  def apply(p, x):
    x = jax.lax.conv_general_dilated(
        x, p["c1"]["kernel"], (2, 2), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["c1"]["bias"]
    x = jnp.transpose(jnp.tanh(x), (0, 3, 1, 2))
    x = jax.lax.conv_general_dilated(
        x, p["c2"]["kernel"], (1, 2), ((1, 0), (2, 1)), lhs_dilation=(1, 2),
        rhs_dilation=(2, 1), feature_group_count=2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    x = jnp.tanh(x + p["c2"]["bias"][:, None, None])
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2),
                              (1, 1, 1, 1), "VALID")
    return _dense(p["head"], jnp.mean(x, axis=(2, 3)))

  return (lambda rng: _draw(rng, shapes)), apply, (7, 7, 2)


def jnp_shared():
  """One dense layer applied twice, one applied at 5 positions, and a
  per-head kernel (a dot_general batch dimension): Gram form throughout."""
  shapes = {"twice": {"kernel": (3, 3), "bias": (3,)},
            "heads": (2, 3, 2),
            "head": {"kernel": (4, 3), "bias": (3,)}}

  def apply(p, x):  # x: [B, 5, 3]
    x = jnp.tanh(_dense(p["twice"], jnp.tanh(_dense(p["twice"], x))))
    x = jnp.stack([x, x[..., ::-1]], axis=2)  # [B, 5, 2, 3]
    x = jnp.tanh(jnp.einsum("bthd,hde->bthe", x, p["heads"]))
    return _dense(p["head"], jnp.mean(x, axis=1).reshape(x.shape[0], -1))

  return (lambda rng: _draw(rng, shapes)), apply, (5, 3)


MASK = np.arange(4 * 4).reshape(4, 4) % 3 > 0


def jnp_transformed():
  """Views that are not a relabelling, or differ between uses: a kernel
  used plainly and transposed, a masked and a scaled kernel, a bias
  broadcast by hand."""
  shapes = {"tied": (4, 4), "masked": (4, 4), "bias": (1, 4),
            "head": {"kernel": (4, 3), "bias": (3,)}}

  def apply(p, x):
    x = jnp.tanh(x @ p["tied"])
    x = jnp.tanh(x @ (p["masked"] * MASK) - jnp.broadcast_to(
        p["bias"], (x.shape[0], 4)))
    x = jnp.tanh(x @ p["tied"].T)
    x = jnp.tanh(x @ (-0.5 * p["masked"]).astype(x.dtype))
    return _dense(p["head"], x)

  return (lambda rng: _draw(rng, shapes)), apply, (4,)


class NnxCnn(nnx.Module):

  def __init__(self, rngs):
    dtype = jnp.result_type(float)
    conv = functools.partial(nnx.Conv, rngs=rngs, param_dtype=dtype)
    self.c1 = conv(2, 4, (3, 3), strides=2)
    self.c2 = conv(4, 6, (2, 3), kernel_dilation=(2, 1), strides=(1, 2),
                   feature_group_count=2, padding=((1, 0), (2, 1)))
    self.mlp = nnx.Linear(6, 5, rngs=rngs, param_dtype=dtype)
    self.head = nnx.Linear(5, 3, rngs=rngs, param_dtype=dtype)

  def __call__(self, x):
    x = jnp.tanh(self.c2(jnp.tanh(self.c1(x))))
    return self.head(jnp.tanh(self.mlp(jnp.mean(x, axis=(1, 2)))))


def nnx_cnn():
  abstract = nnx.eval_shape(lambda: NnxCnn(nnx.Rngs(0)))
  graphdef, shapes = nnx.split(abstract, nnx.Param)

  def apply(state, x):  # nnx.merge inside loss_fn
    return nnx.merge(graphdef, state)(x)

  return (lambda rng: _draw(rng, shapes)), apply, (7, 7, 2)


def eqx_cnn():
  eqx = pytest.importorskip("equinox")

  def build():
    k1, k2 = jax.random.split(jax.random.key(0))
    return (eqx.nn.Conv2d(2, 4, 3, stride=2, dilation=2, groups=2, key=k1),
            eqx.nn.MLP(4, 3, 5, 2, activation=jnp.tanh, key=k2))

  shapes, static = eqx.partition(
      eqx.filter_eval_shape(build),
      lambda x: isinstance(x, jax.ShapeDtypeStruct))

  def apply(params, x):
    conv, mlp = eqx.combine(params, static)
    one = lambda x: mlp(jnp.mean(jnp.tanh(conv(x)), axis=(1, 2)))
    return jax.vmap(one)(x)

  return (lambda rng: _draw(rng, shapes)), apply, (2, 11, 11)


MODELS = {"jnp_mlp": jnp_mlp, "jnp_cnn": jnp_cnn, "jnp_shared": jnp_shared,
          "jnp_transformed": jnp_transformed, "nnx_cnn": nnx_cnn,
          "eqx_cnn": eqx_cnn}


@functools.lru_cache
def model(name):
  return MODELS[name]()


def problem(name, seed, batch_size=4):
  """(loss_fn, params, batch): softmax cross-entropy on random data."""
  init, apply, shape = model(name)
  rng = np.random.default_rng(seed)
  dtype = jnp.result_type(float)
  x = jnp.asarray(rng.normal(size=(batch_size,) + shape), dtype)
  y = jnp.asarray(rng.integers(0, 3, batch_size))

  def loss_fn(params, batch, key):
    del key
    logits = apply(params, batch[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]),
            {"logits": logits})

  return loss_fn, init(rng), (x, y)


@functools.lru_cache
def norms_fn(name):
  """jit(params, batch) -> {"vmap" | "gram" | "outer": [B] norms}."""
  loss_fn = problem(name, 0)[0]

  def norms(params, batch):
    out = {"vmap": gnvr.vmap_per_example_norms(loss_fn, params, batch, None)}
    for branch in ("gram", "outer"):
      out[branch] = ghost.per_example_norms(loss_fn, params, batch, None,
                                                  branch=branch)
    return {path: result[2] for path, result in out.items()}

  return jax.jit(norms, compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_norms_equal_vmap_in_both_forms(name, x64):
  for seed in (0, 1):
    norms = norms_fn(name)(*problem(name, seed)[1:])
    for branch in ("gram", "outer"):
      np.testing.assert_allclose(norms[branch], norms["vmap"], rtol=1e-11,
                                 err_msg=branch)


# Second order is costly to compile (5-10 s a model on CPU).
@pytest.mark.parametrize("name,branch", [
    ("jnp_mlp", "gram"), ("jnp_cnn", "gram"),
    *(pytest.param(name, "auto", marks=pytest.mark.slow) for name in (
        "jnp_shared", "jnp_transformed", "nnx_cnn", "eqx_cnn"))])
def test_gnvr_gradient_equals_vmap(name, branch, x64):
  """∇ of L + λ Var_i n_i, the second-order part through the ghost norms."""
  loss_fn, params, batch = problem(name, 2)
  vmap = gnp.penalties.gradient_norm_variance(loss_fn, lam=0.7, method="vmap")
  ghosts = ghost_gnvr(loss_fn, branch, lam=0.7)
  expected, actual = jax.jit(lambda p: (vmap.with_stats(p, batch, None),
                                        ghosts.with_stats(p, batch, None)),
                             compiler_options=FAST_COMPILE)(params)
  (expected_loss, _), expected_grads, expected_stats = expected
  (loss, _), grads, stats = actual
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
  np.testing.assert_allclose(ravel_pytree(grads)[0],
                             ravel_pytree(expected_grads)[0], rtol=1e-9,
                             atol=1e-12)
  for key, value in stats.items():
    np.testing.assert_allclose(value, expected_stats[key], rtol=1e-10,
                               err_msg=key)


def test_sites_name_every_linear_use():
  loss_fn, params, batch = problem("jnp_shared", 0)
  plan = ghost_jaxpr.analyze(loss_fn, params, batch, None)
  uses = [(site.kind, plan.paths[site.leaf]) for site in plan.sites]
  assert uses == [("dot", "twice/kernel"), ("bias", "twice/bias"),
                  ("dot", "twice/kernel"), ("bias", "twice/bias"),
                  ("dot", "heads"), ("dot", "head/kernel"),
                  ("bias", "head/bias")]


def test_a_bias_folds_into_its_kernel_where_they_share_delta():
  """Added straight to a kernel's output, a bias is the kernel's feature 1
  (one reduction fewer); not where that output is also used elsewhere."""
  loss_fn, params, batch = problem("jnp_mlp", 0)
  plan = ghost_jaxpr.analyze(loss_fn, params, batch, None)
  by_leaf = {}
  for n, site in enumerate(plan.sites):
    by_leaf.setdefault(site.leaf, []).append(n)
  folded = ghost._folded_biases(plan.sites, by_leaf, set(by_leaf))
  assert {plan.paths[k]: plan.paths[b] for k, b in folded.items()} == {
      "l1/kernel": "l1/bias", "head/kernel": "head/bias"}


def test_jit_remat_and_pullback_inside_loss_fn(x64):
  """A jitted loss_fn and a rematerialised layer are followed inside; the
  pullback weights each example's gradient."""
  loss_fn, params, batch = problem("jnp_mlp", 3)
  inner = jax.jit(loss_fn)

  def wrapped(p, b, k):
    p = {**p, "l1": jax.checkpoint(lambda q: q)(p["l1"])}
    return inner(p, b, k)

  weights = jnp.asarray([0.5, -1.0, 2.0, 0.0])

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def both(p):
    _, _, norms, _, pullback = ghost.per_example_norms_with_pullback(
        wrapped, p, batch, None)
    jacobian = jax.jacrev(lambda q: loss_fn(q, batch, None)[0])(p)
    rows = jnp.concatenate([j.reshape(4, -1) for j in jax.tree.leaves(
        jacobian)], axis=1)
    weighted = ravel_pytree(pullback(weights))[0]
    return norms, jnp.linalg.norm(rows, axis=1), weighted, weights @ rows

  norms, expected, weighted, expected_weighted = both(params)
  np.testing.assert_allclose(norms, expected, rtol=1e-12)
  # ravel_pytree and the Jacobian's leaves both follow the tree's order.
  np.testing.assert_allclose(weighted, expected_weighted, rtol=1e-12)


def test_vmap_over_a_population(x64):
  """Three parameter sets stacked, one vmap over the ghost norms."""
  loss_fn, _, batch = problem("jnp_mlp", 0)
  members = [problem("jnp_mlp", seed)[1] for seed in (4, 5, 6)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)
  norms = jax.jit(jax.vmap(lambda p: ghost.per_example_norms(
      loss_fn, p, batch, None)[2]), compiler_options=FAST_COMPILE)(stacked)
  expected = jax.jit(jax.vmap(lambda p: gnvr.vmap_per_example_norms(
      loss_fn, p, batch, None)[2]), compiler_options=FAST_COMPILE)(stacked)
  np.testing.assert_allclose(norms, expected, rtol=1e-11)


@pytest.mark.parametrize("name,dtype,rtol", [
    ("jnp_mlp", jnp.float32, 2e-5), ("jnp_cnn", jnp.bfloat16, 3e-2)])
def test_float32_and_bfloat16_computation(name, dtype, rtol):
  """float32 parameters, the layers computing in `dtype`: float32 norms."""
  _, params, batch = problem(name, 0)
  apply = model(name)[1]

  def low(p, b, k):
    del k
    logits = apply(jax.tree.map(lambda w: w.astype(dtype), p),
                   b[0].astype(dtype)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]), None

  norms, expected = jax.jit(lambda p: [
      f(low, p, batch, None)[2]
      for f in (ghost.per_example_norms, gnvr.vmap_per_example_norms)],
                            compiler_options=FAST_COMPILE)(params)
  assert norms.dtype == jnp.float32
  np.testing.assert_allclose(norms, expected, rtol=rtol)


# Refusals: (params, batch, losses(params, x)) -> what the message names.
def _mlp_params():
  return {"kernel": jnp.ones((3, 4)) / 3, "bias": jnp.zeros(4),
          "table": jnp.ones((5, 3)), "scale": jnp.ones(4),
          "layers": jnp.ones((2, 4, 4)) / 4}


def _scan_layers(p, x):
  step = lambda h, w: (jnp.tanh(h @ w), None)
  return jax.lax.scan(step, x @ p["kernel"], p["layers"])[0]


@jax.custom_jvp
def _custom(x, w):
  return x @ w


_custom.defjvp(lambda primals, tangents: (
    _custom(*primals), tangents[0] @ primals[1] + primals[0] @ tangents[1]))

REFUSED = {
    "embedding": (lambda p, x: jnp.tanh(p["table"][jnp.argmax(x, 1)] @ p[
        "kernel"]), r"'table' .*through gather"),
    "norm_scale": (lambda p, x: jnp.tanh(x @ p["kernel"]) * p["scale"],
                   r"'scale' .*through mul"),
    "l2_term": (lambda p, x: x @ p["kernel"] + jnp.sum(p["bias"] ** 2),
                r"'bias' .*through integer_pow"),
    "slice": (lambda p, x: x @ p["table"][:3, :], r"'table' .*through slice"),
    "scan": (_scan_layers, r"'layers' .*through scan"),
    "custom_jvp": (lambda p, x: _custom(x, p["kernel"]),
                   r"'kernel' .*through custom_jvp_call.*derivative rule"),
    "batch_norm": (lambda p, x: (lambda h: h - jnp.mean(h, axis=0))(
        x @ p["kernel"]), r"reduce_sum.*reduces over the examples"),
    "contracted": (lambda p, x: x @ (x.T @ (x @ p["kernel"])),
                   r"dot_general.*contracts the examples"),
    "loop": (lambda p, x: jax.lax.fori_loop(
        0, 2, lambda i, h: jnp.tanh(h), x @ p["kernel"]),
             r"cannot follow the examples' axis through scan"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals_name_the_parameter_and_the_primitive(name, monkeypatch):
  fn, message = REFUSED[name]
  params = _mlp_params()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
  loss_fn = lambda p, b, k: (jnp.sum(fn(p, b) ** 2, axis=1), None)
  with pytest.raises(ghost.UnsupportedModelError, match=message):
    ghost_jaxpr.analyze(loss_fn, params, x, None)
  # "auto" takes the vmap path instead.
  assert_auto_falls_back_to_vmap(monkeypatch, loss_fn, params, x)


@pytest.mark.parametrize("name", ["jnp_cnn", "nnx_cnn", "eqx_cnn"])
def test_auto_takes_ghost_norms_for_models_without_linen(name, monkeypatch):
  loss_fn, params, batch = problem(name, 0)

  def no_vmap(*args):
    raise AssertionError("method='auto' took the vmap path")

  monkeypatch.setattr(gnvr, "vmap_per_example_norms", no_vmap)
  monkeypatch.setattr(clipping, "_vmap", no_vmap)
  for make in (functools.partial(gnp.penalties.gradient_norm_variance,
                                 lam=0.5),
               functools.partial(gnp.penalties.per_example_clipping,
                                 max_norm=1.0)):
    jax.eval_shape(make(loss_fn), params, batch, None)


def test_an_unused_parameter_and_aux_uses_are_not_refused(x64):
  """Only what the losses depend on counts: a parameter norm in aux does not."""
  loss_fn, params, batch = problem("jnp_mlp", 0)
  tree = {"model": params, "unused": jnp.ones(3)}
  wrapped = lambda t, b, k: (loss_fn(t["model"], b, k)[0],
                             optax.tree_utils.tree_norm(t))
  plan = ghost_jaxpr.analyze(wrapped, tree, batch, None)
  assert {plan.paths[site.leaf] for site in plan.sites} == {
      f"model/{layer}/{kind}" for layer in ("l1", "l2", "head")
      for kind in ("kernel", "bias")}
  actual, expected = jax.jit(lambda t: [
      f(wrapped, t, batch, None)[2]
      for f in (ghost.per_example_norms, gnvr.vmap_per_example_norms)],
                             compiler_options=FAST_COMPILE)(tree)
  np.testing.assert_allclose(actual, expected, rtol=1e-12)


_SHARDED = """
import importlib
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.config.update("jax_enable_x64", True)
from gnp.penalties import ghost
from tests import test_ghost_jaxpr as t
gnvr = importlib.import_module("gnp.penalties.gradient_norm_variance")
mesh = Mesh(np.asarray(jax.devices()), ("data",))
for name in ("jnp_cnn", "jnp_transformed"):
  loss_fn, params, batch = t.problem(name, 0, batch_size=8)
  norms = lambda p, b: ghost.per_example_norms(loss_fn, p, b, None)[2]
  expected = jax.jit(lambda p, b: gnvr.vmap_per_example_norms(
      loss_fn, p, b, None)[2])(params, batch)
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  under_jit = jax.jit(norms)(params, sharded)
  under_shard_map = jax.jit(jax.shard_map(
      norms, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")))(
          params, sharded)
  for actual in (under_jit, under_shard_map):
    np.testing.assert_allclose(actual, expected, rtol=1e-11)
print("devices", jax.device_count())
"""


@pytest.mark.slow
def test_sharded_batches_and_shard_map():
  """4 CPU devices: the batch sharded under jit, and the norms computed
  inside shard_map on each device's examples (probes vary per device)."""
  result = run(["-c", _SHARDED],
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                    "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "devices 4" in result.stdout
