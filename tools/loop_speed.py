"""How long a config's full run takes: a few epochs of its real loop, timed.

    python tools/loop_speed.py --config=configs/cifar100_gnp.py --epochs=3 \\
        --dtype=bfloat16 --steps_per_dispatch=10 --workdir=DIR
    python tools/loop_speed.py --config=configs/mnist1d.py --epochs=3 \\
        --workdir=DIR [--override key=value ...] [--smoke]

Runs `gnp.train.train_and_evaluate` itself, the loop `gnp.main` runs, on
data of the config's dataset's size and shape: CIFAR-10 and CIFAR-100 become
gnp's synthetic data (50,000 training and 10,000 test examples of 32×32×3,
10 or 100 classes), so nothing is downloaded; mnist1d is generated here
anyway and stays as it is. ``num_epochs`` stays the config's, so the
learning-rate schedule and every step's work are the full run's, and
``num_steps`` stops the run after ``--epochs`` epochs. Every epoch is
evaluated (``eval_every_epochs=1``), so that the evaluations can be timed
whatever the config's period; the estimate counts the config's own number.

From the summary's ``timing`` (see `gnp.loop`): the step's compilation, the
median training time of the epochs after the first (which compiles), the
examples per second it makes, the median evaluation after the first, and

    full run ≈ compile_s + num_epochs × epoch_train_s + evaluations
               × evaluation_s,   evaluations = ceil(num_epochs /
               eval_every_epochs),

which leaves out loading the data, compiling the evaluation and saving
checkpoints. The same sum over the epochs run is printed beside the run's
measured wall time, as a check of the sum. Synthetic images are float32 on
the device where CIFAR's are uint8, converted in the step: the gather moves
4× the bytes, a few MB a step.

Writes ``DIR/loop_speed.json`` (everything, plain JSON), ``DIR/loop_speed.md``
(also printed) and, under ``DIR/run``, the run's own workdir. ``--smoke``
shrinks the data, the batch and the model (an MLP of width 16) to check the
tool in seconds; its times mean nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shlex
import statistics
import sys

if __package__ in (None, ""):  # Run as a file: import this tree's gnp.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import jax  # noqa: E402
from absl import logging  # noqa: E402

from gnp import bench  # noqa: E402
from gnp import config as config_lib  # noqa: E402
from gnp import data as data_lib  # noqa: E402
from gnp import train  # noqa: E402
from gnp import writers  # noqa: E402
from gnp.data import pipeline  # noqa: E402
from gnp.errors import UserError  # noqa: E402
from gnp.study_config import load_config  # noqa: E402
from gnp.writers import write_atomically  # noqa: E402

# The datasets whose full size this tool knows: CIFAR's become synthetic
# data of that size and shape; mnist1d and synthetic data are made here.
REAL_SIZES = {
    "cifar10": dict(input_shape=(32, 32, 3), num_classes=10, num_train=50_000,
                    num_test=10_000),
    "cifar100": dict(input_shape=(32, 32, 3), num_classes=100,
                     num_train=50_000, num_test=10_000),
}
GENERATED = ("mnist1d", "synthetic")

FORMULA = ("compile_s + num_epochs × epoch_train_s + evaluations ×"
           " evaluation_s, evaluations = ceil(num_epochs / eval_every_epochs)")


# --- The config --------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, object]:
  """``"key=value"`` -> ``(key, value)``, the value read as a Python literal
  (``0.1``, ``(16, 16)``, ``True``), else as a string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise UserError(f"--override {text!r}: write key=value, e.g."
                    " --override optimizer.learning_rate=0.05.")
  config_lib.check_key(key)
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def _shrink(config) -> None:
  """``--smoke``: a few hundred examples, batch 32 and an MLP of width 16."""
  data = config.dataset
  if data.name == "mnist1d":
    data.num_samples = 500
    data.validation_size = min(data.validation_size, 50)
  else:
    data.num_train, data.num_test, data.validation_size = 256, 64, 0
  config.model.name = "mlp"
  config.model.hidden = (16,)
  config.batch_size = 32
  config.grad_accum_steps = 1
  config.eval_batch_size = 64
  config.log_every_steps = 4


