"""What a sweep is: its keys, its grid, its fixed values and their validation.

A sweep config (``configs/sweeps/*.py``) starts from `default_sweep()`, sets
``train`` (what every run trains) and ``grid`` (`nest` of `log_grid`s: 1 or
2 traced hyper-parameters), and ends in `apply_variant`. `resolve_fixed`
says where every other traced hyper-parameter comes from (``fixed``, a
study's tuned arm, the training config); `plan` validates the whole sweep
and lists its runs — one `Member` per grid point and seed — before anything
is loaded or trained. `gnp.sweep` trains them; `gnp.sweep_report` reports
them.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import numbers
import os

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from gnp import config as config_lib
from gnp import regularizers
from gnp import step as step_lib
from gnp.errors import ConfigError
from gnp.errors import UserError

# The traced hyper-parameters of any method: what a grid may sweep and
# what ``fixed`` may pin.
TRACED_KEYS = ("optimizer.learning_rate", "optimizer.weight_decay",
               "optimizer.l2") + tuple(
                   f"{method}.{name}"
                   for method, (_, names, _) in regularizers.METHODS.items()
                   for name in names)

# --- Keys, defaults and grids ------------------------------------------------


def nest(flat: dict) -> ml_collections.ConfigDict:
  """``{"gnvr.lam": v}`` -> ConfigDict ``gnvr.lam = v`` (`gnp.config.nest`)."""
  return ml_collections.ConfigDict(config_lib.nest(flat))


def log_grid(low: float, high: float, num: int, *,
             zero: bool = True) -> tuple[float, ...]:
  """``num`` log-spaced values from ``low`` to ``high``, after 0 if ``zero``.

  >>> log_grid(1e-3, 1e-1, 3)
  (0.0, 0.001, 0.01, 0.1)
  """
  if not 0 < low < high or num < 2:
    raise ValueError(f"log_grid needs 0 < low < high and num ≥ 2, got"
                     f" low={low}, high={high}, num={num}.")
  # 12 digits: 0.01, not 0.010000000000000002, in tables and file names.
  values = tuple(float(f"{v:.12g}") for v in np.geomspace(low, high, num))
  return (0.0,) * zero + values


def default_sweep() -> ml_collections.ConfigDict:
  """Every sweep key with its default; sweep configs fill in the rest."""
  c = ml_collections.ConfigDict()
  c.name = ""  # Required: the sweep's name in tables and plots.
  c.seed = 0  # Data seed; runs have seeds seed + 1, ..., seed + num_seeds.
  c.train = config_lib.default_config()  # What every run trains.
  # {key: values} as nest({"gnvr.lam": log_grid(...)}): 1 or 2
  # traced keys; with 2, the first in alphabetical order gives the rows.
  c.grid = ml_collections.ConfigDict()
  # Pinned hyper-parameters, over the study's and the training config's;
  # None = not pinned.
  c.fixed = nest({key: config_dict.placeholder(float) for key in TRACED_KEYS})
  c.from_study = ml_collections.ConfigDict()
  # A study's workdir: fixed values default to its arm's best_params.
  c.from_study.workdir = ""
  c.from_study.arm = ""  # The arm whose tuned values are used.
  # A replicated study (tuning.replicates): whose tuned values; 0's seeds
  # are the sweep's.
  c.from_study.replicate = 0
  c.from_study.config = ""  # Its study config (says how to make results).
  c.num_seeds = 5  # Seeds per grid point.
  c.num_epochs = 30  # Each run's training length.
  # Runs trained together as one population; None = all at once.
  c.members_at_once = config_dict.placeholder(int)
  return c


def smoke(sweep: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks ``sweep`` to seconds: 2 seeds of 2 epochs, 2 or 3 points a key
  (the first, the middle with one key, the last)."""
  grid = config_lib.flatten(sweep.grid)
  for key, values in grid.items():
    values = tuple(values)
    keep = (values[0], values[len(values) // 2], values[-1]) if (
        len(grid) == 1 and len(values) > 2) else (values[0], values[-1])
    sweep.grid.update_from_flattened_dict({key: keep})
  sweep.num_seeds = 2
  sweep.num_epochs = 2
  return sweep


def apply_variant(sweep: ml_collections.ConfigDict,
                  arg: str | None) -> ml_collections.ConfigDict:
  """The variants every sweep config takes: none, or ``smoke``."""
  if arg == "smoke":
    smoke(sweep)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; the only variant is 'smoke'.")
  return sweep


# --- What a sweep trains ---------------------------------------------------


def grid_of(sweep) -> dict[str, tuple[float, ...]]:
  """``{dotted key: values, ascending}``; raises ConfigError if malformed."""
  grid = config_lib.flatten(sweep.grid)
  if not 1 <= len(grid) <= 2:
    raise ConfigError(
        f"grid must have 1 or 2 keys, got {len(grid)}"
        f"{' (' + ', '.join(grid) + ')' if grid else ''}; e.g. grid ="
        " sweep_config.nest({'gnvr.lam':"
        " sweep_config.log_grid(1e-4, 1.0, 8)}).")
  out = {}
  for key, values in grid.items():
    try:
      config_lib.check_key(key)
    except ConfigError as e:
      raise ConfigError(f"grid: {e}") from None
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    for v in values:
      if (isinstance(v, bool) or not isinstance(v, numbers.Real)
          or not math.isfinite(v) or v < 0):
        raise ConfigError(f"grid {key}: every value must be a finite number"
                          f" ≥ 0, got {v!r}.")
    values = sorted(float(v) for v in values)
    if len(set(values)) != len(values) or len(values) < 2:
      raise ConfigError(f"grid {key}: needs at least 2 distinct values, got"
                        f" {tuple(values)}.")
    out[key] = tuple(values)
  return out


def label(values: dict) -> str:
  """A point's name in files and tables: ``gnvr.lam=0.01``."""
  return ",".join(f"{k}={v!r}" for k, v in values.items())


def _study_params(sweep) -> tuple[dict, str]:
  """The ``from_study`` arm's best_params and where they came from."""
  spec = sweep.from_study
  path = os.path.join(spec.workdir, "results.json")
  study_config = spec.config or "configs/studies/NAME.py"
  make = (f"python -m gnp.study --config={study_config}"
          f" --workdir={spec.workdir}")
  if not os.path.isfile(path):
    raise UserError(
        f"from_study: {path} does not exist; make it with `{make}`, or run"
        " without a study (--config.from_study.workdir=).")
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
    arms = {a["name"]: a for a in results["arms"]}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"from_study: {path} is not a study's results ({e});"
                    f" make it again with `{make}`.") from None
  if spec.arm not in arms:
    raise UserError(
        f"from_study: {path} has no arm {spec.arm!r}; its arms:"
        f" {', '.join(map(str, arms))} (--config.from_study.arm=NAME).")
  params = arms[spec.arm].get("best_params") or {}
  where = f"arm {spec.arm!r}"
  if spec.replicate:  # A replicated study (tuning.replicates): its r-th.
    where += f", replicate {spec.replicate}"
    replicates = {r.get("replicate"): r for r in
                  arms[spec.arm].get("replicates") or []
                  if isinstance(r, dict)}
    if spec.replicate not in replicates:
      raise UserError(f"from_study: {where} is not in {path}; its"
                      f" replicates: {sorted(replicates) or [0]}.")
    params = replicates[spec.replicate].get("best_params") or {}
  if not isinstance(params, dict) or not params:
    raise UserError(
        f"from_study: {where} of {path} has no best_params (it was not"
        " tuned); choose a tuned arm, or pin values with fixed.KEY.")
  for key in params:
    try:
      config_lib.check_key(key)
    except ConfigError as e:
      raise UserError(f"from_study: {path}, {where}: {e}") from None
  source = f"study {spec.workdir}, arm {spec.arm}"
  return params, source + (f", replicate {spec.replicate}"
                           if spec.replicate else "")


