"""The small models: shapes of parameters and outputs."""

import jax
import jax.numpy as jnp
import pytest

from gnp.models import CNN
from gnp.models import MLP


def test_mlp_is_the_mnist1d_architecture():
  model = MLP((256, 256, 10))
  x = jnp.ones((7, 40))
  params = model.init(jax.random.key(0), x)["params"]
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {
      "Dense_0": {"kernel": (40, 256), "bias": (256,)},
      "Dense_1": {"kernel": (256, 256), "bias": (256,)},
      "Dense_2": {"kernel": (256, 10), "bias": (10,)},
  }
  assert model.apply({"params": params}, x).shape == (7, 10)


def test_mlp_activation_is_not_applied_to_the_output():
  model = MLP((4, 3))
  x = jax.random.normal(jax.random.key(1), (32, 5))
  params = model.init(jax.random.key(0), x)
  # ReLU on the output would make every logit non-negative.
  assert jnp.min(model.apply(params, x)) < 0


@pytest.mark.parametrize("ndim, shape", [(2, (3, 8, 8, 3)), (1, (3, 40, 1))])
def test_cnn_outputs_logits(ndim, shape):
  model = CNN(features=(4, 8), num_classes=5, ndim=ndim)
  x = jnp.ones(shape)
  params = model.init(jax.random.key(0), x)["params"]
  kernels = [p.shape for p in jax.tree.leaves(params) if p.ndim == ndim + 2]
  assert kernels == [(3,) * ndim + (shape[-1], 4), (3,) * ndim + (4, 8)]
  assert model.apply({"params": params}, x).shape == (3, 5)
