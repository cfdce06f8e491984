"""mnist1d (Greydanus, 2020), generated on the host from the package's code.

Ten 1-D templates of digits, each sample a random scaling, translation,
shear and correlated plus i.i.d. noise of one of them, subsampled to 40
points; the whole set standardised to mean 0 and standard deviation 1.
``mnist1d.data.make_dataset`` generates it from a seed, so nothing is
downloaded (``mnist1d.data.get_dataset`` would fetch a pickle from GitHub).
With the package's default arguments and num_samples=5000 the split is
4,000 train / 1,000 test.

Generating 5,000 samples takes about 1 s on one CPU core, so the arrays are
cached per (num_samples, seed): the many short runs of a hyper-parameter study
share one generation.

Reference: S. Greydanus, "Scaling down deep learning", 2020,
https://arxiv.org/abs/2011.14439
"""

from __future__ import annotations

import functools
import random

import numpy as np

NUM_CLASSES = 10

Split = tuple[np.ndarray, np.ndarray]


def load(num_samples: int, *, seed: int) -> tuple[Split, Split]:
  """Generates mnist1d: ``((x_train, y_train), (x_test, y_test))``.

  Args:
    num_samples: train + test; the package makes ``num_samples // 10`` of
      each digit and puts the first 80% (after shuffling) in train.
    seed: the generation seed (the package's default is 42).

  Returns:
    x float32 [N, 40] and y int32 [N] for each split. The arrays are shared
    with the cache and read-only; index or copy them to modify.
  """
  x_train, y_train, x_test, y_test = _generate(num_samples, seed)
  return (x_train, y_train), (x_test, y_test)


@functools.lru_cache(maxsize=16)
def _generate(num_samples: int, seed: int) -> tuple[np.ndarray, ...]:
  # Imported here: the package pulls in scipy and matplotlib (~1 s), which
  # runs on other datasets need not pay.
  from mnist1d import data  # pylint: disable=g-import-not-at-top

  args = data.get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  # make_dataset reseeds the global `random` and `np.random` generators;
  # restore them so that loading data does not change anyone else's draws.
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    d = data.make_dataset(args)
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
  arrays = (d["x"].astype(np.float32), d["y"].astype(np.int32),
            d["x_test"].astype(np.float32), d["y_test"].astype(np.int32))
  for a in arrays:
    a.flags.writeable = False  # Shared by every caller of the cache.
  return arrays
