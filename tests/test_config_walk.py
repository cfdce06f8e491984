"""Every config key, given bad values on the command line: one line or a run.

For each key of `gnp.config.default_config()`, the values a user gets wrong
(negative, zero, NaN, ±inf, a word or a bool where a number goes, a number
where a bool goes, absurdly large) go through what ``python -m gnp.main
--config=configs/mnist1d.py --config.<key>=<value>`` does: ml_collections'
string conversion of the override, `gnp.cli.parse_config_flags`,
`gnp.config.validate`, data loading, model building, compilation, a run.
Each either exits non-zero with exactly one line, ``gnp: error: ...`` (1 for
a mistake, 3 for a run that diverges), or trains; none shows a traceback.
`WALK` says, key by key, in which setting the key matters and which values
train.

The cases run in this process, with the calls `gnp.main` makes (a process
each would cost an import of JAX, ~3 s, per case); a few run as
``python -m gnp.main`` too, to show that both give the same status and line.
Runs are tiny (2 steps of an 8-wide MLP on 200 mnist1d samples) and share
the run's persistent compilation cache (tests/conftest.py), so that configs
that differ only in traced values compile once.
"""

from __future__ import annotations

import os
import re
import traceback
import warnings

import pytest
from absl import flags
from ml_collections import config_flags

from gnp import cli
from gnp import config as config_lib
from gnp import data
from gnp import train
from gnp.errors import NonFiniteError
from gnp.errors import UserError
from tests.helpers import ROOT
from tests.helpers import run

CONFIG = os.path.join(ROOT, "configs", "mnist1d.py")

# --- The values ------------------------------------------------------------
# As typed after ``--config.<key>=``; ml_collections converts them to the
# field's type (int, float, bool, str, tuple) or refuses them.
NEGATIVE, ZERO, NAN, INF, NEG_INF = "-1", "0", "nan", "inf", "-inf"
HUGE_INT, HUGE_FLOAT = "1000000000000", "1e30"  # 10**12, 1e30.
WORD, BOOL, FRACTION, TWO = "abc", "True", "2.5", "2"

FLOAT = (NEGATIVE, ZERO, NAN, INF, NEG_INF, WORD, BOOL, HUGE_FLOAT)
INT = (NEGATIVE, ZERO, NAN, INF, NEG_INF, WORD, BOOL, FRACTION, HUGE_INT)
# "0" is a spelling of False; the rest are numbers or words.
BOOLEAN = (NEGATIVE, ZERO, NAN, INF, WORD, TWO, HUGE_FLOAT)
STRING = ("", NEGATIVE, ZERO, NAN, INF, HUGE_FLOAT, BOOL)
TUPLE = ("(-1,)", "(0,)", "()", "(nan,)", "(inf,)", WORD, "(True,)", "(2.5,)",
         f"({HUGE_INT},)")

# --- The settings ----------------------------------------------------------
# Every case starts from configs/mnist1d.py shrunk to a run of a second or
# two; a setting then makes its keys matter (gnp.* need method=gnp, ...). A
# key that sets the budget itself (num_steps, model.hidden, ...) replaces its
# entry here; num_epochs runs without num_steps.
TINY = {"num_steps": "2", "dataset.num_samples": "200",
        "dataset.validation_size": "20", "model.hidden": "(8,)",
        "batch_size": "20", "eval_batch_size": "100"}
# Images (the MLP flattens them; a CNN would only cost compilation time).
IMAGES = {"dataset.name": "synthetic", "dataset.input_shape": "(8,8,3)",
          "dataset.num_classes": "4", "dataset.num_train": "64",
          "dataset.num_test": "16", "dataset.validation_size": "16",
          "batch_size": "16"}
# Not prepared there, and not to be downloaded: refused at once.
CIFAR = {"dataset.name": "cifar10", "dataset.data_dir": "/nonexistent/tfds",
         "dataset.download": "false"}
# Its runs would compile for a minute on CPU; none of its keys' values here
# is accepted (model.dropout_rate=0 is its default and turns dropout off).
WRN = {**IMAGES, "model.name": "wide_resnet", "model.depth": "10",
       "model.width": "1"}

TRAINS, DIVERGES = 0, 3  # Exit statuses; every other case exits 1.

