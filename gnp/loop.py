"""The loop: `train_and_evaluate(config, workdir)` is the whole run.

It takes the workdir's lock, builds the experiment (`gnp.experiment`),
restores the latest checkpoint if there is one, and runs the jitted step,
logging, evaluating and checkpointing on the way; `gnp.main` only parses
flags and calls it. The data order is a function of (seed, epoch) and the
step's randomness of (seed, step), so a run resumed from a checkpoint
continues the same data order and random stream as an uninterrupted one.

The step records a non-finite loss or update in the state; the loop reads
that record only where it syncs anyway (log, evaluation and checkpoint
steps), before anything is saved. SIGTERM / SIGINT set a flag the loop reads
between steps; it saves and raises `gnp.errors.Preempted`.

The summary's ``timing`` says where this invocation's time went (`_Timings`):
enough to measure a configuration's speed from a few epochs of its real run.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from gnp import checkpoints
from gnp import config as config_lib
from gnp.checkpoints import Checkpointer
from gnp.errors import NonFiniteError
from gnp.errors import Preempted
from gnp.experiment import Experiment
from gnp.experiment import create_experiment
from gnp.step import NONFINITE_NAMES
from gnp.step import TrainState
from gnp.step import summarise_steps
from gnp.writers import MetricWriter
from gnp.writers import Progress
from gnp.writers import write_atomically


def _raise_if_nonfinite(state: TrainState, checkpointer: Checkpointer) -> None:
  """Raises `NonFiniteError` if the state recorded a non-finite step.

  One scalar crosses to the host; the loop calls this only where it syncs
  anyway, and always before a checkpoint is saved.
  """
  step, what = jax.device_get((state.nonfinite_step, state.nonfinite_what))
  if step < 0:
    return
  last = checkpointer.latest_step()
  kept = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
          if last is not None else "no checkpoint was saved")
  raise NonFiniteError(
      f"non-finite {NONFINITE_NAMES[int(what)]} (NaN or Inf) at step {step};"
      f" the run stopped and {kept}. Lower the learning rate, or set"
      " --config.on_nonfinite=skip to skip such steps.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset=None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns the final summary, also written to ``workdir/summary.json``; a
  run that had finished returns its summary and changes no file. The
  workdir is this run's alone while it runs (`checkpoints.WorkdirLock`).
  Raises `gnp.errors.UserError` for a mistake in the input (including a
  workdir that is read-only, holds a different config's run or is in use by
  another run), before any compilation and before anything is written;
  `gnp.errors.NonFiniteError` when a step's loss or update is not finite and
  ``on_nonfinite`` is "stop"; `gnp.errors.Preempted` after saving on SIGTERM
  or SIGINT.
  ``dataset`` replaces the config's data (tests, notebooks).
  """
  config_lib.validate(config, num_devices=jax.device_count())
  checkpoints.check_workdir(workdir, config)
  exp = create_experiment(config, dataset)
  os.makedirs(workdir, exist_ok=True)
  with checkpoints.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    # Again under the lock: a run that held it may have written its config.
    checkpoints.check_workdir(workdir, config)
    return _train_and_evaluate_locked(config, workdir, exp)


class _WallClock:
  """Wall time summed over the invocations of one run.

  ``WORKDIR/wall_time.json`` maps each checkpoint step to the run's wall time
  and invocation count when it was saved, so that a resumed run starts from
  the times of the checkpoint it resumes (the work after it, done again, is
  counted when it is done again). Only process 0 writes it.
  """

  def __init__(self, workdir: str, start: int):
    self._path = os.path.join(workdir, "wall_time.json")
    self._records = {}
    if os.path.exists(self._path):
      with open(self._path) as f:
        self._records = json.load(f)
    before = self._records.get(str(start), {}) if start else {}
    self._known = not start or bool(before)
    self._before = before.get("wall_time_s", 0.0)
    self._invocations = before.get("invocations", 0) + 1

  def totals(self, seconds: float) -> dict:
    totals = {"wall_time_s": self._before + seconds,
              "invocations": self._invocations}
    if not self._known:  # A checkpoint from before wall_time.json existed.
      totals["wall_time_note"] = "earlier invocations' time is unknown"
    return totals

  def record(self, step: int, seconds: float) -> None:
    if jax.process_index() != 0:
      return
    self._records[str(step)] = {"wall_time_s": self._before + seconds,
                                "invocations": self._invocations}
    write_atomically(self._path, json.dumps(self._records, indent=1))


def _steps_per_dispatch(config, exp: Experiment) -> int:
  """``config.steps_per_dispatch``, or 1 where stretches would be slower.

  XLA's CPU backend runs a convolution inside a loop (here, the stretch's
  ``lax.scan``) far slower than the same convolution at the top level: its
  gradient convolutions miss the fast path (jax-ml/jax#12868). The mnist1d
  CNN's step took 18.6× longer in stretches of 5 than alone
  (tools/conv_in_loops.py). So on the CPU a
  model with convolution kernels (parameters of 3 or more axes) runs step
  by step, with a warning; the run is the same either way.
  """
  every = config.steps_per_dispatch
  if every > 1 and jax.default_backend() == "cpu" and any(
      leaf.ndim >= 3 for leaf in jax.tree.leaves(exp.abstract_state.params)):
    logging.warning(
        "steps_per_dispatch=%d is ignored: on the CPU, XLA runs"
        " convolutions inside a loop many times slower, so this model's"
        " steps are dispatched one at a time.", every)
    return 1
  return every


