"""GNVR against an objective built from an explicit Python loop over examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gnp
from tests.problems import tiny_problem


def loop_objective(loss_fn, params, batch, lam, ddof):
  """(θ -> J(θ), flat θ): per-example gradients one example at a time."""
  theta, unravel = ravel_pytree(params)
  size = len(jax.tree.leaves(batch)[0])

  def objective(theta):
    p = unravel(theta)
    norms = []
    for i in range(size):
      example = jax.tree.map(lambda x: x[i:i + 1], batch)
      example_grad = jax.grad(lambda t: loss_fn(unravel(t), example, None)[0][0])
      norms.append(jnp.linalg.norm(example_grad(theta)))
    norms = jnp.stack(norms)
    variance = jnp.sum((norms - norms.mean()) ** 2) / (size - ddof)
    return jnp.mean(loss_fn(p, batch, None)[0]) + lam * variance, variance

  return objective, theta


@pytest.mark.parametrize("method", ["vmap", "ghost"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ddof", [0, 1])
def test_equals_python_loop_reference(seed, ddof, method, x64):
  loss_fn, params, batch = tiny_problem(seed, batch_size=6)
  lam = 0.3
  objective, theta = loop_objective(loss_fn, params, batch, lam, ddof)
  grad_fn = gnp.penalties.gradient_norm_variance(loss_fn, lam=lam, ddof=ddof,
                                                 method=method)
  (loss, aux), grads, stats = grad_fn.with_stats(params, batch, None)
  (expected_loss, expected_variance), expected_grads = jax.value_and_grad(
      objective, has_aux=True)(theta)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
  np.testing.assert_allclose(stats["penalty"], expected_variance, rtol=1e-10)
  np.testing.assert_allclose(ravel_pytree(grads)[0], expected_grads,
                             rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(aux["logits"],
                                loss_fn(params, batch, None)[1]["logits"])
  # The penalty must move the update (its gradient is second order).
  _, plain = gnp.penalties.plain(loss_fn)(params, batch, None)
  assert not np.allclose(ravel_pytree(grads)[0], ravel_pytree(plain)[0],
                         rtol=1e-3)


def test_ddof_convention(x64):
  loss_fn, params, batch = tiny_problem(0, batch_size=6)
  penalty = {
      ddof: gnp.penalties.gradient_norm_variance(loss_fn, lam=1.0, ddof=ddof)
      .with_stats(params, batch, None)[2]["penalty"]
      for ddof in (0, 1, 2)
  }
  np.testing.assert_allclose(penalty[1], penalty[0] * 6 / 5, rtol=1e-12)
  np.testing.assert_allclose(penalty[2], penalty[0] * 6 / 4, rtol=1e-12)


def test_stats_and_default_ddof_is_unbiased(x64):
  loss_fn, params, batch = tiny_problem(1, batch_size=6)
  stats = {
      ddof: gnp.penalties.gradient_norm_variance(loss_fn, lam=0.1, **kwargs)
      .with_stats(params, batch, None)[2]
      for ddof, kwargs in (("default", {}), (1, {"ddof": 1}))
  }
  np.testing.assert_array_equal(stats["default"]["penalty"], stats[1]["penalty"])
  theta, unravel = ravel_pytree(params)
  mean_loss = lambda t: jnp.mean(loss_fn(unravel(t), batch, None)[0])
  np.testing.assert_allclose(stats["default"]["grad_norm"],
                             jnp.linalg.norm(jax.grad(mean_loss)(theta)),
                             rtol=1e-10)
  np.testing.assert_allclose(stats["default"]["task_loss"], mean_loss(theta),
                             rtol=1e-12)


def test_example_with_zero_gradient_is_finite():
  """(x·w)² with x = 0 for one example: its norm is 0, sqrt'(0) must not NaN."""
  loss_fn = lambda w, x, key: ((x @ w["w"]) ** 2, None)
  x = jnp.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
  grad_fn = gnp.penalties.gradient_norm_variance(loss_fn, lam=0.5)
  (loss, _), grads = jax.jit(grad_fn)({"w": jnp.array([0.5, -0.2])}, x, None)
  assert np.isfinite(loss) and np.all(np.isfinite(grads["w"]))


def test_bad_arguments_raise():
  loss_fn, params, batch = tiny_problem(0, batch_size=2)
  with pytest.raises(ValueError, match="lam=-0.1"):
    gnp.penalties.gradient_norm_variance(loss_fn, lam=-0.1)
  with pytest.raises(ValueError, match="ddof=-1"):
    gnp.penalties.gradient_norm_variance(loss_fn, lam=0.1, ddof=-1)
  with pytest.raises(ValueError, match="unknown method='ghosts'"):
    gnp.penalties.gradient_norm_variance(loss_fn, lam=0.1, method="ghosts")
  grad_fn = gnp.penalties.gradient_norm_variance(loss_fn, lam=0.1, ddof=2)
  with pytest.raises(ValueError, match="ddof=2 needs more than 2 examples"):
    grad_fn(params, batch, None)
