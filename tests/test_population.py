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
    # ... with each member's L2 term in them (`penalties.with_l2`).
    ("gnvr", {"gnvr.lam": (0.05, 0.02), "optimizer.l2": (1e-2, 1e-3)}),
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


# --- Stopping members early ------------------------------------------------
# One population of five members over four epochs, trained once straight
# and once with members stopped: the stopped run must be the straight run,
# cut short for the stopped members.

_LEARNING_RATES = (1e-3, 2e-3, 3e-3, 1e-3, 5e-4)
# Epoch -> members stopped after it; their rows train on, unread.
_STOPS = {1: [4], 2: [1], 3: [2]}
_EPOCHS = 4


def _five(learning_rates=_LEARNING_RATES):
  return [_member(seed, num_epochs=_EPOCHS, **{"optimizer.learning_rate": lr})
          for seed, lr in enumerate(learning_rates)]


def _host(states):
  """Stacked states as numpy, the keys as their data."""
  return jax.device_get(states.replace(rng=jax.random.key_data(states.rng)))


def _row(states, i):
  return jax.tree.map(lambda x: x[i], states)


def _assert_trees_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                       atol=1e-7), a, b)


def _assert_histories_close(history, reference, epochs):
  """``history`` holds ``reference``'s first ``epochs`` epochs."""
  assert history["epoch"] == reference["epoch"][:epochs]
  for key, values in reference.items():
    if isinstance(values, list):
      np.testing.assert_allclose(history[key], values[:epochs], rtol=1e-5,
                                 atol=1e-7, err_msg=key)


def _train_recording(pop, configs, on_epoch=None):
  """`Population.train`, with each epoch's stack size and resulting states."""
  epochs = []  # (rows in the stack, host states after the epoch)
  run_epoch = pop._run_epoch  # pylint: disable=protected-access

  def recording(states, train_data, indices):
    rows = states.step.shape[0]
    states, metrics = run_epoch(states, train_data, indices)
    epochs.append((rows, _host(states)))
    return states, metrics

  pop._run_epoch = recording  # pylint: disable=protected-access
  try:
    histories, states = pop.train(configs, on_epoch=on_epoch)
  finally:
    pop._run_epoch = run_epoch  # pylint: disable=protected-access
  return histories, states, epochs


def _stopping(plan, calls=None):
  """An on_epoch that stops ``plan[epoch]``, noting each call in ``calls``."""
  def on_epoch(epoch, histories):
    if calls is not None:
      calls.append((epoch, [len(h["epoch"]) for h in histories]))
    return plan.get(epoch)
  return on_epoch


@pytest.fixture(scope="module")
def pop():
  return population.Population(_five()[0])


@pytest.fixture(scope="module")
def straight(pop):
  return _train_recording(pop, _five())


@pytest.fixture(scope="module")
def stopped(pop):
  calls = []
  return (*_train_recording(pop, _five(), _stopping(_STOPS, calls)), calls)


def test_survivors_train_as_if_no_member_stopped(straight, stopped):
  reference, reference_states, _ = straight
  histories, states, _, _ = stopped
  for m in (0, 3):
    assert "stopped_epoch" not in histories[m]
    _assert_histories_close(histories[m], reference[m], _EPOCHS)
    _assert_trees_close(_row(_host(states), m),
                        _row(_host(reference_states), m))


def test_stopped_members_keep_their_history_and_state(straight, stopped):
  reference, _, reference_epochs = straight
  histories, states, _, _ = stopped
  assert states.step.shape[0] == 5  # Every member, in the configs' order.
  for epoch, members in _STOPS.items():
    for m in members:
      assert histories[m]["stopped_epoch"] == epoch
      _assert_histories_close(histories[m], reference[m], epoch)
      _assert_trees_close(_row(_host(states), m),
                          _row(reference_epochs[epoch - 1][1], m))
  per_epoch = int(states.step[0]) // _EPOCHS
  np.testing.assert_array_equal(states.step, np.multiply(per_epoch,
                                                         [4, 2, 3, 4, 1]))


def test_stopping_members_never_changes_the_stack(pop, stopped):
  _, _, epochs, _ = stopped
  # One stack size, so one compiled epoch, however members stop.
  assert [rows for rows, _ in epochs] == [5, 5, 5, 5]
  assert pop._run_epoch._cache_size() == 1  # pylint: disable=protected-access


def test_on_epoch_sees_every_members_history(stopped):
  *_, calls = stopped
  assert calls == [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 2, 2, 1]),
                   (3, [3, 2, 3, 3, 1]), (4, [4, 2, 3, 4, 1])]


