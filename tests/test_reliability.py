"""Runs survive faults: non-finite steps, signals, kill -9, leftover files.

The reference for every recovered run is the same run left alone: its final
parameters must match bit for bit (CPU), and so must two runs of one config.
That ‖∇L‖ = 0 gives GNP and SAM a zero update rather than NaN is checked with
the penalties, in tests/test_gradient_norm.py
(test_zero_gradient_gives_finite_zero_update).
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import threading

import jax
import numpy as np
import pytest

from gnp import checkpoints
from gnp import data as data_lib
from gnp import train
from gnp.data import pipeline
from gnp.errors import NonFiniteError
from gnp.errors import Preempted
from gnp.errors import UserError
from gnp.writers import MetricWriter
from tests.helpers import NO_CACHE
from tests.helpers import run
from tests.helpers import tiny_mnist1d


def _leaves(workdir, step=None):
  state = checkpoints.load(str(workdir), step)
  return jax.tree.leaves(jax.device_get(state["params"]))


def _assert_same_params(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


_NUM_TRAIN = 700  # tiny_mnist1d: 800 of its 1,000 samples, 100 held out.


def _batch(config, step):
  """The example indices of (0-based) ``step``, from the batch order alone."""
  return pipeline.train_indices(_NUM_TRAIN, config.batch_size, config.seed,
                                step)


def _poisoned(config, index):
  """The config's data with NaN in the training example ``index``."""
  dataset = data_lib.load(config.dataset, seed=train.data_seed(config))
  x, y = dataset.train
  assert len(x) == _NUM_TRAIN
  x = np.array(x)
  x[index] = np.nan
  return dataclasses.replace(dataset, train=(x, y))


# --- Non-finite steps --------------------------------------------------------


