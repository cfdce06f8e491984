"""The default: the mnist1d MLP (40→256→256→10) with AdamW, no regulariser.

    python -m gnp.main --config=configs/mnist1d.py --workdir=/tmp/gnp/mnist1d

Switch the regulariser with one key, e.g. ``--config.method=sam`` (plain, sam,
gnp, gnvr, gvr, hessian; each has its own section of hyper-parameters).
``--config=configs/mnist1d.py:smoke`` runs 20 steps.

mnist1d is generated offline (5,000 samples: 4,000 train of which 500 are
held out for validation, 1,000 test). 30 epochs take well under a minute on
2 CPU cores; test accuracy lands around 0.6 (see README).
"""

from gnp.config import default_config
from gnp.config import smoke


def get_config(arg=None):
  config = default_config()
  config.dataset.name = "mnist1d"
  config.dataset.num_samples = 5000
  config.dataset.validation_size = 500

  config.model.name = "mlp"
  config.model.hidden = (256, 256)

  config.method = "plain"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-2

  config.batch_size = 100
  config.num_epochs = 30
  config.log_every_steps = 100
  if arg == "smoke":
    smoke(config)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; the only variant is 'smoke'.")
  return config
