"""CIFAR-100 ResNet-18 with the gradient norm penalty (finite difference).

    ./recipes/cifar100_gnp.sh
    python -m gnp.main --config=configs/cifar100_gnp.py --workdir=runs/c100_gnp

The recipe of the official GNP code, with ResNet-18 (CIFAR stem) in place of
the WideResNet and batch 128: SGD with Nesterov momentum 0.9, peak lr 0.1 with
cosine decay, 200 epochs, L2 1e-3 inside the loss (so it enters ‖∇L‖), r 0.1,
α 0.8, the update clipped to global norm 5.0; random crop (4-pixel padding)
and horizontal flip. Needs CIFAR-100 prepared by tensorflow-datasets (see
README, "Datasets"). ``:smoke`` swaps in synthetic 32×32×3 data and runs 2
steps, to check an install without the dataset.
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

  config.method = "gnp"
  config.gnp.r = 0.1
  config.gnp.alpha = 0.8

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.l2 = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip = 5.0

  config.batch_size = 128
  config.num_epochs = 200
  config.eval_batch_size = 1000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  if arg == "smoke":
    smoke(config)
  return config
