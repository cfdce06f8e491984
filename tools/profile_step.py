"""Where a training step's time goes: its kernels, and the gaps between them.

    python tools/profile_step.py --model=mlp --method=plain,sam --out=DIR
    python tools/profile_step.py --model=resnet18 --method=plain,sam \\
        --dtype=bfloat16 --batch_size=128 --steps=20 --trace --out=DIR
    python tools/profile_step.py --smoke --method=plain,sam --trace --out=DIR

On a GPU, ResNet-18's step at batch 128 is mostly fixed cost (about 4.4 ms
+ 0.0075 ms × batch, docs/performance.md): kernel launches, dispatch and
small operations rather than the model's arithmetic. This counts them. Each
method's experiment is built exactly as `gnp.bench` builds its rows
(`bench.base_config`, `bench.method_config`, `create_experiment`), and the
step profiled is the one the training loop runs,
``exp.step_on_device_data(state, train_data, epoch_indices)``.

Static (always): the compiled step's optimized HLO, read by
`tools.hlo_kernels`: the kernels one step launches, by category, with the
bodies of loops and the branches of conditionals apart, and which phase of
`gnp.step.train_step` each kernel computes (input, gradient, optimizer,
metrics & bookkeeping), from the Python stack frames XLA keeps in each
instruction's metadata.

Measured (``--trace``): ``--warmup`` steps, ``--steps`` steps timed on the
host, then ``--steps`` steps under `jax.profiler.trace`, each synchronised
and inside a `jax.profiler.StepTraceAnnotation`, read by `tools.step_trace`
(which says how each backend's device ops are found): per step, the number
of device ops, their summed duration, their union (busy), the idle time
between them (gaps) and the step's wall time, hence the fraction of a step
the device is idle.

When a trace has no per-op events, the row says so rather than give numbers.
Writes ``DIR/profile.json`` (everything), ``DIR/profile.md`` (the tables,
also printed), ``DIR/hlo/METHOD.txt`` (each optimized program) and, with
``--trace``, ``DIR/trace/METHOD/`` (the profiler's files, for Perfetto).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # Run as a file: import this tree's gnp.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gnp import bench  # noqa: E402
from gnp import data as data_lib  # noqa: E402
from gnp import step as step_lib  # noqa: E402
from gnp.errors import UserError  # noqa: E402
from gnp.experiment import create_experiment  # noqa: E402
from gnp.writers import write_atomically  # noqa: E402
from tools import hlo_kernels  # noqa: E402
from tools import step_trace  # noqa: E402


# --- One method --------------------------------------------------------------


def _static(hlo_text: str) -> dict:
  module = hlo_kernels.parse(hlo_text)
  with open(step_lib.__file__) as f:
    statements = hlo_kernels.statement_phases(f.read())
  tallies = hlo_kernels.count_kernels(module)

  def summary(tally):
    phases, mixed, statements_hit = hlo_kernels.attribute(
        tally, module, step_lib.__file__, statements)
    return {"name": tally.name, "kind": tally.kind, "parent": tally.parent,
            "trip_count": tally.trip_count, "kernels": len(tally.kernels),
            "categories": tally.categories(),
            "in_command_buffers": tally.in_command_buffers,
            "phases": phases, "fused_across_phases": mixed,
            "statements": statements_hit}

  entry, *bodies = [summary(t) for t in tallies]
  return {"module": module.name, "attributed": bool(module.frames),
          **{k: v for k, v in entry.items()
             if k not in ("name", "kind", "parent", "trip_count")},
          "bodies": bodies}


def profile_method(exp, name: str, *, out: str, trace: bool, steps: int,
                   warmup: int) -> dict:
  state = exp.init()
  train_data, indices = exp.train_data(), exp.epoch_indices(0)
  started = time.perf_counter()
  compiled = exp.step_on_device_data.lower(state, train_data,
                                           indices).compile()  # jit reuses.
  row = {"compile_s": time.perf_counter() - started}
  hlo_text = compiled.as_text()
  os.makedirs(os.path.join(out, "hlo"), exist_ok=True)
  write_atomically(os.path.join(out, "hlo", f"{name}.txt"), hlo_text)
  row.update(_static(hlo_text))
  if not trace:
    return row

  def one_step():
    nonlocal state
    state, metrics = exp.step_on_device_data(state, train_data, indices)
    jax.block_until_ready((state, metrics))

  for _ in range(warmup):
    one_step()
  untraced = []
  for _ in range(steps):
    started = time.perf_counter()
    one_step()
    untraced.append((time.perf_counter() - started) * 1e3)
  directory = os.path.join(out, "trace", name)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation(step_trace.STEP_NAME,
                                            step_num=i):
        one_step()
  try:
    path, loaded = step_trace.load(directory)
  except FileNotFoundError as e:
    row["trace"] = {"per_op_events": False, "steps": [], "note": str(e)}
    return row
  row["trace"] = step_trace.analyse(loaded, row["module"]) | {
      "file": os.path.relpath(path, out),
      "untraced_wall_ms": float(np.median(untraced))}
  return row


# --- The run -----------------------------------------------------------------


def check(model: str, methods, *, steps: int, warmup: int,
          batch_size: int | None) -> None:
  """Raises `UserError` for bad input, before anything is built."""
  if model not in bench.MODELS:
    raise UserError(f"unknown model {model!r}; choose from"
                    f" {', '.join(bench.MODELS)}.")
  unknown = [m for m in methods if m not in bench.METHODS]
  if unknown or not methods:
    raise UserError(f"unknown methods {unknown}; choose from"
                    f" {', '.join(bench.METHODS)}.")
  wrong = [m for m in methods if bench.ONLY_FOR.get(m, model) != model]
  if wrong:
    raise UserError(f"methods {wrong} exist only for"
                    f" {[bench.ONLY_FOR[m] for m in wrong]}, not {model}.")
  if steps < 1 or warmup < 0 or (batch_size is not None and batch_size < 1):
    raise UserError("steps and batch_size must be ≥ 1 and warmup ≥ 0.")


def run(model: str, methods, *, out: str, dtype: str | None = None,
        batch_size: int | None = None, steps: int = 20, warmup: int = 5,
        smoke: bool = False, trace: bool = False, command: str = "") -> dict:
  """Profiles each method's step; writes profile.{json,md} under ``out``."""
  check(model, methods, steps=steps, warmup=warmup, batch_size=batch_size)
  if dtype is None:
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  base = bench.base_config(model, dtype=dtype, smoke=smoke)
  if batch_size:
    base.batch_size = batch_size
  dataset = data_lib.load(base.dataset, seed=base.seed)
  rows, experiments = [], {}
  for method in methods:  # Every config is checked before anything compiles.
    rows.append({"method": method, "label": bench.METHODS[method][0]})
    try:
      experiments[method] = create_experiment(
          bench.method_config(base, method), dataset)
    except UserError as e:  # A method the model cannot have (GNVR with BN).
      rows[-1].update(status="n/a", reason=str(e))
  for row in rows:
    if row["method"] in experiments:
      try:
        row.update(status="ok", **profile_method(
            experiments[row["method"]], row["method"], out=out, trace=trace,
            steps=steps, warmup=warmup))
      except UserError as e:  # Some refusals come when the step is traced.
        row.update(status="n/a", reason=str(e))
  results = {
      "command": command, "machine": bench.machine(), "model": model,
      "setting": {"backend": jax.default_backend(),
                  "batch_size": base.batch_size, "dtype": base.model.dtype,
                  "smoke": smoke, "steps": steps, "warmup": warmup,
                  "trace": trace},
      "rows": rows,
  }
  text = json.dumps(results, indent=1)  # Fails before anything is written.
  os.makedirs(out, exist_ok=True)
  write_atomically(os.path.join(out, "profile.json"), text)
  write_atomically(os.path.join(out, "profile.md"), to_markdown(results))
  return results


