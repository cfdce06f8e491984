"""What a study is: its arms, its keys and their validation.

A study config (``configs/studies/*.py``) starts from `default_study()` and
lists `arm(...)`s; `validate` checks it — names, the objective against what
a tuning run records, every arm's search space and its training config —
before anything is loaded or trained. `arm_config` gives the training config
of one run of an arm. `gnp.study` runs a study.
"""

from __future__ import annotations

import importlib.util

import jax
import ml_collections
import optuna

from gnp import config as config_lib
from gnp import population
from gnp.errors import ConfigError

_DISTRIBUTIONS = ("log", "uniform", "int", "choice")
PRUNERS = ("none", "halving")


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the training config file at ``path``."""
  spec = importlib.util.spec_from_file_location("gnp_study_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def arm(name: str, description: str = "", *, overrides=None,
        search=None) -> ml_collections.ConfigDict:
  """One arm of a study.

  Args:
    name: the arm's name in tables and plots.
    description: one line for the reader.
    overrides: ``{dotted config key: value}`` applied to the study's
      training config for this arm (e.g. ``{"method": "gnvr"}``).
    search: ``{dotted config key: spec}``, the space Optuna searches; a spec
      is ``("log", low, high)``, ``("uniform", low, high)``, ``("int", low,
      high)`` or ``("choice", value, ...)``. Empty: the arm is not tuned.
  """
  return ml_collections.ConfigDict({
      "name": name, "description": description,
      "overrides": config_lib.nest(overrides or {}), "search": config_lib.nest(search or {}),
  })




def default_study() -> ml_collections.ConfigDict:
  """Every study key with its default; study configs fill in the rest."""
  c = ml_collections.ConfigDict()
  c.name = ""  # Required: the study's name in tables and plots.
  c.seed = 0  # Sampler seed, tuning runs' seed and the data seed.
  c.objective = "validation/accuracy"  # A history key, read at the last epoch.
  c.direction = "maximize"  # Of the objective: "maximize" or "minimize".
  c.train = config_lib.default_config()  # The training config all arms share.
  c.arms = ()  # `arm(...)`s; the first is the reference in comparisons.
  c.tuning = ml_collections.ConfigDict()
  c.tuning.num_trials = 20  # Optuna trials per tuned arm.
  c.tuning.num_epochs = 30  # Each trial's training length.
  # Trials training at once (rows of one vmapped population, per replicate).
  c.tuning.trials_at_once = 5
  c.tuning.startup_trials = 10  # Random trials before TPE takes over.
  # Independent repeats of the whole tune -> retrain pipeline: replicate r
  # has its own sampler seed, tuning seed (seed + 1000 r) and retraining
  # seeds (seed + 1000 r + 1, ...), so the table's interval covers the
  # tuning draw as well as the seeds. Replicate 0 is the unreplicated study.
  c.tuning.replicates = 1
  # True: replicate r also draws its own data (dataset.seed + 1000 r: the
  # label-noise draw and the validation split); False: one dataset for all.
  c.tuning.independent_data = False
  # Stopping hopeless trials early: "none", or "halving" (Optuna's
  # asynchronous successive halving): at epochs min_epochs · factor^k a
  # trial goes on only if its objective is in the best 1/factor of the
  # trials of its arm and replicate that reached that epoch; the others
  # stop there (PRUNED) and their rows take the next trials.
  c.tuning.pruner = "none"
  c.tuning.pruner_min_epochs = 5
  c.tuning.pruner_factor = 3
  c.final = ml_collections.ConfigDict()
  c.final.num_seeds = 5  # Retrained seeds per arm: seed + 1, + 2, ...
  c.final.num_epochs = 30  # Each retrained seed's training length.
  c.vectorize = True  # False: one run at a time (large models).
  # Arms trained at once, each from its own host thread, their programs
  # running side by side: one program leaves CPU cores idle, and one arm's
  # Optuna calls and bookkeeping leave the device idle. An arm's numbers
  # do not depend on it; each arm holds its own population in memory. 0:
  # every arm on a single-device CPU backend, else one. More than one needs
  # vectorize and a single device.
  c.arms_at_once = 0
  # The report leaves failed final runs (diverged or collapsed seeds, see
  # gnp.report.failures) out of means and intervals and lists them; True
  # counts them in (they are listed either way).
  c.include_failed = False
  return c


def smoke(study: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks ``study`` to seconds: 2 trials and 2 seeds of 2 epochs."""
  study.tuning.num_trials = 2
  study.tuning.trials_at_once = 2
  study.tuning.num_epochs = 2
  study.final.num_seeds = 2
  study.final.num_epochs = 2
  return study


