"""A workdir is one run's at a time, and a finished run is never rewritten."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from gnp import checkpoints
from gnp import study
from gnp import train
from gnp.errors import UserError
from tests.helpers import ROOT
from tests.helpers import run
from tests.helpers import tiny_mnist1d
from tests.helpers import tiny_study


def _snapshot(workdir):
  """{path: bytes} of every file under ``workdir`` but the lock."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != ".lock":
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


# gnp.main, held at step 10 until the test lets it go: sys.argv[1] is the
# directory for the "paused" and "go" files, the rest goes to gnp.main.
_PAUSED_MAIN = """
import os, sys, time
from absl import app
from gnp import checkpoints, main
signals = sys.argv.pop(1)
save = checkpoints.Checkpointer.maybe_save
def maybe_save(self, step, state, **kwargs):
  if step == 10:
    open(os.path.join(signals, "paused"), "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(signals, "go")):
      assert time.monotonic() < deadline
      time.sleep(0.05)
  return save(self, step, state, **kwargs)
checkpoints.Checkpointer.maybe_save = maybe_save
sys.argv[0] = "gnp.main"
app.run(main.main, flags_parser=main._parse_flags)
"""


def test_a_second_run_into_a_busy_workdir_is_refused_and_the_first_is_clean(
    tmp_path):
  workdir, signals = tmp_path / "run", tmp_path / "signals"
  signals.mkdir()
  args = ["--config=configs/mnist1d.py", f"--workdir={workdir}",
          "--config.num_epochs=2", "--config.log_every_steps=5"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  first = subprocess.Popen(
      [sys.executable, "-c", _PAUSED_MAIN, str(signals), *args], cwd=ROOT,
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 300
    while not (signals / "paused").exists():  # At step 10, holding the lock.
      assert first.poll() is None, first.stderr.read()[-3000:]
      assert time.monotonic() < deadline, "the first run never reached step 10"
      time.sleep(0.1)
    second = run(["-m", "gnp.main", *args], timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"gnp: error: workdir {workdir} is in use by"
                           f" pid {first.pid} on "), line
    assert "wait for it to finish, or use another --workdir." in line
    (signals / "go").touch()
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
  finally:
    first.kill()
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == list(range(5, 71, 5))  # Each log step once, in order.
  assert [r["step"] for r in records if "test/accuracy" in r] == [35, 70]
  assert json.load(open(workdir / "summary.json"))["steps"] == 70


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\n"
       "from gnp import checkpoints\n"
       "with checkpoints.WorkdirLock(sys.argv[1]):\n"
       "  print('locked', flush=True)\n  time.sleep(600)\n", str(tmp_path)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"in use by pid {holder.pid} on "):
      with checkpoints.WorkdirLock(str(tmp_path)):
        pass
  finally:
    holder.kill()  # SIGKILL: no clean-up runs in the holder.
    holder.wait()
  with checkpoints.WorkdirLock(str(tmp_path)):  # The OS released it.
    pass


def test_a_study_workdir_is_one_studys_at_a_time(tmp_path):
  with checkpoints.WorkdirLock(str(tmp_path)):
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on "):
      study.run(tiny_study(), str(tmp_path))
  assert os.listdir(tmp_path) == [".lock"]  # Nothing else was written.


def test_a_finished_run_run_again_changes_no_file(tmp_path):
  config = tiny_mnist1d(num_steps=4)
  first = train.train_and_evaluate(config, str(tmp_path))
  before = _snapshot(tmp_path)
  assert {"summary.json", "metrics.jsonl", "config.json"} <= set(before)
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again == first
  assert _snapshot(tmp_path) == before


def test_a_resumed_run_adds_up_the_wall_time_of_its_invocations(tmp_path):
  first = train.train_and_evaluate(
      tiny_mnist1d(num_steps=8, checkpoint_every_steps=4), str(tmp_path))
  assert first["invocations"] == 1 and first["steps_this_invocation"] == 8
  np.testing.assert_allclose(first["examples_per_second"],
                             8 * 50 / first["wall_time_s"], rtol=1e-9)
  records = json.load(open(tmp_path / "wall_time.json"))
  assert sorted(records, key=int) == ["4", "8"]
  assert (0 < records["4"]["wall_time_s"] < records["8"]["wall_time_s"]
          <= first["wall_time_s"])
  second = train.train_and_evaluate(
      tiny_mnist1d(num_steps=12, checkpoint_every_steps=4), str(tmp_path))
  assert second["invocations"] == 2 and second["steps_this_invocation"] == 4
  # The first invocation's time up to checkpoint 8, then this one's own,
  # which is also what its speed is measured over.
  own = second["wall_time_s"] - records["8"]["wall_time_s"]
  assert own > 0
  np.testing.assert_allclose(second["examples_per_second"], 4 * 50 / own,
                             rtol=1e-6)
  last = json.load(open(tmp_path / "wall_time.json"))["12"]
  assert last["invocations"] == 2
  # Saved before the final evaluation, which the summary's time includes.
  assert records["8"]["wall_time_s"] < last["wall_time_s"] <= second[
      "wall_time_s"]
