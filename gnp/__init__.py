"""gnp: gradient-based regularisation of neural-network training in JAX.

* `gnp.penalties`: loss function -> gradient function, one regulariser each,
  with `jax.value_and_grad`'s calling convention.
* `gnp.transforms`: optax gradient transformations (GC, NGS).
* `gnp.models`: Flax models (MLP, CNN, ResNet-18, WideResNet, VGG-16-BN).
* `gnp.data`, `gnp.train`, `gnp.main`: the training system
  (`python -m gnp.main --config=configs/mnist1d.py --workdir=DIR`).
"""

from gnp import models
from gnp import penalties
from gnp import transforms

__version__ = "0.1.0"
