"""Ghost norms of Flax linen models against `jax.vmap(jax.grad(ℓ))`.

The linear uses are found in the jaxpr (`gnp.penalties.ghost_jaxpr`); models
written without linen are in `tests/test_ghost_jaxpr.py`.
"""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gnp
from gnp.models import CNN
from gnp.models import MLP
from gnp.penalties import ghost
from gnp.penalties import ghost_jaxpr
from tests.helpers import assert_auto_falls_back_to_vmap

# The module, not the function `gnp.penalties` exports under the same name.
gnvr = importlib.import_module("gnp.penalties.gradient_norm_variance")


class ConvNet(nn.Module):
  """The given layers, each followed by tanh, then a Dense head."""

  layers: tuple

  @nn.compact
  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer()(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Shared(nn.Module):
  """A Conv and a Dense layer each applied twice (weight sharing), a head."""

  @nn.compact
  def __call__(self, x):
    conv, dense = nn.Conv(2, (3,), strides=2), nn.Dense(4)
    x = conv(jnp.tanh(conv(x)))
    x = dense(jnp.tanh(dense(x.reshape(x.shape[0], -1))))
    return nn.Dense(3)(jnp.tanh(x))


class Positions(nn.Module):
  """A Dense layer over the 5 positions of each example (T = 5), pooled."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(4)(x))
    return nn.Dense(3)(jnp.mean(x, axis=1))


def conv(features, kernel_size, **kwargs):
  return functools.partial(nn.Conv, features, kernel_size, **kwargs)


MASK = (np.arange(3 * 3 * 6 * 4).reshape(3, 3, 6, 4) % 3 > 0).astype(np.float32)
# name -> (model, shape of one example). Each conv net strings several layer
# configurations together, which keeps the number of compilations down.
MODELS = {
    "mlp": (MLP((6, 5, 3), activation=jnp.tanh), (4,)),
    "dense_positions": (Positions(), (5, 3)),
    "conv1d": (ConvNet((
        conv(4, (3,), strides=2, padding="VALID"),
        conv(4, (2,), padding="CAUSAL", kernel_dilation=2,
             feature_group_count=2, use_bias=False),
        conv(3, (3,), padding="CIRCULAR"),
    )), (9, 2)),
    "conv2d": (ConvNet((
        conv(4, (3, 3), strides=2, padding="SAME"),
        conv(6, (2, 3), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1),
             input_dilation=(1, 2), feature_group_count=2, use_bias=False),
        conv(4, (3, 3), mask=MASK),
    )), (6, 6, 2)),
    "shared": (Shared(), (8, 2)),
    "cnn_2d": (CNN((3, 4), num_classes=3, activation=jnp.tanh), (8, 8, 2)),
}


def problem(name, seed, batch_size=4):
  """(loss_fn, params, batch): softmax cross-entropy on random data.

  Parameters (biases too) and data are drawn with numpy: nothing to compile.
  """
  model, shape = MODELS[name]
  rng = np.random.default_rng(seed)
  dtype = jnp.result_type(float)  # float64 under the x64 fixture
  x = jnp.asarray(rng.normal(size=(batch_size,) + shape), dtype)
  y = jnp.asarray(rng.integers(0, 3, batch_size))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(
          np.prod(s.shape[:-1], dtype=int) if len(s.shape) > 1 else 4), dtype),
      shapes)

  def loss_fn(params, batch, key):
    del key
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]), {
        "logits": logits}

  return loss_fn, params, (x, y)


# LLVM at -O0 compiles these small programs 3x faster; it changes no
# arithmetic (no fast-math either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def ghost_gnvr(loss_fn, branch, **kwargs):
  registry = gnvr.PER_EXAMPLE_NORMS
  original = registry["ghost"]
  registry["ghost"] = functools.partial(ghost.per_example_norms,
                                        branch=branch)
  try:
    return gnp.penalties.gradient_norm_variance(loss_fn, method="ghost",
                                                **kwargs)
  finally:
    registry["ghost"] = original


@functools.lru_cache
def norms_fn(name):
  """jit(params, batch) -> {"vmap" | "gram" | "outer": [B] norms}.

  Cached: one compilation per model and float type, reused across seeds.
  """
  loss_fn = problem(name, 0)[0]

  def norms(params, batch):
    out = {"vmap": gnvr.vmap_per_example_norms(loss_fn, params, batch, None)}
    for branch in ("gram", "outer"):
      out[branch] = ghost.per_example_norms(loss_fn, params, batch,
                                                  None, branch=branch)
    return {path: result[2] for path, result in out.items()}

  return jax.jit(norms, compiler_options=FAST_COMPILE)


@functools.lru_cache
def gnvr_fn(name, branch):
  """jit(params, batch) -> (vmap GNVR, ghost GNVR with `branch`), with stats."""
  loss_fn = problem(name, 0)[0]
  vmap = gnp.penalties.gradient_norm_variance(loss_fn, lam=0.7, method="vmap")
  ghosts = ghost_gnvr(loss_fn, branch, lam=0.7)
  return jax.jit(lambda p, b: (vmap.with_stats(p, b, None),
                               ghosts.with_stats(p, b, None)),
                 compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_norms_equal_vmap_in_both_forms(name, x64):
  for seed in (0, 1, 2):
    norms = norms_fn(name)(*problem(name, seed)[1:])
    for branch in ("gram", "outer"):
      np.testing.assert_allclose(norms[branch], norms["vmap"], rtol=1e-11,
                                 err_msg=branch)


# Second order is costly to compile: both forms on the MLP and the conv nets,
# the Gram form on T > 1 dense layers and on both kinds of shared weights.
@pytest.mark.parametrize("name,branch", [
    ("mlp", "gram"), ("mlp", "outer"), ("dense_positions", "gram"),
    ("conv1d", "gram"), ("conv1d", "outer"), ("conv2d", "gram"),
    ("conv2d", "outer"), ("shared", "gram")])
def test_gnvr_gradient_equals_vmap(name, branch, x64):
  """∇ of L + λ Var_i n_i, the second-order part through the ghost norms."""
  for seed in (0, 1):
    expected, actual = gnvr_fn(name, branch)(*problem(name, seed)[1:])
    (expected_loss, expected_aux), expected_grads, expected_stats = expected
    (loss, aux), grads, stats = actual
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_array_equal(aux["logits"], expected_aux["logits"])
    np.testing.assert_allclose(ravel_pytree(grads)[0],
                               ravel_pytree(expected_grads)[0], rtol=1e-9,
                               atol=1e-12)
    assert set(stats) == set(expected_stats)
    for key, value in stats.items():
      np.testing.assert_allclose(value, expected_stats[key], rtol=1e-10,
                                 err_msg=key)


def test_float32_to_rounding():
  """The cost-chosen forms in float32 on the mnist1d-style MLP and a CNN."""
  for name in ("mlp", "cnn_2d"):
    norms = norms_fn(name)(*problem(name, 0)[1:])
    for branch in ("gram", "outer"):
      np.testing.assert_allclose(norms[branch], norms["vmap"], rtol=2e-5)
  expected, actual = gnvr_fn("mlp", "auto")(*problem("mlp", 1)[1:])
  np.testing.assert_allclose(actual[0][0], expected[0][0], rtol=1e-6)
  np.testing.assert_allclose(ravel_pytree(actual[1])[0],
                             ravel_pytree(expected[1])[0], rtol=2e-4, atol=2e-6)


def test_auto_is_ghost_for_dense_and_conv_models(monkeypatch):
  loss_fn, params, batch = problem("cnn_2d", 0)

  def no_vmap(*args):
    raise AssertionError("method='auto' took the vmap path")

  monkeypatch.setattr(gnvr, "vmap_per_example_norms", no_vmap)
  jax.eval_shape(gnp.penalties.gradient_norm_variance(loss_fn, lam=0.5),
                 params, batch, None)


def test_dropout_uses_the_batched_call(x64):
  """With randomness, ℓ_i is example i's loss in the one batched call."""
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dropout(0.5, deterministic=False),
                         nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (6, 4))
  y = jnp.arange(6) % 3
  params = jax.tree.map(lambda p: p.astype(x.dtype),
                        jax.jit(model.init)(jax.random.key(1), x)["params"])

  def loss_fn(p, batch, key):
    logits = model.apply({"params": p}, batch[0], rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]), None

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def ghost_and_jacobian_norms(p, key):
    jacobian = jax.jacrev(lambda p: loss_fn(p, (x, y), key)[0])(p)
    rows = jnp.concatenate(
        [j.reshape(6, -1) for j in jax.tree.leaves(jacobian)], axis=1)
    return (ghost.per_example_norms(loss_fn, p, (x, y), key)[2],
            jnp.linalg.norm(rows, axis=1))

  for seed in (2, 3):
    norms, expected = ghost_and_jacobian_norms(params, jax.random.key(seed))
    np.testing.assert_allclose(norms, expected, rtol=1e-12)