class _Timings:
  """Where this invocation's time went: compilation, epochs, evaluations.

  Read with `time.perf_counter` where the loop waits for the device anyway,
  or at an epoch's end, where waiting once costs one drained pipeline per
  epoch; never between an epoch's steps. The summary holds them as
  ``timing``; like ``examples_per_second``, they describe this invocation
  only, and they stay out of ``metrics.jsonl``:

  - ``compile_s``: from just before the first dispatch to its return, which
    waits for the step to compile (None if no step ran).
  - ``epoch_train_s``: each epoch run whole in this invocation, from the end
    of the previous one's evaluation (or the first dispatch) until its last
    step is done, its own evaluation left out; ``epochs`` numbers them from
    1. An epoch begun before a resume, or cut short by ``num_steps``, is
    left out. ``first_epoch_includes_compile`` is true when the first timed
    epoch holds the first dispatch: then its time includes ``compile_s``.
    A program the loop compiles later (single steps between stretches of
    ``steps_per_dispatch``) counts in the epoch that first runs it; a
    checkpoint saved within an epoch in that epoch, one saved at its end in
    the next.
  - ``evaluation_s``: each evaluation of the validation and test splits; the
    first compiles the evaluation.
  """

  def __init__(self, start: int, steps_per_epoch: int):
    self._start, self._steps_per_epoch = start, steps_per_epoch
    self._compile_s = None
    self._epochs, self._epoch_train_s, self._evaluation_s = [], [], []
    self._since = time.perf_counter()

  def dispatching(self) -> None:
    """The first dispatch follows: compilation and the first epoch start."""
    self._since = time.perf_counter()

  def compiled(self) -> None:
    """The first dispatch returned: its program has compiled."""
    self._compile_s = time.perf_counter() - self._since

  def epoch_done(self, step: int) -> None:
    """The epoch that ends at ``step`` has finished on the device."""
    now = time.perf_counter()
    if step - self._steps_per_epoch >= self._start:  # Run whole here.
      self._epochs.append(step // self._steps_per_epoch)
      self._epoch_train_s.append(now - self._since)
    self._since = now

  def evaluated(self, started: float) -> tuple[float, bool]:
    """An evaluation begun at ``started`` is done: its seconds, and whether
    it was the first."""
    now = time.perf_counter()
    self._evaluation_s.append(now - started)
    self._since = now  # The next epoch's time starts after the evaluation.
    return self._evaluation_s[-1], len(self._evaluation_s) == 1

  def summary(self) -> dict:
    return {
        "compile_s": self._compile_s,
        "epochs": list(self._epochs),
        "epoch_train_s": list(self._epoch_train_s),
        "first_epoch_includes_compile": bool(
            self._epochs and self._start
            == (self._epochs[0] - 1) * self._steps_per_epoch),
        "evaluation_s": list(self._evaluation_s),
        "first_evaluation_includes_compile": bool(self._evaluation_s),
    }


def _next_stop(step: int, total_steps: int, *periods: int) -> int:
  """The first step after ``step`` at which the loop stops to log, evaluate,
  change epoch or save: a multiple of one of ``periods``, or the last."""
  return min([total_steps] + [(step // p + 1) * p for p in periods])


def _finished_summary(workdir: str, total_steps: int) -> dict | None:
  """The summary of a run that finished in ``workdir``, else None."""
  path = os.path.join(workdir, "summary.json")
  last = os.path.join(workdir, "checkpoints", str(total_steps))
  if not (os.path.exists(path) and os.path.isdir(last)):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("steps") == total_steps else None


def _train_and_evaluate_locked(config, workdir: str, exp: Experiment) -> dict:
  """`train_and_evaluate` once the workdir is this run's."""
  dataset, steps_per_epoch, total_steps = (
      exp.dataset, exp.steps_per_epoch, exp.total_steps)
  finished = _finished_summary(workdir, total_steps)
  if finished is not None:
    # Run again after it finished: every file stays as the run left it.
    logging.info("The run in %s had finished; nothing to do.", workdir)
    return finished
  state = exp.init()

  checkpointer = Checkpointer(workdir, every=config.checkpoint_every_steps,
                              keep=config.keep_checkpoints)
  state = checkpointer.restore(state)
  start = int(state.step)
  # Wall time and invocations up to the checkpoint resumed from (none for a
  # fresh run), so that the summary adds up every invocation's time.
  clock = _WallClock(workdir, start)
  writer = MetricWriter(workdir)
  writer.truncate_after(start)
  if jax.process_index() == 0:  # Whole or not at all: check_workdir reads it.
    write_atomically(os.path.join(workdir, "config.json"),
                     config.to_json_best_effort(indent=2, sort_keys=True))
  if start:
    logging.info("Resuming from the checkpoint at step %d.", start)
  logging.info("%d steps (%d per epoch), batch %d on %d device(s), method %s.",
               total_steps, steps_per_epoch, config.batch_size, exp.mesh.size,
               config.method)

  timings = _Timings(start, steps_per_epoch)

  def evaluate_splits() -> dict[str, float]:
    jax.block_until_ready(state)  # The training before it is not its time.
    started = time.perf_counter()
    record = {}
    for name in ("validation", "test"):
      arrays = getattr(dataset, name)
      if arrays is not None:
        for k, v in exp.evaluate(state, arrays).items():
          record[f"{name}/{k}"] = v
    seconds, first = timings.evaluated(started)
    if first:  # It compiled the evaluation: not training speed.
      progress.exclude(seconds)
    return record

  progress = Progress(total_steps, config.batch_size, start)
  started = time.perf_counter()
  pending, evals, train_record = [], {}, {}
  train_data = exp.train_data()
  epoch, epoch_indices = None, None
  every = _steps_per_dispatch(config, exp)
  step, dispatches = start, 0
  timings.dispatching()
  try:
    with checkpoints.SignalFlag() as signals:
      while step < total_steps:
        if step // steps_per_epoch != epoch:
          epoch = step // steps_per_epoch
          epoch_indices = exp.epoch_indices(epoch)
        # Dispatch is asynchronous: the host runs ahead until it needs a value.
        # A stretch of `every` steps runs as one program when it ends before
        # the next step the loop stops at; otherwise one step at a time.
        stop_at = _next_stop(step, total_steps, steps_per_epoch,
                             config.log_every_steps,
                             config.checkpoint_every_steps)
        if every > 1 and stop_at - step >= every:
          state, metrics = exp.steps_on_device_data(state, train_data,
                                                    epoch_indices, every)
          step += every
        else:
          state, metrics = exp.step_on_device_data(state, train_data,
                                                   epoch_indices)
          step += 1
        if not dispatches:  # The call returns once the step has compiled.
          timings.compiled()
          progress.start()
        dispatches += 1
        pending.append(metrics)
        last = step == total_steps
        log = step % config.log_every_steps == 0 or last
        epoch_end = step % (steps_per_epoch * config.eval_every_epochs) == 0
        synced = log or epoch_end or checkpointer.due(step) or last
        if synced:
          _raise_if_nonfinite(state, checkpointer)
        if log:
          # A single step's metrics are scalars, a stretch's [k]: joined on
          # the host, so that a single step dispatches nothing more.
          means = summarise_steps(jax.tree.map(
              lambda *m: np.concatenate([np.reshape(x, -1) for x in m]),
              *jax.device_get(pending)))
          pending = []
          train_record = {f"train/{k}": v for k, v in means.items()}
          writer.write(step, train_record)  # Timings stay out: runs must diff.
          progress.report(step, step / steps_per_epoch, train_record)
        if step % steps_per_epoch == 0:
          jax.block_until_ready(state)
          timings.epoch_done(step)
        if epoch_end or last:
          evals = evaluate_splits()
          writer.write(step, evals)
          logging.info("step %d: %s", step,
                       ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
        # Asked here, after logging, so that a signal that came during this
        # dispatch is answered at its end; counted in dispatches, which every
        # process makes alike.
        preempted = signals.preempted(dispatches)
        if preempted and not synced:
          _raise_if_nonfinite(state, checkpointer)
        if checkpointer.maybe_save(step, state, force=last or preempted):
          clock.record(step, time.perf_counter() - started)
        if preempted and not last:
          checkpointer.wait()
          writer.flush()
          name = signal.Signals(signals.received).name
          raise Preempted(
              f"{name} at step {step} of {total_steps}: saved a checkpoint"
              f" in {checkpointer.directory}; run the same command again to"
              " resume.", signals.received)
  finally:
    checkpointer.close()
    writer.close()

  if not evals:  # The run had already finished: evaluate what was restored.
    evals = evaluate_splits()
  wall_time = time.perf_counter() - started
  summary = {
      "steps": int(state.step),
      "epochs": int(state.step) / steps_per_epoch,
      "skipped_steps": int(state.skipped_steps),
      # Every invocation's time up to the checkpoint each resumed from,
      # plus this one's; the speed is this invocation's.
      **clock.totals(wall_time),
      "steps_this_invocation": int(state.step) - start,
      "examples_per_second": (int(state.step) - start) * config.batch_size
                             / max(wall_time, 1e-9),
      "timing": timings.summary(),
      **train_record, **evals,
  }
  if jax.process_index() == 0:
    write_atomically(os.path.join(workdir, "summary.json"),
                     json.dumps(summary, indent=2))
  logging.info("Done: %s", json.dumps(summary))
  return summary
