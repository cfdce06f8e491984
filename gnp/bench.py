"""Step cost of every method: ``python -m gnp.bench --out=DIR``.

Times the real jitted train step (`gnp.experiment.create_experiment(config)
.step`) of each method on one fixed batch already on the device, and writes
``DIR/bench.md`` (a table) and ``DIR/bench.json`` (everything, with the
per-step times and the machine). Rows: plain, GC, NGS, SAM, ASAM,
randomized SAM (RST, p = 0.1), GNP (finite difference and exact), GNVR (vmap
and ghost norms), GVR, the Hessian penalty and per-example clipping (ghost
norms, robust threshold), each the default config with one thing changed.

Models: the mnist1d MLP (40→256→256→10, batch 100, AdamW; exactly
``configs/mnist1d.py``) always, and ResNet-18 (CIFAR stem, batch 128, the
``configs/cifar100_gnp.py`` optimiser) on synthetic 32×32×3 data with 100
classes when a GPU is present, so nothing is downloaded.

Shared machines are noisy, so methods are interleaved: for each round, a
block of ``--block`` steps of every method in turn (the order rotating from
round to round), until each has ``--repeats`` timed steps. Each row is the
median over its steps (with the quartiles), and ratios to plain are quotients
of medians from the same run. Every step is synchronised with
`jax.block_until_ready`, so a time includes dispatch, not only the math.
The pipelined columns time the same steps the way the training loop runs
them: bursts of ``--block`` steps dispatched at once with one wait at the
end (the median per-step time over bursts), where launch overhead overlaps
the previous step's work. The targets are judged on the synchronised times.

RST's steps cost one of two amounts at random (a SAM step with probability
p, a plain step otherwise), so the median of its steps is the plain step's
when p < 1/2. Its ``× plain`` is the expected cost instead: p × (median
SAM-branch step) + (1 − p) × (median plain-branch step), each step taken
over plain's median in the same round, the branches told apart by the
step's ``sam_step`` metric (whose mean, the fraction of SAM steps timed, is
reported too). p = 0.1 puts that at 1 + 0.1 (2.05 − 1) ≈ 1.1× plain,
plus the conditional's own cost, wherever SAM costs at most its 2.05×
target: under the 1.15× that RST's rows are held to.

    python -m gnp.bench --out=runs/bench                       # CPU: the MLP
    python -m gnp.bench --models=resnet18 --dtype=bfloat16 --out=runs/bench
    python -m gnp.bench --smoke --methods=plain,sam --out=/tmp/bench

See docs/performance.md for measured numbers and what they mean.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jaxlib
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging

from gnp import config as config_lib
from gnp import data as data_lib
from gnp import experiment
from gnp import writers
from gnp.errors import UserError
from gnp.writers import write_atomically

# Row id -> (label, config overrides). GVR's augmentation depends on the model
# and is added in `method_config`.
METHODS = {
    "plain": ("plain", {}),
    "gc": ("GC", {"optimizer.centralize": True}),
    "ngs": ("NGS", {"optimizer.standardize": True}),
    "sam": ("SAM", {"method": "sam"}),
    "asam": ("ASAM", {"method": "sam", "sam.adaptive": True, "sam.rho": 0.5}),
    "rst": ("SAM, randomized (RST, p = 0.1)",
            {"method": "sam", "sam.probability": 0.1}),
    "gnp": ("GNP (finite difference)", {"method": "gnp"}),
    "gnp_exact": ("GNP (exact)", {"method": "gnp", "gnp.exact": True}),
    "gnvr_vmap": ("GNVR (vmap)", {"method": "gnvr", "gnvr.method": "vmap"}),
    "gnvr_ghost": ("GNVR (ghost)", {"method": "gnvr", "gnvr.method": "ghost"}),
    # L2 in the loss (penalties.with_l2): its part of each norm analytically.
    "gnvr_ghost_l2": ("GNVR (ghost, L2)", {"method": "gnvr",
                                           "gnvr.method": "ghost",
                                           "optimizer.l2": 1e-3}),
    "gvr": ("GVR", {"method": "gvr"}),
    "hessian": ("Hessian", {"method": "hessian"}),
    "clip_ghost": ("per-example clipping (ghost)",
                   {"method": "clip", "clip.outlier_mads": 3.0,
                    "clip.method": "ghost"}),
    # The same MLP without Flax: ghost norms found in any JAX model's jaxpr.
    "gnvr_ghost_jnp": ("GNVR (ghost), MLP in jax.numpy",
                       {"method": "gnvr", "gnvr.method": "ghost",
                        "model.name": "mlp_jnp"}),
}
MODELS = ("mlp", "resnet18")
ONLY_FOR = {"gnvr_ghost_jnp": "mlp"}  # Rows that change the model itself.


class Target(NamedTuple):
  """One of gnp's step-cost targets, and the setting it is stated for."""

  # backend, batch_size (and dtype; "device", a part of the device's name,
  # e.g. "H200") the goal is stated for.
  bound: float
  setting: dict
  throughput: bool = False  # ≥ bound examples/s; else ≤ bound × plain.
  pipelined: bool = False  # A throughput judged on the pipelined rate.


