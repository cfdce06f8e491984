"""Flax models: small ones for tests and mnist1d, CIFAR-sized ones for training.

Every model is called as ``model.apply(variables, x, train=False)`` and
returns float32 logits. Those with BatchNorm (``resnet18``, ``wide_resnet``,
``vgg16_bn``) keep running statistics in the ``"batch_stats"`` collection;
callers tell them apart by ``"batch_stats" in variables`` after ``init``, and
train them with ``model.apply(variables, x, train=True,
mutable=["batch_stats"])``, which returns ``(logits, {"batch_stats": ...})``.

>>> import jax, jax.numpy as jnp
>>> model = create("resnet18", num_classes=100)
>>> variables = jax.eval_shape(model.init, jax.random.key(0),
...                            jnp.zeros((1, 32, 32, 3)))
>>> sorted(variables)
['batch_stats', 'params']
"""

from __future__ import annotations

import flax.linen as nn

from gnp.errors import ConfigError
from gnp.models.plain import MLPJnp
from gnp.models.resnet import ResNet
from gnp.models.resnet import ResNet18
from gnp.models.small import CNN
from gnp.models.small import MLP
from gnp.models.vgg import VGG16BN
from gnp.models.wide_resnet import WideResNet

__all__ = [
    "CNN",
    "MLP",
    "MLPJnp",
    "MODELS",
    "VGG16BN",
    "ResNet",
    "ResNet18",
    "WideResNet",
    "create",
]

# The names a config's ``model.name`` may take: Flax modules, and one model
# in plain jax.numpy with the same ``init`` / ``apply``.
MODELS: dict[str, type[nn.Module] | type[MLPJnp]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet18": ResNet18,
    "wide_resnet": WideResNet,
    "vgg16_bn": VGG16BN,
    "mlp_jnp": MLPJnp,
}


def create(name: str, **kwargs) -> nn.Module:
  """The model registered as ``name``, constructed with ``kwargs``.

  Args:
    name: a key of `MODELS`.
    **kwargs: the model's fields, e.g. ``num_classes=100``.

  Returns:
    An unbound Flax module (or `MLPJnp`, which is called the same way).

  Raises:
    ConfigError: for an unknown name, or fields the model does not take.
  """
  if name not in MODELS:
    raise ConfigError(
        f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
    )
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    # A misspelled or missing field is a config mistake, not a bug; the
    # dataclass's message names the field.
    raise ConfigError(f"model {name!r}: {e}") from e
