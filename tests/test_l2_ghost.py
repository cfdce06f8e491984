"""An L2 term declared with `penalties.with_l2` keeps ghost norms exact.

References: every example's full gradient ∇(ℓ_i + ½ l2 ‖θ_K‖²), one example
at a time with the term written out by hand, in float64; GNVR's gradient
differentiates the same loop. The ghost path must equal it and the vmap
path, for the MLP and the CNN of `gnp.models`.
"""

import functools
import importlib
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gnp
from gnp import data
from gnp import train
from gnp.models import CNN
from gnp.models import MLP
from gnp.penalties import ghost
from tests.helpers import tiny_mnist1d

# The module, not the function `gnp.penalties` exports under the same name.
gnvr = importlib.import_module("gnp.penalties.gradient_norm_variance")

L2 = 0.3
LAM = 0.5
MODELS = {
    "mlp": (MLP((5, 4, 3), activation=jnp.tanh), (3,)),
    "cnn": (CNN((2,), num_classes=3, activation=jnp.tanh), (4, 4, 2)),
}
KERNELS = lambda params: jax.tree.map(lambda w: w.ndim > 1, params)
# For the MLP: kernel and bias, kernel alone, bias alone in K, layer by layer.
MIXED = {"Dense_0": {"bias": True, "kernel": True},
         "Dense_1": {"bias": False, "kernel": True},
         "Dense_2": {"bias": True, "kernel": False}}
FALLBACK = "using per-example gradients (vmap)"
# Tiny programs: compiling them dominates, and optimising them is not needed.
jit = lambda f: jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def model_functions(name, mask):
  """(plain loss_fn, example_loss): the per-example cross-entropies, and
  one example's full loss ℓ_i + ½ l2 ‖θ_K‖² with the term written out by
  hand (K: the kernels, or `MIXED`'s leaves). A label -1 gives the loss 0."""
  model = MODELS[name][0]

  def cross_entropy(p, inputs, labels):
    logits = model.apply({"params": p}, inputs)
    true = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], 1)
    return jnp.where(labels < 0, 0.0,
                     jax.nn.logsumexp(logits, axis=1) - true[:, 0])

  def loss_fn(p, batch, key):
    del key
    return cross_entropy(p, *batch), None

  def example_loss(p, x_i, y_i, l2):
    if mask == "kernels":
      weights = [w for w in jax.tree.leaves(p) if w.ndim > 1]
    else:
      weights = [p[layer][name] for layer, names in MIXED.items()
                 for name, used in names.items() if used]
    return (cross_entropy(p, x_i[None], y_i[None])[0]
            + 0.5 * l2 * sum(jnp.sum(w * w) for w in weights))

  return loss_fn, example_loss