# setting: (overrides, {key: (values, {value: status} for each value that is
# not refused)}).
WALK = {
    "data": ({}, {
        "seed": (INT, {ZERO: TRAINS}),
        "dataset.name": (STRING, {}),
        "dataset.seed": (INT, {ZERO: TRAINS}),
        "dataset.validation_size": (INT, {ZERO: TRAINS}),
        "dataset.num_samples": (INT, {}),
        "dataset.label_noise": (FLOAT, {ZERO: TRAINS}),
        "augment.noise_std": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        "augment.max_shift": (INT, {ZERO: TRAINS}),
        "model.name": (STRING, {}),
        "model.hidden": (TUPLE, {}),
    }),
    "cifar": (CIFAR, {
        "dataset.data_dir": (STRING, {}),
        "dataset.download": (BOOLEAN, {}),
    }),
    "images": (IMAGES, {
        "dataset.input_shape": (TUPLE, {}),
        "dataset.num_classes": (INT, {}),
        "dataset.num_train": (INT, {}),
        "dataset.num_test": (INT, {}),
        "augment.crop_padding": (INT, {ZERO: TRAINS}),
        "augment.flip": (BOOLEAN, {ZERO: TRAINS}),
        "augment.cutout": (INT, {ZERO: TRAINS}),
    }),
    "wide_resnet": (WRN, {
        "model.depth": (INT, {}),
        "model.width": (INT, {}),
        "model.dropout_rate": (tuple(v for v in FLOAT if v != ZERO), {}),
        "model.dtype": (STRING, {}),
    }),
    "loop": ({}, {
        "method": (STRING, {}),
        "regularizer_warmup": (STRING, {}),
        "batch_size": (INT, {}),
        "grad_accum_steps": (INT, {}),
        "num_epochs": (INT, {}),
        "num_steps": (INT, {}),
        "eval_batch_size": (INT, {}),
        "eval_every_epochs": (INT, {HUGE_INT: TRAINS}),
        "log_every_steps": (INT, {HUGE_INT: TRAINS}),
        "checkpoint_every_steps": (INT, {HUGE_INT: TRAINS}),
        "steps_per_dispatch": (INT, {HUGE_INT: TRAINS}),
        "keep_checkpoints": (INT, {HUGE_INT: TRAINS}),
        "on_nonfinite": (STRING, {}),
    }),
    "adamw": ({}, {
        "optimizer.name": (STRING, {}),
        "optimizer.learning_rate": (FLOAT, {ZERO: TRAINS,
                                            HUGE_FLOAT: DIVERGES}),
        "optimizer.weight_decay": (FLOAT, {ZERO: TRAINS,
                                           HUGE_FLOAT: DIVERGES}),
        "optimizer.l2": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        "optimizer.b1": (FLOAT, {ZERO: TRAINS}),
        "optimizer.b2": (FLOAT, {ZERO: TRAINS}),
        "optimizer.schedule": (STRING, {}),
        "optimizer.warmup_epochs": (FLOAT, {ZERO: TRAINS}),
        "optimizer.grad_clip": (FLOAT, {HUGE_FLOAT: TRAINS}),
        "optimizer.centralize": (BOOLEAN, {ZERO: TRAINS}),
        "optimizer.standardize": (BOOLEAN, {ZERO: TRAINS}),
        "optimizer.transforms_conv_only": (BOOLEAN, {ZERO: TRAINS}),
    }),
    "sgd": ({"optimizer.name": "sgd"}, {
        "optimizer.momentum": (FLOAT, {ZERO: TRAINS}),
        "optimizer.nesterov": (BOOLEAN, {ZERO: TRAINS}),
    }),
    "step_schedule": ({"optimizer.schedule": "step",
                       "optimizer.step_epochs": "(1,)"}, {
        "optimizer.step_epochs": (TUPLE, {}),
        "optimizer.step_factor": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: TRAINS}),
    }),
    "gnp": ({"method": "gnp"}, {
        "gnp.r": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        "gnp.alpha": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        "gnp.exact": (BOOLEAN, {ZERO: TRAINS}),
        "gnp.normalize_first": (BOOLEAN, {ZERO: TRAINS}),
        "gnp.group_size": (INT, {}),
        "gnp.adaptive": (BOOLEAN, {ZERO: TRAINS}),
    }),
    # η matters only with the adaptive perturbation; a huge one is a huge
    # radius (T ≈ η: ε ≈ r η ĝ).
    "gnp_adaptive": ({"method": "gnp", "gnp.adaptive": "True"}, {
        "gnp.eta": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
    }),
    "sam": ({"method": "sam"}, {
        "sam.rho": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        "sam.group_size": (INT, {}),
        "sam.adaptive": (BOOLEAN, {ZERO: TRAINS}),
        # RST's probability is in (0, 1]: none of these values is.
        "sam.probability": (FLOAT, {}),
    }),
    "asam": ({"method": "sam", "sam.adaptive": "True"}, {
        "sam.eta": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
    }),
    # Exactly one threshold is set: here the key's own. k = 0 clips to the
    # median norm; a huge k or τ clips nothing.
    "clip": ({"method": "clip"}, {
        "clip.outlier_mads": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: TRAINS}),
        "clip.max_norm": (FLOAT, {HUGE_FLOAT: TRAINS}),
    }),
    "clip_robust": ({"method": "clip", "clip.outlier_mads": "3"}, {
        "clip.method": (STRING, {}),
    }),
    "gnvr": ({"method": "gnvr"}, {
        "gnvr.lam": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        "gnvr.ddof": (INT, {ZERO: TRAINS}),
        "gnvr.method": (STRING, {}),
    }),
    "gvr": ({"method": "gvr", "augment.noise_std": "0.1"}, {
        "gvr.alpha": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        # "" and "0" are regular expressions that match parameters' paths
        # ("Dense_0/kernel").
        "gvr.wrt": (STRING, {"": TRAINS, ZERO: TRAINS}),
    }),
    "hessian": ({"method": "hessian"}, {
        "hessian.lam": (FLOAT, {ZERO: TRAINS, HUGE_FLOAT: DIVERGES}),
        "hessian.num_probes": (INT, {}),
    }),
}

