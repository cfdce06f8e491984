"""The study report: numbers against numpy/scipy, table, plot and CLI."""

import copy
import json

import numpy as np
import pytest
from scipy import stats

from gnp import figures
from gnp import report
from gnp.errors import UserError
from tests.helpers import run

EPOCHS = 4
# Last-epoch values per arm and seed, chosen by hand. "l2" lacks seed 2, so
# its paired comparison is on seeds 0 and 1 only.
FINAL = {
    "baseline": {
        "test/accuracy": {0: 0.801, 1: 0.794, 2: 0.812},
        "validation/accuracy": {0: 0.805, 1: 0.799, 2: 0.817},
        "validation/loss": {0: 0.612, 1: 0.634, 2: 0.598},
        "train/cross_entropy": {0: 0.401, 1: 0.415, 2: 0.388},
        "test/loss": {0: 0.621, 1: 0.640, 2: 0.603},
    },
    "gnvr": {
        "test/accuracy": {0: 0.823, 1: 0.809, 2: 0.826},
        "validation/accuracy": {0: 0.828, 1: 0.811, 2: 0.830},
        "validation/loss": {0: 0.571, 1: 0.602, 2: 0.566},
        "train/cross_entropy": {0: 0.452, 1: 0.470, 2: 0.441},
        "test/loss": {0: 0.580, 1: 0.611, 2: 0.575},
    },
    "l2": {
        "test/accuracy": {0: 0.790, 1: 0.799},
        "validation/accuracy": {0: 0.792, 1: 0.803},
        "validation/loss": {0: 0.650, 1: 0.641},
        "train/cross_entropy": {0: 0.420, 1: 0.409},
        "test/loss": {0: 0.655, 1: 0.644},
    },
}


def _history(arm, seed, keys):
  """Curves that end on FINAL's values; earlier epochs are worse."""
  history = {"epoch": list(range(1, EPOCHS + 1))}
  for key in keys:
    final = FINAL[arm][key][seed]
    step = 0.05 if "loss" in key or "entropy" in key else -0.05
    history[key] = [final + step * (EPOCHS - e) for e in range(1, EPOCHS + 1)]
  history["train/accuracy"] = [0.5 + 0.1 * e for e in range(EPOCHS)]
  return history


def _results(validation=True):
  keys = [k for k in report.METRICS if validation or "validation" not in k]
  arms = []
  for name, params, best in [
      ("baseline", {"optimizer.learning_rate": 0.0012,
                    "optimizer.weight_decay": 3e-4}, 0.63),
      ("gnvr", {"optimizer.learning_rate": 0.003, "gnvr.lam": 0.01}, 0.66),
      ("l2", {}, None)]:
    seeds = sorted(FINAL[name]["test/accuracy"])
    arms.append({
        "name": name,
        "description": "plain AdamW" if name == "baseline" else "",
        "best_params": params, "best_value": best,
        "trials": [{"number": i, "params": {}, "value": None if i == 2 else 0.6,
                    "state": "FAIL" if i == 2 else "COMPLETE", "history": {}}
                   for i in range(3 if params else 0)],
        "seeds": [{"seed": s, "history": _history(name, s, keys)}
                  for s in seeds]})
  return {"study": "gnvr",
          "objective": {"metric": "validation/accuracy",
                        "direction": "maximize"},
          "arms": arms,
          "wall_time_s": {"tuning": 123.4, "final": 56.7, "total": 180.1}}


def _paired_reference(name):
  """Mean and 95% t interval of test-accuracy differences, by hand."""
  mine, base = FINAL[name]["test/accuracy"], FINAL["baseline"]["test/accuracy"]
  common = sorted(set(mine) & set(base))
  d = np.array([mine[s] - base[s] for s in common])
  n = len(d)
  half = stats.t.ppf(0.975, n - 1) * np.sqrt(
      np.sum((d - d.mean()) ** 2) / (n - 1)) / np.sqrt(n)
  return common, d.mean(), d.mean() - half, d.mean() + half


