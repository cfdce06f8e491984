"""A study's results.json in numbers: its schema, failed runs, per-arm
summaries and paired differences. `gnp.report` tabulates them and
`gnp.figures` draws them; both are importable from `gnp.report` too.
"""

import collections
import math

import numpy as np
from scipy import stats

from gnp.errors import UserError

# History keys summarised per arm, in table order.
METRICS = ("test/accuracy", "validation/accuracy", "validation/loss",
           "train/cross_entropy", "test/loss")
# The paired comparison against the first arm is on this metric.
PAIRED_METRIC = "test/accuracy"


def seed_entry(seed: int, history: dict) -> dict:
  """One final run as results.json holds it: ``{"seed", "history"}``, and
  for a run that diverged ``diverged`` (why) and ``diverged_epoch``, which
  `failures` reads. ``history`` is a population's or a sequential run's,
  whose ``diverged``/``diverged_epoch`` keys move out of it (not in place).
  """
  history = dict(history)
  entry = {"seed": seed}
  epoch = history.pop("diverged_epoch", None)
  if "diverged" in history:  # Its curves stop being training there.
    entry["diverged"] = history.pop("diverged")
    # A sequential run stops at the first sync after the fault: its history
    # ends in the epoch it diverged.
    entry["diverged_epoch"] = epoch or len(history.get("epoch", []))
  entry["history"] = history
  return entry


def check(results):
  """Raises UserError naming the first part of `results` that is malformed."""
  arms = results.get("arms") if isinstance(results, dict) else None
  if not isinstance(arms, list) or not arms:
    raise UserError("results has no 'arms' (a non-empty list)")
  if not isinstance(results.get("include_failed", False), bool):
    raise UserError("'include_failed' must be true or false")
  wall = results.get("wall_time_s") or {}
  if not isinstance(wall, dict) or not all(
      isinstance(v, (int, float)) for v in wall.values()):
    raise UserError("'wall_time_s' must map names to seconds")
  for i, arm in enumerate(arms):
    if not isinstance(arm, dict) or "name" not in arm:
      raise UserError(f"arms[{i}] has no 'name'")
    seeds = arm.get("seeds", [])
    if not (isinstance(seeds, list) and all(
        isinstance(s, dict) and "seed" in s
        and isinstance(s.get("history"), dict)
        and all(isinstance(v, list) for v in s["history"].values())
        for s in seeds) and isinstance(arm.get("best_params") or {}, dict)
            and all(isinstance(t, dict) for t in arm.get("trials", []))
            and isinstance(arm.get("best_value", 0) or 0, (int, float))):
      raise UserError(f"arm {arm['name']!r}: each seed needs 'seed' and a"
                      " 'history' of lists; 'trials' and 'best_params' hold"
                      " objects; 'best_value' is a number or null")
    values = [s["seed"] for s in seeds]
    if len(set(values)) != len(values):
      raise UserError(f"arm {arm['name']!r} repeats a seed: {values}")
    if not all(isinstance(s.get("replicate", 0), int)
               and not isinstance(s.get("replicate", 0), bool)
               and s.get("replicate", 0) >= 0 for s in seeds):
      raise UserError(f"arm {arm['name']!r}: a seed's 'replicate' must be a"
                      " non-negative integer")
    if not all(isinstance(r, dict) and isinstance(r.get("replicate"), int)
               and isinstance(r.get("best_params") or {}, dict)
               for r in arm.get("replicates", [])):
      raise UserError(f"arm {arm['name']!r}: each of 'replicates' needs a"
                      " 'replicate' number and 'best_params'")


def finals(arm, key, skip=()):
  """{seed: last epoch's value of `key`} over the seeds that logged it,
  leaving out the seeds in ``skip``.

  In seed order, not listing order, so `summarize`'s ``values`` line up with
  its sorted ``seeds`` however results.json happens to list them.
  """
  out = {}
  for seed in sorted(arm.get("seeds", []), key=lambda s: s["seed"]):
    if seed["seed"] in skip:
      continue
    history = seed["history"].get(key)
    if history:
      out[seed["seed"]] = math.nan if history[-1] is None else float(
          history[-1])
  return out


def replicate_of(arm) -> dict[int, int]:
  """{seed: its replicate} (0 where results.json predates replicates)."""
  return {s["seed"]: s.get("replicate", 0) for s in arm.get("seeds", [])}


def _mean_std(values):
  values = np.asarray(values, dtype=np.float64)
  return {"values": values.tolist(),
          "mean": float(values.mean()) if values.size else None,
          "std": float(values.std(ddof=1)) if values.size > 1 else None}


def _t_interval(values):
  """(half width of the 95% t interval of the mean of ``values``) or None."""
  values = np.asarray(values, dtype=np.float64)
  if values.size < 2:  # One value says nothing about its own spread.
    return None
  return float(stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1)
               / math.sqrt(values.size))


