"""Many runs of one experiment at once: seeds and hyper-parameters vmapped.

A hyper-parameter study trains the same model dozens of times with different
learning rates, weight decays, strengths and seeds. The train step reads
those values from its state (`gnp.step.hyperparameters`), so runs that
differ only in them share one compiled step: `train` stacks their states
along a leading "member" axis and runs ``jax.vmap`` of the step, scanned over
each epoch's steps, as one compiled program per epoch. On a small model
(the mnist1d MLP) this turns many under-used, dispatch-bound runs into one
busy one.

Each member is exactly the run `gnp.loop.train_and_evaluate` would make
of its config — same initialisation, data order, per-step randomness and
evaluation — up to floating-point rounding, which the tests check.

>>> histories, states = train([config_seed0, config_seed1])  # doctest: +SKIP
>>> histories[1]["validation/accuracy"][-1]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gnp import config as config_lib
from gnp import experiment as experiment_lib
from gnp import step as step_lib
from gnp.data import pipeline
from gnp.errors import ConfigError

# What a history holds per epoch (besides "epoch"): the training metrics are
# means over the epoch's steps, the others evaluations at the epoch's end.
TRAIN_METRICS = ("cross_entropy", "accuracy", "loss", "penalty")
SPLITS = ("validation", "test")


def structure(config: ml_collections.ConfigDict) -> dict:
  """The part of ``config`` that shapes the compiled step.

  Everything but the seed and the traced hyper-parameters, of which only
  whether weight decay and L2 are on matters. Configs with equal structure
  can be trained together.
  """
  flat = config_lib.flatten(config)
  flat.pop("seed")
  for key in step_lib.hyperparameter_keys(config):
    value = flat.pop(key)
    if key in ("optimizer.weight_decay", "optimizer.l2"):
      flat[key + " != 0"] = bool(value)
  return flat


def check_compatible(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ConfigError unless ``configs`` can be trained as one population."""
  if not configs:
    raise ConfigError("a population needs at least one config.")
  first = structure(configs[0])
  for config in configs[1:]:
    differ = config_lib.differences(first, structure(config))
    if differ:
      raise ConfigError(
          f"a member's config differs from the first's in {', '.join(differ)}:"
          " only the seed and the hyper-parameters"
          f" ({', '.join(step_lib.hyperparameter_keys(configs[0]))}) may"
          " differ between members of a population.")
  seeds = {experiment_lib.data_seed(c) for c in configs}
  if len(seeds) > 1:
    raise ConfigError(
        "members of a population share one dataset: set dataset.seed (the"
        " seeds here give different data).")


