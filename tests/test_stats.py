"""Every statistic a regulariser or the train step reports, against its
written-out definition.

Each reference is computed here, independently of gnp: gradients by
`jax.grad` of a mean written out in the test, norms by `jnp.linalg.norm` of
the flattened tree, per-example norms by a Python loop over examples,
perturbations by hand, Hessians by `jax.hessian`. The penalties run in
float64, so a tolerance of 1e-10 separates a wrong reduction (an RMS for a
mean, one group's value for the mean over groups) from rounding.

Data and parameters come from numpy and every reference is jitted: JAX run op
by op compiles every operation on its own, which took most of this file's
time.
"""

import functools
import itertools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import gnp
from gnp import data
from gnp import train
from tests.helpers import tiny_mnist1d

RTOL = 1e-10


def _close(actual, expected, rtol=RTOL, atol=0.0, err_msg=""):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             rtol=rtol, atol=atol, err_msg=err_msg)


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _norm(tree):
  return jnp.linalg.norm(_flat(tree))


def _check_stats(stats, expected):
  """The documented keys, no more and no fewer, each its expected value."""
  assert set(stats) == set(expected)
  for name, value in expected.items():
    assert jnp.shape(stats[name]) == (), name
    _close(stats[name], value, err_msg=name)


def _with_stats(grad_fn, params, batch, key=None):
  # Jitted: one compilation costs less than running the method op by op.
  return jax.jit(grad_fn.with_stats)(params, batch, key)


# --- A smooth problem on a two-leaf tree (plain, GNP, SAM) ------------------


def _smooth_loss(params, batch, key):
  del key
  x, y = batch
  out = jnp.tanh(x @ params["w"] + params["b"])
  return jnp.sum((out - y) ** 2, axis=-1), None


def _mean_loss(params, batch):
  return jnp.mean(_smooth_loss(params, batch, None)[0])


def _smooth_problem(batch_size=6):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
  batch = (rng.normal(size=(batch_size, 3)), rng.normal(size=(batch_size, 2)))
  return params, batch


def _perturbed(params, batch, radius):
  """(g, ‖g‖, θ + radius g/‖g‖), by hand."""
  g = jax.grad(_mean_loss)(params, batch)
  g_norm = _norm(g)
  return g, g_norm, jax.tree.map(lambda p, gi: p + radius * gi / g_norm,
                                 params, g)


def _gnp_reference(params, batch, r, alpha, exact):
  g, g_norm, perturbed = _perturbed(params, batch, r)
  task_loss = _mean_loss(params, batch)
  stats = {"task_loss": task_loss, "penalty": g_norm, "grad_norm": g_norm}
  if exact:
    theta, unravel = jax.flatten_util.ravel_pytree(params)
    hessian = jax.hessian(lambda t: _mean_loss(unravel(t), batch))(theta)
    update = unravel(_flat(g) + alpha * r * hessian @ (_flat(g) / g_norm))
  else:
    stats["perturbed_loss"] = _mean_loss(perturbed, batch)
    g_perturbed = jax.grad(_mean_loss)(perturbed, batch)
    update = jax.tree.map(lambda a, b: (1 - alpha) * a + alpha * b,
                          g, g_perturbed)
  return {"loss": task_loss + alpha * r * g_norm, "stats": stats,
          "grads": update}


def _sam_reference(params, batch, rho):
  _, g_norm, perturbed = _perturbed(params, batch, rho)
  task_loss = _mean_loss(params, batch)
  perturbed_loss = _mean_loss(perturbed, batch)
  return {"loss": perturbed_loss,
          "stats": {"task_loss": task_loss,
                    "penalty": perturbed_loss - task_loss,
                    "grad_norm": g_norm},
          "grads": jax.grad(_mean_loss)(perturbed, batch)}


def _grouped(reference, params, batch, group_size, **kwargs):
  """`reference` on the whole batch, or its mean over a loop over groups."""
  reference = jax.jit(functools.partial(reference, **kwargs))
  size = len(batch[0])
  step = size if group_size is None else group_size
  per_group = [jax.device_get(reference(params,
                                        tuple(a[j:j + step] for a in batch)))
               for j in range(0, size, step)]
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *per_group)


