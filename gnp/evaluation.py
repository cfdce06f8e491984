"""Evaluation: exact sums of loss and correct predictions over a split.

`eval_step` sums over the real rows of one padded batch (the mask marks
them); `evaluation_sums` runs it over a whole split in batches of
``eval_batch_size`` (rounded up to a multiple of the device count), so the
result is the split's exact mean whatever its size.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from gnp.data import pipeline
from gnp.step import TrainState


def eval_step(state: TrainState, batch, *, model, preprocess):
  """Sums of loss and correct predictions over the real (unpadded) rows."""
  x, y, mask = batch
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = model.apply(variables, preprocess(x), train=False)
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}



def evaluation_sums(state, arrays, *, eval_fn: Callable, place: Callable,
                    batch_size: int, num_devices: int) -> dict:
  """Sums of ``eval_fn``'s loss, correct predictions and count over a split.

  ``arrays`` is ``(x, y)`` as numpy; ``place`` puts a padded global batch
  ``(x, y, mask)`` on the devices. The batch size is ``batch_size`` rounded
  up to a multiple of ``num_devices``. The sums come back as numpy.
  """
  batch_size = num_devices * -(-batch_size // num_devices)
  totals = None
  for batch in pipeline.eval_batches(*arrays, batch_size):
    sums = eval_fn(state, place(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return jax.device_get(totals)


def means(totals: dict) -> dict[str, float]:
  """``{"loss", "accuracy"}``: the split's means from `evaluation_sums`."""
  return {"loss": float(totals["loss"] / totals["count"]),
          "accuracy": float(totals["correct"] / totals["count"])}
