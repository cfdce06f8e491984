"""Tests for gnp.penalties.hessian_frobenius, against jax.hessian references.

The penalty is a Hutchinson estimate, so its value and gradient are random.
Two kinds of checks:
* statistical: over many keys, the mean penalty and the mean gradient must
  match ‖H‖_F² and ∇(L + λ‖H‖_F²) from `jax.hessian` on the raveled params,
  to within 5 standard errors computed from the samples;
* exact: on an 8-parameter model every Rademacher probe can be enumerated, so
  the penalty and the gradient of one call must be ‖H v‖² and
  ∇(L + λ‖H(θ) v‖²) for one of the 2⁸ probes v (or the mean over K of them).
All in float64.
"""

import functools
import itertools

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnp

SEEDS = [0, 1, 2]
LAM = 0.5
NUM_KEYS = 2000  # keys per statistical check
MAX_Z = 5.0


# Every test here runs in float64 (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("x64")


def _f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


# A tanh MLP 3 → 4 → 3 (31 parameters) with cross-entropy; ignores its key.
_MODEL = gnp.models.MLP((4, 3), activation=jnp.tanh)


def _mlp_loss(params, batch, key):
  del key
  x, y = batch
  logits = _MODEL.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits


def _mlp_problem(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(8, 3)))
  y = jnp.asarray(rng.integers(0, 3, size=8))
  params = _f64(_MODEL.init(jax.random.key(seed), x))
  params = jax.tree.map(lambda p: p * 1.5, params)  # a less flat start.
  return params, (x, y)


@functools.partial(jax.jit, static_argnums=(0,))
def _reference(loss_fn, params, batch, lam):
  """‖H‖_F², ∇L and ∇(L + λ‖H‖_F²) by jax.hessian on the raveled params."""
  flat, unravel = ravel_pytree(params)
  mean_loss = lambda f: jnp.mean(loss_fn(unravel(f), batch, None)[0])
  frobenius = lambda f: jnp.sum(jax.hessian(mean_loss)(f) ** 2)
  return {
      "loss": mean_loss(flat),
      "frobenius": frobenius(flat),
      "grad_loss": jax.grad(mean_loss)(flat),
      "grad_frobenius": jax.grad(frobenius)(flat),
      "grad_objective": jax.grad(lambda f: mean_loss(f) + lam * frobenius(f))(
          flat
      ),
  }


@functools.partial(jax.jit, static_argnums=(4,))
def _sample(params, batch, keys, lam, num_probes):
  """with_stats over many keys; grads raveled to [num_keys, num_params]."""
  grad_fn = gnp.penalties.hessian_frobenius(
      _mlp_loss, lam=lam, num_probes=num_probes
  )

  def one(key):
    (loss, _), grads, stats = grad_fn.with_stats(params, batch, key)
    return loss, ravel_pytree(grads)[0], stats

  return jax.vmap(one)(keys)


@functools.lru_cache(maxsize=None)
def _samples(seed, lam, num_probes=1, num_keys=NUM_KEYS):
  params, batch = _mlp_problem(seed)
  keys = jax.random.split(jax.random.key(1000 + seed), num_keys)
  return jax.device_get(_sample(params, batch, keys, lam, num_probes))


def _mean_and_stderr(samples):
  samples = np.asarray(samples)
  return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_penalty_is_hessian_frobenius_norm(seed):
  params, batch = _mlp_problem(seed)
  ref = _reference(_mlp_loss, params, batch, LAM)
  _, _, stats = _samples(seed, LAM)
  mean, stderr = _mean_and_stderr(stats["penalty"])
  # The check is sharp: a 15% bias would already be over 5 standard errors.
  assert stderr < 0.03 * ref["frobenius"]
  assert abs(mean - ref["frobenius"]) < MAX_Z * stderr, (mean, ref["frobenius"])
  # Each sample is a squared norm, and the probes are not all alike.
  assert np.all(stats["penalty"] >= 0)
  assert np.std(stats["penalty"]) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_gradient_is_gradient_of_penalised_objective(seed):
  params, batch = _mlp_problem(seed)
  ref = _reference(_mlp_loss, params, batch, LAM)
  _, grads, _ = _samples(seed, LAM)
  mean, stderr = _mean_and_stderr(grads)
  z = (mean - ref["grad_objective"]) / (stderr + 1e-12)
  assert np.max(np.abs(z)) < MAX_Z, np.round(z, 1)
  relative = np.linalg.norm(mean - ref["grad_objective"]) / np.linalg.norm(
      ref["grad_objective"]
  )
  assert relative < 0.05
  # Sharpness: ∇L alone (a penalty whose gradient is dropped) is far away.
  z_without_penalty = (ref["grad_loss"] - ref["grad_objective"]) / stderr
  assert np.max(np.abs(z_without_penalty)) > 4 * MAX_Z