def test_summarize_matches_numpy_and_scipy():
  rows = report.summarize(_results())
  assert [r["name"] for r in rows] == ["baseline", "gnvr", "l2"]
  for row in rows:
    for key in report.METRICS:
      values = np.array(list(FINAL[row["name"]][key].values()))
      stat = row["metrics"][key]
      np.testing.assert_allclose(stat["mean"], values.mean(), rtol=1e-12)
      np.testing.assert_allclose(stat["std"], values.std(ddof=1), rtol=1e-12)
  assert rows[0]["paired"] is None
  for row in rows[1:]:
    common, mean, low, high = _paired_reference(row["name"])
    paired = row["paired"]
    assert paired["seeds"] == common and paired["n"] == len(common)
    np.testing.assert_allclose(
        [paired["mean"], paired["low"], paired["high"]], [mean, low, high],
        rtol=1e-10)
    # Independently: scipy's paired t test gives the same interval.
    mine = [FINAL[row["name"]]["test/accuracy"][s] for s in common]
    base = [FINAL["baseline"]["test/accuracy"][s] for s in common]
    ci = stats.ttest_rel(mine, base).confidence_interval(0.95)
    np.testing.assert_allclose([paired["low"], paired["high"]],
                               [ci.low, ci.high], rtol=1e-10)
  assert rows[2]["missing_seeds"] == [2]
  assert rows[2]["paired"]["unpaired_seeds"] == [2]
  assert rows[0]["trials_complete"] == 2 and rows[0]["trials_failed"] == 1


def _row(text, name):
  (line,) = [l for l in text.splitlines() if l.startswith(f"| {name} |")]
  return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_shows_the_numbers_as_specified():
  text = report.table(_results())
  assert text.startswith("# Study: gnvr\n")
  for name in FINAL:
    cells = _row(text, name)
    for column, (key, scale, digits) in enumerate(
        [("test/accuracy", 100, 2), ("validation/accuracy", 100, 2),
         ("validation/loss", 1, 4), ("train/cross_entropy", 1, 4),
         ("test/loss", 1, 4)], start=1):
      values = np.array(list(FINAL[name][key].values())) * scale
      assert cells[column] == (f"{values.mean():.{digits}f} ±"
                               f" {values.std(ddof=1):.{digits}f}")
  assert _row(text, "baseline")[6:] == ["3", "0", "lr 1.2e-03, wd 3.0e-04",
                                        "reference", "—"]
  _, mean, low, high = _paired_reference("gnvr")
  assert low > 0  # So the verdict is "better".
  assert _row(text, "gnvr")[6:] == [
      "3", "0", "lr 3.0e-03, λ 1.0e-02",
      f"{mean * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}] (n=3)",
      "better"]
  assert _row(text, "l2")[6:9] == ["2 (lacks seed 2)", "0", "—"]
  assert "(n=2)" in _row(text, "l2")[9]
  assert ("Objective: validation/accuracy (maximize). Trials completed/failed:"
          " baseline 2/1 (best 0.6300), gnvr 2/1 (best 0.6600), l2 0/0."
          " Wall time: tuning 123.4 s, final 56.7 s, total 180.1 s.") in text


def test_one_seed_has_no_std_and_no_interval():
  results = _results()
  for arm in results["arms"]:
    arm["seeds"] = arm["seeds"][:1]
  text = report.table(results)
  assert _row(text, "baseline")[1] == f"{80.1:.2f} ± —"
  gnvr = report.summarize(results)[1]
  assert gnvr["paired"]["n"] == 1 and gnvr["paired"]["low"] is None
  assert _row(text, "gnvr")[9] == f"{(0.823 - 0.801) * 100:+.2f} — (n=1)"


def test_missing_validation_split_shows_dashes(tmp_path):
  results = _results(validation=False)
  rows = report.summarize(results)
  assert rows[0]["metrics"]["validation/accuracy"]["mean"] is None
  assert _row(report.table(results), "gnvr")[2:4] == ["—", "—"]
  report.write(results, str(tmp_path))  # Plots test accuracy instead.
  assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_format_params_keeps_ambiguous_keys_whole():
  assert report.format_params({"a.rho": 0.05, "b.rho": 0.1, "c.alpha": 0.8}) \
      == "a.rho 5.0e-02, b.rho 1.0e-01, α 8.0e-01"
  assert report.format_params({}) == "—"


def test_plot_is_a_deterministic_png(tmp_path):
  report.plot(_results(), tmp_path / "a.png")
  report.plot(_results(), tmp_path / "b.png")
  data = (tmp_path / "a.png").read_bytes()
  assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
  assert data == (tmp_path / "b.png").read_bytes()


