"""GNVR on mnist1d with 20% label noise (METHODS.md §3), and its baseline.

    python -m gnp.main --config=configs/mnist1d_gnvr.py --workdir=/tmp/gnp/gnvr
    python -m gnp.main --config=configs/mnist1d_gnvr.py:baseline --workdir=...

4,000 training examples (after holding 504 out for validation), 20% of their
labels replaced by uniformly random ones; MLP 40→256→256→10, ReLU; AdamW;
30 epochs. λ, the learning rate and the weight decay here are starting points:
the study (`configs/studies/`) tunes them with Optuna. Variants (comma
separated): ``baseline`` (method plain), ``smoke`` (20 steps).
"""

from gnp.config import default_config
from gnp.config import smoke


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  unknown = variants - {"baseline", "smoke"}
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; use baseline, smoke.")
  config = default_config()
  config.dataset.name = "mnist1d"
  # 4,504 train (504 held out for validation, leaving exactly 4,000), 1,126
  # test; mnist1d makes num_samples // 10 examples per digit.
  config.dataset.num_samples = 5630
  config.dataset.validation_size = 504
  config.dataset.label_noise = 0.2  # Training labels only.

  config.model.name = "mlp"
  config.model.hidden = (256, 256)

  config.method = "plain" if "baseline" in variants else "gnvr"
  config.gnvr.lam = 0.01
  config.gnvr.ddof = 1  # Unbiased variance, as torch.var.

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-2

  config.batch_size = 100
  config.num_epochs = 30
  if "smoke" in variants:
    smoke(config)
  return config
