"""The train step: the state, the loss and one jitted update.

`train_step(state, batch, *, ...)` is a pure function; `gnp.experiment` binds
its fixed dependencies (model, optimiser, regulariser, preprocessing) with
`functools.partial` and jits it over a 1-D device mesh: the state is
replicated, the batch is split along the ``data`` axis, and XLA inserts the
reductions. Every quantity is defined on the *global* batch (the mean loss,
‖∇L‖, batch-norm statistics), so results depend on the device count only
through rounding — except for m-sharpness, where ``gnp.group_size`` /
``sam.group_size`` sets the groups explicitly.

Per-step randomness is ``fold_in(state.rng, state.step)``, split into the
augmentation's key and the loss's key (dropout, Hessian probes, GVR views).

Gradient accumulation (``grad_accum_steps`` = k > 1): the regulariser gets
``gnp.penalties.accumulate(loss_fn, k)``, which evaluates the batch in k
microbatches of B/k examples in sequence, and computes the whole batch's
step from it (`gnp.penalties.accumulation`), in the memory of a microbatch's
activations. Two things depend on k: dropout masks (drawn per microbatch)
and batch normalisation, which normalises each microbatch with its own
statistics; the running statistics become the mean over the microbatches of
each one's update, m s + (1 − m) mean_j μ_j for momentum m and microbatch
statistics μ_j (for the means, the whole batch's; for the variances, the
mean within-microbatch variance, which lacks the variance between the
microbatches' means).

Faults never cost a host round trip per step: the step itself refuses a
non-finite update and records it in the state (`TrainState.nonfinite_step`),
and the loop (`gnp.loop`) reads that record only where it syncs anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from optax import tree_utils as otu

from gnp import penalties
from gnp import regularizers


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: steps taken.
  params: Any
  batch_stats: Any  # {} for models without batch normalisation.
  opt_state: Any
  rng: jax.Array  # The run's base key, typed; per-step keys fold it in.
  # float32 scalars by section and name, as `hyperparameters` gives them: the
  # step reads the learning rate, weight decay and the method's strengths
  # from here, so states differing only in these share one compiled step and
  # can be stacked and vmapped (`gnp.population`).
  hparams: Any
  # Non-finite steps (int32 scalars, so that states stack and vmap). The
  # first step, numbered as in the log (state.step + 1), whose loss or
  # update was NaN or Inf, -1 if none; with on_nonfinite="stop" the state is
  # frozen from it on, so it still holds the last good values.
  nonfinite_step: jax.Array
  nonfinite_what: jax.Array  # Which quantity: NONFINITE_LOSS or _UPDATE.
  skipped_steps: jax.Array  # on_nonfinite="skip": updates refused so far.


NONFINITE_LOSS, NONFINITE_UPDATE = 1, 2
NONFINITE_NAMES = {NONFINITE_LOSS: "loss", NONFINITE_UPDATE: "update"}


def hyperparameters(config: ml_collections.ConfigDict) -> dict:
  """The config's traced hyper-parameters: ``{section: {name: float32}}``.

  The learning rate, weight decay and L2 coefficient, and the method's
  strengths and radii (`gnp.regularizers.METHODS`) that are set (not None).
  Every other key shapes the compiled step. Whether weight decay and L2 are
  applied at all is decided by the config (nonzero or not), not by the
  traced value.
  """
  opt = config.optimizer
  values = {"optimizer": {name: opt[name] for name in
                          ("learning_rate", "weight_decay", "l2")}}
  traced = regularizers.traced_values(config)
  if traced:
    values[config.method] = traced
  return jax.tree.map(lambda v: np.float32(v), values)


def hyperparameter_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The dotted config keys of `hyperparameters`, e.g. ``gnvr.lam``."""
  return tuple(f"{section}.{name}"
               for section, names in hyperparameters(config).items()
               for name in names)


