"""Training: config -> (data, model, regulariser, optimiser) -> step -> loop.

`train_and_evaluate(config, workdir)` is the whole run; `gnp.main` only
parses flags and calls it. The step is one jitted function over a 1-D device
mesh: the state is replicated, the batch is split along the ``data`` axis,
and XLA inserts the reductions. Every quantity is defined on the *global*
batch (the mean loss, ‖∇L‖, batch-norm statistics), so results depend on the
device count only through rounding — except for m-sharpness, where
``gnp.group_size`` / ``sam.group_size`` sets the groups explicitly.

Per-step randomness is ``fold_in(state.rng, step)`` and the data order a
function of (seed, epoch), so a run resumed from a checkpoint continues the
same data order and random stream as an uninterrupted one.

Faults never cost a host round trip per step: the step itself refuses a
non-finite update and records it in the state, and the loop reads that record
only where it syncs anyway (log, evaluation and checkpoint steps), before
anything is saved. SIGTERM / SIGINT set a flag the loop reads between steps;
it saves and raises `gnp.errors.Preempted`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax import tree_utils as otu

from gnp import checkpoints
from gnp import config as config_lib
from gnp import data as data_lib
from gnp import models
from gnp import optim
from gnp import regularizers
from gnp.checkpoints import Checkpointer
from gnp.data import augment as augment_lib
from gnp.data import pipeline
from gnp.errors import ConfigError
from gnp.errors import NonFiniteError
from gnp.errors import Preempted
from gnp.writers import MetricWriter
from gnp.writers import Progress
from gnp.writers import write_atomically


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: steps taken.
  params: Any
  batch_stats: Any  # {} for models without batch normalisation.
  opt_state: Any
  rng: jax.Array  # The run's base key (raw uint32[2]); per-step keys fold in.
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
_NONFINITE_NAMES = {NONFINITE_LOSS: "loss", NONFINITE_UPDATE: "update"}


def hyperparameters(config: ml_collections.ConfigDict) -> dict:
  """The config's traced hyper-parameters: ``{section: {name: float32}}``.

  The learning rate, weight decay and L2 coefficient, and the method's
  strengths and radii (`gnp.regularizers.METHODS`). Every other key shapes
  the compiled step. Whether weight decay and L2 are applied at all is
  decided by the config (nonzero or not), not by the traced value.
  """
  opt = config.optimizer
  values = {"optimizer": {name: opt[name] for name in
                          ("learning_rate", "weight_decay", "l2")}}
  names = regularizers.METHODS[config.method][1]
  if names:
    values[config.method] = {name: config[config.method][name]
                             for name in names}
  return jax.tree.map(lambda v: np.float32(v), values)


def hyperparameter_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The dotted config keys of `hyperparameters`, e.g. ``gnvr.lam``."""
  return tuple(f"{section}.{name}"
               for section, names in hyperparameters(config).items()
               for name in names)


# --- Building blocks -------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, dataset) -> Any:
  m = config.model
  dtype = jnp.dtype(m.dtype)
  if m.name == "mlp":
    return models.create("mlp", features=(*m.hidden, dataset.num_classes))
  if m.name == "cnn":
    return models.create(
        "cnn", features=tuple(m.hidden), num_classes=dataset.num_classes,
        ndim=len(dataset.input_shape) - 1,
    )
  kwargs = {"num_classes": dataset.num_classes, "dtype": dtype}
  if m.name == "wide_resnet":
    kwargs.update(depth=m.depth, width=m.width, dropout_rate=m.dropout_rate)
  return models.create(m.name, **kwargs)


