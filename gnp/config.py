"""The training config: every key gnp.main understands, and its validation.

`default_config()` holds every key with its default; the experiment files in
``configs/`` start from it and change values, so a key that is not here is a
typo, whether it comes from a config file, from ``--config.a.b=...`` or from a
dict built in a notebook. `validate` checks names, ranges and consistency
before any data is loaded or anything is compiled, and raises `ConfigError`
with one line that names the key.
"""

from __future__ import annotations

import difflib
import functools
import math

import ml_collections
from ml_collections import config_dict

from gnp.errors import ConfigError

METHODS = ("plain", "sam", "gnp", "gnvr", "gvr", "hessian")
MODELS = ("mlp", "cnn", "resnet18", "wide_resnet", "vgg16_bn")
DATASETS = ("mnist1d", "cifar10", "cifar100", "synthetic")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
WARMUP_STRATEGIES = ("none", "lambda", "r", "zero")
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """Every training key with its default: the mnist1d MLP with AdamW."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Initialisation, data order, label noise, augmentation, probes.

  # Data. Which fields matter depends on the dataset's name.
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "mnist1d"
  # Fixes the data (mnist1d generation, validation split, noisy labels)
  # apart from ``seed``; None = ``seed``. Studies fix it so that every trial
  # and seed sees the same data.
  c.dataset.seed = config_dict.placeholder(int)
  c.dataset.validation_size = 0  # Examples held out of train for validation.
  c.dataset.num_samples = 5000  # mnist1d: train + test (80% / 20%).
  c.dataset.label_noise = 0.0  # Fraction of training labels randomised.
  c.dataset.data_dir = config_dict.placeholder(str)  # TFDS: None = default.
  c.dataset.download = True  # TFDS: may download when not prepared.
  c.dataset.input_shape = (40,)  # synthetic
  c.dataset.num_classes = 10  # synthetic
  c.dataset.num_train = 1000  # synthetic
  c.dataset.num_test = 200  # synthetic

  # Augmentation, on the device inside the step; all off = none.
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 0  # Random crop after zero-padding by this many.
  c.augment.flip = False  # Random horizontal flip.
  c.augment.cutout = 0  # Side of the Cutout square; 0 = off.
  c.augment.noise_std = 0.0  # 1-D signals: additive Gaussian noise.
  c.augment.max_shift = 0  # 1-D signals: random shift by up to this many.

  # Model. Which fields matter depends on its name.
  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp"
  c.model.hidden = (256, 256)  # mlp: hidden widths; cnn: conv widths.
  c.model.depth = 28  # wide_resnet
  c.model.width = 10  # wide_resnet
  c.model.dropout_rate = 0.0  # wide_resnet
  c.model.dtype = "float32"  # Computation dtype; parameters stay float32.

  # The regulariser: one method and its hyper-parameters.
  c.method = "plain"
  c.gnp = ml_collections.ConfigDict()
  c.gnp.r = 0.01  # Finite-difference radius.
  c.gnp.alpha = 0.8  # Mixing weight; the penalty strength is λ = α r.
  c.gnp.exact = False  # Hessian-vector product instead of the difference.
  c.gnp.normalize_first = False  # Mix g/‖g‖ instead of g.
  c.gnp.group_size = config_dict.placeholder(int)  # m-sharpness; None = batch.
  c.sam = ml_collections.ConfigDict()
  c.sam.rho = 0.05
  c.sam.group_size = config_dict.placeholder(int)
  c.gnvr = ml_collections.ConfigDict()
  c.gnvr.lam = 0.01
  c.gnvr.ddof = 1
  c.gnvr.method = "auto"  # Per-example norms: auto, ghost or vmap.
  c.gvr = ml_collections.ConfigDict()
  c.gvr.alpha = 0.01
  c.gvr.wrt = config_dict.placeholder(str)  # Regex on param paths; None = last layer.
  c.hessian = ml_collections.ConfigDict()
  c.hessian.lam = 0.001
  c.hessian.num_probes = 1
  # Relax the penalty during the learning-rate warm-up (Zhao et al., 2024):
  # none, lambda (strength ramps from 0), r (radius ramps; gnp, sam) or zero.
  c.regularizer_warmup = "none"

  # Optimiser: loss -> regulariser -> clipping -> optax chain.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3  # Peak learning rate.
  c.optimizer.weight_decay = 0.0  # adamw: decoupled; sgd, adam: added to grads.
  c.optimizer.l2 = 0.0  # (l2 / 2) Σ‖W‖² over kernels, inside the loss.
  c.optimizer.momentum = 0.9  # sgd
  c.optimizer.nesterov = False  # sgd
  c.optimizer.b1 = 0.9  # adam, adamw
  c.optimizer.b2 = 0.999  # adam, adamw
  c.optimizer.schedule = "constant"  # constant, cosine or step.
  c.optimizer.warmup_epochs = 0.0  # Linear warm-up from 0.
  c.optimizer.step_epochs = (60, 120, 160)  # step: epochs where lr drops.
  c.optimizer.step_factor = 0.2  # step: multiplier at each drop.
  c.optimizer.grad_clip = config_dict.placeholder(float)  # Global norm.
  c.optimizer.centralize = False  # Gradient centralisation (GC).
  c.optimizer.standardize = False  # Neuron-wise standardisation (NGS).
  c.optimizer.transforms_conv_only = False  # GC/NGS on conv kernels only.

  # Loop.
  c.batch_size = 100  # Global, over all devices and hosts.
  c.num_epochs = 30
  c.num_steps = config_dict.placeholder(int)  # Stop early (smoke runs).
  c.eval_batch_size = 1000
  c.eval_every_epochs = 1
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  # A NaN or Inf in the loss or the update: "stop" ends the run with the step
  # and the quantity, keeping the last good checkpoint; "skip" leaves the
  # state as it was, moves on to the next batch and counts the step in
  # train/skipped.
  c.on_nonfinite = "stop"
  return c


# Keys a run may change when it resumes from its workdir: how long it trains
# (with a decaying schedule, num_epochs also stretches the schedule), how
# often it logs, evaluates and saves, where the data is, and what a
# non-finite step does. Any other change would continue one run's checkpoint
# as another's, so `gnp.checkpoints.check_workdir` refuses it.
RESUMABLE_KEYS = (
    "num_epochs", "num_steps", "eval_batch_size", "eval_every_epochs",
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "on_nonfinite", "dataset.data_dir", "dataset.download",
)


_IMAGE_DATASETS = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100)}


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks ``config`` in place to a run of seconds that needs no download.

  Image datasets become synthetic data of the same shape and number of
  classes (so the model is the real one); every run stops after a few steps.
  This is what each config's ``:smoke`` variant calls.
  """
  if config.dataset.name in _IMAGE_DATASETS:
    shape, classes = _IMAGE_DATASETS[config.dataset.name]
    config.dataset.name = "synthetic"
    config.dataset.input_shape = shape
    config.dataset.num_classes = classes
    config.dataset.num_train = 64
    config.dataset.num_test = 16
    config.dataset.validation_size = 0
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_steps = 2
    config.log_every_steps = 1
  else:
    config.num_steps = 20
    config.log_every_steps = 10
  return config