def test_unused_parameters_and_subtrees(x64):
  """Leaves the loss never uses have zero gradient and are not refused."""
  loss_fn, params, batch = problem("mlp", 0)
  wrapped = lambda p, b, k: loss_fn(p["model"], b, k)
  tree = {"model": params, "unused": jnp.ones(3)}
  actual, expected = jax.jit(lambda t: [
      f(wrapped, t, batch, None)[2]
      for f in (ghost.per_example_norms, gnvr.vmap_per_example_norms)],
                             compiler_options=FAST_COMPILE)(tree)
  np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_low_precision_layers_give_float32_norms():
  model = nn.Sequential([nn.Dense(5, dtype=jnp.bfloat16), nn.tanh,
                         nn.Dense(3, dtype=jnp.bfloat16)])
  x = jax.random.normal(jax.random.key(0), (6, 4))
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  loss_fn = lambda p, b, k: (jnp.sum(model.apply({"params": p}, b) ** 2,
                                     axis=1).astype(jnp.float32), None)
  norms, expected = jax.jit(lambda p: [
      f(loss_fn, p, x, None)[2]
      for f in (ghost.per_example_norms, gnvr.vmap_per_example_norms)],
                            compiler_options=FAST_COMPILE)(params)
  assert norms.dtype == jnp.float32
  np.testing.assert_allclose(norms, expected, rtol=3e-2)


