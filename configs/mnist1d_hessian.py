"""Hessian Frobenius-norm regularisation on a small mnist1d setup (§6).

    python -m gnp.main --config=configs/mnist1d_hessian.py --workdir=/tmp/gnp/h
    python -m gnp.main --config=configs/mnist1d_hessian.py:baseline --workdir=...

2,000 samples (1,600 train of which 200 are held out for validation, 400
test); MLP 40→32→32→10; Adam; 20 epochs. The penalty is λ‖H‖_F², estimated
with one Rademacher probe per step (Hutchinson); the gradient flows through
the Hessian-vector product (third derivatives). The reported number is the
final validation loss. Variants: ``baseline`` (method plain), ``smoke``.
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
  config.dataset.num_samples = 2000
  config.dataset.validation_size = 200

  config.model.name = "mlp"
  config.model.hidden = (32, 32)

  config.method = "plain" if "baseline" in variants else "hessian"
  config.hessian.lam = 1e-3
  config.hessian.num_probes = 1

  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3

  config.batch_size = 100
  config.num_epochs = 20
  if "smoke" in variants:
    smoke(config)
  return config
