"""Turns a study's results into a table and learning curves.

``python -m gnp.report --workdir=DIR`` reads ``DIR/results.json`` and writes
``DIR/table.md`` (one row per arm: final metrics as mean ± std over seeds,
the tuned hyper-parameters, and the test-accuracy difference to the first
arm, paired by seed, with a 95% t interval), ``DIR/curves.png`` (training
loss and validation accuracy per epoch, mean ± std band per arm) and
``DIR/effects.png`` (each arm's difference to the first, its interval and
the seeds' differences, as a forest plot). A missing
or malformed ``results.json`` exits with status 1 and one line saying why.

A seed's run that diverged or collapsed (`failures` defines both) is never
averaged silently: each arm counts its failed runs, the table lists them
(arm, seed, epoch, reason) under it, and they are left out of the means,
intervals and curves unless ``--include_failed`` (or the study's
``include_failed``) puts them back in.

The same is importable: `write(results, workdir)`, `table(results)`,
`plot(results, path)` (`figure(results)` for the Figure itself), and the
numbers behind them: `summarize(results)` and `failures(results)` for the
table (`gnp.results`), `curves(results)` and `effects(results)` for the
plots (`gnp.figures`).
"""

import json
import os
import sys

from absl import app
from absl import flags

from gnp import figures
from gnp.errors import UserError
# The numbers and figures behind the report, importable from here too.
from gnp.figures import curves  # pylint: disable=unused-import
from gnp.figures import figure  # pylint: disable=unused-import
from gnp.figures import plot
from gnp.results import COLLAPSE_MARGIN  # pylint: disable=unused-import
from gnp.results import METRICS  # pylint: disable=unused-import
from gnp.results import PAIRED_METRIC  # pylint: disable=unused-import
from gnp.results import failures  # pylint: disable=unused-import
from gnp.results import summarize

_SHORT_NAMES = {"learning_rate": "lr", "weight_decay": "wd", "lam": "λ",
                "rho": "ρ", "alpha": "α", "noise_std": "σ"}
_DASH = "—"


def mean_std_cell(stat, scale=1.0, digits=4):
  """``mean ± std`` of a `gnp.results` statistic, dashes where undefined."""
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


def paired_cell(paired):
  """A paired difference as ``+1.23 [+0.45, +2.01] (n=5)`` (pp), or
  "reference" for None."""
  if paired is None:
    return "reference"
  if paired["mean"] is None:
    return f"{_DASH} (no common seeds)"
  ci = _DASH if paired["low"] is None else (
      f"[{paired['low'] * 100:+.2f}, {paired['high'] * 100:+.2f}]")
  n = f"n={paired['n']}"
  if paired.get("estimator") == "replicates":
    n = f"R={len(paired['replicates'])}, {n}"
  return f"{paired['mean'] * 100:+.2f} {ci} ({n})"


def _params_cell(row):
  """The best setting; over replicates, each key's range."""
  settings = [r["best_params"] for r in row["replicates"]]
  if len(settings) <= 1:
    return format_params(row["best_params"])
  keys = list(dict.fromkeys(k for p in settings for k in p))
  if not keys:
    return _DASH
  parts = []
  for key, short in zip(keys, format_params(dict.fromkeys(keys, 0)).split(
      ", ")):
    name = short.rsplit(" ", 1)[0]
    values = [p[key] for p in settings if key in p]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool)
           for v in values):
      parts.append(f"{name} {min(values):.1e}–{max(values):.1e}")
    else:
      parts.append(f"{name} {'/'.join(dict.fromkeys(map(str, values)))}")
  return ", ".join(parts) + f" ({len(settings)} replicates)"


def _cell(text):
  return str(text).replace("|", r"\|").replace("\n", " ")