def test_the_step_freezes_the_state_at_the_first_nonfinite_loss():
  config = tiny_mnist1d()
  dataset = _poisoned(config, _batch(config, 6)[0])  # First drawn at step 6.
  exp = train.create_experiment(config, dataset)
  state = exp.init()
  for step in range(6):
    state, _ = exp.step(state, exp.train_batch(step))
  good = jax.device_get(state)
  for step in range(6, 9):  # The poisoned batch, then clean ones.
    state, metrics = exp.step(state, exp.train_batch(step))
    assert float(metrics["nonfinite"]) == 1
  assert int(state.nonfinite_step) == 7  # Numbered as in the log: step + 1.
  assert int(state.nonfinite_what) == train.NONFINITE_LOSS
  assert int(state.step) == 6
  for a, b in zip(jax.tree.leaves((good.params, good.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


# With 4 steps per dispatch, steps 11-14 (the NaN at 13) are one stretch.
@pytest.mark.parametrize("steps_per_dispatch", [1, 4])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, steps_per_dispatch):
  config = tiny_mnist1d(num_steps=30, checkpoint_every_steps=5,
                        log_every_steps=5,
                        steps_per_dispatch=steps_per_dispatch)
  dataset = _poisoned(config, _batch(config, 12)[0])
  with pytest.raises(NonFiniteError) as error:
    train.train_and_evaluate(config, str(tmp_path), dataset=dataset)
  message = str(error.value)
  assert "non-finite loss (NaN or Inf) at step 13" in message, message
  assert "last good checkpoint is step 10" in message, message
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]
  for step in (5, 10):
    assert all(np.all(np.isfinite(x)) for x in _leaves(tmp_path, step))
  # The kept checkpoint is the clean run's step 10.
  clean = tmp_path / "clean"
  train.train_and_evaluate(tiny_mnist1d(num_steps=10, log_every_steps=5),
                           str(clean))
  for a, b in zip(_leaves(tmp_path, 10), _leaves(clean), strict=True):
    np.testing.assert_array_equal(a, b)


def test_an_infinite_update_is_named_and_nothing_is_saved(tmp_path):
  # Loss finite at step 1, but lr · weight decay · θ overflows float32.
  config = tiny_mnist1d(num_steps=10, **{
      "optimizer.learning_rate": 1e30, "optimizer.weight_decay": 1e30})
  with pytest.raises(NonFiniteError,
                     match=r"non-finite update \(NaN or Inf\) at step 1;"
                           r" the run stopped and no checkpoint was saved"):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []


# With 3 steps per dispatch, the loop stops at 6, 12, 14, 18 and 24: the
# first poisoned step, 4 (1-based), runs inside the stretch 4-6.
@pytest.mark.parametrize("steps_per_dispatch", [1, 3])
def test_skip_mode_leaves_the_state_as_it_was_and_counts(tmp_path,
                                                         steps_per_dispatch):
  config = tiny_mnist1d(num_steps=24, on_nonfinite="skip", log_every_steps=6,
                        steps_per_dispatch=steps_per_dispatch)
  # An example drawn at step 3 and again in the second epoch (14 steps).
  later = np.concatenate([_batch(config, s) for s in range(14, 24)])
  index = min(set(_batch(config, 3)) & set(later))
  dataset = _poisoned(config, index)
  bad = [s for s in range(24) if index in _batch(config, s)]
  assert len(bad) == 2 and bad[0] == 3 and bad[1] >= 14, bad
  summary = train.train_and_evaluate(config, str(tmp_path), dataset=dataset)
  assert summary["skipped_steps"] == 2 and summary["steps"] == 24
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  skipped = {r["step"]: r["train/skipped"] for r in records
             if "train/skipped" in r}
  expected = {6: 0, 12: 0, 18: 0, 24: 0}
  for s in bad:
    expected[-(-(s + 1) // 6) * 6] += 1  # The log step closing its window.
  assert skipped == expected
  assert all(v is not None for r in records for v in r.values())
  # Reference: the clean data, the bad steps replaced by "step += 1".
  exp = train.create_experiment(tiny_mnist1d(num_steps=24))
  state = exp.init()
  for step in range(24):
    if step in bad:
      state = state.replace(step=state.step + 1)
    else:
      state, _ = exp.step(state, exp.train_batch(step))
  for a, b in zip(_leaves(tmp_path), jax.tree.leaves(state.params),
                  strict=True):
    np.testing.assert_array_equal(a, b)


# --- Signals and leftovers, in process --------------------------------------


def _signal_at(monkeypatch, signum, at_step):
  """Sends ``signum`` to this process when the loop logs ``at_step``."""
  write = MetricWriter.write

  def write_then_signal(self, step, metrics):
    write(self, step, metrics)
    if step == at_step and "train/loss" in metrics:
      os.kill(os.getpid(), signum)

  monkeypatch.setattr(MetricWriter, "write", write_then_signal)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_sigint_saves_the_step_and_a_rerun_resumes_bitwise(tmp_path,
                                                           monkeypatch):
  overrides = dict(num_steps=24, checkpoint_every_steps=7, log_every_steps=5)
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny_mnist1d(**overrides), str(straight))
  run_dir = tmp_path / "run"
  handler = signal.getsignal(signal.SIGINT)
  with monkeypatch.context() as patch:
    _signal_at(patch, signal.SIGINT, 10)
    with pytest.raises(Preempted, match="SIGINT at step 10 of 24") as error:
      train.train_and_evaluate(tiny_mnist1d(**overrides), str(run_dir))
  assert error.value.signum == signal.SIGINT
  assert "run the same command again to resume" in str(error.value)
  # Saved at the signal, off the every-7-steps cadence.
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["10", "7"]
  assert signal.getsignal(signal.SIGINT) is handler  # Restored.
  summary = train.train_and_evaluate(tiny_mnist1d(**overrides), str(run_dir))
  assert summary["steps"] == 24
  _assert_same_params(run_dir, straight)


def test_what_a_kill_leaves_behind_is_never_read(tmp_path):
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny_mnist1d(num_steps=20), str(straight))
  run_dir = tmp_path / "run"
  config = tiny_mnist1d(num_steps=10, checkpoint_every_steps=5)
  train.train_and_evaluate(config, str(run_dir))
  # What a save cut short leaves: orbax's temporary directory for a later
  # step, here step 10's files overwritten with garbage, so that reading it
  # would fail.
  ckpt = run_dir / "checkpoints"
  leftover = ckpt / "15.orbax-checkpoint-tmp"
  shutil.copytree(ckpt / "10", leftover)
  for root, _, files in os.walk(leftover):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.write(b"\xff" * os.path.getsize(path))
  # And a metrics line cut short.
  with open(run_dir / "metrics.jsonl", "a") as f:
    f.write('{"step": 15, "train/lo')
  assert int(checkpoints.load(str(run_dir))["step"]) == 10
  train.train_and_evaluate(tiny_mnist1d(num_steps=20), str(run_dir))
  assert not leftover.exists()
  _assert_same_params(run_dir, straight)
  # Resumed on a log step, so every train record is the straight run's (the
  # first run's final evaluation at step 10 stays as an extra record).
  resumed, expected = ([json.loads(l) for l in open(d / "metrics.jsonl")
                        if '"train/loss"' in l] for d in (run_dir, straight))
  assert resumed == expected and len(expected) == 4


# --- The workdir belongs to one config ---------------------------------------


def test_a_workdir_refuses_another_config_but_not_a_longer_run(tmp_path):
  train.train_and_evaluate(tiny_mnist1d(num_steps=2), str(tmp_path))
  with pytest.raises(UserError, match=r"different config \(optimizer."
                     r"learning_rate=0.001 there, 0.01 here\)"):
    checkpoints.check_workdir(
        str(tmp_path), tiny_mnist1d(num_steps=2,
                                    **{"optimizer.learning_rate": 1e-2}))
  checkpoints.check_workdir(str(tmp_path), tiny_mnist1d(
      num_steps=50, num_epochs=3, log_every_steps=2, checkpoint_every_steps=3,
      keep_checkpoints=5, on_nonfinite="skip"))


# --- The command line: SIGTERM, kill -9, determinism -------------------------

_ARGS = [
    "--config=configs/mnist1d.py", "--config.dataset.num_samples=1000",
    "--config.dataset.validation_size=100", "--config.batch_size=50",
    "--config.eval_batch_size=200", "--config.num_steps=40",
    "--config.log_every_steps=5", "--config.checkpoint_every_steps=10",
    "--config.method=sam",
]

# Runs gnp.main with a hook that stops the process at a chosen point, the
# way a scheduler or the kernel would: sys.argv[1] is JSON, the rest goes to
# gnp.main.
_HOOKED_MAIN = """
import json, os, random, signal, sys, time
from absl import app
from gnp import checkpoints, main
hook = json.loads(sys.argv.pop(1))
save = checkpoints.Checkpointer.maybe_save
def maybe_save(self, step, state, **kwargs):
  saved = save(self, step, state, **kwargs)
  if step == hook["step"]:
    # SIGKILL may land while the asynchronous save is still writing.
    time.sleep(hook.get("delay", 0.0))
    os.kill(os.getpid(), hook["signal"])
  return saved
checkpoints.Checkpointer.maybe_save = maybe_save
sys.argv[0] = "gnp.main"
app.run(main.main, flags_parser=main._parse_flags)
"""


def _main(workdir, *extra):
  return run(["-m", "gnp.main", f"--workdir={workdir}", *_ARGS, *extra],
             env={"JAX_PLATFORMS": "cpu"})


def _hooked(workdir, hook):
  return run(["-c", _HOOKED_MAIN, json.dumps(hook), f"--workdir={workdir}",
              *_ARGS], env={"JAX_PLATFORMS": "cpu", **NO_CACHE})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of ``_ARGS``."""
  workdir = tmp_path_factory.mktemp("reference")
  result = _main(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_the_same_config_and_seed_give_the_same_metrics_and_params(
    tmp_path, reference):
  result = _main(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (open(tmp_path / "metrics.jsonl").read()
          == open(reference / "metrics.jsonl").read())
  _assert_same_params(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_exits_with_how_to_resume_and_the_rerun_matches(
    tmp_path, reference):
  # Sent during step 13's save: the loop answers at the end of step 14.
  result = _hooked(tmp_path, {"step": 13, "signal": int(signal.SIGTERM)})
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("gnp: stopped: SIGTERM at step 14 of 40"), last
  assert "run the same command again to resume" in last
  assert f"--workdir={tmp_path}" in last and "--config.method=sam" in last
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "14"]
  assert not (tmp_path / "summary.json").exists()
  result = _main(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from the checkpoint at step 14" in result.stderr
  _assert_same_params(tmp_path, reference)
  # The train record at step 15 averages steps 15 alone after the resume
  # (11-15 straight); every other record is the same.
  resumed, straight = (
      [json.loads(l) for l in open(d / "metrics.jsonl")
       if not l.startswith('{"step": 15, "train/')]
      for d in (tmp_path, reference))
  assert resumed == straight and len(straight) == 10


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_rerun_matches(tmp_path, reference):
  seed = random.SystemRandom().randrange(2**32)
  rng = random.Random(seed)
  # Half the time right after a save starts, which it may cut short.
  step = rng.choice([10, 20, 30]) if rng.random() < 0.5 else rng.randrange(
      10, 38)
  hook = {"step": step, "delay": rng.uniform(0, 0.05),
          "signal": int(signal.SIGKILL)}
  result = _hooked(tmp_path, hook)
  assert result.returncode == -signal.SIGKILL, (hook, result.stderr[-3000:])
  assert not (tmp_path / "summary.json").exists()
  result = _main(tmp_path)
  assert result.returncode == 0, (seed, hook, result.stderr[-3000:])
  assert not any(".orbax-checkpoint-tmp" in name
                 for name in os.listdir(tmp_path / "checkpoints"))
  _assert_same_params(tmp_path, reference)
