"""CIFAR-100 ResNet-18 with gradient variance regularisation between views (§4).

    ./recipes/cifar100_gvr.sh                       # GVR, α = 0.01
    VARIANT=two_view ./recipes/cifar100_gvr.sh      # SGD on both views, α = 0
    VARIANT=one_view ./recipes/cifar100_gvr.sh      # plain SGD, one view

SGD (momentum 0.9, lr 0.05, weight decay 5e-4, cosine decay), batch 128,
200 epochs; each view is a random crop (4-pixel padding), horizontal flip and
8×8 Cutout. GVR penalises α‖∇_W L(x¹) − ∇_W L(x²)‖² with W the classifier
(``gvr.wrt`` None = the last layer; the original code also penalised the last
residual stage: set ``gvr.wrt`` to a regex over parameter paths). Its SGD
baseline saw one view per step, hence half the augmented data, so both
baselines are variants here: ``two_view`` (same pipeline, α = 0) and
``one_view`` (plain, one augmented view). ``smoke``: synthetic data, 2 steps.
Variants combine with commas: ``two_view,smoke``.
"""

from gnp.config import default_config
from gnp.config import smoke


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  unknown = variants - {"two_view", "one_view", "smoke"}
  if unknown or {"two_view", "one_view"} <= variants:
    raise ValueError(f"bad variants {arg!r}; use two_view or one_view, and"
                     " optionally smoke.")
  config = default_config()
  config.dataset.name = "cifar100"
  config.dataset.validation_size = 0
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.augment.cutout = 8  # DeVries & Taylor's size for CIFAR-100.

  config.model.name = "resnet18"

  config.method = "plain" if "one_view" in variants else "gvr"
  config.gvr.alpha = 0.0 if "two_view" in variants else 0.01
  config.gvr.wrt = None  # The classifier.

  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4  # Coupled, as PyTorch's SGD.
  config.optimizer.schedule = "cosine"

  config.batch_size = 128
  config.num_epochs = 200
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  if "smoke" in variants:
    smoke(config)
  return config