def test_cost_model_picks_the_cheaper_form():
  assert ghost._gram_is_cheaper(1, 40, 256)  # a dense layer on vectors
  assert not ghost._gram_is_cheaper(64, 9, 16)  # a small conv, many pixels
  assert ghost._gram_is_cheaper(4, 288, 64)  # a deep conv, few pixels


class Scaled(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x) * self.param("scale", nn.initializers.ones, (3,))


def refused(model, x, **apply_kwargs):
  variables = jax.jit(model.init)(jax.random.key(0), x)

  def loss_fn(p, batch, key):
    out = model.apply({**variables, "params": p}, batch, **apply_kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.reshape(out.shape[0], -1) ** 2, axis=1), None

  return loss_fn, variables["params"], x


REFUSED = {
    "batch_norm": (
        nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)]),
        jnp.ones((3, 2)), {"mutable": ["batch_stats"]},
        r"reduce_sum.*reduces over the examples.*per-example gradients are "
        r"ill-defined"),
    "embed": (nn.Sequential([nn.Embed(5, 4), nn.Dense(2)]), jnp.arange(3), {},
              r"'layers_0/embedding' reaches .* through gather"),
    "layer_norm": (nn.Sequential([nn.Dense(4), nn.LayerNorm()]),
                   jnp.ones((3, 2)), {}, r"'layers_1/scale' reaches .* mul"),
    "raw_param": (Scaled(), jnp.ones((3, 2)), {},
                  r"'scale' reaches .* through mul"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_models_are_refused_and_auto_uses_vmap(name, monkeypatch):
  model, x, kwargs, message = REFUSED[name]
  loss_fn, params, batch = refused(model, x, **kwargs)
  with pytest.raises(ValueError, match=message):
    ghost_jaxpr.analyze(loss_fn, params, batch, None)
  with pytest.raises(gnp.errors.UserError, match=message):
    jax.eval_shape(gnp.penalties.gradient_norm_variance(
        loss_fn, lam=0.1, method="ghost"), params, batch, None)
  # "auto" takes the vmap path instead.
  assert_auto_falls_back_to_vmap(monkeypatch, loss_fn, params, batch)


def test_auto_falls_back_to_the_same_numbers_as_vmap():
  loss_fn, params, batch = refused(*REFUSED["layer_norm"][:2])
  auto, vmap = jax.jit(lambda p: [
      gnp.penalties.gradient_norm_variance(loss_fn, lam=0.1, method=method)(
          p, batch, None) for method in ("auto", "vmap")],
                       compiler_options=FAST_COMPILE)(params)
  jax.tree.map(np.testing.assert_array_equal, auto, vmap)


def test_conv_local_is_exact(x64):
  """Per-position kernels: the dot_general's batch dimension is G."""
  loss_fn, params, batch = refused(
      nn.Sequential([nn.ConvLocal(2, (2,)), nn.tanh, nn.Dense(1)]),
      jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 1))))
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  ghosts, vmap = jax.jit(lambda p: [
      f(loss_fn, p, batch, None)[2]
      for f in (ghost.per_example_norms, gnvr.vmap_per_example_norms)],
                         compiler_options=FAST_COMPILE)(params)
  np.testing.assert_allclose(ghosts, vmap, rtol=1e-12)


