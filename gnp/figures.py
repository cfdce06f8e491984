"""What a study's results look like: learning curves and the effects plot.

`curves(results)` gives the arrays `figure` draws (mean and ± std band per
arm and epoch), `effects(results)` those `effects_figure` draws (each arm's
paired difference to the first arm, its interval and the per-seed
differences), so that tests check the numbers rather than pixels; `plot`
and `plot_effects` write them as PNGs.
"""

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gnp import results as results_lib


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
  results_lib.check(results)
  arms = results["arms"]
  accuracy = results_lib.accuracy_key(results)
  has_validation = accuracy == "validation/accuracy"
  skipped = ({} if results.get("include_failed") else
             {name: set(f)
              for name, f in results_lib.failures(results).items()})
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


def effects(results, include_failed=None):
  """What `effects_figure` draws: each arm's difference to the first arm.

  One dict per arm after the first, in arm order, with ``name``, ``mean``,
  ``low`` and ``high`` (the paired mean difference in test accuracy and its
  95% t interval, as `gnp.results.summarize` gives them, None where they
  are undefined) and ``seeds`` and ``differences``: the per-seed
  differences on the paired seeds (failed runs left out unless
  ``include_failed``); ``replicates`` and ``replicate_means``, each
  replicate's mean difference; and ``estimator``, what the interval is over
  ("seeds" or "replicates"). In percentage points.
  """
  pp = lambda v: None if v is None else 100 * v
  out = []
  for row in results_lib.summarize(results, include_failed)[1:]:
    paired = row["paired"]
    out.append({"name": row["name"], "seeds": list(paired["seeds"]),
                "differences": 100 * np.asarray(paired["differences"]),
                "replicates": list(paired["replicates"]),
                "replicate_means": 100 * np.asarray(
                    paired["replicate_means"]),
                "estimator": paired["estimator"],
                "mean": pp(paired["mean"]), "low": pp(paired["low"]),
                "high": pp(paired["high"])})
  return out


def effects_figure(results, include_failed=None):
  """A forest plot of `effects(results)`: per arm, the mean difference to
  the first arm with its 95% interval, and each seed's difference as a dot
  (with replicates: each replicate's mean as a ring, the seeds fainter); a
  line at zero."""
  rows = effects(results, include_failed)
  reference = str(results["arms"][0]["name"])
  replicated = any(row["estimator"] == "replicates" for row in rows)
  fig = Figure(figsize=(7, 1.2 + 0.6 * max(len(rows), 1)), dpi=120,
               layout="constrained")
  ax = fig.subplots()
  ax.axvline(0.0, color="0.5", linewidth=1)
  for y, row in enumerate(rows):
    ax.plot(row["differences"], np.full(len(row["differences"]), y), "o",
            color="C0", alpha=0.2 if replicated else 0.4, markersize=4)
    if replicated:
      ax.plot(row["replicate_means"], np.full(len(row["replicate_means"]), y),
              "o", color="C1", markerfacecolor="none", markersize=9)
    if row["low"] is not None:
      ax.plot([row["low"], row["high"]], [y, y], color="C0", linewidth=2)
    if row["mean"] is not None:
      ax.plot([row["mean"]], [y], "D", color="C0", markersize=7)
  ax.set_yticks(range(len(rows)), [row["name"] for row in rows])
  ax.set_ylim(len(rows) - 0.5, -0.5)  # The first arm on top, as in the table.
  title = "Mean difference (◆), 95% t interval (bar), seeds (●)"
  if replicated:
    title = ("Mean over replicates (◆), 95% t interval over replicates (bar),"
             "\nreplicates' means (○), seeds (●)")
  ax.set(xlabel=f"Δ test accuracy vs {reference} (pp)", title=title)
  ax.grid(axis="x", alpha=0.3)
  return fig


def plot_effects(results, path):
  """Writes `effects_figure(results)` to `path` as a PNG."""
  effects_figure(results).savefig(path, format="png",
                                  metadata={"Software": None})