def build_config(path: str, *, epochs: int, dtype: str | None = None,
                 steps_per_dispatch: int | None = None, overrides=(),
                 smoke: bool = False):
  """The config file at ``path[:variant]`` with the overrides, CIFAR's data
  swapped for its synthetic stand-in, ``--dtype``, ``--steps_per_dispatch``
  and ``--smoke`` applied, and the config's dataset's name. `run` then sets
  ``eval_every_epochs`` and ``num_steps``.

  Raises `UserError` for anything wrong, before anything is built.
  """
  if epochs < 2:
    raise UserError(f"--epochs={epochs}: need at least 2 (the first compiles;"
                    " the time per epoch is the median of the others).")
  if steps_per_dispatch is not None and steps_per_dispatch < 1:
    raise UserError(f"--steps_per_dispatch={steps_per_dispatch} must be ≥ 1.")
  file, _, variant = path.partition(":")
  try:
    config = load_config(file, variant or None)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the config file raises is the user's to fix: one line.
    message = " ".join(str(e).split())
    raise UserError(f"{path}: {type(e).__name__}: {message}") from None
  for text in overrides:
    key, value = _parse_override(text)
    try:
      config.update_from_flattened_dict({key: value})
    except (TypeError, ValueError, KeyError) as e:
      raise UserError(f"--override {text}: {' '.join(str(e).split())}"
                      ) from None
  name = config.dataset.name
  if name in REAL_SIZES:
    config.dataset.name = "synthetic"
    config.dataset.update(REAL_SIZES[name])
  elif name not in GENERATED:
    raise UserError(f"dataset {name!r} has no size this tool knows; it knows"
                    f" {', '.join([*REAL_SIZES, *GENERATED])}.")
  if dtype is not None:
    config.model.dtype = dtype
  if steps_per_dispatch is not None:
    config.steps_per_dispatch = steps_per_dispatch
  if smoke:
    _shrink(config)
  config_lib.validate(config, num_devices=jax.device_count())
  if epochs > config.num_epochs:
    raise UserError(f"--epochs={epochs} is more than the config's"
                    f" num_epochs={config.num_epochs}.")
  return config, name


# --- The estimate ------------------------------------------------------------


def estimate(timing: dict, *, num_epochs: int, eval_every_epochs: int,
             examples_per_epoch: int) -> dict:
  """The full run's wall time from a few epochs' ``timing`` (the summary's).

  The epoch and evaluation times are medians of those after the first,
  which compile; `FORMULA` adds them up.
  """
  epochs, evaluations = timing["epoch_train_s"], timing["evaluation_s"]
  if len(epochs) < 2 or len(evaluations) < 2:
    raise ValueError(f"need 2 epochs and 2 evaluations timed, got {timing}")
  epoch_s = statistics.median(epochs[1:])
  evaluation_s = statistics.median(evaluations[1:])
  num_evaluations = math.ceil(num_epochs / eval_every_epochs)
  total = (timing["compile_s"] + num_epochs * epoch_s
           + num_evaluations * evaluation_s)
  return {
      "compile_s": timing["compile_s"],
      "epoch_train_s": epoch_s,
      "examples_per_second": examples_per_epoch / epoch_s,
      "evaluation_s": evaluation_s,
      "num_epochs": num_epochs,
      "evaluations": num_evaluations,
      "full_run_s": total,
      "formula": FORMULA,
  }


# --- The run -----------------------------------------------------------------


def run(path: str, workdir: str, *, epochs: int = 3, dtype: str | None = None,
        steps_per_dispatch: int | None = None, overrides=(),
        smoke: bool = False, command: str = "") -> dict:
  """Trains ``epochs`` epochs of the config at ``path`` and estimates its
  full run; writes ``loop_speed.{json,md}`` in ``workdir``."""
  config, dataset_name = build_config(
      path, epochs=epochs, dtype=dtype, steps_per_dispatch=steps_per_dispatch,
      overrides=overrides, smoke=smoke)
  run_dir = os.path.join(workdir, "run")
  if os.path.exists(run_dir) and os.listdir(run_dir):
    raise UserError(f"{run_dir} holds an earlier measurement; give another"
                    " --workdir or remove it.")
  eval_every_epochs = config.eval_every_epochs
  config.eval_every_epochs = 1
  dataset = data_lib.load(config.dataset, seed=train.data_seed(config))
  steps_per_epoch = pipeline.steps_per_epoch(len(dataset.train[0]),
                                             config.batch_size)
  config.num_steps = epochs * steps_per_epoch
  summary = train.train_and_evaluate(config, run_dir, dataset=dataset)
  timing = summary["timing"]
  examples_per_epoch = steps_per_epoch * config.batch_size
  measured = estimate(timing, num_epochs=config.num_epochs,
                      eval_every_epochs=eval_every_epochs,
                      examples_per_epoch=examples_per_epoch)
  # The same sum over the epochs run, against the run's own wall time.
  check = estimate(timing, num_epochs=epochs, eval_every_epochs=1,
                   examples_per_epoch=examples_per_epoch)["full_run_s"]
  results = {
      "command": command, "machine": bench.machine(),
      "config": path, "smoke": smoke,
      "data": {"dataset": dataset_name,
               "synthetic_stand_in": dataset_name in REAL_SIZES,
               "input_shape": list(dataset.input_shape),
               "num_classes": dataset.num_classes,
               "train": len(dataset.train[0]), "test": len(dataset.test[0]),
               "validation": (len(dataset.validation[0])
                              if dataset.validation is not None else 0)},
      "setting": {"model": config.model.name, "method": config.method,
                  "dtype": config.model.dtype,
                  "batch_size": config.batch_size,
                  "steps_per_dispatch": config.steps_per_dispatch,
                  "steps_per_epoch": steps_per_epoch, "epochs_run": epochs,
                  "num_epochs": config.num_epochs,
                  "eval_every_epochs": eval_every_epochs},
      "timing": timing,
      "estimate": measured,
      "check": {"formula_over_epochs_run_s": check,
                "wall_time_s": summary["wall_time_s"]},
  }
  text = json.dumps(results, indent=1)  # Fails before anything is written.
  write_atomically(os.path.join(workdir, "loop_speed.json"), text)
  write_atomically(os.path.join(workdir, "loop_speed.md"), to_markdown(results))
  return results