def _shuffled_results():
  """Seeds listed out of order; "other" lacks seed 2, a middle seed."""
  finals = {"reference": {3: 0.71, 0: 0.80, 2: 0.77, 1: 0.74},
            "other": {1: 0.79, 3: 0.73, 0: 0.83}}
  return finals, {"arms": [
      {"name": name, "seeds": [
          {"seed": seed, "history": {"test/accuracy": [acc - 0.1, acc]}}
          for seed, acc in accs.items()]}
      for name, accs in finals.items()]}


def test_paired_difference_pairs_by_seed_not_by_position():
  finals, results = _shuffled_results()
  rows = report.summarize(results)
  common = [0, 1, 3]
  mine = [finals["other"][s] for s in common]
  base = [finals["reference"][s] for s in common]
  ci = stats.ttest_rel(mine, base).confidence_interval(0.95)
  paired = rows[1]["paired"]
  assert (paired["seeds"], paired["n"], paired["unpaired_seeds"]) == (
      common, 3, [2])
  np.testing.assert_allclose(
      [paired["mean"], paired["low"], paired["high"]],
      [np.mean(np.subtract(mine, base)), ci.low, ci.high], rtol=1e-10)
  # Listing order changes nothing a reader sees.
  assert [r["seeds"] for r in rows] == [[0, 1, 2, 3], [0, 1, 3]]
  assert rows[1]["missing_seeds"] == [2]
  for arm in results["arms"]:
    arm["seeds"].sort(key=lambda s: s["seed"])
  assert report.summarize(results) == rows
  for row in rows:
    values = np.array(list(finals[row["name"]].values()))
    stat = row["metrics"]["test/accuracy"]
    np.testing.assert_allclose([stat["mean"], stat["std"]],
                               [values.mean(), values.std(ddof=1)],
                               rtol=1e-12)
  cells = _row(report.table(results), "other")
  assert cells[6] == "3 (lacks seed 2)"
  diff = np.mean(np.subtract(mine, base)) * 100
  assert cells[9] == (f"{diff:+.2f} [{ci.low * 100:+.2f},"
                      f" {ci.high * 100:+.2f}] (n=3)")


def _ragged_results(validation=True):
  """Seeds that stop at different epochs, a None value, a one-seed arm."""
  rng = np.random.default_rng(0)
  def seed(number, epochs):
    history = {"epoch": list(range(1, epochs + 1))}
    for key in ("train/cross_entropy", "validation/accuracy",
                "test/accuracy"):
      history[key] = rng.uniform(0.2, 0.9, epochs).tolist()
    return {"seed": number, "history": history}
  ragged = [seed(0, 5), seed(1, 4), seed(2, 6)]
  ragged[2]["history"]["validation/accuracy"][1] = None  # Epoch 2 diverged.
  if not validation:
    del ragged[1]["history"]["validation/accuracy"]
  return {"study": "ragged", "arms": [
      {"name": "ragged", "seeds": ragged},
      {"name": "single", "seeds": [seed(7, 3)]}]}


def _expected_curve(arm, key, scale):
  """Mean and mean ± sample std over seeds, written out with numpy."""
  histories = [s["history"][key] for s in arm["seeds"]]
  length = min(map(len, histories))
  x = np.array([h[:length] for h in histories], dtype=np.float64)  # None→nan
  mean = x.sum(axis=0) / len(x)
  std = (np.sqrt(((x - mean) ** 2).sum(axis=0) / (len(x) - 1)) if len(x) > 1
         else np.zeros(length))
  return (np.arange(1, length + 1), mean * scale, (mean - std) * scale,
          (mean + std) * scale)


