"""Studies: tune each arm with Optuna, retrain the best over seeds, report.

    python -m gnp.study --config=configs/studies/gnvr.py --workdir=DIR

The protocol every experiment of this field follows, as one command:

1. **Tune.** For each arm (e.g. baseline and GNVR), Optuna's TPE sampler
   (seeded) proposes ``tuning.num_trials`` settings of the arm's search
   space; each is trained for ``tuning.num_epochs`` with the study's seed and
   scored by ``objective`` (e.g. ``validation/accuracy``) at its last epoch,
   on the validation split held out of the training data — never the test
   set. ``tuning.trials_at_once`` trials train at once as one vmapped
   population (`gnp.population`), and as one ends (or the pruner stops it)
   its row takes the next trial, asked with every result so far known.
2. **Retrain.** The best setting of each arm is trained for
   ``final.num_epochs`` with ``final.num_seeds`` fresh seeds (the study's
   seed + 1, + 2, ...), again vmapped; every arm sees the same seeds, so arms
   can be compared seed by seed.
3. **Report.** ``results.json`` holds every trial and seed with its curves;
   `gnp.report` turns it into ``table.md``, ``curves.png`` and
   ``effects.png``.

A single tuning draw can pick a lucky or unlucky setting, and an interval
over seeds does not see that. ``tuning.replicates = R`` repeats steps 1–2
R times, each replicate with its own sampler seed, tuning seed and
retraining seeds (``gnp.study_config.final_seeds``), and, with
``tuning.independent_data``, its own data draw; replicates are trained
together. The report then gives each arm's difference to the first with an
interval over the replicates, which covers both the tuning draw and the
seeds (`gnp.results`), and says whether each arm is better, worse or not
distinguishable.

The Optuna studies live in ``DIR/study.db`` (SQLite; ``optuna-dashboard
sqlite:///DIR/study.db`` opens it), one per arm (``<arm>#r<r>`` for
replicate r > 0), and each arm's final runs in ``DIR/final/<arm>.json``
(``<arm>#r<r>.json``), so a study that is stopped at any moment resumes
where it stopped when the command is run again: finished trials are kept,
trials that were running are re-proposed with the same values, and more
replicates can be added to a finished study.

What a study is (its keys, arms and validation) lives in `gnp.study_config`.

``vectorize=False`` trains one run at a time with `gnp.loop`, in
``DIR/runs/``, with checkpoints — for models too large to stack.

``arms_at_once`` arms train at the same time, each from its own host thread
(by default every arm on a single-device CPU backend, one elsewhere): a
program leaves some of the CPU's cores idle, and an arm's Optuna calls and
bookkeeping leave the device idle, which the other arms fill. Each arm's
numbers are those of one arm at a time: its sampler, seeds and rows are
its own, and arms of one compiled structure take turns with it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import os
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import optuna
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gnp import checkpoints
from gnp import cli
from gnp import config as config_lib
from gnp import data as data_lib
from gnp import experiment as experiment_lib
from gnp import loop
from gnp import population
from gnp import report
from gnp import results as results_lib
from gnp import writers
from gnp.data import pipeline
from gnp.errors import NonFiniteError
from gnp.errors import UserError
# Also gnp.study's: a study config calls study.default_study(), study.arm().
from gnp.study_config import apply_variant  # pylint: disable=unused-import
from gnp.study_config import arm
from gnp.study_config import arm_config
from gnp.study_config import default_study
from gnp.study_config import distribution
from gnp.study_config import final_seeds
from gnp.study_config import load_config
from gnp.study_config import pruner
from gnp.study_config import rungs
from gnp.study_config import sample_point
from gnp.study_config import smoke
from gnp.study_config import tuning_seed
from gnp.study_config import validate
from gnp.writers import write_atomically

# --- Training runs ---------------------------------------------------------


def _train(study, configs, datasets, run_dirs, populations,
           should_stop=None) -> list[dict]:
  """Histories of ``configs`` (``datasets[i]`` is config i's data): vmapped
  per structure, or one at a time.

  ``populations`` (`_Populations`) holds the compiled
  `population.Population` of each structure for the whole study, so that an
  arm's trials and its final seeds, and arms of one structure (a tuned arm
  and its reported setting), compile once.
  ``should_stop(i, epoch, history)``, asked after every epoch of config i
  while it trains (vectorised only), stops it there when it returns True.
  """
  if not study.vectorize:
    return [_train_one(config, directory, dataset)
            for config, directory, dataset in zip(configs, run_dirs,
                                                   datasets)]
  groups = collections.defaultdict(list)
  for i, config in enumerate(configs):
    groups[_structure_key(config)].append(i)
  histories = [None] * len(configs)
  for members in groups.values():
    on_epoch = functools.partial(_stop, members=members,
                                 should_stop=should_stop,
                                 cancelled=populations.cancelled)
    with populations.use(configs[members[0]], datasets[members[0]]) as pop:
      results, _ = pop.train([configs[i] for i in members], on_epoch=on_epoch)
    for i, history in zip(members, results):
      histories[i] = history
  return histories


def _stop(epoch, histories, *, members, should_stop, cancelled):
  """A population's ``on_epoch``: its members that ``should_stop`` stops."""
  _check(cancelled)
  if should_stop is None:
    return None
  return [j for j, history in enumerate(histories)
          if "stopped_epoch" not in history
          and should_stop(members[j], epoch, history)]


