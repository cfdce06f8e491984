"""PyTorch reference for gnp's ResNet-18 step cost.

    python benchmarks/torch_resnet18.py --out=runs/torch_bench
    python benchmarks/torch_resnet18.py --compile=both --out=runs/torch_bench
    python benchmarks/torch_resnet18.py --smoke --device=cpu --out=/tmp/torch

The same training step as the resnet18 rows of ``python -m gnp.bench
--models=resnet18 --dtype=bfloat16``, written in PyTorch, timed the same
way, so that gnp's numbers on a GPU can be read against what PyTorch does
with the same model on the same machine. Only this script imports torch;
gnp does not depend on it.

The step (`CONFIG`; tests/test_torch_reference.py keeps it equal to
`gnp.bench.base_config("resnet18")` and the SAM row of `gnp.bench.METHODS`):
CIFAR ResNet-18 (3×3 stem at stride 1, no max-pool, BasicBlocks [2, 2, 2, 2],
convolutions without bias, BatchNorm momentum 0.1 and ε 1e-5; 11,220,132
parameters for 100 classes) in channels_last, bfloat16 autocast on float32
parameters; one fixed batch of 128 synthetic 32×32×3 inputs with 100
classes, already on the device, augmented there on every step (random crop
from the input zero-padded by 4, horizontal flip); mean cross-entropy plus
½ · l2 · ‖kernels‖² (l2 = 1e-3; kernels are the parameters with more than
one dimension, as in `gnp.step.make_loss_fn`), whose gradient l2 · θ is
added to the kernels' gradients directly, which is what differentiating the
term gives; the update clipped to global norm 5, then SGD with Nesterov
momentum 0.9 and learning rate 0.1. SAM (ρ = 0.05) takes the gradient g of
that loss, steps to θ + ρ g/‖g‖ (every parameter, as `gnp.penalties.sam`),
takes the gradient there and restores θ; the running BatchNorm statistics
keep the update of the pass at θ only, as gnp's do.

What gnp's step does that this one does not: the cosine schedule (a scalar
per step), the metrics (‖update‖, ‖θ'‖) and the refusal of a non-finite
update. They cost gnp little inside one XLA program; in eager PyTorch they
would be a few more kernel launches.

Timing, as `gnp.bench`: each row's steps are synchronised one by one
(`torch.cuda.synchronize` after each step), rows interleaved in blocks of
``--block`` steps with the order rotating from round to round, the median
over ``--repeats`` steps reported with its quartiles, × plain as the
quotient of medians of the same mode (eager or compiled). The pipelined
columns time bursts of ``--block`` steps dispatched at once with one
synchronisation at the end. ``--compile`` wraps each step in
`torch.compile` (the backward pass is a graph break, so the forward and
backward are compiled by AOTAutograd and the update separately);
``--compile=both`` times eager and compiled rows together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# The step gnp.bench times for resnet18 (its names in comments).
CONFIG = {
    "input_shape": [32, 32, 3],  # dataset.input_shape, synthetic
    "num_classes": 100,  # dataset.num_classes
    "batch_size": 128,  # batch_size
    "stage_sizes": [2, 2, 2, 2],  # gnp.models.resnet.ResNet18
    "num_filters": 64,
    "bn_momentum": 0.1,  # PyTorch's; 0.9 in flax
    "bn_eps": 1e-5,
    "learning_rate": 0.1,  # optimizer.*
    "momentum": 0.9,
    "nesterov": True,
    "l2": 1e-3,
    "weight_decay": 0.0,
    "grad_clip": 5.0,
    "crop_padding": 4,  # augment.*
    "flip": True,
    "sam_rho": 0.05,  # sam.rho, the SAM row
}
NUM_PARAMS = {10: 11_173_962, 100: 11_220_132}  # ResNet-18, by num_classes.
METHODS = {"plain": "plain", "sam": "SAM"}
SMOKE = {"batch_size": 8, "repeats": 4, "block": 2, "warmup": 1}
DEFAULTS = {"batch_size": CONFIG["batch_size"], "repeats": 500, "block": 10,
            "warmup": 20}
PROG = "torch_resnet18.py"


class _Parser(argparse.ArgumentParser):

  def error(self, message):  # One line, not argparse's usage block.
    self.exit(2, f"{PROG}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, checked; a bad value exits with one line."""
  p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default="plain,sam",
                 help="Rows, comma-separated: plain, sam (plain is added).")
  p.add_argument("--batch_size", type=int, help="Default 128 (8 with --smoke).")
  p.add_argument("--repeats", type=int, help="Timed steps per row (500).")
  p.add_argument("--block", type=int,
                 help="Steps of one row before the next, and burst size (10).")
  p.add_argument("--warmup", type=int, help="Untimed steps per row (20).")
  p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
  p.add_argument("--dtype", choices=["bfloat16", "float32"],
                 help="Autocast dtype; default bfloat16 on CUDA, else float32.")
  p.add_argument("--compile", nargs="?", const="on", default="off",
                 choices=["off", "on", "both"],
                 help="torch.compile the step: on (bare --compile), or both"
                 " eager and compiled rows.")
  p.add_argument("--compile_mode", default="default",
                 choices=["default", "reduce-overhead", "max-autotune"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true",
                 help="Batch 8 and a few steps: a quick check on a CPU.")
  p.add_argument("--out", help="Directory for torch_bench.{json,md}.")
  args = p.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    p.error(f"unknown method {unknown[0]!r}; choose from"
            f" {', '.join(METHODS)}.")
  args.methods = ["plain"] + [m for m in METHODS
                              if m in args.methods and m != "plain"]
  for name, value in (SMOKE if args.smoke else DEFAULTS).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("batch_size", "repeats", "block"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be positive, got {getattr(args, name)}.")
  if args.warmup < 0:
    p.error(f"--warmup must be ≥ 0, got {args.warmup}.")
  return args


# --- The model, the augmentation and the steps -------------------------------


def resnet18(num_classes: int = 100, num_filters: int = 64):
  """CIFAR ResNet-18 as `gnp.models.resnet.ResNet18`, with its initialisers:
  Kaiming-normal fan-out convolutions, a LeCun-normal (truncated) head."""
  import torch
  from torch import nn

  def bn(c):
    return nn.BatchNorm2d(c, eps=CONFIG["bn_eps"],
                          momentum=CONFIG["bn_momentum"])

  def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)

  class BasicBlock(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv(cin, cout, 3, stride), bn(cout)
      self.conv2, self.bn2 = conv(cout, cout, 3), bn(cout)
      self.proj = (nn.Sequential(conv(cin, cout, 1, stride), bn(cout))
                   if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.proj(x))

  layers = [conv(3, num_filters, 3), bn(num_filters), nn.ReLU()]
  cin = num_filters
  for i, blocks in enumerate(CONFIG["stage_sizes"]):
    for j in range(blocks):
      cout = num_filters * 2**i
      layers.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  model = nn.Sequential(*layers)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.Linear):  # flax's lecun_normal: unit variance.
      std = (1 / m.in_features)**0.5 / .87962566103423978
      nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
      nn.init.zeros_(m.bias)
  count = sum(p.numel() for p in model.parameters())
  expected = NUM_PARAMS.get(num_classes) if num_filters == 64 else None
  if expected is not None and count != expected:
    raise RuntimeError(f"ResNet-18 has {count:,} parameters for {num_classes}"
                       f" classes, not gnp's {expected:,}.")
  return model


def augment(x, padding: int, flip: bool):
  """Per-example random crop from ``x`` zero-padded by ``padding`` (offsets
  uniform in [0, 2 · padding]) then a horizontal flip with probability ½,
  as `gnp.data.augment`; [B, C, H, W] in and out, channels_last out."""
  import torch
  b, _, h, w = x.shape
  if padding:
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), device=x.device)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put their axes first: [B, H, W, C].
    x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
  if flip:
    mirror = torch.rand(b, device=x.device) < 0.5
    x = torch.where(mirror[:, None, None, None], x.flip(3), x)
  return x.contiguous(memory_format=torch.channels_last)


