"""Synthetic classification data: Gaussian inputs, a random linear teacher.

For smoke runs and tests of any input shape without a dataset on disk. Each
input is i.i.d. standard normal; its label is the arg-max of ``x W`` for a
fixed random ``W`` of shape [prod(input_shape), num_classes], so the labels
are a linear function of the input that a model can learn (to 100% with
enough data), and the classes are balanced in expectation.
"""

from __future__ import annotations

import math

import numpy as np

from gnp.data import pipeline


def make(input_shape: tuple[int, ...], num_classes: int, *, num_train: int,
         num_test: int, seed: int):
  """Generates ``((x_train, y_train), (x_test, y_test))``.

  Args:
    input_shape: per-example shape, e.g. ``(32, 32, 3)``.
    num_classes: the number of labels.
    num_train: examples in the train split.
    num_test: examples in the test split.
    seed: a non-negative integer; the same seed gives the same arrays.

  Returns:
    x float32 [N, *input_shape], y int32 [N], for each split.
  """
  dim = math.prod(input_shape)
  # One stream each, so that changing num_train leaves the teacher and the
  # test set as they were.
  teacher = pipeline.rng(seed, "synthetic/teacher").standard_normal(
      (dim, num_classes))
  teacher /= math.sqrt(dim)  # Unit-variance logits whatever the input size.

  def split(stream, n):
    x = pipeline.rng(seed, stream).standard_normal((n, *input_shape),
                                                   dtype=np.float32)
    y = np.argmax(x.reshape(n, dim) @ teacher, axis=1).astype(np.int32)
    return x, y

  return (split("synthetic/train", num_train),
          split("synthetic/test", num_test))