def test_a_per_example_l2_term_is_refused():
  loss_fn, params, batch = problem("mlp", 0)
  l2 = lambda p, b, k: (loss_fn(p, b, k)[0] + 1e-3 * sum(
      jnp.sum(w ** 2) for w in jax.tree.leaves(p)), None)
  with pytest.raises(ValueError,
                     match="'Dense_0/bias' .* through integer_pow"):
    ghost_jaxpr.analyze(l2, params, batch, None)


def test_batch_norm_mode_passed_at_call_time():
  model = nn.BatchNorm(use_scale=False, use_bias=False)
  x = jnp.ones((3, 2))
  variables = model.init(jax.random.key(0), x, use_running_average=True)
  loss_fn = lambda p, b, k: (jnp.sum(model.apply(
      variables, b, use_running_average=False, mutable=["batch_stats"])[0],
      axis=1), None)
  with pytest.raises(ValueError,
                     match="reduces over the examples.*ill-defined"):
    ghost_jaxpr.analyze(loss_fn, {}, x, None)
  evaluation = lambda p, b, k: (jnp.sum(model.apply(
      variables, b, use_running_average=True), axis=1), None)
  assert ghost_jaxpr.analyze(evaluation, {}, x, None).sites == ()


def test_examples_off_the_leading_axis_are_refused():
  model = nn.Dense(2)
  x = jnp.ones((3, 4))
  params = model.init(jax.random.key(0), x.T)["params"]
  # The layer contracts the examples; the losses still have shape [B].
  loss_fn = lambda p, b, k: (
      b @ jnp.sum(model.apply({"params": p}, b.T), axis=1), None)
  with pytest.raises(ValueError, match=r"'kernel' .*dot_general.*the "
                     r"examples' axis of the other operand is contracted"):
    ghost_jaxpr.analyze(loss_fn, params, x, None)
  # An unbatched 1-D convolution input [T, C] whose T happens to equal B.
  conv = nn.Conv(2, (2,))
  params = conv.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, b, k: (jnp.sum(conv.apply({"params": p}, b), axis=1),
                             None)
  with pytest.raises(ValueError, match=r"'kernel' .*conv_general_dilated.*"
                     r"the examples on the input's batch dimension"):
    ghost_jaxpr.analyze(loss_fn, params, x, None)


# A layer's parameters as loss_fn hands them to the layer: each variant
# rewrites the params tree inside loss_fn. Square hidden layers (4 -> 4 -> 4)
# so that kernels can be transposed or shared.
def _rewrite(name, p):
  p = jax.tree.map(lambda x: x, p)  # A copy of the dicts, the same leaves.
  first, second = p["Dense_0"], p["Dense_1"]
  if name == "scaled_kernel":  # The reported bug: kernel scaled, bias not.
    first["kernel"] = 2 * first["kernel"]
  elif name == "scaled_bias":
    first["bias"] = 2 * first["bias"]
  elif name == "transposed_kernel":
    first["kernel"] = first["kernel"].T
  elif name == "sliced_kernel":  # A slice of a wider parameter.
    first["kernel"] = p.pop("wide")[:, :4]
  elif name == "cast_kernel":
    first["kernel"] = first["kernel"].astype(jnp.float32).astype(
        first["kernel"].dtype)
  elif name == "squared_kernel":
    first["kernel"] = first["kernel"] * first["kernel"]
  elif name == "constant_kernel":
    first["kernel"] = jnp.ones_like(first["kernel"])
  elif name == "tied_transposed":  # One leaf, used plainly and transposed.
    second["kernel"] = first["kernel"].T
  elif name == "shared_bias_transformed_kernel":
    second["bias"], second["kernel"] = first["bias"], 3 * second["kernel"]
  elif name == "shared_kernel":  # Supported: the same leaf in two layers.
    second["kernel"] = first["kernel"]
  elif name == "shared_bias":
    second["bias"] = first["bias"]
  elif name == "leaf_elsewhere":  # Supported: a leaf from another subtree.
    first["kernel"] = p.pop("wide")
  p.pop("wide", None)
  return p


