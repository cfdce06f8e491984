"""The contract every regulariser shares, checked for all of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnp
from tests.problems import tiny_problem


def shift_views(batch, key):
  inputs, labels = batch
  noise = 0.1 * jax.random.normal(key, inputs.shape, inputs.dtype)
  return (inputs + noise, labels), (jnp.roll(inputs, 1, axis=1), labels)


# name -> (factory taking (loss_fn, strength), strength name)
METHODS = {
    "plain": lambda f, s: gnp.penalties.plain(f),
    "gnp": lambda f, s: gnp.penalties.gradient_norm(f, r=0.05, alpha=s),
    "gnp_normalized": lambda f, s: gnp.penalties.gradient_norm(
        f, r=0.05, alpha=s, normalize_first=True),
    "gnp_exact": lambda f, s: gnp.penalties.gradient_norm(
        f, r=s, alpha=0.5, exact=True),
    "sam": lambda f, s: gnp.penalties.sam(f, rho=s),
    "asam": lambda f, s: gnp.penalties.sam(f, rho=s, adaptive=True),
    "gnp_adaptive": lambda f, s: gnp.penalties.gradient_norm(
        f, r=0.05, alpha=s, adaptive=True),
    "gnp_adaptive_exact": lambda f, s: gnp.penalties.gradient_norm(
        f, r=s, alpha=0.5, exact=True, adaptive=True),
    "clip": lambda f, s: gnp.penalties.per_example_clipping(f, max_norm=s),
    "gnvr": lambda f, s: gnp.penalties.gradient_norm_variance(f, lam=s),
    "gvr": lambda f, s: gnp.penalties.view_consistency(
        f, alpha=s, views=shift_views),
    "hessian": lambda f, s: gnp.penalties.hessian_frobenius(f, lam=s),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_value_and_grad_contract_under_jit(name):
  loss_fn, params, batch = tiny_problem(0)
  grad_fn = METHODS[name](loss_fn, 0.1)
  key = jax.random.key(1)
  (loss, aux), grads = jax.jit(grad_fn)(params, batch, key)
  assert loss.shape == () and jnp.issubdtype(loss.dtype, jnp.floating)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.shape == p.shape and g.dtype == p.dtype
    assert np.all(np.isfinite(g))
  rows = 2 * len(batch[0]) if name == "gvr" else len(batch[0])
  assert aux["logits"].shape == (rows, 3)
  (_, _), _, stats = jax.jit(grad_fn.with_stats)(params, batch, key)
  assert {"task_loss", "penalty"} <= set(stats)
  assert all(s.shape == () for s in stats.values())


def test_plain_is_value_and_grad():
  loss_fn, params, batch = tiny_problem(2)
  mean_loss = lambda p: (jnp.mean(loss_fn(p, batch, None)[0]),
                         loss_fn(p, batch, None)[1])
  expected = jax.value_and_grad(mean_loss, has_aux=True)(params)
  actual = gnp.penalties.plain(loss_fn)(params, batch, None)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


@pytest.mark.parametrize("name", ["gnp", "gnp_exact", "sam", "gnvr", "hessian",
                                  "asam", "gnp_adaptive",
                                  "gnp_adaptive_exact"])
def test_zero_strength_is_plain(name, x64):
  loss_fn, params, batch = tiny_problem(3)
  key = jax.random.key(0)
  (_, _), grads = jax.jit(METHODS[name](loss_fn, 0.0))(params, batch, key)
  (_, _), plain = jax.jit(gnp.penalties.plain(loss_fn))(params, batch, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                       atol=1e-15),
               grads, plain)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"plain"}))
def test_traced_hyperparameters_do_not_recompile(name):
  """A schedule value enters the jitted step as an array: one compilation."""
  loss_fn, params, batch = tiny_problem(4)
  key = jax.random.key(2)

  @jax.jit
  def step(params, batch, key, strength):
    return METHODS[name](loss_fn, strength)(params, batch, key)

  first = step(params, batch, key, jnp.float32(0.05))
  second = step(params, batch, key, jnp.float32(0.2))
  assert step._cache_size() == 1
  for strength, traced in ((0.05, first), (0.2, second)):
    constant = jax.jit(METHODS[name](loss_fn, strength))(params, batch, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                         atol=1e-6),
                 traced, constant)
  if name == "clip":  # Its loss is L(θ) whatever τ; its update moves.
    assert not np.allclose(jax.tree.leaves(first[1])[0],
                           jax.tree.leaves(second[1])[0])
  else:
    assert not np.allclose(first[0][0], second[0][0])


def test_loss_fn_must_return_per_example_losses():
  loss_fn, params, batch = tiny_problem(0)
  scalar_loss = lambda p, b, k: (jnp.mean(loss_fn(p, b, k)[0]), None)
  with pytest.raises(ValueError, match=r"shape \[B\]; got shape \(\)"):
    gnp.penalties.plain(scalar_loss)(params, batch, None)
