"""gnp: gradient-based regularisation of neural-network training in JAX.

* `gnp.penalties`: loss function -> gradient function, one regulariser each,
  with `jax.value_and_grad`'s calling convention.
* `gnp.transforms`: optax gradient transformations (GC, NGS).
* `gnp.models`: small Flax models.
"""

from gnp import models
from gnp import penalties
from gnp import transforms

__version__ = "0.1.0"
