"""Randomized sharpness-aware training (RST): `penalties.sam(probability=p)`.

Each branch against a hand computation, the coin against an independent
Bernoulli draw, p = 1 against SAM, the conditional in the compiled step, and
a short training run.
"""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gnp
from gnp import config as config_lib
from gnp import train
from gnp.errors import ConfigError
from tests.helpers import tiny_mnist1d
from tests.problems import tiny_problem
from tests.test_asam import numpy_loss_and_grad
from tests.test_asam import two_layer_problem

# The module; ``gnp.penalties.sam`` is its function.
sam_lib = importlib.import_module("gnp.penalties.sam")


def flat(tree):
  return ravel_pytree(tree)[0]


@jax.jit
def coins(keys, p):
  """The draws RST must make, recomputed here: Bernoulli(p) on salted keys."""
  salted = jax.vmap(jax.random.fold_in, in_axes=(0, None))(
      keys, sam_lib._COIN_SALT)  # pylint: disable=protected-access
  return jax.vmap(jax.random.bernoulli, in_axes=(0, None))(salted, p)


def coin(key, p) -> bool:
  return bool(coins(key[None], p)[0])


def keys_taking(p, wanted):
  """A key whose coin is ``wanted``: the first of key(0), key(1), ..."""
  keys = jax.vmap(jax.random.key)(jnp.arange(100))
  return keys[int(np.argmax(np.asarray(coins(keys, p)) == wanted))]


def numpy_sam(params, x, y, rho):
  """(L(θ), ∇L(θ), L(θ + ε), ∇L(θ + ε)) with ε = ρ g / ‖g‖, in numpy."""
  params = jax.tree.map(np.asarray, params)
  loss, g = numpy_loss_and_grad(params, x, y)
  norm = np.sqrt(sum(np.sum(leaf ** 2) for leaf in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda p, gi: p + rho * gi / norm, params, g)
  perturbed_loss, perturbed_grad = numpy_loss_and_grad(perturbed, x, y)
  return loss, g, perturbed_loss, perturbed_grad


# --- The update --------------------------------------------------------------


@pytest.mark.parametrize("sam_step", [True, False])
def test_each_branch_equals_the_hand_computation(sam_step, x64):
  loss_fn, params, (x, y) = two_layer_problem(0)
  rho, p = 0.3, 0.4
  loss, g, perturbed_loss, perturbed_g = numpy_sam(
      params, np.asarray(x), np.asarray(y), rho)
  key = keys_taking(p, sam_step)
  grad_fn = gnp.penalties.sam(loss_fn, rho=rho, probability=p)
  (objective, aux), grads, stats = jax.jit(grad_fn.with_stats)(
      params, (x, y), key)
  expected, expected_objective = ((perturbed_g, perturbed_loss) if sam_step
                                  else (g, loss))
  np.testing.assert_allclose(flat(grads), flat(expected), rtol=1e-10,
                             atol=1e-14)
  np.testing.assert_allclose(objective, expected_objective, rtol=1e-12)
  np.testing.assert_allclose(stats["task_loss"], loss, rtol=1e-12)
  np.testing.assert_allclose(
      stats["penalty"], perturbed_loss - loss if sam_step else 0.0,
      rtol=1e-9, atol=0)
  np.testing.assert_allclose(stats["grad_norm"], np.linalg.norm(flat(g)),
                             rtol=1e-12)
  assert float(stats["sam_step"]) == float(sam_step)
  assert aux["logits"].shape == (len(y), 3)  # From the unperturbed pass.
  # The two branches differ on this problem, so the check above can tell
  # which one ran.
  assert not np.allclose(flat(perturbed_g), flat(g), rtol=1e-3)


def test_the_coin_is_an_independent_bernoulli_draw():
  loss_fn, params, batch = tiny_problem(0)
  p, n = 0.2, 1000
  grad_fn = gnp.penalties.sam(loss_fn, rho=0.1, probability=p)
  keys = jax.random.split(jax.random.key(7), n)
  # Under vmap the conditional becomes a select: both branches run, and
  # each member still takes its own coin.
  stats = jax.jit(jax.vmap(lambda k: grad_fn.with_stats(params, batch, k)[2])
                  )(keys)
  taken = np.asarray(stats["sam_step"])
  np.testing.assert_array_equal(taken, np.asarray(coins(keys, p), float))
  # The fraction of SAM steps: within 4 binomial standard deviations of p.
  assert abs(taken.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), taken.mean()
  # Plain steps report no penalty; SAM steps report theirs.
  penalty = np.asarray(stats["penalty"])
  assert np.all(penalty[taken == 0] == 0)
  assert np.all(penalty[taken == 1] != 0)


def test_the_coin_does_not_reuse_the_keys_other_draws():
  """Salted: the coin is not the draw a loss function makes from the key."""
  p = 0.5
  keys = jax.random.split(jax.random.key(3), 400)
  salted = np.asarray(coins(keys, p))
  unsalted = np.asarray(jax.vmap(jax.random.bernoulli, in_axes=(0, None))(
      keys, p))
  assert 0.3 < np.mean(salted == unsalted) < 0.7


@pytest.mark.parametrize("options", [{"group_size": 4},
                                     {"adaptive": True, "eta": 0.05}])
def test_probability_one_is_sam(options):
  loss_fn, params, batch = tiny_problem(1)
  key = jax.random.key(4)
  sam = jax.jit(gnp.penalties.sam(loss_fn, rho=0.2, **options).with_stats)
  rst = jax.jit(gnp.penalties.sam(loss_fn, rho=0.2, probability=1.0,
                                  **options).with_stats)
  (loss, aux), grads, stats = sam(params, batch, key)
  (rst_loss, rst_aux), rst_grads, rst_stats = rst(params, batch, key)
  assert float(rst_stats.pop("sam_step")) == 1.0
  # To float32 rounding: RST's second pass runs inside a conditional, which
  # XLA may fuse otherwise than SAM's (one unit in the last place seen).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-8),
               (loss, aux, grads, stats),
               (rst_loss, rst_aux, rst_grads, rst_stats))