def _seconds(seconds: float) -> str:
  """Three significant figures: a smoke run's milliseconds show too."""
  return f"{seconds:.3g}" if seconds < 100 else f"{seconds:.0f}"


def _duration(seconds: float) -> str:
  hours, rest = divmod(round(seconds), 3600)
  if seconds < 60:
    return f"{_seconds(seconds)} s"
  return (f"{hours} h {rest // 60:02d} min ({seconds:.0f} s)" if hours else
          f"{rest // 60} min {rest % 60:02d} s ({seconds:.0f} s)")


def to_markdown(results: dict) -> str:
  s, d, e = results["setting"], results["data"], results["estimate"]
  m, t = results["machine"], results["timing"]
  shape = "×".join(map(str, d["input_shape"]))
  fmt = lambda xs: ", ".join(map(_seconds, xs))
  lines = [
      f"# Loop speed: {results['config']}{' (smoke)' if results['smoke'] else ''}",
      "", f"`{results['command']}`", "",
      f"{m['device_kind']} ({m['backend']}, {m['device_count']} device(s)),"
      f" jax {m['jax']}, gnp {m['git']}. {s['model']}, {s['method']},"
      f" {s['dtype']}, batch {s['batch_size']}, {s['steps_per_dispatch']}"
      f" step(s) per dispatch; {d['dataset']}"
      f"{'-sized synthetic data' if d['synthetic_stand_in'] else ''}:"
      f" {d['train']:,} train,"
      f" {d['validation']:,} validation, {d['test']:,} test examples of"
      f" {shape}, {d['num_classes']} classes; {s['steps_per_epoch']} steps"
      f" per epoch; {s['epochs_run']} of {s['num_epochs']} epochs run.", "",
      "| | |", "|---|---:|",
      f"| compile (first step) | {_seconds(e['compile_s'])} s |",
      f"| train time per epoch (median after the first) |"
      f" {_seconds(e['epoch_train_s'])} s |",
      f"| examples/s | {e['examples_per_second']:,.0f} |",
      f"| evaluation (median after the first) |"
      f" {_seconds(e['evaluation_s'])} s |",
      f"| full run: {e['num_epochs']} epochs, {e['evaluations']} evaluations |"
      f" {_duration(e['full_run_s'])} |", "",
      f"Full run = {e['formula']}: {_seconds(e['compile_s'])} +"
      f" {e['num_epochs']} × {_seconds(e['epoch_train_s'])} +"
      f" {e['evaluations']} × {_seconds(e['evaluation_s'])} ="
      f" {_seconds(e['full_run_s'])} s. Not counted: loading the data,"
      " compiling the evaluation, saving checkpoints.", "",
      f"Epochs {t['epochs']}: {fmt(t['epoch_train_s'])} s (the first"
      f" {'includes' if t['first_epoch_includes_compile'] else 'excludes'}"
      f" compilation); evaluations: {fmt(t['evaluation_s'])} s (the first"
      " compiles). Check: the formula over the epochs run gives"
      f" {_seconds(results['check']['formula_over_epochs_run_s'])} s; the"
      f" run took {_seconds(results['check']['wall_time_s'])} s.",
  ]
  return "\n".join(lines) + "\n"


# --- Command line ------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, not the usage as well.
    raise SystemExit(f"loop_speed: error: {message}")


def main(argv=None) -> None:
  parser = _Parser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="A training config, configs/NAME.py[:variant].")
  parser.add_argument("--epochs", type=int, default=3,
                      help="Epochs to run (≥ 2); default 3.")
  parser.add_argument("--dtype", choices=config_lib.DTYPES,
                      help="model.dtype; default the config's.")
  parser.add_argument("--steps_per_dispatch", type=int,
                      help="Training steps per dispatch; default the"
                      " config's.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--override", action="append", default=[],
                      metavar="KEY=VALUE", help="A config value, e.g."
                      " optimizer.learning_rate=0.05; repeatable.")
  parser.add_argument("--smoke", action="store_true",
                      help="Tiny data, batch and model, to check the tool.")
  args = parser.parse_args(argv)
  writers.quiet_logs()
  logging.set_verbosity(logging.INFO)
  command = shlex.join(["python", "tools/loop_speed.py",
                        *(sys.argv[1:] if argv is None else argv)])
  try:
    results = run(args.config, args.workdir, epochs=args.epochs,
                  dtype=args.dtype, steps_per_dispatch=args.steps_per_dispatch,
                  overrides=args.override, smoke=args.smoke, command=command)
  except UserError as e:
    raise SystemExit(f"loop_speed: error: {e}") from None
  print(to_markdown(results), end="")


if __name__ == "__main__":
  main()