_CPU_MLP = {"backend": "cpu", "batch_size": 100}
_GPU_RESNET = {"backend": "gpu", "batch_size": 128, "dtype": "bfloat16"}
_H200_RESNET = {**_GPU_RESNET, "device": "H200"}
# (model, method) -> its target, or several: the first whose setting matches
# the run's is judged (the H200's, stated for the GPU measured so far, then
# the ones for any GPU).
TARGETS = {
    ("mlp", "gc"): Target(1.1, _CPU_MLP),
    ("mlp", "ngs"): Target(1.1, _CPU_MLP),
    ("mlp", "sam"): Target(2.0, _CPU_MLP),
    ("mlp", "rst"): Target(1.15, _CPU_MLP),
    ("mlp", "gnp"): Target(2.0, _CPU_MLP),
    ("mlp", "gnvr_ghost"): Target(2.0, _CPU_MLP),
    ("mlp", "gvr"): Target(3.0, _CPU_MLP),
    ("mlp", "hessian"): Target(4.5, _CPU_MLP),
    ("mlp", "clip_ghost"): Target(2.2, _CPU_MLP),
    ("resnet18", "plain"): (
        Target(45_000, _H200_RESNET, throughput=True, pipelined=True),
        Target(90_000, {**_H200_RESNET, "batch_size": 512}, throughput=True,
               pipelined=True),
        Target(30_000, _GPU_RESNET, throughput=True)),
    ("resnet18", "sam"): (Target(1.6, _H200_RESNET),
                          Target(2.05, _GPU_RESNET)),
    ("resnet18", "rst"): Target(1.15, _GPU_RESNET),
    ("resnet18", "gnp"): (Target(1.6, _H200_RESNET),
                          Target(2.05, _GPU_RESNET)),
    ("resnet18", "hessian"): Target(4.0, _H200_RESNET),
}


# --- Configs ---------------------------------------------------------------


def base_config(model: str, *, dtype: str = "float32",
                smoke: bool = False) -> ml_collections.ConfigDict:
  """The plain config a model's rows start from."""
  config = config_lib.default_config()  # The mnist1d MLP with AdamW.
  if model == "mlp":  # Now configs/mnist1d.py (a test keeps them equal).
    config.dataset.validation_size = 500
    config.optimizer.weight_decay = 1e-2
    if smoke:
      config.dataset.num_samples = 500
      config.dataset.validation_size = 0
      config.model.hidden = (16, 16)
      config.batch_size = 10
  else:  # resnet18: configs/cifar100_gnp.py on synthetic data.
    config.dataset.name = "synthetic"
    config.dataset.input_shape = (32, 32, 3)
    config.dataset.num_classes = 100
    config.dataset.num_train = 1280
    config.dataset.num_test = 128
    config.augment.crop_padding = 4
    config.augment.flip = True
    config.model.name = "resnet18"
    config.model.dtype = dtype
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.l2 = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.grad_clip = 5.0
    config.batch_size = 128
    config.num_epochs = 200
    if smoke:
      config.dataset.num_train = 64
      config.dataset.num_test = 16
      config.batch_size = 8
  return config