def rewritten(name, seed=0):
  model = MLP((4, 4, 3), activation=jnp.tanh)
  rng = np.random.default_rng(seed)
  dtype = jnp.result_type(float)
  x = jnp.asarray(rng.normal(size=(5, 4)), dtype)
  y = jnp.asarray(rng.integers(0, 3, 5))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), dtype) / 2, shapes)
  width = 6 if name == "sliced_kernel" else 4
  params["wide"] = jnp.asarray(rng.normal(size=(4, width)), dtype) / 2

  def loss_fn(p, batch, key):
    del key
    logits = model.apply({"params": _rewrite(name, p)}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]), None

  return loss_fn, params, (x, y)


# variant -> what the refusal names: the parameter, and the primitive through
# which it reaches the losses other than linearly.
TRANSFORMED = {
    "sliced_kernel": r"'wide' reaches .* through slice",
    "squared_kernel": r"'Dense_0/kernel' reaches .* through mul.*together "
                      r"with another parameter",
}


@pytest.mark.parametrize("name", sorted(TRANSFORMED))
def test_a_layer_given_a_transformed_parameter_is_refused(name, x64):
  loss_fn, params, batch = rewritten(name)
  with pytest.raises(ghost.UnsupportedModelError, match=TRANSFORMED[name]):
    ghost_jaxpr.analyze(loss_fn, params, batch, None)
  with pytest.raises(ghost.UnsupportedModelError):
    ghost.per_example_norms(loss_fn, params, batch, None)


# Linear views of a leaf: the per-example gradient is pulled back through the
# view's transpose (a cast round trip is a relabelling; its float32 rounding
# of the gradient, which vmap's path applies, is not).
@pytest.mark.parametrize("name,rtol", [
    ("scaled_kernel", 1e-12), ("scaled_bias", 1e-12),
    ("transposed_kernel", 1e-12), ("constant_kernel", 1e-12),
    ("tied_transposed", 1e-12), ("shared_bias_transformed_kernel", 1e-12),
    ("cast_kernel", 1e-7)])
def test_a_layer_given_a_linear_view_of_a_parameter_is_exact(name, rtol, x64):
  loss_fn, params, batch = rewritten(name)
  ghosts, vmap = jax.jit(lambda p: [
      f(loss_fn, p, batch, None)[2]
      for f in (ghost.per_example_norms, gnvr.vmap_per_example_norms)],
                         compiler_options=FAST_COMPILE)(params)
  np.testing.assert_allclose(ghosts, vmap, rtol=rtol)


def test_auto_gives_the_exact_norms_of_a_scaled_kernel(x64):
  # Linen interception once took the ghost path here and missed the kernel's
  # gradient (norms 1.51, 1.80, ... against 2.76, 2.11, ...).
  loss_fn, params, batch = rewritten("scaled_kernel")
  auto, vmap = jax.jit(lambda p: [
      f(loss_fn, p, batch, None)[2]
      for f in (gnvr.auto_per_example_norms, gnvr.vmap_per_example_norms)],
                       compiler_options=FAST_COMPILE)(params)
  np.testing.assert_allclose(auto, vmap, rtol=1e-12)
  # An independent reference: the Jacobian of the losses, row by row.
  jacobian = jax.jacrev(lambda p: loss_fn(p, batch, None)[0])(params)
  rows = jnp.concatenate([j.reshape(5, -1) for j in jax.tree.leaves(jacobian)],
                         axis=1)
  np.testing.assert_allclose(auto, jnp.linalg.norm(rows, axis=1), rtol=1e-12)


SHARED = {  # variant -> the leaves of the kernels and biases, in call order
    "shared_kernel": ["Dense_0/kernel", "Dense_0/bias", "Dense_0/kernel",
                      "Dense_1/bias", "Dense_2/kernel", "Dense_2/bias"],
    "shared_bias": ["Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel",
                    "Dense_0/bias", "Dense_2/kernel", "Dense_2/bias"],
    "leaf_elsewhere": ["wide", "Dense_0/bias", "Dense_1/kernel",
                       "Dense_1/bias", "Dense_2/kernel", "Dense_2/bias"],
}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_a_leaf_shared_between_layers_is_exact(name, x64):
  loss_fn, params, batch = rewritten(name)
  plan = ghost_jaxpr.analyze(loss_fn, params, batch, None)
  assert [plan.paths[site.leaf] for site in plan.sites] == SHARED[name]
  ghosts, vmap = jax.jit(lambda p: [
      f(loss_fn, p, batch, None)[2]
      for f in (ghost.per_example_norms, gnvr.vmap_per_example_norms)],
                         compiler_options=FAST_COMPILE)(params)
  np.testing.assert_allclose(ghosts, vmap, rtol=1e-11)
