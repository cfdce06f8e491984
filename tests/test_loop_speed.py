"""The loop's timings (summary.json's ``timing``) and tools/loop_speed.py.

The timings are checked for their count (one per epoch run whole, one per
evaluation), for where time goes (an evaluation slowed on purpose shows in
the evaluations, not in the epochs, and the parts add up to no more than
the run), and across a resume. The tool's estimate is recomputed here from
its JSON, and checked against numbers worked out by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest

from gnp import train
from gnp.experiment import Experiment
from tests.helpers import plain_types
from tests.helpers import ROOT
from tests.helpers import tiny_mnist1d
from tools import loop_speed

# tiny_mnist1d: 700 training examples, batch 50, so 14 steps per epoch.
STEPS_PER_EPOCH = 14
SLOW = 0.5  # Seconds each evaluation is made to last, at least.


@pytest.fixture
def slow_evaluation(monkeypatch):
  evaluate = Experiment.evaluate

  def slow(self, state, arrays):
    time.sleep(SLOW / 2)  # Two splits: validation and test.
    return evaluate(self, state, arrays)

  monkeypatch.setattr(Experiment, "evaluate", slow)


@pytest.mark.parametrize("steps_per_dispatch", [1, 7])
def test_a_run_times_each_epoch_and_each_evaluation_apart(
    tmp_path, slow_evaluation, steps_per_dispatch):
  # Three epochs, evaluated at the second's end and at the last step: the
  # third epoch's end is timed without an evaluation after it.
  summary = train.train_and_evaluate(
      tiny_mnist1d(num_steps=3 * STEPS_PER_EPOCH, eval_every_epochs=2,
                   log_every_steps=STEPS_PER_EPOCH,
                   steps_per_dispatch=steps_per_dispatch), str(tmp_path))
  timing = summary["timing"]
  assert timing["epochs"] == [1, 2, 3]
  assert len(timing["epoch_train_s"]) == 3
  assert timing["first_epoch_includes_compile"]
  assert len(timing["evaluation_s"]) == 2  # At steps 28 and 42.
  assert timing["first_evaluation_includes_compile"]
  assert 0 < timing["compile_s"] < timing["epoch_train_s"][0]
  assert all(t > 0 for t in timing["epoch_train_s"])
  assert all(t >= SLOW for t in timing["evaluation_s"])
  # The epoch after the evaluation at step 28: 14 small steps, without it.
  assert timing["epoch_train_s"][2] < SLOW
  # Evaluation time counted in an epoch as well would break this sum.
  parts = sum(timing["epoch_train_s"]) + sum(timing["evaluation_s"])
  assert parts <= summary["wall_time_s"]
  assert json.load(open(tmp_path / "summary.json"))["timing"] == timing
  with open(tmp_path / "metrics.jsonl") as f:  # Runs must diff.
    keys = {k for line in f for k in json.loads(line)}
  assert not [k for k in keys if k.endswith("_s") or "timing" in k]


def test_a_resumed_run_times_only_the_epochs_it_ran_whole(tmp_path):
  # First invocation: epoch 1 whole, epoch 2 cut at step 21 by num_steps.
  first = train.train_and_evaluate(
      tiny_mnist1d(num_steps=21, checkpoint_every_steps=7), str(tmp_path))
  assert first["timing"]["epochs"] == [1]
  assert first["timing"]["first_epoch_includes_compile"]
  assert len(first["timing"]["evaluation_s"]) == 2  # At steps 14 and 21.
  saved = json.load(open(tmp_path / "wall_time.json"))["21"]["wall_time_s"]
  # Second: resumes at 21, so epoch 2 is partial here; epoch 3 is whole.
  second = train.train_and_evaluate(
      tiny_mnist1d(num_steps=42, checkpoint_every_steps=7), str(tmp_path))
  timing = second["timing"]
  assert second["steps_this_invocation"] == 21
  assert timing["epochs"] == [3] and len(timing["epoch_train_s"]) == 1
  assert not timing["first_epoch_includes_compile"]  # It compiled in epoch 2.
  assert len(timing["evaluation_s"]) == 2  # At steps 28 and 42.
  assert timing["compile_s"] > 0
  own = second["wall_time_s"] - saved  # This invocation's time alone.
  assert (timing["compile_s"] + sum(timing["epoch_train_s"])
          + sum(timing["evaluation_s"])) <= own


def test_the_estimate_is_the_formula_worked_out_by_hand():
  timing = {"compile_s": 10.0, "epoch_train_s": [30.0, 5.0, 7.0, 6.0],
            "evaluation_s": [3.0, 1.0, 2.0, 1.5]}
  got = loop_speed.estimate(timing, num_epochs=200, eval_every_epochs=3,
                            examples_per_epoch=49_920)
  assert got["epoch_train_s"] == 6.0 and got["evaluation_s"] == 1.5
  assert got["evaluations"] == 67  # Every 3rd epoch, and the last (200).
  assert got["full_run_s"] == 10.0 + 200 * 6.0 + 67 * 1.5
  assert got["examples_per_second"] == 49_920 / 6.0


def test_cifar_configs_become_synthetic_data_of_cifars_size():
  config, name = loop_speed.build_config(
      os.path.join(ROOT, "configs", "cifar100_gnp.py"), epochs=3,
      dtype="bfloat16", steps_per_dispatch=10)
  assert name == "cifar100"
  data = config.dataset
  assert (data.name, tuple(data.input_shape), data.num_classes,
          data.num_train, data.num_test, data.validation_size) == (
              "synthetic", (32, 32, 3), 100, 50_000, 10_000, 0)
  assert config.model.name == "resnet18" and config.model.dtype == "bfloat16"
  assert config.num_epochs == 200 and config.steps_per_dispatch == 10


def test_smoke_run_estimates_the_full_run_by_its_formula(tmp_path):
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    loop_speed.main([
        f"--config={os.path.join(ROOT, 'configs', 'cifar100_gnp.py')}",
        "--epochs=3", "--dtype=bfloat16", "--steps_per_dispatch=2",
        "--override", "eval_every_epochs=3", "--smoke",
        f"--workdir={tmp_path}"])
  with open(tmp_path / "loop_speed.json") as f:
    results = json.load(f)
  assert plain_types(results)
  with open(tmp_path / "loop_speed.md") as f:
    assert printed.getvalue() == f.read()
  timing, estimate = results["timing"], results["estimate"]
  assert results["data"]["dataset"] == "cifar100"
  assert results["data"]["synthetic_stand_in"]
  assert results["data"]["input_shape"] == [32, 32, 3]
  assert results["data"]["num_classes"] == 100
  assert timing["epochs"] == [1, 2, 3]
  assert len(timing["evaluation_s"]) == 3  # Every epoch, whatever the config.
  # The run trained 3 epochs on the full run's schedule.
  with open(tmp_path / "run" / "config.json") as f:
    run_config = json.load(f)
  steps_per_epoch = results["setting"]["steps_per_epoch"]
  assert run_config["num_epochs"] == 200
  assert run_config["num_steps"] == 3 * steps_per_epoch
  epoch = statistics.median(timing["epoch_train_s"][1:])
  evaluation = statistics.median(timing["evaluation_s"][1:])
  evaluations = math.ceil(200 / 3)
  assert estimate["evaluations"] == evaluations
  assert estimate["full_run_s"] == pytest.approx(
      timing["compile_s"] + 200 * epoch + evaluations * evaluation,
      rel=1e-12)
  assert estimate["examples_per_second"] == pytest.approx(
      steps_per_epoch * results["setting"]["batch_size"] / epoch, rel=1e-12)
  assert estimate["formula"] in printed.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--epochs=1"], "--epochs=1: need at least 2"),
    (["--epochs=201"], "more than the config's num_epochs=200"),
    (["--steps_per_dispatch=0"], "--steps_per_dispatch=0 must be ≥ 1"),
    (["--override", "batch_sise=64"], "did you mean 'batch_size'"),
    (["--override", "batch_size=ten"], "--override batch_size=ten:"),
    (["--override", "dataset.name=imagenet"], "dataset 'imagenet' has no"),
    (["--override", "optimizer.momentum=1.5"], "optimizer.momentum must be"),
    (["--config=configs/none.py"], "configs/none.py: FileNotFoundError"),
    (["--dtype=float16"], "argument --dtype: invalid choice"),
])
def test_bad_input_is_one_line_before_anything_runs(
    args, message, monkeypatch, tmp_path):
  def ran(*args, **kwargs):
    raise AssertionError("ran for bad input")
  monkeypatch.setattr(loop_speed.train, "train_and_evaluate", ran)
  monkeypatch.setattr(loop_speed.data_lib, "load", ran)
  monkeypatch.chdir(ROOT)
  with pytest.raises(SystemExit) as raised:
    loop_speed.main(["--config=configs/cifar100_gnp.py", "--smoke",
                     f"--workdir={tmp_path}", *args])
  text = str(raised.value.code)
  assert text.startswith("loop_speed: error: ") and message in text
  assert "\n" not in text
  assert not os.listdir(tmp_path)


def test_a_workdir_with_a_measurement_is_refused(monkeypatch, tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "summary.json").write_text("{}")
  monkeypatch.setattr(loop_speed.data_lib, "load", None)  # Never reached.
  with pytest.raises(SystemExit, match="holds an earlier measurement"):
    loop_speed.main([f"--config={ROOT}/configs/mnist1d.py",
                     f"--workdir={tmp_path}"])


def test_bad_input_from_the_command_line_exits_nonzero_with_one_line(
    tmp_path):
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "loop_speed.py"),
       "--config=configs/mnist1d.py", "--epochs=0", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [
      "loop_speed: error: --epochs=0: need at least 2 (the first compiles;"
      " the time per epoch is the median of the others)."]
