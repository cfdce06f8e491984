"""Strength sweeps: a regulariser's dose–response, from 0 upward, over seeds.

    python -m gnp.sweep --config=configs/sweeps/gnvr.py --workdir=DIR

Does a regulariser do anything at any strength? A tuned point cannot say
(METHODS.md §8); a sweep can. It trains the training config at every point
of a grid of strengths — log-spaced, usually with 0, the baseline, first —
with ``num_seeds`` seeds each (the sweep's seed + 1, + 2, ..., the seeds of
a study's retraining, so that a sweep lines up with a study seed by seed)
and every other hyper-parameter fixed, and reports the final metrics of
each point. A grid has one key (a curve) or two (a heat map); its first
point, every key at its smallest value, is the reference the others are
compared with. configs/sweeps/gnvr.py (9 strengths × 5 seeds × 30 epochs of
the mnist1d MLP) took about 4 minutes on 2 shared CPU cores; each config's
docstring gives its own time and ``:smoke`` (seconds).

Grid keys must be traced hyper-parameters (`gnp.step.hyperparameter_keys`:
the learning rate, weight decay, L2 and the method's strengths and radii):
runs that differ only in them share one compiled step, so the sweep trains
as one vmapped population (`gnp.population`), ``members_at_once`` runs at a
time. (Weight decay and L2 at 0 change the step: such a grid trains as two
populations.)

Each fixed hyper-parameter comes from ``fixed.KEY`` where that is set, else
from a study's tuned arm (``from_study``: that arm's ``best_params`` in
``<workdir>/results.json``), else from the training config ``train``;
sweep.json records which. Everything is validated, and the study's results
read, before anything trains.

Written to DIR:
- ``sweep.json``: the config, the grid, the fixed values and their sources,
  and per point its runs (each seed's full curves), failed runs and summary;
- ``table.md``: a row per point — test accuracy, test loss, final training
  loss, validation accuracy and loss (mean ± std over seeds), seeds, failed
  runs, and the test-accuracy difference to the first point (strength 0),
  paired by seed, with a 95% t interval; the failed runs listed under it;
- ``sweep.png``: one key: test accuracy, test loss and final training loss
  against strength (log axis; the 0 point a separate marker left of the
  smallest strength, with a dashed line at its mean); two keys: heat maps
  of test accuracy and test loss.

A run that diverged (a NaN or Inf stopped it) or collapsed is failed, by
the studies' rule (`gnp.results.failures`, applied per point): counted,
listed, and left out of means, intervals and plots.

A sweep resumes: each finished run is kept in
``DIR/runs/<point>/seed_<s>.json``, and running the same command again
trains only the runs that are missing (once all are there, it rewrites the
outputs and trains nothing). A workdir holding another sweep is refused;
the grid, ``num_seeds``, ``num_epochs`` and ``members_at_once`` may change
(runs already trained at the same setting are reused).

Importable: `run(sweep, workdir)` here; what a sweep is — its keys,
`default_sweep`, `log_grid`, `plan` — in `gnp.sweep_config`; the numbers
behind the outputs, `summarize(result)` and `sweep_curves(result)`, and
`table`, `figure`, in `gnp.sweep_report`.
"""

from __future__ import annotations

import collections
import difflib
import json
import os
import shlex
import sys
import time

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gnp import checkpoints
from gnp import cli
from gnp import config as config_lib
from gnp import data as data_lib
from gnp import experiment as experiment_lib
from gnp import population
from gnp import results as results_lib
from gnp import sweep_config
from gnp import sweep_report
from gnp import writers
from gnp.errors import ConfigError
from gnp.errors import UserError

# Keys a sweep may change when it resumes from its workdir: what it trains
# is decided run by run (a stored run is reused only if its training config
# is the same), so only the setting shared by every run must not change.
RESUMABLE_KEYS = ("num_seeds", "num_epochs", "members_at_once")


# --- Training, run by run on disk --------------------------------------------


def _run_path(workdir: str, member: sweep_config.Member) -> str:
  return os.path.join(workdir, "runs", member.point, f"seed_{member.seed}.json")


