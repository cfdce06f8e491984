"""Checkpoints of the train state, with orbax's `CheckpointManager`.

Layout: ``WORKDIR/checkpoints/<step>/`` per kept step. Orbax writes each step
into a temporary directory and renames it when complete, so a step directory
that exists is whole, and an interrupted save leaves nothing that is read
back. The state holds the step, the parameters, the batch statistics, the
optimiser state and the run's base PRNG key; the data order and every
per-step key are functions of (seed, step), so nothing else is needed to
resume exactly.

A workdir belongs to one config (``WORKDIR/config.json``): `check_workdir`
refuses a run whose config differs from the stored one in anything but
`gnp.config.RESUMABLE_KEYS`, so a checkpoint is never resumed by another run.
`WorkdirLock` lets one run at a time into a workdir. `SignalFlag` turns
SIGTERM and SIGINT into a request the loop answers by saving at the end of
the current step.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import threading

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from gnp import config as config_lib
from gnp.errors import UserError


class Checkpointer:
  """Saves every ``every`` steps and at the end, keeps the last ``keep``."""

  def __init__(self, workdir: str, *, every: int, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, state):
    """The latest saved state, placed like ``state``; ``state`` if none."""
    step = self._manager.latest_step()
    if step is None:
      return state
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _key_data(state))
    restored = self._manager.restore(
        step, args=ocp.args.StandardRestore(target))
    return jax.tree.map(_wrap_like, restored, state)

  def due(self, step: int) -> bool:
    """Whether `maybe_save` saves at ``step`` unless forced."""
    return step % self._every == 0

  def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves (asynchronously) at multiples of ``every``, or when forced.

    The caller makes sure ``state`` is finite (`gnp.loop` checks its
    ``nonfinite_step`` first): a checkpoint is only ever a good state.
    """
    if not force and not self.due(step):
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step, args=ocp.args.StandardSave(_key_data(state)), force=True
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(state):
  """``state`` with each typed PRNG key as its raw ``uint32`` data: what is
  saved (the same bytes a legacy ``PRNGKey`` held, so older checkpoints
  restore too)."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _wrap_like(raw, like):
  """A restored leaf as the typed key ``like`` is, if it is one."""
  if not _is_key(like):
    return raw
  return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(like))


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises `UserError` unless a run of ``config`` may use ``workdir``.

  The workdir (or the directory it would be created in) must be writable,
  and a config it already holds must equal ``config`` up to
  `gnp.config.RESUMABLE_KEYS`. Writes nothing.
  """
  path = os.path.abspath(workdir)
  while not os.path.exists(path):  # The nearest directory that exists.
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f"cannot create workdir {workdir}: {path} is a file.")
  # os.access, not a probe file: a failed run must leave nothing behind.
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f"workdir {workdir} is not writable ({path} is"
                    " read-only to this user).")
  stored_path = os.path.join(workdir, "config.json")
  if not os.path.exists(stored_path):
    return
  with open(stored_path) as f:
    stored = json.load(f)
  changed = config_lib.differences(
      stored, json.loads(config.to_json_best_effort()),
      ignore=config_lib.RESUMABLE_KEYS)
  if changed:
    shown = ", ".join(f"{k}={there!r} there, {here!r} here"
                      for k, (there, here) in list(changed.items())[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise UserError(
        f"workdir {workdir} holds a run of a different config ({shown}{more});"
        " use a new --workdir, or the same config to resume (only"
        f" {', '.join(config_lib.RESUMABLE_KEYS)} may change).")


class WorkdirLock:
  """An exclusive lock on a workdir, held while a run or study uses it.

  ``flock`` on ``WORKDIR/.lock``: the operating system releases it when the
  process ends, however it ends, so a ``kill -9`` never leaves a stale lock.
  The file names the holder (pid, host, start time) for the refusal's one
  line. With several processes only process 0 takes it (``enabled=False``
  on the others), as only process 0 writes the metrics and the summary.
  (Advisory, and on a network file system only as good as its flock.)
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, ".lock")
    self._enabled = enabled
    self._fd = None

  def __enter__(self):
    if not self._enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with os.fdopen(fd) as f:
        holder = f.read().strip() or "another process"
      raise UserError(
          f"workdir {os.path.dirname(self.path)} is in use by {holder};"
          " wait for it to finish, or use another --workdir.") from None
    started = datetime.datetime.now().astimezone().isoformat(
        timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started"
                 f" {started}\n".encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)  # Releases the lock; the file stays, harmless.
      self._fd = None


class SignalFlag:
  """Records SIGTERM / SIGINT instead of dying; `received` says which.

  With several processes, SIGTERM is JAX's preemption notice (it reaches one
  process and the coordinator tells the others); `preempted(step)` then says
  at which step all processes save together. A second signal stops at once.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    # Python signal handlers can only be set from the main thread; with
    # several processes SIGTERM belongs to JAX's preemption service.
    if (threading.current_thread() is threading.main_thread()
        and jax.process_count() == 1):
      self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
    self.received = signum
    logging.warning("%s received: saving a checkpoint after this step.",
                    signal.Signals(signum).name)

  def preempted(self, count: int) -> bool:
    """Whether to save and stop now. Call it after every dispatch, ``count``
    growing by one each time and equal on every process at the same point
    (the processes agree on the count at which all of them stop)."""
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(count):
        self.received = self.received or signal.SIGTERM
        return True
      return False
    return self.received is not None


def load(workdir: str, step: int | None = None):
  """A saved train state as a nested dict of numpy arrays (``state["params"]``).

  For notebooks and scripts: no config, model or particular devices are
  needed (a checkpoint written by several processes or devices reads back on
  one). ``step`` None means the latest.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  # Restored as numpy, since the saved shardings name the devices that wrote it.
  path = os.path.join(directory, str(step), "default")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