def method_config(base: ml_collections.ConfigDict,
                  method: str) -> ml_collections.ConfigDict:
  """``base`` with the row's overrides (and GVR's two augmented views)."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.update_from_flattened_dict(METHODS[method][1])
  if method == "gvr" and base.model.name == "mlp":
    config.augment.noise_std = 0.1  # mnist1d signals are standardised.
    config.augment.max_shift = 2
  return config


# --- The machine -------------------------------------------------------------


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_revision() -> str | None:
  """HEAD, with "+dirty" when tracked files differ from it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                          capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root,
                           capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict:
  device = jax.local_devices()[0]
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count())
  return {
      "cpu": _cpu_model(), "cpu_cores": cores,
      "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "backend": jax.default_backend(), "device_kind": device.device_kind,
      "device_count": jax.device_count(), "git": _git_revision(),
  }


# --- Timing ------------------------------------------------------------------


class _Runner:
  """One method's experiment, its state threaded through donated steps."""

  def __init__(self, exp, warmup: int, steps_per_dispatch: int = 1):
    self.step_fn = exp.step
    self.state = exp.init()
    self.batch = exp.train_batch(0)  # On the device once, reused every step.
    started = time.perf_counter()
    compiled = exp.step.lower(self.state, self.batch).compile()  # jit reuses.
    self.compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    self.xla_memory_bytes = None if memory is None else int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    for _ in range(warmup + 1):
      self.step()
    # The loop's own path, k steps per dispatch (``steps_per_dispatch``):
    # batches gathered on the device from the resident training split.
    self.steps_per_dispatch = steps_per_dispatch
    self.stretch_times: list[float] = []
    if steps_per_dispatch > 1:
      self.stretch_fn = exp.steps_on_device_data
      self.train_data = exp.train_data()
      self.epoch_indices = exp.epoch_indices(0)
      self.stretch(1)  # Compiles.
    stats = jax.local_devices()[0].memory_stats()  # None on CPU.
    self.device_peak_bytes = (stats or {}).get("peak_bytes_in_use")
    self.times: list[float] = []  # Synchronised steps.
    # RST: per timed step, 1.0 if it took SAM's branch, 0.0 if the plain one.
    self.sam_steps: list[float] = []
    self.last_sam_step = None
    self.burst_times: list[float] = []  # Per-step times of pipelined bursts.

  def step(self) -> float:
    started = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    elapsed = time.perf_counter() - started
    self.last_sam_step = metrics.get("sam_step")  # Read after the clock.
    return elapsed

  def burst(self, steps: int) -> float:
    """Seconds per step of ``steps`` dispatched at once, then one wait: the
    pipelined rate the training loop sees (it reads metrics only when it
    logs), where launch overhead overlaps the previous step's work."""
    started = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - started) / steps


  def stretch(self, stretches: int) -> float:
    """Seconds per step of ``stretches`` dispatches of k steps each (the
    loop's `steps_per_dispatch`), then one wait."""
    started = time.perf_counter()
    for _ in range(stretches):
      self.state, metrics = self.stretch_fn(
          self.state, self.train_data, self.epoch_indices,
          self.steps_per_dispatch)
    jax.block_until_ready((self.state, metrics))
    return ((time.perf_counter() - started)
            / (stretches * self.steps_per_dispatch))