def _train_one(config, workdir: str, dataset) -> dict:
  """`gnp.loop.train_and_evaluate` with per-epoch records, as a history."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.log_every_steps = pipeline.steps_per_epoch(
      len(dataset.train[1]), config.batch_size)
  try:
    loop.train_and_evaluate(config, workdir)
    diverged = None
  except NonFiniteError as e:
    diverged = str(e)
  keys = [f"train/{m}" for m in population.TRAIN_METRICS] + [
      f"{split}/{m}" for split in population.SPLITS
      for m in ("loss", "accuracy")]
  by_step = collections.defaultdict(dict)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      by_step[record["step"]].update(record)
  history = collections.defaultdict(list)
  for epoch, step in enumerate(sorted(by_step), 1):
    history["epoch"].append(epoch)
    for key in keys:
      if key in by_step[step]:
        history[key].append(by_step[step][key])
  history = dict(history)
  if diverged is not None:
    history["diverged"] = diverged
  return history


# --- The study -------------------------------------------------------------


def replicate_name(spec, replicate: int) -> str:
  """The Optuna study (in study.db) of ``spec``'s tuning in ``replicate``:
  the arm's name for replicate 0, as in an unreplicated study."""
  return spec.name if replicate == 0 else f"{spec.name}#r{replicate}"


def _optuna_study(study, spec, storage, finished: int,
                  replicate: int) -> optuna.Study:
  # Seeded by (study seed, arm, trials so far[, replicate]): an
  # uninterrupted study is reproducible, a resumed one does not redraw its
  # first random trials, and neither arms nor replicates share their random
  # draws. Replicate 0 is seeded as an unreplicated study.
  arm_index = [a.name for a in study.arms].index(spec.name)
  entropy = [study.seed, arm_index, finished] + [replicate] * (replicate > 0)
  seed = np.random.SeedSequence(entropy)
  sampler = optuna.samplers.TPESampler(
      seed=int(seed.generate_state(1)[0]),
      n_startup_trials=study.tuning.startup_trials)
  return optuna.create_study(study_name=replicate_name(spec, replicate),
                             storage=storage, direction=study.direction,
                             sampler=sampler, pruner=pruner(study),
                             load_if_exists=True)


def _finished(trials) -> list:
  return [t for t in trials
          if t.state in (optuna.trial.TrialState.COMPLETE,
                         optuna.trial.TrialState.PRUNED)
          or (t.state == optuna.trial.TrialState.FAIL
              and t.user_attrs.get("diverged"))]


def _run_dir(workdir, spec, replicate, name):
  parts = [workdir, "runs", spec.name] + [f"r{replicate}"] * (replicate > 0)
  return os.path.join(*parts, name)