def _global_norm(tensors):
  import torch
  return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class Trainer:
  """A model, its optimiser and one fixed batch; `step` is one update."""

  def __init__(self, method: str, *, device, dtype, batch_size: int,
               seed: int = 0, compile_mode: str | None = None,
               num_filters: int = 64, config: dict = CONFIG):
    import torch
    self.config, self.device = config, torch.device(device)
    torch.manual_seed(seed)
    self.model = resnet18(config["num_classes"], num_filters).to(
        self.device, memory_format=torch.channels_last)
    self.params = list(self.model.parameters())
    self.kernels = [p for p in self.params if p.ndim > 1]  # L2's mask.
    self.running_stats = [b for n, b in self.model.named_buffers()
                          if n.endswith(("running_mean", "running_var"))]
    self.saved_stats = [torch.empty_like(b) for b in self.running_stats]
    self.optimizer = torch.optim.SGD(
        self.params, lr=config["learning_rate"], momentum=config["momentum"],
        nesterov=config["nesterov"], weight_decay=config["weight_decay"])
    h, w, c = config["input_shape"]
    generator = torch.Generator().manual_seed(seed)
    self.x = torch.randn(batch_size, c, h, w, generator=generator).to(
        self.device, memory_format=torch.channels_last)
    self.y = torch.randint(0, config["num_classes"], (batch_size,),
                           generator=generator).to(self.device)
    self.dtype = dtype
    step = {"plain": self.plain_step, "sam": self.sam_step}[method]
    self.step = step if compile_mode is None else torch.compile(
        step, mode=compile_mode)

  def _loss_and_grads(self, x):
    """Backward of the task loss into ``.grad``, plus L2's gradient; returns
    the loss with the L2 term."""
    import torch
    for p in self.params:  # zero_grad(set_to_none=True), which dynamo skips.
      p.grad = None
    with torch.autocast(self.device.type, dtype=self.dtype,
                        enabled=self.dtype != torch.float32):
      logits = self.model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), self.y)
    loss.backward()
    l2 = self.config["l2"]
    with torch.no_grad():
      # d/dθ ½ l2 ‖θ_K‖² = l2 θ_K, without a graph through 21 kernels.
      torch._foreach_add_([p.grad for p in self.kernels], self.kernels,
                          alpha=l2)
      return loss.detach() + 0.5 * l2 * _global_norm(self.kernels)**2

  def _update(self):
    import torch
    # optax.clip_by_global_norm but for the 1e-6 PyTorch adds to the norm.
    torch.nn.utils.clip_grad_norm_(self.params, self.config["grad_clip"])
    self.optimizer.step()

  def _batch(self):
    return augment(self.x, self.config["crop_padding"], self.config["flip"])

  def plain_step(self):
    loss = self._loss_and_grads(self._batch())
    self._update()
    return loss

  def sam_step(self):
    """The gradient at θ + ρ g/‖g‖ (at θ if g = 0), both passes on one batch."""
    import torch
    x = self._batch()
    loss = self._loss_and_grads(x)
    with torch.no_grad():
      grads = [p.grad for p in self.params]
      norm = _global_norm(grads)
      scale = torch.where(norm > 0, self.config["sam_rho"] / norm, 0.0)
      shift = torch._foreach_mul(grads, scale)
      torch._foreach_add_(self.params, shift)
      torch._foreach_copy_(self.saved_stats, self.running_stats)
    self._loss_and_grads(x)
    with torch.no_grad():
      torch._foreach_sub_(self.params, shift)
      # The running statistics keep the update of θ's pass only.
      torch._foreach_copy_(self.running_stats, self.saved_stats)
    self._update()
    return loss


