"""Datasets in host memory, device-side augmentation, and the batch order.

`load(config.dataset, seed=...)` returns a `Dataset`: whole splits as numpy
arrays on the host (small enough for every dataset gnp trains on: CIFAR's
train split is 150 MB of uint8), plus a jittable ``preprocess`` that the
train step applies on the device. Host arrays keep their compact raw dtype
(uint8 images) so that a batch is cheap to gather and to transfer.

* `gnp.data.mnist1d`: the 1-D digits of Greydanus (2020), generated offline.
* `gnp.data.cifar`: CIFAR-10/100 through tensorflow-datasets.
* `gnp.data.synthetic`: Gaussian inputs labelled by a random linear teacher.
* `gnp.data.augment`: random crop, flip, Cutout, 1-D noise and shift (JAX).
* `gnp.data.pipeline`: which examples make up the batch of a given step.

>>> import ml_collections
>>> config = ml_collections.ConfigDict(dict(
...     name="synthetic", validation_size=20, label_noise=0.0,
...     input_shape=(8, 8, 3), num_classes=4, num_train=100, num_test=30))
>>> ds = load(config, seed=0)
>>> ds.train[0].shape, ds.validation[0].shape, ds.test[1].dtype, ds.input_shape
((80, 8, 8, 3), (20, 8, 8, 3), dtype('int32'), (8, 8, 3))
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gnp.data import augment
from gnp.data import cifar
from gnp.data import mnist1d
from gnp.data import pipeline
from gnp.data import synthetic
from gnp.errors import ConfigError

__all__ = ["DATASETS", "Dataset", "augment", "load", "pipeline"]

# The names ``config.dataset.name`` may take.
DATASETS = ("mnist1d", "cifar10", "cifar100", "synthetic")

# Upper bounds on generated data, so that a value with a few zeros too many
# is refused at once: mnist1d generates ~1,000 samples a second on one core;
# synthetic inputs are float32 (2**31 numbers are 8 GiB).
MAX_MNIST1D_SAMPLES = 10**6
MAX_SYNTHETIC_CLASSES = 2**16
MAX_SYNTHETIC_NUMBERS = 2**31

Split = tuple[np.ndarray, np.ndarray]


# eq=False: the fields are arrays, whose == is elementwise; identity equality
# and hashing keep a Dataset usable as a dict key or a static argument.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset with its splits in host memory.

  Attributes:
    name: the dataset's name, as in the config.
    train: ``(x, y)``, x in the raw host dtype (uint8 images, float32
      signals), y int32 of shape [N]. Label noise, if any, is already applied.
      Arrays may be read-only views of a cache: index them, do not write.
    validation: ``(x, y)`` held out of the train split, or None.
    test: ``(x, y)``.
    num_classes: labels lie in ``[0, num_classes)``.
    preprocess: jittable; raw host batch -> float32 model input.
  """

  name: str
  train: Split
  validation: Split | None
  test: Split
  num_classes: int
  preprocess: Callable[[jax.Array], jax.Array]

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The per-example shape of the preprocessed input."""
    x = self.train[0]
    spec = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    return tuple(jax.eval_shape(self.preprocess, spec).shape[1:])


def to_float32(x: jax.Array) -> jax.Array:
  """The preprocessing of datasets that are already standardised floats."""
  return jnp.asarray(x, jnp.float32)


def load(config: ml_collections.ConfigDict, *, seed: int) -> Dataset:
  """Loads the dataset ``config`` describes.

  Args:
    config: the ``dataset`` section of a training config. ``name`` picks the
      dataset; ``validation_size`` examples of the train split are held out
      (by a seeded permutation) as the validation split; ``label_noise``
      replaces that fraction of the remaining training labels by uniformly
      random ones (which may equal the true label), leaving validation and
      test clean. The other fields belong to one dataset each: see
      `gnp.data.mnist1d`, `gnp.data.cifar`, `gnp.data.synthetic`.
    seed: the run's seed; it fixes the generated data (mnist1d, synthetic),
      the validation split and the noisy labels.

  Returns:
    A `Dataset`.

  Raises:
    ConfigError: for a field that is out of range.
    DatasetUnavailableError: when a TFDS dataset is neither prepared nor
      downloadable.
  """
  name = config.name
  if name not in DATASETS:
    raise ConfigError(
        f"dataset.name must be one of {', '.join(DATASETS)}; got {name!r}."
    )
  if not _is_int(seed) or not 0 <= seed < 2**32:
    # mnist1d seeds numpy's legacy generator, which takes 32-bit seeds.
    raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
  validation_size = _int_field(config, "validation_size", minimum=0)
  label_noise = config.get("label_noise", 0.0)
  if (isinstance(label_noise, bool)
      or not isinstance(label_noise, numbers.Real)
      or not 0 <= label_noise < 1):  # also rejects NaN
    raise ConfigError(
        "dataset.label_noise must be a fraction in [0, 1), got"
        f" {label_noise!r}."
    )

  train, test, num_classes, preprocess = _source(config, seed)

  num_train = len(train[1])
  if validation_size >= num_train:
    raise ConfigError(
        f"dataset.validation_size={validation_size} must be smaller than the"
        f" {num_train} training examples of {name}."
    )
  train, validation = _hold_out(train, validation_size, seed)
  train = _with_label_noise(train, label_noise, num_classes, seed)
  return Dataset(name=name, train=train, validation=validation, test=test,
                 num_classes=num_classes, preprocess=preprocess)


def _source(config: ml_collections.ConfigDict, seed: int):
  """The named dataset's (train, test, num_classes, preprocess)."""
  name = config.name
  if name == "mnist1d":
    num_samples = _int_field(config, "num_samples", minimum=10,
                             maximum=MAX_MNIST1D_SAMPLES)
    if num_samples % mnist1d.NUM_CLASSES:
      # mnist1d makes num_samples // 10 per class; silently generating fewer
      # than asked would make every count derived from the config wrong.
      low = num_samples // 10 * 10
      raise ConfigError(
          "dataset.num_samples must be a multiple of 10 (mnist1d generates"
          f" as many of each digit), got {num_samples}; try {low} or"
          f" {low + 10}."
      )
    train, test = mnist1d.load(num_samples, seed=seed)
    return train, test, mnist1d.NUM_CLASSES, to_float32
  if name == "synthetic":
    shape = config.input_shape
    if (not isinstance(shape, (tuple, list)) or not shape
        or not all(_is_int(d) and d >= 1 for d in shape)):
      raise ConfigError(
          "dataset.input_shape must be a non-empty tuple of positive integers,"
          f" got {shape!r}."
      )
    num_classes = _int_field(config, "num_classes", minimum=2,
                             maximum=MAX_SYNTHETIC_CLASSES)
    num_train = _int_field(config, "num_train", minimum=1)
    num_test = _int_field(config, "num_test", minimum=1)
    dim = math.prod(shape)
    # The teacher is [dim, num_classes], the inputs [num_train + num_test,
    # *shape].
    size = (num_train + num_test + num_classes) * dim
    if size > MAX_SYNTHETIC_NUMBERS:
      raise ConfigError(
          f"synthetic data of (num_train + num_test + num_classes) ×"
          f" prod(input_shape) = {size:,} numbers is more than the"
          f" {MAX_SYNTHETIC_NUMBERS:,} allowed (8 GiB); shrink"
          " dataset.num_train, num_test, num_classes or input_shape."
      )
    train, test = synthetic.make(tuple(shape), num_classes,
                                 num_train=num_train, num_test=num_test,
                                 seed=seed)
    return train, test, num_classes, to_float32
  if not isinstance(config.download, bool):
    raise ConfigError(
        f"dataset.download must be True or False, got {config.download!r}."
    )
  train, test = cifar.load(name, data_dir=config.data_dir,
                           download=config.download)
  return train, test, cifar.NUM_CLASSES[name], cifar.PREPROCESS[name]


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_field(config: ml_collections.ConfigDict, field: str, *,
               minimum: int, maximum: int | None = None) -> int:
  value = config[field]
  if (not _is_int(value) or value < minimum
      or (maximum is not None and value > maximum)):
    allowed = (f">= {minimum}" if maximum is None
               else f"in [{minimum}, {maximum}]")
    raise ConfigError(
        f"dataset.{field} must be an integer {allowed}, got {value!r}."
    )
  return int(value)


def _hold_out(train: Split, size: int, seed: int) -> tuple[Split, Split | None]:
  """Splits ``size`` random examples off ``train``: (rest, held out)."""
  if size == 0:
    return train, None
  x, y = train
  order = pipeline.rng(seed, "holdout").permutation(len(y))
  # Sorted, so that both parts keep the source order (and gather in order).
  held, kept = np.sort(order[:size]), np.sort(order[size:])
  return (x[kept], y[kept]), (x[held], y[held])


def _with_label_noise(train: Split, fraction: float, num_classes: int,
                      seed: int) -> Split:
  """Replaces round(fraction * N) labels, chosen at random, by random ones."""
  if fraction == 0:
    return train
  x, y = train
  rng = pipeline.rng(seed, "label_noise")
  noisy = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
  y = y.copy()
  # Uniform over all classes, as in the protocols gnp reproduces: a fraction
  # 1/num_classes of the "noisy" labels keep their true value.
  y[noisy] = rng.integers(0, num_classes, size=len(noisy))
  return x, y
