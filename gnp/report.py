"""Turns a study's results into a table and learning curves.

``python -m gnp.report --workdir=DIR`` reads ``DIR/results.json`` and writes
``DIR/table.md`` (one row per arm: final metrics as mean ± std over seeds,
the tuned hyper-parameters, and the test-accuracy difference to the first
arm, paired by seed, with a 95% t interval) and ``DIR/curves.png`` (training
loss and validation accuracy per epoch, mean ± std band per arm). A missing
or malformed ``results.json`` exits with status 1 and one line saying why.

A seed's run that diverged or collapsed (`failures` defines both) is never
averaged silently: each arm counts its failed runs, the table lists them
(arm, seed, epoch, reason) under it, and they are left out of the means,
intervals and curves unless ``--include_failed`` (or the study's
``include_failed``) puts them back in.

The same is importable: `write(results, workdir)`, `table(results)`,
`plot(results, path)` (`figure(results)` for the Figure itself), and the
numbers behind them: `summarize(results)` for the table, `curves(results)`
for the plot.
"""

import json
import math
import os
import sys

import numpy as np
from absl import app
from absl import flags
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from gnp.errors import UserError

# History keys summarised per arm, in table order.
METRICS = ("test/accuracy", "validation/accuracy", "validation/loss",
           "train/cross_entropy", "test/loss")
# The paired comparison against the first arm is on this metric.
PAIRED_METRIC = "test/accuracy"
_SHORT_NAMES = {"learning_rate": "lr", "weight_decay": "wd", "lam": "λ",
                "rho": "ρ", "alpha": "α", "noise_std": "σ"}
_DASH = "—"


def _check(results):
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


def _finals(arm, key, skip=()):
  """{seed: last epoch's value of `key`} over the seeds that logged it,
  leaving out the seeds in ``skip``.

  In seed order, not listing order, so `summarize`'s ``values`` line up with
  its sorted ``seeds`` however results.json happens to list them.
  """
  finals = {}
  for seed in sorted(arm.get("seeds", []), key=lambda s: s["seed"]):
    if seed["seed"] in skip:
      continue
    history = seed["history"].get(key)
    if history:
      finals[seed["seed"]] = math.nan if history[-1] is None else float(
          history[-1])
  return finals


def _mean_std(values):
  values = np.asarray(values, dtype=np.float64)
  return {"values": values.tolist(),
          "mean": float(values.mean()) if values.size else None,
          "std": float(values.std(ddof=1)) if values.size > 1 else None}


def _paired(arm, reference, skip=()):
  """Per-seed differences arm − reference on the seeds both have, leaving
  out the seeds in ``skip`` (failed in either arm)."""
  mine = _finals(arm, PAIRED_METRIC)
  theirs = _finals(reference, PAIRED_METRIC)
  common = sorted((set(mine) & set(theirs)) - set(skip))
  diffs = np.array([mine[k] - theirs[k] for k in common], dtype=np.float64)
  n = len(common)
  out = {"metric": PAIRED_METRIC, "seeds": common, "n": n,
         "unpaired_seeds": sorted(set(mine) ^ set(theirs)),
         "excluded_seeds": sorted((set(mine) & set(theirs)) & set(skip)),
         "mean": float(diffs.mean()) if n else None,
         "half_width": None, "low": None, "high": None}
  if n >= 2:  # One difference says nothing about its own spread.
    half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    out.update(half_width=half, low=out["mean"] - half,
               high=out["mean"] + half)
  return out


# A seed's run that collapsed lost more than half of its arm's typical gain
# over chance, and at least this much accuracy against the arm's median.
COLLAPSE_MARGIN = 0.05


def _accuracy_key(results) -> str:
  """validation/accuracy where every seed of every arm recorded it, else
  test/accuracy (the plot's rule too)."""
  has_validation = all(s["history"].get("validation/accuracy")
                       for arm in results["arms"] for s in arm.get("seeds", []))
  return "validation/accuracy" if has_validation else "test/accuracy"


