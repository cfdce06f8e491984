"""Hessian penalty's dose–response under 20% label noise (all_methods setting).

    python -m gnp.sweep --config=configs/sweeps/hessian_noise.py --workdir=runs/sweep_hessian_noise

The setting of configs/studies/all_methods.py (mnist1d, 4,000 training
examples, 504 held out for validation, 20% of training labels randomised;
MLP 40→256→256→10; AdamW, 30 epochs), with λ‖H‖_F² (one Rademacher probe)
at λ = 0 and 7 half-decade steps from 1e-4 to 0.1 (the tuned λ was 1.3e-3),
5 seeds each. The learning rate and weight decay are the tuned plain arm's
(docs/results/all_methods/table.md: lr 4.3e-3, wd 3.0e-2), so λ = 0 is the
tuned baseline; with the study's own results, add
``--config.from_study.workdir=runs/study_all_methods``
(``--config.from_study.arm=hessian`` for the Hessian arm's tuned lr and wd).
On 2 CPU cores shared with other jobs the full sweep is estimated at 4–7
minutes (3 timed epochs extrapolated: 7 min; gnvr.py's extrapolation was
1.8× its measured time); ``:smoke`` (λ ∈ {0, 3.2e-3, 0.1}, 2 seeds × 2
epochs) took 31 s.
"""

import os

from gnp import study_config
from gnp import sweep_config

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg=None):
  config = sweep_config.default_sweep()
  config.name = "hessian_noise"
  config.train = study_config.load_config(
      os.path.join(_CONFIGS, "mnist1d_gnvr.py"), "baseline")
  config.train.method = "hessian"
  # Fall-back values: the all_methods study's tuned plain arm.
  config.train.optimizer.learning_rate = 4.3e-3
  config.train.optimizer.weight_decay = 3.0e-2
  config.grid = sweep_config.nest(
      {"hessian.lam": sweep_config.log_grid(1e-4, 1e-1, 7)})
  config.from_study.arm = "plain"
  config.from_study.config = "configs/studies/all_methods.py"
  config.num_seeds = 5
  config.num_epochs = 30
  return sweep_config.apply_variant(config, arg)