@functools.lru_cache
def compiled(name, mask="kernels"):
  """Each path and reference as a function of (params, batch, l2), compiled
  once per model, so that the cases below share the programs."""
  loss_fn, example_loss = model_functions(name, mask)
  regularised = lambda l2: gnp.penalties.with_l2(
      loss_fn, l2, mask=KERNELS if mask == "kernels" else MIXED)
  _, unravel = ravel_pytree(problem(name)[0])

  def norms(method):
    return jit(lambda p, b, l2: gnvr.PER_EXAMPLE_NORMS[method](
        regularised(l2), p, b, None))

  def gnvr_grads(method):
    return jit(lambda p, b, l2: ravel_pytree(gnp.penalties.gradient_norm_variance(
        regularised(l2), lam=LAM, method=method)(p, b, None)[1])[0])

  def clip_grads(method):
    return jit(lambda p, b, l2, max_norm: ravel_pytree(
        gnp.penalties.per_example_clipping(
            regularised(l2), max_norm=max_norm, method=method)(
                p, b, None)[1])[0])

  one = jit(jax.value_and_grad(
      lambda t, x, y, l2: example_loss(unravel(t), x, y, l2)))

  def example_gradients(params, batch, l2):
    """[B, P] full per-example gradients and [B] losses: a loop."""
    theta = ravel_pytree(params)[0]
    losses, grads = zip(*[one(theta, x, y, l2) for x, y in zip(*batch)])
    return np.stack(grads), np.array(losses)

  @jit
  def gnvr_reference(params, batch, l2):
    """∇ of mean_i ℓ_i + λ Var_i ‖∇ℓ_i‖ over a loop of examples."""

    def objective(t):
      losses = jax.lax.map(lambda e: example_loss(unravel(t), *e, l2), batch)
      norms = jax.lax.map(lambda e: safe_norm(jax.grad(
          lambda s: example_loss(unravel(s), *e, l2))(t)), batch)
      return jnp.mean(losses) + LAM * jnp.var(norms, ddof=1)

    return jax.grad(objective)(ravel_pytree(params)[0])

  return types.SimpleNamespace(
      loss_fn=loss_fn, regularised=regularised,
      norms={m: norms(m) for m in ("ghost", "vmap")},
      gnvr={m: gnvr_grads(m) for m in ("ghost", "vmap")},
      clip={m: clip_grads(m) for m in ("ghost", "vmap")},
      example_gradients=example_gradients, gnvr_reference=gnvr_reference)


def problem(name, *, zero_kernels=False, zero_example=False, batch_size=6):
  """(params, batch) in float64. Biases are drawn nonzero, so that the bias
  terms of ⟨∇ℓ_i, θ_K⟩ count. With ``zero_kernels`` every kernel is 0; with
  ``zero_example`` example 0 has the label -1 and the loss 0: ∇ℓ_0 = 0."""
  model, shape = MODELS[name]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch_size, *shape))
  y = rng.integers(0, 3, size=batch_size)
  if zero_example:
    y[0] = -1
  params = jax.tree.map(
      lambda w: (np.zeros(w.shape) if zero_kernels else np.asarray(w, float))
      if w.ndim > 1 else 0.5 * rng.normal(size=w.shape), initial_params(name))
  return params, (x, y)


@functools.lru_cache
def initial_params(name):
  model, shape = MODELS[name]
  return model.init(jax.random.key(0), np.zeros((1, *shape)))["params"]


def safe_norm(g):
  squared = jnp.sum(g * g)
  return jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1.0)),
                   0.0)


def clip_reference(grads, max_norm):
  """(1/B) Σ_i min(1, τ/n_i) g_i in numpy."""
  norms = np.linalg.norm(grads, axis=1)
  factors = np.where(norms > max_norm, max_norm / np.maximum(norms, 1e-300),
                     1.0)
  return factors @ grads / len(grads)


def assert_close(actual, expected, rtol=1e-9):
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol,
                             atol=rtol * np.max(np.abs(expected)))


@pytest.mark.parametrize("name, mask", [
    ("mlp", "kernels"), ("mlp", "mixed"), ("cnn", "kernels")])
def test_norms_equal_vmap_and_the_loop(name, mask, x64):
  fns = compiled(name, mask)
  params, batch = problem(name)
  grads, losses = fns.example_gradients(params, batch, L2)
  norms = np.linalg.norm(grads, axis=1)
  for method in ("ghost", "vmap"):
    loss, _, got, mean_grad = fns.norms[method](params, batch, L2)
    assert_close(got, norms)
    assert_close(ravel_pytree(mean_grad)[0], grads.mean(axis=0))
    assert_close(loss, losses.mean())
  # The term matters at this size: it moves the norms by percents.
  without = fns.norms["ghost"](params, batch, 0.0)[2]
  assert np.max(np.abs(without - norms) / norms) > 1e-2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gnvr_and_clipping_equal_vmap_and_the_loop(name, x64):
  fns = compiled(name)
  params, batch = problem(name)
  expected = fns.gnvr_reference(params, batch, L2)
  for method in ("ghost", "vmap"):
    assert_close(fns.gnvr[method](params, batch, L2), expected)
  grads, _ = fns.example_gradients(params, batch, L2)
  norms = np.linalg.norm(grads, axis=1)
  max_norm = float(np.median(norms))
  assert 0 < np.sum(norms > max_norm) < len(norms)  # Some clipped, not all.
  # (1/B) Σ_i c_i (∇ℓ_i + l2 θ_K): the L2 part is clipped with its example.
  expected = clip_reference(grads, max_norm)
  for method in ("ghost", "vmap"):
    assert_close(fns.clip[method](params, batch, L2, max_norm), expected)


