"""GNP and SAM against references written out with jax.grad on raveled params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gnp
from tests.problems import tiny_problem

SEEDS = [0, 1, 2]


def raveled(loss_fn, params, batch, key=None):
  """(flat θ, L(flat θ), unravel) for brute-force references."""
  flat, unravel = ravel_pytree(params)
  mean_loss = lambda theta: jnp.mean(loss_fn(unravel(theta), batch, key)[0])
  return flat, mean_loss, unravel


def flat(tree):
  return ravel_pytree(tree)[0]


def reference_finite_difference(mean_loss, theta, r, alpha, normalize_first):
  g = jax.grad(mean_loss)(theta)
  unit = g / jnp.linalg.norm(g)
  first = unit if normalize_first else g
  return (1 - alpha) * first + alpha * jax.grad(mean_loss)(theta + r * unit)


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_equals_grad_of_penalised_objective(seed, x64):
  loss_fn, params, batch = tiny_problem(seed)
  theta, mean_loss, _ = raveled(loss_fn, params, batch)
  r, alpha = 0.05, 0.7
  objective = lambda t: mean_loss(t) + alpha * r * jnp.linalg.norm(
      jax.grad(mean_loss)(t)
  )
  grad_fn = gnp.penalties.gradient_norm(loss_fn, r=r, alpha=alpha, exact=True)
  (loss, _), grads = grad_fn(params, batch, None)
  np.testing.assert_allclose(loss, objective(theta), rtol=1e-12)
  np.testing.assert_allclose(flat(grads), jax.grad(objective)(theta), rtol=1e-9,
                             atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("normalize_first", [False, True])
def test_finite_difference_equals_formula(seed, normalize_first, x64):
  loss_fn, params, batch = tiny_problem(seed)
  theta, mean_loss, _ = raveled(loss_fn, params, batch)
  r, alpha = 0.1, 0.8
  grad_fn = gnp.penalties.gradient_norm(
      loss_fn, r=r, alpha=alpha, normalize_first=normalize_first
  )
  (loss, _), grads, stats = grad_fn.with_stats(params, batch, None)
  expected = reference_finite_difference(
      mean_loss, theta, r, alpha, normalize_first
  )
  np.testing.assert_allclose(flat(grads), expected, rtol=1e-10, atol=1e-13)
  g_norm = jnp.linalg.norm(jax.grad(mean_loss)(theta))
  np.testing.assert_allclose(stats["task_loss"], mean_loss(theta), rtol=1e-12)
  np.testing.assert_allclose(stats["grad_norm"], g_norm, rtol=1e-12)
  np.testing.assert_allclose(loss, mean_loss(theta) + alpha * r * g_norm,
                             rtol=1e-12)
  unit = jax.grad(mean_loss)(theta) / g_norm
  np.testing.assert_allclose(stats["perturbed_loss"],
                             mean_loss(theta + r * unit), rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_finite_difference_converges_to_exact_at_first_order(seed, x64):
  """λ = αr fixed, r → 0: ‖FD − exact‖ = O(r), so the log-log slope is ~1."""
  loss_fn, params, batch = tiny_problem(seed)
  lam = 0.05
  exact = gnp.penalties.gradient_norm(loss_fn, r=lam, alpha=1.0, exact=True)
  exact_grads = flat(exact(params, batch, None)[1])
  radii = np.array([4e-2, 2e-2, 1e-2, 5e-3, 2.5e-3])
  errors = []
  for r in radii:
    fd = gnp.penalties.gradient_norm(loss_fn, r=r, alpha=lam / r)
    errors.append(float(jnp.linalg.norm(flat(fd(params, batch, None)[1])
                                        - exact_grads)))
  errors = np.array(errors)
  assert np.all(np.diff(errors) < 0), errors
  slope = np.polyfit(np.log(radii), np.log(errors), 1)[0]
  assert 0.85 < slope < 1.15, (slope, errors)


@pytest.mark.parametrize("seed", SEEDS)
def test_alpha_one_is_sam(seed, x64):
  loss_fn, params, batch = tiny_problem(seed)
  theta, mean_loss, _ = raveled(loss_fn, params, batch)
  rho = 0.05
  (sam_loss, _), sam_grads, stats = gnp.penalties.sam(
      loss_fn, rho=rho).with_stats(params, batch, None)
  _, gnp_grads = gnp.penalties.gradient_norm(loss_fn, r=rho, alpha=1.0)(
      params, batch, None
  )
  g = jax.grad(mean_loss)(theta)
  perturbed = theta + rho * g / jnp.linalg.norm(g)
  np.testing.assert_allclose(flat(sam_grads), jax.grad(mean_loss)(perturbed),
                             rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(flat(gnp_grads), flat(sam_grads), rtol=1e-12)
  np.testing.assert_allclose(sam_loss, mean_loss(perturbed), rtol=1e-12)
  np.testing.assert_allclose(stats["penalty"],
                             mean_loss(perturbed) - mean_loss(theta), rtol=1e-9)


def _keyed_problem(seed):
  """A loss that uses its key (a random input mask), to test key plumbing."""
  loss_fn, params, batch = tiny_problem(seed, batch_size=12)

  def keyed_loss(params, batch, key):
    inputs, labels = batch
    mask = jax.random.bernoulli(key, 0.8, inputs.shape).astype(inputs.dtype)
    return loss_fn(params, (inputs * mask, labels), None)

  return keyed_loss, params, batch


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [3, 4])
@pytest.mark.parametrize("method", ["finite_difference", "exact", "sam"])
def test_group_size_is_mean_over_groups(seed, group_size, method, x64):
  loss_fn, params, batch = _keyed_problem(seed)
  key = jax.random.key(seed + 100)
  r, alpha = 0.05, 0.6
  if method == "sam":
    grad_fn = gnp.penalties.sam(loss_fn, rho=r, group_size=group_size)
  else:
    grad_fn = gnp.penalties.gradient_norm(
        loss_fn, r=r, alpha=alpha, exact=method == "exact",
        group_size=group_size)
  (loss, aux), grads = grad_fn(params, batch, key)

  num_groups = 12 // group_size
  updates, objectives = [], []
  for j in range(num_groups):
    part = jax.tree.map(lambda x: x[j * group_size:(j + 1) * group_size], batch)
    theta, mean_loss, _ = raveled(loss_fn, params, part,
                                  jax.random.fold_in(key, j))
    g = jax.grad(mean_loss)(theta)
    g_norm = jnp.linalg.norm(g)
    perturbed = theta + r * g / g_norm
    if method == "sam":
      updates.append(jax.grad(mean_loss)(perturbed))
      objectives.append(mean_loss(perturbed))
    elif method == "exact":
      penalised = lambda t: mean_loss(t) + alpha * r * jnp.linalg.norm(
          jax.grad(mean_loss)(t))
      updates.append(jax.grad(penalised)(theta))
      objectives.append(penalised(theta))
    else:
      updates.append((1 - alpha) * g + alpha * jax.grad(mean_loss)(perturbed))
      objectives.append(mean_loss(theta) + alpha * r * g_norm)
  np.testing.assert_allclose(flat(grads), np.mean(updates, axis=0),
                             rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(loss, np.mean(objectives), rtol=1e-10)
  assert aux["logits"].shape == (num_groups, group_size, 3)
  # Groups must differ from the whole batch, or the test proves nothing.
  _, whole = gnp.penalties.sam(loss_fn, rho=r)(params, batch, key)
  assert not np.allclose(flat(grads), flat(whole), rtol=1e-3)


def _dead_problem():
  """Per-example loss (x·w)² at w = 0: the gradient is exactly zero."""
  loss_fn = lambda w, x, key: ((x @ w["w"]) ** 2, None)
  return loss_fn, {"w": jnp.zeros(3)}, jnp.ones((4, 3))


@pytest.mark.parametrize(
    "make",
    [
        lambda f: gnp.penalties.gradient_norm(f, r=0.1, alpha=0.8),
        lambda f: gnp.penalties.gradient_norm(f, r=0.1, alpha=0.8,
                                              normalize_first=True),
        lambda f: gnp.penalties.gradient_norm(f, r=0.1, alpha=0.8, exact=True),
        lambda f: gnp.penalties.gradient_norm(f, r=0.1, alpha=0.8,
                                              group_size=2),
        lambda f: gnp.penalties.sam(f, rho=0.1),
    ],
)
def test_zero_gradient_gives_finite_zero_update(make):
  loss_fn, params, batch = _dead_problem()
  (loss, _), grads, stats = jax.jit(make(loss_fn).with_stats)(
      params, batch, None)
  assert np.all(np.isfinite(grads["w"])) and np.isfinite(loss)
  np.testing.assert_array_equal(grads["w"], np.zeros(3))
  assert all(np.isfinite(v) for v in stats.values())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f: gnp.penalties.gradient_norm(f, r=-0.1, alpha=0.5), "r=-0.1"),
        (lambda f: gnp.penalties.gradient_norm(f, r=0.1, alpha=-2.0),
         "alpha=-2.0"),
        (lambda f: gnp.penalties.gradient_norm(f, r=float("nan"), alpha=1.0),
         "r=nan"),
        (lambda f: gnp.penalties.sam(f, rho=-0.05), "rho=-0.05"),
        (lambda f: gnp.penalties.sam(f, rho=0.05, group_size=0),
         "group_size=0"),
        (lambda f: gnp.penalties.gradient_norm(f, r=0.1, alpha=0.5,
                                               group_size=2.5), "group_size=2.5"),
        (lambda f: gnp.penalties.gradient_norm(f, r=0.1, alpha=0.5, exact=True,
                                               normalize_first=True),
         "normalize_first"),
    ],
)
def test_bad_hyperparameters_raise(call, message):
  loss_fn, _, _ = _dead_problem()
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    call(loss_fn)


def test_group_size_must_divide_batch():
  loss_fn, params, batch = tiny_problem(0, batch_size=8)
  grad_fn = gnp.penalties.gradient_norm(loss_fn, r=0.1, alpha=0.5,
                                        group_size=3)
  with pytest.raises(ValueError, match="group_size=3 does not divide .* 8"):
    jax.jit(grad_fn)(params, batch, None)
