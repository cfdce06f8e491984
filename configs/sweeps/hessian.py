"""Hessian penalty's dose–response on the small mnist1d setting (§6).

    python -m gnp.sweep --config=configs/sweeps/hessian.py --workdir=runs/sweep_hessian

The setting of configs/studies/hessian.py (2,000 samples: 1,400 train, 200
validation, 400 test; MLP 40→32→32→10; Adam, 20 epochs) with λ‖H‖_F² (one
Rademacher probe per step) at λ = 0 and 9 half-decade steps from 1e-5 to
0.1, 5 seeds each (1–5). The learning rate is the study's tuned baseline's
(docs/results/hessian/table.md: 4.2e-3), so λ = 0 is the tuned baseline;
with the study's own results, add
``--config.from_study.workdir=runs/study_hessian``. The study was judged on
validation loss: read the Val. loss column. On 2 shared CPU cores the full
sweep is estimated at under a minute (3 timed epochs extrapolated: 36 s,
most of it compilation); ``:smoke`` (λ ∈ {0, 1e-3, 0.1}, 2 seeds × 2
epochs) took 21 s.
"""

import os

from gnp import study_config
from gnp import sweep_config

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg=None):
  config = sweep_config.default_sweep()
  config.name = "hessian"
  config.train = study_config.load_config(
      os.path.join(_CONFIGS, "mnist1d_hessian.py"))
  config.train.method = "hessian"
  config.train.optimizer.learning_rate = 4.2e-3  # The study's baseline.
  config.grid = sweep_config.nest(
      {"hessian.lam": sweep_config.log_grid(1e-5, 1e-1, 9)})
  config.from_study.arm = "baseline"
  config.from_study.config = "configs/studies/hessian.py"
  config.num_seeds = 5
  config.num_epochs = 20
  return sweep_config.apply_variant(config, arg)