def flatten(config, prefix="") -> dict:
  """``{"a.b": value}`` from a ConfigDict or a nested dict."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def differences(a, b, ignore=()) -> dict[str, tuple]:
  """``{dotted key: (value in a, value in b)}`` where two configs differ.

  ``a`` and ``b`` are ConfigDicts or nested dicts; a key only one of them
  has is None in the other. Keys in ``ignore`` are left out; the rest come
  sorted.
  """
  a, b = flatten(a), flatten(b)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
          if a.get(k) != b.get(k) and k not in ignore}


def _fail(message: str):
  raise ConfigError(message)


def _check(condition: bool, message: str):
  if not condition:
    _fail(message)


def _one_of(name: str, value, choices):
  _check(
      value in choices,
      f"{name}={value!r} is unknown; choose one of: {', '.join(choices)}.",
  )


def _nonnegative(name: str, value, *, strict=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and math.isfinite(value) and (value > 0 if strict else value >= 0)
  _check(ok, f"{name} must be finite and {'> 0' if strict else '≥ 0'}, "
         f"got {name}={value!r}.")


def _positive_int(name: str, value, *, allow_none=False):
  if value is None and allow_none:
    return
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
  _check(ok, f"{name} must be a positive integer, got {name}={value!r}.")


@functools.cache
def _known_keys() -> tuple[str, ...]:
  return tuple(flatten(default_config()))


def check_key(key: str) -> None:
  """Raises `ConfigError` if ``key`` ("a.b") is not a config key."""
  known = _known_keys()
  sections = {k.rsplit(".", 1)[0] for k in known if "." in k}
  if key not in known and key not in sections:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}.")


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1) -> None:
  """Raises `ConfigError` for the first thing wrong with ``config``.

  Checks what can be checked without data or compilation: unknown keys (with
  the closest known key), names, ranges, and divisibility of the batch by the
  device count and the m-sharpness group. The dataset checks its own fields
  (sizes, label noise) when it loads, still before compilation.
  """
  known = _known_keys()
  given = flatten(config)
  for key in given:
    check_key(key)
  for key in known:
    _check(key in given, f"config key {key!r} is missing.")

  _one_of("method", config.method, METHODS)
  _one_of("model.name", config.model.name, MODELS)
  _one_of("model.dtype", config.model.dtype, DTYPES)
  _one_of("dataset.name", config.dataset.name, DATASETS)
  _one_of("optimizer.name", config.optimizer.name, OPTIMIZERS)
  _one_of("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
  _one_of("regularizer_warmup", config.regularizer_warmup, WARMUP_STRATEGIES)
  _one_of("gnvr.method", config.gnvr.method, ("auto", "ghost", "vmap"))
  _one_of("on_nonfinite", config.on_nonfinite, ("stop", "skip"))

  opt = config.optimizer
  for name in ("learning_rate", "weight_decay", "l2", "momentum",
               "warmup_epochs", "step_factor"):
    _nonnegative(f"optimizer.{name}", opt[name])
  if opt.grad_clip is not None:
    _nonnegative("optimizer.grad_clip", opt.grad_clip, strict=True)
  for name in ("b1", "b2"):
    _check(0 <= opt[name] < 1,
           f"optimizer.{name} must be in [0, 1), got {opt[name]!r}.")

  for name in ("gnp.r", "gnp.alpha", "sam.rho", "gnvr.lam", "gvr.alpha",
               "hessian.lam"):
    section, field = name.split(".")
    _nonnegative(name, config[section][field])
  _check(not (config.gnp.exact and config.gnp.normalize_first),
         "gnp.exact and gnp.normalize_first cannot both be set.")
  _positive_int("hessian.num_probes", config.hessian.num_probes)
  _check(isinstance(config.gnvr.ddof, int) and 0 <= config.gnvr.ddof,
         f"gnvr.ddof must be a non-negative integer, got {config.gnvr.ddof!r}.")
  if config.regularizer_warmup == "r":
    _check(config.method in ("gnp", "sam"),
           "regularizer_warmup='r' ramps a radius: it applies to gnp and sam,"
           f" not method={config.method!r}.")
  if config.regularizer_warmup != "none":
    _check(config.method != "plain",
           "regularizer_warmup needs a regulariser; method='plain' has none.")
    _check(opt.warmup_epochs > 0,
           f"regularizer_warmup={config.regularizer_warmup!r} needs "
           "optimizer.warmup_epochs > 0.")

  if config.model.name in ("mlp", "cnn"):
    hidden = config.model.hidden
    _check(isinstance(hidden, (tuple, list)) and len(hidden) > 0
           and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                   for w in hidden),
           "model.hidden must be a non-empty tuple of positive integers (the"
           f" hidden widths), got {hidden!r}.")

  _positive_int("batch_size", config.batch_size)
  _positive_int("num_epochs", config.num_epochs)
  _positive_int("num_steps", config.num_steps, allow_none=True)
  for name in ("eval_batch_size", "eval_every_epochs", "log_every_steps",
               "checkpoint_every_steps", "keep_checkpoints"):
    _positive_int(name, config[name])
  _check(
      config.batch_size % num_devices == 0,
      f"batch_size={config.batch_size} is not divisible by the device count"
      f" {num_devices}.",
  )
  group_size = {"gnp": config.gnp.group_size, "sam": config.sam.group_size}
  group_size = group_size.get(config.method)
  if group_size is not None:
    section = config.method
    _positive_int(f"{section}.group_size", group_size)
    _check(
        config.batch_size % group_size == 0,
        f"{section}.group_size={group_size} does not divide"
        f" batch_size={config.batch_size}.",
    )

  data = config.dataset
  _check(isinstance(data.validation_size, int) and data.validation_size >= 0,
         "dataset.validation_size must be a non-negative integer, got "
         f"{data.validation_size!r}.")
  aug = config.augment
  for name in ("crop_padding", "cutout", "max_shift"):
    _check(isinstance(aug[name], int) and aug[name] >= 0,
           f"augment.{name} must be a non-negative integer, got {aug[name]!r}.")
  _nonnegative("augment.noise_std", aug.noise_std)
  if config.method == "gvr":
    _check(
        any((aug.crop_padding, aug.flip, aug.cutout, aug.noise_std,
             aug.max_shift)),
        "method='gvr' compares two augmented views; configure augment.*.",
    )