def apply_variant(study: ml_collections.ConfigDict,
                  arg: str | None) -> ml_collections.ConfigDict:
  """The variants every study config takes: none, or ``smoke``."""
  if arg == "smoke":
    smoke(study)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; the only variant is 'smoke'.")
  return study


# Replicate r's seeds start at seed + SEED_STRIDE * r: its tuning runs use
# that seed and its retrained runs the next final.num_seeds, so replicates
# never share a seed while replicate 0 keeps the unreplicated study's.
SEED_STRIDE = 1000


def tuning_seed(study: ml_collections.ConfigDict, replicate: int = 0) -> int:
  """The training seed of replicate ``replicate``'s tuning trials."""
  return study.seed + SEED_STRIDE * replicate


def final_seeds(study: ml_collections.ConfigDict,
                replicate: int = 0) -> list[int]:
  """The seeds replicate ``replicate`` retrains every arm with."""
  first = tuning_seed(study, replicate)
  return [first + i for i in range(1, study.final.num_seeds + 1)]


def arm_config(study: ml_collections.ConfigDict, spec,
               params: dict | None = None, *, seed: int, num_epochs: int,
               replicate: int = 0) -> ml_collections.ConfigDict:
  """The training config of one run of arm ``spec`` in ``replicate``."""
  config = ml_collections.ConfigDict(study.train.to_dict())
  config.update_from_flattened_dict(config_lib.flatten(spec.overrides))
  config.update_from_flattened_dict(dict(params or {}))
  config.seed = seed
  if config.dataset.seed is None:
    config.dataset.seed = study.seed  # One dataset for every trial and seed.
  if study.tuning.independent_data:
    config.dataset.seed += SEED_STRIDE * replicate
  config.num_epochs = num_epochs
  config.num_steps = None
  config.eval_every_epochs = 1
  return config


def pruner(study: ml_collections.ConfigDict) -> optuna.pruners.BasePruner:
  """The Optuna pruner of ``tuning.pruner`` (a no-op one for "none")."""
  if study.tuning.pruner == "halving":
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=study.tuning.pruner_min_epochs,
        reduction_factor=study.tuning.pruner_factor)
  return optuna.pruners.NopPruner()


def rungs(study: ml_collections.ConfigDict) -> frozenset[int]:
  """The epochs, short of the last, after which the pruner decides: for
  "halving", min_epochs · factor^k. Between them Optuna's successive
  halving prunes nothing, so a trial reports its objective only there."""
  epochs = set()
  if study.tuning.pruner == "halving":
    epoch = study.tuning.pruner_min_epochs
    while epoch < study.tuning.num_epochs:
      epochs.add(epoch)
      epoch *= study.tuning.pruner_factor
  return frozenset(epochs)


