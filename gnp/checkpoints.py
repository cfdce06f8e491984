"""Checkpoints of the train state, with orbax's `CheckpointManager`.

Layout: ``WORKDIR/checkpoints/<step>/`` per kept step. Orbax writes each step
into a temporary directory and renames it when complete, so a step directory
that exists is whole, and an interrupted save leaves nothing that is read
back. The state holds the step, the parameters, the batch statistics, the
optimiser state and the run's base PRNG key; the data order and every
per-step key are functions of (seed, step), so nothing else is needed to
resume exactly.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves (asynchronously) at multiples of ``every``, or when forced."""
    if not force and step % self._every:
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step, args=ocp.args.StandardSave(state), force=True
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load(workdir: str, step: int | None = None):
  """A saved train state as a nested dict (``state["params"]``, ...).

  For notebooks and scripts: no config or model is needed. ``step`` None
  means the latest.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return state
