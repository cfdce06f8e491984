"""Gradient centralisation / neuron-wise standardisation on mnist1d (§5).

    python -m gnp.main --config=configs/mnist1d_gc.py:gc --workdir=/tmp/gnp/gc
    python -m gnp.main --config=configs/mnist1d_gc.py:ngs --workdir=/tmp/gnp/ngs
    python -m gnp.main --config=configs/mnist1d_gc.py:baseline --workdir=...

4,000 training examples (504 more held out for validation), no label noise;
MLP 40→256→256→10; Adam; 100 epochs. GC and NGS are links of the optimiser
chain (``optimizer.centralize`` / ``optimizer.standardize``), not penalties.
Variants (comma separated): one of ``baseline``, ``gc`` (default), ``ngs``;
``smoke`` (20 steps).
"""

from gnp.config import default_config
from gnp.config import smoke


def get_config(arg=None):
  variants = set(filter(None, (arg or "gc").split(",")))
  unknown = variants - {"baseline", "gc", "ngs", "smoke"}
  modes = variants & {"baseline", "gc", "ngs"}
  if unknown or len(modes) > 1:
    raise ValueError(f"bad variants {arg!r}; use one of baseline, gc, ngs"
                     " and optionally smoke.")
  mode = modes.pop() if modes else "gc"
  config = default_config()
  config.dataset.name = "mnist1d"
  # 4,504 train (504 held out for validation, leaving exactly 4,000), 1,126
  # test; mnist1d makes num_samples // 10 examples per digit.
  config.dataset.num_samples = 5630
  config.dataset.validation_size = 504

  config.model.name = "mlp"
  config.model.hidden = (256, 256)

  config.method = "plain"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.0  # Coupled (added to the gradient).
  config.optimizer.centralize = mode == "gc"
  config.optimizer.standardize = mode == "ngs"

  config.batch_size = 100
  config.num_epochs = 100
  if "smoke" in variants:
    smoke(config)
  return config