def test_auto_keeps_the_ghost_path(x64, caplog):
  fns = compiled("cnn")
  params, batch = problem("cnn")
  loss_fn = fns.regularised(L2)
  makers = {
      "gnvr": lambda m: gnp.penalties.gradient_norm_variance(
          loss_fn, lam=LAM, method=m),
      "clip": lambda m: gnp.penalties.per_example_clipping(
          loss_fn, max_norm=1.0, method=m),
  }
  jaxpr = lambda grad_fn: str(jax.make_jaxpr(grad_fn)(params, batch, None))
  with caplog.at_level(logging.WARNING):
    for make in makers.values():
      assert jaxpr(make("auto")) == jaxpr(make("ghost"))
  assert FALLBACK not in caplog.text
  # The same term written into loss_fn is still refused, with the remedy.
  written = lambda p, b, k: (loss_fn.loss_fn(p, b, k)[0] + loss_fn.term(p),
                             None)
  with pytest.raises(ghost.UnsupportedModelError, match="with_l2"):
    ghost.analyze(written, params, batch, None)


def test_l2_zero_is_the_unregularised_loss(x64):
  fns = compiled("mlp")
  params, batch = problem("mlp")
  norms = jit(lambda p, b: gnvr.PER_EXAMPLE_NORMS["ghost"](
      fns.loss_fn, p, b, None))(params, batch)
  for got, expected in zip(fns.norms["ghost"](params, batch, 0.0), norms):
    jax.tree.map(np.testing.assert_array_equal, got, expected)
  grads = jit(lambda p, b: ravel_pytree(gnp.penalties.gradient_norm_variance(
      fns.loss_fn, lam=LAM, method="ghost")(p, b, None)[1])[0])
  np.testing.assert_array_equal(fns.gnvr["ghost"](params, batch, 0.0),
                                grads(params, batch))
  # The training system adds no term at all for optimizer.l2 = 0.
  assert not isinstance(train.make_loss_fn(MODELS["mlp"][0], {}),
                        gnp.penalties.WithL2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_kernels(name, x64):
  """θ_K = 0: the norms are those without the term, but not GNVR's
  gradient, which the cross term's derivative 2 l2 ∇ℓ_i|_K reaches."""
  fns = compiled(name)
  params, batch = problem(name, zero_kernels=True)
  grads, _ = fns.example_gradients(params, batch, L2)
  got = fns.norms["ghost"](params, batch, L2)[2]
  assert_close(got, np.linalg.norm(grads, axis=1))
  assert_close(got, fns.norms["ghost"](params, batch, 0.0)[2])
  expected = fns.gnvr_reference(params, batch, L2)
  assert_close(fns.gnvr["ghost"](params, batch, L2), expected)
  unregularised = fns.gnvr["ghost"](params, batch, 0.0)
  assert np.max(np.abs(unregularised - expected)) > 1e-3 * np.max(
      np.abs(expected))


def test_an_example_with_zero_gradient_has_norm_l2_theta(x64):
  fns = compiled("mlp")
  params, batch = problem("mlp", zero_example=True)
  grads, _ = fns.example_gradients(params, batch, L2)
  kernels = [w for w in jax.tree.leaves(params) if w.ndim > 1]
  by_hand = L2 * np.sqrt(sum(np.sum(np.square(w)) for w in kernels))
  norms = fns.norms["ghost"](params, batch, L2)[2]
  np.testing.assert_allclose(norms[0], by_hand, rtol=1e-12)
  assert_close(norms, np.linalg.norm(grads, axis=1))
  assert_close(fns.gnvr["ghost"](params, batch, L2),
               fns.gnvr_reference(params, batch, L2))
  max_norm = 0.5 * by_hand  # Clips example 0's gradient, l2 θ_K, too.
  assert_close(fns.clip["ghost"](params, batch, L2, max_norm),
               clip_reference(grads, max_norm))


def test_zero_kernels_and_zero_gradient_give_a_zero_norm_and_no_nan(x64):
  fns = compiled("mlp")
  params, batch = problem("mlp", zero_kernels=True, zero_example=True)
  norms = fns.norms["ghost"](params, batch, L2)[2]
  assert norms[0] == 0 and np.all(norms[1:] > 0)
  got = fns.gnvr["ghost"](params, batch, L2)
  assert np.all(np.isfinite(got))
  assert_close(got, fns.gnvr_reference(params, batch, L2))


@pytest.mark.parametrize("l2, mask, message", [
    (-1.0, None, "l2 must be non-negative"),
    (0.1, {"Dense_0": True}, "mask must have the structure of params"),
    (0.1, lambda p: jax.tree.map(lambda w: w.ndim, p), "Python bools"),
])
def test_with_l2_refuses_bad_arguments(l2, mask, message):
  params = {"Dense_0": {"bias": np.zeros(2), "kernel": np.ones((3, 2))}}
  loss_fn = lambda p, b, k: (b @ p["Dense_0"]["kernel"], None)
  with pytest.raises(ValueError, match=message):
    gnp.penalties.with_l2(loss_fn, l2, mask=mask)(params, np.ones((4, 3)),
                                                  None)


# --- The training system ----------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d():
  config = tiny_mnist1d()
  return data.load(config.dataset, seed=train.data_seed(config))


@pytest.mark.slow  # Three experiments, two train steps compiled.
def test_the_train_step_with_l2_keeps_ghost_norms(mnist1d, caplog):
  """method=gnvr with optimizer.l2 > 0: auto is the ghost path (the same
  program, no fallback logged) and one step equals gnvr.method=vmap's."""
  overrides = {"method": "gnvr", "gnvr.lam": LAM, "optimizer.l2": 0.05,
               "optimizer.weight_decay": 0.0, "model.hidden": (16,)}
  experiments = {method: train.create_experiment(tiny_mnist1d(
      **overrides, **{"gnvr.method": method}), dataset=mnist1d)
                 for method in ("auto", "ghost", "vmap")}
  state = experiments["vmap"].init()
  batch = experiments["vmap"].train_batch(0)
  with caplog.at_level(logging.WARNING):
    programs = {method: str(jax.make_jaxpr(experiments[method].step)(
        state, batch)) for method in ("auto", "ghost")}
  assert FALLBACK not in caplog.text
  assert programs["auto"] == programs["ghost"]
  ghost_state, ghost_metrics = experiments["ghost"].step(
      jax.tree.map(jnp.copy, state), batch)
  vmap_state, vmap_metrics = experiments["vmap"].step(state, batch)
  # The L2 term is in the loss, and GNVR's penalty is not negligible.
  assert ghost_metrics["loss"] - ghost_metrics["cross_entropy"] > 1e-2
  assert ghost_metrics["objective"] - ghost_metrics["loss"] > 1e-4
  for name in ("loss", "objective", "penalty", "grad_norm",
               "objective_grad_norm"):  # float32
    np.testing.assert_allclose(ghost_metrics[name], vmap_metrics[name],
                               rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(ravel_pytree(ghost_state.params)[0],
                             ravel_pytree(vmap_state.params)[0], rtol=1e-5,
                             atol=1e-7)