@pytest.mark.parametrize("validation", [True, False])
def test_curves_are_mean_and_std_band_over_seeds(validation):
  results = _ragged_results(validation)
  panels = report.curves(results)
  accuracy = "validation/accuracy" if validation else "test/accuracy"
  assert [(p["key"], p["title"], p["ylabel"]) for p in panels] == [
      ("train/cross_entropy", "Training loss", "cross-entropy"),
      (accuracy, "Validation accuracy" if validation else
       "Test accuracy (no validation split)", "accuracy (%)")]
  for panel, scale in zip(panels, [1, 100]):
    assert [a["name"] for a in panel["arms"]] == ["ragged", "single"]
    for arm, drawn in zip(results["arms"], panel["arms"]):
      expected = _expected_curve(arm, panel["key"], scale)
      for name, want in zip(["epochs", "mean", "low", "high"], expected):
        np.testing.assert_allclose(drawn[name], want, rtol=1e-12,
                                   err_msg=f"{panel['key']} {name}")
  ragged, single = panels[1]["arms"]
  assert len(ragged["mean"]) == 4  # Cut to seed 1's four epochs.
  assert np.isnan(ragged["mean"][1]) == validation  # The None, as a gap.
  np.testing.assert_array_equal(single["low"], single["high"])


@pytest.mark.parametrize("make", [_results, _ragged_results])
def test_figure_draws_exactly_the_curves(make):
  results = make()
  panels = report.curves(results)
  fig = report.figure(results)
  assert [t.get_text() for t in fig.legends[0].get_texts()] == [
      a["name"] for a in panels[0]["arms"]]
  for ax, panel in zip(fig.axes, panels):
    assert (ax.get_title(), ax.get_ylabel()) == (panel["title"],
                                                 panel["ylabel"])
    assert len(ax.lines) == len(ax.collections) == len(panel["arms"])
    for line, band, arm in zip(ax.lines, ax.collections, panel["arms"]):
      np.testing.assert_array_equal(line.get_xdata(), arm["epochs"])
      np.testing.assert_array_equal(line.get_ydata(), arm["mean"])
      vertices = np.concatenate([p.vertices for p in band.get_paths()])
      assert set(vertices[:, 0]) <= set(arm["epochs"])
      for epoch, low, high in zip(arm["epochs"], arm["low"], arm["high"]):
        ys = vertices[vertices[:, 0] == epoch, 1]
        if np.isnan(low):  # fill_between leaves a gap at NaN.
          assert not ys.size
        else:
          np.testing.assert_allclose([ys.min(), ys.max()], [low, high],
                                     rtol=1e-12)


def test_bad_schema_is_a_user_error_before_writing(tmp_path):
  results = _results()
  results["arms"][1]["seeds"].append(copy.deepcopy(
      results["arms"][1]["seeds"][0]))
  with pytest.raises(UserError, match="repeats a seed"):
    report.write(results, str(tmp_path))
  assert not list(tmp_path.iterdir())


def test_cli_writes_table_and_curves(tmp_path):
  (tmp_path / "results.json").write_text(json.dumps(_results()))
  result = run(["-m", "gnp.report", f"--workdir={tmp_path}"], timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "table.md").read_text() == report.table(_results())
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
  assert (tmp_path / "effects.png").read_bytes().startswith(b"\x89PNG")
  assert result.stdout.strip() == (
      f"gnp.report: wrote table.md, curves.png, effects.png in {tmp_path}")


@pytest.mark.parametrize("content, message", [
    (None, "No such file or directory"), ("{", "Expecting property name")])
def test_cli_fails_with_one_line(tmp_path, content, message):
  if content is not None:
    (tmp_path / "results.json").write_text(content)
  result = run(["-m", "gnp.report", f"--workdir={tmp_path}"], timeout=120)
  assert result.returncode == 1
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"gnp.report: error: {tmp_path / 'results.json'}: ")
  assert message in line


# Final validation and test accuracy of two arms over seeds 0-4. In "gnvr",
# seed 2 diverged at epoch 3 (its later epochs hold the frozen state, whose
# accuracy looks plausible) and seed 4 collapsed to chance (10 classes).
_FAILED_ACCURACY = {
    "baseline": {0: 0.61, 1: 0.58, 2: 0.63, 3: 0.60, 4: 0.59},
    "gnvr": {0: 0.64, 1: 0.62, 2: 0.55, 3: 0.66, 4: 0.10},
}


def _results_with_failures():
  arms = []
  for name, finals in _FAILED_ACCURACY.items():
    seeds = []
    for seed, accuracy in finals.items():
      history = {"epoch": [1, 2, 3, 4]}
      for key in report.METRICS:
        final = accuracy if "accuracy" in key else 1 - accuracy
        history[key] = [final * e / 4 for e in range(1, 5)]
      entry = {"seed": seed, "history": history}
      if name == "gnvr" and seed == 2:
        entry["diverged"] = "NaN or Inf in the loss or update at step 55"
        entry["diverged_epoch"] = 3
      seeds.append(entry)
    arms.append({"name": name, "seeds": seeds})
  return {"study": "failures", "num_classes": 10, "arms": arms}


