"""Two processes, one CPU device each, train like one process with two.

``gnp.main --multihost`` with a coordinator on 127.0.0.1: JAX's distributed
runtime connects the processes and gloo (JAX's default CPU collectives)
carries the reductions, so each process holds half of the global batch.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from gnp import checkpoints
from tests.helpers import NO_CACHE
from tests.helpers import ROOT
from tests.helpers import run

_ARGS = [
    "-m", "gnp.main", "--config=configs/mnist1d.py",
    "--config.dataset.num_samples=1000", "--config.dataset.validation_size=100",
    "--config.batch_size=50", "--config.eval_batch_size=200",
    "--config.num_steps=20", "--config.log_every_steps=5",
    "--config.checkpoint_every_steps=10", "--config.method=gnp",
]
_ENV = {"JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _params(workdir):
  state = checkpoints.load(str(workdir))
  return int(state["step"]), jax.tree.leaves(jax.device_get(state["params"]))


@pytest.mark.slow
def test_two_processes_give_the_parameters_of_one(tmp_path):
  # Two devices in one process: the same mesh as two processes of one each.
  single = run([*_ARGS, f"--workdir={tmp_path / 'single'}"], env={
      **_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert single.returncode == 0, single.stderr[-3000:]
  assert "batch 50 on 2 device(s)" in single.stderr

  workdir = tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, **_ENV, **NO_CACHE}  # Two processes side by side.
  env.pop("XLA_FLAGS", None)
  procs = [
      subprocess.Popen(
          [sys.executable, *_ARGS, f"--workdir={workdir}", "--multihost",
           f"--coordinator_address={address}", "--num_processes=2",
           f"--process_id={i}"],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True)
      for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, err) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, err[-3000:]
    assert f"JAX process {i} of 2" in err
    assert "batch 50 on 2 device(s)" in err
  assert "Starting JAX distributed service" in outputs[0]  # The coordinator.
  assert (workdir / "metrics.jsonl").exists() and (workdir / "summary.json"
                                                   ).exists()

  (step_one, one), (step_two, two) = _params(tmp_path / "single"), _params(
      workdir)
  assert step_one == step_two == 20
  for a, b in zip(one, two, strict=True):
    # Gloo's all-reduce may sum in another order than XLA's in-process one.
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