# --- The tables --------------------------------------------------------------

def _bodies(bodies) -> str:
  """E.g. "4 while loops (17 per iteration, ×5); 2 branches (34, 62)"."""
  loops = [b for b in bodies if b["kind"] == "while body"]
  conditions = [b for b in bodies if b["kind"] == "while condition"]
  branches = [str(b["kernels"]) for b in bodies if b["kind"] == "branch"]
  parts = []
  if loops:  # count_kernels lists each loop's condition, then its body.
    per_iteration = sorted({b["kernels"] + c["kernels"]
                            for b, c in zip(loops, conditions)})
    trips = sorted({b["trip_count"] or 0 for b in loops})
    parts.append(f"{len(loops)} while loop{'s' * (len(loops) > 1)} ("
                 + "/".join(map(str, per_iteration)) + " per iteration"
                 + (f", ×{'/'.join(map(str, trips))}" if all(trips) else "")
                 + ")")
  if branches:
    parts.append(f"{len(branches)} branches ({', '.join(branches)})")
  return "; ".join(parts)


def to_markdown(results: dict) -> str:
  setting = results["setting"]
  phases = hlo_kernels.PHASES
  lines = [
      f"# Step profile: {results['model']}, batch {setting['batch_size']},"
      f" {setting['dtype']}, {setting['backend']}"
      f"{' (smoke)' if setting['smoke'] else ''}", "",
      f"`{results['command']}`", "",
      "| method | kernels | by category | " + " | ".join(phases)
      + " | fused across phases | loops and branches |",
      "|---|---:|---|" + "---:|" * (len(phases) + 1) + "---|",
  ]
  measured = []
  for row in results["rows"]:
    if row["status"] != "ok":
      lines.append(f"| {row['label']} | n/a | {row['reason']} |"
                   + " |" * (len(phases) + 2))
      continue
    categories = ", ".join(f"{k} {v}" for k, v in row["categories"].items())
    kernels = str(row["kernels"]) + (
        f" ({row['in_command_buffers']} in command buffers)"
        if row["in_command_buffers"] else "")
    lines.append(
        f"| {row['label']} | {kernels} | {categories} | "
        + " | ".join(str(row["phases"][p]) for p in phases)
        + f" | {sum(row['fused_across_phases'].values())}"
        f" | {_bodies(row['bodies'])} |")
    if "trace" in row:
      measured.append(row)
  lines += ["", "Kernels: those one step's program launches, its loops' and"
            " branches' kernels apart (per iteration, per branch). Phases:"
            " the `train_step` statement each kernel's result was traced"
            " from; fused across phases: kernels also holding another"
            " phase's instructions."]
  profiled = [r for r in results["rows"] if r["status"] == "ok"]
  statements = sorted({s for r in profiled for s in r["statements"]},
                      key=lambda s: (not s[0].isdigit(),
                                     int(s.split(":")[0]) if s[0].isdigit()
                                     else 0))
  if statements:
    lines += ["", "| `gnp/step.py` statement | "
              + " | ".join(r["label"] for r in profiled) + " |",
              "|---|" + "---:|" * len(profiled)]
    lines += [f"| `{s}` | " + " | ".join(
        str(r["statements"].get(s, 0)) for r in profiled) + " |"
              for s in statements]
    lines += ["", "The kernels above by the statement of `train_step` their"
              " result was traced from (the first line of it); loops,"
              " branches and unattributed kernels left out."]
  if measured:
    lines += ["", "| method | ops/step | op time ms | busy ms | gaps ms |"
              " outside ms | wall ms | device idle | untraced wall ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in measured:
      t = row["trace"]
      if "median" not in t:
        lines.append(f"| {row['label']} | {t['note']} |" + " |" * 7)
        continue
      m = t["median"]
      lines.append(
          f"| {row['label']} | {m['ops']:.0f} | {m['op_time_ms']:.3f} "
          f"| {m['busy_ms']:.3f} | {m['gaps_ms']:.3f} "
          f"| {m['outside_ms']:.3f} | {m['wall_ms']:.3f} "
          f"| {t['idle_fraction']:.0%} | {t['untraced_wall_ms']:.3f} |")
    lines += ["", "Measured: medians over the traced steps. Op time: the ops'"
              " summed durations; busy: their union; gaps: idle between the"
              " first op's start and the last op's end; outside: the rest of"
              " the step's wall time (dispatch, synchronisation); device"
              " idle: 1 − busy / wall. Ops: "
              + measured[0]["trace"]["source"] + "."]
  return "\n".join(lines) + "\n"


# --- Command line ------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, not the usage as well.
    raise SystemExit(f"profile_step: error: {message}")


def main(argv=None) -> None:
  parser = _Parser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mlp",
                      help=f"One of {', '.join(bench.MODELS)}.")
  parser.add_argument("--method", default="plain",
                      help="Comma-separated rows of gnp.bench.METHODS.")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="ResNet computation dtype (the MLP is float32);"
                      " default bfloat16 on a GPU, else float32.")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--steps", type=int, default=20,
                      help="Steps timed, then traced (with --trace).")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true",
                      help="bench's tiny models, data and batches.")
  parser.add_argument("--trace", action="store_true",
                      help="Also run and profile the step.")
  args = parser.parse_args(argv)
  methods = [m for m in args.method.split(",") if m]
  try:
    results = run(args.model, methods, out=args.out, dtype=args.dtype,
                  batch_size=args.batch_size, steps=args.steps,
                  warmup=args.warmup, smoke=args.smoke, trace=args.trace,
                  command=" ".join(["python tools/profile_step.py",
                                    *(argv if argv is not None
                                      else sys.argv[1:])]))
  except UserError as e:
    raise SystemExit(f"profile_step: error: {e}") from None
  print(to_markdown(results), end="")


if __name__ == "__main__":
  main()