def _paired(arm, reference, skip=()):
  """Differences arm − reference, paired by seed on the seeds both have,
  leaving out the seeds in ``skip`` (failed in either arm).

  With one replicate the interval is the t interval over the per-seed
  differences. With several, each replicate's paired differences are
  averaged first, and the interval is the t interval over those replicate
  means (R − 1 degrees of freedom): each replicate is an independent run of
  the whole protocol (tuning draw, then seeds), so the spread of its means
  holds both the tuning and the seed variation. ``mean`` is then the mean
  of the replicate means.
  """
  mine = finals(arm, PAIRED_METRIC)
  theirs = finals(reference, PAIRED_METRIC)
  common = sorted((set(mine) & set(theirs)) - set(skip))
  diffs = np.array([mine[k] - theirs[k] for k in common], dtype=np.float64)
  n = len(common)
  replicate = replicate_of(arm)
  by_replicate = collections.defaultdict(list)
  for seed, diff in zip(common, diffs):
    by_replicate[replicate[seed]].append(diff)
  replicates = sorted(by_replicate)
  means = np.array([np.mean(by_replicate[r]) for r in replicates],
                   dtype=np.float64)
  replicated = len(set(replicate.values()) | set(
      replicate_of(reference).values())) > 1
  out = {"metric": PAIRED_METRIC, "seeds": common, "n": n,
         "unpaired_seeds": sorted(set(mine) ^ set(theirs)),
         "excluded_seeds": sorted((set(mine) & set(theirs)) & set(skip)),
         "differences": diffs.tolist(),
         "replicates": replicates, "replicate_means": means.tolist(),
         "estimator": "replicates" if replicated else "seeds",
         "mean": None, "half_width": None, "low": None, "high": None}
  values = means if replicated else diffs
  if values.size:
    out["mean"] = float(values.mean())
  half = _t_interval(values)
  if half is not None:
    out.update(half_width=half, low=out["mean"] - half,
               high=out["mean"] + half)
  return out


def verdict(paired) -> str | None:
  """"better", "worse" or "no detectable difference" from ``paired``'s 95%
  interval (None without one): better or worse only where the interval
  excludes zero."""
  if paired is None or paired["low"] is None:
    return None
  if paired["low"] > 0:
    return "better"
  if paired["high"] < 0:
    return "worse"
  return "no detectable difference"


# A seed's run that collapsed lost more than half of its arm's typical gain
# over chance, and at least this much accuracy against the arm's median.
COLLAPSE_MARGIN = 0.05


def accuracy_key(results) -> str:
  """validation/accuracy where every seed of every arm recorded it, else
  test/accuracy (the plot's rule too)."""
  has_validation = all(s["history"].get("validation/accuracy")
                       for arm in results["arms"] for s in arm.get("seeds", []))
  return "validation/accuracy" if has_validation else "test/accuracy"


def failures(results) -> dict[str, dict[int, dict]]:
  """The failed final runs: ``{arm name: {seed: {"epoch", "reason",
  "replicate"}}}``.

  A seed's run failed when
  - it **diverged**: a NaN or Inf loss or update stopped it (``diverged`` in
    its results entry; its later epochs are the frozen last good state, not
    training), or a final metric is NaN or null;
  - it **collapsed**: its final accuracy a (validation accuracy where every
    run has a validation split, else test accuracy) is below
    c + (m − c) / 2 and at least `COLLAPSE_MARGIN` below m, where m is the
    median final accuracy of the arm's seeds that did not diverge (in the
    seed's replicate: replicates train different settings) and c is
    chance, 1 / ``num_classes`` (0 where results.json does not say). It lost
    more than half of the arm's typical gain over chance. An arm whose
    seeds mostly fail to learn has m near c, and none of them counts as
    collapsed: the arm's mean says so itself.
  """
  check(results)
  key = accuracy_key(results)
  classes = results.get("num_classes")
  chance = 1.0 / classes if isinstance(classes, int) and classes > 0 else 0.0
  out = {}
  for arm in results["arms"]:
    failed = {}
    for seed in arm.get("seeds", []):
      history = seed["history"]
      if "diverged" in seed:
        epoch = seed.get("diverged_epoch") or len(history.get("epoch", []))
        failed[seed["seed"]] = {"epoch": epoch,
                                "reason": f"diverged: {seed['diverged']}"}
        continue
      for name in METRICS:
        values = history.get(name)
        if values and (values[-1] is None or not math.isfinite(values[-1])):
          failed[seed["seed"]] = {
              "epoch": len(values), "reason": f"non-finite final {name}"}
          break
    replicate = replicate_of(arm)
    accuracies = finals(arm, key, skip=failed)
    medians = {r: float(np.median([v for seed, v in accuracies.items()
                                   if replicate[seed] == r]))
               for r in set(replicate[seed] for seed in accuracies)}
    for seed, value in accuracies.items():
      median = medians[replicate[seed]]
      if (value < chance + (median - chance) / 2
          and median - value >= COLLAPSE_MARGIN):
        epochs = len(next(s for s in arm["seeds"]
                          if s["seed"] == seed)["history"][key])
        failed[seed] = {"epoch": epochs, "reason": (
            f"collapsed: {key} {value:.1%} against the arm's median"
            f" {median:.1%} (chance {chance:.1%})")}
    for seed, entry in failed.items():
      entry["replicate"] = replicate[seed]
    out[str(arm["name"])] = dict(sorted(failed.items()))
  return out