def test_failed_runs_are_named_and_left_out_of_every_mean():
  results = _results_with_failures()
  failed = report.failures(results)
  assert failed["baseline"] == {}
  assert sorted(failed["gnvr"]) == [2, 4]
  assert failed["gnvr"][2]["epoch"] == 3
  assert failed["gnvr"][2]["reason"].startswith("diverged: NaN or Inf")
  assert failed["gnvr"][4]["epoch"] == 4
  assert failed["gnvr"][4]["reason"].startswith(
      "collapsed: validation/accuracy 10.0% against the arm's median 63.0%")
  rows = report.summarize(results)
  kept = [0, 1, 3]
  gnvr = np.array([_FAILED_ACCURACY["gnvr"][s] for s in kept])
  base = np.array([_FAILED_ACCURACY["baseline"][s] for s in kept])
  stat = rows[1]["metrics"]["test/accuracy"]
  np.testing.assert_allclose([stat["mean"], stat["std"]],
                             [gnvr.mean(), gnvr.std(ddof=1)], rtol=1e-12)
  base_stat = rows[0]["metrics"]["test/accuracy"]  # Nothing failed there.
  np.testing.assert_allclose(
      base_stat["mean"], np.mean(list(_FAILED_ACCURACY["baseline"].values())),
      rtol=1e-12)
  paired = rows[1]["paired"]
  assert paired["seeds"] == kept and paired["excluded_seeds"] == [2, 4]
  ci = stats.ttest_rel(gnvr, base).confidence_interval(0.95)
  np.testing.assert_allclose(
      [paired["mean"], paired["low"], paired["high"]],
      [np.mean(gnvr - base), ci.low, ci.high], rtol=1e-10)
  text = report.table(results)
  assert _row(text, "gnvr")[6:8] == ["5", "2"]
  assert _row(text, "baseline")[6:8] == ["5", "0"]
  assert "(n=3)" in _row(text, "gnvr")[9]
  assert ("Failed runs (2, left out of the means and intervals; the rule is"
          " in `gnp.report.failures`):") in text
  assert ("- gnvr, seed 2, epoch 3: diverged: NaN or Inf in the loss or"
          " update at step 55") in text
  assert "- gnvr, seed 4, epoch 4: collapsed: validation/accuracy 10.0%" in text
  # The plotted curve leaves them out too.
  accuracy_panel = report.curves(results)[1]
  final = accuracy_panel["arms"][1]["mean"][-1]
  np.testing.assert_allclose(final, gnvr.mean() * 100, rtol=1e-12)


def test_include_failed_puts_them_back():
  results = _results_with_failures()
  everything = np.array(list(_FAILED_ACCURACY["gnvr"].values()))
  for row in (report.summarize(results, include_failed=True)[1],
              report.summarize({**results, "include_failed": True})[1]):
    np.testing.assert_allclose(row["metrics"]["test/accuracy"]["mean"],
                               everything.mean(), rtol=1e-12)
    assert row["paired"]["n"] == 5 and row["paired"]["excluded_seeds"] == []
    assert sorted(row["failed"]) == [2, 4]  # Still listed.
  text = report.table(results, include_failed=True)
  assert "Failed runs (2, included in the means and intervals" in text
  curve = report.curves({**results, "include_failed": True})[1]["arms"][1]
  np.testing.assert_allclose(curve["mean"][-1], everything.mean() * 100,
                             rtol=1e-12)


@pytest.mark.parametrize("accuracies, classes, collapsed", [
    # Two seeds, one collapsed: the median is their midpoint, and only the
    # seed below it by more than half the gain over chance counts.
    ([0.52, 0.10], 10, [1]),
    # Ordinary spread: nothing.
    ([0.60, 0.55, 0.62, 0.58], 10, []),
    # An arm that never learns is a result, not a failure.
    ([0.10, 0.09, 0.11], 10, []),
    # Half the gain lost but within the margin of the median: kept.
    ([0.13, 0.16, 0.16], 10, []),
    # Without num_classes, chance is 0: half the median.
    ([0.60, 0.62, 0.25], None, [2]),
])
def test_the_collapse_rule(accuracies, classes, collapsed):
  results = {"arms": [{"name": "a", "seeds": [
      {"seed": i, "history": {"validation/accuracy": [a]}}
      for i, a in enumerate(accuracies)]}]}
  if classes:
    results["num_classes"] = classes
  assert sorted(report.failures(results)["a"]) == collapsed


