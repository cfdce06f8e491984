"""The MLP written in plain `jax.numpy`: a dict of arrays, matrix products.

No Flax module: the penalties, per-example ghost norms included, need of a
model only a function of its parameters, and this one (``model.name =
"mlp_jnp"``) is how `gnp.bench` shows it. It computes what `gnp.models.MLP`
computes, from parameters laid out as Flax lays out that MLP's and drawn
from the same distributions (``Dense_i/kernel`` LeCun-normal,
``Dense_i/bias`` zero, float32), and offers the two methods the training
system calls, ``init`` and ``apply``, with Flax's signatures.

>>> import jax, jax.numpy as jnp
>>> model = MLPJnp((5, 3))
>>> variables = model.init(jax.random.key(0), jnp.zeros((2, 4)))
>>> jax.tree.map(jnp.shape, variables["params"]["Dense_1"])
{'bias': (3,), 'kernel': (5, 3)}
>>> model.apply(variables, jnp.ones((2, 4))).shape
(2, 3)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MLPJnp:
  """Dense layers of the given widths, ``activation`` after all but the last.

  Attributes:
    features: the width of each layer, the number of logits last.
    activation: applied after every layer but the last.
    dtype: computation dtype, or None for that of the inputs and parameters;
      the logits are at least float32.
  """

  features: Sequence[int]
  activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
  dtype: Any = None

  def init(self, rngs, x, train: bool = False):
    """``{"params": {"Dense_i": {"kernel", "bias"}}}`` for inputs like x."""
    del train
    key = rngs["params"] if isinstance(rngs, dict) else rngs
    widths = (math.prod(x.shape[1:]), *self.features)
    keys = jax.random.split(key, len(self.features))
    kernel_init = jax.nn.initializers.lecun_normal()
    params = {
        f"Dense_{i}": {
            "kernel": kernel_init(k, (fan_in, fan_out), jnp.float32),
            "bias": jnp.zeros((fan_out,), jnp.float32),
        }
        for i, (k, fan_in, fan_out) in enumerate(
            zip(keys, widths[:-1], widths[1:]))
    }
    return {"params": params}

  def apply(self, variables, x, train: bool = False, rngs=None,
            mutable=False):
    """The logits; asked for ``mutable`` collections, ``(logits, {})``."""
    del train, rngs
    params = variables["params"]
    layers = [params[f"Dense_{i}"] for i in range(len(self.features))]
    dtype = self.dtype or jnp.result_type(x, *jax.tree.leaves(layers))
    x = jnp.reshape(x, (x.shape[0], -1)).astype(dtype)
    for i, layer in enumerate(layers):
      x = x @ layer["kernel"].astype(dtype) + layer["bias"].astype(dtype)
      if i < len(layers) - 1:
        x = self.activation(x)
    logits = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (logits, {}) if mutable else logits