def summarize(results, include_failed=None):
  """Per-arm numbers behind the table, in arm order.

  Failed runs (`failures`) are left out of every mean, std and interval
  unless ``include_failed`` (default: ``results["include_failed"]``, else
  False) says otherwise; either way each row lists them under ``failed``.

  Returns one dict per arm with ``name``, ``description``, ``seeds`` (sorted
  seed values), ``num_seeds``, ``missing_seeds`` (seeds other arms have and
  this one lacks), ``metrics`` ({key in METRICS: {"values", "mean", "std"}},
  final-epoch values as fractions in seed order; mean None without values,
  std None with fewer than two), ``best_params``, ``best_value``,
  ``trials_complete``, ``trials_pruned``, ``trials_failed``,
  ``tuning_epochs`` (None where results.json predates it), ``failed`` ({seed: {"epoch",
  "reason"}}), ``include_failed`` and ``paired``: None for the first arm,
  otherwise {"metric", "seeds", "n", "unpaired_seeds", "excluded_seeds"
  (common seeds left out as failed in either arm), "differences" (per seed,
  in ``seeds`` order), "replicates", "replicate_means" (the mean difference
  in each replicate), "estimator" ("seeds" or "replicates": what the
  interval is over, see `_paired`), "mean", "half_width", "low", "high"}
  for arm − first arm on common seeds (t interval None with fewer than two
  values); ``verdict`` (`verdict`), ``num_replicates`` and ``replicates``:
  per replicate {"replicate", "best_params", "best_value", "seeds",
  "test_accuracy" (its mean over the replicate's kept seeds, or None),
  "paired_mean" (its mean difference to the first arm, or None)}.
  """
  check(results)
  if include_failed is None:
    include_failed = bool(results.get("include_failed", False))
  arms = results["arms"]
  failed = failures(results)
  skipped = {name: () if include_failed else set(f)
             for name, f in failed.items()}
  all_seeds = {s["seed"] for arm in arms for s in arm.get("seeds", [])}
  reference = str(arms[0]["name"])
  rows = []
  for i, arm in enumerate(arms):
    name = str(arm["name"])
    seeds = sorted(s["seed"] for s in arm.get("seeds", []))
    states = [t.get("state") for t in arm.get("trials", [])]
    rows.append({
        "name": name, "description": arm.get("description", ""),
        "seeds": seeds, "num_seeds": len(seeds),
        "missing_seeds": sorted(all_seeds - set(seeds)),
        "metrics": {key: _mean_std(list(finals(arm, key,
                                                skipped[name]).values()))
                    for key in METRICS},
        "best_params": dict(arm.get("best_params") or {}),
        "best_value": arm.get("best_value"),
        "trials_complete": states.count("COMPLETE"),
        "trials_pruned": states.count("PRUNED"),
        "trials_failed": states.count("FAIL"),
        "tuning_epochs": arm.get("tuning_epochs"),
        "failed": failed[name], "include_failed": include_failed,
        "paired": None if i == 0 else _paired(
            arm, arms[0], set(skipped[name]) | set(skipped[reference])),
    })
    row = rows[-1]
    row["verdict"] = verdict(row["paired"])
    row["replicates"] = _replicates(arm, row, skipped[name])
    row["num_replicates"] = len(row["replicates"])
  return rows


def _replicates(arm, row, skip):
  """Per-replicate summaries of ``arm`` (see `summarize`)."""
  replicate = replicate_of(arm)
  listed = {r["replicate"]: r for r in arm.get("replicates", [])}
  if not listed:  # Older results.json: the arm's best is replicate 0's.
    listed = {0: {"best_params": arm.get("best_params") or {},
                  "best_value": arm.get("best_value")}}
  accuracy = finals(arm, PAIRED_METRIC, skip)
  paired = row["paired"]
  means = {} if paired is None else dict(zip(paired["replicates"],
                                             paired["replicate_means"]))
  out = []
  for r in sorted(set(listed) | set(replicate.values())):
    values = [v for seed, v in accuracy.items() if replicate[seed] == r]
    out.append({
        "replicate": r,
        "best_params": dict(listed.get(r, {}).get("best_params") or {}),
        "best_value": listed.get(r, {}).get("best_value"),
        "seeds": sorted(seed for seed in replicate if replicate[seed] == r),
        "test_accuracy": float(np.mean(values)) if values else None,
        "paired_mean": means.get(r)})
  return out