def test_training_ends_once_every_member_stopped(pop):
  calls = []
  histories, states, epochs = _train_recording(
      pop, _five(), _stopping({1: [2], 2: [4, 0, 1, 3]}, calls))
  assert [epoch for epoch, _ in calls] == [1, 2]
  assert [rows for rows, _ in epochs] == [5, 5]
  assert [h["stopped_epoch"] for h in histories] == [2, 2, 1, 2, 2]
  assert [len(h["epoch"]) for h in histories] == [2, 2, 1, 2, 2]
  assert states.step.shape[0] == 5


def test_divergence_is_reported_for_stopped_members_and_survivors(pop):
  # 1e8 diverges in the first epoch, 300 in a later one.
  configs = _five((1e-3, 1e8, 300.0, 300.0, 1e8))
  reference, reference_states = pop.train(configs)
  assert [h.get("diverged_epoch") for h in reference] == [None, 1, 2, 2, 1]
  # Member 1 stops after it diverged, member 3 before it would have;
  # member 4 stays diverged and member 2 diverges.
  histories, states, _ = _train_recording(pop, configs,
                                          _stopping({1: [3, 1]}))
  for m in (1, 2, 4):
    assert histories[m]["diverged"] == reference[m]["diverged"]
    assert histories[m]["diverged_epoch"] == reference[m]["diverged_epoch"]
  for m in (0, 3):
    assert "diverged" not in histories[m]
    assert "diverged_epoch" not in histories[m]
  np.testing.assert_array_equal(
      states.nonfinite_step,
      np.where([False, True, True, False, True],
               reference_states.nonfinite_step, -1))
  _assert_histories_close(histories[0], reference[0], _EPOCHS)


@pytest.mark.parametrize("plan,message", [
    ({1: [5]}, "member 5, out of range for 5 members"),
    ({1: [-1]}, "member -1, out of range"),
    ({1: [2, 2]}, "member 2 twice"),
    ({1: [0], 2: [0]}, "member 0, which already stopped"),
    ({1: [True, False, False, False, False]}, "not a mask"),
    ({1: [1.0]}, "1.0, which is not a member index"),
    ({1: 3}, "None or a collection of member indices"),
])
def test_bad_on_epoch_results_are_refused(pop, plan, message):
  with pytest.raises(ValueError, match=message):
    pop.train(_five(), on_epoch=_stopping(plan))


# --- Streams: rows that take a new run as one ends --------------------------


def test_a_stream_trains_each_run_as_alone_in_rows_it_refills(pop, straight):
  """Five runs through two rows, one pruned: each is its straight self."""
  reference, _, _ = straight
  configs = _five()
  calls, pending = [], list(range(5))

  def source(row):
    calls.append(("ask", row))
    return (pending[0], configs[pending.pop(0)]) if pending else None

  def stop(going):
    calls.append(("stop", sorted(going)))
    return [1] if going.get(1, {"epoch": []})["epoch"] == [1, 2] else None

  compiled = pop._run_epoch._cache_size()  # pylint: disable=protected-access
  ended = []
  for token, history, row in pop.stream(source, slots=2, stop=stop):
    calls.append(("ended", token, row))
    ended.append(token)
    epochs = history.get("stopped_epoch", _EPOCHS)
    _assert_histories_close(history, reference[token], epochs)
    assert pop._states.step.shape[0] == 2  # pylint: disable=protected-access
  assert ended == [1, 0, 2, 3, 4]
  assert calls[:2] == [("ask", 0), ("ask", 1)]
  # Run 1 is pruned after its second epoch; its row asks only after the
  # stream reported it, and run 2 starts there while run 0 goes on.
  assert calls[2:7] == [("stop", [0, 1]), ("stop", [0, 1]), ("ended", 1, 1),
                        ("ask", 1), ("stop", [0, 2])]
  # Rows that find the source empty train on, unread, until none is left.
  assert calls[-2:] == [("ended", 4, 1), ("ask", 1)]
  # One more compiled epoch, for two rows, however the rows refilled.
  assert pop._run_epoch._cache_size() == compiled + 1  # pylint: disable=protected-access


def test_a_stream_evaluates_only_the_splits_asked(pop):
  config = _five()[0]
  queue = iter([(0, config)])
  runs = list(pop.stream(lambda row: next(queue, None), slots=1,
                         splits=("validation",)))
  (token, history, _), = runs
  assert token == 0
  assert "validation/accuracy" in history
  assert not any(key.startswith("test/") for key in history)
