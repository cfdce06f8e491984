"""Tiny problems shared by the tests."""

import jax
import jax.numpy as jnp
import optax

from gnp.models import MLP


def tiny_problem(seed, batch_size=8, features=(5, 4, 3), in_dim=3):
  """A tanh MLP (smooth, so higher derivatives are not zero), data and loss.

  Returns (loss_fn, params, batch). The loss ignores its key.
  """
  model = MLP(features, activation=jnp.tanh)
  data_key, label_key, init_key = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(data_key, (batch_size, in_dim))
  y = jax.random.randint(label_key, (batch_size,), 0, features[-1])
  # Flax creates float32 parameters; follow the default float type so the
  # float64 tests are float64 throughout.
  params = jax.tree.map(
      lambda p: p.astype(jnp.result_type(float)),
      model.init(init_key, x)["params"],
  )

  def loss_fn(params, batch, key):
    del key
    inputs, labels = batch
    logits = model.apply({"params": params}, inputs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses, {"logits": logits}

  return loss_fn, params, (x, y)
