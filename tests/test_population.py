"""gnp.population: a vmapped population equals its members' single runs."""

import copy
import json
import os

import jax
import numpy as np
import pytest

from gnp import checkpoints
from gnp import population
from gnp import train
from gnp.errors import ConfigError
from tests.helpers import tiny_mnist1d


def _member(seed, **overrides):
  return tiny_mnist1d(**{"seed": seed, "num_epochs": 2, "dataset.seed": 0,
                         **overrides})


def _single_run(config, workdir):
  """`train_and_evaluate`'s per-epoch records, as a population history."""
  config = copy.deepcopy(config)
  config.log_every_steps = train.create_experiment(config).steps_per_epoch
  train.train_and_evaluate(config, workdir)
  by_step = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)], checkpoints.load(workdir)


@pytest.mark.parametrize("method,varied", [
    ("plain", {"optimizer.learning_rate": (1e-3, 3e-3),
               "optimizer.weight_decay": (1e-2, 1e-4)}),
    ("gnvr", {"gnvr.lam": (0.0, 0.05)}),  # ghost norms under vmap
])
def test_population_equals_separate_single_runs(tmp_path, method, varied):
  configs = [
      _member(seed, method=method,
              **{k: values[i] for k, values in varied.items()})
      for i, seed in enumerate((0, 1))
  ]
  histories, states = population.train(configs)
  for i, config in enumerate(configs):
    records, restored = _single_run(config, str(tmp_path / str(i)))
    history = histories[i]
    assert history["epoch"] == [1, 2]
    for key in ("train/cross_entropy", "train/accuracy", "train/penalty",
                "validation/loss", "validation/accuracy", "test/loss",
                "test/accuracy"):
      np.testing.assert_allclose(history[key], [r[key] for r in records],
                                 rtol=2e-5, atol=1e-6, err_msg=key)
    member = jax.tree.map(lambda x, i=i: np.asarray(x[i]), states.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-6),
                 member, restored["params"])
  # Members really differ: a population is not one run copied.
  assert histories[0]["train/cross_entropy"] != histories[1][
      "train/cross_entropy"]


def test_population_compiles_once_per_member_count():
  pop = population.Population(_member(0))
  pop.train([_member(0), _member(1, **{"optimizer.learning_rate": 1e-2})])
  pop.train([_member(2), _member(3)])
  assert pop._run_epoch._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("other,message", [
    ({"batch_size": 25}, "batch_size"),
    ({"method": "sam"}, "method"),
    ({"optimizer.weight_decay": 0.0}, "optimizer.weight_decay != 0"),
    ({"dataset.seed": 1}, "dataset.seed"),
])
def test_incompatible_members_are_refused(other, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    population.check_compatible([_member(0), _member(1, **other)])


def test_members_without_a_data_seed_must_share_the_seed():
  unset = {"dataset.seed": None}
  with pytest.raises(ConfigError, match="set dataset.seed"):
    population.check_compatible([_member(0, **unset), _member(1, **unset)])


def test_structure_ignores_seed_and_hyperparameters():
  a = _member(0, **{"optimizer.learning_rate": 1e-3})
  b = _member(5, **{"optimizer.learning_rate": 0.3})
  assert population.structure(a) == population.structure(b)
