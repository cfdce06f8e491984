"""Per-example clipping against a loop over examples, clipped in numpy."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gnp
from gnp import config as config_lib
from gnp import train
from gnp.errors import ConfigError
from gnp.penalties import clipping
from gnp.penalties import ghost
from tests.helpers import tiny_mnist1d


class ConvNet(nn.Module):
  """A strided 2-D convolution, tanh, and a Dense head."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


class BatchNormNet(nn.Module):
  """BatchNorm in training mode: ghost norms refuse it."""

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False)(nn.Dense(5)(x))
    return nn.Dense(3)(jnp.tanh(x))


MODELS = {"mlp": (Mlp, (4,)), "conv": (ConvNet, (6, 6, 2))}


def problem(name, *, batch_size=8, seed=0, zero_example=False):
  """(loss_fn, params, batch) in the default float type. With
  ``zero_example``, example 0 gets the label -1, whose loss is 0 (so is its
  gradient): the marker travels with the example, so it holds one example at
  a time (vmap) as well as for the batch."""
  model_cls, shape = MODELS[name]
  model = model_cls()
  x_key, y_key, init_key = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(x_key, (batch_size, *shape))
  y = jax.random.randint(y_key, (batch_size,), 0, 3)
  if zero_example:
    y = y.at[0].set(-1)
  params = jax.tree.map(lambda p: p.astype(jnp.result_type(float)),
                        model.init(init_key, x)["params"])

  def loss_fn(params, batch, key):
    del key
    inputs, labels = batch
    logits = model.apply({"params": params}, inputs)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.maximum(labels, 0))
    return jnp.where(labels < 0, 0.0, losses), {"logits": logits}

  return loss_fn, params, (x, y)


def loop_gradients(loss_fn, params, batch):
  """([B, P] per-example gradients, [B] losses): one example at a time."""
  theta, unravel = ravel_pytree(params)
  example_loss = jax.jit(jax.value_and_grad(
      lambda t, example: loss_fn(unravel(t), example, None)[0][0]))
  losses, grads = zip(*[
      example_loss(theta, jax.tree.map(lambda a: a[i:i + 1], batch))
      for i in range(len(batch[1]))])
  return np.stack(grads), np.array(losses)


def clip_in_numpy(grads, *, max_norm=None, outlier_mads=None):
  """(update, norms, τ): the per-example gradients clipped and averaged."""
  norms = np.linalg.norm(grads, axis=1)
  if max_norm is not None:
    tau = max_norm
  else:
    median = np.median(norms)
    tau = median + outlier_mads * 1.4826 * np.median(np.abs(norms - median))
  factors = np.array([min(1.0, tau / n) if n > 0 else 1.0 for n in norms])
  return (factors[:, None] * grads).sum(0) / len(norms), norms, tau


def loop_reference(loss_fn, params, batch, **threshold):
  grads, _ = loop_gradients(loss_fn, params, batch)
  return clip_in_numpy(grads, **threshold)[0]


def thresholds(norms):
  """A fixed τ and a k that each clip some examples but not all."""
  return {"max_norm": float(np.median(norms))}, {"outlier_mads": 0.5}


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_equals_the_loop_over_examples(model, method, x64):
  loss_fn, params, batch = problem(model)
  grads_loop, losses = loop_gradients(loss_fn, params, batch)
  for threshold in thresholds(np.linalg.norm(grads_loop, axis=1)):
    expected, norms, tau = clip_in_numpy(grads_loop, **threshold)
    assert 0 < np.sum(norms > tau) < len(norms)  # Some clipped, not all.
    grad_fn = gnp.penalties.per_example_clipping(loss_fn, method=method,
                                                 **threshold)
    (loss, aux), grads, stats = jax.jit(grad_fn.with_stats)(params, batch,
                                                            None)
    np.testing.assert_allclose(ravel_pytree(grads)[0], expected, rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-12)
    np.testing.assert_allclose(stats["task_loss"], np.mean(losses),
                               rtol=1e-12)
    np.testing.assert_allclose(stats["threshold"], tau, rtol=1e-10)
    np.testing.assert_allclose(stats["penalty"], np.mean(norms > tau))
    np.testing.assert_allclose(stats["mean_example_grad_norm"],
                               np.mean(norms), rtol=1e-10)
    np.testing.assert_allclose(aux["logits"],
                               loss_fn(params, batch, None)[1]["logits"],
                               rtol=1e-12)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_an_example_with_zero_gradient_is_no_nan(method, x64):
  loss_fn, params, batch = problem("mlp", zero_example=True)
  grads_loop, _ = loop_gradients(loss_fn, params, batch)
  # The robust τ: the zero norm enters the median and the MAD too.
  expected, norms, tau = clip_in_numpy(grads_loop, outlier_mads=0.0)
  assert norms[0] == 0 and np.sum(norms > tau) > 0
  grad_fn = gnp.penalties.per_example_clipping(loss_fn, method=method,
                                               outlier_mads=0.0)
  _, grads, stats = jax.jit(grad_fn.with_stats)(params, batch, None)
  assert all(np.all(np.isfinite(s)) for s in jax.tree.leaves(stats))
  np.testing.assert_allclose(ravel_pytree(grads)[0], expected, rtol=1e-10,
                             atol=1e-14)