# Cases that still print a traceback, each for a defect outside the files
# this walk's fixes could touch: the test fails when one of them stops doing
# so, so that it leaves this list.
# (key, value) cases known to print a traceback, each with why; the walk
# fails when one of them stops doing so, so that it is taken off. None today.
KNOWN_DEFECTS: set[tuple[str, str]] = set()


def test_the_walk_covers_every_key_once():
  keys = [key for _, cases in WALK.values() for key in cases]
  assert sorted(keys) == sorted(
      config_lib.flatten(config_lib.default_config()))


def test_validate_knows_the_input_shapes_the_data_loads():
  config = config_lib.default_config()
  config.dataset.num_samples = 100
  for name in ("mnist1d", "synthetic"):
    config.dataset.name = name
    loaded = data.load(config.dataset, seed=0).input_shape
    assert config_lib.input_shape(config.dataset) == loaded


# --- Running a case --------------------------------------------------------


# Warnings a plain ``python -m gnp.main`` does not show.
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning,
                    ImportWarning, ResourceWarning)
# Outcomes of the configs run so far in this process, by config: a value
# that parses to a config already run (False and "0", say) runs once.
_OUTCOMES = {}


def gnp_main(args: list[str], workdir) -> tuple[object, list[str]]:
  """What ``python -m gnp.main --workdir=workdir *args`` does, in-process.

  Returns:
    ``(exit status, stderr lines)``, leaving out absl's log lines: the
    status is "traceback" (and the lines the traceback) for an exception
    that `gnp.main` would not catch, which would print a traceback.
  """
  argv = ["gnp.main", f"--workdir={workdir}", *args]
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  config = None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    try:
      cli.parse_config_flags(argv, program="gnp", example="configs/mnist1d.py",
                             check_key=config_lib.check_key,
                             flag_values=flag_values)
      config = flag_values.config.to_json(sort_keys=True)
      if config in _OUTCOMES:
        return _OUTCOMES[config]
      summary = train.train_and_evaluate(flag_values.config,
                                         flag_values.workdir)
      status, lines = TRAINS, []
      if not summary["steps"]:
        status, lines = "no step", [f"summary: {summary}"]
    except SystemExit as e:  # sys.exit(message), as gnp.cli does.
      status, lines = (1, [e.code]) if isinstance(e.code, str) else (e.code,
                                                                     [])
    except UserError as e:  # gnp.main's except clause.
      status, lines = 1, [f"gnp: error: {e}"]
    except NonFiniteError as e:
      status, lines = DIVERGES, [f"gnp: error: {e}"]
    except Exception:  # pylint: disable=broad-except
      status, lines = "traceback", [traceback.format_exc()]
  lines = [l for line in lines for l in line.splitlines()]
  lines += [f"{w.category.__name__}: {w.message}" for w in caught
            if not issubclass(w.category, _HIDDEN_WARNINGS)]
  if config is not None:
    _OUTCOMES[config] = status, lines
  return status, lines


def walk_args(setting: str, key: str, value: str) -> list[str]:
  """The command line of one case: the tiny run, the setting, the value."""
  overrides = {**TINY, **WALK[setting][0], key: value}
  if key == "num_epochs":
    del overrides["num_steps"]
  return [f"--config={CONFIG}"] + [f"--config.{k}={v}"
                                   for k, v in overrides.items()]


def check(status, lines, expected) -> str | None:
  """What is wrong with a case's outcome; None if nothing."""
  if status == "traceback":
    return "traceback:\n" + "\n".join(lines[-15:])
  if status != expected:
    return f"exit status {status}, expected {expected}: {lines}"
  if status == TRAINS:
    return f"trained, but wrote to stderr: {lines}" if lines else None
  if len(lines) != 1 or not lines[0].startswith("gnp: error: "):
    return f"not one 'gnp: error:' line: {lines}"
  return None