class Population:
  """The compiled programs of one experiment structure, for any members.

  Building one compiles nothing; the first `train` compiles the vmapped
  initialisation, epoch and evaluation for its member count, and later
  calls with as many members reuse them: a study asks Optuna for trials in
  batches and trains every batch of an arm with one compilation.
  """

  def __init__(self, config: ml_collections.ConfigDict, dataset=None):
    config_lib.validate(config, num_devices=jax.device_count())
    if config.num_steps is not None:
      raise ConfigError("a population trains whole epochs: unset num_steps.")
    self.structure = structure(config)
    self.exp = exp = experiment_lib.create_experiment(config, dataset)
    # Everything replicated over the experiment's mesh, as the step's own
    # shardings leave it: arguments placed otherwise would recompile.
    self._replicated = NamedSharding(exp.mesh, P())
    self._init = jax.jit(jax.vmap(exp.init_state),
                         out_shardings=self._replicated)
    self._run_epoch = _epoch_fn(exp.step_on_device_data, exp.steps_per_epoch)
    self._evaluate = jax.jit(jax.vmap(exp.eval, in_axes=(0, None)))
    self._train_data = None

  def train(self, configs: Sequence[ml_collections.ConfigDict], *,
            on_epoch: Callable[[int, list[dict]], None] | None = None
            ) -> tuple[list[dict], step_lib.TrainState]:
    """Trains ``configs`` at once; see the module function `train`."""
    for config in configs:
      config_lib.validate(config, num_devices=jax.device_count())
    check_compatible([self.exp.config, *configs])
    exp, replicated = self.exp, self._replicated
    dataset = exp.dataset
    if self._train_data is None:
      self._train_data = exp.train_data()

    rngs = jnp.stack([jax.random.key(c.seed) for c in configs])
    hparams = jax.tree.map(lambda *v: np.stack(v),
                           *[step_lib.hyperparameters(c) for c in configs])
    states = self._init(rngs, hparams)
    histories = [{"epoch": []} for _ in configs]
    for epoch in range(exp.config.num_epochs):
      indices = jax.device_put(
          np.stack([pipeline.epoch_indices(len(dataset.train[1]),
                                           c.batch_size, c.seed, epoch)
                    for c in configs]), replicated)
      states, metrics = self._run_epoch(states, self._train_data, indices)
      metrics = jax.device_get(metrics)  # {name: [steps, members]}
      evals = {split: self._evaluate_split(states, getattr(dataset, split))
               for split in SPLITS if getattr(dataset, split) is not None}
      for i, history in enumerate(histories):
        history["epoch"].append(epoch + 1)
        # As the single run's log: skipped steps stay out of the means.
        means = step_lib.summarise_steps(
            {k: v[:, i] for k, v in metrics.items()})
        for name in TRAIN_METRICS:
          history.setdefault(f"train/{name}", []).append(means[name])
        for split, sums in evals.items():
          history.setdefault(f"{split}/loss", []).append(
              float(sums["loss"][i] / sums["count"][i]))
          history.setdefault(f"{split}/accuracy", []).append(
              float(sums["correct"][i] / sums["count"][i]))
      if on_epoch is not None:
        on_epoch(epoch + 1, histories)
    # A member whose loss or update turned NaN or Inf stopped there (its
    # state frozen at the last good values); say so rather than let its
    # later epochs pass for training.
    for history, step in zip(histories, np.asarray(states.nonfinite_step)):
      if step >= 0:
        history["diverged"] = f"NaN or Inf in the loss or update at step {step}"
        history["diverged_epoch"] = -(-int(step) // exp.steps_per_epoch)
    return histories, states

  def _evaluate_split(self, states, arrays) -> dict:
    """Per-member sums of loss, correct predictions and count over a split."""
    return self.exp.evaluation_sums(
        states, arrays, eval_fn=self._evaluate,
        place=lambda batch: jax.device_put(batch, self._replicated))


def train(configs: Sequence[ml_collections.ConfigDict], dataset=None, *,
          on_epoch: Callable[[int, list[dict]], None] | None = None
          ) -> tuple[list[dict], step_lib.TrainState]:
  """Trains every config at once; returns (histories, stacked final states).

  Args:
    configs: training configs that differ only in ``seed`` and in the keys
      of `gnp.step.hyperparameter_keys` (weight decay and L2 must be zero in
      all or in none), with the same data seed. Each is validated.
    dataset: the `gnp.data.Dataset` (default: loaded from the configs).
    on_epoch: called as ``on_epoch(epoch, histories)`` after each epoch.

  Returns:
    One history per config: ``{"epoch": [1, ...], "train/<metric>": [...],
    "<split>/loss": [...], "<split>/accuracy": [...]}``, a value per epoch,
    as floats; and the final states stacked along a leading member axis.

  Raises:
    ConfigError: for configs that cannot be trained together, or invalid.
  """
  return Population(configs[0], dataset).train(configs, on_epoch=on_epoch)


def _epoch_fn(step_on_device_data, steps: int):
  """(states, train data, indices [M, steps, B]) -> (states, metrics [steps, M])."""
  member_step = jax.vmap(step_on_device_data, in_axes=(0, None, 0))

  @functools.partial(jax.jit, donate_argnums=0)
  def run_epoch(states, train_data, indices):
    def body(states, _):
      return member_step(states, train_data, indices)
    return jax.lax.scan(body, states, length=steps)

  return run_epoch