def test_a_threshold_above_every_norm_is_the_plain_gradient(x64):
  loss_fn, params, batch = problem("conv")
  (plain_loss, _), plain = jax.jit(gnp.penalties.plain(loss_fn))(
      params, batch, None)
  for method in ("ghost", "vmap"):
    grad_fn = gnp.penalties.per_example_clipping(loss_fn, max_norm=1e6,
                                                 method=method)
    (loss, _), grads, stats = jax.jit(grad_fn.with_stats)(params, batch, None)
    np.testing.assert_allclose(ravel_pytree(grads)[0],
                               ravel_pytree(plain)[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-12)
    assert float(stats["penalty"]) == 0.0


def test_auto_uses_ghost_norms_where_it_can(x64):
  """The same program as method="ghost" for a supported model."""
  loss_fn, params, batch = problem("mlp")
  jaxprs = {method: str(jax.make_jaxpr(gnp.penalties.per_example_clipping(
      loss_fn, outlier_mads=1.0, method=method))(params, batch, None))
            for method in ("auto", "ghost")}
  assert jaxprs["auto"] == jaxprs["ghost"]


@pytest.mark.parametrize("case", ["batch_norm", "l2_in_the_loss"])
def test_auto_falls_back_to_vmap_where_ghost_cannot(case, x64, caplog):
  if case == "batch_norm":
    model = BatchNormNet()
    x = jax.random.normal(jax.random.key(0), (6, 4))
    variables = model.init(jax.random.key(1), x)

    def loss_fn(params, batch, key):
      del key
      logits, _ = model.apply({"params": params,
                               "batch_stats": variables["batch_stats"]},
                              batch[0], mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch[1]), None

    params = variables["params"]
  else:
    inner, params, (x, _) = problem("mlp", batch_size=6)

    def loss_fn(params, batch, key):
      losses, aux = inner(params, batch, key)
      return losses + 0.5 * 1e-2 * optax.tree_utils.tree_norm(
          params, squared=True), aux

  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  batch = (x, jnp.arange(6) % 3)
  with pytest.raises(ghost.UnsupportedModelError):
    gnp.penalties.per_example_clipping(loss_fn, max_norm=0.3,
                                       method="ghost")(params, batch, None)
  with caplog.at_level(logging.WARNING):
    auto = jax.jit(gnp.penalties.per_example_clipping(
        loss_fn, max_norm=0.3, method="auto"))(params, batch, None)
  assert "using per-example gradients (vmap)" in caplog.text
  vmap = jax.jit(gnp.penalties.per_example_clipping(
      loss_fn, max_norm=0.3, method="vmap"))(params, batch, None)
  jax.tree.map(np.testing.assert_array_equal, auto, vmap)
  if case == "l2_in_the_loss":  # Per-example gradients are well defined.
    expected = loop_reference(loss_fn, params, batch, max_norm=0.3)
    np.testing.assert_allclose(ravel_pytree(auto[1])[0], expected,
                               rtol=1e-10)


def test_traced_thresholds_do_not_recompile():
  loss_fn, params, batch = problem("mlp")

  @jax.jit
  def step(max_norm, outlier_mads):
    fixed = gnp.penalties.per_example_clipping(loss_fn, max_norm=max_norm)
    robust = gnp.penalties.per_example_clipping(loss_fn,
                                                outlier_mads=outlier_mads)
    return fixed(params, batch, None)[1], robust(params, batch, None)[1]

  first = step(jnp.float32(0.1), jnp.float32(0.0))
  second = step(jnp.float32(10.0), jnp.float32(5.0))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  for a, b in zip(first, second):
    assert not np.allclose(ravel_pytree(a)[0], ravel_pytree(b)[0])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one threshold"),
    ({"max_norm": 1.0, "outlier_mads": 3.0}, "exactly one threshold"),
    ({"max_norm": 0.0}, "max_norm must be finite and > 0"),
    ({"max_norm": float("inf")}, "max_norm must be finite"),
    ({"outlier_mads": -1.0}, "outlier_mads must be finite and ≥ 0"),
    ({"outlier_mads": float("nan")}, "outlier_mads must be finite"),
    ({"max_norm": 1.0, "method": "loop"}, "unknown method"),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gnp.penalties.per_example_clipping(lambda p, b, k: (b @ p, None), **kwargs)


def test_clip_factors_and_threshold_by_formula():
  norms = jnp.array([0.0, 1.0, 2.0, 4.0, 10.0])
  # median 2, |n − 2| = (2, 1, 0, 2, 8): MAD 2.
  tau = clipping.threshold(norms, outlier_mads=1.0)
  np.testing.assert_allclose(tau, 2.0 + 1.4826 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(clipping.clip_factors(norms, 4.0),
                             [1.0, 1.0, 1.0, 1.0, 0.4])


# --- The training system ----------------------------------------------------


def test_clip_trains_with_its_threshold_traced():
  config = tiny_mnist1d(**{"method": "clip", "clip.outlier_mads": 1.0,
                           "optimizer.learning_rate": 3e-3})
  assert train.hyperparameter_keys(config) == (
      "clip.outlier_mads", "optimizer.l2", "optimizer.learning_rate",
      "optimizer.weight_decay")
  exp = train.create_experiment(config)
  state = exp.init()
  losses, clipped = [], []
  for step in range(20):
    state, metrics = exp.step(state, exp.train_batch(step))
    losses.append(float(metrics["loss"]))
    clipped.append(float(metrics["penalty"]))
  assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
  assert 0 < np.mean(clipped) < 0.5, clipped  # k = 1: the upper tail.
  assert exp.step._cache_size() == 1  # pylint: disable=protected-access
  fixed = tiny_mnist1d(**{"method": "clip", "clip.max_norm": 1.0})
  assert "clip.max_norm" in train.hyperparameter_keys(fixed)
  assert "clip.outlier_mads" not in train.hyperparameter_keys(fixed)


@pytest.mark.parametrize("overrides, message", [
    ({}, "exactly one threshold"),
    ({"clip.max_norm": 1.0, "clip.outlier_mads": 3.0},
     "exactly one threshold"),
    ({"clip.max_norm": 0.0}, "clip.max_norm must be finite and > 0"),
    ({"clip.outlier_mads": -1.0}, "clip.outlier_mads must be finite"),
    ({"clip.outlier_mads": 3.0, "clip.method": "loop"},
     "clip.method='loop' is unknown"),
    ({"clip.outlier_mads": 3.0, "regularizer_warmup": "lambda",
      "optimizer.warmup_epochs": 1.0}, "method='clip' has none"),
])
def test_config_refuses_bad_clipping(overrides, message):
  config = tiny_mnist1d(method="clip")
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


@pytest.mark.parametrize("overrides, message", [
    ({"method": "sam", "sam.eta": -1.0}, "sam.eta must be finite and ≥ 0"),
    ({"method": "gnp", "gnp.eta": float("inf")}, "gnp.eta must be finite"),
    ({"method": "gnp", "gnp.adaptive": True, "gnp.normalize_first": True},
     "gnp.adaptive and gnp.normalize_first"),
])
def test_config_refuses_bad_adaptive_settings(overrides, message):
  config = tiny_mnist1d()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_the_threshold_value_is_traced_but_its_kind_is_structure():
  """Trials that differ in k share one compiled population; a fixed τ does
  not share it with a robust one."""
  from gnp import population  # pylint: disable=g-import-not-at-top

  robust = [tiny_mnist1d(**{"method": "clip", "clip.outlier_mads": k})
            for k in (0.5, 3.0)]
  fixed = tiny_mnist1d(**{"method": "clip", "clip.max_norm": 1.0})
  assert population.structure(robust[0]) == population.structure(robust[1])
  assert population.structure(robust[0]) != population.structure(fixed)