def _check_against(grad_fn, params, batch, expected):
  (loss, _), grads, stats = _with_stats(grad_fn, params, batch)
  _check_stats(stats, expected["stats"])
  _close(loss, expected["loss"])
  assert jax.tree.structure(grads) == jax.tree.structure(expected["grads"])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected["grads"])):
    _close(a, b, atol=1e-13)


def test_plain_stats(x64):
  params, batch = _smooth_problem()
  task_loss, g = jax.jit(jax.value_and_grad(_mean_loss))(params, batch)
  _check_against(
      gnp.penalties.plain(_smooth_loss), params, batch,
      {"loss": task_loss, "grads": g,
       "stats": {"task_loss": task_loss, "penalty": 0.0,
                 "grad_norm": np.linalg.norm(jax.device_get(_flat(g)))}})


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("exact", [False, True])
def test_gradient_norm_stats(exact, group_size, x64):
  params, batch = _smooth_problem()
  r, alpha = 0.3, 0.7
  grad_fn = gnp.penalties.gradient_norm(_smooth_loss, r=r, alpha=alpha,
                                        exact=exact, group_size=group_size)
  expected = _grouped(_gnp_reference, params, batch, group_size, r=r,
                      alpha=alpha, exact=exact)
  if group_size is not None:
    # The mean over groups of ‖∇L_j‖ is not ‖∇L‖ of the whole batch, so this
    # case tells a per-group statistic from a whole-batch one.
    whole = _grouped(_gnp_reference, params, batch, None, r=r, alpha=alpha,
                     exact=exact)
    assert abs(whole["stats"]["grad_norm"]
               - expected["stats"]["grad_norm"]) > 1e-2
  _check_against(grad_fn, params, batch, expected)


@pytest.mark.parametrize("group_size", [None, 2])
def test_sam_stats(group_size, x64):
  params, batch = _smooth_problem()
  rho = 0.4
  grad_fn = gnp.penalties.sam(_smooth_loss, rho=rho, group_size=group_size)
  expected = _grouped(_sam_reference, params, batch, group_size, rho=rho)
  assert abs(expected["stats"]["penalty"]) > 1e-2  # The sharpness is not ~0.
  _check_against(grad_fn, params, batch, expected)


# --- GNVR and GVR on a Flax MLP --------------------------------------------


def _mlp_problem(batch_size):
  """A ReLU MLP 5→4→3 in float64; the examples' gradients differ widely."""
  model = gnp.models.MLP((4, 3))
  rng = np.random.default_rng(0)
  # Inputs on scales from 0.1 to 30: per-example gradient norms spread out.
  scales = np.logspace(-1, 1.5, batch_size)[:, None]
  x = rng.normal(size=(batch_size, 5)) * scales
  y = rng.integers(0, 3, size=batch_size)
  # Flax's Dense layout: kernel [in, out], bias [out].
  params = {f"Dense_{i}": {"kernel": rng.normal(size=(m, n)) / math.sqrt(m),
                           "bias": 0.1 * rng.normal(size=(n,))}
            for i, (m, n) in enumerate([(5, 4), (4, 3)])}

  def loss_fn(params, batch, key):
    del key
    inputs, labels = batch
    logits = model.apply({"params": params}, inputs)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0], None

  return loss_fn, params, (x, y)


@functools.cache
def _gnvr_reference():
  """(per-example norms ‖∇ℓ_i‖ by a loop over examples, L, ‖∇L‖)."""
  loss_fn, params, batch = _mlp_problem(6)
  with jax.enable_x64(True):

    @jax.jit
    def example_grad_norm(example):
      return _norm(jax.grad(lambda p: loss_fn(p, example, None)[0][0])(params))

    norms = [float(example_grad_norm(tuple(a[i:i + 1] for a in batch)))
             for i in range(len(batch[0]))]
    mean_loss = lambda p: jnp.mean(loss_fn(p, batch, None)[0])
    task_loss, g = jax.jit(jax.value_and_grad(mean_loss))(params)
    return norms, float(task_loss), float(np.linalg.norm(_flat(g)))


