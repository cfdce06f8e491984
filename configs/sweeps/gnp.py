"""GNP's radius × mixing weight, r × α, on mnist1d with 20% label noise.

    python -m gnp.sweep --config=configs/sweeps/gnp.py --workdir=runs/sweep_gnp

The setting of configs/studies/all_methods.py (mnist1d, 4,000 training
examples, 504 held out for validation, 20% of training labels randomised;
MLP 40→256→256→10; AdamW, 30 epochs), with GNP's finite difference,
update = (1 − α) ∇L(θ) + α ∇L(θ + r g/‖g‖), on a 5 × 5 grid: α ∈ {0,
0.125, 0.25, 0.5, 1} (α = 0 is the plain gradient whatever r, a row of
baselines; α = 1 is SAM with ρ = r) × r from 1e-3 to 0.1 in half decades
(the tuned point was r 1.9e-2, α 0.32), 3 seeds each: 75 runs. The table's
Δ is against (α 0, r 1e-3), the plain gradient. The learning rate and
weight decay are the tuned plain arm's (docs/results/all_methods/table.md:
lr 4.3e-3, wd 3.0e-2); with the study's own results, add
``--config.from_study.workdir=runs/study_all_methods``.
On 2 CPU cores shared with other jobs the full sweep is estimated at 5–9
minutes (3 timed epochs extrapolated: 8.6 min; gnvr.py's extrapolation was
1.8× its measured time); ``:smoke`` (α ∈ {0, 1} × r ∈ {1e-3, 0.1}, 2 seeds
× 2 epochs) took 19 s.
"""

import os

from gnp import study_config
from gnp import sweep_config

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg=None):
  config = sweep_config.default_sweep()
  config.name = "gnp"
  config.train = study_config.load_config(
      os.path.join(_CONFIGS, "mnist1d_gnvr.py"), "baseline")
  config.train.method = "gnp"
  # Fall-back values: the all_methods study's tuned plain arm.
  config.train.optimizer.learning_rate = 4.3e-3
  config.train.optimizer.weight_decay = 3.0e-2
  # Two keys: gnp.alpha (first alphabetically) gives the heat maps' rows.
  config.grid = sweep_config.nest({
      "gnp.alpha": (0.0, *sweep_config.log_grid(0.125, 1.0, 4, zero=False)),
      "gnp.r": sweep_config.log_grid(1e-3, 1e-1, 5, zero=False),
  })
  config.from_study.arm = "plain"
  config.from_study.config = "configs/studies/all_methods.py"
  config.num_seeds = 3
  config.num_epochs = 30
  return sweep_config.apply_variant(config, arg)
