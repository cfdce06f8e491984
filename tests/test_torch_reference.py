"""benchmarks/torch_resnet18.py: the PyTorch reference for the ResNet-18 rows.

The first tests need no PyTorch (they run wherever gnp's tests run): the
script's command line works with torch unimportable, refuses bad input in
one line, and its step is gnp.bench's resnet18 step (hyper-parameters,
augmentation, architecture, parameter count). The rest import torch and are
skipped without it: the model's size, the augmentation against a
brute-force search of windows, SAM's step against autograd written out, and
a smoke run's artefacts.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "torch_resnet18.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("torch_resnet18", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ref = _load_script()  # Module level needs the standard library only.


def _run_without_torch(*args):
  """The script in a fresh process where ``import torch`` fails."""
  code = ("import runpy, sys; sys.modules['torch'] = None;"
          f" sys.argv = [{SCRIPT!r}, *{list(args)!r}];"
          f" runpy.run_path({SCRIPT!r}, run_name='__main__')")
  return subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=60, cwd=ROOT)


# --- Without torch -----------------------------------------------------------


def test_help_needs_no_torch():
  result = _run_without_torch("--help")
  assert result.returncode == 0, result.stderr
  for flag in ("--batch_size", "--repeats", "--block", "--warmup",
               "--methods", "--device", "--dtype", "--compile", "--smoke",
               "--out"):
    assert flag in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--methods=plain,gnp"], "unknown method 'gnp'"),
    (["--batch_size=0"], "--batch_size must be positive"),
    (["--batch_size=-3"], "--batch_size must be positive"),
    (["--batch_size=many"], "invalid int value"),
    (["--repeats=0"], "--repeats must be positive"),
    (["--warmup=-1"], "--warmup must be ≥ 0"),
    (["--device=tpu"], "invalid choice"),
    (["--dtype=float16"], "invalid choice"),
    (["--compile=sometimes"], "invalid choice"),
    ([], "PyTorch is not installed"),  # Good flags: torch is needed now.
])
def test_bad_input_exits_nonzero_with_one_line(args, message):
  result = _run_without_torch(*args)
  assert result.returncode != 0
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("torch_resnet18.py: error:")
  assert message in lines[0]


def test_parse_args_fills_defaults_and_orders_methods():
  args = ref.parse_args(["--methods=sam"])
  assert args.methods == ["plain", "sam"]  # plain is always timed, first.
  assert (args.batch_size, args.repeats, args.block, args.warmup) == (
      128, 500, 10, 20)
  assert args.compile == "off"
  assert ref.parse_args(["--compile"]).compile == "on"
  smoke = ref.parse_args(["--smoke", "--repeats=3"])
  assert (smoke.batch_size, smoke.repeats) == (8, 3)


def test_config_is_gnp_bench_resnet18():
  pytest.importorskip("jax")
  from gnp import bench

  base = bench.base_config("resnet18", dtype="bfloat16")
  sam = bench.method_config(base, "sam")
  opt, aug = base.optimizer, base.augment
  assert ref.CONFIG == {
      "input_shape": list(base.dataset.input_shape),
      "num_classes": base.dataset.num_classes,
      "batch_size": base.batch_size,
      "stage_sizes": ref.CONFIG["stage_sizes"],  # Checked with the model.
      "num_filters": ref.CONFIG["num_filters"],
      "bn_momentum": ref.CONFIG["bn_momentum"],
      "bn_eps": ref.CONFIG["bn_eps"],
      "learning_rate": opt.learning_rate,
      "momentum": opt.momentum,
      "nesterov": opt.nesterov,
      "l2": opt.l2,
      "weight_decay": opt.weight_decay,
      "grad_clip": opt.grad_clip,
      "crop_padding": aug.crop_padding,
      "flip": aug.flip,
      "sam_rho": sam.sam.rho,
  }
  # What the script does not model must be off in gnp's rows too.
  assert (base.dataset.name, base.model.name, opt.name) == (
      "synthetic", "resnet18", "sgd")
  assert not (opt.centralize or opt.standardize or opt.warmup_epochs)
  assert not (aug.cutout or aug.noise_std or aug.max_shift)
  assert base.grad_accum_steps == 1 and base.method == "plain"
  assert sam.method == "sam" and not sam.sam.adaptive
  assert sam.sam.group_size is None and sam.sam.probability is None
  # The timing defaults are gnp.bench's, and so is the smoke batch.
  assert ref.DEFAULTS == {"batch_size": base.batch_size,
                          "repeats": bench._REPEATS.default,
                          "block": bench._BLOCK.default,
                          "warmup": bench._WARMUP.default}
  assert ref.SMOKE["batch_size"] == bench.base_config(
      "resnet18", smoke=True).batch_size


def test_architecture_is_gnp_resnet18():
  jax = pytest.importorskip("jax")
  import jax.numpy as jnp
  from gnp.models import resnet

  model = resnet.ResNet18(num_classes=100)
  assert list(model.stage_sizes) == ref.CONFIG["stage_sizes"]
  assert model.num_filters == ref.CONFIG["num_filters"]
  bn = resnet.batch_norm(True, jnp.float32)
  assert bn.momentum == pytest.approx(1 - ref.CONFIG["bn_momentum"])
  assert bn.epsilon == ref.CONFIG["bn_eps"]
  for num_classes, expected in ref.NUM_PARAMS.items():
    shapes = jax.eval_shape(resnet.ResNet18(num_classes=num_classes).init,
                            jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    assert count == expected, num_classes


def test_gnp_never_imports_torch():
  for folder, _, files in os.walk(os.path.join(ROOT, "gnp")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name)) as f:
          text = f.read()
        assert "import torch" not in text and "from torch" not in text, name


# --- With torch --------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def test_parameter_count(torch):
  for num_classes, expected in ref.NUM_PARAMS.items():
    model = ref.resnet18(num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_augment_crops_windows_and_flips(torch):
  torch.manual_seed(0)
  x = torch.randn(16, 2, 5, 6)
  padding = 2
  out = ref.augment(x, padding, flip=True)
  assert out.shape == x.shape
  assert out.is_contiguous(memory_format=torch.channels_last)
  padded = torch.nn.functional.pad(x, (padding,) * 4)
  offsets = range(2 * padding + 1)
  flips = []
  for b in range(len(x)):
    found = [(dy, dx, flip) for dy in offsets for dx in offsets
             for flip in (False, True)
             if torch.equal(out[b], (lambda w: w.flip(2) if flip else w)(
                 padded[b, :, dy:dy + 5, dx:dx + 6]))]
    assert found, b  # Every output is a window of the padded input.
    flips.append(found[0][2])
  assert any(flips) and not all(flips)
  assert torch.equal(ref.augment(x, 0, flip=False), x)


def _trainer(torch, method, **config):
  return ref.Trainer(method, device="cpu", dtype=torch.float32, batch_size=4,
                     num_filters=4, config=dict(ref.CONFIG, **config))


def test_sam_with_zero_radius_is_the_plain_step(torch):
  plain, sam = _trainer(torch, "plain"), _trainer(torch, "sam", sam_rho=0.0)
  for trainer in (plain, sam):
    torch.manual_seed(1)  # The same crops and flips.
    for _ in range(2):
      trainer.step()
  sam_state = sam.model.state_dict()
  for name, value in plain.model.state_dict().items():
    if not name.endswith("num_batches_tracked"):  # SAM's counts 2 a step.
      torch.testing.assert_close(value, sam_state[name], rtol=1e-5, atol=1e-6)


def test_sam_step_against_autograd(torch):
  # Clipping at 0.01 so that it acts, L2 large enough to matter, and no
  # augmentation, so that the batch is known.
  trainer = _trainer(torch, "sam", grad_clip=0.01, l2=0.1, crop_padding=0,
                     flip=False)
  cfg, model = trainer.config, copy.deepcopy(trainer.model)
  stats_model = copy.deepcopy(trainer.model)
  names = [n for n, _ in model.named_parameters()]
  theta = [p.detach().clone() for p in trainer.params]

  def loss(params):
    logits = torch.func.functional_call(model, dict(zip(names, params)),
                                        (trainer.x,))
    l2 = sum((p**2).sum() for p in params if p.ndim > 1)
    return (torch.nn.functional.cross_entropy(logits, trainer.y)
            + 0.5 * cfg["l2"] * l2)

  def grad(params):
    params = [p.clone().requires_grad_() for p in params]
    return torch.autograd.grad(loss(params), params)

  g = grad(theta)
  norm = torch.sqrt(sum((x**2).sum() for x in g))
  g_sam = grad([p + cfg["sam_rho"] * x / norm for p, x in zip(theta, g)])
  sam_norm = torch.sqrt(sum((x**2).sum() for x in g_sam))
  clipped = [x * min(1.0, cfg["grad_clip"] / sam_norm) for x in g_sam]
  # Nesterov from a zero buffer: buffer = u, update = u + momentum · buffer.
  expected = [-cfg["learning_rate"] * (1 + cfg["momentum"]) * u
              for u in clipped]
  reported = trainer.step()
  for after, before, want in zip(trainer.params, theta, expected):
    torch.testing.assert_close(after.detach() - before, want, rtol=1e-3,
                               atol=1e-7)
  torch.testing.assert_close(reported, loss(theta).detach())
  stats_model(trainer.x)  # One train-mode pass at θ: its running stats.
  want = dict(stats_model.named_buffers())
  for name, got in trainer.model.named_buffers():
    if "running" in name:  # Not num_batches_tracked, which counts passes.
      torch.testing.assert_close(got, want[name])


@pytest.mark.slow
def test_smoke_run_writes_json_and_markdown(torch, tmp_path):
  ref.main(["--smoke", "--device=cpu", "--batch_size=2", "--repeats=3",
            "--block=2", "--warmup=0", f"--out={tmp_path}"])
  results = json.load(open(tmp_path / "torch_bench.json"))
  markdown = open(tmp_path / "torch_bench.md").read()
  assert results["setting"]["num_params"] == ref.NUM_PARAMS[100]
  assert results["setting"]["batch_size"] == 2
  assert results["machine"]["torch"] == torch.__version__
  rows = results["rows"]
  assert [(r["method"], r["mode"]) for r in rows] == [("plain", "eager"),
                                                      ("sam", "eager")]
  for row in rows:
    assert len(row["times_ms"]) == 3 and len(row["burst_ms"]) == 2
    assert row["q25_ms"] <= row["median_ms"] <= row["q75_ms"]
    assert row["examples_per_s"] == pytest.approx(2e3 / row["median_ms"])
  assert rows[0]["ratio"] == 1.0
  assert "| SAM | eager |" in markdown and "× plain" in markdown
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cuda_requested_without_cuda_is_one_line(torch):
  if torch.cuda.is_available():
    pytest.skip("a CUDA device is present")
  result = subprocess.run([sys.executable, SCRIPT, "--device=cuda"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      "torch_resnet18.py: error: --device=cuda, but torch sees no CUDA"
      " device."]