def make_loss_fn(model, batch_stats, *, l2=None) -> Callable:
  """``loss_fn(params, (x, y), key) -> (per-example losses, aux)``.

  ``l2`` (a float or a traced array; None = no term) adds
  ``0.5 * l2 * ‖kernels‖²`` (kernels: the leaves with ndim > 1) to every
  example's loss, declared with `gnp.penalties.with_l2` so that ghost norms
  (GNVR, per-example clipping) keep applying to the model.

  Models with batch normalisation run in training mode and return their new
  statistics in ``aux``; the regularisers take ``aux`` from the unperturbed
  pass, so GNP/SAM update the statistics once per step, from θ.
  """

  def loss_fn(params, batch, key):
    x, y = batch
    variables = {"params": params}
    rngs = {"dropout": key} if key is not None else {}
    if batch_stats:
      variables["batch_stats"] = batch_stats
      logits, updates = model.apply(
          variables, x, train=True, mutable=["batch_stats"], rngs=rngs
      )
      new_stats = updates["batch_stats"]
    else:
      logits, new_stats = model.apply(variables, x, train=True, rngs=rngs), {}
    logits = logits.astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    aux = {
        "cross_entropy": cross_entropy,
        "correct": (jnp.argmax(logits, -1) == y).astype(jnp.float32),
        "batch_stats": new_stats,
    }
    return cross_entropy, aux

  if l2 is None:
    return loss_fn
  return penalties.with_l2(loss_fn, l2, mask=_kernels)


def _kernels(params):
  return jax.tree.map(lambda w: w.ndim > 1, params)


# --- The step --------------------------------------------------------------


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(state: TrainState, batch, *, model, make_tx, unit_schedule,
               regularizer, preprocess, augment, use_l2,
               skip_nonfinite=False, grad_accum_steps=1):
  """One update of ``state`` on a global batch; returns (state, metrics).

  ``make_tx(schedule, weight_decay)`` builds the optax chain and
  ``unit_schedule`` is the learning-rate schedule for a peak of 1: both are
  completed with the hyper-parameters in ``state.hparams``.

  The metrics, scalars of this step:

  * ``loss``: the task loss L(θ), the mean cross-entropy plus the L2 term
    (``optimizer.l2``) if any; ``cross_entropy`` and ``accuracy`` of the
    batch, at θ, in training mode.
  * ``objective``: the value the method differentiates (L(θ) for plain;
    L(θ) plus the weighted penalty for GNP, GNVR, GVR and the Hessian
    penalty; L(θ + ε) for SAM), so ``objective - loss`` is what the method
    adds to the loss. ``penalty``: the method's unweighted penalty term
    (e.g. ‖∇L‖ for GNP), as `gnp.penalties` documents it; 0 for plain.
  * ``grad_norm``: ‖∇L(θ)‖, where the method computes ∇L.
  * ``objective_grad_norm``: the norm of the method's gradient, the
    direction handed to the optimiser. ``update_norm``: ‖θ' − θ‖, the norm
    of the optimiser's update (learning rate, momentum, clipping and weight
    decay included). ``param_norm``: ‖θ'‖ after the update.
  * ``learning_rate``: the rate this step applied; ``nonfinite``: 1 if the
    update was refused (below), else 0.
  * ``sam_step``, with ``sam.probability`` (RST) only: 1 if this step took
    SAM's gradient, 0 if the plain one; its mean is the fraction of SAM
    steps.

  A NaN or Inf in the loss, the gradient, the new parameters or the batch
  statistics is never applied. With ``skip_nonfinite`` the step
  counts it and moves on to the next batch; otherwise it records the step in
  ``state.nonfinite_step`` and the state stays as it was from then on.

  ``grad_accum_steps`` = k > 1 computes the step in k sequential
  microbatches (module docstring); the metrics are the whole batch's.
  """
  hparams = state.hparams["optimizer"]
  # The schedule follows the step number, not optax's count: a step skipped
  # for a non-finite update (on_nonfinite="skip") stops optax's count, but
  # not the step number that the regulariser's warm-up and the log follow.
  learning_rate = hparams["learning_rate"] * unit_schedule(state.step)
  tx = make_tx(lambda count: learning_rate, hparams["weight_decay"])
  key = jax.random.fold_in(state.rng, state.step)
  augment_key, loss_key = jax.random.split(key)
  x, y = batch
  x = preprocess(x)
  if regularizer.views is None:  # GVR augments its own two views.
    x = augment(augment_key, x)
  loss_fn = make_loss_fn(model, state.batch_stats,
                         l2=hparams["l2"] if use_l2 else None)
  loss_fn = penalties.accumulate(loss_fn, grad_accum_steps)  # 1: unchanged.
  grad_fn = regularizer.make(loss_fn, state.step,
                             state.hparams.get(regularizer.method, {}))
  (objective, aux), grads, stats = grad_fn.with_stats(
      state.params, (x, y), loss_key
  )
  batch_stats = aux["batch_stats"]
  if regularizer.group_size is not None or grad_accum_steps > 1:
    # One pass per m-sharpness group and per microbatch, stacked along the
    # leading axes: the new running statistics are the passes' mean.
    batch_stats = jax.tree.map(
        lambda new, old: jnp.mean(new.reshape((-1,) + old.shape), axis=0),
        batch_stats, state.batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": stats["task_loss"],
      "objective": objective,
      "cross_entropy": jnp.mean(aux["cross_entropy"]),
      "accuracy": jnp.mean(aux["correct"]),
      "penalty": stats["penalty"],
      "objective_grad_norm": otu.tree_norm(grads),
      "update_norm": otu.tree_norm(updates),
      "param_norm": otu.tree_norm(params),
      "learning_rate": learning_rate,
  }
  if "grad_norm" in stats:
    metrics["grad_norm"] = stats["grad_norm"]
  if "sam_step" in stats:  # RST: 1 on a SAM step, 0 on a plain one.
    metrics["sam_step"] = stats["sam_step"]
  # The norms are computed for the metrics anyway, and a NaN or Inf anywhere
  # in the gradient or the new parameters makes them non-finite; a scan of
  # every leaf cost NGS ~15% of its step on the mnist1d MLP. The optimiser
  # state follows from the gradient, so it is finite when the gradient is.
  update_finite = (jnp.isfinite(metrics["objective_grad_norm"])
                   & jnp.isfinite(metrics["param_norm"])
                   & _all_finite(batch_stats))
  fault = jnp.where(
      jnp.isfinite(objective) & jnp.isfinite(stats["task_loss"]),
      jnp.where(update_finite, 0, NONFINITE_UPDATE),
      NONFINITE_LOSS).astype(jnp.int32)
  frozen = state.nonfinite_step >= 0  # Only ever set without skip_nonfinite.
  apply = (fault == 0) & ~frozen
  # Selects rather than lax.cond: both branches are computed anyway, and a
  # select stays a select under vmap.
  keep = lambda new, old: jax.tree.map(
      lambda a, b: jnp.where(apply, a, b), new, old)
  metrics["nonfinite"] = (~apply).astype(jnp.float32)  # Not applied.
  if skip_nonfinite:
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (fault != 0))
  else:
    first = (fault != 0) & ~frozen
    new_state = state.replace(
        step=jnp.where(apply, state.step + 1, state.step),
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_step=jnp.where(first, state.step + 1, state.nonfinite_step),
        nonfinite_what=jnp.where(first, fault, state.nonfinite_what))
  return new_state, metrics