# --- Timing, as gnp.bench ----------------------------------------------------


class Runner:
  """One row: a trainer, its synchronised and pipelined step times."""

  def __init__(self, trainer: Trainer, warmup: int):
    self.trainer = trainer
    self.first_step_s = self.step()  # Includes compilation if compiled.
    for _ in range(warmup):
      self.step()
    self.device_peak_bytes = _peak_bytes(trainer.device)
    self.times: list[float] = []
    self.burst_times: list[float] = []

  def _sync(self):
    import torch
    if self.trainer.device.type == "cuda":
      torch.cuda.synchronize(self.trainer.device)

  def step(self) -> float:
    started = time.perf_counter()
    self.trainer.step()
    self._sync()
    return time.perf_counter() - started

  def burst(self, steps: int) -> float:
    """Seconds per step of ``steps`` dispatched at once, then one wait."""
    started = time.perf_counter()
    for _ in range(steps):
      self.trainer.step()
    self._sync()
    return (time.perf_counter() - started) / steps


def _peak_bytes(device):
  import torch
  if device.type != "cuda":
    return None
  return int(torch.cuda.max_memory_allocated(device))


def time_interleaved(runners: dict, *, repeats: int, block: int) -> None:
  names = list(runners)
  for round_index in range(-(-repeats // block)):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      runner = runners[name]
      for _ in range(min(block, repeats - len(runner.times))):
        runner.times.append(runner.step())


def time_pipelined(runners: dict, *, repeats: int, block: int) -> None:
  names = list(runners)
  for round_index in range(-(-repeats // block)):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      runners[name].burst_times.append(
          runners[name].burst(min(block, repeats - round_index * block)))


def _quartiles(values):
  if len(values) == 1:
    return values[0], values[0], values[0]
  q25, median, q75 = statistics.quantiles(values, n=4, method="inclusive")
  return q25, median, q75


def summarise(runners: dict, *, batch_size: int, block: int) -> list[dict]:
  """One row per runner, × plain against plain of the same mode."""
  rows = []
  for (method, mode), runner in runners.items():
    times_ms = [t * 1e3 for t in runner.times]
    q25, median, q75 = _quartiles(times_ms)
    pipelined = statistics.median(runner.burst_times)
    row = {"method": method, "label": METHODS[method], "mode": mode,
           "median_ms": median, "q25_ms": q25, "q75_ms": q75,
           "examples_per_s": batch_size / median * 1e3,
           "pipelined_ms": pipelined * 1e3,
           "pipelined_examples_per_s": batch_size / pipelined,
           "first_step_s": runner.first_step_s,
           "device_peak_bytes": runner.device_peak_bytes,
           "times_ms": [round(t, 4) for t in times_ms],
           "burst_ms": [round(t * 1e3, 4) for t in runner.burst_times]}
    plain = runners[("plain", mode)].times
    row["ratio"] = median / (statistics.median(plain) * 1e3)
    rounds = [statistics.median(runner.times[i:i + block])
              / statistics.median(plain[i:i + block])
              for i in range(0, len(plain), block)]
    row["ratio_q25"], _, row["ratio_q75"] = _quartiles(rounds)
    rows.append(row)
  return rows


# --- Reports -----------------------------------------------------------------


def machine(device) -> dict:
  import torch
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f
                  if l.startswith("model name")), cpu)
  except OSError:
    pass
  try:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                         cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, check=True
                         ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    git = None
  cuda = device.type == "cuda"
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count())
  return {"cpu": cpu, "cpu_cores": cores,
          "python": platform.python_version(), "torch": torch.__version__,
          "cuda": torch.version.cuda,
          "cudnn": torch.backends.cudnn.version() if cuda else None,
          "device": device.type,
          "gpu": torch.cuda.get_device_name(device) if cuda else None,
          "git": git}