@pytest.mark.parametrize("seed", SEEDS)
def test_penalty_gradient_flows_through_hessian_vector_product(seed):
  params, batch = _mlp_problem(seed)
  ref = _reference(_mlp_loss, params, batch, LAM)
  _, grads_lam, stats_lam = _samples(seed, LAM)
  _, grads_0, stats_0 = _samples(seed, 0.0)
  _, grads_2lam, stats_2lam = _samples(seed, 2 * LAM)
  # With λ = 0 the update is the plain gradient, whatever the probe.
  np.testing.assert_allclose(
      grads_0, np.broadcast_to(ref["grad_loss"], grads_0.shape), rtol=1e-10,
      atol=1e-12,
  )
  # Same key, same probe: the penalty value does not depend on λ, and the
  # penalty's share of the gradient is linear in λ.
  for stats in (stats_lam, stats_2lam):
    np.testing.assert_allclose(stats["penalty"], stats_0["penalty"], rtol=1e-12)
  difference = grads_lam - grads_0
  np.testing.assert_allclose(
      grads_2lam - grads_0, 2 * difference, rtol=1e-9, atol=1e-12
  )
  # Non-zero on every key, and in expectation λ ∇‖H‖_F² on every coordinate
  # (every layer, not just the last).
  expected = LAM * ref["grad_frobenius"]
  assert np.all(
      np.linalg.norm(difference, axis=1) > 0.05 * np.linalg.norm(expected)
  )
  mean, stderr = _mean_and_stderr(difference)
  assert np.linalg.norm(mean) > 0.8 * np.linalg.norm(expected)
  z = (mean - expected) / (stderr + 1e-12)
  assert np.max(np.abs(z)) < MAX_Z, np.round(z, 1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _call(loss_fn, params, batch, key, lam, num_probes=1, with_stats=True):
  grad_fn = gnp.penalties.hessian_frobenius(
      loss_fn, lam=lam, num_probes=num_probes
  )
  return (grad_fn.with_stats if with_stats else grad_fn)(params, batch, key)


@pytest.mark.parametrize("seed", SEEDS)
def test_loss_and_stats(seed):
  params, batch = _mlp_problem(seed)
  ref = _reference(_mlp_loss, params, batch, LAM)
  key = jax.random.key(seed)
  (loss, aux), grads, stats = _call(_mlp_loss, params, batch, key, LAM)
  assert set(stats) >= {"task_loss", "penalty", "grad_norm"}
  np.testing.assert_allclose(stats["task_loss"], ref["loss"], rtol=1e-12)
  np.testing.assert_allclose(
      stats["grad_norm"], np.linalg.norm(ref["grad_loss"]), rtol=1e-12
  )
  np.testing.assert_allclose(
      loss, stats["task_loss"] + LAM * stats["penalty"], rtol=1e-12
  )
  assert stats["penalty"] > 0
  np.testing.assert_allclose(aux, _mlp_loss(params, batch, None)[1], rtol=1e-12)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.shape == p.shape and g.dtype == jnp.float64
  # __call__ returns the same as with_stats, minus the stats.
  (loss2, aux2), grads2 = _call(
      _mlp_loss, params, batch, key, LAM, with_stats=False
  )
  np.testing.assert_allclose(loss2, loss, rtol=1e-12)
  np.testing.assert_allclose(aux2, aux, rtol=1e-12)
  np.testing.assert_allclose(
      ravel_pytree(grads2)[0], ravel_pytree(grads)[0], rtol=1e-12
  )


def test_more_probes_shrink_the_variance():
  seed = 0
  params, batch = _mlp_problem(seed)
  frobenius = _reference(_mlp_loss, params, batch, LAM)["frobenius"]
  variances = {}
  for num_probes in (1, 16):
    _, grads, stats = _samples(seed, LAM, num_probes)
    mean, stderr = _mean_and_stderr(stats["penalty"])
    # A mean over the K probes, not a sum: still unbiased.
    assert abs(mean - frobenius) < MAX_Z * stderr, (num_probes, mean, frobenius)
    variances[num_probes] = (
        np.var(stats["penalty"], ddof=1),
        np.sum(np.var(grads, axis=0, ddof=1)),
    )
  # Roughly 1/K: 16 times smaller, up to sampling noise.
  for single, many in zip(variances[1], variances[16]):
    assert single / 32 < many < single / 4, (single, many)


# An 8-parameter model, small enough to enumerate all 2⁸ Rademacher probes.


def _tiny_loss(params, batch, key):
  del key
  x, y = batch
  hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  prediction = hidden @ params["out"]
  return 0.5 * (prediction - y) ** 2, prediction


def _tiny_problem(seed):
  rng = np.random.default_rng(seed)
  params = {
      "hidden": {"kernel": rng.normal(size=(2, 2)), "bias": rng.normal(size=2)},
      "out": rng.normal(size=2),
  }
  batch = (rng.normal(size=(5, 2)), rng.normal(size=5))
  return _f64(params), _f64(batch)


@jax.jit
def _every_probe(params, batch, lam):
  """For every v in {±1}⁸: ‖H v‖² and ∇_θ(L + λ‖H(θ) v‖²), by jax.hessian."""
  flat, unravel = ravel_pytree(params)
  mean_loss = lambda f: jnp.mean(_tiny_loss(unravel(f), batch, None)[0])
  probes = jnp.asarray(list(itertools.product([-1.0, 1.0], repeat=flat.size)))

  def penalty(f, v):
    return jnp.sum((jax.hessian(mean_loss)(f) @ v) ** 2)

  penalties = jax.vmap(lambda v: penalty(flat, v))(probes)
  grads = jax.vmap(
      lambda v: jax.grad(lambda f: mean_loss(f) + lam * penalty(f, v))(flat)
  )(probes)
  return penalties, grads


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_probes", [1, 2])
def test_one_call_is_exact_for_its_own_probes(seed, num_probes):
  """Without seeing the probes: some v (or pair) explains the whole output."""
  params, batch = _tiny_problem(seed)
  penalties, grads = _every_probe(params, batch, LAM)
  plain_grad = jax.grad(
      lambda p: jnp.mean(_tiny_loss(p, batch, None)[0])
  )(params)
  plain_grad = ravel_pytree(plain_grad)[0]
  if num_probes == 2:  # every ordered pair: the mean of the two estimates.
    penalties = (penalties[:, None] + penalties[None, :]).reshape(-1) / 2
    grads = ((grads[:, None] + grads[None, :]) / 2).reshape(-1, grads.shape[-1])
  for key in jax.random.split(jax.random.key(seed), 4):
    _, got_grads, stats = _call(_tiny_loss, params, batch, key, LAM, num_probes)
    got_grads = ravel_pytree(got_grads)[0]
    error = np.abs(penalties - stats["penalty"]) / penalties.max() + np.max(
        np.abs(grads - got_grads), axis=1
    ) / np.max(np.abs(grads))
    assert np.min(error) < 1e-9, np.min(error)
    # And the penalty moved the gradient: it is not the plain ∇L.
    assert np.max(np.abs(got_grads - plain_grad)) > 1e-3 * np.max(np.abs(grads))


def test_jit_with_traced_lam_matches_eager_without_recompiling():
  params, batch = _tiny_problem(0)
  key = jax.random.key(7)

  @jax.jit
  def step(params, batch, key, lam):
    grad_fn = gnp.penalties.hessian_frobenius(_tiny_loss, lam=lam, num_probes=2)
    return grad_fn.with_stats(params, batch, key)

  for lam in (0.5, 0.25):
    (loss, aux), grads, stats = step(params, batch, key, jnp.float64(lam))
    eager = gnp.penalties.hessian_frobenius(_tiny_loss, lam=lam, num_probes=2)
    (loss_e, aux_e), grads_e, stats_e = eager.with_stats(params, batch, key)
    np.testing.assert_allclose(loss, loss_e, rtol=1e-10)
    np.testing.assert_allclose(aux, aux_e, rtol=1e-10)
    np.testing.assert_allclose(
        ravel_pytree(grads)[0], ravel_pytree(grads_e)[0], rtol=1e-9, atol=1e-12
    )
    assert set(stats) == set(stats_e)
    for name in stats_e:
      np.testing.assert_allclose(stats[name], stats_e[name], rtol=1e-10)
  assert step._cache_size() == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lam=-1), "-1"),
        (dict(lam=-1.0), "-1"),
        (dict(lam=float("nan")), "nan"),
        (dict(lam=None), "lam"),
        (dict(lam=0.1, num_probes=0), "num_probes"),
        (dict(lam=0.1, num_probes=-2), "num_probes"),
        (dict(lam=0.1, num_probes=1.5), "num_probes"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gnp.penalties.hessian_frobenius(_mlp_loss, **kwargs)


def test_missing_key_raises():
  params, batch = _mlp_problem(0)
  grad_fn = gnp.penalties.hessian_frobenius(_mlp_loss, lam=0.1)
  with pytest.raises(ValueError, match="key"):
    grad_fn(params, batch, None)
  with pytest.raises(ValueError, match="key"):
    grad_fn.with_stats(params, batch)
