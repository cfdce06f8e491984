"""XLA:CPU and convolutions inside control flow, measured on the mnist1d CNN.

    python tools/conv_in_loops.py

XLA's CPU backend runs a convolution inside a loop or a conditional far
slower than at the top level (jax-ml/jax#12868). This times, for the mnist1d
CNN (``configs/mnist1d.py`` with ``model.name=cnn``, 1,000 samples, batch
50), the loop's single step against the same steps in stretches of 5
(``Experiment.steps_on_device_data``, what ``steps_per_dispatch`` runs), and
randomized SAM's (``sam.probability=0.1``) steps by the branch they took.
docs/performance.md quotes its output. Medians over ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gnp import study  # pylint: disable=wrong-import-position
from gnp import train  # pylint: disable=wrong-import-position

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "mnist1d.py")


def _experiment(**overrides):
  config = study.load_config(_CONFIG)
  config.update_from_flattened_dict({
      "model.name": "cnn", "dataset.num_samples": 1000,
      "dataset.validation_size": 100, "batch_size": 50, **overrides})
  return train.create_experiment(config)


def _timed(call, steps_per_call: int, calls: int):
  """Per-step seconds of each call, and each call's metrics."""
  times, metrics = [], []
  for _ in range(calls):
    started = time.perf_counter()
    out = call()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - started) / steps_per_call)
    metrics.append(jax.device_get(out[1]))
  return np.asarray(times), metrics


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  args = parser.parse_args(argv)
  if args.steps < 5:
    raise SystemExit("conv_in_loops: error: --steps must be at least 5.")
  for name, overrides in (("plain", {}),
                          ("RST", {"method": "sam", "sam.probability": 0.1})):
    exp = _experiment(**overrides)
    data, indices = exp.train_data(), exp.epoch_indices(0)
    box = [exp.init()]

    def single():
      box[0], metrics = exp.step_on_device_data(box[0], data, indices)
      return box[0], metrics

    def stretch():
      box[0], metrics = exp.steps_on_device_data(box[0], data, indices, 5)
      return box[0], metrics

    # Compile both.
    _timed(single, 1, 2)
    _timed(stretch, 5, 1)
    times, metrics = _timed(single, 1, args.steps)
    if name == "plain":
      stretched, _ = _timed(stretch, 5, args.steps // 5)
      print(f"plain: {np.median(times) * 1e3:.1f} ms per single step,"
            f" {np.median(stretched) * 1e3:.1f} ms per step in stretches"
            f" of 5 ({np.median(stretched) / np.median(times):.1f}×)")
    else:
      took = np.asarray([float(m["sam_step"]) for m in metrics])
      line = ", ".join(
          f"{branch} branch {np.median(times[took == value]) * 1e3:.1f} ms"
          f" ({int(np.sum(took == value))} steps)"
          for branch, value in (("plain", 0.0), ("SAM", 1.0))
          if np.any(took == value))
      print(f"RST (p = 0.1), single steps: {line}")


if __name__ == "__main__":
  main()