def train_step_on_device_data(state: TrainState, train_data, epoch_indices,
                              **kwargs):
  """`train_step` on the batch gathered from the device-resident train split.

  ``epoch_indices[i]`` holds the example indices of the epoch's step i (from
  `gnp.data.pipeline`), split over the devices along the batch axis, so the
  step needs nothing from the host: the epoch's indices cross once per
  epoch, the data once per run.
  """
  idx = epoch_indices[state.step % epoch_indices.shape[0]]
  batch = tuple(jnp.take(a, idx, axis=0) for a in train_data)
  return train_step(state, batch, **kwargs)


def train_steps_on_device_data(state: TrainState, train_data, epoch_indices,
                               num_steps: int, **kwargs):
  """``num_steps`` consecutive `train_step_on_device_data` steps in one
  program (``lax.scan``): the same steps, one dispatch. The metrics come back
  stacked, ``[num_steps]`` each. The steps must lie in one epoch (the one
  ``epoch_indices`` holds)."""
  def one(state, _):
    return train_step_on_device_data(state, train_data, epoch_indices,
                                     **kwargs)
  return jax.lax.scan(one, state, length=num_steps)


def summarise_steps(metrics: dict) -> dict[str, float]:
  """Means of per-step metrics (``{name: [steps]}``) over the applied steps.

  Steps whose update was not applied (``nonfinite``) are left out of the
  means and counted in ``skipped``.
  """
  applied = np.asarray(metrics["nonfinite"]) == 0
  out = {}
  for name, values in metrics.items():
    if name != "nonfinite":
      values = np.asarray(values)[applied]
      out[name] = float(np.mean(values)) if values.size else float("nan")
  out["skipped"] = float(np.sum(~applied))
  return out
