"""gnp.study: tuning, retraining over seeds, the report, and resuming."""

import collections
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import optuna
import pytest
from scipy import stats

from gnp import study
from gnp import study_config
from gnp.errors import ConfigError
from gnp.errors import UserError
from tests.helpers import NO_CACHE
from tests.helpers import ROOT
from tests.helpers import run
from tests.helpers import tiny_study


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  results = study.run(tiny_study(), workdir)
  return workdir, results


def _row(table, arm):
  (line,) = [l for l in table.splitlines() if l.startswith(f"| {arm} |")]
  return line


def test_study_tunes_retrains_and_reports(finished):
  workdir, results = finished
  assert json.load(open(os.path.join(workdir, "results.json"))) == results
  assert [a["name"] for a in results["arms"]] == ["plain", "sam"]
  for arm in results["arms"]:
    assert len(arm["trials"]) == 2
    for trial in arm["trials"]:
      # The objective is the tuning run's last validation accuracy.
      assert trial["value"] == trial["history"]["validation/accuracy"][-1]
      assert len(trial["history"]["epoch"]) == 2
    best = max(arm["trials"], key=lambda t: t["value"])
    assert arm["best_params"] == best["params"]
    assert arm["best_value"] == best["value"]
    assert set(arm["best_params"]) == set(
        {"plain": ["optimizer.learning_rate"],
         "sam": ["optimizer.learning_rate", "sam.rho"]}[arm["name"]])
    assert [s["seed"] for s in arm["seeds"]] == [1, 2]  # Fresh seeds.
    assert all(s["history"]["epoch"] == [1, 2] for s in arm["seeds"])
  png = open(os.path.join(workdir, "curves.png"), "rb").read()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_table_numbers_equal_those_recomputed_from_results(finished):
  workdir, _ = finished
  results = json.load(open(os.path.join(workdir, "results.json")))
  table = open(os.path.join(workdir, "table.md")).read()
  last = lambda arm, key: np.array([s["history"][key][-1]
                                    for s in arm["seeds"]])
  for arm in results["arms"]:
    row = _row(table, arm["name"])
    for key, scale, digits in (("test/accuracy", 100, 2),
                               ("validation/accuracy", 100, 2),
                               ("validation/loss", 1, 4),
                               ("train/cross_entropy", 1, 4),
                               ("test/loss", 1, 4)):
      values = last(arm, key) * scale
      cell = f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"
      assert f"| {cell} |" in row, (key, cell, row)
  reference, other = results["arms"]
  diff = (last(other, "test/accuracy") - last(reference, "test/accuracy")) * 100
  half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(
      len(diff))
  cell = (f"{diff.mean():+.2f} [{diff.mean() - half:+.2f},"
          f" {diff.mean() + half:+.2f}] (n=2)")
  assert cell in _row(table, "sam")
  assert "reference" in _row(table, "plain")