def tune(study, spec, workdir: str, dataset_of, populations,
         storage=None) -> list[optuna.Study]:
  """Runs the arm's remaining trials in every replicate; returns their
  Optuna studies, by replicate.

  ``dataset_of(replicate)`` gives a replicate's data. Where every trial
  shares one compiled step (the search varies only traced
  hyper-parameters), the trials of the replicates that share data train as
  one stream (`population.Population.stream`): each replicate owns
  ``tuning.trials_at_once`` rows, and a row whose trial ends, complete or
  pruned, takes the replicate's next trial, asked with every result so far
  known. Otherwise each round asks every unfinished replicate for up to
  ``tuning.trials_at_once`` trials and trains them together.

  ``storage`` is the study's Optuna storage (`_storage`), one for every
  arm, rather than a new engine and schema check each time a trial ends.
  """
  storage = storage or _storage(workdir)
  replicates = range(study.tuning.replicates)
  probes = []
  for r in replicates:
    probe = optuna.create_study(study_name=replicate_name(spec, r),
                                storage=storage, direction=study.direction,
                                load_if_exists=True)
    for t in probe.trials:  # Interrupted mid-batch: propose them again.
      if t.state == optuna.trial.TrialState.RUNNING:
        probe.tell(t.number, state=optuna.trial.TrialState.FAIL)
        probe.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    probes.append(probe)
  distributions = {k: distribution(spec.name, k, v)
                   for k, v in config_lib.flatten(spec.search).items()}
  # Trials finished by replicate, counted here: reading them back from the
  # database costs more the more there are.
  finished = [len(_finished(probe.trials)) for probe in probes]
  asking = {}  # Replicate -> (trials finished, the Optuna study asked).

  def ask(r):
    """Replicate r's next trial, from a sampler seeded by its results."""
    done = finished[r]
    if asking.get(r, (None,))[0] != done:
      probes[r] = _optuna_study(study, spec, storage, done, r)
      asking[r] = (done, probes[r])
    trial = probes[r].ask(distributions)
    config = arm_config(study, spec, trial.params, seed=tuning_seed(study, r),
                        num_epochs=study.tuning.num_epochs, replicate=r)
    return (r, probes[r], trial), config

  def tell(token, history, seconds):
    outcome = _tell(study, token, history, seconds)
    r, _, trial = token
    finished[r] += 1
    logging.info("%s: trial %d %s; %d/%d finished", replicate_name(spec, r),
                 trial.number, outcome, finished[r], study.tuning.num_trials)

  if study.vectorize and _streamable(study, spec):
    by_data = collections.defaultdict(list)
    for r in replicates:
      by_data[id(dataset_of(r))].append(r)
    for group in by_data.values():
      _tune_stream(study, spec, group, finished, ask, tell,
                   dataset_of(group[0]), populations)
    return probes
  while True:
    asked = []  # ((replicate, its Optuna study, trial), config)
    for r in replicates:
      remaining = study.tuning.num_trials - finished[r]
      asked += [ask(r) for _ in range(min(remaining,
                                          study.tuning.trials_at_once))]
    if not asked:
      return probes
    configs = [config for _, config in asked]
    run_dirs = [_run_dir(workdir, spec, r, f"trial_{t.number}")
                for (r, _, t), _ in asked]

    def should_stop(i, epoch, history):
      return _should_prune(study, asked[i][0][2], epoch, history)

    started = time.perf_counter()
    histories = _train(study, configs,
                       [dataset_of(r) for (r, _, _), _ in asked],
                       run_dirs, populations,
                       should_stop if study.tuning.pruner != "none" else None)
    seconds = (time.perf_counter() - started) / len(asked)
    for (token, _), history in zip(asked, histories):
      tell(token, history, seconds)


def _streamable(study, spec) -> bool:
  """Whether every trial of ``spec`` compiles to the same step: moving any
  searched key to either end of its range (or to any of its choices)
  leaves the config's `population.structure` as it is."""
  point = sample_point(spec)

  def structure(**change):
    config = arm_config(study, spec, {**point, **change}, seed=study.seed,
                        num_epochs=study.tuning.num_epochs)
    return population.structure(config)

  base = structure()
  for key, value in config_lib.flatten(spec.search).items():
    dist = distribution(spec.name, key, value)
    ends = getattr(dist, "choices", None) or (dist.low, dist.high)
    if any(structure(**{key: end}) != base for end in ends):
      return False
  return True


