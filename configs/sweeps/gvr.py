"""GVR's dose–response: α from 0 (two views, no penalty) to 3.2 on mnist1d.

    python -m gnp.sweep --config=configs/sweeps/gvr.py --workdir=runs/sweep_gvr

The setting of configs/studies/all_methods.py (mnist1d, 4,000 training
examples, 504 held out for validation, 20% of training labels randomised;
MLP 40→256→256→10; AdamW, 30 epochs), with GVR's two views of each signal
(Gaussian noise σ = 0.1, a random shift of up to 3 samples) and its penalty
α Σ‖g¹ − g²‖² on the last layer at α = 0 — the two-views control, the
study's ``two_views`` arm — and 8 half-decade steps from 1e-3 to 3.2 (the
tuned α was 0.55), 5 seeds each. The learning rate and weight decay are the
tuned two_views arm's (docs/results/all_methods/table.md: lr 1.9e-3, wd
3.6e-4), so α = 0 is that arm; with the study's own results, add
``--config.from_study.workdir=runs/study_all_methods``
(``--config.from_study.arm=gvr`` for GVR's tuned lr and wd).
On 2 CPU cores shared with other jobs the full sweep is estimated at 3.5–6
minutes (3 timed epochs extrapolated: 6.2 min; gnvr.py's extrapolation was
1.8× its measured time); ``:smoke`` (α ∈ {0, 0.032, 3.2}, 2 seeds × 2
epochs) took 16 s.
"""

import os

from gnp import study_config
from gnp import sweep_config

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg=None):
  config = sweep_config.default_sweep()
  config.name = "gvr"
  config.train = study_config.load_config(
      os.path.join(_CONFIGS, "mnist1d_gnvr.py"), "baseline")
  config.train.method = "gvr"
  config.train.augment.noise_std = 0.1  # The all_methods study's views.
  config.train.augment.max_shift = 3
  # Fall-back values: the all_methods study's tuned two_views arm.
  config.train.optimizer.learning_rate = 1.9e-3
  config.train.optimizer.weight_decay = 3.6e-4
  config.grid = sweep_config.nest(
      {"gvr.alpha": sweep_config.log_grid(1e-3, 10**0.5, 8)})
  config.from_study.arm = "two_views"
  config.from_study.config = "configs/studies/all_methods.py"
  config.num_seeds = 5
  config.num_epochs = 30
  return sweep_config.apply_variant(config, arg)