def to_markdown(results: dict) -> str:
  m, s = results["machine"], results["setting"]
  lines = [
      "# Step cost, PyTorch reference", "",
      (f"Machine: {m['gpu'] or 'no GPU'}; {m['cpu']}, {m['cpu_cores']}"
       f" cores; steps on {m['device']}; torch {m['torch']} (CUDA {m['cuda']}"
       + (f", cuDNN {m['cudnn']}" if m["cudnn"] else "")
       + f"); python {m['python']}; gnp {m['git']}."),
      f"Command: `{results['command']}`", "",
      (f"ResNet-18, batch {s['batch_size']}, {s['dtype']}"
       + (" (smoke)" if s["smoke"] else "") + f": {s['repeats']} timed"
       f" steps per row (after its first step and {s['warmup']} warm-up"
       f" steps, untimed), interleaved in blocks of {s['block']}; pipelined:"
       f" bursts of {s['block']} steps, one synchronisation each."), "",
      ("| method | mode | ms/step (median) | IQR (ms) | examples/s | × plain "
       "| pipelined ms/step | pipelined examples/s | device peak |"),
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["rows"]:
    peak = ("n/a" if r["device_peak_bytes"] is None
            else f"{r['device_peak_bytes'] / 2**20:.1f} MiB")
    lines.append(
        f"| {r['label']} | {r['mode']} | {r['median_ms']:.3f} "
        f"| {r['q25_ms']:.3f}–{r['q75_ms']:.3f} | {r['examples_per_s']:,.0f} "
        f"| {r['ratio']:.2f}× ({r['ratio_q25']:.2f}–{r['ratio_q75']:.2f}) "
        f"| {r['pipelined_ms']:.3f} | {r['pipelined_examples_per_s']:,.0f} "
        f"| {peak} |")
  lines += ["", ("- × plain: the quotient of medians against plain in the"
                 " same mode; in brackets the quartiles of the per-round"
                 " quotients of block medians."), ""]
  return "\n".join(lines)


def _write_atomically(path: str, text: str) -> None:
  """``text`` to ``path`` whole or not at all: a temporary file, renamed."""
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write(results: dict, out: str) -> None:
  """``out/torch_bench.json`` and ``out/torch_bench.md``, each whole."""
  text = json.dumps(results, indent=1)  # Fails before anything is written.
  os.makedirs(out, exist_ok=True)
  _write_atomically(os.path.join(out, "torch_bench.json"), text)
  _write_atomically(os.path.join(out, "torch_bench.md"), to_markdown(results))


# --- The run -----------------------------------------------------------------


def run(args: argparse.Namespace, command: str = "") -> dict:
  import torch
  if args.device == "cuda" and not torch.cuda.is_available():
    raise SystemExit(f"{PROG}: error: --device=cuda, but torch sees no CUDA"
                     " device.")
  if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  device = torch.device(args.device)
  dtype_name = args.dtype or ("bfloat16" if device.type == "cuda"
                              else "float32")
  dtype = getattr(torch, dtype_name)
  torch.backends.cudnn.benchmark = True  # One input shape throughout.
  modes = {"off": ["eager"], "on": ["compiled"],
           "both": ["eager", "compiled"]}[args.compile]
  runners = {}
  for mode in modes:
    for method in args.methods:
      trainer = Trainer(method, device=device, dtype=dtype,
                        batch_size=args.batch_size, seed=args.seed,
                        compile_mode=(args.compile_mode if mode == "compiled"
                                      else None))
      runners[(method, mode)] = Runner(trainer, args.warmup)
  count = sum(p.numel() for p in runners[("plain", modes[0])].trainer.params)
  time_interleaved(runners, repeats=args.repeats, block=args.block)
  time_pipelined(runners, repeats=args.repeats, block=args.block)
  return {
      "command": command, "machine": machine(device),
      "setting": {"device": device.type, "dtype": dtype_name,
                  "batch_size": args.batch_size, "repeats": args.repeats,
                  "warmup": args.warmup, "block": args.block,
                  "compile": args.compile, "compile_mode": args.compile_mode,
                  "smoke": args.smoke, "num_params": count},
      "config": dict(CONFIG, batch_size=args.batch_size),
      "rows": summarise(runners, batch_size=args.batch_size,
                        block=args.block),
  }


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  try:
    import torch  # noqa: F401  Only now: --help and bad flags need no torch.
  except ImportError:
    raise SystemExit(f"{PROG}: error: PyTorch is not installed (pip install"
                     " torch).") from None
  results = run(args, command=" ".join(["python benchmarks/torch_resnet18.py",
                                        *argv]))
  if args.out:
    write(results, args.out)
  print(to_markdown(results))


if __name__ == "__main__":
  main()
