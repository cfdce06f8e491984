"""A sweep's sweep.json in numbers, as a table and as a figure.

`summarize(result)` gives per grid point the final metrics over seeds, the
failed runs and the paired test-accuracy difference to the first point (all
by `gnp.results.summarize`, a point standing for a study's arm); `table`
writes them as table.md. `figure` draws sweep.png: with one swept key, test
accuracy, test loss and final training loss against strength on a log axis
(mean ± std over seeds, each seed's run, and strength 0 as a separate
baseline marker left of the smallest strength); with two keys, heat maps of
test accuracy and test loss. `sweep_curves(result)` gives what `figure`
draws as arrays, so that tests check the numbers, not pixels. `write` saves
all three. `gnp.sweep` makes the result.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from matplotlib.figure import Figure

from gnp import report
from gnp import results as results_lib
from gnp import writers

# The one-key figure's panels: (history key, scale, title, y label); the
# heat maps draw the first two.
_PANELS = (("test/accuracy", 100.0, "Test accuracy", "accuracy (%)"),
           ("test/loss", 1.0, "Test loss", "cross-entropy"),
           ("train/cross_entropy", 1.0, "Final training loss",
            "cross-entropy (epoch mean)"))
_DASH = "—"
# What sweep.json keeps of `gnp.results.summarize`'s paired comparison.
_PAIRED = ("metric", "seeds", "n", "excluded_seeds", "differences", "mean",
           "half_width", "low", "high")

# --- Numbers -----------------------------------------------------------------


def summarize(result: dict) -> list[dict]:
  """Per point, in grid order: ``label``, ``values``, ``num_seeds``,
  ``metrics`` ({history key: {"values", "mean", "std"}} over the seeds that
  did not fail, as `gnp.results.summarize`), ``failed`` ([{"seed", "epoch",
  "reason"}]) and ``paired`` (None for the first point; else the paired
  test-accuracy difference to it, with its 95% t interval)."""
  as_study = {"arms": [{"name": p["label"], "seeds": p["seeds"]}
                       for p in result["points"]],
              "num_classes": result.get("num_classes"),
              "include_failed": False}
  rows = results_lib.summarize(as_study)
  return [{"label": p["label"], "values": p["values"],
           "num_seeds": row["num_seeds"], "metrics": row["metrics"],
           "failed": [{"seed": s, "epoch": f["epoch"], "reason": f["reason"]}
                      for s, f in row["failed"].items()],
           "paired": row["paired"] and {k: row["paired"][k] for k in _PAIRED}}
          for p, row in zip(result["points"], rows)]


def _zero_position(values) -> float:
  """Where strength 0 is drawn on a log axis: a grid step left of the
  smallest positive strength (a decade where there is no step)."""
  positive = sorted(v for v in values if v > 0)
  step = positive[1] / positive[0] if len(positive) > 1 else 10.0
  return positive[0] / step


def sweep_curves(result: dict) -> dict:
  """What `figure` draws, as numbers (tests check these, not pixels).

  One key: ``{"kind": "line", "key", "panels"}``, a panel per metric (test
  accuracy in %, test loss, final training loss) with ``metric``,
  ``title``, ``ylabel``, ``x`` (the positive strengths whose point has a
  run that did not fail), ``mean``, ``low``, ``high`` (mean ∓ sample std;
  a zero band for one seed), ``seeds`` ([(x, value)] per run, failed runs
  left out) and ``zero``: None, or strength 0's ``{"x", "mean", "low",
  "high"}``, ``x`` being where it is drawn (`_zero_position`).
  Two keys: ``{"kind": "heatmap", "keys", "rows", "cols", "panels"}``,
  ``rows`` and ``cols`` the two keys' values, each panel (test accuracy,
  test loss) with ``mean``, ``std`` and ``failed`` arrays [rows, cols]
  (NaN where no run is left; a NaN std where one is).
  """
  rows = summarize(result)
  keys = result["keys"]
  if len(keys) == 2:
    grid = [result["grid"][k] for k in keys]
    panels = []
    for metric, scale, title, _ in _PANELS[:2]:
      mean, std = (np.full((len(grid[0]), len(grid[1])), math.nan)
                   for _ in range(2))
      failed = np.zeros(mean.shape, dtype=int)
      for row in rows:
        ij = tuple(g.index(row["values"][k]) for g, k in zip(grid, keys))
        stat = row["metrics"][metric]
        if stat["mean"] is not None:
          mean[ij] = stat["mean"] * scale
          std[ij] = math.nan if stat["std"] is None else stat["std"] * scale
        failed[ij] = len(row["failed"])
      panels.append({"metric": metric, "title": title, "mean": mean,
                     "std": std, "failed": failed})
    return {"kind": "heatmap", "keys": keys, "rows": list(grid[0]),
            "cols": list(grid[1]), "panels": panels}
  key = keys[0]
  zero_x = (_zero_position(result["grid"][key])
            if 0.0 in result["grid"][key] else None)
  panels = []
  for metric, scale, title, ylabel in _PANELS:
    panel = {"metric": metric, "title": title, "ylabel": ylabel, "x": [],
             "mean": [], "low": [], "high": [], "seeds": [], "zero": None}
    for row in rows:
      stat = row["metrics"][metric]
      if stat["mean"] is None:
        continue
      x = row["values"][key] or zero_x
      mean, std = stat["mean"] * scale, (stat["std"] or 0.0) * scale
      panel["seeds"] += [(x, v * scale) for v in stat["values"]]
      if row["values"][key] == 0:
        panel["zero"] = {"x": x, "mean": mean, "low": mean - std,
                         "high": mean + std}
      else:
        for name, value in (("x", x), ("mean", mean), ("low", mean - std),
                            ("high", mean + std)):
          panel[name].append(value)
    panels.append({k: np.asarray(v) if isinstance(v, list) and k != "seeds"
                   else v for k, v in panel.items()})
  return {"kind": "line", "key": key, "panels": panels}


# --- Figure ------------------------------------------------------------------


def _number(value: float) -> str:
  return "0" if value == 0 else f"{value:.3g}"


def figure(result: dict) -> Figure:
  """The matplotlib Figure of `sweep_curves(result)`."""
  curves = sweep_curves(result)
  if curves["kind"] == "heatmap":
    return _heatmaps(result, curves)
  fig = Figure(figsize=(13, 4.6), dpi=120, layout="constrained")
  key = curves["key"]
  ticks = sorted(set(result["grid"][key]) - {0.0})
  handles = {}
  for ax, panel in zip(fig.subplots(1, 3), curves["panels"]):
    if len(panel["x"]):
      (line,) = ax.plot(panel["x"], panel["mean"], "o-", color="C0")
      ax.fill_between(panel["x"], panel["low"], panel["high"], color="C0",
                      alpha=0.2, linewidth=0)
      handles["mean ± std over seeds"] = line
    if panel["seeds"]:
      xs, ys = zip(*panel["seeds"])
      handles["one seed"] = ax.plot(xs, ys, ".", color="0.4", alpha=0.5)[0]
    zero = panel["zero"]
    if zero is not None:
      handles["strength 0 (baseline)"] = ax.errorbar(
          [zero["x"]], [zero["mean"]],
          yerr=[[zero["mean"] - zero["low"]], [zero["high"] - zero["mean"]]],
          fmt="s", color="k", markersize=7, capsize=3)
      handles["baseline mean"] = ax.axhline(zero["mean"], color="k",
                                            linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.minorticks_off()
    xticks = ([zero["x"]] if zero is not None else []) + ticks
    ax.set_xticks(xticks, [_number(0.0)] * (zero is not None)
                  + [_number(t) for t in ticks], rotation=45)
    ax.set(title=panel["title"], xlabel=key, ylabel=panel["ylabel"])
    ax.grid(alpha=0.3)
  if handles:  # Below the panels, where it covers no data.
    fig.legend(handles.values(), handles.keys(), loc="outside lower center",
               ncols=len(handles), frameon=False)
  fig.suptitle(f"Sweep: {result['sweep']} ({result['method']}), final epoch,"
               f" {len(result['seeds'])} seeds; failed runs left out")
  return fig


def _heatmaps(result: dict, curves: dict) -> Figure:
  rows_key, cols_key = curves["keys"]
  fig = Figure(figsize=(13, 5.2), dpi=120, layout="constrained")
  for ax, panel in zip(fig.subplots(1, 2), curves["panels"]):
    mean = panel["mean"]
    image = ax.imshow(mean, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax)
    finite = mean[np.isfinite(mean)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), value in np.ndenumerate(mean):
      std = panel["std"][i, j]
      text = (_DASH if not math.isfinite(value) else
              f"{value:.{2 if 'accuracy' in panel['metric'] else 3}f}\n"
              + (f"±{std:.2g}" if math.isfinite(std) else "1 seed"))
      if panel["failed"][i, j]:
        text += f"\n{panel['failed'][i, j]} failed"
      ax.text(j, i, text, ha="center", va="center", fontsize=7,
              color="w" if not math.isfinite(value) or value < middle
              else "k")
    ax.set_xticks(range(len(curves["cols"])),
                  [_number(v) for v in curves["cols"]], rotation=45)
    ax.set_yticks(range(len(curves["rows"])),
                  [_number(v) for v in curves["rows"]])
    ax.set(title=f"{panel['title']}, mean ± std", xlabel=cols_key,
           ylabel=rows_key)
  fig.suptitle(f"Sweep: {result['sweep']} ({result['method']}), final epoch,"
               f" {len(result['seeds'])} seeds; failed runs left out")
  return fig


# --- Table -------------------------------------------------------------------


def table(result: dict) -> str:
  """table.md: a row per grid point, the setting above, failures below."""
  rows = summarize(result)
  keys = result["keys"]
  reference = ", ".join(f"{k}={_number(v)}"
                        for k, v in rows[0]["values"].items())
  header = [*keys, "Test acc. (%)", "Test loss", "Train loss",
            "Val. acc. (%)", "Val. loss", "Seeds", "Failed",
            f"Δ test acc. vs {reference} (pp, 95% CI)"]
  seeds = result["seeds"]
  fixed = ", ".join(f"{k} = {v['value']:.3g} ({v['source']})"
                    if isinstance(v["value"], float) else
                    f"{k} = {v['value']} ({v['source']})"
                    for k, v in result["fixed"].items())
  lines = [f"# Sweep: {result['sweep']}", "", f"`{result['command']}`", "",
           f"Method {result['method']}; {len(seeds)} seeds ({seeds[0]}–"
           f"{seeds[-1]}) × {result['num_epochs']} epochs per point. Fixed:"
           f" {fixed or _DASH}.", "",
           "| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    m = row["metrics"]
    cell = report.mean_std_cell
    cells = [*(_number(row["values"][k]) for k in keys),
             cell(m["test/accuracy"], 100, 2), cell(m["test/loss"]),
             cell(m["train/cross_entropy"]),
             cell(m["validation/accuracy"], 100, 2),
             cell(m["validation/loss"]), str(row["num_seeds"]),
             str(len(row["failed"])), report.paired_cell(row["paired"])]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Mean ± sample std over seeds of the last epoch, failed runs"
            " left out; accuracies in percent; train loss is the last"
            " epoch's mean cross-entropy (without the penalty). Δ: paired by"
            " seed against the first row, in percentage points, with a 95% t"
            " interval.", "",
            f"Training time: {result['wall_time_s']['training']:.1f} s"
            " (every run's share of its population's time, compilation"
            " included)."]
  failed = [(row["label"], f) for row in rows for f in row["failed"]]
  if failed:
    lines += ["", f"Failed runs ({len(failed)}, left out of the means and"
              " intervals; the rule is `gnp.results.failures`):", ""]
    lines += [f"- {name}, seed {f['seed']}, epoch {f['epoch']}: {f['reason']}"
              for name, f in failed]
  return "\n".join(lines) + "\n"


# --- The files ---------------------------------------------------------------


def write(result: dict, workdir: str) -> None:
  """Writes ``sweep.json``, ``table.md`` and ``sweep.png`` in ``workdir``."""
  writers.write_atomically(os.path.join(workdir, "sweep.json"),
                           json.dumps(result, indent=1))
  writers.write_atomically(os.path.join(workdir, "table.md"), table(result))
  path = os.path.join(workdir, "sweep.png")
  # No "Software" entry, so the same result gives the same bytes.
  figure(result).savefig(f"{path}.tmp", format="png",
                         metadata={"Software": None})
  os.replace(f"{path}.tmp", path)