def resolve_fixed(sweep, swept=()) -> dict[str, dict]:
  """``{key: {"value", "source"}}`` for every pinned or traced key but the
  swept ones: ``fixed``, else the study's arm, else the training config."""
  out = {}
  if sweep.from_study.workdir:
    if not sweep.from_study.arm:
      raise ConfigError("from_study.workdir is set: set from_study.arm too.")
    params, source = _study_params(sweep)
    out.update({k: {"value": v, "source": source}
                for k, v in params.items() if k not in swept})
  for key, value in config_lib.flatten(sweep.fixed).items():
    if value is None:
      continue
    config_lib.check_key(key)
    if key in swept:
      raise ConfigError(f"{key} is both swept (grid) and pinned (fixed).")
    out[key] = {"value": value, "source": "fixed"}
  config = _config(sweep, {k: v["value"] for k, v in out.items()}, {}, 0)
  flat = config_lib.flatten(config)
  for key in step_lib.hyperparameter_keys(config):
    if key not in swept and key not in out:
      out[key] = {"value": flat[key], "source": "train config"}
  return dict(sorted(out.items()))


def _config(sweep, fixed: dict, values: dict, seed: int):
  """The training config of one run (as `gnp.study_config.arm_config`)."""
  config = ml_collections.ConfigDict(sweep.train.to_dict())
  config.update_from_flattened_dict(dict(fixed))
  config.update_from_flattened_dict(dict(values))
  config.seed = seed
  if config.dataset.seed is None:
    config.dataset.seed = sweep.seed  # One dataset for every run.
  config.num_epochs = sweep.num_epochs
  config.num_steps = None
  config.eval_every_epochs = 1
  return config