def test_m_sharpness_takes_one_coin_for_the_whole_batch():
  loss_fn, params, batch = tiny_problem(2)
  p = 0.5
  grad_fn = jax.jit(gnp.penalties.sam(loss_fn, rho=0.2, probability=p,
                                      group_size=2).with_stats)
  for sam_step in (True, False):
    key = keys_taking(p, sam_step)
    (loss, aux), grads, stats = grad_fn(params, batch, key)
    assert float(stats["sam_step"]) == float(sam_step)  # Not a group mean.
    reference = (gnp.penalties.sam(loss_fn, rho=0.2, group_size=2) if sam_step
                 else gnp.penalties.plain(loss_fn))
    (ref_loss, _), ref_grads = jax.jit(reference)(params, batch, key)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(flat(grads), flat(ref_grads), rtol=1e-5,
                               atol=1e-7)
    assert aux["logits"].shape == (4, 2, 3)  # Stacked over groups either way.


def _dead_problem():
  """Per-example loss (x·w)² at w = 0: the gradient is exactly zero."""
  loss_fn = lambda w, x, key: ((x @ w["w"]) ** 2, None)
  return loss_fn, {"w": jnp.zeros(3)}, jnp.ones((4, 3))


@pytest.mark.parametrize("sam_step", [True, False])
def test_zero_gradient_gives_a_finite_zero_update(sam_step):
  loss_fn, params, batch = _dead_problem()
  p = 0.5
  key = keys_taking(p, sam_step)
  grad_fn = gnp.penalties.sam(loss_fn, rho=0.1, probability=p)
  (loss, _), grads, stats = jax.jit(grad_fn.with_stats)(params, batch, key)
  np.testing.assert_array_equal(grads["w"], np.zeros(3))
  for leaf in jax.tree.leaves((loss, stats)):
    assert np.all(np.isfinite(leaf))
  assert float(stats["penalty"]) == 0.0
  assert float(stats["sam_step"]) == float(sam_step)


def test_the_default_has_no_coin():
  loss_fn, params, batch = tiny_problem(0)
  grad_fn = gnp.penalties.sam(loss_fn, rho=0.1)
  _, _, stats = jax.eval_shape(grad_fn.with_stats, params, batch, None)
  assert "sam_step" not in stats  # And no key was needed.
  assert "cond" not in str(jax.make_jaxpr(grad_fn)(params, batch, None))


# --- Refusals ----------------------------------------------------------------


@pytest.mark.parametrize("probability", [0.0, -0.1, 1.5, float("nan"), True,
                                         "half", np.ones(2)])
def test_a_bad_probability_is_refused(probability):
  loss_fn, _, _ = tiny_problem(0)
  with pytest.raises(ValueError, match="probability"):
    gnp.penalties.sam(loss_fn, rho=0.1, probability=probability)


def test_a_coin_needs_a_key():
  loss_fn, params, batch = tiny_problem(0)
  grad_fn = gnp.penalties.sam(loss_fn, rho=0.1, probability=0.5)
  with pytest.raises(ValueError, match="key=None"):
    grad_fn(params, batch, None)


@pytest.mark.parametrize("probability", [0.0, -1.0, 1.01, float("nan"),
                                         float("inf")])
def test_config_refuses_a_bad_probability(probability):
  config = config_lib.default_config()
  config.method = "sam"
  config.sam.probability = probability
  with pytest.raises(ConfigError, match=r"^sam\.probability must be in \(0, 1\]"):
    config_lib.validate(config)


# --- In the training system --------------------------------------------------


def test_the_compiled_step_branches_and_follows_its_coin():
  p = 0.5
  config = tiny_mnist1d(method="sam", **{"sam.rho": 0.1,
                                         "sam.probability": p})
  exp = train.create_experiment(config)
  state = exp.init()
  batch = exp.train_batch(0)
  # The saving is real: one branch runs, not both under a select.
  assert "conditional" in exp.step.lower(state, batch).compile().as_text()
  taken = []
  for step in range(8):
    key = jax.random.fold_in(state.rng, state.step)
    loss_key = jax.random.split(key)[1]  # As `gnp.step.train_step` splits.
    expected = coin(loss_key, np.float32(p))
    state, metrics = exp.step(state, exp.train_batch(step))
    assert float(metrics["sam_step"]) == float(expected)
    # A plain step's objective is L(θ); a SAM step's is L(θ + ε) > L(θ).
    assert (float(metrics["penalty"]) > 0) == expected
    assert (float(metrics["objective"]) == float(metrics["loss"])) != expected
    taken.append(expected)
  assert any(taken) and not all(taken), taken  # Both branches were checked.
  assert exp.step._cache_size() == 1  # pylint: disable=protected-access


def test_a_run_logs_the_fraction_of_sam_steps(tmp_path):
  config = tiny_mnist1d(method="sam", num_steps=10, **{
      "sam.probability": 0.3})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 10
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  fractions = [r["train/sam_step"] for r in records if "train/sam_step" in r]
  assert len(fractions) == 2  # Logged every 5 steps.
  for fraction in fractions:
    assert fraction * 5 == pytest.approx(round(fraction * 5))  # k of 5.
    assert 0 <= fraction <= 1
