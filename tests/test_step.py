"""The train step's wiring against hand computations: the learning rate it
applies, the randomness it draws, batch-norm statistics under m-sharpness."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import tree_utils as otu

from gnp import checkpoints
from gnp import train
from gnp.data import augment as augment_lib
from tests.helpers import tiny_mnist1d

PEAK = 0.5


def _copy(state):
  return jax.tree.map(jnp.copy, state)  # The step donates its state.


def _mean_cross_entropy_grad(exp, params, batch):
  x, y = batch
  x = exp.dataset.preprocess(x)

  def mean_loss(p):
    logits = exp.model.apply({"params": p}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return jax.grad(mean_loss)(params)


def _scheduled(t, warmup, total):
  """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to 0."""
  if t < warmup:
    return PEAK * t / warmup
  return PEAK * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_the_step_applies_the_scheduled_learning_rate():
  # Plain SGD without momentum moves θ by −lr_t ∇L: the learning rate applied
  # at step t is read off the update against ∇L computed here by hand.
  config = tiny_mnist1d(**{
      "optimizer.name": "sgd", "optimizer.momentum": 0.0,
      "optimizer.learning_rate": PEAK, "optimizer.weight_decay": 0.0,
      "optimizer.schedule": "cosine", "optimizer.warmup_epochs": 1.0,
      "num_epochs": 2})
  exp = train.create_experiment(config)
  warmup, total = exp.steps_per_epoch, exp.total_steps
  assert total == 2 * warmup
  checked = {0: None, 1: None, warmup - 1: None, warmup: None,
             total - 1: None}
  state = exp.init()
  for t in range(total):
    batch = exp.train_batch(t)
    before = jax.device_get(state.params)
    state, metrics = exp.step(state, batch)
    if t not in checked:
      continue
    grads = _mean_cross_entropy_grad(exp, before, batch)
    moved = jax.tree.map(lambda new, old: new - old,
                         jax.device_get(state.params), before)
    applied = -otu.tree_vdot(moved, grads) / otu.tree_vdot(grads, grads)
    checked[t] = (float(applied), float(metrics["learning_rate"]))
  for t, (applied, logged) in checked.items():
    expected = _scheduled(t, warmup, total)
    np.testing.assert_allclose(applied, expected, rtol=2e-3, atol=1e-7,
                               err_msg=f"applied at step {t}")
    np.testing.assert_allclose(logged, expected, rtol=1e-5, atol=1e-9,
                               err_msg=f"logged at step {t}")
  assert checked[0][0] == 0.0  # Warm-up starts from 0: the first step is 0.


# name -> config overrides and the metric that its randomness moves.
# (Augmentation: test_per_step_keys_are_the_run_key_folded_with_the_step.)
RANDOM = {
    "hessian_probes": ({"method": "hessian", "hessian.lam": 0.1}, "penalty"),
    "gvr_views": ({"method": "gvr", "gvr.alpha": 0.1,
                   "augment.noise_std": 0.3}, "penalty"),
    "dropout": ({"model.name": "wide_resnet", "model.depth": 10,
                 "model.width": 1, "model.dropout_rate": 0.5,
                 "dataset.name": "synthetic", "dataset.input_shape": (8, 8, 3),
                 "dataset.num_train": 32, "dataset.validation_size": 0,
                 "batch_size": 16}, "loss"),
}


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_each_step_draws_its_own_randomness(name):
  overrides, metric = RANDOM[name]
  exp = train.create_experiment(tiny_mnist1d(**overrides))
  state = exp.init()
  batch = exp.train_batch(0)

  def value(step, rng=state.rng):
    # Only the step number (or the run's key) differs: the learning rate is
    # constant, and the metrics are taken before the update.
    moved = _copy(state).replace(step=jnp.asarray(step, jnp.int32),
                                 rng=jax.random.clone(rng))
    return float(exp.step(moved, batch)[1][metric])

  values = [value(step) for step in (0, 1, 2, 0, 1)]
  assert values[:2] == values[3:], values  # The same step, the same draws.
  # Each step, its own draws: differences well above rounding (two views
  # drawn with one key are one view, and their penalty is rounding noise).
  assert min(abs(a - b) for a, b in zip(values[:3], values[1:3] + values[:1])
             ) > 1e-4 * max(map(abs, values)), values
  assert min(map(abs, values)) > 1e-3, values
  assert value(0, jax.random.key(99)) != values[0]  # Each run its own.


def test_per_step_keys_are_the_run_key_folded_with_the_step():
  # The documented rule: step t's key is fold_in(rng, t), split into the
  # augmentation key and the loss key. Noise augmentation, recomputed here
  # from that rule, gives the loss the step reports.
  config = tiny_mnist1d(**{"augment.noise_std": 0.3})
  exp = train.create_experiment(config)
  augment = augment_lib.make_augment(config.augment)
  state = exp.init()
  batch = exp.train_batch(0)
  for t in (0, 7):
    moved = _copy(state).replace(step=jnp.asarray(t, jnp.int32))
    _, metrics = exp.step(moved, batch)
    augment_key, _ = jax.random.split(jax.random.fold_in(state.rng, t))
    x = augment(augment_key, exp.dataset.preprocess(batch[0]))
    logits = exp.model.apply({"params": state.params}, x)
    expected = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[1]).mean()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_the_run_key_is_typed_and_checkpoints_as_the_legacy_bytes(tmp_path):
  exp = train.create_experiment(tiny_mnist1d(seed=3))
  state = exp.init()
  assert jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
  # The same bits a legacy PRNGKey(seed) held: runs and checkpoints made
  # before keys were typed continue the same random stream.
  np.testing.assert_array_equal(jax.random.key_data(state.rng),
                                jax.random.PRNGKey(3))
  state, _ = exp.step(state, exp.train_batch(0))
  saver = checkpoints.Checkpointer(str(tmp_path), every=1, keep=1)
  saver.maybe_save(1, state, force=True)
  saver.close()
  on_disk = checkpoints.Checkpointer(str(tmp_path), every=1, keep=1)
  restored = on_disk.restore(exp.init())
  on_disk.close()
  assert restored.rng.dtype == state.rng.dtype
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(state.rng))
  assert int(restored.step) == 1
  # Both states draw the same next step.
  batch = exp.train_batch(1)
  a = exp.step(_copy(state), batch)[1]["loss"]
  b = exp.step(restored, batch)[1]["loss"]
  assert float(a) == float(b)


def test_m_sharpness_batch_norm_statistics_are_the_mean_over_groups():
  # SAM and GNP share the step's averaging of the groups' statistics.
  config = tiny_mnist1d(**{
      "method": "sam", "sam.group_size": 4,
      "dataset.name": "synthetic", "dataset.input_shape": (8, 8, 3),
      "dataset.num_train": 32, "dataset.validation_size": 0,
      "batch_size": 16, "model.name": "wide_resnet", "model.depth": 10,
      "model.width": 1})
  exp = train.create_experiment(config)
  state = exp.init()
  batch = exp.train_batch(0)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = exp.dataset.preprocess(batch[0])
  per_group = [
      exp.model.apply(variables, x[i:i + 4], train=True,
                      mutable=["batch_stats"])[1]["batch_stats"]
      for i in range(0, 16, 4)]
  expected = jax.tree.map(lambda *s: np.mean(np.stack(s), axis=0), *per_group)
  # The groups' statistics differ, so the mean is not any one group's.
  assert not np.allclose(*[jax.tree.leaves(s)[-1] for s in per_group[:2]])
  new_state, _ = exp.step(state, batch)
  for actual, wanted in zip(jax.tree.leaves(new_state.batch_stats),
                            jax.tree.leaves(expected)):
    np.testing.assert_allclose(actual, wanted, rtol=1e-5, atol=1e-6)


def test_a_skipped_step_does_not_shift_the_schedule():
  # on_nonfinite="skip": step 0's batch is poisoned and its update refused.
  # Step 1 must still apply, and log, the schedule's value at step 1, the
  # step the regulariser's warm-up follows too.
  config = tiny_mnist1d(**{
      "optimizer.name": "sgd", "optimizer.momentum": 0.0,
      "optimizer.learning_rate": PEAK, "optimizer.schedule": "cosine",
      "optimizer.warmup_epochs": 1.0, "num_epochs": 2,
      "on_nonfinite": "skip"})
  exp = train.create_experiment(config)
  warmup, total = exp.steps_per_epoch, exp.total_steps
  state = exp.init()
  x, y = exp.train_batch(0)
  state, metrics = exp.step(state, (np.full_like(x, np.nan), y))
  assert float(metrics["nonfinite"]) == 1 and int(state.skipped_steps) == 1
  batch = exp.train_batch(1)
  before = jax.device_get(state.params)
  state, metrics = exp.step(state, batch)
  grads = _mean_cross_entropy_grad(exp, before, batch)
  moved = jax.tree.map(lambda new, old: new - old,
                       jax.device_get(state.params), before)
  applied = -otu.tree_vdot(moved, grads) / otu.tree_vdot(grads, grads)
  expected = _scheduled(1, warmup, total)
  np.testing.assert_allclose(applied, expected, rtol=2e-3)
  np.testing.assert_allclose(metrics["learning_rate"], expected, rtol=1e-6)
