"""The study report: numbers against numpy/scipy, table, plot and CLI."""

import copy
import json

import numpy as np
import pytest
from scipy import stats

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
  assert _row(text, "baseline")[6:] == ["3", "lr 1.2e-03, wd 3.0e-04",
                                        "reference"]
  _, mean, low, high = _paired_reference("gnvr")
  assert _row(text, "gnvr")[6:] == [
      "3", "lr 3.0e-03, λ 1.0e-02",
      f"{mean * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}] (n=3)"]
  assert _row(text, "l2")[6:8] == ["2 (lacks seed 2)", "—"]
  assert "(n=2)" in _row(text, "l2")[8]
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
  assert _row(text, "gnvr")[8] == f"{(0.823 - 0.801) * 100:+.2f} — (n=1)"


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
