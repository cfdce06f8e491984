"""CIFAR-100 ResNet-18 with SAM, the baseline of every flatness method.

    ./recipes/cifar100_sam.sh
    python -m gnp.main --config=configs/cifar100_sam.py --workdir=runs/c100_sam

The same recipe as ``cifar100_gnp.py`` (SGD + Nesterov 0.9, lr 0.1 cosine,
200 epochs, batch 128, L2 1e-3 in the loss, clipping 5.0, crop + flip) with
SAM's update ∇L(θ + ρ g/‖g‖), ρ = 0.1 (Foret et al.'s CIFAR-100 value).
``:smoke`` swaps in synthetic data and runs 2 steps.
"""

from gnp.config import default_config
from gnp.config import smoke


def get_config(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"unknown variant {arg!r}; the only variant is 'smoke'.")
  config = default_config()
  config.dataset.name = "cifar100"
  config.dataset.validation_size = 0
  config.augment.crop_padding = 4
  config.augment.flip = True

  config.model.name = "resnet18"

  config.method = "sam"
  config.sam.rho = 0.1
  config.sam.group_size = None  # One perturbation for the global batch.

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.l2 = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip = 5.0

  config.batch_size = 128
  config.num_epochs = 200
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  if arg == "smoke":
    smoke(config)
  return config
