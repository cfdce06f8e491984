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

**Stopping members early.** ``on_epoch`` may name members to stop (a
pruner's verdict): their histories end there, and the population shrinks to
its survivors, so that later epochs cost time in proportion to them. A
member's trajectory depends on nothing but its own config (its data order
comes from its seed and epoch, its step keys from its state), so survivors
train as they would have had nothing stopped (bitwise on CPU in the runs
behind the tests, which allow rounding).

Each new member count compiles the epoch and the evaluation again: on the
mnist1d MLP (2 shared CPU cores) 2-3 s at 5-20 members (up to 7 s under
load), against 0.01-0.05 s per member-epoch. So the stack shrinks only to
powers of two (`_stack_size`): the survivors are gathered into the smallest
power of two that holds them, spare rows repeating a survivor, unread. A
population of M members then compiles at most ceil(log2 M) further sizes
however its members stop, and jit keeps each for a study's later batches.
Measured on 16 members, 10 epochs of 35 steps, the sizes already compiled:
training all, 7-11 s; stopping 8, 4 and 2 members after epochs 2, 4 and 6,
2.8 s (10-14 s without shrinking); one member after each epoch, 6-14 s
(10-12 s without shrinking). The first batch pays the compilations: 20-40 s
against 17-26 s, and 71-74 s if the stack shrank to every survivor count.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Collection, Sequence

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

# (epoch, histories) -> the members to stop after that epoch, or None.
OnEpoch = Callable[[int, list[dict]], Collection[int] | None]


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
  batches and trains every batch of an arm with one compilation. A batch
  whose members stop early adds the power-of-two sizes it shrinks to.
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
    # Rows of the stacked states, and rows stacked back into one population:
    # where members stop and the stack shrinks.
    self._take = jax.jit(_take_rows, out_shardings=self._replicated)
    self._concatenate = jax.jit(_concatenate_rows,
                                out_shardings=self._replicated)
    self._train_data = None

  def train(self, configs: Sequence[ml_collections.ConfigDict], *,
            on_epoch: OnEpoch | None = None
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
    # Row r of ``states`` trains configs[members[r]]; the members still
    # training are ``row_of``'s keys. Other rows (a stopped member before
    # the stack shrinks, a spare row after) train on, unread.
    members = list(range(len(configs)))
    row_of = {m: m for m in members}
    stopped = {}  # Member -> its state when it stopped, one row.
    for epoch in range(exp.config.num_epochs):
      indices = jax.device_put(
          np.stack([pipeline.epoch_indices(len(dataset.train[1]),
                                           configs[m].batch_size,
                                           configs[m].seed, epoch)
                    for m in members]), replicated)
      states, metrics = self._run_epoch(states, self._train_data, indices)
      metrics = jax.device_get(metrics)  # {name: [steps, rows]}
      evals = {split: self._evaluate_split(states, getattr(dataset, split))
               for split in SPLITS if getattr(dataset, split) is not None}
      for m, i in row_of.items():
        history = histories[m]
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
      if on_epoch is None:
        continue
      stop = _members_to_stop(on_epoch(epoch + 1, histories), len(configs),
                              row_of)
      for m in stop:
        histories[m]["stopped_epoch"] = epoch + 1
        stopped[m] = self._take(states, np.array([row_of.pop(m)]))
      if not row_of:
        break
      size = _stack_size(len(row_of), len(members))
      if size < len(members) and epoch + 1 < exp.config.num_epochs:
        live = list(row_of)
        members = live + [live[0]] * (size - len(live))
        states = self._take(states, np.array([row_of[m] for m in members]))
        row_of = {m: i for i, m in enumerate(live)}
    if stopped:  # Every member's row, in the order of ``configs``.
      states = self._concatenate([
          stopped[m] if m in stopped else self._take(states,
                                                     np.array([row_of[m]]))
          for m in range(len(configs))])
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
          on_epoch: OnEpoch | None = None
          ) -> tuple[list[dict], step_lib.TrainState]:
  """Trains every config at once; returns (histories, stacked final states).

  Args:
    configs: training configs that differ only in ``seed`` and in the keys
      of `gnp.step.hyperparameter_keys` (weight decay and L2 must be zero in
      all or in none), with the same data seed. Each is validated.
    dataset: the `gnp.data.Dataset` (default: loaded from the configs).
    on_epoch: called as ``on_epoch(epoch, histories)`` after each epoch
      (``epoch`` counts from 1), with the histories of every config,
      stopped members' included. It may return the indices into
      ``configs`` of members to stop now; None or an empty collection
      stops none. Once every member stopped, training ends.

  Returns:
    One history per config: ``{"epoch": [1, ...], "train/<metric>": [...],
    "<split>/loss": [...], "<split>/accuracy": [...]}``, a value per epoch
    trained, as floats; a member that ``on_epoch`` stopped has its epochs up
    to then and ``"stopped_epoch"``, the epoch it stopped after. A member
    whose loss or update turned NaN or Inf (its state frozen from that step)
    has ``"diverged"``, a message naming the step, and ``"diverged_epoch"``.
    And the final states stacked along a leading member axis in the order
    of ``configs``, a stopped member's as it was when it stopped.

  Raises:
    ConfigError: for configs that cannot be trained together, or invalid.
    ValueError: for an ``on_epoch`` result that is not a collection of
      distinct indices of members still training.
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


def _stack_size(survivors: int, size: int) -> int:
  """Rows to stack ``survivors`` members in, shrinking from ``size`` rows.

  The smallest power of two that holds them, if it is smaller than the
  stack: each size is a compilation (module docstring), so a population
  shrinks through powers of two and never by a member at a time.
  """
  bucket = 1 << (survivors - 1).bit_length()
  return min(bucket, size)


def _members_to_stop(returned, num_members: int, training) -> list[int]:
  """``on_epoch``'s result as member indices, checked; [] for None.

  Raises ValueError unless it is a collection of distinct indices, in
  ``range(num_members)``, of members in ``training``.
  """
  if returned is None:
    return []
  if isinstance(returned, (str, bytes)) or not isinstance(returned,
                                                          Collection):
    raise ValueError(
        "on_epoch must return None or a collection of member indices to"
        f" stop, got {returned!r}.")
  stop = []
  for index in returned:
    if isinstance(index, (bool, np.bool_)):
      raise ValueError(
          "on_epoch must return the indices of the members to stop, not a"
          f" mask: got {returned!r}.")
    try:
      index = operator.index(index)
    except TypeError:
      raise ValueError(f"on_epoch returned {index!r}, which is not a member"
                       " index.") from None
    if not 0 <= index < num_members:
      raise ValueError(f"on_epoch returned member {index}, out of range for"
                       f" {num_members} members.")
    if index in stop:
      raise ValueError(f"on_epoch returned member {index} twice.")
    if index not in training:
      raise ValueError(f"on_epoch returned member {index}, which already"
                       " stopped.")
    stop.append(index)
  return stop


def _take_rows(states, rows):
  """The rows ``rows`` of stacked ``states``, along the member axis."""
  return jax.tree.map(lambda x: x[rows], states)


def _concatenate_rows(stacks):
  """Stacked states concatenated along the member axis."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *stacks)