Member = collections.namedtuple("Member", "point values seed config")


def plan(sweep) -> dict:
  """Validates ``sweep`` and returns what it trains: ``grid``, ``fixed``
  (`resolve_fixed`), ``seeds``, ``points`` (value dicts, the first point —
  every key at its smallest value — first) and ``members`` (one `Member`
  per point and seed). Raises UserError (ConfigError) for the first thing
  wrong, before anything is loaded or trained."""
  if not sweep.name or not isinstance(sweep.name, str):
    raise ConfigError("the sweep needs a name.")
  for name in ("num_seeds", "num_epochs"):
    if not isinstance(sweep[name], int) or sweep[name] < 1:
      raise ConfigError(f"{name} must be a positive integer.")
  at_once = sweep.members_at_once
  if at_once is not None and (not isinstance(at_once, int) or at_once < 1):
    raise ConfigError("members_at_once must be a positive integer or None.")
  if (not isinstance(sweep.seed, int)
      or not 0 <= sweep.seed < config_lib.NUM_SEEDS - sweep.num_seeds):
    raise ConfigError(f"seed must be an integer in [0, 2^32 - num_seeds),"
                      f" got {sweep.seed!r}.")
  grid = grid_of(sweep)
  fixed = resolve_fixed(sweep, swept=grid)
  values = {k: v["value"] for k, v in fixed.items()}
  first = _config(sweep, values, {}, sweep.seed + 1)
  traced = step_lib.hyperparameter_keys(first)
  for key in grid:
    if key not in traced:
      raise ConfigError(
          f"grid key {key!r} is not a traced hyper-parameter of"
          f" method={first.method!r}, so its points could not train as one"
          f" population; sweep one of {', '.join(traced)} (or set"
          " train.method).")
  seeds = [sweep.seed + i for i in range(1, sweep.num_seeds + 1)]
  points = [dict(zip(grid, p)) for p in itertools.product(*grid.values())]
  members = []
  for point in points:
    for seed in seeds:
      config = _config(sweep, values, point, seed)
      if seed == seeds[0]:
        try:
          config_lib.validate(config, num_devices=jax.device_count())
        except ConfigError as e:
          raise ConfigError(f"point {label(point)}: {e}") from None
      members.append(Member(label(point), point, seed, config))
  return {"grid": grid, "fixed": fixed, "seeds": seeds, "points": points,
          "members": members}