def validate(study: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first thing wrong with ``study``."""
  if not study.name:
    raise ConfigError("the study needs a name.")
  if not study.arms:
    raise ConfigError("the study has no arms.")
  names = [a.name for a in study.arms]
  if len(set(names)) != len(names):
    raise ConfigError(f"arm names must be unique, got {names}.")
  if study.direction not in ("maximize", "minimize"):
    raise ConfigError(
        f"direction must be maximize or minimize, got {study.direction!r}.")
  split = study.objective.partition("/")[0]
  # Exactly the keys a tuning run's history records (gnp.population), so
  # that an objective cannot pass here and then read NaN from every trial.
  recorded = ("validation/accuracy", "validation/loss",
              *(f"train/{m}" for m in population.TRAIN_METRICS))
  if study.objective not in recorded:
    reason = (": tuning never reads the test set" if split == "test" else
              ", which a tuning run does not record")
    raise ConfigError(
        f"objective {study.objective!r} is not one of {', '.join(recorded)}"
        f"{reason}.")
  for name in ("num_trials", "num_epochs", "trials_at_once", "replicates"):
    if (not isinstance(study.tuning[name], int)
        or isinstance(study.tuning[name], bool) or study.tuning[name] < 1):
      raise ConfigError(f"tuning.{name} must be a positive integer.")
  if not isinstance(study.tuning.independent_data, bool):
    raise ConfigError("tuning.independent_data must be True or False.")
  if study.tuning.pruner not in PRUNERS:
    raise ConfigError(f"tuning.pruner must be one of {', '.join(PRUNERS)},"
                      f" got {study.tuning.pruner!r}.")
  for name, low in (("pruner_min_epochs", 1), ("pruner_factor", 2)):
    value = study.tuning[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ConfigError(f"tuning.{name} must be an integer >= {low}.")
  if study.tuning.pruner != "none" and not study.vectorize:
    raise ConfigError("tuning.pruner stops members of a vectorised"
                      " population; with vectorize=False use pruner='none'.")
  if (not isinstance(study.arms_at_once, int)
      or isinstance(study.arms_at_once, bool) or study.arms_at_once < 0):
    raise ConfigError("arms_at_once must be an integer >= 0 (0: all arms"
                      " on a single-device CPU backend, else 1).")
  if study.arms_at_once > 1 and not study.vectorize:
    raise ConfigError("arms_at_once > 1 trains vectorised populations side"
                      " by side; with vectorize=False use 0 or 1.")
  if study.arms_at_once > 1 and jax.device_count() > 1:
    raise ConfigError(
        f"arms_at_once > 1 needs a single device ({jax.device_count()} here):"
        " programs with collectives running side by side can deadlock.")
  for name in ("num_seeds", "num_epochs"):
    if not isinstance(study.final[name], int) or study.final[name] < 1:
      raise ConfigError(f"final.{name} must be a positive integer.")
  if study.tuning.replicates > 1 and study.final.num_seeds >= SEED_STRIDE:
    raise ConfigError(
        f"final.num_seeds must be below {SEED_STRIDE} with replicates: each"
        f" replicate's seeds start {SEED_STRIDE} after the last's.")
  if not isinstance(study.seed, int) or isinstance(study.seed, bool):
    raise ConfigError(f"seed must be an integer, got {study.seed!r}.")
  last = final_seeds(study, study.tuning.replicates - 1)[-1]
  if study.seed < 0 or last >= 2**32:
    raise ConfigError(
        f"seed must be in [0, 2**32) for every run; the last replicate's"
        f" last seed would be {last}.")
  for spec in study.arms:
    search = config_lib.flatten(spec.search)
    for key in (*config_lib.flatten(spec.overrides), *search):
      try:
        config_lib.check_key(key)
      except ConfigError as e:
        raise ConfigError(f"arm {spec.name!r}: {e}") from None
    for key, value in search.items():
      distribution(spec.name, key, value)
    config = arm_config(study, spec, sample_point(spec), seed=study.seed,
                        num_epochs=study.tuning.num_epochs)
    try:
      config_lib.validate(config, num_devices=jax.device_count())
    except ConfigError as e:
      raise ConfigError(f"arm {spec.name!r}: {e}") from None
    if (split == "validation" and spec.search
        and not config.dataset.validation_size):
      raise ConfigError(
          f"arm {spec.name!r} is tuned on {study.objective} but"
          " dataset.validation_size is 0: hold out a validation split.")


def distribution(arm_name, key, spec) -> optuna.distributions.BaseDistribution:
  spec = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
  kind, values = spec[0], spec[1:]
  try:
    if kind in ("log", "uniform") and len(values) == 2:
      return optuna.distributions.FloatDistribution(
          float(values[0]), float(values[1]), log=kind == "log")
    if kind == "int" and len(values) == 2:
      return optuna.distributions.IntDistribution(int(values[0]),
                                                  int(values[1]))
    if kind == "choice" and values:
      return optuna.distributions.CategoricalDistribution(values)
  except ValueError as e:
    raise ConfigError(f"arm {arm_name!r}, search {key}: {e}") from None
  raise ConfigError(
      f"arm {arm_name!r}, search {key}={spec!r}: use (kind, ...) with kind"
      f" one of {', '.join(_DISTRIBUTIONS)}, e.g. ('log', 1e-4, 1e-1).")


def sample_point(spec) -> dict:
  """A point of the search space (its low ends), to validate the config."""
  point = {}
  for key, value in config_lib.flatten(spec.search).items():
    dist = distribution(spec.name, key, value)
    point[key] = (dist.choices[0] if hasattr(dist, "choices") else dist.low)
  return point
