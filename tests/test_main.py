"""The command line: a run end to end, and one clear line for each mistake."""

import json
import os
import re

import pytest

from gnp import cli
from gnp import config as config_lib
from gnp import study_config
from gnp import train
from gnp.errors import ConfigError
from tests.helpers import load_config
from tests.helpers import run
from tests.helpers import tiny_mnist1d

# absl log lines start with a level letter and a date: I1124 12:00:00.000.
_LOG_LINE = re.compile(r"^[IWEF]\d{4} ")


def _main(workdir, *args, env=None):
  return run(["-m", "gnp.main", f"--workdir={workdir}", *args],
             env={"JAX_LOG_COMPILES": "1", **(env or {})})


def test_the_readme_command_trains_and_leaves_artefacts(tmp_path):
  result = _main(tmp_path, "--config=configs/mnist1d.py:smoke")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 20/20" in result.stderr  # The progress line.
  assert "examples/s" in result.stderr and "ETA" in result.stderr
  assert "cross-entropy" in result.stderr
  # No alarm about a TPU that this machine was never meant to have.
  assert "libtpu" not in result.stderr
  summary = json.load(open(tmp_path / "summary.json"))
  assert 0 <= summary["test/accuracy"] <= 1
  # The one line on stdout: the test accuracy, the time and the workdir.
  assert result.stdout.strip().splitlines() == [
      f"gnp: done: test accuracy {summary['test/accuracy']:.4f}, validation"
      f" accuracy {summary['validation/accuracy']:.4f} after 20 steps in"
      f" {summary['wall_time_s']:.1f} s; summary.json, metrics.jsonl and"
      f" checkpoints in {tmp_path}"]
  assert os.listdir(tmp_path / "checkpoints") == ["20"]
  assert (tmp_path / "metrics.jsonl").stat().st_size > 0
  assert os.listdir(tmp_path / "tensorboard")


BAD = {
    "unknown method": (["--config.method=adam"], "method='adam' is unknown"),
    "unknown model": (["--config.model.name=resnet50"], "model.name="),
    "unknown dataset": (["--config.dataset.name=imagenet"], "dataset.name="),
    "unknown optimizer": (["--config.optimizer.name=lamb"], "optimizer.name="),
    "misspelled key": (["--config.optimizer.lerning_rate=0.1"], "lerning_rate"),
    "negative lr": (["--config.optimizer.learning_rate=-0.1"],
                    "learning_rate must be finite and ≥ 0"),
    "negative r": (["--config.method=gnp", "--config.gnp.r=-1"], "gnp.r"),
    "negative lambda": (["--config.method=gnvr", "--config.gnvr.lam=-1"],
                        "gnvr.lam must be finite and ≥ 0"),
    "negative rho": (["--config.method=sam", "--config.sam.rho=-0.1"],
                     "sam.rho must be finite and ≥ 0"),
    # A ZeroDivisionError traceback inside JAX's initialiser, and a linear
    # model trained without a word, before.
    "zero width": (["--config.model.hidden=(0,)"],
                   "model.hidden must be a non-empty tuple of positive"),
    "negative width": (["--config.model.hidden=(-3,)"], "got (-3,)"),
    "no hidden layer": (["--config.model.hidden=()"], "got ()"),
    "infinite r": (["--config.method=gnp", "--config.gnp.r=inf"],
                   "gnp.r must be finite and ≥ 0, got gnp.r=inf"),
    "label noise": (["--config.dataset.label_noise=1.0"], "label_noise"),
    "negative label noise": (["--config.dataset.label_noise=-0.1"],
                             "label_noise must be a fraction in [0, 1)"),
    "unknown on_nonfinite": (["--config.on_nonfinite=ignore"],
                             "on_nonfinite='ignore' is unknown"),
    # Not prepared in data_dir, and not downloadable here (no TensorFlow to
    # build it, or no network).
    "dataset unavailable": (["--config.dataset.name=cifar10",
                             "--config.dataset.data_dir=/nonexistent/tfds"],
                            "cifar10 is not prepared in /nonexistent/tfds"),
    "validation too large": (["--config.dataset.validation_size=4000"],
                             "validation_size"),
    "group size": (["--config.method=sam", "--config.sam.group_size=7"],
                   "group_size=7 does not divide"),
    "microbatches": (["--config.grad_accum_steps=7"],
                     "grad_accum_steps=7 does not divide batch_size=100."),
    "unknown variant": (["--config=configs/mnist1d.py:bogus"], "bogus"),
    "missing config file": (["--config=configs/nothere.py"], "nothere.py"),
    "bad value type": (["--config.batch_size=ten"], "batch_size=ten"),
    # Within validate's bound for num_epochs, but not once the data says how
    # many steps an epoch has: the int32 step counter would wrap.
    "too many steps": (["--config.num_epochs=1000000000"],
                       "steps the int32 step counter holds"),
    # Raised when the step was traced, after the workdir was written, before.
    "clip without a threshold": (["--config.method=clip"],
                                 "method='clip' needs exactly one threshold"),
    "gvr.wrt matching nothing": (["--config.method=gvr",
                                  "--config.augment.noise_std=0.1",
                                  "--config.gvr.wrt=nothing_named_so"],
                                 "matches none of the parameters' paths"),
}


def _assert_one_line(result, expected):
  """Exit 1, one ``gnp: error:`` line, no traceback, nothing compiled."""
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines()
           if l.strip() and not _LOG_LINE.match(l)]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("gnp: error: "), lines[0]
  assert expected in lines[0], lines[0]
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr


def _tree(path):
  """Every file and directory under ``path`` with its size and mtime."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      stat = os.stat(os.path.join(root, name))
      out[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
  return out


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_config_is_one_line_before_compilation(tmp_path, case):
  args, expected = BAD[case]
  if not any(a.startswith("--config=") for a in args):
    args = ["--config=configs/mnist1d.py", *args]
  workdir = tmp_path / "run"
  result = _main(workdir, *args)
  _assert_one_line(result, expected)
  assert not workdir.exists()


def _read_only_dir(tmp_path):
  """A directory this process cannot write to, or skip."""
  if os.geteuid() != 0:
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    return path
  # Root writes through permission bits, so chmod proves nothing; a
  # read-only file system still stops it (containers mount /proc/sys so).
  if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
    return "/proc/sys"
  pytest.skip("running as root, and no read-only file system to write to")


def _workdir_case(case, tmp_path):
  """(workdir, expected message) for each workdir mistake."""
  if case == "read-only":
    parent = _read_only_dir(tmp_path)
    return os.path.join(parent, "run"), "is not writable"
  if case == "under a file":
    (tmp_path / "notes.txt").write_text("")
    return str(tmp_path / "notes.txt" / "run"), "notes.txt is a file"
  # Another config's run: the default config with a different seed.
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_mnist1d(num_steps=2, seed=1), workdir)
  return workdir, "holds a run of a different config ("


@pytest.mark.parametrize("case", ["read-only", "under a file",
                                  "another config"])
def test_a_bad_workdir_is_one_line_and_nothing_is_written(tmp_path, case):
  workdir, expected = _workdir_case(case, tmp_path)
  before = _tree(tmp_path)
  args = [f"--config.{k}={v}" for k, v in {
      "dataset.num_samples": 1000, "dataset.validation_size": 100,
      "batch_size": 50, "num_steps": 2}.items()]
  result = _main(workdir, "--config=configs/mnist1d.py", *args)
  _assert_one_line(result, expected)
  assert _tree(tmp_path) == before


def test_a_diverging_run_names_the_step_and_the_quantity(tmp_path):
  result = _main(tmp_path, "--config=configs/mnist1d.py:smoke",
                 "--config.optimizer.learning_rate=1e30",
                 "--config.optimizer.weight_decay=1e30")
  assert result.returncode == 3, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "gnp: error: non-finite update (NaN or Inf) at step 1; the run stopped"
      " and no checkpoint was saved. Lower the learning rate, or set"
      " --config.on_nonfinite=skip to skip such steps.")
  assert "Traceback" not in result.stderr


def test_batch_not_divisible_by_the_devices(tmp_path):
  result = _main(
      tmp_path / "run", "--config=configs/mnist1d.py",
      "--config.batch_size=100",
      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 1
  assert "batch_size=100 is not divisible by the device count 8" in (
      result.stderr.strip().splitlines()[-1])
  assert "Compiling" not in result.stderr


def test_a_misspelled_key_in_a_config_file_is_caught():
  config = load_config("mnist1d")
  config.optimizer.lerning_rate = 0.1  # A config file can add keys; validate
  with pytest.raises(ConfigError, match="did you mean 'optimizer.learning_rate'"):
    config_lib.validate(config)


@pytest.mark.parametrize("name", [
    "mnist1d", "mnist1d_gnvr", "mnist1d_gc", "mnist1d_hessian", "cifar100_gnp",
    "cifar100_sam", "cifar100_gvr", "cifar10_wrn_gnp", "cifar10_asam"])
def test_every_config_is_valid(name):
  config_lib.validate(load_config(name))
  config_lib.validate(load_config(name, "smoke"))


def test_config_variants():
  assert load_config("mnist1d_gnvr").method == "gnvr"
  assert load_config("mnist1d_gnvr", "baseline").method == "plain"
  assert load_config("mnist1d_gnvr").dataset.label_noise == 0.2
  assert load_config("mnist1d_gc", "ngs").optimizer.standardize
  assert not load_config("mnist1d_gc", "baseline").optimizer.centralize
  assert load_config("cifar100_gvr", "two_view").gvr.alpha == 0
  assert load_config("cifar100_gvr", "one_view").method == "plain"
  wrn = load_config("cifar10_wrn_gnp")
  assert (wrn.batch_size, wrn.optimizer.learning_rate, wrn.num_epochs,
          wrn.optimizer.l2, wrn.gnp.r, wrn.gnp.alpha, wrn.optimizer.grad_clip,
          wrn.optimizer.momentum, wrn.optimizer.nesterov,
          wrn.optimizer.schedule) == (256, 0.1, 200, 1e-3, 0.1, 0.8, 5.0, 0.9,
                                      True, "cosine")


@pytest.mark.parametrize("program, defaults", [
    ("gnp.main", config_lib.default_config),
    ("gnp.study", study_config.default_study),
])
def test_help_says_what_it_does_and_lists_every_config_key(program, defaults):
  result = run(["-m", program, "--help"])
  assert result.returncode in (0, 1), result.stderr[-3000:]  # absl's: 1.
  assert "Traceback" not in result.stderr
  first = result.stdout.strip().splitlines()[0]
  assert first.startswith(("Trains one config", "Studies: tune")), first
  listed = set(re.findall(r"^  --config\.([\w.]+)=", result.stdout, re.M))
  keys = {k for k in config_lib.flatten(defaults())
          if k.split(".")[0] not in ("train", "arms")}
  assert keys <= listed, sorted(keys - listed)
  assert "(default: 'None')" not in result.stdout


def test_out_of_memory_is_one_line():
  error = RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184"
      " bytes.\nBufferAssignment OOM Debugging.\n...")
  assert cli.out_of_memory_line(error) == (
      "Out of memory while trying to allocate 17179869184 bytes.")
