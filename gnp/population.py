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

**Runs that end at different times.** `Population.stream` trains a
stream of runs in a fixed number of rows: when a run ends (its last epoch,
or stopped by a tuner's pruner), its row takes the next run, from epoch 0.
A row's run depends on nothing but its own config (its data order comes
from its seed and epoch, its step keys from its state), so every run trains
as it would alone, and the stack never changes size: nothing recompiles.
On the mnist1d MLP (2 shared CPU cores) a compilation costs 2-3 s against
0.01-0.05 s per member-epoch, so a stack that shrank as members stopped
spent on compiling what pruning saved; a stream spends the freed rows on
new trials. ``train`` is a stream of a fixed list: every member starts at
once, and a stopped member's row trains on, unread.
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
  calls with as many members reuse them: a study trains every trial of an
  arm in one `stream` and its final seeds with the same programs.
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
    # Rows of the stacked states, rows stacked back into one population,
    # and rows replaced: where members stop, and where new runs start.
    self._take = jax.jit(_take_rows, out_shardings=self._replicated)
    self._concatenate = jax.jit(_concatenate_rows,
                                out_shardings=self._replicated)
    self._refill = jax.jit(_refill_rows, out_shardings=self._replicated,
                           donate_argnums=0)
    self._train_data = None
    self._states = None  # The stack `stream` trains.

  def train(self, configs: Sequence[ml_collections.ConfigDict], *,
            on_epoch: OnEpoch | None = None
            ) -> tuple[list[dict], step_lib.TrainState]:
    """Trains ``configs`` at once; see the module function `train`."""
    histories = [None] * len(configs)
    stopped = {}  # Member -> its state when it stopped, one row.
    source = iter(enumerate(configs))

    def stop(active):
      if on_epoch is None:
        return None
      # Every member started at once, so those training share one epoch.
      epoch = len(next(iter(active.values()))["epoch"])
      seen = [histories[m] or active[m] for m in range(len(configs))]
      return _members_to_stop(on_epoch(epoch, seen), len(configs), active)

    runs = self.stream(lambda row: next(source, None), slots=len(configs),
                       stop=stop)
    for m, history, row in runs:
      histories[m] = history
      states = self._states  # The stack after this member's last epoch.
      if "stopped_epoch" in history:
        stopped[m] = self._take(states, np.array([row]))
    if stopped:  # Every member's row, in the order of ``configs``.
      states = self._concatenate([
          stopped[m] if m in stopped else self._take(states, np.array([m]))
          for m in range(len(configs))])
    return histories, states

  def stream(self, source: Callable, *, slots: int,
             stop: Callable | None = None, splits: Sequence[str] = SPLITS):
    """Trains runs in ``slots`` rows, each row taking a new run as one ends.

    ``source(row)`` gives the next run for a free row, ``(token,
    config)``, or None when there is none (the row then trains on unread).
    After each epoch ``stop({token: history})``, with the histories of the
    runs that trained it, may return tokens of runs to stop there (a run
    at its last epoch ends anyway). Yields ``(token, history, row)`` for
    each run as it ends, before the freed rows ask ``source`` again, so a
    tuner told of a result asks with it known; while the generator is paused ``self._states`` holds the
    stack and the run's state is its ``row``. Histories are those of
    `train`, with the ``splits`` evaluated each epoch.

    A row's run trains exactly as it would alone: its data order comes from
    its seed and epoch, its keys from its state. So the stack never changes
    size and nothing recompiles, however runs end: a tuner that prunes
    trials spends the freed rows on new ones. Rows start together and,
    while runs end together (no pruning), refill together.
    """
    exp, replicated = self.exp, self._replicated
    dataset = exp.dataset
    if self._train_data is None:
      self._train_data = exp.train_data()
    runs = [None] * slots  # Row -> (token, config, history) of its run.
    # Row -> the config it trains: its run's, or for a row without one (a
    # spare, unread) the last it had or the first run's.
    config_of = [None] * slots

    def fill(rows):
      filled = []
      for row in rows:
        taken = source(row)
        if taken is None:
          continue
        token, config = taken
        config_lib.validate(config, num_devices=jax.device_count())
        check_compatible([exp.config, config])
        runs[row] = (token, config, {"epoch": []})
        config_of[row] = config
        filled.append(row)
      return filled

    def init():
      rngs = jnp.stack([jax.random.key(c.seed) for c in config_of])
      hparams = jax.tree.map(lambda *v: np.stack(v),
                             *[step_lib.hyperparameters(c) for c in config_of])
      return self._init(rngs, hparams)

    filled = fill(range(slots))
    if not filled:
      return
    config_of = [c or config_of[filled[0]] for c in config_of]
    self._states = init()
    epoch_of = [0] * slots
    while any(runs):
      indices = jax.device_put(
          np.stack([pipeline.epoch_indices(
              len(dataset.train[1]), config.batch_size, config.seed, epoch)
                    for config, epoch in zip(config_of, epoch_of)]),
          replicated)
      self._states, metrics = self._run_epoch(self._states, self._train_data,
                                              indices)
      metrics = jax.device_get(metrics)  # {name: [steps, rows]}
      evals = {split: self._evaluate_split(self._states,
                                           getattr(dataset, split))
               for split in splits if getattr(dataset, split) is not None}
      epoch_of = [e + 1 for e in epoch_of]
      for row, run in enumerate(runs):
        if run is None:
          continue
        history = run[2]
        history["epoch"].append(epoch_of[row])
        # As the single run's log: skipped steps stay out of the means.
        means = step_lib.summarise_steps(
            {k: v[:, row] for k, v in metrics.items()})
        for name in TRAIN_METRICS:
          history.setdefault(f"train/{name}", []).append(means[name])
        for split, sums in evals.items():
          history.setdefault(f"{split}/loss", []).append(
              float(sums["loss"][row] / sums["count"][row]))
          history.setdefault(f"{split}/accuracy", []).append(
              float(sums["correct"][row] / sums["count"][row]))
      stopped = set()
      if stop is not None:
        stopped = set(stop({run[0]: run[2] for run in runs if run}) or ())
      ended = []
      for row, run in enumerate(runs):
        if run is not None and run[0] in stopped:
          run[2]["stopped_epoch"] = epoch_of[row]
        if run is not None and (run[0] in stopped
                                or epoch_of[row] == run[1].num_epochs):
          ended.append(row)
      if not ended:
        continue
      nonfinite = np.asarray(self._states.nonfinite_step)
      for row in sorted(ended):
        token, _, history = runs[row]
        runs[row] = None
        # A run whose loss or update turned NaN or Inf stopped there (its
        # state frozen at the last good values); say so rather than let its
        # later epochs pass for training.
        if nonfinite[row] >= 0:
          history["diverged"] = ("NaN or Inf in the loss or update at step"
                                 f" {nonfinite[row]}")
          history["diverged_epoch"] = -(-int(nonfinite[row])
                                        // exp.steps_per_epoch)
        yield token, history, row
      refilled = fill(sorted(ended))
      if refilled:
        fresh = init()
        self._states = self._refill(self._states, fresh,
                                    np.isin(np.arange(slots), refilled))
        for row in refilled:
          epoch_of[row] = 0
    self._states = None  # Not kept alive between streams.

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
  """(states, train data, indices [M, steps, B]) -> (states, metrics [steps, M]).

  Only the metrics a history keeps (`TRAIN_METRICS`, and ``nonfinite`` to
  leave skipped steps out of their means) leave the scan, so the rest (the
  norms of the gradient, the update and the parameters) are never
  computed: an epoch of the §3 study's five GNVR members took 25% less
  time (plain 18%) on 2 CPU cores.
  """
  member_step = jax.vmap(step_on_device_data, in_axes=(0, None, 0))

  @functools.partial(jax.jit, donate_argnums=0)
  def run_epoch(states, train_data, indices):
    def body(states, _):
      states, metrics = member_step(states, train_data, indices)
      return states, {name: metrics[name]
                      for name in (*TRAIN_METRICS, "nonfinite")}
    return jax.lax.scan(body, states, length=steps)

  return run_epoch


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


def _refill_rows(states, fresh, rows):
  """``states`` with the rows where ``rows`` (a mask) is true from ``fresh``."""
  def pick(old, new):
    mask = rows.reshape(rows.shape + (1,) * (old.ndim - 1))
    return jnp.where(mask, new, old)
  return jax.tree.map(pick, states, fresh)


def _take_rows(states, rows):
  """The rows ``rows`` of stacked ``states``, along the member axis."""
  return jax.tree.map(lambda x: x[rows], states)


def _concatenate_rows(stacks):
  """Stacked states concatenated along the member axis."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *stacks)