def test_a_non_finite_final_metric_is_a_failed_run():
  results = _results_with_failures()
  results["arms"][0]["seeds"][1]["history"]["test/loss"][-1] = None
  failed = report.failures(results)["baseline"]
  assert failed == {1: {"epoch": 4, "reason": "non-finite final test/loss",
                        "replicate": 0}}


def test_report_cli_include_failed(tmp_path):
  (tmp_path / "results.json").write_text(json.dumps(_results_with_failures()))
  proc = run(["-m", "gnp.report", f"--workdir={tmp_path}", "--include_failed"],
             timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "included in the means" in (tmp_path / "table.md").read_text()


def test_a_study_tuned_on_validation_loss_plots_validation_loss():
  results = _results()
  results["objective"] = {"metric": "validation/loss", "direction": "minimize"}
  panel = report.curves(results)[1]
  assert (panel["key"], panel["title"]) == (
      "validation/loss", "Validation loss (the tuning objective)")
  for arm, drawn in zip(results["arms"], panel["arms"]):
    expected = _expected_curve(arm, "validation/loss", 1)
    np.testing.assert_allclose(drawn["mean"], expected[1], rtol=1e-12)


@pytest.mark.parametrize("make, kept", [
    (_results, {"gnvr": [0, 1, 2], "l2": [0, 1]}),
    (_results_with_failures, {"gnvr": [0, 1, 3]})])
def test_effects_are_the_paired_differences_by_seed(make, kept):
  results = make()
  base = {s["seed"]: s["history"]["test/accuracy"][-1]
          for s in results["arms"][0]["seeds"]}
  rows = report.summarize(results)
  drawn = figures.effects(results)
  assert [e["name"] for e in drawn] == [r["name"] for r in rows[1:]]
  for effect, row, arm in zip(drawn, rows[1:], results["arms"][1:]):
    mine = {s["seed"]: s["history"]["test/accuracy"][-1] for s in arm["seeds"]}
    seeds = kept[effect["name"]]
    assert effect["seeds"] == seeds
    np.testing.assert_allclose(
        effect["differences"], [100 * (mine[s] - base[s]) for s in seeds],
        rtol=1e-12)
    np.testing.assert_allclose(
        [effect["mean"], effect["low"], effect["high"]],
        [100 * row["paired"][k] for k in ("mean", "low", "high")], rtol=1e-12)
  # The forest plot draws exactly those: dots, the interval, the mean.
  ax = figures.effects_figure(results).axes[0]
  assert [t.get_text() for t in ax.get_yticklabels()] == [
      e["name"] for e in drawn]
  zero, *lines = ax.lines
  np.testing.assert_array_equal(zero.get_xdata(), [0, 0])
  for y, effect in enumerate(drawn):
    mine = [l for l in lines if set(np.atleast_1d(l.get_ydata())) == {y}]
    dots, bar, mean = mine
    np.testing.assert_array_equal(dots.get_xdata(), effect["differences"])
    np.testing.assert_allclose(bar.get_xdata(), [effect["low"],
                                                 effect["high"]])
    np.testing.assert_allclose(mean.get_xdata(), [effect["mean"]])


def _replicated_results():
  """Three arms × 3 replicates × 3 seeds; gnvr's seed 2003 collapses."""
  rng = np.random.default_rng(0)
  centre = {"baseline": 0.60, "gnvr": 0.63, "ngs": 0.55}
  arms = []
  for name, centre_accuracy in centre.items():
    seeds, replicates = [], []
    for r in range(3):
      shift = rng.normal(0, 0.01)  # This replicate's tuning draw.
      lr = float(10 ** rng.uniform(-3, -2))
      replicates.append({"replicate": r, "best_value": 0.6 + 0.01 * r,
                         "best_params": {"optimizer.learning_rate": lr},
                         "seeds": [1000 * r + i for i in (1, 2, 3)]})
      for i in (1, 2, 3):
        accuracy = centre_accuracy + shift + rng.normal(0, 0.005)
        if name == "gnvr" and (r, i) == (2, 3):
          accuracy = 0.1
        history = {"epoch": [1, 2]}
        for key in report.METRICS:
          final = accuracy if "accuracy" in key else 1 - accuracy
          history[key] = [final - 0.01, final]
        seeds.append({"seed": 1000 * r + i, "replicate": r,
                      "history": history})
    arms.append({"name": name, "seeds": seeds, "replicates": replicates,
                 "best_params": replicates[0]["best_params"],
                 "best_value": replicates[0]["best_value"]})
  return {"study": "replicated", "num_classes": 10, "replicates": 3,
          "arms": arms}


def test_replicated_cells_recomputed_from_results_json():
  results = json.loads(json.dumps(_replicated_results()))  # As read back.
  text = report.table(results)
  last = {arm["name"]: {s["seed"]: s["history"]["test/accuracy"][-1]
                        for s in arm["seeds"]} for arm in results["arms"]}
  failed = {("gnvr", 2003)}
  expected_verdicts = {"gnvr": "better", "ngs": "worse"}
  for name in ("gnvr", "ngs"):
    cells = _row(text, name)
    kept = [s for s in sorted(last[name]) if (name, s) not in failed]
    values = np.array([last[name][s] for s in kept]) * 100
    assert cells[1] == f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
    means = [np.mean([last[name][s] - last["baseline"][s]
                      for s in kept if s // 1000 == r]) for r in range(3)]
    ci = stats.ttest_1samp(means, 0.0).confidence_interval(0.95)
    assert cells[9] == (f"{np.mean(means) * 100:+.2f} [{ci.low * 100:+.2f},"
                        f" {ci.high * 100:+.2f}] (R=3, n={len(kept)})")
    assert cells[10] == expected_verdicts[name]
    rates = [r["best_params"]["optimizer.learning_rate"]
             for r in next(a for a in results["arms"]
                           if a["name"] == name)["replicates"]]
    assert cells[8] == (f"lr {min(rates):.1e}–{max(rates):.1e}"
                        " (3 replicates)")
    for r, mean in enumerate(means):
      value = 0.6 + 0.01 * r
      assert f"- {name}, replicate {r}: lr {rates[r]:.1e} ({value:.4f}); " in (
          text)
      assert f", Δ {mean * 100:+.2f} pp" in text
  assert _row(text, "ngs")[6:8] == ["9", "0"]
  assert _row(text, "gnvr")[6:8] == ["9", "1"]
  # Collapsed against its own replicate's median, and listed with it.
  assert "- gnvr, replicate 2, seed 2003, epoch 2: collapsed" in text
  assert "interval over those replicate means" in text


def test_the_collapse_rule_is_per_replicate():
  # Replicate 1's setting is worse throughout; against the pooled median
  # its seeds would look collapsed, against their own they do not.
  results = {"num_classes": 10, "arms": [{"name": "a", "seeds": [
      {"seed": 1000 * r + i, "replicate": r,
       "history": {"validation/accuracy": [a]}}
      for r, accuracies in enumerate([[0.8, 0.81, 0.79], [0.3, 0.31, 0.29]])
      for i, a in enumerate(accuracies, 1)]}]}
  assert report.failures(results)["a"] == {}
  results["arms"][0]["seeds"][4]["history"]["validation/accuracy"] = [0.1]
  assert list(report.failures(results)["a"]) == [1002]


def test_effects_with_replicates_are_the_replicate_means():
  results = _replicated_results()
  rows = {row["name"]: row for row in report.summarize(results)}
  effects = {e["name"]: e for e in figures.effects(results)}
  for name in ("gnvr", "ngs"):
    assert effects[name]["estimator"] == "replicates"
    np.testing.assert_allclose(
        effects[name]["replicate_means"],
        100 * np.array(rows[name]["paired"]["replicate_means"]), rtol=1e-12)
    np.testing.assert_allclose(effects[name]["mean"],
                               np.mean(effects[name]["replicate_means"]),
                               rtol=1e-12)
  figures.effects_figure(results)  # Draws.