def failures(results) -> dict[str, dict[int, dict]]:
  """The failed final runs: ``{arm name: {seed: {"epoch", "reason"}}}``.

  A seed's run failed when
  - it **diverged**: a NaN or Inf loss or update stopped it (``diverged`` in
    its results entry; its later epochs are the frozen last good state, not
    training), or a final metric is NaN or missing where others have it;
  - it **collapsed**: its final accuracy a (validation accuracy where every
    run has a validation split, else test accuracy) is below
    c + (m − c) / 2 and at least `COLLAPSE_MARGIN` below m, where m is the
    median final accuracy of the arm's seeds that did not diverge and c is
    chance, 1 / ``num_classes`` (0 where results.json does not say). It lost
    more than half of the arm's typical gain over chance. An arm whose
    seeds mostly fail to learn has m near c, and none of them counts as
    collapsed: the arm's mean says so itself.
  """
  _check(results)
  key = _accuracy_key(results)
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
    accuracies = _finals(arm, key, skip=failed)
    if accuracies:
      median = float(np.median(list(accuracies.values())))
      for seed, value in accuracies.items():
        if (value < chance + (median - chance) / 2
            and median - value >= COLLAPSE_MARGIN):
          epochs = len(next(s for s in arm["seeds"]
                            if s["seed"] == seed)["history"][key])
          failed[seed] = {"epoch": epochs, "reason": (
              f"collapsed: {key} {value:.1%} against the arm's median"
              f" {median:.1%} (chance {chance:.1%})")}
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
  ``trials_complete``, ``trials_failed``, ``failed`` ({seed: {"epoch",
  "reason"}}), ``include_failed`` and ``paired``: None for the first arm,
  otherwise {"metric", "seeds", "n", "unpaired_seeds", "excluded_seeds"
  (common seeds left out as failed in either arm), "mean", "half_width",
  "low", "high"} for arm − first arm on common seeds (t interval None if
  n < 2).
  """
  _check(results)
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
        "metrics": {key: _mean_std(list(_finals(arm, key,
                                                skipped[name]).values()))
                    for key in METRICS},
        "best_params": dict(arm.get("best_params") or {}),
        "best_value": arm.get("best_value"),
        "trials_complete": states.count("COMPLETE"),
        "trials_failed": states.count("FAIL"),
        "failed": failed[name], "include_failed": include_failed,
        "paired": None if i == 0 else _paired(
            arm, arms[0], set(skipped[name]) | set(skipped[reference])),
    })
  return rows


def _pm(stat, scale=1.0, digits=4):
  if stat["mean"] is None:
    return _DASH
  std = _DASH if stat["std"] is None else f"{stat['std'] * scale:.{digits}f}"
  return f"{stat['mean'] * scale:.{digits}f} ± {std}"


def format_params(params):
  """`{"optimizer.learning_rate": 0.0012}` → ``lr 1.2e-03``."""
  if not params:
    return _DASH
  last = [key.rsplit(".", 1)[-1] for key in params]
  parts = []
  for key, short, value in zip(params, last, params.values()):
    # A last component shared by two keys is ambiguous; keep the full key.
    name = key if last.count(short) > 1 else _SHORT_NAMES.get(short, short)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      value = f"{value:.1e}"
    parts.append(f"{name} {value}")
  return ", ".join(parts)


def _paired_cell(paired):
  if paired is None:
    return "reference"
  if paired["mean"] is None:
    return f"{_DASH} (no common seeds)"
  ci = _DASH if paired["low"] is None else (
      f"[{paired['low'] * 100:+.2f}, {paired['high'] * 100:+.2f}]")
  return f"{paired['mean'] * 100:+.2f} {ci} (n={paired['n']})"


def _cell(text):
  return str(text).replace("|", r"\|").replace("\n", " ")


def table(results, include_failed=None):
  """The GitHub-markdown table of `summarize(results)`, with a footer line
  and, where runs failed, the list of them."""
  rows = summarize(results, include_failed)
  header = ["Arm", "Test acc. (%)", "Val. acc. (%)", "Val. loss",
            "Train loss", "Test loss", "Seeds", "Failed",
            "Best hyper-parameters",
            f"Δ test acc. vs {rows[0]['name']} (pp, 95% CI)"]
  lines = [f"# Study: {_cell(results.get('study', ''))}", "",
           "| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    m = row["metrics"]
    seeds = str(row["num_seeds"])
    if row["missing_seeds"]:
      missing = row["missing_seeds"]
      seeds += f" (lacks seed{'s' * (len(missing) > 1)}"
      seeds += f" {', '.join(map(str, missing))})"
    cells = [row["name"], _pm(m["test/accuracy"], 100, 2),
             _pm(m["validation/accuracy"], 100, 2), _pm(m["validation/loss"]),
             _pm(m["train/cross_entropy"]), _pm(m["test/loss"]), seeds,
             str(len(row["failed"])), format_params(row["best_params"]),
             _paired_cell(row["paired"])]
    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  objective = results.get("objective") or {}
  trials = ", ".join(
      f"{r['name']} {r['trials_complete']}/{r['trials_failed']}"
      + ("" if r["best_value"] is None else f" (best {r['best_value']:.4f})")
      for r in rows)
  footer = (f"Objective: {objective.get('metric', '?')}"
            f" ({objective.get('direction', '?')}). Trials completed/failed:"
            f" {trials}.")
  wall = results.get("wall_time_s") or {}
  if wall:
    footer += " Wall time: " + ", ".join(
        f"{k} {float(v):.1f} s" for k, v in wall.items()) + "."
  included = rows[0]["include_failed"]
  lines += ["", "Mean ± sample std over seeds of the last epoch; accuracies"
            " in percent, differences in percentage points; failed runs"
            f" {'included (include_failed)' if included else 'left out'}.",
            "", _cell(footer)]
  failed = [(r["name"], seed, f) for r in rows
            for seed, f in r["failed"].items()]
  if failed:
    lines += ["", f"Failed runs ({len(failed)}, "
              f"{'included in' if included else 'left out of'} the means and"
              " intervals; the rule is in `gnp.report.failures`):", ""]
    lines += [f"- {name}, seed {seed}, epoch {f['epoch']}: {_cell(f['reason'])}"
              for name, seed, f in failed]
  described = [r for r in rows if r["description"]]
  if described:
    lines += [""] + [f"- {r['name']}: {r['description']}" for r in described]
  return "\n".join(lines) + "\n"


def _curve(arm, key, scale, skip=()):
  """One arm's line and band, or None if no seed logged `key`.

  Seeds can stop at different epochs (a run cut short); averaging only the
  epochs every seed reached keeps the mean from jumping where one drops out.
  A None entry (a diverged evaluation) stays NaN so the gap shows.
  """
  histories = [s["history"] for s in arm.get("seeds", [])
               if s["history"].get(key) and s["seed"] not in skip]
  if not histories:
    return None
  length = min(len(h[key]) for h in histories)
  values = np.array([[math.nan if v is None else v for v in h[key][:length]]
                     for h in histories], dtype=np.float64)
  epochs = histories[0].get("epoch", list(range(1, length + 1)))[:length]
  mean = values.mean(axis=0)
  std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(length)
  return {"name": str(arm["name"]), "epochs": np.asarray(epochs),
          "mean": mean * scale, "low": (mean - std) * scale,
          "high": (mean + std) * scale}


def curves(results):
  """What `plot` draws, as numbers, so a test can check them.

  Returns two panels, training loss then accuracy: validation accuracy, or
  test accuracy when any seed lacks a validation split; validation loss
  instead where the study was tuned on it. Each panel is a dict
  with ``key`` (the history key), ``title``, ``ylabel`` and ``arms``: one
  dict per arm that logged the key, in arm order, with ``name``, ``color``
  (the same for an arm in both panels), ``epochs``, and ``mean``, ``low``
  and ``high`` (mean ∓ sample std over seeds, zero band for one seed) as
  drawn: accuracies in percent. All seeds are cut to the shortest history.
  Failed runs (`failures`) are left out, as in the table, unless
  ``results["include_failed"]``.
  """
  _check(results)
  arms = results["arms"]
  accuracy = _accuracy_key(results)
  has_validation = accuracy == "validation/accuracy"
  skipped = ({} if results.get("include_failed") else
             {name: set(f) for name, f in failures(results).items()})
  second = (accuracy, 100.0, "Validation accuracy" if has_validation else
            "Test accuracy (no validation split)", "accuracy (%)")
  objective = (results.get("objective") or {}).get("metric")
  if objective == "validation/loss" and has_validation:
    # A study tuned on validation loss is judged by it: show that.
    second = (objective, 1.0, "Validation loss (the tuning objective)",
              "cross-entropy")
  panels = [("train/cross_entropy", 1.0, "Training loss", "cross-entropy"),
            second]
  out = []
  for key, scale, title, ylabel in panels:
    drawn = []
    for i, arm in enumerate(arms):
      curve = _curve(arm, key, scale, skipped.get(str(arm["name"]), ()))
      if curve is not None:
        drawn.append({**curve, "color": f"C{i % 10}"})
    out.append({"key": key, "title": title, "ylabel": ylabel, "arms": drawn})
  return out


def figure(results):
  """The matplotlib Figure of `curves(results)`: a line and band per arm."""
  panels = curves(results)
  # No pyplot: no global state. Constrained layout makes room for the legend
  # below the panels, where it cannot hide a curve.
  fig = Figure(figsize=(10, 4.5), dpi=120, layout="constrained")
  legend = {}
  for ax, panel in zip(fig.subplots(1, 2), panels):
    for arm in panel["arms"]:
      (line,) = ax.plot(arm["epochs"], arm["mean"], color=arm["color"],
                        label=arm["name"])
      ax.fill_between(arm["epochs"], arm["low"], arm["high"],
                      color=arm["color"], alpha=0.2, linewidth=0)
      legend.setdefault(arm["name"], line)
    ax.set(title=panel["title"], xlabel="epoch", ylabel=panel["ylabel"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  if legend:
    fig.legend(legend.values(), legend.keys(), loc="outside lower center",
               ncols=min(len(legend), 6), frameon=False)
  fig.suptitle(f"Study: {results.get('study', '')} (mean ± std over seeds)")
  return fig


def plot(results, path):
  """Writes `figure(results)` to `path` as a PNG."""
  # No "Software" entry, so the same results give the same bytes.
  figure(results).savefig(path, format="png", metadata={"Software": None})


def write(results, workdir):
  """Writes ``workdir/table.md`` and ``workdir/curves.png``."""
  text = table(results)  # Checks the schema before anything is written.
  with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write(text)
  plot(results, os.path.join(workdir, "curves.png"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  workdir = flags.FLAGS.workdir
  path = os.path.join(workdir, "results.json")
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
    if flags.FLAGS.include_failed is not None and isinstance(results, dict):
      results["include_failed"] = flags.FLAGS.include_failed
    write(results, workdir)
  except (OSError, ValueError, UserError) as e:
    # KeyError/TypeError would be bugs here: _check vouches for the schema.
    message = e.strerror if isinstance(e, OSError) and e.strerror else e
    sys.exit(f"gnp.report: error: {path}: {message}")


if __name__ == "__main__":
  # Defined here, not on import: a study importing this module defines its
  # own --workdir, and absl refuses a flag defined twice.
  flags.DEFINE_string(
      "workdir", None, "Directory holding results.json; table.md and"
      " curves.png are written next to it.", required=True)
  flags.DEFINE_bool(
      "include_failed", None, "Count failed runs (diverged or collapsed"
      " seeds, see gnp.report.failures) in the means and intervals; default:"
      " as the study says (results.json's include_failed), else no.")
  app.run(main)
