"""The configured optimiser against the same chain built by hand with optax."""

import jax
import jax.numpy as jnp
import optax
import pytest
from optax import tree_utils as otu

from gnp import train
from gnp import transforms
from tests.helpers import tiny_mnist1d

LR, DECAY, CLIP = 0.05, 0.1, 0.2


def _by_hand(name, transform, nesterov):
  """Clipping -> coupled decay (SGD, Adam) -> GC or NGS -> the optimiser."""
  gc_or_ngs = {"centralize": transforms.centralize(),
               "standardize": transforms.standardize()}[transform]
  if name == "adamw":
    return optax.chain(optax.clip_by_global_norm(CLIP), gc_or_ngs,
                       optax.adamw(LR, b1=0.8, b2=0.95, weight_decay=DECAY))
  last = (optax.sgd(LR, momentum=0.9, nesterov=nesterov) if name == "sgd"
          else optax.adam(LR, b1=0.8, b2=0.95))
  return optax.chain(optax.clip_by_global_norm(CLIP),
                     optax.add_decayed_weights(DECAY), gc_or_ngs, last)


@pytest.mark.parametrize("name, transform, nesterov", [
    ("sgd", "centralize", False), ("sgd", "standardize", True),
    ("adam", "centralize", False), ("adamw", "standardize", False)])
def test_the_configured_chain_equals_optax_by_hand(name, transform, nesterov):
  config = tiny_mnist1d(**{
      "optimizer.name": name, "optimizer.learning_rate": LR,
      "optimizer.weight_decay": DECAY, "optimizer.grad_clip": CLIP,
      "optimizer.momentum": 0.9, "optimizer.nesterov": nesterov,
      "optimizer.b1": 0.8, "optimizer.b2": 0.95,
      f"optimizer.{transform}": True})
  exp = train.create_experiment(config)
  state = exp.init()
  params = jax.device_get(state.params)
  tx = _by_hand(name, transform, nesterov)
  opt_state = tx.init(params)

  def mean_loss(p, batch):
    x, y = batch
    logits = exp.model.apply({"params": p}, exp.dataset.preprocess(x))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  start = params
  for step in range(3):  # Past the first step, the moments matter too.
    batch = exp.train_batch(step)
    grads = jax.grad(mean_loss)(params, batch)
    assert otu.tree_norm(grads) > CLIP  # So that clipping acts.
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    state, _ = exp.step(state, batch)
    # Compared as a whole: Adam's first steps are ±lr wherever |g| >> eps,
    # so an entry whose gradient is near 0 may flip on the gradient's last
    # bit; a missing or misplaced link moves the update by a large fraction.
    expected = otu.tree_sub(params, start)
    error = otu.tree_sub(otu.tree_sub(state.params, start), expected)
    assert otu.tree_norm(error) < 1e-3 * otu.tree_norm(expected), (
        step, float(otu.tree_norm(error) / otu.tree_norm(expected)))
