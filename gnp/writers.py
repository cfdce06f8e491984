"""Where metrics go: TensorBoard event files, ``metrics.jsonl``, the log.

Only process 0 writes. Every record is ``{"step": s, "split/name": value}``
flattened to one JSON line, so a script reads a run with
``[json.loads(l) for l in open("metrics.jsonl")]``.
"""

from __future__ import annotations

import datetime
import json
import logging as std_logging
import math
import os
import time

import jax
from absl import logging


def _worth_reading(record) -> bool:
  """False for log records that only alarm: orbax's per-save INFO lines and
  JAX's note that no TPU is here (on a machine without one, where it is
  expected); warnings, errors and other backends' failures stay."""
  if record.levelno >= std_logging.WARNING:
    return True
  if "orbax" in record.pathname:
    return False
  message = record.getMessage()
  return not ("Unable to initialize backend 'tpu'" in message
              and "libtpu" in message)


def quiet_logs() -> None:
  """Drops the log lines that only alarm (see `_worth_reading`). The
  command-line programs call it first."""
  handler = logging.get_absl_handler().python_handler
  if _worth_reading not in handler.filters:
    handler.addFilter(_worth_reading)


def write_atomically(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` whole or not at all (a temporary file, then
  a rename), so a run killed mid-write leaves the old file or the new one."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class MetricWriter:
  """Writes scalar metrics to TensorBoard and to ``metrics.jsonl``."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if self._enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._tensorboard = tensorboardX.SummaryWriter(
          os.path.join(workdir, "tensorboard")
      )

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step``: a resumed run writes them again."""
    if not self._enabled or not os.path.exists(self._path):
      return
    kept = []
    with open(self._path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line)
        except json.JSONDecodeError:  # The last line, cut short by a kill.
          pass
    write_atomically(self._path, "".join(kept))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step)}
    record.update({k: _json_float(v) for k, v in metrics.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, float(value), int(step))

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _json_float(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None  # JSON has no NaN.


class Progress:
  """The progress line: what the step optimises, speed and ETA.

  Speed and ETA count from `start` (called once the step has compiled) and
  leave out time given to `exclude` (the first evaluation, which compiles),
  so the first line is not slowed by compilation. The line shows the
  training cross-entropy and accuracy, the L2 term where there is one, and
  the weighted penalty (``objective - loss``: what the method adds to the
  loss), each named as such.
  """

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self._total = total_steps
    self._batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def start(self) -> None:
    """Speed counts from now: the first step has compiled."""
    self._last_time = time.perf_counter()

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` (e.g. a first evaluation's compilation) out."""
    self._last_time += seconds

  def report(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    remaining = (self._total - step) / max(rate, 1e-9)
    eta = datetime.timedelta(seconds=round(remaining))
    logging.info(
        "step %d/%d (epoch %.1f) | %s | %.1f steps/s, %.0f examples/s, ETA %s",
        step, self._total, epoch, progress_fields(metrics), rate,
        rate * self._batch_size, eta,
    )


def progress_fields(metrics: dict[str, float]) -> str:
  """``"cross-entropy 1.98, accuracy 0.296, weighted penalty 0.117"``."""
  get = lambda name: metrics.get(f"train/{name}", math.nan)
  fields = [("cross-entropy", get("cross_entropy")),
            ("accuracy", get("accuracy"))]
  l2_term = get("loss") - get("cross_entropy")
  if l2_term:
    fields.append(("L2 term", l2_term))
  weighted_penalty = get("objective") - get("loss")
  if weighted_penalty or get("penalty"):
    fields.append(("weighted penalty", weighted_penalty))
  return ", ".join(f"{name} {value:.4g}" for name, value in fields)
