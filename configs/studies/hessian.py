"""Hessian Frobenius-norm regularisation vs Adam, small mnist1d (§6).

    python -m gnp.study --config=configs/studies/hessian.py --workdir=runs/study_hessian

mnist1d with 2,000 samples (1,400 train, 200 validation, 400 test); MLP
40→32→32→10; Adam. Optuna tunes the learning rate (baseline) and the
learning rate and λ (penalty λ‖H‖_F², one Rademacher probe per step),
20 trials of 20 epochs scored by the final validation loss; the best of each
is retrained for 20 epochs with 2 fresh seeds. On 2 CPU cores it takes
under a minute, under two with ``--config.tuning.replicates=3``; over three
replicates the tuned λ ranged from 3e-5 to 6e-3 and the effect on test
accuracy was not detectable, and configs/sweeps/hessian.py finds no λ that
changes it (docs/results/README.md). ``:smoke`` runs 2 trials and 2 seeds
of 2 epochs.
"""

import os

from gnp import study

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LR = {"optimizer.learning_rate": ("log", 1e-4, 1e-1)}


def get_config(arg=None):
  config = study.default_study()
  config.name = "hessian"
  config.objective = "validation/loss"
  config.direction = "minimize"
  config.train = study.load_config(
      os.path.join(_CONFIGS, "mnist1d_hessian.py"), "baseline")
  config.arms = (
      study.arm("baseline", "Adam", search=LR),
      study.arm("hessian", "Adam + λ‖H‖_F² (Hutchinson, 1 probe)",
                overrides={"method": "hessian"},
                search={**LR, "hessian.lam": ("log", 1e-5, 1e-1)}),
  )
  config.tuning.num_trials = 20
  config.tuning.num_epochs = 20
  config.final.num_seeds = 2
  config.final.num_epochs = 20
  return study.apply_variant(config, arg)