@pytest.mark.parametrize("method, ddof",
                         [("ghost", 1), ("vmap", 1), ("ghost", 0)])
def test_gradient_norm_variance_stats(method, ddof, x64):
  lam = 0.3
  loss_fn, params, batch = _mlp_problem(6)
  norms, task_loss, grad_norm = _gnvr_reference()
  size = len(norms)
  mean_norm = sum(norms) / size
  rms_norm = math.sqrt(sum(n ** 2 for n in norms) / size)
  # The mean and the RMS of the norms differ far beyond the tolerance.
  assert rms_norm > 1.2 * mean_norm, norms
  variance = sum((n - mean_norm) ** 2 for n in norms) / (size - ddof)

  grad_fn = gnp.penalties.gradient_norm_variance(loss_fn, lam=lam, ddof=ddof,
                                                 method=method)
  (loss, _), _, stats = _with_stats(grad_fn, params, batch)
  _check_stats(stats, {"task_loss": task_loss, "penalty": variance,
                       "grad_norm": grad_norm,
                       "mean_example_grad_norm": mean_norm})
  _close(loss, task_loss + lam * variance)


def _views(batch, key):
  # Deterministic, so the test can rebuild both views.
  del key
  x, y = batch
  return (1.3 * x + 0.2, y), (x[:, ::-1] - 0.1, y)


@pytest.mark.parametrize("wrt, selected", [
    (None, ("Dense_1/bias", "Dense_1/kernel")),  # The last layer.
    ("Dense_0/kernel", ("Dense_0/kernel",)),
])
def test_view_consistency_stats(wrt, selected, x64):
  loss_fn, params, batch = _mlp_problem(batch_size=4)
  alpha = 0.7
  first, second = _views(batch, None)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b: jnp.mean(loss_fn(p, b, None)[0])))
  loss1, g1 = jax.device_get(value_and_grad(params, first))
  loss2, g2 = jax.device_get(value_and_grad(params, second))
  penalty = sum(np.sum((g1[layer][name] - g2[layer][name]) ** 2)
                for layer, name in (path.split("/") for path in selected))
  assert abs(loss1 - loss2) > 1e-2  # The two views' losses tell apart.

  grad_fn = gnp.penalties.view_consistency(loss_fn, alpha=alpha, views=_views,
                                           wrt=wrt)
  (loss, _), _, stats = _with_stats(grad_fn, params, batch, jax.random.key(3))
  _check_stats(stats, {"task_loss": (loss1 + loss2) / 2, "penalty": penalty,
                       "view1_loss": loss1, "view2_loss": loss2})
  _close(loss, loss1 + loss2 + alpha * penalty)


# --- Hessian Frobenius norm ------------------------------------------------
# hessian_frobenius draws its probes from its key in a way its docstring does
# not fix, so the tests do not redraw them. Either every Rademacher probe gives
# the same ‖H v‖², or the probes' second moment S = mean_k v_k v_kᵀ is read off
# from quadratic losses ½θᵀMθ, whose penalty is tr(M² S), with the same key
# and parameter shapes (so the same probes); S then predicts the penalty
# mean_k ‖H v_k‖² = tr(H² S) of any other loss.


def _hessian_params():
  rng = np.random.default_rng(1)
  return {"a": rng.normal(size=(3,)), "b": rng.normal(size=(2, 2))}  # n = 7


def _quadratic_loss(params, batch, key):
  """ℓ_i = ½ s_i θᵀ M θ + z_i·θ with M the batch's (shared) matrix."""
  del key
  matrices, scales, shifts = batch
  theta = _flat(params)
  return (0.5 * scales * jnp.einsum("i,bij,j->b", theta, matrices, theta)
          + shifts @ theta), None


def _quadratic_batch(matrix):
  # Scales with mean 1, so that the mean loss has Hessian exactly `matrix`.
  n = matrix.shape[0]
  shifts = np.linspace(-1.0, 1.0, 2 * n).reshape(2, n)
  return jnp.stack([matrix, matrix]), np.array([0.5, 1.5]), shifts


