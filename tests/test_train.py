"""The training system: every method trains, BatchNorm state, schedules, resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gnp import checkpoints
from gnp import optim
from gnp import regularizers
from gnp import train
from tests.helpers import load_config
from tests.helpers import tiny_mnist1d

METHODS = {
    "plain": {},
    "sam": {"sam.rho": 0.05},
    "gnp": {"gnp.r": 0.01, "gnp.alpha": 0.8},
    "gnp_exact": {"method": "gnp", "gnp.exact": True},
    "gnp_groups": {"method": "gnp", "gnp.group_size": 10},
    "gnvr": {"gnvr.lam": 0.01},
    "gvr": {"augment.noise_std": 0.1, "augment.max_shift": 2},
    "hessian": {"hessian.lam": 1e-3},
    "gc": {"method": "plain", "optimizer.centralize": True},
    "ngs": {"method": "plain", "optimizer.standardize": True},
}


def _losses(exp, num_steps):
  state = exp.init()
  losses = []
  for step in range(num_steps):
    state, metrics = exp.step(state, exp.train_batch(step))
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_lowers_the_training_loss(name):
  overrides = {"method": name, **METHODS[name]}
  config = tiny_mnist1d(**{"optimizer.learning_rate": 3e-3, **overrides})
  exp = train.create_experiment(config)
  state, losses = _losses(exp, 30)
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.85 * losses[:5].mean(), losses
  assert exp.step._cache_size() == 1  # pylint: disable=protected-access


def test_metrics_are_the_method_statistics():
  config = tiny_mnist1d(method="gnp", **{"gnp.r": 0.05, "gnp.alpha": 0.5})
  exp = train.create_experiment(config)
  state = exp.init()
  _, metrics = exp.step(state, exp.train_batch(0))
  assert set(metrics) >= {"loss", "objective", "accuracy", "penalty",
                          "grad_norm", "objective_grad_norm", "update_norm",
                          "param_norm", "learning_rate", "cross_entropy"}
  # GNP's objective is L + α r ‖g‖ and the penalty reported is ‖g‖.
  np.testing.assert_allclose(
      metrics["objective"],
      metrics["loss"] + 0.5 * 0.05 * metrics["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(metrics["penalty"], metrics["grad_norm"],
                             rtol=1e-5)
  assert 0 <= metrics["accuracy"] <= 1


def test_the_step_is_the_regularised_gradient_through_the_optimiser():
  # An independent reference for one step: gnp.penalties by hand, then SGD.
  config = tiny_mnist1d(method="sam", **{
      "sam.rho": 0.1, "optimizer.name": "sgd", "optimizer.momentum": 0.0,
      "optimizer.learning_rate": 0.5, "optimizer.l2": 1e-2,
      "optimizer.weight_decay": 0.0})
  exp = train.create_experiment(config)
  state = exp.init()
  x, y = exp.train_batch(0)

  def loss_fn(params, batch, key):
    del key
    xb, yb = batch
    logits = exp.model.apply({"params": params}, xb)
    kernels = [w for w in jax.tree.leaves(params) if w.ndim > 1]
    l2 = 0.5 * 1e-2 * sum(jnp.sum(w ** 2) for w in kernels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb) + l2, None

  params = state.params
  g = jax.grad(lambda p: jnp.mean(loss_fn(p, (x, y), None)[0]))(params)
  norm = optax.tree_utils.tree_norm(g)
  perturbed = jax.tree.map(lambda p, gi: p + 0.1 * gi / norm, params, g)
  g_sam = jax.grad(lambda p: jnp.mean(loss_fn(p, (x, y), None)[0]))(perturbed)
  expected = jax.tree.map(lambda p, gi: p - 0.5 * gi, params, g_sam)
  new_state, _ = exp.step(state, (x, y))
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_batch_norm_statistics_come_from_the_unperturbed_pass():
  config = tiny_mnist1d(method="gnp", **{"gnp.r": 0.5, "gnp.alpha": 1.0})
  config.dataset.name = "synthetic"
  config.dataset.input_shape = (8, 8, 3)
  config.dataset.num_train = 32
  config.dataset.validation_size = 0
  config.batch_size = 16
  config.model.name = "wide_resnet"
  config.model.depth = 10
  config.model.width = 1
  exp = train.create_experiment(config)
  state = exp.init()
  x, y = exp.train_batch(0)
  _, updates = exp.model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      exp.dataset.preprocess(x), train=True, mutable=["batch_stats"])
  old_stats = jax.device_get(state.batch_stats)  # The step donates `state`.
  new_state, _ = exp.step(state, (x, y))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                         new_state.batch_stats, old_stats)
  assert all(jax.tree.leaves(changed))
  for a, b in zip(jax.tree.leaves(new_state.batch_stats),
                  jax.tree.leaves(updates["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_warmup_strategies_ramp_the_right_hyperparameter():
  config = tiny_mnist1d(method="gnp", **{"gnp.r": 0.1, "gnp.alpha": 0.8,
                                         "optimizer.warmup_epochs": 1.0})
  steps = 18  # 900 training examples / batch 50.
  values = {}
  for strategy in ("none", "lambda", "r", "zero"):
    config.regularizer_warmup = strategy
    reg = regularizers.build_regularizer(config, steps, lambda k, x: x)
    values[strategy] = [
        {k: float(v) for k, v in reg.values(jnp.asarray(s)).items()}
        for s in (0, 9, 18, 36)
    ]
  assert values["none"] == [{"r": 0.1, "alpha": 0.8}] * 4
  np.testing.assert_allclose([v["alpha"] for v in values["lambda"]],
                             [0, 0.4, 0.8, 0.8])
  assert {v["r"] for v in values["lambda"]} == {0.1}
  np.testing.assert_allclose([v["r"] for v in values["r"]], [0, 0.05, 0.1, 0.1])
  np.testing.assert_allclose([v["alpha"] for v in values["zero"]],
                             [0, 0, 0.8, 0.8])


def test_learning_rate_schedules():
  config = tiny_mnist1d()
  opt = config.optimizer
  opt.learning_rate, opt.warmup_epochs, opt.schedule = 1.0, 1.0, "cosine"
  schedule = optim.learning_rate_schedule(opt, 10, 110)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 60, 110)],
                             [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  opt.warmup_epochs, opt.schedule = 0.0, "step"
  opt.step_epochs, opt.step_factor = (2, 4), 0.1
  schedule = optim.learning_rate_schedule(opt, 10, 60)
  np.testing.assert_allclose([schedule(s) for s in (0, 19, 20, 39, 40)],
                             [1, 1, 0.1, 0.1, 0.01], rtol=1e-6)


def _params(workdir):
  return checkpoints.load(workdir)["params"]


def test_train_and_evaluate_leaves_its_artefacts(tmp_path):
  config = tiny_mnist1d(num_steps=10, checkpoint_every_steps=4)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 10
  assert 0 <= summary["test/accuracy"] <= 1
  assert json.load(open(tmp_path / "summary.json")) == summary
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if "train/loss" in r] == [5, 10]
  assert any("validation/accuracy" in r for r in records)
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "8"]
  assert json.load(open(tmp_path / "config.json"))["method"] == "plain"


@pytest.mark.parametrize("method", ["plain", "gvr"])
def test_a_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path, method):
  overrides = {"method": method, "augment.noise_std": 0.1,
               "checkpoint_every_steps": 4, "log_every_steps": 4}
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny_mnist1d(num_steps=24, **overrides),
                           str(straight))
  resumed = tmp_path / "resumed"
  # Crosses an epoch boundary (18 steps per epoch) after the interruption.
  train.train_and_evaluate(tiny_mnist1d(num_steps=10, **overrides),
                           str(resumed))
  summary = train.train_and_evaluate(tiny_mnist1d(num_steps=24, **overrides),
                                     str(resumed))
  assert summary["steps"] == 24
  a, b = _params(straight), _params(resumed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  first = [json.loads(l) for l in open(straight / "metrics.jsonl")]
  second = [json.loads(l) for l in open(resumed / "metrics.jsonl")]
  assert [r for r in second if r["step"] > 12] == [
      r for r in first if r["step"] > 12]


def test_a_finished_run_is_not_trained_again(tmp_path):
  config = tiny_mnist1d(num_steps=4)
  first = train.train_and_evaluate(config, str(tmp_path))
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["steps"] == 4
  assert again["test/accuracy"] == first["test/accuracy"]


def test_checkpoints_are_written_by_orbax_and_loadable(tmp_path):
  config = tiny_mnist1d(num_steps=3)
  train.train_and_evaluate(config, str(tmp_path))
  manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  assert manager.latest_step() == 3
  state = checkpoints.load(str(tmp_path))
  assert int(state["step"]) == 3
  assert state["params"]["Dense_0"]["kernel"].shape == (40, 256)


def test_the_cifar_path_end_to_end_on_mocked_tfds(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top

  config = load_config("cifar100_gvr")  # ResNet-18 swapped for a small CNN.
  config.model.name = "cnn"
  config.model.hidden = (8, 16)
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_steps = 3
  config.log_every_steps = 1
  config.dataset.data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=48), mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == 3 and np.isfinite(summary["train/loss"])
  assert summary["train/penalty"] > 0  # Two different views of each image.
  assert 0 <= summary["test/accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("resnet18", {}), ("vgg16_bn", {}),
    ("wide_resnet", {"model.depth": 16, "model.width": 2}),
    ("cnn", {"model.hidden": (8, 16)})])
def test_each_model_takes_a_step(name, extra):
  config = tiny_mnist1d(**{
      "model.name": name, "dataset.name": "synthetic",
      "dataset.input_shape": (32, 32, 3), "dataset.num_train": 16,
      "dataset.validation_size": 0, "batch_size": 8,
      "optimizer.name": "sgd", "optimizer.learning_rate": 0.1, **extra})
  exp = train.create_experiment(config)
  state = exp.init()
  before = jax.device_get(state.params)
  state, metrics = exp.step(state, exp.train_batch(0))
  assert np.isfinite(metrics["loss"]) and metrics["update_norm"] > 0
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
  assert all(moved)


def test_the_loop_step_on_device_data_equals_the_step_on_a_host_batch():
  config = tiny_mnist1d(method="gnp")
  exp = train.create_experiment(config)
  data = exp.train_data()
  first, second = exp.init(), exp.init()
  for step in range(20):  # Crosses the epoch boundary at step 18.
    indices = exp.epoch_indices(step // exp.steps_per_epoch)
    first, m1 = exp.step_on_device_data(first, data, indices)
    second, m2 = exp.step(second, exp.train_batch(step))
    assert float(m1["loss"]) == float(m2["loss"])
  # The run key is typed: compare its bits.
  bits = lambda state: state.replace(rng=jax.random.key_data(state.rng))
  for a, b in zip(jax.tree.leaves(bits(first)), jax.tree.leaves(bits(second))):
    np.testing.assert_array_equal(a, b)


def test_an_epoch_of_loop_steps_makes_no_host_transfer():
  # The loop's steps inside an epoch need nothing from the host and give it
  # nothing back: under a transfer guard that forbids every host<->device
  # copy, a whole epoch of steps runs (a transfer would raise).
  config = tiny_mnist1d(method="sam")
  exp = train.create_experiment(config)
  data, indices = exp.train_data(), exp.epoch_indices(0)
  state = exp.init()
  state, _ = exp.step_on_device_data(state, data, indices)  # Compiles.
  with jax.transfer_guard("disallow"):
    for _ in range(exp.steps_per_epoch - 1):
      state, metrics = exp.step_on_device_data(state, data, indices)
    jax.block_until_ready((state, metrics))
  assert int(state.step) == exp.steps_per_epoch
  # The guard is real: an implicit copy of a host array is refused.
  with jax.transfer_guard("disallow"), pytest.raises(Exception, match="host"):
    exp.step_on_device_data(state, data, np.asarray(indices))