def test_report_cli_rebuilds_the_same_table(finished, tmp_path):
  workdir, _ = finished
  copy = tmp_path / "copy"
  copy.mkdir()
  (copy / "results.json").write_text(
      open(os.path.join(workdir, "results.json")).read())
  proc = run(["-m", "gnp.report", f"--workdir={copy}"], timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert (copy / "table.md").read_text() == open(
      os.path.join(workdir, "table.md")).read()


def test_a_finished_study_is_not_retrained(finished, monkeypatch):
  workdir, results = finished

  def refuse(*args, **kwargs):
    raise AssertionError("a finished study trained again")

  monkeypatch.setattr(study.population.Population, "train", refuse)
  monkeypatch.setattr(study.population.Population, "stream", refuse)
  again = study.run(tiny_study(), workdir)
  assert again["arms"] == results["arms"]


def test_replicates_extend_a_finished_study(finished, tmp_path, monkeypatch):
  workdir, results = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  trained = []
  train = study.population.Population.train

  def recording(self, configs, **kwargs):
    trained.extend(c.seed for c in configs)
    return train(self, configs, **kwargs)

  stream = study.population.Population.stream

  def recording_stream(self, source, **kwargs):
    def asked(row):
      run = source(row)
      if run is not None:
        trained.append(run[1].seed)
      return run
    yield from stream(self, asked, **kwargs)

  monkeypatch.setattr(study.population.Population, "train", recording)
  monkeypatch.setattr(study.population.Population, "stream", recording_stream)
  replicated = study.run(tiny_study(**{"tuning.replicates": 2}), copy)
  # Replicate 0 is the finished study, kept; only replicate 1 trained: its
  # tuning runs with seed 1000 and its final runs with fresh seeds.
  assert sorted(set(trained)) == [1000, 1001, 1002]
  for before, after in zip(results["arms"], replicated["arms"]):
    assert [t for t in after["trials"] if t["replicate"] == 0] == (
        before["trials"])
    assert [s for s in after["seeds"] if s["replicate"] == 0] == (
        before["seeds"])
    ones = [t for t in after["trials"] if t["replicate"] == 1]
    assert len(ones) == 2
    # Its own sampler draw, not replicate 0's again.
    assert [t["params"] for t in ones] != [t["params"]
                                           for t in before["trials"]]
    assert [r["seeds"] for r in after["replicates"]] == [[1, 2], [1001, 1002]]
    best = max(ones, key=lambda t: t["value"])
    assert after["replicates"][1]["best_params"] == best["params"]
    assert after["best_params"] == before["best_params"]
  # The interval is over the replicates' paired means, recomputed here.
  last = {arm["name"]: {s["seed"]: s["history"]["test/accuracy"][-1]
                        for s in arm["seeds"]} for arm in replicated["arms"]}
  means = [np.mean([last["sam"][s] - last["plain"][s] for s in seeds])
           for seeds in ([1, 2], [1001, 1002])]
  ci = stats.ttest_1samp(means, 0.0).confidence_interval(0.95)
  table = open(os.path.join(copy, "table.md")).read()
  cell = (f"{np.mean(means) * 100:+.2f} [{ci.low * 100:+.2f},"
          f" {ci.high * 100:+.2f}] (R=2, n=4)")
  assert cell in _row(table, "sam"), (cell, _row(table, "sam"))
  assert "- sam, replicate 1: lr " in table


def test_arms_trained_at_once_equal_arms_one_at_a_time(finished, tmp_path,
                                                       monkeypatch):
  """The fixture's study trained both arms at once (the default on one CPU
  device); one arm at a time gives the same numbers, to the bit."""
  workdir, together = finished
  assert study.arms_at_once(tiny_study()) == 2
  threads = set()
  stream = study.population.Population.stream

  def recording_stream(self, source, **kwargs):
    threads.add(threading.current_thread().name)
    yield from stream(self, source, **kwargs)

  monkeypatch.setattr(study.population.Population, "stream", recording_stream)
  alone = study.run(tiny_study(arms_at_once=1), str(tmp_path))
  assert threads == {threading.main_thread().name}
  strip = lambda arms: [{k: v for k, v in a.items() if k != "wall_time_s"}
                        for a in arms]
  assert strip(alone["arms"]) == strip(together["arms"])
  # Each arm's training time is its own: one arm at a time, they fit in
  # the elapsed time; side by side, they overlap and add up to more.
  wall = json.load(open(os.path.join(workdir, "results.json")))["wall_time_s"]
  assert set(wall) == {"tuning", "final", "total", "elapsed"}
  assert wall["elapsed"] < wall["total"]
  assert 0 < alone["wall_time_s"]["total"] <= alone["wall_time_s"]["elapsed"]


def test_arms_train_in_threads_side_by_side(tmp_path, monkeypatch):
  inside = {}
  stream = study.population.Population.stream
  both = threading.Barrier(2, timeout=120)

  def meeting_stream(self, source, **kwargs):
    # Each arm's first stream waits here for the other's: only arms that
    # train at once get past it.
    name = threading.current_thread().name
    if name not in inside:
      inside[name] = both.wait()
    yield from stream(self, source, **kwargs)

  monkeypatch.setattr(study.population.Population, "stream", meeting_stream)
  config = tiny_study(**{"final.num_seeds": 1, "tuning.num_trials": 1,
                         "tuning.trials_at_once": 1})
  study.run(config, str(tmp_path))
  assert len(inside) == 2 and threading.main_thread().name not in inside


def test_an_arm_that_fails_stops_the_others_and_the_study_resumes(
    finished, tmp_path, monkeypatch):
  """SAM's tuning fails at once; the plain arm, training beside it, stops
  after its epoch without finishing a trial, and the error is SAM's. Run
  again, the study finishes as if nothing had happened."""
  tune = study.tune
  stream = study.population.Population.stream
  epochs = []

  def failing_tune(study_config, spec, *args, **kwargs):
    if spec.name == "sam":
      raise UserError("sam broke")
    return tune(study_config, spec, *args, **kwargs)

  def counting_stream(self, source, *, stop=None, **kwargs):
    def counted(going):
      epochs.append(sorted(going))
      return stop(going) if stop else None
    yield from stream(self, source, stop=counted, **kwargs)

  monkeypatch.setattr(study, "tune", failing_tune)
  monkeypatch.setattr(study.population.Population, "stream", counting_stream)
  workdir = str(tmp_path)
  with pytest.raises(UserError, match="sam broke"):
    study.run(tiny_study(), workdir)
  # Unstopped, plain would train 2 tuning epochs and 2 final ones.
  assert len(epochs) <= 1
  assert not os.path.exists(os.path.join(workdir, "final"))
  monkeypatch.setattr(study, "tune", tune)
  resumed = study.run(tiny_study(), workdir)
  for arm, before in zip(resumed["arms"], finished[1]["arms"]):
    # The interrupted trials ran again under new numbers, as after a kill.
    assert [(t["params"], t["value"], t["history"]) for t in arm["trials"]] == [
        (t["params"], t["value"], t["history"]) for t in before["trials"]]
    assert arm["seeds"] == before["seeds"]
    assert arm["best_params"] == before["best_params"]


def test_arms_of_one_structure_take_turns(tmp_path, monkeypatch):
  """A tuned arm and a fixed one share a compiled population: trained at
  once, they never train its stack together, and give what one arm at a
  time gives."""
  training, overlaps = collections.Counter(), []
  stream = study.population.Population.stream

  def watched_stream(self, source, **kwargs):
    training[id(self)] += 1
    overlaps.append(training[id(self)])
    try:
      time.sleep(0.2)  # Gives the other arm every chance to come in.
      yield from stream(self, source, **kwargs)
    finally:
      training[id(self)] -= 1

  config = tiny_study(**{"final.num_seeds": 1})
  config.arms = (config.arms[0], study.arm(
      "plain_fixed", "AdamW at 3e-3",
      overrides={"optimizer.learning_rate": 3e-3}))
  config.arms_at_once = 1
  alone = study.run(config, str(tmp_path / "alone"))
  monkeypatch.setattr(study.population.Population, "stream", watched_stream)
  config.arms_at_once = 2
  together = study.run(config, str(tmp_path / "together"))
  assert overlaps and max(overlaps) == 1
  strip = lambda arms: [{k: v for k, v in a.items() if k != "wall_time_s"}
                        for a in arms]
  assert strip(together["arms"]) == strip(alone["arms"])


def test_arms_at_once_resolves_zero_by_backend(monkeypatch):
  assert study.arms_at_once(tiny_study(arms_at_once=1)) == 1
  assert study.arms_at_once(tiny_study(arms_at_once=3)) == 3
  assert study.arms_at_once(tiny_study(vectorize=False)) == 1
  monkeypatch.setattr(study.jax, "device_count", lambda: 8)
  assert study.arms_at_once(tiny_study()) == 1


def test_arms_at_once_above_one_needs_a_single_device(monkeypatch, tmp_path):
  monkeypatch.setattr(study_config.jax, "device_count", lambda: 8)
  with pytest.raises(ConfigError, match="needs a single device"):
    study.run(tiny_study(arms_at_once=2), str(tmp_path))


def test_independent_data_draws_per_replicate():
  config = tiny_study(**{"tuning.independent_data": True, "seed": 7})
  seeds = [study.arm_config(config, config.arms[0], seed=0, num_epochs=1,
                            replicate=r).dataset.seed for r in range(3)]
  assert seeds == [7, 1007, 2007]
  shared = tiny_study(**{"seed": 7})
  assert {study.arm_config(shared, shared.arms[0], seed=0, num_epochs=1,
                           replicate=r).dataset.seed for r in range(3)} == {7}
  assert study.final_seeds(config, 2) == [2008, 2009]


@pytest.mark.parametrize("overrides,message", [
    ({"tuning.replicates": 0}, "tuning.replicates"),
    ({"tuning.pruner": "asha"}, "tuning.pruner must be one of none, halving"),
    ({"tuning.pruner_factor": 1}, "pruner_factor must be an integer >= 2"),
    ({"tuning.pruner": "halving", "vectorize": False}, "vectorize=False"),
    ({"tuning.replicates": 2, "final.num_seeds": 1000}, "below 1000"),
    ({"tuning.replicates": 2**23, "final.num_seeds": 1}, "2\\*\\*32"),
    ({"objective": "test/accuracy"}, "never reads the test set"),
    # Passed before, then every trial read NaN and "every trial diverged".
    ({"objective": "validation/cross_entropy"}, "does not record"),
    ({"objective": "train/grad_norm"}, "does not record"),
    ({"direction": "up"}, "direction"),
    ({"tuning.num_trials": 0}, "tuning.num_trials"),
    ({"train.dataset.validation_size": 0}, "validation_size is 0"),
    ({"arms_at_once": -1}, "arms_at_once must be an integer >= 0"),
    ({"arms_at_once": True}, "arms_at_once must be an integer >= 0"),
    ({"arms_at_once": 2, "vectorize": False}, "with vectorize=False"),
])
def test_bad_studies_are_refused_before_training(overrides, message, tmp_path):
  with pytest.raises(ConfigError, match=message):
    study.run(tiny_study(**overrides), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_bad_arms_are_refused():
  config = tiny_study()
  config.arms = (study.arm("a", search={"optimizer.learning_rte": (
      "log", 1e-3, 1e-2)}),)
  with pytest.raises(ConfigError, match="did you mean 'optimizer.learning_rate'"):
    study.validate(config)
  config.arms = (study.arm("a", search={"optimizer.learning_rate": (
      "loguniform", 1e-3, 1e-2)}),)
  with pytest.raises(ConfigError, match="kind one of"):
    study.validate(config)


_STUDY_FILE = """
import sys
sys.path.insert(0, {root!r})
from tests.helpers import tiny_study

def get_config(arg=None):
  config = tiny_study(**{{"tuning.num_trials": 4, "tuning.trials_at_once": 1,
                         "tuning.num_epochs": 3, "final.num_seeds": 1,
                         "final.num_epochs": 1}})
  config.arms = config.arms[:1]
  return config
"""


def _trials(db):
  with sqlite3.connect(db) as con:
    return con.execute(
        "SELECT t.number, t.state, v.value FROM trials t JOIN studies s"
        " ON t.study_id = s.study_id LEFT JOIN trial_values v"
        " ON v.trial_id = t.trial_id WHERE s.study_name = 'plain'"
        " ORDER BY t.number").fetchall()


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_trials(tmp_path):
  config = tmp_path / "tiny_study.py"
  config.write_text(_STUDY_FILE.format(root=ROOT))
  workdir = tmp_path / "work"
  args = [sys.executable, "-m", "gnp.study", f"--config={config}",
          f"--workdir={workdir}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(args, cwd=ROOT, env={**env, **NO_CACHE},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  db = workdir / "study.db"
  deadline = time.time() + 300
  before = []
  while time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
    if db.exists():
      try:
        before = [t for t in _trials(db) if t[1] == "COMPLETE"]
      except sqlite3.OperationalError:  # Tables not created yet, or locked.
        continue
      if len(before) >= 2:
        break
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 2 <= len(before) < 4, "the study was not stopped during tuning"

  finished = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
  assert finished.returncode == 0, finished.stderr[-3000:]
  after = _trials(db)
  complete = [t for t in after if t[1] == "COMPLETE"]
  # The trials finished before the kill are kept as they were, and only the
  # missing ones were trained: exactly 4 complete trials in all.
  assert complete[:len(before)] == before
  assert len(complete) == 4
  results = json.load(open(workdir / "results.json"))
  assert len(results["arms"][0]["trials"]) == 4


@pytest.mark.parametrize("name", ["gnvr", "gc", "hessian", "all_methods"])
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_study_configs_validate(name, variant):
  config = study.load_config(os.path.join(ROOT, "configs", "studies",
                                          f"{name}.py"), variant)
  study.validate(config)
  assert config.objective.startswith("validation/")


@pytest.mark.parametrize("args,message", [
    (["--config.tuning.num_trials=0"], "tuning.num_trials"),
    (["--config.tuning.num_trails=3"], "num_trails"),
    (["--config.objective=test/loss"], "never reads the test set"),
])
def test_cli_mistakes_are_one_line(args, message, tmp_path):
  workdir = tmp_path / "w"
  proc = run(["-m", "gnp.study", "--config=configs/studies/gnvr.py:smoke",
              f"--workdir={workdir}", *args], timeout=120)
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("gnp.study: error:"), lines
  assert message in lines[0]
  assert not workdir.exists()


def test_sequential_study_equals_the_vectorised_one(tmp_path):
  one_run_each = {"tuning.num_trials": 1, "tuning.trials_at_once": 1,
                  "tuning.num_epochs": 1, "final.num_seeds": 1,
                  "final.num_epochs": 1}
  results = {}
  for vectorize in (True, False):
    config = tiny_study(vectorize=vectorize, **one_run_each)
    config.arms = config.arms[1:]  # SAM: its radius is traced state too.
    results[vectorize] = study.run(config, str(tmp_path / str(vectorize)))
  assert (tmp_path / "False" / "runs" / "sam" / "seed_1" / "checkpoints").is_dir()
  vectorised, sequential = results[True]["arms"][0], results[False]["arms"][0]
  # The same seeded sampler proposes the same trials.
  assert [t["params"] for t in vectorised["trials"]] == [
      t["params"] for t in sequential["trials"]]
  keys = ("train/cross_entropy", "train/penalty", "validation/accuracy")
  for a, b in zip(vectorised["trials"], sequential["trials"]):
    # Tuning never reads the test set; the vectorised trials skip it.
    assert not any(key.startswith("test/") for key in a["history"])
    for key in keys:
      np.testing.assert_allclose(a["history"][key], b["history"][key],
                                 rtol=1e-4, atol=1e-5, err_msg=key)
  for a, b in zip(vectorised["seeds"], sequential["seeds"]):
    for key in (*keys, "test/accuracy", "test/loss"):
      np.testing.assert_allclose(a["history"][key], b["history"][key],
                                 rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_diverging_trial_is_failed_not_scored(tmp_path):
  config = tiny_study(**{"tuning.num_trials": 2, "tuning.num_epochs": 1,
                         "final.num_seeds": 1, "final.num_epochs": 1})
  # A learning rate of 1e30 makes the first update non-finite: the state
  # freezes at its initial values, which must not pass for a trained model.
  config.arms = (study.arm("plain", search={
      "optimizer.learning_rate": ("choice", 1e-3, 1e30)}),
                 # A fixed arm whose retraining diverges at its first step.
                 study.arm("unstable", overrides={
                     "optimizer.learning_rate": 1e30}))
  # Both values, whatever the sampler would draw: enqueued trials go first.
  proposals = optuna.create_study(
      study_name="plain", direction="maximize",
      storage=f"sqlite:///{tmp_path / 'study.db'}")
  for lr in (1e-3, 1e30):
    proposals.enqueue_trial({"optimizer.learning_rate": lr})
  results = study.run(config, str(tmp_path))
  trials = results["arms"][0]["trials"]
  by_lr = {t["params"]["optimizer.learning_rate"]: t for t in trials}
  assert by_lr[1e30]["state"] == "FAIL" and by_lr[1e30]["value"] is None
  assert by_lr[1e-3]["state"] == "COMPLETE"
  assert results["arms"][0]["best_params"] == {"optimizer.learning_rate": 1e-3}
  # The diverged final run is named under the table and kept out of its
  # means: the frozen initial state's accuracy must not pass for a result.
  (seed,) = results["arms"][1]["seeds"]
  assert seed["diverged"].startswith("NaN or Inf") and seed[
      "diverged_epoch"] == 1
  table = open(tmp_path / "table.md").read()
  cells = [c.strip() for c in _row(table, "unstable").strip("|").split("|")]
  assert cells[1:8] == ["—", "—", "—", "—", "—", "1", "1"]
  assert ("- unstable, seed 1, epoch 1: diverged: NaN or Inf in the loss or"
          " update at step 1") in table


def test_a_workdir_refuses_another_study(finished):
  workdir, _ = finished
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserError, match="holds another study.*train.optimizer.b1"):
    study.run(tiny_study(**{"train.optimizer.b1": 0.8}), workdir)
  assert sorted(os.listdir(workdir)) == before


def test_an_arm_appended_to_a_finished_study_trains_alone(finished, tmp_path,
                                                         monkeypatch):
  workdir, results = finished
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  config = tiny_study()
  config.arms = (*config.arms, study.arm(
      "fixed", "plain at one setting", overrides={
          "optimizer.learning_rate": 3e-3}))
  trained = []
  train = study.population.Population.train

  def recording(self, configs, **kwargs):
    trained.extend(c.optimizer.learning_rate for c in configs)
    return train(self, configs, **kwargs)

  monkeypatch.setattr(study.population.Population, "train", recording)
  extended = study.run(config, copy)
  assert trained == [3e-3] * 2  # Its two seeds; nothing else trained.
  assert extended["arms"][:2] == results["arms"]
  assert extended["arms"][2]["name"] == "fixed"
  # Arms reordered, or one dropped, are another study.
  with pytest.raises(UserError, match="holds another study"):
    study.run(_reordered(tiny_study()), copy)


def _reordered(config):
  config.arms = tuple(reversed(config.arms))
  return config


def test_a_pruned_study_trains_fewer_epochs_and_says_so(tmp_path):
  settings = {"tuning.num_trials": 6, "tuning.trials_at_once": 3,
              "tuning.num_epochs": 4, "tuning.pruner_min_epochs": 1,
              "tuning.pruner_factor": 2, "final.num_seeds": 1,
              "final.num_epochs": 1}

  def one_arm(**more):
    config = tiny_study(**settings, **more)
    config.arms = config.arms[:1]
    return config

  full = study.run(one_arm(), str(tmp_path / "full"))
  pruned = study.run(one_arm(**{"tuning.pruner": "halving"}),
                     str(tmp_path / "pruned"))
  for before, after in zip(full["arms"], pruned["arms"]):
    assert before["tuning_epochs"] == 6 * 4
    lengths = [len(t["history"]["epoch"]) for t in after["trials"]]
    states = [t["state"] for t in after["trials"]]
    assert after["tuning_epochs"] == sum(lengths) < 6 * 4
    # A pruned trial stopped at a rung (epoch 1 or 2), the others ran out.
    assert all(n in (1, 2) if s == "PRUNED" else n == 4
               for n, s in zip(lengths, states)), (lengths, states)
    assert "PRUNED" in states and "COMPLETE" in states
    # Its value is the objective where it stopped; the best is a complete one.
    for t in after["trials"]:
      assert t["value"] == t["history"]["validation/accuracy"][-1]
    best = max((t for t in after["trials"] if t["state"] == "COMPLETE"),
               key=lambda t: t["value"])
    assert after["best_params"] == best["params"]
  # The first batch of trials is the same draw in both: pruning only stopped
  # some of them, and the survivors trained exactly as unpruned.
  for before, after in zip(full["arms"], pruned["arms"]):
    for b, a in zip(before["trials"][:3], after["trials"][:3]):
      assert b["params"] == a["params"]
      n = len(a["history"]["epoch"])
      np.testing.assert_allclose(a["history"]["validation/accuracy"],
                                 b["history"]["validation/accuracy"][:n],
                                 rtol=1e-6)
  table = open(tmp_path / "pruned" / "table.md").read()
  epochs = sum(a["tuning_epochs"] for a in pruned["arms"])
  assert f"Tuning trained {epochs} epochs of the 24 an unpruned study" in table
  assert "Trials completed/pruned/failed:" in table
  assert "pruned" not in open(tmp_path / "full" / "table.md").read()


def test_a_streamed_study_equals_one_trained_in_batches(tmp_path, monkeypatch):
  """Without pruning, a stream's rows refill together: the batches of old."""
  config = tiny_study(**{"tuning.num_trials": 3, "tuning.trials_at_once": 2,
                         "tuning.num_epochs": 1, "final.num_seeds": 1,
                         "final.num_epochs": 1})
  config.arms = config.arms[1:]
  streamed = study.run(config, str(tmp_path / "stream"))["arms"][0]
  monkeypatch.setattr(study, "_streamable", lambda *args: False)
  batched = study.run(config, str(tmp_path / "batch"))["arms"][0]
  assert [t["params"] for t in streamed["trials"]] == [
      t["params"] for t in batched["trials"]]
  for a, b in zip(streamed["trials"], batched["trials"]):
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5)
    np.testing.assert_allclose(a["history"]["train/cross_entropy"],
                               b["history"]["train/cross_entropy"], rtol=1e-5)


@pytest.mark.parametrize("settings,expected", [
    ({"tuning.pruner": "halving"}, {5, 15}),  # 30 epochs, 5 · 3^k.
    ({"tuning.pruner": "halving", "tuning.num_epochs": 45}, {5, 15}),
    ({"tuning.pruner": "halving", "tuning.num_epochs": 46}, {5, 15, 45}),
    ({"tuning.pruner": "halving", "tuning.pruner_min_epochs": 1,
      "tuning.pruner_factor": 2, "tuning.num_epochs": 4}, {1, 2}),
    ({"tuning.pruner": "none"}, set()),
])
def test_trials_report_only_where_the_pruner_decides(settings, expected):
  config = study.default_study()
  config.tuning.num_epochs = 30
  for key, value in settings.items():
    section, name = key.split(".")
    config[section][name] = value
  assert study.rungs(config) == expected


@pytest.mark.parametrize("search,streamable", [
    ({"optimizer.learning_rate": ("log", 1e-3, 1e-2)}, True),
    ({"optimizer.weight_decay": ("log", 1e-5, 1e-1)}, True),
    # Weight decay switched off at one end: another compiled step.
    ({"optimizer.weight_decay": ("uniform", 0.0, 1e-1)}, False),
    ({"batch_size": ("choice", 16, 32)}, False),
])
def test_only_searches_that_keep_the_step_train_as_a_stream(search,
                                                            streamable):
  config = tiny_study()
  config.arms = (study.arm("a", search=search),)
  assert study._streamable(config, config.arms[0]) is streamable  # pylint: disable=protected-access