def _as_json(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _stored(workdir: str, member: sweep_config.Member) -> dict | None:
  """The member's stored run, if one exists for exactly its config."""
  path = _run_path(workdir, member)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except ValueError:  # Not written by gnp.sweep (it writes atomically).
    return None
  return record if record.get("config") == _as_json(member.config) else None


def _train_missing(sweep, members, workdir: str) -> int:
  """Trains the members with no stored run, in populations of
  ``members_at_once``, storing each chunk's runs; returns how many."""
  todo = [m for m in members if _stored(workdir, m) is None]
  if not todo:
    return 0
  config = todo[0].config
  dataset = data_lib.load(config.dataset,
                          seed=experiment_lib.data_seed(config))
  groups = collections.defaultdict(list)
  for m in todo:
    groups[json.dumps(population.structure(m.config), sort_keys=True,
                      default=str)].append(m)
  size = sweep.members_at_once or len(todo)
  chunks = [group[i:i + size] for group in groups.values()
            for i in range(0, len(group), size)]
  logging.info("Training %d of %d runs in %d chunk(s), %d structure(s).",
               len(todo), len(members), len(chunks), len(groups))
  populations, started = {}, time.perf_counter()
  for i, chunk in enumerate(chunks, 1):
    key = json.dumps(population.structure(chunk[0].config), sort_keys=True,
                     default=str)
    if key not in populations:
      populations.clear()  # Keep one: each holds its compiled programs.
      populations[key] = population.Population(chunk[0].config, dataset)
    chunk_started = time.perf_counter()

    def progress(epoch, histories, i=i, started=chunk_started):
      logging.info("chunk %d/%d (%d runs): epoch %d/%d, %.0f s", i,
                   len(chunks), len(histories), epoch, sweep.num_epochs,
                   time.perf_counter() - started)

    histories, _ = populations[key].train([m.config for m in chunk],
                                          on_epoch=progress)
    seconds = (time.perf_counter() - chunk_started) / len(chunk)
    for member, history in zip(chunk, histories):
      record = {"point": member.point, "values": member.values,
                "seed": member.seed, "config": _as_json(member.config),
                "num_classes": int(dataset.num_classes),
                "train_time_s": seconds}
      record.update(results_lib.seed_entry(member.seed, history))
      writers.write_atomically(_run_path(workdir, member),
                               json.dumps(record, indent=1))
    elapsed = time.perf_counter() - started
    logging.info("chunk %d/%d done (%d runs); %.0f s so far, about %.0f s"
                 " to go.", i, len(chunks), len(chunk), elapsed,
                 elapsed / i * (len(chunks) - i))
  return len(todo)


# --- The sweep ---------------------------------------------------------------


def check_workdir(sweep, fixed: dict, workdir: str) -> None:
  """Raises UserError if ``workdir`` holds a sweep other than ``sweep``."""
  path = os.path.join(workdir, "sweep_config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    stored = json.load(f)
  now = _identity(sweep, fixed)
  changed = [k for k in config_lib.differences(stored, now)
             if not k.startswith("config.grid.")]
  if changed:
    raise UserError(
        f"workdir {workdir} holds another sweep (it differs in"
        f" {', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''});"
        " use a new --workdir, or the same sweep to resume (only the grid,"
        f" {', '.join(RESUMABLE_KEYS)} may change).")


def _identity(sweep, fixed: dict) -> dict:
  """What must not change when a sweep resumes: its config but the
  resumable keys, and its fixed values as resolved (wherever they are
  pinned or read from)."""
  config = json.loads(sweep.to_json_best_effort(sort_keys=True))
  for key in (*RESUMABLE_KEYS, "fixed", "from_study"):
    config.pop(key, None)
  return {"config": config, "fixed": {k: v["value"] for k, v in fixed.items()}}


def run(sweep: ml_collections.ConfigDict, workdir: str, *,
        command: str | None = None) -> dict:
  """Trains (or resumes) ``sweep`` in ``workdir`` and writes sweep.json,
  table.md and sweep.png; returns sweep.json's contents. ``command`` is the
  line quoted in the table's header."""
  trained = sweep_config.plan(sweep)  # Raises before anything is written.
  check_workdir(sweep, trained["fixed"], workdir)
  os.makedirs(workdir, exist_ok=True)
  with checkpoints.WorkdirLock(workdir):
    check_workdir(sweep, trained["fixed"], workdir)  # Now that it is ours.
    writers.write_atomically(
        os.path.join(workdir, "sweep_config.json"),
        json.dumps(_identity(sweep, trained["fixed"]), indent=1))
    _train_missing(sweep, trained["members"], workdir)
    result = _result(sweep, trained, workdir, command)
    sweep_report.write(result, workdir)
  return result


def _result(sweep, trained: dict, workdir: str, command) -> dict:
  """sweep.json's contents from the stored runs."""
  runs = {(m.point, m.seed): _stored(workdir, m) for m in trained["members"]}
  points = []
  for values in trained["points"]:
    name = sweep_config.label(values)
    seeds = [{k: runs[(name, s)][k]
              for k in ("seed", "diverged", "diverged_epoch", "history")
              if k in runs[(name, s)]} for s in trained["seeds"]]
    points.append({"label": name, "values": values, "seeds": seeds})
  first = next(iter(runs.values()))
  result = {
      "sweep": sweep.name,
      "command": command or "gnp.sweep.run(...) from Python",
      "method": trained["members"][0].config.method,
      "keys": list(trained["grid"]),
      "grid": {k: list(v) for k, v in trained["grid"].items()},
      "seeds": trained["seeds"],
      "num_epochs": sweep.num_epochs,
      "fixed": trained["fixed"],
      "num_classes": first["num_classes"],
      "config": json.loads(sweep.to_json_best_effort(sort_keys=True)),
      "points": points,
      "wall_time_s": {"training": sum(r["train_time_s"]
                                      for r in runs.values())},
  }
  for point, row in zip(points, sweep_report.summarize(result)):
    point["summary"] = {k: row[k] for k in ("metrics", "failed", "paired")}
  return result


# --- Command line ------------------------------------------------------------


def _define_flags():
  # Defined when run as a program only, so that importing gnp.sweep next to
  # gnp.main or gnp.study (flags of the same names) stays possible.
  flags.DEFINE_string(
      "workdir", None, "Directory for runs/, sweep.json, table.md and"
      " sweep.png; a sweep resumes from what it holds.", required=True)
  config_flags.DEFINE_config_file(
      "config", None, "Sweep config file, configs/sweeps/NAME.py[:smoke];"
      " required.", lock_config=True)
  cli.hide_config_default()
  global __doc__  # pylint: disable=global-statement
  __doc__ += (
      "\nThe sweep keys (--config.KEY=DEFAULT):\n"
      + cli.config_keys_help(sweep_config.default_sweep(),
                             sweep_config.default_sweep,
                             skip=("train", "fixed"))
      + "\n  --config.grid.SECTION.NAME='(0, 0.01, 0.1)'\n      The values of"
      " a key the config's grid sweeps.\n  --config.fixed.KEY=VALUE\n      Pin"
      f" one of {', '.join(sweep_config.TRACED_KEYS)}.\n"
      "  --config.train.KEY=VALUE\n      Any training key: python -m gnp.main"
      " --help lists them.\n")


def check_override(key: str) -> None:
  """Raises UserError unless ``--config.KEY`` can name a sweep key: one of
  `gnp.sweep_config.default_sweep`'s, or a training key under train.,
  grid. or fixed."""
  section, _, rest = key.partition(".")
  if section in ("train", "grid", "fixed") and rest:
    try:
      config_lib.check_key(rest)
    except ConfigError as e:
      raise UserError(f"--config.{key}: {e}") from None
    return
  known = [k for k in config_lib.flatten(sweep_config.default_sweep())
           if not k.startswith(("train.", "fixed."))]
  if key not in known and key not in ("train", "grid", "fixed",
                                       "from_study"):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"--config.{key}: unknown sweep key {key!r}{hint}.")


def _parse_flags(argv):
  return cli.parse_config_flags(argv, program="gnp.sweep",
                                example="configs/sweeps/gnvr.py",
                                check_key=check_override)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  writers.quiet_logs()
  command = " ".join(["python -m gnp.sweep",
                      *map(shlex.quote, sys.argv[1:])])
  try:
    result = run(flags.FLAGS.config, flags.FLAGS.workdir, command=command)
  except UserError as e:
    logging.flush()
    sys.exit(f"gnp.sweep: error: {e}")
  logging.info("Wrote %s", os.path.join(flags.FLAGS.workdir, "table.md"))
  print(sweep_report.table(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
