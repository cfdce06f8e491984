"""What gradient accumulation costs and saves, per method: a table.

    python -m tools.accumulation_cost [--batch_size=1024] [--steps=1,4]

For each method, the train step of the mnist1d MLP (40→256→256→10) at
``grad_accum_steps`` k: XLA's temporary memory for the compiled step (its
own accounting, deterministic) and the step's CPU time (the median of 20
steps, process time: threads' time summed, so less sensitive than wall time
to other processes sharing the machine), both relative to k = 1.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from gnp import train
from gnp.config import default_config

METHODS = {
    "plain": {},
    "sam": {"method": "sam"},
    "gnp": {"method": "gnp"},
    "gnp exact": {"method": "gnp", "gnp.exact": True},
    "gnvr (ghost)": {"method": "gnvr"},
    "gvr": {"method": "gvr", "augment.noise_std": 0.1},
    "hessian": {"method": "hessian"},
    "clip (MAD, ghost)": {"method": "clip", "clip.outlier_mads": 3.0},
}


def measure(overrides, batch_size, steps, repeats=20):
  config = default_config()
  config.update_from_flattened_dict({"batch_size": batch_size,
                                     "grad_accum_steps": steps, **overrides})
  exp = train.create_experiment(config)
  state = exp.init()
  batch = exp.train_batch(0)
  compiled = exp.step.lower(state, batch).compile()
  memory = compiled.memory_analysis().temp_size_in_bytes
  times = []
  for _ in range(repeats + 2):
    start = time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.process_time() - start)
  return memory, float(np.median(times[2:]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=1024)
  parser.add_argument("--steps", default="1,4")
  args = parser.parse_args()
  ks = [int(k) for k in args.steps.split(",")]
  print(f"batch_size={args.batch_size}; temporary MiB and CPU ms per step;"
        " ratios to k=1")
  print("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
  print("| --- |" + " --- |" * len(ks))
  for name, overrides in METHODS.items():
    cells, base = [], None
    for k in ks:
      memory, seconds = measure(overrides, args.batch_size, k)
      base = base or (memory, seconds)
      cells.append(f"{memory / 2**20:.1f} MiB ({memory / base[0]:.2f}×),"
                   f" {seconds * 1e3:.1f} ms ({seconds / base[1]:.2f}×)")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
