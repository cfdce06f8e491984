"""Gradient centralisation and neuron-wise standardisation vs Adam (§5).

    python -m gnp.study --config=configs/studies/gc.py --workdir=runs/study_gc

mnist1d, 4,000 training examples (504 more held out for validation), no
label noise; MLP 40→256→256→10; Adam with coupled weight decay, then GC or
NGS applied to the kernels' gradients. Optuna tunes the learning rate and
weight decay of each mode (20 trials of 20 epochs, final validation
accuracy); the best of each is retrained for 100 epochs with 5 fresh seeds.
On 2 CPU cores it takes about 3 minutes; neither GC nor NGS beat Adam
(docs/results/README.md). ``:smoke``
runs 2 trials and 2 seeds of 2 epochs.
"""

import os

from gnp import study

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEARCH = {
    "optimizer.learning_rate": ("log", 1e-4, 1e-1),
    "optimizer.weight_decay": ("log", 1e-6, 1e-2),
}


def get_config(arg=None):
  config = study.default_study()
  config.name = "gc"
  config.train = study.load_config(os.path.join(_CONFIGS, "mnist1d_gc.py"),
                                   "baseline")
  config.arms = (
      study.arm("baseline", "Adam", search=SEARCH),
      study.arm("gc", "Adam + gradient centralisation",
                overrides={"optimizer.centralize": True}, search=SEARCH),
      study.arm("ngs", "Adam + neuron-wise gradient standardisation",
                overrides={"optimizer.standardize": True}, search=SEARCH),
  )
  config.tuning.num_trials = 20
  config.tuning.num_epochs = 20
  config.final.num_seeds = 5
  config.final.num_epochs = 100
  return study.apply_variant(config, arg)