def make_loss_fn(model, batch_stats, *, l2=None) -> Callable:
  """``loss_fn(params, (x, y), key) -> (per-example losses, aux)``.

  ``l2`` (a float or a traced array; None = no term) adds
  ``0.5 * l2 * ‖kernels‖²`` to every example's loss.

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
    losses = cross_entropy
    if l2 is not None:
      kernels = [w for w in jax.tree.leaves(params) if w.ndim > 1]
      losses = losses + 0.5 * l2 * otu.tree_norm(kernels, squared=True)
    aux = {
        "cross_entropy": cross_entropy,
        "correct": (jnp.argmax(logits, -1) == y).astype(jnp.float32),
        "batch_stats": new_stats,
    }
    return losses, aux

  return loss_fn


# --- The step --------------------------------------------------------------


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(state: TrainState, batch, *, model, make_tx, unit_schedule,
               regularizer, preprocess, augment, use_l2,
               skip_nonfinite=False):
  """One update of ``state`` on a global batch; returns (state, metrics).

  ``make_tx(schedule, weight_decay)`` builds the optax chain and
  ``unit_schedule`` is the learning-rate schedule for a peak of 1: both are
  completed with the hyper-parameters in ``state.hparams``.

  A NaN or Inf in the loss, the gradient, the new parameters or the batch
  statistics is never applied. With ``skip_nonfinite`` the step
  counts it and moves on to the next batch; otherwise it records the step in
  ``state.nonfinite_step`` and the state stays as it was from then on.
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
  grad_fn = regularizer.make(loss_fn, state.step,
                             state.hparams.get(regularizer.method, {}))
  (objective, aux), grads, stats = grad_fn.with_stats(
      state.params, (x, y), loss_key
  )
  batch_stats = aux["batch_stats"]
  if regularizer.group_size is not None:  # m-sharpness: one pass per group.
    batch_stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": stats["task_loss"],
      "objective": objective,
      "cross_entropy": jnp.mean(aux["cross_entropy"]),
      "accuracy": jnp.mean(aux["correct"]),
      "penalty": stats["penalty"],
      "update_norm": otu.tree_norm(grads),
      "param_norm": otu.tree_norm(params),
      "learning_rate": learning_rate,
  }
  if "grad_norm" in stats:
    metrics["grad_norm"] = stats["grad_norm"]
  # The norms are computed for the metrics anyway, and a NaN or Inf anywhere
  # in the gradient or the new parameters makes them non-finite; a scan of
  # every leaf cost NGS ~15% of its step on the mnist1d MLP. The optimiser
  # state follows from the gradient, so it is finite when the gradient is.
  update_finite = (jnp.isfinite(metrics["update_norm"])
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


# --- Placement -------------------------------------------------------------


def _to_device(arrays, sharding, axis=0):
  """This process's slice (along ``axis``) of global arrays -> global arrays."""
  if sharding.is_fully_replicated:
    return tuple(jax.make_array_from_process_local_data(sharding, a, a.shape)
                 for a in arrays)
  size = arrays[0].shape[axis] // jax.process_count()
  start = jax.process_index() * size
  return tuple(
      jax.make_array_from_process_local_data(
          sharding, np.take(a, np.arange(start, start + size), axis=axis),
          a.shape)
      for a in arrays
  )


# --- The run ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a config turns into, before the loop: importable, testable.

  ``init()`` gives the initial state, replicated over the mesh; ``step`` and
  ``eval`` are the jitted step and evaluation; ``batch(arrays)`` places this
  process's rows of a global batch onto the devices.
  """

  config: ml_collections.ConfigDict
  dataset: Any
  model: Any
  regularizer: regularizers.Regularizer
  steps_per_epoch: int
  total_steps: int
  mesh: jax.sharding.Mesh
  abstract_state: TrainState
  init: Callable[[], TrainState]
  # (rng, hparams) -> TrainState, pure: the state of another seed or
  # hyper-parameter setting of the same compiled step (`gnp.population`).
  init_state: Callable
  step: Callable  # (state, (x, y)) -> (state, metrics)
  # (state, train_data, epoch_indices) -> (state, metrics): what the loop runs.
  step_on_device_data: Callable
  eval: Callable  # (state, (x, y, mask)) -> sums

  def batch(self, arrays):
    return _to_device(arrays, NamedSharding(self.mesh, P("data")))

  def train_data(self):
    """The train split, replicated on every device."""
    return _to_device(self.dataset.train, NamedSharding(self.mesh, P()))

  def epoch_indices(self, epoch: int):
    """[steps_per_epoch, batch_size] example indices, split along the batch."""
    idx = pipeline.epoch_indices(len(self.dataset.train[0]),
                                 self.config.batch_size, self.config.seed,
                                 epoch)
    return _to_device((idx,), NamedSharding(self.mesh, P(None, "data")),
                      axis=1)[0]

  def train_batch(self, step: int):
    """The global batch of (0-based) ``step``, placed on the devices."""
    x, y = self.dataset.train
    idx = pipeline.train_indices(len(x), self.config.batch_size,
                                 self.config.seed, step)
    return self.batch((x[idx], y[idx]))

  def evaluation_sums(self, state, arrays, *, eval_fn=None, place=None):
    """Sums of `eval`'s loss, correct predictions and count over ``arrays``.

    ``arrays`` is a split, ``(x, y)`` as numpy. ``eval_fn`` and ``place``
    stand in for `eval` and `batch` (`gnp.population` passes its vmapped
    evaluation). The sums come back as numpy.
    """
    eval_fn, place = eval_fn or self.eval, place or self.batch
    size = self.mesh.size
    batch_size = size * -(-self.config.eval_batch_size // size)
    totals = None
    for batch in pipeline.eval_batches(*arrays, batch_size):
      sums = eval_fn(state, place(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return jax.device_get(totals)

  def evaluate(self, state, arrays) -> dict[str, float]:
    totals = self.evaluation_sums(state, arrays)
    return {"loss": float(totals["loss"] / totals["count"]),
            "accuracy": float(totals["correct"] / totals["count"])}


def data_seed(config: ml_collections.ConfigDict) -> int:
  """The seed that fixes the data: ``dataset.seed``, else ``seed``."""
  return config.seed if config.dataset.seed is None else config.dataset.seed


def create_experiment(config: ml_collections.ConfigDict,
                      dataset=None) -> Experiment:
  """Validates ``config``, loads the data (unless given) and builds the step.

  Raises `gnp.errors.UserError` for a mistake in the input, before anything
  is compiled. Nothing is written.
  """
  config_lib.validate(config, num_devices=jax.device_count())
  if dataset is None:
    dataset = data_lib.load(config.dataset, seed=data_seed(config))
  steps_per_epoch = pipeline.steps_per_epoch(len(dataset.train[0]),
                                             config.batch_size)
  model = build_model(config, dataset)
  unit_schedule = optim.learning_rate_schedule(
      config.optimizer, steps_per_epoch, config.num_epochs * steps_per_epoch,
      peak=1.0)
  make_tx = functools.partial(optim.build_optimizer, config.optimizer)
  hparams = hyperparameters(config)
  augment = augment_lib.make_augment(config.augment)
  regularizer = regularizers.build_regularizer(config, steps_per_epoch, augment)

  def init(rng, hparams=hparams):
    sample = jnp.zeros((1, *dataset.input_shape), jnp.float32)
    variables = model.init({"params": rng, "dropout": rng}, sample, train=False)
    params = variables["params"]
    tx = make_tx(optax.constant_schedule(0.0), 0.0)  # The state's structure.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng,
                      hparams=jax.tree.map(jnp.asarray, hparams),
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      nonfinite_what=jnp.zeros((), jnp.int32),
                      skipped_steps=jnp.zeros((), jnp.int32))

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  if config.method == "gnvr" and abstract.batch_stats:
    raise ConfigError(
        "method='gnvr' needs per-example gradients, which batch normalisation"
        f" in training mode makes ill-defined; model {config.model.name!r} has"
        " BatchNorm layers."
    )

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P("data"))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  step_args = dict(model=model, make_tx=make_tx, unit_schedule=unit_schedule,
                   regularizer=regularizer, preprocess=dataset.preprocess,
                   augment=augment, use_l2=bool(config.optimizer.l2),
                   skip_nonfinite=config.on_nonfinite == "skip")
  step_fn = jax.jit(
      functools.partial(train_step, **step_args),
      in_shardings=(state_sharding, split),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
  )
  step_on_device_data = jax.jit(
      functools.partial(train_step_on_device_data, **step_args),
      in_shardings=(state_sharding, replicated,
                    NamedSharding(mesh, P(None, "data"))),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
  )
  eval_fn = jax.jit(
      functools.partial(eval_step, model=model, preprocess=dataset.preprocess),
      in_shardings=(state_sharding, split), out_shardings=replicated,
  )
  return Experiment(
      config=config, dataset=dataset, model=model, regularizer=regularizer,
      steps_per_epoch=steps_per_epoch,
      total_steps=config.num_steps or config.num_epochs * steps_per_epoch,
      mesh=mesh, abstract_state=abstract,
      init=lambda: jax.jit(init, out_shardings=state_sharding)(rng),
      init_state=init,
      step=step_fn, step_on_device_data=step_on_device_data, eval=eval_fn,
  )


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


def _raise_if_nonfinite(state: TrainState, checkpointer: Checkpointer) -> None:
  """Raises `NonFiniteError` if the state recorded a non-finite step.

  One scalar crosses to the host; the loop calls this only where it syncs
  anyway, and always before a checkpoint is saved.
  """
  step, what = jax.device_get((state.nonfinite_step, state.nonfinite_what))
  if step < 0:
    return
  last = checkpointer.latest_step()
  kept = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
          if last is not None else "no checkpoint was saved")
  raise NonFiniteError(
      f"non-finite {_NONFINITE_NAMES[int(what)]} (NaN or Inf) at step {step};"
      f" the run stopped and {kept}. Lower the learning rate, or set"
      " --config.on_nonfinite=skip to skip such steps.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset=None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Returns the final summary, also written to ``workdir/summary.json``; a
  run that had finished returns its summary and changes no file. The
  workdir is this run's alone while it runs (`checkpoints.WorkdirLock`).
  Raises `gnp.errors.UserError` for a mistake in the input (including a
  workdir that is read-only, holds a different config's run or is in use by
  another run), before any compilation and before anything is written;
  `gnp.errors.NonFiniteError` when a step's loss or update is not finite and
  ``on_nonfinite`` is "stop"; `gnp.errors.Preempted` after saving on SIGTERM
  or SIGINT.
  ``dataset`` replaces the config's data (tests, notebooks).
  """
  config_lib.validate(config, num_devices=jax.device_count())
  checkpoints.check_workdir(workdir, config)
  exp = create_experiment(config, dataset)
  os.makedirs(workdir, exist_ok=True)
  with checkpoints.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    # Again under the lock: a run that held it may have written its config.
    checkpoints.check_workdir(workdir, config)
    return _train_and_evaluate_locked(config, workdir, exp)


class _WallClock:
  """Wall time summed over the invocations of one run.

  ``WORKDIR/wall_time.json`` maps each checkpoint step to the run's wall time
  and invocation count when it was saved, so that a resumed run starts from
  the times of the checkpoint it resumes (the work after it, done again, is
  counted when it is done again). Only process 0 writes it.
  """

  def __init__(self, workdir: str, start: int):
    self._path = os.path.join(workdir, "wall_time.json")
    self._records = {}
    if os.path.exists(self._path):
      with open(self._path) as f:
        self._records = json.load(f)
    before = self._records.get(str(start), {}) if start else {}
    self._known = not start or bool(before)
    self._before = before.get("wall_time_s", 0.0)
    self._invocations = before.get("invocations", 0) + 1

  def totals(self, seconds: float) -> dict:
    totals = {"wall_time_s": self._before + seconds,
              "invocations": self._invocations}
    if not self._known:  # A checkpoint from before wall_time.json existed.
      totals["wall_time_note"] = "earlier invocations' time is unknown"
    return totals

  def record(self, step: int, seconds: float) -> None:
    if jax.process_index() != 0:
      return
    self._records[str(step)] = {"wall_time_s": self._before + seconds,
                                "invocations": self._invocations}
    write_atomically(self._path, json.dumps(self._records, indent=1))


def _finished_summary(workdir: str, total_steps: int) -> dict | None:
  """The summary of a run that finished in ``workdir``, else None."""
  path = os.path.join(workdir, "summary.json")
  last = os.path.join(workdir, "checkpoints", str(total_steps))
  if not (os.path.exists(path) and os.path.isdir(last)):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("steps") == total_steps else None


def _train_and_evaluate_locked(config, workdir: str, exp: Experiment) -> dict:
  """`train_and_evaluate` once the workdir is this run's."""
  dataset, steps_per_epoch, total_steps = (
      exp.dataset, exp.steps_per_epoch, exp.total_steps)
  finished = _finished_summary(workdir, total_steps)
  if finished is not None:
    # Run again after it finished: every file stays as the run left it.
    logging.info("The run in %s had finished; nothing to do.", workdir)
    return finished
  state = exp.init()

  checkpointer = Checkpointer(workdir, every=config.checkpoint_every_steps,
                              keep=config.keep_checkpoints)
  state = checkpointer.restore(state)
  start = int(state.step)
  # Wall time and invocations up to the checkpoint resumed from (none for a
  # fresh run), so that the summary adds up every invocation's time.
  clock = _WallClock(workdir, start)
  writer = MetricWriter(workdir)
  writer.truncate_after(start)
  if jax.process_index() == 0:  # Whole or not at all: check_workdir reads it.
    write_atomically(os.path.join(workdir, "config.json"),
                     config.to_json_best_effort(indent=2, sort_keys=True))
  if start:
    logging.info("Resuming from the checkpoint at step %d.", start)
  logging.info("%d steps (%d per epoch), batch %d on %d device(s), method %s.",
               total_steps, steps_per_epoch, config.batch_size, exp.mesh.size,
               config.method)

  def evaluate_splits() -> dict[str, float]:
    record = {}
    for name in ("validation", "test"):
      arrays = getattr(dataset, name)
      if arrays is not None:
        for k, v in exp.evaluate(state, arrays).items():
          record[f"{name}/{k}"] = v
    return record

  progress = Progress(total_steps, config.batch_size, start)
  started = time.perf_counter()
  pending, evals, train_record = [], {}, {}
  train_data = exp.train_data()
  epoch, epoch_indices = None, None
  try:
    with checkpoints.SignalFlag() as signals:
      for step in range(start + 1, total_steps + 1):
        if (step - 1) // steps_per_epoch != epoch:
          epoch = (step - 1) // steps_per_epoch
          epoch_indices = exp.epoch_indices(epoch)
        # Dispatch is asynchronous: the host runs ahead until it needs a value.
        state, metrics = exp.step_on_device_data(state, train_data,
                                                 epoch_indices)
        pending.append(metrics)
        last = step == total_steps
        log = step % config.log_every_steps == 0 or last
        epoch_end = step % (steps_per_epoch * config.eval_every_epochs) == 0
        synced = log or epoch_end or checkpointer.due(step) or last
        if synced:
          _raise_if_nonfinite(state, checkpointer)
        if log:
          means = summarise_steps(
              jax.tree.map(lambda *m: np.stack(m), *jax.device_get(pending)))
          pending = []
          train_record = {f"train/{k}": v for k, v in means.items()}
          writer.write(step, train_record)  # Timings stay out: runs must diff.
          progress.report(step, step / steps_per_epoch, train_record)
        if epoch_end or last:
          evals = evaluate_splits()
          writer.write(step, evals)
          logging.info("step %d: %s", step,
                       ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
        # Asked here, after logging, so that a signal that came during this
        # step is answered at its end.
        preempted = signals.preempted(step)
        if preempted and not synced:
          _raise_if_nonfinite(state, checkpointer)
        if checkpointer.maybe_save(step, state, force=last or preempted):
          clock.record(step, time.perf_counter() - started)
        if preempted and not last:
          checkpointer.wait()
          writer.flush()
          name = signal.Signals(signals.received).name
          raise Preempted(
              f"{name} at step {step} of {total_steps}: saved a checkpoint"
              f" in {checkpointer.directory}; run the same command again to"
              " resume.", signals.received)
  finally:
    checkpointer.close()
    writer.close()

  if not evals:  # The run had already finished: evaluate what was restored.
    evals = evaluate_splits()
  wall_time = time.perf_counter() - started
  summary = {
      "steps": int(state.step),
      "epochs": int(state.step) / steps_per_epoch,
      "skipped_steps": int(state.skipped_steps),
      # Every invocation's time up to the checkpoint each resumed from,
      # plus this one's; the speed is this invocation's.
      **clock.totals(wall_time),
      "steps_this_invocation": int(state.step) - start,
      "examples_per_second": (int(state.step) - start) * config.batch_size
                             / max(wall_time, 1e-9),
      **train_record, **evals,
  }
  if jax.process_index() == 0:
    write_atomically(os.path.join(workdir, "summary.json"),
                     json.dumps(summary, indent=2))
  logging.info("Done: %s", json.dumps(summary))
  return summary
