"""``steps_per_dispatch``: k training steps as one program, the same run.

The loop dispatches a stretch of k steps (``lax.scan``) where the stretch
ends before the next step it stops at (log, epoch end, checkpoint, last
step), single steps otherwise. The run, its metrics and its checkpoints must
be those of one step per dispatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading

import jax
import numpy as np
import pytest

from gnp import checkpoints
from gnp import loop
from gnp import train
from gnp.errors import Preempted
from tests.helpers import tiny_mnist1d

# tiny_mnist1d: 700 training examples, batch 50, so 14 steps per epoch.
OVERRIDES = {"num_steps": 40, "log_every_steps": 10,
             "checkpoint_every_steps": 12}
# The loop stops at steps 10, 12, 14, 20, 24, 28, 30, 36 and 40. Stretches
# of 4 fit in 0-10 (twice: to 4 and 8; 9 and 10 alone), 14-20 (to 18),
# 20-24, 24-28, 30-36 (to 34) and 36-40, worked out by hand from that list.
STRETCH_ENDS = [4, 8, 18, 24, 28, 34, 40]


def _records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _leaves(workdir, step=None):
  return jax.tree.leaves(checkpoints.load(str(workdir), step))


def _counting(monkeypatch, *, signal_at=None):
  """Records the last step of every stretch the loop dispatches; sends this
  process SIGTERM while dispatching the stretch that ends at ``signal_at``."""
  ends = []
  make = loop.create_experiment

  def create_experiment(config, dataset=None):
    exp = make(config, dataset)

    def steps(state, data, indices, n):
      state, metrics = exp.steps_on_device_data(state, data, indices, n)
      ends.append(int(state.step))
      if ends[-1] == signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics

    return dataclasses.replace(exp, steps_on_device_data=steps)

  monkeypatch.setattr(loop, "create_experiment", create_experiment)
  return ends


def _assert_same_run(a, b, *, after=0):
  """The same records after step ``after``, last checkpoint and parameters,
  to the bit: a stretch runs the single step's program in a loop."""
  check = np.testing.assert_array_equal
  first, second = ([r for r in _records(w) if r["step"] > after]
                   for w in (a, b))
  assert [sorted(r) for r in first] == [sorted(r) for r in second]
  for r, s in zip(first, second):
    check(np.array([r[k] for k in sorted(r)], dtype=float),
          np.array([s[k] for k in sorted(s)], dtype=float))
  assert (sorted(os.listdir(a / "checkpoints"))[-1:]
          == sorted(os.listdir(b / "checkpoints"))[-1:])
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    check(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", ["plain", "sam", "gvr"])
def test_stretches_of_steps_make_the_run_of_single_steps(tmp_path,
                                                         monkeypatch, method):
  overrides = {**OVERRIDES, "method": method, "augment.noise_std": 0.1}
  train.train_and_evaluate(tiny_mnist1d(**overrides), str(tmp_path / "one"))
  ends = _counting(monkeypatch)
  summary = train.train_and_evaluate(
      tiny_mnist1d(steps_per_dispatch=4, **overrides), str(tmp_path / "four"))
  assert ends == STRETCH_ENDS
  assert summary["steps"] == 40
  _assert_same_run(tmp_path / "one", tmp_path / "four")


def test_a_stretch_longer_than_every_gap_runs_step_by_step(tmp_path,
                                                          monkeypatch):
  train.train_and_evaluate(tiny_mnist1d(**OVERRIDES), str(tmp_path / "one"))
  ends = _counting(monkeypatch)
  train.train_and_evaluate(tiny_mnist1d(steps_per_dispatch=7, **OVERRIDES),
                           str(tmp_path / "seven"))
  # Gaps between stops: 10, 2, 2, 6, 4, 4, 2, 6, 4; only 0-10 holds 7 steps.
  assert ends == [7]
  _assert_same_run(tmp_path / "one", tmp_path / "seven")


def test_a_run_resumes_with_another_stretch_length(tmp_path, monkeypatch):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(tiny_mnist1d(steps_per_dispatch=4, **OVERRIDES),
                           str(straight))
  first = {**OVERRIDES, "num_steps": 20}
  train.train_and_evaluate(tiny_mnist1d(steps_per_dispatch=4, **first),
                           str(resumed))
  ends = _counting(monkeypatch)
  summary = train.train_and_evaluate(
      tiny_mnist1d(steps_per_dispatch=3, **OVERRIDES), str(resumed))
  assert summary["steps"] == 40 and summary["steps_this_invocation"] == 20
  # From step 20, stops 24, 28, 30, 36, 40: stretches of 3 end at 23, 27,
  # 33 and 36, 39 (24, 28-30 and 40 alone).
  assert ends == [23, 27, 33, 36, 39]
  # The first invocation's last step, 20, also evaluated there.
  _assert_same_run(straight, resumed, after=20)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_a_signal_during_a_stretch_saves_its_last_step(tmp_path, monkeypatch):
  straight, run_dir = tmp_path / "straight", tmp_path / "run"
  config = tiny_mnist1d(steps_per_dispatch=4, **OVERRIDES)
  train.train_and_evaluate(config, str(straight))
  with monkeypatch.context() as patch:
    _counting(patch, signal_at=8)
    with pytest.raises(Preempted, match="SIGTERM at step 8 of 40"):
      train.train_and_evaluate(config, str(run_dir))
  assert os.listdir(run_dir / "checkpoints") == ["8"]
  train.train_and_evaluate(config, str(run_dir))
  # A log record covers the steps of its invocation since the last log, so
  # the one at step 10 holds only steps 9 and 10 in the resumed run.
  _assert_same_run(straight, run_dir, after=10)


def test_a_convolutional_model_on_the_cpu_runs_step_by_step(tmp_path,
                                                           monkeypatch,
                                                           caplog):
  if jax.default_backend() != "cpu":
    pytest.skip("the fallback is for XLA's CPU backend")
  overrides = {**OVERRIDES, "num_steps": 8, "model.name": "cnn"}
  train.train_and_evaluate(tiny_mnist1d(**overrides), str(tmp_path / "one"))
  ends = _counting(monkeypatch)
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(tiny_mnist1d(steps_per_dispatch=4, **overrides),
                             str(tmp_path / "four"))
  assert ends == []
  assert "steps_per_dispatch=4 is ignored" in caplog.text
  _assert_same_run(tmp_path / "one", tmp_path / "four")
