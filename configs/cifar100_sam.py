"""CIFAR-100 ResNet-18 with SAM, the baseline of every flatness method.

    ./recipes/cifar100_sam.sh
    python -m gnp.main --config=configs/cifar100_sam.py --workdir=runs/c100_sam
    VARIANT=asam ./recipes/cifar100_sam.sh          # adaptive SAM, ρ = 1.0

The same recipe as ``cifar100_gnp.py`` (SGD + Nesterov 0.9, lr 0.1 cosine,
200 epochs, batch 128, L2 1e-3 in the loss, clipping 5.0, crop + flip) with
SAM's update ∇L(θ + ρ g/‖g‖), ρ = 0.1 (Foret et al.'s CIFAR-100 value).

``:asam`` is adaptive SAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware
Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML
2021, https://arxiv.org/abs/2102.11600) in the same recipe: the ascent
ε = ρ T²g/‖Tg‖ with T = |θ| + η, at the paper's CIFAR-100 radius ρ = 1.0
(its CIFAR-10 radius is 0.5: ``configs/cifar10_asam.py``) and η = 0.01. The
paper's own CIFAR runs differ from this recipe in the model (WRN-28-10,
PyramidNet, ResNeXt, ...), SGD without Nesterov, weight decay 5e-4, label
smoothing 0.1 and no clipping; and its code leaves biases and BatchNorm's
shift unscaled (T = 1) where gnp scales every parameter, the paper's formula
(`gnp.penalties.sam`), so ρ = 1.0 is the paper's value, not one tuned for
this implementation.

Variants combine with commas: ``asam,smoke``. ``smoke`` swaps in synthetic
data and runs 2 steps.
"""

from gnp.config import default_config
from gnp.config import smoke


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  unknown = variants - {"asam", "smoke"}
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; use asam, smoke.")
  config = default_config()
  config.dataset.name = "cifar100"
  config.dataset.validation_size = 0
  config.augment.crop_padding = 4
  config.augment.flip = True

  config.model.name = "resnet18"

  config.method = "sam"
  config.sam.rho = 0.1
  config.sam.group_size = None  # One perturbation for the global batch.
  if "asam" in variants:
    config.sam.adaptive = True
    config.sam.rho = 1.0  # Kwon et al.'s CIFAR-100 radius.
    config.sam.eta = 0.01

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
  if "smoke" in variants:
    smoke(config)
  return config