@pytest.mark.parametrize("num_probes", [1, 4])
def test_hessian_penalty_when_every_probe_gives_the_same_norm(num_probes, x64):
  # H = c R with R a Householder reflection (symmetric, orthogonal, dense):
  # ‖H v‖² = c² ‖v‖² = c² n for every sign vector v.
  params = _hessian_params()
  theta = np.concatenate([params["a"], params["b"].ravel()])
  n = theta.size
  u = np.random.default_rng(2).normal(size=n)
  c = 1.7
  hessian = c * (np.eye(n) - 2 * np.outer(u, u) / (u @ u))
  batch = _quadratic_batch(hessian)
  _, scales, shifts = batch
  task_loss = np.mean(0.5 * scales * (theta @ hessian @ theta) + shifts @ theta)
  g = hessian @ theta + shifts.mean(axis=0)
  lam = 0.2
  grad_fn = gnp.penalties.hessian_frobenius(_quadratic_loss, lam=lam,
                                            num_probes=num_probes)
  (loss, _), _, stats = _with_stats(grad_fn, params, batch, jax.random.key(5))
  _check_stats(stats, {"task_loss": task_loss, "penalty": c ** 2 * n,
                       "grad_norm": np.linalg.norm(g)})
  _close(loss, task_loss + lam * c ** 2 * n)


def _nonlinear_loss(params, batch, key):
  del key
  x = batch
  a, b = params["a"], params["b"]
  hidden = jnp.tanh(x[:, :2] @ b + a[:2] * x[:, 2:3])
  return (jnp.sin(hidden @ a[1:] + a[0] * x[:, 0])
          + jnp.sum(hidden ** 2, axis=-1)), None


def test_hessian_penalty_is_hutchinson_with_the_same_probes(x64):
  num_probes, lam = 3, 0.1
  params = _hessian_params()
  n = sum(x.size for x in params.values())
  key = jax.random.key(7)
  grad_fn = gnp.penalties.hessian_frobenius(_quadratic_loss, lam=lam,
                                            num_probes=num_probes)
  penalty_of = jax.jit(jax.vmap(
      lambda m: grad_fn.with_stats(params, _quadratic_batch(m), key)[2][
          "penalty"]))
  # M = u uᵀ gives M² = ‖u‖² u uᵀ, so the penalty is ‖u‖² uᵀ S u: u = e_i
  # gives S_ii, u = e_i + e_j gives 2 (S_ii + S_jj + 2 S_ij).
  eye = np.eye(n)
  pairs = list(itertools.combinations(range(n), 2))
  us = np.concatenate([eye, [eye[i] + eye[j] for i, j in pairs]])
  penalties = np.asarray(penalty_of(np.einsum("ki,kj->kij", us, us)))
  moment = np.diag(penalties[:n])
  for (i, j), value in zip(pairs, penalties[n:]):
    moment[i, j] = moment[j, i] = (value / 2 - moment[i, i] - moment[j, j]) / 2
  # Rademacher probes: a unit diagonal, off-diagonal entries in steps of 2/K,
  # and K distinct probes (for this key) average to entries other than ±1.
  _close(np.diag(moment), np.ones(n))
  counts = num_probes * (moment + 1) / 2
  _close(counts, np.round(counts), atol=1e-9)
  assert not np.allclose(np.abs(moment), 1)

  x = np.random.default_rng(3).normal(size=(5, 3))
  theta, unravel = jax.flatten_util.ravel_pytree(params)
  mean_loss = lambda t: jnp.mean(_nonlinear_loss(unravel(t), x, None)[0])
  task_loss, g, hessian = jax.device_get(jax.jit(
      lambda t: (mean_loss(t), jax.grad(mean_loss)(t),
                 jax.hessian(mean_loss)(t)))(theta))
  penalty = np.trace(hessian @ hessian @ moment)
  grad_fn = gnp.penalties.hessian_frobenius(_nonlinear_loss, lam=lam,
                                            num_probes=num_probes)
  (loss, _), _, stats = _with_stats(grad_fn, params, x, key)
  _check_stats(stats, {"task_loss": task_loss, "penalty": penalty,
                       "grad_norm": np.linalg.norm(g)})
  _close(loss, task_loss + lam * penalty)