# One test per setting: its cases share compiled programs, so they should
# share a process under pytest-xdist.
@pytest.mark.parametrize("setting", list(WALK))
def test_each_bad_value_is_one_line_or_a_run(setting, tmp_path):
  failures = []
  for key, (values, accepted) in WALK[setting][1].items():
    assert set(accepted) <= set(values), key
    for i, value in enumerate(values):
      status, lines = gnp_main(walk_args(setting, key, value),
                               tmp_path / f"{key}-{i}")
      if (key, value) in KNOWN_DEFECTS:
        if status != "traceback":
          failures.append(f"--config.{key}={value!r} is fixed: remove it"
                          " from KNOWN_DEFECTS.")
        continue
      problem = check(status, lines, accepted.get(value, 1))
      if problem:
        failures.append(f"--config.{key}={value!r}: {problem}")
  assert not failures, "\n".join(failures)


# --- The same through python -m gnp.main -----------------------------------

# absl log lines start with a level letter and a date: I1124 12:00:00.000.
_LOG_LINE = re.compile(r"^[IWEF]\d{4} ")


def _stderr_lines(result) -> list[str]:
  return [l for l in result.stderr.splitlines()
          if l.strip() and not _LOG_LINE.match(l)]


# One case from each stage that refuses before compiling: the override's
# conversion, the config's validation, the data. (tests/test_main.py runs
# the command line through training and through a run that diverges.)
@pytest.mark.parametrize("setting, key, value", [
    ("loop", "batch_size", WORD),
    ("adamw", "optimizer.learning_rate", NAN),
    ("loop", "batch_size", HUGE_INT),
])
def test_the_command_line_does_what_the_walk_does(setting, key, value,
                                                  tmp_path):
  args = walk_args(setting, key, value)
  result = run(["-m", "gnp.main", f"--workdir={tmp_path / 'cli'}", *args])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  status, lines = gnp_main(args, tmp_path / "in_process")
  assert (result.returncode, _stderr_lines(result)) == (status, lines)
  assert status == WALK[setting][1][key][1].get(value, 1)


# --- Config files that raise -----------------------------------------------

BROKEN_CONFIGS = {
    "raises": ("from gnp.config import default_config\n"
               "def get_config(arg=None):\n"
               "  return default_config()['no_such_key']\n",
               "3: KeyError: \"'no_such_key'\""),
    "syntax error": ("def get_config(arg=None)\n"
                     "  return None\n",
                     "1: SyntaxError: expected ':'"),
    "bad import": ("import no_such_module\n",
                   "1: ModuleNotFoundError: No module named"
                   " 'no_such_module'"),
    # The line in the file, not the one deep inside ml_collections.
    "misspelled section": ("from gnp.config import default_config\n"
                           "def get_config(arg=None):\n"
                           "  config = default_config()\n"
                           "  config.optimiser.learning_rate = 0.1\n"
                           "  return config\n",
                           "4: AttributeError: "),
    "raises in a helper": ("def helper():\n"
                           "  return 1 / 0\n"
                           "def get_config(arg=None):\n"
                           "  return helper()\n",
                           "2: ZeroDivisionError: division by zero"),
    "two-line message": ("def get_config(arg=None):\n"
                         "  raise ValueError('first\\nsecond')\n",
                         "2: ValueError: first second"),
    "returns None": ("def get_config(arg=None):\n"
                     "  pass\n",
                     " get_config() returned NoneType; it must return an"
                     " ml_collections.ConfigDict."),
}


@pytest.mark.parametrize("case", list(BROKEN_CONFIGS))
def test_a_config_file_that_raises_is_one_line(case, tmp_path):
  source, expected = BROKEN_CONFIGS[case]
  path = tmp_path / "broken.py"
  path.write_text(source)
  status, lines = gnp_main([f"--config={path}"], tmp_path / "run")
  assert status == 1
  assert len(lines) == 1 and lines[0].startswith(f"gnp: error: {path}:")
  assert expected in lines[0], lines[0]


def test_an_unknown_variant_names_the_line_that_refuses_it():
  line = next(i for i, text in enumerate(open(CONFIG), 1)
              if "raise ValueError" in text)
  status, lines = gnp_main([f"--config={CONFIG}:bogus"], "/nonexistent")
  assert (status, lines) == (1, [
      f"gnp: error: {CONFIG}:{line}: ValueError: unknown variant 'bogus'; the"
      " only variant is 'smoke'."])


@pytest.mark.parametrize("module, program", [("gnp.main", "gnp"),
                                             ("gnp.study", "gnp.study")])
def test_both_programs_give_the_one_line(module, program, tmp_path):
  path = tmp_path / "broken.py"
  path.write_text(BROKEN_CONFIGS["syntax error"][0])
  result = run(["-m", module, f"--config={path}",
                f"--workdir={tmp_path / 'run'}"])
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
      f"{program}: error: {path}:1: SyntaxError: expected ':'"]