def _structure_key(config) -> str:
  return json.dumps(population.structure(config), sort_keys=True, default=str)


class _Populations:
  """The study's compiled populations, one per structure, and its stop.

  ``use(config, dataset)`` lends the population of ``config``'s structure
  to one thread at a time (a population trains one stack), so that arms
  that train at once (`arms_at_once`) and share a structure take turns.
  ``cancelled`` is set when the study stops (an arm failed, or an
  interrupt): the arms still training stop after their current epoch.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._by_key = {}  # Structure key -> (population, its lock).
    self.cancelled = threading.Event()

  @contextlib.contextmanager
  def use(self, config, dataset):
    key = _structure_key(config)
    with self._lock:
      if key not in self._by_key:
        self._by_key[key] = (population.Population(config, dataset),
                             threading.Lock())
      pop, lock = self._by_key[key]
    with lock:
      yield pop


class _Cancelled(Exception):
  """Raised in an arm's thread once another arm stopped the study."""


def _check(cancelled: threading.Event) -> None:
  if cancelled.is_set():
    raise _Cancelled()


def _tune_stream(study, spec, group, finished, ask, tell, dataset,
                 populations):
  """The trials of replicates ``group`` (one dataset) as one stream;
  ``finished[r]`` counts replicate r's finished trials, which ``ask(r)``
  and ``tell`` (`tune`'s) add to."""
  per = study.tuning.trials_at_once
  running = {}  # (replicate, trial number) -> what `ask` gave.
  seconds = collections.defaultdict(float)  # Its share of the wall time.

  def source(row):
    r = group[row // per]
    remaining = (study.tuning.num_trials - finished[r]
                 - sum(key[0] == r for key in running))
    if remaining <= 0:
      return None
    asked, config = ask(r)
    key = (r, asked[2].number)
    running[key] = asked
    return key, config

  clock = [time.perf_counter()]

  def stop(going):
    _check(populations.cancelled)
    # Each epoch's wall time, shared by the trials that trained it.
    now = time.perf_counter()
    for key in going:
      seconds[key] += (now - clock[0]) / len(going)
    clock[0] = now
    if study.tuning.pruner == "none":
      return None
    return [key for key, history in going.items()
            if _should_prune(study, running[key][2], len(history["epoch"]),
                             history)]

  if all(finished[r] >= study.tuning.num_trials for r in group):
    return
  # A config of the arm's structure, which every trial shares.
  first = arm_config(study, spec, sample_point(spec),
                     seed=tuning_seed(study, group[0]),
                     num_epochs=study.tuning.num_epochs, replicate=group[0])
  with populations.use(first, dataset) as pop:
    runs = pop.stream(source, slots=per * len(group), stop=stop,
                      splits=("validation",))
    for key, history, _ in runs:
      tell(running.pop(key), history, seconds.pop(key))


def _should_prune(study, trial, epoch, history) -> bool:
  """Whether the pruner stops the trial after ``epoch``. At its rungs
  (`study_config.rungs`) the trial reports its objective and the pruner
  decides; elsewhere it would prune nothing, and each report and decision
  is a round trip to the database (~25 ms here). A trial that trained to
  the end is complete, whatever its rung."""
  if epoch not in rungs(study):
    return False
  trial.report(history[study.objective][-1], epoch)
  return trial.should_prune()


def _tell(study, token, history, seconds) -> str:
  """Tells Optuna how ``token``'s trial ended: complete, pruned or failed;
  returns which, for the log."""
  _, optuna_study, t = token
  diverged = history.pop("diverged", None)
  history.pop("diverged_epoch", None)
  pruned = history.pop("stopped_epoch", None)
  t.set_user_attr("history", history)
  t.set_user_attr("train_time_s", seconds)
  value = (history.get(study.objective) or [math.nan])[-1]
  if pruned is not None and diverged is None:
    optuna_study.tell(t, state=optuna.trial.TrialState.PRUNED)
    return f"pruned after epoch {pruned} ({value:.4f})"
  if math.isfinite(value) and diverged is None:
    optuna_study.tell(t, value)
    return f"complete: {value:.4f}"
  t.set_user_attr("diverged", diverged or "non-finite objective")
  optuna_study.tell(t, state=optuna.trial.TrialState.FAIL)
  return "failed: " + (diverged or "non-finite objective")


def _best(optuna_study):
  complete = [t for t in optuna_study.trials
              if t.state == optuna.trial.TrialState.COMPLETE]
  return optuna_study.best_trial if complete else None


def retrain(study, spec, best_params: list[dict], workdir: str, dataset_of,
            populations) -> list[dict]:
  """The arm's final runs over seeds, one result per replicate
  (``best_params[r]`` is replicate r's setting), each cached in
  ``final/<arm>.json`` (replicate 0) or ``final/<arm>#r<r>.json``.

  The replicates that are not cached train together, as one population.
  """
  results, todo = [], []
  for r, params in enumerate(best_params):
    path = os.path.join(workdir, "final",
                        f"{replicate_name(spec, r)}.json")
    seeds = final_seeds(study, r)
    cached = None
    if os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      if not (cached["params"] == params
              and [s["seed"] for s in cached["seeds"]] == seeds
              and len(cached["seeds"][0]["history"]["epoch"])
              == study.final.num_epochs):
        cached = None
    results.append(cached)
    if cached is None:
      todo += [(r, path, s) for s in seeds]
  if not todo:
    return results
  configs = [arm_config(study, spec, best_params[r], seed=s, replicate=r,
                        num_epochs=study.final.num_epochs)
             for r, _, s in todo]
  run_dirs = [_run_dir(workdir, spec, r, f"seed_{s}") for r, _, s in todo]
  started = time.perf_counter()
  histories = _train(study, configs, [dataset_of(r) for r, _, _ in todo],
                     run_dirs, populations)
  seconds = (time.perf_counter() - started) / len(todo)
  for r in sorted({r for r, _, _ in todo}):
    mine = [(path, s, h) for (rr, path, s), h in zip(todo, histories)
            if rr == r]
    results[r] = {"params": best_params[r],
                  "seeds": [_seed_entry(s, h) for _, s, h in mine],
                  "train_time_s": seconds * len(mine)}
    _write_json(mine[0][0], results[r])
  return results


def _seed_entry(seed: int, history: dict) -> dict:
  entry = results_lib.seed_entry(seed, history)
  if "diverged" in entry:
    logging.warning("seed %d diverged: %s", seed, entry["diverged"])
  return entry


# Keys a study may change when it resumes from its workdir: how many trials
# and replicates and how they are batched, the final runs (recomputed when they change) and
# how runs are executed. Anything else would mix trials of two studies.
RESUMABLE_KEYS = ("tuning.num_trials", "tuning.trials_at_once",
                  "tuning.replicates",
                  "final.num_seeds", "final.num_epochs", "vectorize",
                  "arms_at_once", "include_failed")


def check_workdir(study: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises UserError if ``workdir`` holds a study other than ``study``."""
  path = os.path.join(workdir, "study_config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  current = json.loads(study.to_json_best_effort())
  # Arms may be appended: the stored arms keep their places, and with them
  # their sampler seeds (`_optuna_study`), trials and final runs.
  if (len(current.get("arms", [])) > len(stored.get("arms", []))
      and current["arms"][:len(stored["arms"])] == stored["arms"]):
    current["arms"] = current["arms"][:len(stored["arms"])]
  changed = list(config_lib.differences(stored, current,
                                        ignore=RESUMABLE_KEYS))
  if changed:
    raise UserError(
        f"workdir {workdir} holds another study (it differs in"
        f" {', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''});"
        " use a new --workdir, or the same study to resume (only"
        f" {', '.join(RESUMABLE_KEYS)} may change, and arms may be added"
        " after the last).")


def run(study: ml_collections.ConfigDict, workdir: str) -> dict:
  """Tunes, retrains and reports ``study`` in ``workdir``; returns results.

  Resumes what ``workdir`` holds of the same study; refuses another study's,
  and a workdir another study is running in.
  """
  validate(study)
  check_workdir(study, workdir)
  os.makedirs(workdir, exist_ok=True)
  with checkpoints.WorkdirLock(workdir):
    check_workdir(study, workdir)  # Again, now that no other study runs.
    return _run_locked(study, workdir)


def _run_locked(study: ml_collections.ConfigDict, workdir: str) -> dict:
  """`run` once the workdir is this study's."""
  datasets = {}

  def dataset_of(spec, replicate):
    config = arm_config(study, spec, seed=study.seed, num_epochs=1,
                        replicate=replicate)
    key = json.dumps(config.dataset.to_dict(), sort_keys=True)
    if key not in datasets:
      datasets[key] = data_lib.load(config.dataset,
                                    seed=experiment_lib.data_seed(config))
    return datasets[key]

  write_atomically(os.path.join(workdir, "study_config.json"),
                   study.to_json_best_effort(indent=1, sort_keys=True))
  started = time.perf_counter()
  replicates = range(study.tuning.replicates)
  for spec in study.arms:  # Loaded once, before arms train side by side.
    for r in replicates:
      dataset_of(spec, r)
  populations = _Populations()
  storage = _storage(workdir)

  def arm_entry(spec) -> dict:
    """Tunes and retrains ``spec``; its entry in results.json."""
    data = lambda r: dataset_of(spec, r)
    best = [({}, None)] * len(replicates)
    trials = []
    tuning_time = 0.0
    if spec.search:
      for r, optuna_study in enumerate(
          tune(study, spec, workdir, data, populations, storage)):
        trial = _best(optuna_study)
        if trial is None:
          raise UserError(f"arm {replicate_name(spec, r)!r}: every tuning"
                          " trial diverged.")
        best[r] = (trial.params, trial.value)
        for t in _finished(optuna_study.trials):
          trials.append({
              "number": t.number, "replicate": r, "params": t.params,
              "value": t.value, "state": t.state.name,
              "history": t.user_attrs["history"]})
          tuning_time += t.user_attrs["train_time_s"]
    finals = retrain(study, spec, [params for params, _ in best], workdir,
                     data, populations)
    return {
        "name": spec.name, "description": spec.description,
        # Replicate 0's, as an unreplicated study reports them.
        "best_params": best[0][0], "best_value": best[0][1],
        "trials": trials,
        "seeds": [{**seed, "replicate": r}
                  for r, final in enumerate(finals) for seed in final["seeds"]],
        "replicates": [{"replicate": r, "best_params": params,
                        "best_value": value,
                        "seeds": [s["seed"] for s in finals[r]["seeds"]]}
                       for r, (params, value) in enumerate(best)],
        # Epochs trained in tuning: fewer than trials × tuning.num_epochs
        # where the pruner stopped trials early.
        "tuning_epochs": sum(len(t["history"].get("epoch", []))
                             for t in trials),
        # Each run's share of the wall time of the epochs it trained in;
        # arms that trained at once overlap.
        "wall_time_s": {"tuning": tuning_time,
                        "final": sum(f["train_time_s"] for f in finals)},
    }

  arms = _map_arms(arm_entry, study.arms, arms_at_once(study),
                   populations.cancelled)
  results = {
      "study": study.name,
      "objective": {"metric": study.objective, "direction": study.direction},
      # Chance accuracy, for the report's rule of a collapsed run.
      "num_classes": int(dataset_of(study.arms[0], 0).num_classes),
      "include_failed": bool(study.include_failed),
      "replicates": study.tuning.replicates,
      "tuning": {"num_epochs": study.tuning.num_epochs,
                 "pruner": study.tuning.pruner},
      "arms": arms,
      "wall_time_s": {
          "tuning": sum(a["wall_time_s"]["tuning"] for a in arms),
          "final": sum(a["wall_time_s"]["final"] for a in arms),
      },
  }
  results["wall_time_s"]["total"] = (results["wall_time_s"]["tuning"]
                                     + results["wall_time_s"]["final"])
  # This invocation's, from loading the data to the last run: less than the
  # total where arms trained at once.
  results["wall_time_s"]["elapsed"] = time.perf_counter() - started
  _write_json(os.path.join(workdir, "results.json"), results)
  report.write(results, workdir)
  logging.info("Study %s done in %.1f s (this invocation).", study.name,
               time.perf_counter() - started)
  return results


def _storage(workdir: str) -> optuna.storages.RDBStorage:
  """The study's Optuna storage, ``workdir/study.db``; one for all arms
  (its sessions are per thread)."""
  return optuna.storages.RDBStorage(
      f"sqlite:///{os.path.join(workdir, 'study.db')}")


def _map_arms(fn, specs, workers: int, cancelled: threading.Event) -> list:
  """``[fn(spec) for spec in specs]``, ``workers`` arms at a time.

  With more than one worker each arm runs in a host thread: JAX releases
  the interpreter while a program runs, so one arm's programs, Optuna
  calls and bookkeeping overlap another's. An arm's numbers depend on
  nothing another arm does (its own sampler, seeds and rows), so they are
  those of one arm at a time. The first arm (in ``specs``' order) that
  fails, or an interrupt, sets ``cancelled``; the other arms stop after
  their current epoch (`_check`), and its exception is raised here.
  """
  if workers <= 1:
    return [fn(spec) for spec in specs]
  results = [None] * len(specs)
  pending = collections.deque(enumerate(specs))
  errors = {}  # Arm index -> the exception that ended it.
  lock = threading.Lock()

  def worker():
    while not cancelled.is_set():
      with lock:
        if not pending:
          return
        i, spec = pending.popleft()
      try:
        results[i] = fn(spec)
      except BaseException as e:  # pylint: disable=broad-exception-caught
        errors[i] = e
        cancelled.set()

  threads = [threading.Thread(target=worker, name=f"gnp-study-arms-{k}",
                              daemon=True)
             for k in range(min(workers, len(specs)))]
  for thread in threads:
    thread.start()
  try:
    for thread in threads:
      # In slices: a signal's handler (Ctrl-C) runs in this thread only
      # between them.
      while thread.is_alive():
        thread.join(0.25)
  except BaseException:  # An interrupt: the arms stop after their epoch.
    cancelled.set()
    for thread in threads:
      thread.join()
    raise
  failed = sorted(i for i, e in errors.items()
                  if not isinstance(e, _Cancelled))
  if failed:
    raise errors[failed[0]]
  return results


def arms_at_once(study: ml_collections.ConfigDict) -> int:
  """How many arms ``study`` trains at once (its ``arms_at_once``, or for
  0, every arm on a single-device CPU backend and one elsewhere)."""
  if study.arms_at_once:
    return study.arms_at_once
  alone = (jax.process_count() == 1 and jax.device_count() == 1
           and jax.default_backend() == "cpu")
  return len(study.arms) if study.vectorize and alone else 1


def _write_json(path: str, value) -> None:
  # Whole or not at all: a stopped study never leaves half a file.
  write_atomically(path, json.dumps(value, indent=1))


# --- Command line ----------------------------------------------------------


def _define_flags():
  # Defined when run as a program only, so that importing gnp.study next to
  # gnp.main (which has flags of the same names) stays possible.
  flags.DEFINE_string(
      "workdir", None, "Directory for study.db, results.json, table.md and"
      " curves.png; a study resumes from what it holds.", required=True)
  config_flags.DEFINE_config_file(
      "config", None, "Study config file, configs/studies/NAME.py[:variant];"
      " required.", lock_config=True)
  cli.hide_config_default()
  # --help shows the module docstring: end it with every study key.
  global __doc__  # pylint: disable=global-statement
  __doc__ += (
      "\nThe study keys (--config.KEY=DEFAULT), in gnp/study_config.py:\n"
      + cli.config_keys_help(default_study(), default_study,
                             skip=("train", "arms"))
      + "\n  --config.train.KEY=VALUE\n      Any training key, for every"
      " arm: python -m gnp.main --help lists them.\n")


def _parse_flags(argv):
  return cli.parse_config_flags(argv, program="gnp.study",
                                example="configs/studies/gnvr.py")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  writers.quiet_logs()
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  try:
    results = run(flags.FLAGS.config, flags.FLAGS.workdir)
  except UserError as e:
    logging.flush()
    sys.exit(f"gnp.study: error: {e}")
  logging.info("Wrote %s", os.path.join(flags.FLAGS.workdir, "table.md"))
  print(report.table(results))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