# --- The train step's metrics ----------------------------------------------


@pytest.fixture(scope="module")
def mnist1d():
  config = tiny_mnist1d()
  return data.load(config.dataset, seed=train.data_seed(config))


def _experiment(dataset, **overrides):
  config = tiny_mnist1d(**{
      "method": "plain", "model.hidden": (16,), "num_epochs": 1,
      "optimizer.name": "sgd", "optimizer.momentum": 0.0,
      "optimizer.weight_decay": 0.0, "optimizer.learning_rate": 0.5,
      **overrides})
  return train.create_experiment(config, dataset=dataset)


@functools.partial(jax.jit, static_argnums=0)
def _sgd_step_quantities(model, params, x, y, l2, learning_rate):
  def cross_entropies(p):
    logits = model.apply({"params": p}, x)
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - true, logits

  def loss(p):
    kernels = [w for w in jax.tree.leaves(p) if w.ndim > 1]
    l2_term = 0.5 * l2 * sum(jnp.sum(w ** 2) for w in kernels)
    return jnp.mean(cross_entropies(p)[0]) + l2_term

  ce, logits = cross_entropies(params)
  g = jax.grad(loss)(params)
  new_params = jax.tree.map(lambda a, b: a - learning_rate * b, params, g)
  return {"loss": loss(params), "cross_entropy": jnp.mean(ce),
          "accuracy": jnp.mean(jnp.argmax(logits, axis=1) == y),
          "grad_norm": _norm(g), "objective_grad_norm": _norm(g),
          "update_norm": learning_rate * _norm(g),
          "param_norm": _norm(new_params)}


def _reference_step(exp, params, batch, l2, learning_rate):
  """One SGD step's quantities in float64 from `exp.model.apply`, by hand."""
  x, y = jax.device_get(batch)
  x = np.asarray(exp.dataset.preprocess(x), np.float64)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        jax.device_get(params))
  with jax.enable_x64(True):
    expected = jax.device_get(_sgd_step_quantities(
        exp.model, params, x, np.asarray(y), np.float64(l2),
        np.float64(learning_rate)))
  # Plain's objective is its task loss, and it has no penalty.
  return {**expected, "objective": expected["loss"],
          "learning_rate": learning_rate, "penalty": 0.0}


def _check_metrics(metrics, expected):
  for name, value in expected.items():
    # The step runs in float32.
    np.testing.assert_allclose(metrics[name], value, rtol=2e-6, atol=1e-7,
                               err_msg=name)


def test_train_step_metrics_are_their_definitions(mnist1d):
  # A cosine schedule over one short epoch: the rate changes every step.
  exp = _experiment(mnist1d, **{"optimizer.schedule": "cosine"})
  total_steps = exp.config.num_epochs * exp.steps_per_epoch
  peak = 0.5
  state = exp.init()
  for step in range(2):
    batch = exp.train_batch(step)
    learning_rate = peak * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    # Before the step, which donates `state`.
    expected = _reference_step(exp, state.params, batch, l2=0.0,
                               learning_rate=learning_rate)
    assert expected["accuracy"] > 0
    assert expected["loss"] == expected["cross_entropy"]
    state, metrics = exp.step(state, batch)
    _check_metrics(metrics, expected)
    np.testing.assert_allclose(metrics["param_norm"], _norm(state.params),
                               rtol=2e-6)
  assert learning_rate < 0.99 * peak  # Step 1 is off the peak.


def test_train_step_loss_includes_l2_and_cross_entropy_does_not(mnist1d):
  l2 = 0.05
  exp = _experiment(mnist1d, **{"optimizer.l2": l2})
  state = exp.init()
  batch = exp.train_batch(0)
  expected = _reference_step(exp, state.params, batch, l2=l2,
                             learning_rate=0.5)
  # The L2 term is large against the tolerance.
  assert expected["loss"] - expected["cross_entropy"] > 0.05
  _, metrics = exp.step(state, batch)
  _check_metrics(metrics, expected)