def time_interleaved(runners: dict, *, repeats: int, block: int) -> None:
  """Appends ``repeats`` step times to each runner, methods interleaved."""
  names = list(runners)
  for round_index in range(-(-repeats // block)):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      runner = runners[name]
      for _ in range(min(block, repeats - len(runner.times))):
        runner.times.append(runner.step())
        if runner.last_sam_step is not None:
          runner.sam_steps.append(float(runner.last_sam_step))


def time_pipelined(runners: dict, *, repeats: int, block: int) -> None:
  """Per-step times of bursts of ``block`` steps, methods interleaved, until
  each runner has run ``repeats`` steps in bursts: ``runner.burst_times``."""
  names = list(runners)
  for round_index in range(-(-repeats // block)):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      runner = runners[name]
      steps = min(block, repeats - round_index * block)
      runner.burst_times.append(runner.burst(steps))
      if runner.steps_per_dispatch > 1:
        runner.stretch_times.append(
            runner.stretch(max(1, steps // runner.steps_per_dispatch)))


# --- One model ---------------------------------------------------------------


def bench_model(model: str, methods, *, repeats: int, warmup: int, block: int,
                dtype: str, batch_size: int | None, smoke: bool,
                steps_per_dispatch: int = 1) -> dict:
  """Times ``methods`` on ``model``; returns its section of bench.json."""
  base = base_config(model, dtype=dtype, smoke=smoke)
  if batch_size:
    base.batch_size = batch_size
  dataset = data_lib.load(base.dataset, seed=base.seed)
  runners, refused = {}, {}
  for method in methods:
    try:
      exp = experiment.create_experiment(method_config(base, method), dataset)
      # Compiling traces the step: a model the method cannot handle (ghost
      # norms of a BatchNorm model) is refused there.
      runners[method] = _Runner(exp, warmup, steps_per_dispatch)
    except UserError as e:
      refused[method] = str(e)
      logging.info("%s/%s: n/a (%s)", model, method, e)
      continue
    logging.info("%s/%s: compiled in %.1f s", model, method,
                 runners[method].compile_s)
  started = time.perf_counter()
  time_interleaved(runners, repeats=repeats, block=block)
  time_pipelined(runners, repeats=repeats, block=block)
  logging.info("%s: timed %d steps per method in %.1f s", model, repeats,
               time.perf_counter() - started)

  setting = {"backend": jax.default_backend(),
             "device": jax.devices()[0].device_kind,
             "batch_size": base.batch_size,
             "dtype": base.model.dtype, "smoke": smoke}
  plain = runners.get("plain")
  rows = []
  for method in methods:
    row = {"method": method, "label": METHODS[method][0]}
    if method in refused:
      row.update(status="n/a", reason=refused[method])
    else:
      runner = runners[method]
      times_ms = np.asarray(runner.times) * 1e3
      q25, median, q75 = np.percentile(times_ms, [25, 50, 75])
      row.update(
          status="ok", median_ms=float(median), q25_ms=float(q25),
          q75_ms=float(q75), examples_per_s=base.batch_size / median * 1e3,
          pipelined_ms=float(np.median(runner.burst_times) * 1e3),
          pipelined_examples_per_s=float(
              base.batch_size / np.median(runner.burst_times)),
          burst_ms=[round(float(t) * 1e3, 4) for t in runner.burst_times],
          steps_per_dispatch=runner.steps_per_dispatch,
          ratio=None, ratio_q25=None, ratio_q75=None,
          compile_s=runner.compile_s,
          xla_memory_bytes=runner.xla_memory_bytes,
          device_peak_bytes=runner.device_peak_bytes,
          times_ms=[round(float(t), 4) for t in times_ms],
      )
      if plain is not None and runner.sam_steps:
        # Random per step: the expected cost; no per-round spread (a block
        # of 10 steps at p = 0.1 often has no SAM step).
        row.update(_expected_cost(runner.times, runner.sam_steps,
                                  plain.times, block,
                                  method_config(base, method).sam.probability),
                   sam_steps=runner.sam_steps)
      elif plain is not None:
        row["ratio"] = float(median / (np.median(plain.times) * 1e3))
        # The spread of the ratio: plain and this method in the same round
        # ran seconds apart, so their quotient cancels slow load changes.
        rounds = [np.median(runner.times[i:i + block])
                  / np.median(plain.times[i:i + block])
                  for i in range(0, repeats, block)]
        row["ratio_q25"], row["ratio_q75"] = (
            float(q) for q in np.percentile(rounds, [25, 75]))
    if method not in refused and runner.stretch_times:
      stretch_ms = float(np.median(runner.stretch_times) * 1e3)
      row.update(dispatch_ms=stretch_ms,
                 dispatch_examples_per_s=base.batch_size / stretch_ms * 1e3,
                 stretch_ms=[round(float(t) * 1e3, 4)
                             for t in runner.stretch_times])
    row.update(_judge(model, method, row, setting))
    rows.append(row)
  return {"model": model, "setting": setting, "repeats": repeats,
          "warmup": warmup, "block": block, "rows": rows,
          "config": base.to_dict()}


def _expected_cost(times_s, sam_steps, plain_times_s, block: int,
                   probability: float | None = None) -> dict:
  """RST's expected step cost from its steps and which branch each took.

  With p the probability of a SAM step (None: f, the fraction of timed
  steps that took SAM's branch), the expected time is p × (median SAM-branch
  step) + (1 − p) × (median plain-branch step), and the ratio the same
  mixture of the branches' medians of step / (plain's median in the same
  round), so that slow load changes cancel as in the other rows' per-round
  quotients. If only one branch was timed, its median stands for both.
  """
  times_ms = np.asarray(times_s) * 1e3
  plain_ms = np.asarray(plain_times_s) * 1e3
  rounds = np.arange(len(times_ms)) // block
  relative = times_ms / np.array(
      [np.median(plain_ms[r * block:(r + 1) * block]) for r in rounds])
  took_sam = np.asarray(sam_steps) == 1
  fraction = float(np.mean(took_sam))
  weight = fraction if probability is None else float(probability)

  def mixture(values):
    branch = [float(np.median(values[m])) if m.any() else None
              for m in (took_sam, ~took_sam)]
    if branch[0] is None or branch[1] is None:  # One branch: its median.
      return branch, branch[0] if branch[1] is None else branch[1]
    return branch, branch[0] * weight + branch[1] * (1 - weight)

  (sam_ms, plain_branch_ms), expected_ms = mixture(times_ms)
  _, ratio = mixture(relative)
  return {"sam_probability": weight, "sam_fraction": fraction,
          "sam_branch_ms": sam_ms,
          "plain_branch_ms": plain_branch_ms, "expected_ms": expected_ms,
          "ratio": ratio}


def _judge(model: str, method: str, row: dict, setting: dict) -> dict:
  """The row's target, and whether it was met (None: does not apply)."""
  targets = TARGETS.get((model, method))
  if targets is None:
    return {"target": None, "met": None, "met_note": None}
  if isinstance(targets, Target):
    targets = (targets,)

  def applies(target):
    wanted = {**target.setting, "smoke": False}
    return all(v in setting.get(k, "") if k == "device" else setting[k] == v
               for k, v in wanted.items())

  target = next((t for t in targets if applies(t)), targets[0])
  value = row.get(("pipelined_examples_per_s" if target.pipelined
                   else "examples_per_s") if target.throughput else "ratio")
  met, note = None, None
  if not applies(target):
    note = "stated for " + ", ".join(f"{k}={v}"
                                     for k, v in target.setting.items())
  elif value is None:
    note = row.get("reason") or "not measured"
  else:
    # bool(): the value is often a numpy scalar, whose comparison gives a
    # numpy bool that json cannot write.
    met = bool(value >= target.bound if target.throughput
               else value <= target.bound)
  return {"target": (f"≥ {target.bound:,.0f} ex/s"
                     + (" pipelined" if target.pipelined else "")
                     if target.throughput else f"≤ {target.bound:g}× plain"),
          "met": met, "met_note": note}


# --- Reports -----------------------------------------------------------------


def _bytes(n) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _branch_note(row: dict) -> str:
  ms = lambda v: "none" if v is None else f"{v:.3f} ms"
  return (f"{row['label']}: {row['sam_fraction']:.1%} of its timed steps"
          f" took SAM's branch (median {ms(row['sam_branch_ms'])}), the rest"
          f" the plain one (median {ms(row['plain_branch_ms'])}): at p ="
          f" {row['sam_probability']:g}, an expected"
          f" {row['expected_ms']:.3f} ms. Its × plain is that mixture of the"
          " branches' steps over plain's median in the same round; its"
          " ms/step is the median of all its steps.")


HEADER = ("| method | ms/step (median) | IQR (ms) | examples/s | × plain "
          "| pipelined ms/step | pipelined examples/s "
          "| XLA memory | device peak | target | met? |")


def to_markdown(results: dict) -> str:
  m = results["machine"]
  lines = [
      "# Step cost", "",
      (f"Machine: {m['cpu']}, {m['cpu_cores']} cores; backend {m['backend']}"
       f" ({m['device_kind']} × {m['device_count']}); jax {m['jax']}, jaxlib"
       f" {m['jaxlib']}; gnp {m['git']}."),
      f"Command: `{results['command']}`", "",
  ]
  for section in results["models"]:
    s = section["setting"]
    lines += [
        f"## {section['model']}, batch {s['batch_size']}"
        + (f", {s['dtype']}" if section["model"] != "mlp" else "")
        + (" (smoke)" if s["smoke"] else ""), "",
        (f"{section['repeats']} timed steps per method (after"
         f" {section['warmup']} untimed warm-up steps), interleaved in blocks"
         f" of {section['block']}."), "",
        HEADER,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in section["rows"]:
      target = row["target"] or ""
      met = {True: "yes", False: "**no**", None: ""}[row["met"]]
      if row["met"] is None and row["met_note"]:
        met = f"— ({row['met_note']})"
      if row["status"] != "ok":
        lines.append(
            f"| {row['label']} | n/a | | | | | | | | {target} | {met} |")
        continue
      if row["ratio"] is None:
        ratio = "n/a"
      elif row.get("expected_ms") is not None:
        ratio = f"{row['ratio']:.2f}× (expected)"
      else:
        ratio = (f"{row['ratio']:.2f}× "
                 f"({row['ratio_q25']:.2f}–{row['ratio_q75']:.2f})")
      lines.append(
          f"| {row['label']} | {row['median_ms']:.3f} "
          f"| {row['q25_ms']:.3f}–{row['q75_ms']:.3f} "
          f"| {row['examples_per_s']:,.0f} | {ratio} "
          f"| {row['pipelined_ms']:.3f} "
          f"| {row['pipelined_examples_per_s']:,.0f} "
          f"| {_bytes(row['xla_memory_bytes'])} "
          f"| {_bytes(row['device_peak_bytes'])} | {target} | {met} |")
    notes = [f"{r['label']}: n/a — {r['reason']}" for r in section["rows"]
             if r["status"] != "ok"]
    notes += [_branch_note(r) for r in section["rows"]
              if r.get("expected_ms") is not None]
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    stretched = [r for r in section["rows"] if r.get("dispatch_ms")]
    if stretched:
      k = stretched[0]["steps_per_dispatch"]
      lines += [
          f"{k} steps per dispatch (`steps_per_dispatch={k}`, the loop's"
          " path: batches gathered on the device, one program of k steps),"
          " against the pipelined single steps above:", "",
          "| method | ms/step | examples/s | × pipelined single steps |",
          "|---|---:|---:|---:|",
      ] + [f"| {r['label']} | {r['dispatch_ms']:.3f} "
           f"| {r['dispatch_examples_per_s']:,.0f} "
           f"| {r['dispatch_ms'] / r['pipelined_ms']:.2f}× |"
           for r in stretched] + [""]
  lines += [
      ("- × plain: the quotient of the medians; in brackets the quartiles of"
       " the per-round quotients of block medians."),
      ("- XLA memory: the compiled step's arguments + outputs + temporaries −"
       " donated buffers."),
      ("- Device peak: `peak_bytes_in_use` after the method's warm-up, a"
       " running maximum over the process (methods warm up in table order);"
       " n/a where the backend does not report it."), "",
  ]
  return "\n".join(lines)


def run(*, models=("mlp",), methods=tuple(METHODS), repeats: int = 500,
        warmup: int = 20, block: int = 10, out: str | None = None,
        dtype: str | None = None, batch_size: int | None = None,
        smoke: bool = False, steps_per_dispatch: int = 1,
        command: str = "") -> dict:
  """Benchmarks ``methods`` on each model; writes bench.{json,md} to ``out``.

  ``plain`` is always timed (first), since every ratio is to it.
  """
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise UserError(f"unknown methods {unknown}; choose from"
                    f" {', '.join(METHODS)}.")
  for model in models:
    if model not in MODELS:
      raise UserError(f"unknown model {model!r}; choose from"
                      f" {', '.join(MODELS)}.")
  if min(repeats, block, steps_per_dispatch) < 1 or warmup < 0:
    raise UserError("repeats, block and steps_per_dispatch must be ≥ 1 and"
                    " warmup ≥ 0.")
  methods = ["plain"] + [m for m in METHODS if m in methods and m != "plain"]
  if dtype is None:
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  results = {
      "command": command, "machine": machine(),
      "models": [bench_model(model, [m for m in methods
                                     if ONLY_FOR.get(m, model) == model],
                             repeats=repeats, warmup=warmup, block=block,
                             dtype=dtype, batch_size=batch_size, smoke=smoke,
                             steps_per_dispatch=steps_per_dispatch)
                 for model in models],
  }
  if out:
    write(results, out)
  return results


def _plain(value):
  """``value`` with numpy scalars and arrays turned into Python numbers and
  lists, recursively: what `json` can write."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  return value


def write(results: dict, out: str) -> None:
  """Writes ``out/bench.json`` and ``out/bench.md``, each whole or not at
  all (a failure leaves the previous files, never half of one)."""
  results = _plain(results)
  text = json.dumps(results, indent=1)  # Fails before anything is written.
  markdown = to_markdown(results)
  os.makedirs(out, exist_ok=True)
  write_atomically(os.path.join(out, "bench.json"), text)
  write_atomically(os.path.join(out, "bench.md"), markdown)


# --- Command line ------------------------------------------------------------

_MODELS = flags.DEFINE_list(
    "models", None, f"Models to time ({', '.join(MODELS)}); default: mlp,"
    " plus resnet18 when a GPU is present.")
_METHODS = flags.DEFINE_list(
    "methods", list(METHODS), "Rows to time; plain is always added.")
_REPEATS = flags.DEFINE_integer("repeats", 500, "Timed steps per method.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 20, "Untimed steps per method after compilation.")
_BLOCK = flags.DEFINE_integer(
    "block", 10, "Consecutive steps of one method before the next method.")
_OUT = flags.DEFINE_string("out", None,
                           "Directory for bench.json and bench.md.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "ResNet computation dtype;"
    " default bfloat16 on a GPU, float32 otherwise (the MLP is float32).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Override every model's batch size (targets then do"
    " not apply).")
_STEPS_PER_DISPATCH = flags.DEFINE_integer(
    "steps_per_dispatch", 1, "Also time the training loop's path with this"
    " many steps per dispatch (config.steps_per_dispatch) when > 1: a table"
    " of its per-step time against the pipelined single steps.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny models, data and batches (tests); targets do not"
    " apply. Combine with small --repeats/--warmup.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  writers.quiet_logs()
  models = _MODELS.value or (
      ["mlp", "resnet18"] if jax.default_backend() == "gpu" else ["mlp"])
  logging.info("Devices: %s", jax.local_devices())
  try:
    results = run(models=models, methods=_METHODS.value,
                  repeats=_REPEATS.value, warmup=_WARMUP.value,
                  block=_BLOCK.value, out=_OUT.value, dtype=_DTYPE.value,
                  batch_size=_BATCH_SIZE.value, smoke=_SMOKE.value,
                  steps_per_dispatch=_STEPS_PER_DISPATCH.value,
                  command=" ".join(["python -m gnp.bench", *sys.argv[1:]]))
  except UserError as e:
    raise SystemExit(f"gnp.bench: error: {e}") from None
  print(to_markdown(results))


if __name__ == "__main__":
  app.run(main)