def table(results, include_failed=None):
  """The GitHub-markdown table of `summarize(results)`, with a footer line
  and, where runs failed, the list of them."""
  rows = summarize(results, include_failed)
  header = ["Arm", "Test acc. (%)", "Val. acc. (%)", "Val. loss",
            "Train loss", "Test loss", "Seeds", "Failed",
            "Best hyper-parameters",
            f"Δ test acc. vs {rows[0]['name']} (pp, 95% CI)", "Verdict"]
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
    cells = [row["name"], mean_std_cell(m["test/accuracy"], 100, 2),
             mean_std_cell(m["validation/accuracy"], 100, 2), mean_std_cell(m["validation/loss"]),
             mean_std_cell(m["train/cross_entropy"]), mean_std_cell(m["test/loss"]), seeds,
             str(len(row["failed"])), _params_cell(row),
             paired_cell(row["paired"]),
             _DASH if row["verdict"] is None else row["verdict"]]
    lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  objective = results.get("objective") or {}
  pruned = any(r["trials_pruned"] for r in rows)
  trials = ", ".join(
      f"{r['name']} {r['trials_complete']}"
      + (f"/{r['trials_pruned']}" if pruned else "")
      + f"/{r['trials_failed']}"
      + ("" if r["best_value"] is None else f" (best {r['best_value']:.4f})")
      for r in rows)
  footer = (f"Objective: {objective.get('metric', '?')}"
            f" ({objective.get('direction', '?')}). Trials completed/"
            f"{'pruned/' if pruned else ''}failed: {trials}.")
  if pruned:
    epochs = sum(r["tuning_epochs"] or 0 for r in rows)
    full = sum((r["trials_complete"] + r["trials_pruned"]
                + r["trials_failed"]) for r in rows) * (
                    (results.get("tuning") or {}).get("num_epochs") or 0)
    footer += (f" Tuning trained {epochs} epochs"
               + (f" of the {full} an unpruned study would" if full else "")
               + f" (pruner: {results['tuning']['pruner']}).")
  wall = results.get("wall_time_s") or {}
  if wall:
    footer += " Wall time: " + ", ".join(
        f"{k} {float(v):.1f} s" for k, v in wall.items()) + "."
  included = rows[0]["include_failed"]
  replicated = max(r["num_replicates"] for r in rows) > 1
  if replicated:
    runs = ("Mean ± sample std over all runs (every replicate's seeds) of"
            " the last epoch")
    interval = (
        f"Δ: the mean over the {rows[0]['num_replicates']} replicates of"
        " each replicate's seed-paired mean difference, with the 95% t"
        " interval over those replicate means (R − 1 degrees of freedom):"
        " each replicate tunes and retrains anew, so the interval covers"
        " the tuning draw and the seeds")
  else:
    runs = "Mean ± sample std over seeds of the last epoch"
    interval = ("Δ: the mean of the seed-paired differences with their 95% t"
                " interval; it covers seed noise only, not another tuning"
                " draw (tuning.replicates)")
  lines += ["", f"{runs}; accuracies in percent, differences in percentage"
            " points; failed runs"
            f" {'included (include_failed)' if included else 'left out'}."
            f" {interval}. Verdict: better or worse where the interval"
            " excludes 0.", "", _cell(footer)]
  if replicated:
    lines += ["", "Per replicate: best hyper-parameters (tuning objective),"
              " mean test accuracy, Δ test accuracy to"
              f" {rows[0]['name']}:", ""]
    for row in rows:
      for rep in row["replicates"]:
        value = ("" if rep["best_value"] is None
                 else f" ({rep['best_value']:.4f})")
        accuracy = (_DASH if rep["test_accuracy"] is None
                    else f"{rep['test_accuracy'] * 100:.2f}%")
        delta = ("" if rep["paired_mean"] is None
                 else f", Δ {rep['paired_mean'] * 100:+.2f} pp")
        lines.append(
            f"- {_cell(row['name'])}, replicate {rep['replicate']}:"
            f" {_cell(format_params(rep['best_params']))}{value};"
            f" {accuracy}{delta}")
  failed = [(r["name"], seed, f) for r in rows
            for seed, f in r["failed"].items()]
  if failed:
    lines += ["", f"Failed runs ({len(failed)}, "
              f"{'included in' if included else 'left out of'} the means and"
              " intervals; the rule is in `gnp.report.failures`):", ""]
    lines += [f"- {name},"
              + (f" replicate {f['replicate']}," if replicated else "")
              + f" seed {seed}, epoch {f['epoch']}: {_cell(f['reason'])}"
              for name, seed, f in failed]
  described = [r for r in rows if r["description"]]
  if described:
    lines += [""] + [f"- {r['name']}: {r['description']}" for r in described]
  return "\n".join(lines) + "\n"


def write(results, workdir) -> list[str]:
  """Writes ``workdir/table.md``, ``curves.png`` and, with two arms or
  more, ``effects.png``; returns the names written."""
  text = table(results)  # Checks the schema before anything is written.
  with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write(text)
  plot(results, os.path.join(workdir, "curves.png"))
  written = ["table.md", "curves.png"]
  if len(results["arms"]) > 1:
    figures.plot_effects(results, os.path.join(workdir, "effects.png"))
    written.append("effects.png")
  return written


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
    written = write(results, workdir)
  except (OSError, ValueError, UserError) as e:
    # KeyError/TypeError would be bugs here: check vouches for the schema.
    message = e.strerror if isinstance(e, OSError) and e.strerror else e
    sys.exit(f"gnp.report: error: {path}: {message}")
  print(f"gnp.report: wrote {', '.join(written)} in {workdir}")


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
