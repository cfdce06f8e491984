"""The log a person reads: the progress line and the lines left out."""

import logging as std_logging

import pytest

from gnp import writers


def _record(message, *, level=std_logging.INFO, pathname="xla_bridge.py"):
  return std_logging.LogRecord("jax", level, pathname, 1, message, None, None)


TPU_PROBE = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open"
             " libtpu.so: libtpu.so: cannot open shared object file")


@pytest.mark.parametrize("record, kept", [
    (_record(TPU_PROBE), False),
    (_record("Saving checkpoint", pathname="/x/orbax/checkpoint/manager.py"),
     False),
    # A GPU that fails to start is news; so is anything at WARNING or above.
    (_record("Unable to initialize backend 'cuda': no CUDA devices"), True),
    (_record(TPU_PROBE, level=std_logging.WARNING), True),
    (_record("orbax failed", level=std_logging.ERROR,
             pathname="/x/orbax/checkpoint/manager.py"), True),
    (_record("step 100/300 (epoch 2.5)", pathname="writers.py"), True),
])
def test_only_the_alarming_lines_are_left_out(record, kept):
  assert writers._worth_reading(record) is kept  # pylint: disable=protected-access


def test_progress_names_cross_entropy_l2_and_weighted_penalty():
  metrics = {"train/cross_entropy": 1.5, "train/accuracy": 0.25,
             "train/loss": 1.75, "train/objective": 2.0, "train/penalty": 8.0}
  assert writers.progress_fields(metrics) == (
      "cross-entropy 1.5, accuracy 0.25, L2 term 0.25, weighted penalty 0.25")
  # Plain without L2: the loss is the cross-entropy, the objective the loss.
  plain = {"train/cross_entropy": 1.5, "train/accuracy": 0.25,
           "train/loss": 1.5, "train/objective": 1.5, "train/penalty": 0.0}
  assert writers.progress_fields(plain) == "cross-entropy 1.5, accuracy 0.25"


class _Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_speed_counts_from_compilation_and_leaves_out_excluded_time(
    monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(writers.time, "perf_counter", clock)
  lines = []
  monkeypatch.setattr(writers.logging, "info",
                      lambda fmt, *args: lines.append(fmt % args))
  progress = writers.Progress(total_steps=300, batch_size=10, start_step=0)
  clock.now += 30.0  # Compiling the step.
  progress.start()
  clock.now += 12.0  # 100 steps at 10 steps/s and a 2 s first evaluation.
  progress.exclude(2.0)
  progress.report(100, 1.0, {})
  clock.now += 20.0  # 100 more steps at 5 steps/s.
  progress.report(200, 2.0, {})
  assert "10.0 steps/s, 100 examples/s, ETA 0:00:20" in lines[0], lines
  assert "5.0 steps/s, 50 examples/s, ETA 0:00:20" in lines[1], lines
