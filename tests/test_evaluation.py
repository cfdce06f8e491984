"""Evaluation numbers against a hand computation over the whole split."""

import dataclasses

import jax
import numpy as np
import pytest

from gnp import data as data_lib
from gnp import population
from gnp import train
from tests.helpers import run
from tests.helpers import tiny_mnist1d


def _by_hand(exp, params, arrays):
  """Mean cross-entropy and accuracy of ``params`` on a split, in one call."""
  x, y = arrays
  logits = np.asarray(exp.model.apply({"params": params},
                                      exp.dataset.preprocess(x)), np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  loss = -log_softmax[np.arange(len(y)), y].mean()
  return loss, np.mean(np.argmax(logits, axis=1) == y)


def _trained(exp, steps=20):
  state = exp.init()
  for step in range(steps):
    state, _ = exp.step(state, exp.train_batch(step))
  return state


def test_evaluation_equals_a_hand_computation_on_a_padded_split():
  # Neither split is a multiple of the evaluation batch (64): the last batch
  # is padded, and the padding must not count. mnist1d comes standardised;
  # a preprocessing that is not the identity (as CIFAR's uint8 pixels have)
  # shows whether evaluation applies it.
  config = tiny_mnist1d(eval_batch_size=64)
  dataset = data_lib.load(config.dataset, seed=train.data_seed(config))
  dataset = dataclasses.replace(dataset, preprocess=lambda x: 1.5 * x - 0.2)
  exp = train.create_experiment(config, dataset)
  state = _trained(exp)
  for name in ("validation", "test"):
    arrays = getattr(exp.dataset, name)
    assert len(arrays[1]) % 64
    loss, accuracy = _by_hand(exp, jax.device_get(state.params), arrays)
    assert 0.2 < accuracy < 0.9  # Trained a little: neither chance nor all.
    result = exp.evaluate(state, arrays)
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
    # Accuracy counts examples: exact up to the float32 sum of 0s and 1s.
    np.testing.assert_allclose(result["accuracy"], accuracy, rtol=1e-6)
    sums = exp.evaluation_sums(state, arrays)
    assert sums["count"] == len(arrays[1])


def test_a_population_evaluates_each_member_as_by_hand():
  configs = [tiny_mnist1d(seed=seed, eval_batch_size=64, num_epochs=1)
             for seed in (0, 1)]
  for config in configs:
    config.dataset.seed = 0
  histories, states = population.train(configs)
  exp = train.create_experiment(configs[0])
  for member, history in enumerate(histories):
    params = jax.device_get(jax.tree.map(lambda p: p[member], states.params))
    for name in ("validation", "test"):
      loss, accuracy = _by_hand(exp, params, getattr(exp.dataset, name))
      np.testing.assert_allclose(history[f"{name}/loss"][-1], loss, rtol=1e-5)
      np.testing.assert_allclose(history[f"{name}/accuracy"][-1], accuracy,
                                 rtol=1e-6)


_ON_EIGHT_DEVICES = """
import jax, numpy as np
from gnp import train
from tests.helpers import tiny_mnist1d
from tests.test_evaluation import _by_hand, _trained
assert jax.device_count() == 8
# 60 is rounded up to 64 so that it splits over 8 devices.
exp = train.create_experiment(tiny_mnist1d(eval_batch_size=60, batch_size=40))
state = _trained(exp, 5)
for name in ("validation", "test"):
  arrays = getattr(exp.dataset, name)
  loss, accuracy = _by_hand(exp, jax.device_get(state.params), arrays)
  result = exp.evaluate(state, arrays)
  np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(result["accuracy"], accuracy, rtol=1e-6)
print("ok")
"""


@pytest.mark.slow
def test_evaluation_on_eight_devices_equals_the_hand_computation():
  result = run(["-c", _ON_EIGHT_DEVICES], env={
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0 and result.stdout.strip() == "ok", (
      result.stderr[-3000:])
