"""Which examples make up each batch: a pure function of (seed, step).

The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(N)``
and step ``s`` takes the ``s % steps_per_epoch``-th slice of its epoch's
order; the remainder of an epoch (N mod batch_size examples, different ones
each epoch) is dropped. Nothing is carried from step to step, so a run
resumed from a checkpoint at step ``s`` sees exactly the batches an
uninterrupted run would: no iterator state to save.

The other host-side randomness of gnp.data (validation split, label noise,
synthetic data) comes from `rng`, named streams that never coincide with an
epoch order.

>>> steps_per_epoch(10, 4)
2
>>> epoch = [train_indices(6, 3, seed=0, step=s) for s in (0, 1)]
>>> sorted(np.concatenate(epoch).tolist())
[0, 1, 2, 3, 4, 5]
>>> batches = eval_batches(np.zeros((5, 2)), np.zeros(5), batch_size=3)
>>> [mask.tolist() for _, _, mask in batches]
[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Iterator
import functools
import numbers
import zlib

import numpy as np

from gnp.errors import ConfigError


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches in one pass over ``num_examples`` (the remainder is dropped).

  Raises:
    ConfigError: if ``batch_size`` is below 1 or above ``num_examples``.
  """
  if not _is_int(batch_size) or not 1 <= batch_size <= num_examples:
    raise ConfigError(
        f"batch_size must be an integer in [1, {num_examples}] (the number of"
        f" training examples), got {batch_size!r}."
    )
  return num_examples // batch_size


def train_indices(num_examples: int, batch_size: int, seed: int,
                  step: int) -> np.ndarray:
  """The indices of the training examples in the batch of (0-based) ``step``.

  Args:
    num_examples: the size of the training split.
    batch_size: examples per batch.
    seed: a non-negative integer, the run's seed.
    step: a non-negative integer; step // steps_per_epoch is the epoch.

  Returns:
    int64 array of shape [batch_size], without repeats; over the steps of an
    epoch, every example appears at most once.
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  if step < 0:
    raise ValueError(f"step must be non-negative, got {step}.")
  epoch, within = divmod(step, per_epoch)
  start = within * batch_size
  order = _epoch_order(num_examples, seed, epoch)
  return order[start:start + batch_size].copy()


def epoch_indices(num_examples: int, batch_size: int, seed: int,
                  epoch: int) -> np.ndarray:
  """int32 [steps_per_epoch, batch_size]: row i is `train_indices` of the
  epoch's step i (the whole epoch's batches at once, for the device)."""
  steps = steps_per_epoch(num_examples, batch_size)
  order = _epoch_order(num_examples, seed, epoch)
  return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


# A permutation of 50,000 indices takes about a millisecond; a step takes one
# slice of it. A few entries cover runs that interleave datasets or seeds.
@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False  # Shared by the cache.
  return order


def eval_batches(x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                    np.ndarray]]:
  """Yields ``(x, y, mask)`` batches covering every example once, in order.

  The last batch is padded with zeros to ``batch_size`` so that every batch
  has one shape and the evaluation step compiles once; ``mask`` (float32,
  1 for a real example, 0 for padding) says which rows to count.

  Raises:
    ConfigError: if ``batch_size`` is below 1.
  """
  if not _is_int(batch_size) or batch_size < 1:
    raise ConfigError(f"eval batch size must be a positive integer, got"
                      f" {batch_size!r}.")
  n = len(y)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    xb, yb = x[start:stop], y[start:stop]
    mask = np.ones(batch_size, np.float32)
    if (pad := batch_size - (stop - start)):
      xb = np.concatenate([xb, np.zeros((pad, *x.shape[1:]), x.dtype)])
      yb = np.concatenate([yb, np.zeros((pad, *y.shape[1:]), y.dtype)])
      mask[stop - start:] = 0
    yield xb, yb, mask


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def rng(seed: int, stream: str) -> np.random.Generator:
  """A numpy generator for one named use of the run's seed.

  Streams are told apart by a spawn key (numpy's mechanism for independent
  streams) made from the name, so they are independent of each other and of
  the epoch orders above, which use the seed as plain entropy.

  >>> a, b = rng(0, "holdout"), rng(0, "holdout")
  >>> bool(a.integers(100) == b.integers(100))
  True
  """
  key = zlib.crc32(stream.encode())
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))
