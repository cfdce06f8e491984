"""Adaptive perturbations (ASAM) in SAM and GNP, against hand computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gnp
from gnp.models import MLP
from tests.problems import tiny_problem

ETA = 0.01


def flat(tree):
  return ravel_pytree(tree)[0]


# --- A two-layer tanh MLP, forward and backward written out in numpy -------


def two_layer_problem(seed=0, batch_size=5):
  """A 3→4→3 tanh MLP in float64, its data, and the Flax loss function."""
  model = MLP((4, 3), activation=jnp.tanh)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch_size, 3))
  y = rng.integers(0, 3, size=batch_size)
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64),
                        model.init(jax.random.key(seed), x)["params"])

  def loss_fn(params, batch, key):
    del key
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[1]), {"logits": logits}

  return loss_fn, params, (jnp.asarray(x), jnp.asarray(y))


def numpy_loss_and_grad(params, x, y):
  """Mean cross-entropy of the MLP and its gradient, by hand."""
  w1, b1 = (np.asarray(params["Dense_0"][k]) for k in ("kernel", "bias"))
  w2, b2 = (np.asarray(params["Dense_1"][k]) for k in ("kernel", "bias"))
  h = np.tanh(x @ w1 + b1)
  z = h @ w2 + b2
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  size = len(y)
  loss = -np.mean(np.log(p[np.arange(size), y]))
  dz = (p - np.eye(3)[y]) / size
  da = (dz @ w2.T) * (1 - h ** 2)
  grads = {"Dense_0": {"kernel": x.T @ da, "bias": da.sum(0)},
           "Dense_1": {"kernel": h.T @ dz, "bias": dz.sum(0)}}
  return loss, grads


def _np_tree(f, *trees):
  return {layer: {k: f(*(t[layer][k] for t in trees)) for k in trees[0][layer]}
          for layer in trees[0]}


def numpy_asam(params, x, y, rho, eta):
  """(L(θ), L(θ + ε), ∇L(θ + ε), ε) with ε = ρ T² g / ‖T g‖, T = |θ| + η."""
  params = _np_tree(np.asarray, params)
  loss, g = numpy_loss_and_grad(params, x, y)
  t = _np_tree(lambda p: np.abs(p) + eta, params)
  norm = np.sqrt(sum(np.sum((t[l][k] * g[l][k]) ** 2)
                     for l in g for k in g[l]))
  eps = _np_tree(lambda t_, g_: rho * t_ ** 2 * g_ / norm, t, g)
  perturbed = _np_tree(np.add, params, eps)
  perturbed_loss, perturbed_grad = numpy_loss_and_grad(perturbed, x, y)
  return loss, perturbed_loss, perturbed_grad, eps


def test_asam_update_equals_the_hand_computation(x64):
  loss_fn, params, (x, y) = two_layer_problem(0)
  rho = 0.5
  loss, perturbed_loss, expected, eps = numpy_asam(
      params, np.asarray(x), np.asarray(y), rho, ETA)
  grad_fn = gnp.penalties.sam(loss_fn, rho=rho, adaptive=True, eta=ETA)
  (objective, _), grads, stats = jax.jit(grad_fn.with_stats)(
      params, (x, y), None)
  np.testing.assert_allclose(flat(grads), flat(expected), rtol=1e-10,
                             atol=1e-14)
  np.testing.assert_allclose(objective, perturbed_loss, rtol=1e-12)
  np.testing.assert_allclose(stats["task_loss"], loss, rtol=1e-12)
  np.testing.assert_allclose(stats["penalty"], perturbed_loss - loss,
                             rtol=1e-9)
  # The adaptive perturbation is not SAM's: its bias entries, where |θ| is
  # small, move far less relative to the kernels'.
  _, sam_grads = jax.jit(gnp.penalties.sam(loss_fn, rho=rho))(
      params, (x, y), None)
  assert not np.allclose(flat(sam_grads), flat(grads), rtol=1e-3)
  # ‖T⁻¹ε‖ = ρ: the perturbation lies on the ellipsoid's boundary.
  t_inv_eps = _np_tree(lambda e, p: e / (np.abs(np.asarray(p)) + ETA), eps,
                       params)
  np.testing.assert_allclose(np.linalg.norm(flat(t_inv_eps)), rho, rtol=1e-12)


def test_gnp_with_alpha_one_is_asam(x64):
  loss_fn, params, batch = two_layer_problem(2)
  _, sam_grads = jax.jit(gnp.penalties.sam(loss_fn, rho=0.3, adaptive=True))(
      params, batch, None)
  _, gnp_grads = jax.jit(gnp.penalties.gradient_norm(
      loss_fn, r=0.3, alpha=1.0, adaptive=True))(params, batch, None)
  np.testing.assert_allclose(flat(gnp_grads), flat(sam_grads), rtol=1e-12)


# --- GNP in the adaptive geometry ------------------------------------------


def adaptive_objective(loss_fn, params, batch, lam, eta):
  """(θ -> L(θ) + λ‖T ⊙ ∇L(θ)‖ with T = |θ| + η held constant, flat θ)."""
  theta, unravel = ravel_pytree(params)
  mean_loss = lambda t: jnp.mean(loss_fn(unravel(t), batch, None)[0])

  def objective(t):
    scale = jax.lax.stop_gradient(jnp.abs(t) + eta)
    return mean_loss(t) + lam * jnp.linalg.norm(scale * jax.grad(mean_loss)(t))

  return objective, mean_loss, theta


def test_exact_adaptive_gnp_is_the_gradient_of_the_adaptive_norm(x64):
  loss_fn, params, batch = tiny_problem(0)
  r, alpha, eta = 0.05, 0.7, 0.1
  objective, mean_loss, theta = adaptive_objective(
      loss_fn, params, batch, alpha * r, eta)
  grad_fn = gnp.penalties.gradient_norm(loss_fn, r=r, alpha=alpha, exact=True,
                                        adaptive=True, eta=eta)
  (loss, _), grads, stats = jax.jit(grad_fn.with_stats)(params, batch, None)
  value, expected = jax.jit(jax.value_and_grad(objective))(theta)
  np.testing.assert_allclose(loss, value, rtol=1e-12)
  np.testing.assert_allclose(flat(grads), expected, rtol=1e-9, atol=1e-12)
  g = jax.jit(jax.grad(mean_loss))(theta)
  np.testing.assert_allclose(stats["penalty"],
                             jnp.linalg.norm((jnp.abs(theta) + eta) * g),
                             rtol=1e-12)
  np.testing.assert_allclose(stats["grad_norm"], jnp.linalg.norm(g),
                             rtol=1e-12)


def test_adaptive_finite_difference_converges_to_exact(x64):
  """λ = αr fixed, r → 0: ‖FD − exact‖ = O(r), a log-log slope of ~1."""
  loss_fn, params, batch = tiny_problem(1)
  lam, eta = 0.05, 0.05
  exact = jax.jit(gnp.penalties.gradient_norm(
      loss_fn, r=lam, alpha=1.0, exact=True, adaptive=True, eta=eta))
  (exact_loss, _), exact_grads = exact(params, batch, None)
  exact_grads = flat(exact_grads)
  fd = jax.jit(lambda r: gnp.penalties.gradient_norm(
      loss_fn, r=r, alpha=lam / r, adaptive=True, eta=eta)(
          params, batch, None))
  radii = np.array([4e-2, 2e-2, 1e-2, 5e-3, 2.5e-3])
  errors = []
  for r in radii:
    (loss, _), grads = fd(r)
    errors.append(float(jnp.linalg.norm(flat(grads) - exact_grads)))
  errors = np.array(errors)
  assert np.all(np.diff(errors) < 0), errors
  slope = np.polyfit(np.log(radii), np.log(errors), 1)[0]
  assert 0.85 < slope < 1.15, (slope, errors)
  # The objective is the same for both: L + λ‖T ⊙ ∇L‖.
  np.testing.assert_allclose(loss, exact_loss, rtol=1e-12)


# --- Edge cases --------------------------------------------------------------


def _factories():
  # SAM's path is finite-difference GNP's (`perturbed_gradients`); the exact
  # update takes its direction separately.
  return {
      "sam": lambda f, eta: gnp.penalties.sam(f, rho=0.5, adaptive=True,
                                              eta=eta),
      "gnp_exact": lambda f, eta: gnp.penalties.gradient_norm(
          f, r=0.1, alpha=0.8, exact=True, adaptive=True, eta=eta),
  }


def test_zero_scaled_gradient_is_no_perturbation():
  """‖T ⊙ g‖ = 0 with g ≠ 0 (θ = 0, η = 0): ε = 0, the plain gradient."""
  loss_fn, params, batch = tiny_problem(0)
  params = jax.tree.map(jnp.zeros_like, params)
  (plain_loss, _), plain = jax.jit(gnp.penalties.plain(loss_fn))(
      params, batch, None)
  assert float(otu_norm(plain)) > 0
  for make in _factories().values():
    grad_fn = make(loss_fn, 0.0)
    (loss, _), grads, stats = jax.jit(grad_fn.with_stats)(params, batch, None)
    for leaf in jax.tree.leaves((loss, grads, stats)):
      assert np.all(np.isfinite(leaf)), grad_fn
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 grads, plain)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    assert float(stats["penalty"]) == 0.0


def test_zero_gradient_gives_a_finite_zero_update():
  """g = 0 (a minimum of the loss): no perturbation, update 0, no NaN."""
  model = nn.Dense(1)
  x = jnp.ones((4, 2))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(jnp.zeros_like, params)
  loss_fn = lambda p, b, k: ((model.apply({"params": p}, b)[:, 0]) ** 2, None)
  for make in _factories().values():
    (loss, _), grads, stats = jax.jit(make(loss_fn, ETA).with_stats)(
        params, x, None)
    for leaf in jax.tree.leaves((loss, grads, stats)):
      assert np.all(np.isfinite(leaf))
    assert float(otu_norm(grads)) == 0.0 and float(loss) == 0.0


def otu_norm(tree):
  return optax.tree_utils.tree_norm(tree)


def test_a_large_eta_does_not_overflow_the_perturbation_away():
  """η = 1e30 in float32: T ⊙ g overflows if not rescaled; ε ≈ ρη ĝ."""
  loss_fn, params, batch = tiny_problem(0)
  grads = gnp.penalties.gradient_norm(loss_fn, r=1.0, alpha=1.0,
                                      adaptive=True, eta=1e30)
  (loss, _), _, stats = jax.jit(grads.with_stats)(params, batch, None)
  # θ + 1e30 ĝ: the perturbed loss is astronomically large, not L(θ).
  assert not np.isclose(float(stats["perturbed_loss"]),
                        float(stats["task_loss"]), rtol=1e-3)


def test_adaptive_false_changes_nothing():
  """The default and adaptive=False (any η) compile to the same program."""
  loss_fn, params, batch = tiny_problem(1)
  for make in (
      lambda **kw: gnp.penalties.sam(loss_fn, rho=0.05, **kw),
      lambda **kw: gnp.penalties.gradient_norm(loss_fn, r=0.05, alpha=0.8,
                                               **kw),
      lambda **kw: gnp.penalties.gradient_norm(loss_fn, r=0.05, alpha=0.8,
                                               exact=True, **kw),
  ):
    default = jax.make_jaxpr(make().with_stats)(params, batch, None)
    explicit = jax.make_jaxpr(make(adaptive=False, eta=0.7).with_stats)(
        params, batch, None)
    assert str(default) == str(explicit)
    adaptive = jax.make_jaxpr(make(adaptive=True).with_stats)(
        params, batch, None)
    assert str(default) != str(adaptive)


def test_group_size_perturbs_each_group_adaptively(x64):
  loss_fn, params, batch = tiny_problem(3, batch_size=12)
  make = lambda **kw: gnp.penalties.gradient_norm(
      loss_fn, r=0.1, alpha=0.6, adaptive=True, **kw)
  (loss, _), grads, stats = jax.jit(make(group_size=4).with_stats)(
      params, batch, None)
  one_group = jax.jit(make().with_stats)
  per_group = [one_group(params, jax.tree.map(lambda a: a[i:i + 4], batch),
                         None) for i in (0, 4, 8)]
  np.testing.assert_allclose(
      flat(grads), np.mean([flat(g) for _, g, _ in per_group], axis=0),
      rtol=1e-12)
  np.testing.assert_allclose(
      loss, np.mean([l for (l, _), _, _ in per_group]), rtol=1e-12)
  np.testing.assert_allclose(
      stats["penalty"], np.mean([s["penalty"] for _, _, s in per_group]),
      rtol=1e-12)
  _, whole = jax.jit(make())(params, batch, None)
  assert not np.allclose(flat(whole), flat(grads), rtol=1e-4)


def test_the_perturbed_loss_is_invariant_to_rescaling_relu_layers(x64):
  """With η = 0, rescaling layer 1 (kernel and bias) by a and layer 2's kernel
  by 1/a leaves L unchanged, and ASAM's L(θ + ε) too — because T scales the
  biases as well; SAM's perturbed loss changes."""
  model = MLP((6, 3))  # ReLU
  x = jax.random.normal(jax.random.key(0), (8, 4))
  y = jnp.arange(8) % 3
  params = jax.tree.map(lambda p: p.astype(jnp.float64),
                        model.init(jax.random.key(1), x)["params"])
  loss_fn = lambda p, b, k: (optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, b[0]), b[1]), None)
  a = 3.0
  scaled = {"Dense_0": jax.tree.map(lambda p: a * p, params["Dense_0"]),
            "Dense_1": {"kernel": params["Dense_1"]["kernel"] / a,
                        "bias": params["Dense_1"]["bias"]}}

  grad_fns = {adaptive: jax.jit(gnp.penalties.sam(
      loss_fn, rho=0.5, adaptive=adaptive, eta=0.0))
              for adaptive in (False, True)}
  perturbed_loss = lambda p, adaptive: float(
      grad_fns[adaptive](p, (x, y), None)[0][0])

  np.testing.assert_allclose(perturbed_loss(scaled, True),
                             perturbed_loss(params, True), rtol=1e-10)
  assert not np.isclose(perturbed_loss(scaled, False),
                        perturbed_loss(params, False), rtol=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    ({"adaptive": 1}, "adaptive must be True or False"),
    ({"adaptive": True, "eta": -0.1}, "eta must be non-negative"),
    ({"adaptive": True, "eta": float("nan")}, "eta must be non-negative"),
    ({"adaptive": True, "eta": float("inf")}, "eta must be finite"),
])
def test_bad_adaptive_arguments_raise(kwargs, message):
  loss_fn = lambda p, b, k: (b @ p, None)
  for make in (lambda: gnp.penalties.sam(loss_fn, rho=0.1, **kwargs),
               lambda: gnp.penalties.gradient_norm(loss_fn, r=0.1, alpha=0.5,
                                                   **kwargs)):
    with pytest.raises(ValueError, match=message):
      make()


def test_normalize_first_and_adaptive_are_refused_together():
  with pytest.raises(ValueError, match="normalize_first"):
    gnp.penalties.gradient_norm(lambda p, b, k: (b @ p, None), r=0.1,
                                alpha=0.5, normalize_first=True,
                                adaptive=True)


def test_traced_rho_does_not_recompile_with_adaptive():
  loss_fn, params, batch = tiny_problem(4)

  @jax.jit
  def step(params, rho):
    return gnp.penalties.sam(loss_fn, rho=rho, adaptive=True)(
        params, batch, None)

  first = step(params, jnp.float32(0.5))
  second = step(params, jnp.float32(1.0))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert not np.allclose(flat(first[1]), flat(second[1]))


def test_split_perturbation_is_a_no_op_without_narrow_layers(x64):
  """The split path (`precision`) carries the adaptive perturbation too."""
  loss_fn, params, batch = tiny_problem(5)
  make = lambda **kw: gnp.penalties.sam(loss_fn, rho=0.5, adaptive=True, **kw)
  plain = jax.jit(make())(params, batch, None)
  split = jax.jit(make(split_perturbation=True))(params, batch, None)
  np.testing.assert_allclose(flat(split[1]), flat(plain[1]), rtol=1e-12)
