"""gnp.sweep, gnp.sweep_config and gnp.sweep_report: one population equals
single runs, the table's numbers, failed runs, resuming, bad input,
from_study, the plot's numbers, configs, and the modules' imports."""

import json
import math
import os
import re

import numpy as np
import pytest
from scipy import stats

from gnp import checkpoints
from gnp import population
from gnp import study_config
from gnp import sweep
from gnp import sweep_config
from gnp import sweep_report
from gnp.errors import ConfigError
from gnp.errors import UserError
from tests.helpers import ROOT
from tests.helpers import run
from tests.helpers import tiny_mnist1d

_Population = population.Population  # The class, before the fixture below.
KEYS = ("train/cross_entropy", "train/loss", "validation/accuracy",
        "validation/loss", "test/accuracy", "test/loss")
CONFIGS = ("gnvr", "hessian", "hessian_noise", "sam", "gnp", "gvr")


def tiny_sweep(**overrides):
  """GNVR λ ∈ {0, 0.01, 0.1} × seeds 1, 2 × 2 epochs on tiny mnist1d, in
  populations of 2."""
  config = sweep_config.default_sweep()
  config.name = "tiny"
  config.train = tiny_mnist1d(**{"method": "gnvr", "model.hidden": (16,),
                                 "optimizer.learning_rate": 1e-2})
  config.grid = sweep_config.nest({"gnvr.lam": (0.0, 0.01, 0.1)})
  config.num_seeds = 2
  config.num_epochs = 2
  config.members_at_once = 2
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module", autouse=True)
def shared_populations():
  """Sweeps of one structure share one `Population` here: each sweep would
  build its own, and compiling it is most of a tiny sweep's time. The runs
  are the same either way (a Population is made to train many batches)."""
  cache = {}

  def cached(config, dataset=None):
    key = json.dumps(population.structure(config), sort_keys=True,
                     default=str)
    if key not in cache:
      cache[key] = _Population(config, dataset)
    return cache[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(population, "Population", cached)
    yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  return workdir, sweep.run(tiny_sweep(), workdir)


def _row(table, first_cell):
  (line,) = [l for l in table.splitlines()
             if l.startswith(f"| {first_cell} |")]
  return [c.strip() for c in line.strip("|").split("|")]


def _finals(point, key):
  return np.array([s["history"][key][-1] for s in point["seeds"]])


def test_each_member_equals_its_run_alone(finished):
  _, result = finished
  by_run = {(p["label"], s["seed"]): s["history"]
            for p in result["points"] for s in p["seeds"]}
  members = [m for m in sweep_config.plan(tiny_sweep())["members"]
             if m.values["gnvr.lam"] in (0.0, 0.1)]
  alone = _Population(members[0].config)
  for member in members:
    (history,), _ = alone.train([member.config])
    for key in (*KEYS, "train/penalty"):
      np.testing.assert_allclose(by_run[(member.point, member.seed)][key],
                                 history[key], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{member.point} {key}")
  # λ = 0 is the plain run: the penalty's term in the gradient is 0 · (a
  # finite gradient), exactly 0, and the task gradient is computed the same
  # way, so the runs agree bitwise (on CPU here; SAM's ρ = 0 and Hessian's
  # λ = 0 do too). train/penalty differs: GNVR logs the unweighted variance.
  zero = [m for m in members if m.values["gnvr.lam"] == 0.0]
  plain = [m.config for m in zero]
  for config in plain:
    config.method = "plain"
  histories, _ = _Population(plain[0]).train(plain)
  for member, history in zip(zero, histories):
    for key in KEYS:
      np.testing.assert_array_equal(by_run[(member.point, member.seed)][key],
                                    history[key], err_msg=f"plain vs λ=0 {key}")


def test_table_numbers_equal_those_recomputed_from_sweep_json(finished):
  workdir, result = finished
  stored = json.load(open(os.path.join(workdir, "sweep.json")))
  assert stored == json.loads(json.dumps(result))
  table = open(os.path.join(workdir, "table.md")).read()
  assert table.startswith("# Sweep: tiny\n")
  reference = stored["points"][0]
  for point, cell in zip(stored["points"], ("0", "0.01", "0.1")):
    row = _row(table, cell)
    for column, key, scale, digits in ((1, "test/accuracy", 100, 2),
                                       (2, "test/loss", 1, 4),
                                       (3, "train/cross_entropy", 1, 4),
                                       (4, "validation/accuracy", 100, 2),
                                       (5, "validation/loss", 1, 4)):
      values = _finals(point, key) * scale
      assert row[column] == (f"{values.mean():.{digits}f} ±"
                             f" {values.std(ddof=1):.{digits}f}"), key
    assert row[6:8] == ["2", "0"]
    if point is reference:
      assert row[8] == "reference"
      continue
    diff = 100 * (_finals(point, "test/accuracy")
                  - _finals(reference, "test/accuracy"))
    half = stats.t.ppf(0.975, 1) * diff.std(ddof=1) / math.sqrt(2)
    assert row[8] == (f"{diff.mean():+.2f} [{diff.mean() - half:+.2f},"
                      f" {diff.mean() + half:+.2f}] (n=2)")
  assert "Δ test acc. vs gnvr.lam=0" in table
  assert "Training time:" in table and "Failed runs" not in table
  png = open(os.path.join(workdir, "sweep.png"), "rb").read()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_plot_numbers_are_the_tables(finished):
  _, result = finished
  curves = sweep_report.sweep_curves(result)
  assert curves["kind"] == "line" and curves["key"] == "gnvr.lam"
  metrics = [p["metric"] for p in curves["panels"]]
  assert metrics == ["test/accuracy", "test/loss", "train/cross_entropy"]
  for panel in curves["panels"]:
    scale = 100 if panel["metric"] == "test/accuracy" else 1
    stats_ = [(_finals(p, panel["metric"]) * scale) for p in result["points"]]
    means = [v.mean() for v in stats_]
    stds = [v.std(ddof=1) for v in stats_]
    # 0 is drawn a grid step (0.1 / 0.01) left of the smallest strength.
    assert panel["zero"]["x"] == pytest.approx(0.001)
    np.testing.assert_allclose(
        [panel["zero"]["mean"], panel["zero"]["low"], panel["zero"]["high"]],
        [means[0], means[0] - stds[0], means[0] + stds[0]])
    np.testing.assert_array_equal(panel["x"], [0.01, 0.1])
    np.testing.assert_allclose(panel["mean"], means[1:])
    np.testing.assert_allclose(panel["high"] - panel["low"],
                               2 * np.array(stds[1:]))
    assert len(panel["seeds"]) == 6


def _fake(grid, accuracy, diverged=()):
  """A sweep result over ``grid`` ({key: values}) whose run at (point, seed)
  has the final test accuracy ``accuracy(values, seed)``."""
  points = []
  for values in [dict(zip(grid, v)) for v in np.array(
      np.meshgrid(*grid.values(), indexing="ij")).reshape(len(grid), -1).T]:
    values = {k: float(v) for k, v in values.items()}
    seeds = []
    for seed in (1, 2, 3):
      acc = accuracy(values, seed)
      history = {"epoch": [1], "test/accuracy": [acc],
                 "test/loss": [2 - acc], "train/cross_entropy": [1 - acc]}
      entry = {"seed": seed, "history": history}
      if (sweep_config.label(values), seed) in diverged:
        entry.update(diverged="NaN or Inf in the loss", diverged_epoch=1)
      seeds.append(entry)
    points.append({"label": sweep_config.label(values), "values": values,
                   "seeds": seeds})
  return {"sweep": "fake", "method": "gnp", "keys": list(grid),
          "grid": {k: list(v) for k, v in grid.items()}, "seeds": [1, 2, 3],
          "num_epochs": 1, "num_classes": 10, "fixed": {}, "points": points,
          "command": "test", "wall_time_s": {"training": 1.0}}


def test_a_failed_run_is_left_out_of_its_points_numbers():
  grid = {"gnvr.lam": [0.0, 0.1, 1.0]}
  accuracy = lambda values, seed: 0.5 + 0.01 * seed + values["gnvr.lam"] / 10
  result = _fake(grid, accuracy, diverged={("gnvr.lam=0.1", 2)})
  rows = sweep_report.summarize(result)
  assert rows[1]["failed"] == [{"seed": 2, "epoch": 1, "reason":
                                "diverged: NaN or Inf in the loss"}]
  assert rows[1]["metrics"]["test/accuracy"]["values"] == pytest.approx(
      [0.52, 0.54])
  assert rows[1]["paired"]["seeds"] == [1, 3]  # Seed 2 is in neither.
  assert rows[1]["paired"]["mean"] == pytest.approx(0.01)
  curves = sweep_report.sweep_curves(result)
  assert curves["panels"][0]["mean"][0] == pytest.approx(53.0)
  assert curves["panels"][0]["zero"]["x"] == pytest.approx(0.01)
  table = sweep_report.table(result)
  assert _row(table, "0.1")[1] == "53.00 ± 1.41"
  assert _row(table, "0.1")[6:8] == ["3", "1"]
  assert ("- gnvr.lam=0.1, seed 2, epoch 1: diverged: NaN or Inf in the"
          " loss") in table


def test_a_two_key_grid_is_a_heat_map(tmp_path):
  grid = {"gnp.alpha": [0.0, 0.5], "gnp.r": [0.01, 0.1, 1.0]}
  accuracy = lambda v, seed: 0.5 + v["gnp.alpha"] * v["gnp.r"] + seed / 100
  result = _fake(grid, accuracy, diverged={("gnp.alpha=0.5,gnp.r=1.0", s)
                                           for s in (1, 2, 3)})
  curves = sweep_report.sweep_curves(result)
  assert curves["kind"] == "heatmap" and curves["keys"] == ["gnp.alpha",
                                                            "gnp.r"]
  accuracy_panel = curves["panels"][0]
  expected = [[52.0, 52.0, 52.0], [52.5, 57.0, math.nan]]
  np.testing.assert_allclose(accuracy_panel["mean"], expected)
  np.testing.assert_array_equal(accuracy_panel["failed"], [[0, 0, 0],
                                                           [0, 0, 3]])
  sweep_report.write(result, str(tmp_path))
  assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
  assert _row((tmp_path / "table.md").read_text(), "0.5 | 0.1")[9] == (
      "+5.00 [+5.00, +5.00] (n=3)")


def test_a_diverging_point_is_failed_and_listed(tmp_path):
  # Same structure as the other tiny sweeps (GNVR; the learning rate is
  # traced too): no new compilation.
  config = tiny_sweep(**{"grid": sweep_config.nest(
      {"optimizer.learning_rate": (1e-2, 1e30)})})
  config.fixed.gnvr.lam = 0.01
  result = sweep.run(config, str(tmp_path))
  bad = result["points"][1]
  assert all(s["diverged"].startswith("NaN or Inf") for s in bad["seeds"])
  assert bad["summary"]["metrics"]["test/accuracy"]["mean"] is None
  table = (tmp_path / "table.md").read_text()
  assert _row(table, "1e+30")[1:9] == ["—"] * 5 + ["2", "2",
                                                   "— (no common seeds)"]
  for seed in (1, 2):
    assert (f"- optimizer.learning_rate=1e+30, seed {seed}, epoch 1:"
            " diverged: NaN or Inf") in table
  assert result["fixed"]["gnvr.lam"] == {"value": 0.01, "source": "fixed"}
  assert sweep_report.sweep_curves(result)["panels"][0]["x"].tolist() == [0.01]


def test_an_interrupted_sweep_trains_only_what_is_missing(finished, tmp_path,
                                                          monkeypatch):
  workdir, result = finished
  calls = []
  train = _Population.train

  def counted(self, configs, **kwargs):
    if stop_after is not None and len(calls) == stop_after:
      raise KeyboardInterrupt
    calls.append([c.gnvr.lam for c in configs])
    return train(self, configs, **kwargs)

  monkeypatch.setattr(_Population, "train", counted)
  stop_after = 1
  with pytest.raises(KeyboardInterrupt):
    sweep.run(tiny_sweep(), str(tmp_path))
  assert calls == [[0.0, 0.0]]
  assert not (tmp_path / "sweep.json").exists()
  stop_after = None
  resumed = sweep.run(tiny_sweep(), str(tmp_path))
  assert calls == [[0.0, 0.0], [0.01, 0.01], [0.1, 0.1]]
  drop = lambda r: {k: v for k, v in r.items() if k != "wall_time_s"}
  assert drop(resumed) == drop(result)
  for name in ("table.md", "sweep.png"):
    mine = (tmp_path / name).read_bytes()
    theirs = open(os.path.join(workdir, name), "rb").read()
    if name == "table.md":  # All but the training time.
      mine, theirs = (t.split(b"Training time")[0] for t in (mine, theirs))
    assert mine == theirs, name
  # Finished: nothing trains. A point added to the grid: only it trains.
  sweep.run(tiny_sweep(), str(tmp_path))
  assert len(calls) == 3
  more = tiny_sweep(**{"grid.gnvr.lam": (0.0, 0.01, 0.1, 1.0)})
  extended = sweep.run(more, str(tmp_path))
  assert calls[3:] == [[1.0, 1.0]]
  assert extended["points"][:3] == resumed["points"][:3]


def test_a_workdir_refuses_another_sweep(finished):
  workdir, _ = finished
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserError, match="holds another sweep.*optimizer.b1"):
    sweep.run(tiny_sweep(**{"train.optimizer.b1": 0.8}), workdir)
  with checkpoints.WorkdirLock(workdir):  # Another process's sweep, running.
    with pytest.raises(UserError, match="is in use by pid"):
      sweep.run(tiny_sweep(), workdir)
  assert sorted(os.listdir(workdir)) == before


@pytest.mark.parametrize("overrides,message", [
    ({"grid": sweep_config.nest({"gnvr.ddof": (0, 1)})},
     "'gnvr.ddof' is not a traced hyper-parameter of method='gnvr'"),
    ({"grid": sweep_config.nest({"sam.rho": (0.0, 0.1)})},
     "sweep one of .*gnvr.lam.*optimizer.learning_rate"),
    ({"grid.gnvr.lam": (-0.1, 0.1)}, "finite number ≥ 0, got -0.1"),
    ({"grid.gnvr.lam": (0.0, math.inf)}, "finite number ≥ 0, got inf"),
    ({"grid.gnvr.lam": (0.1, 0.1)}, "at least 2 distinct values"),
    ({"grid": sweep_config.nest({"gnvr.lamb": (0.0, 0.1)})},
     "did you mean 'gnvr.lam'"),
    ({"grid": sweep_config.nest({})}, "grid must have 1 or 2 keys"),
    ({"fixed.gnvr.lam": 0.1}, "gnvr.lam is both swept"),
    ({"train.batch_size": 0}, "point gnvr.lam=0.0: batch_size"),
    ({"num_seeds": 0}, "num_seeds"),
    ({"name": ""}, "needs a name"),
    ({"from_study.workdir": "/nonexistent/study"},
     "from_study.workdir is set: set from_study.arm"),
])
def test_bad_sweeps_are_refused_before_anything_is_written(overrides, message,
                                                           tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(ConfigError, match=message):
    sweep.run(tiny_sweep(**overrides), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("key,message", [
    ("grid.gnvr.lamb", "--config.grid.gnvr.lamb: unknown config key"
     " 'gnvr.lamb' (did you mean 'gnvr.lam'?)"),
    ("train.optimizer.lr", "did you mean 'optimizer.l2'"),
    ("num_seed", "unknown sweep key 'num_seed' (did you mean 'num_seeds'?)"),
])
def test_a_misspelled_override_is_named(key, message):
  with pytest.raises(UserError, match=re.escape(message)):
    sweep.check_override(key)
  for good in ("grid.sam.rho", "fixed.gnvr.lam", "train.seed", "num_seeds",
               "from_study.workdir"):
    sweep.check_override(good)


def _study(tmp_path, arms):
  study_dir = tmp_path / "study"
  study_dir.mkdir()
  (study_dir / "results.json").write_text(json.dumps({"arms": arms}))
  return str(study_dir)


def test_fixed_values_come_from_the_studys_arm(tmp_path):
  study_dir = _study(tmp_path, [
      {"name": "baseline", "best_params": {"optimizer.learning_rate": 0.005,
                                           "optimizer.weight_decay": 0.002}},
      {"name": "gnvr", "best_params": {"optimizer.learning_rate": 0.007,
                                       "gnvr.lam": 0.3},
       # A replicated study's (tuning.replicates): best_params is 0's.
       "replicates": [{"replicate": 1, "best_params": {
           "optimizer.learning_rate": 0.009}}]}])
  config = tiny_sweep(**{"from_study.workdir": study_dir,
                         "from_study.arm": "gnvr",
                         "fixed.optimizer.weight_decay": 0.001})
  trained = sweep_config.plan(config)
  source = f"study {study_dir}, arm gnvr"
  # The swept key's tuned value is not used; fixed wins over the study.
  assert trained["fixed"] == {
      "optimizer.l2": {"value": 0.0, "source": "train config"},
      "optimizer.learning_rate": {"value": 0.007, "source": source},
      "optimizer.weight_decay": {"value": 0.001, "source": "fixed"}}
  for member in trained["members"]:
    assert member.config.optimizer.learning_rate == 0.007
    assert member.config.optimizer.weight_decay == 0.001
    assert member.config.gnvr.lam == member.values["gnvr.lam"]
  config.from_study.replicate = 1
  assert sweep_config.plan(config)["fixed"]["optimizer.learning_rate"] == {
      "value": 0.009, "source": f"{source}, replicate 1"}
  config.from_study.replicate = 2
  with pytest.raises(UserError, match="arm 'gnvr', replicate 2 is not in"):
    sweep_config.plan(config)
  config.from_study.arm = "baselin"
  with pytest.raises(UserError, match="has no arm 'baselin'; its arms:"
                     " baseline, gnvr"):
    sweep_config.plan(config)


def test_a_missing_study_is_one_line_naming_the_command(tmp_path):
  workdir = tmp_path / "w"
  proc = run(["-m", "gnp.sweep", "--config=configs/sweeps/gnvr.py:smoke",
              f"--workdir={workdir}",
              f"--config.from_study.workdir={tmp_path / 'nowhere'}"],
             timeout=120)
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines == [
      f"gnp.sweep: error: from_study: {tmp_path / 'nowhere'}/results.json"
      " does not exist; make it with `python -m gnp.study"
      " --config=configs/studies/gnvr.py"
      f" --workdir={tmp_path / 'nowhere'}`, or run without a study"
      " (--config.from_study.workdir=)."]
  assert not workdir.exists()


def test_config_and_report_modules_do_not_import_the_runner():
  # A config file or a notebook reading sweep.json needs neither the
  # training stack nor (for a config) matplotlib.
  proc = run(["-c", "import sys; import gnp.sweep_config; import"
              " gnp.sweep_report; print(sorted(m for m in sys.modules if m in"
              " ('gnp.sweep', 'gnp.population', 'gnp.data', 'gnp.study')))"],
             timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_sweep_configs_validate(name, variant):
  path = os.path.join(ROOT, "configs", "sweeps", f"{name}.py")
  config = study_config.load_config(path, variant)
  trained = sweep_config.plan(config)
  assert 0.0 in next(iter(trained["grid"].values()))  # A baseline point.
  assert not config.from_study.workdir and config.from_study.arm
  if variant == "smoke":
    assert (config.num_seeds, config.num_epochs) == (2, 2)
    assert len(trained["members"]) <= 8
  text = open(path, encoding="utf-8").read()
  assert f"python -m gnp.sweep --config=configs/sweeps/{name}.py" in text


@pytest.mark.slow
def test_a_smoke_sweep_runs_end_to_end(tmp_path):
  workdir = tmp_path / "smoke"
  proc = run(["-m", "gnp.sweep", "--config=configs/sweeps/sam.py:smoke",
              f"--workdir={workdir}"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 0 |" in proc.stdout and "# Sweep: sam" in proc.stdout
  result = json.load(open(workdir / "sweep.json"))
  assert [p["values"]["sam.rho"] for p in result["points"]] == [
      0.0, 0.0316227766017, 1.0]
  assert all(len(p["seeds"]) == 2 for p in result["points"])
  assert (workdir / "table.md").read_text() == proc.stdout.rstrip("\n") + "\n"
  assert (workdir / "sweep.png").read_bytes().startswith(b"\x89PNG")
