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
import numbers
import re

import ml_collections
from ml_collections import config_dict

from gnp.errors import ConfigError

METHODS = ("plain", "sam", "gnp", "gnvr", "gvr", "hessian", "clip")
MODELS = ("mlp", "cnn", "resnet18", "wide_resnet", "vgg16_bn", "mlp_jnp")
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
  c.dataset.name = "mnist1d"  # mnist1d, cifar10, cifar100 or synthetic.
  # Fixes the data (mnist1d generation, validation split, noisy labels)
  # apart from ``seed``; None = ``seed``. Studies fix it so that every trial
  # and seed sees the same data.
  c.dataset.seed = config_dict.placeholder(int)
  c.dataset.validation_size = 0  # Examples held out of train for validation.
  c.dataset.num_samples = 5000  # mnist1d: train + test (80% / 20%).
  c.dataset.label_noise = 0.0  # Fraction of training labels randomised.
  c.dataset.data_dir = config_dict.placeholder(str)  # TFDS: None = default.
  c.dataset.download = True  # TFDS: may download when not prepared.
  c.dataset.input_shape = (40,)  # synthetic: the shape of one input.
  c.dataset.num_classes = 10  # synthetic: the number of classes.
  c.dataset.num_train = 1000  # synthetic: training examples.
  c.dataset.num_test = 200  # synthetic: test examples.

  # Augmentation, on the device inside the step; all off = none.
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 0  # Random crop after zero-padding by this many.
  c.augment.flip = False  # Random horizontal flip.
  c.augment.cutout = 0  # Side of the Cutout square; 0 = off.
  c.augment.noise_std = 0.0  # 1-D signals: additive Gaussian noise.
  c.augment.max_shift = 0  # 1-D signals: random shift by up to this many.

  # Model. Which fields matter depends on its name.
  c.model = ml_collections.ConfigDict()
  # mlp, cnn, resnet18, wide_resnet, vgg16_bn or mlp_jnp (the mlp written
  # in plain jax.numpy).
  c.model.name = "mlp"
  c.model.hidden = (256, 256)  # mlp(_jnp): hidden widths; cnn: conv widths.
  c.model.depth = 28  # wide_resnet: 6n + 4 layers.
  c.model.width = 10  # wide_resnet: the widening factor.
  c.model.dropout_rate = 0.0  # wide_resnet: dropout in each block.
  c.model.dtype = "float32"  # Computation dtype; parameters stay float32.

  # The regulariser: one method and its hyper-parameters.
  c.method = "plain"
  c.gnp = ml_collections.ConfigDict()
  c.gnp.r = 0.01  # Finite-difference radius.
  c.gnp.alpha = 0.8  # Mixing weight; the penalty strength is λ = α r.
  c.gnp.exact = False  # Hessian-vector product instead of the difference.
  c.gnp.normalize_first = False  # Mix g/‖g‖ instead of g.
  c.gnp.group_size = config_dict.placeholder(int)  # m-sharpness; None = batch.
  # ASAM's geometry (Kwon et al., 2021): perturb along T²g/‖Tg‖ with
  # T = |θ| + eta elementwise; the penalty becomes ‖T ⊙ ∇L‖.
  c.gnp.adaptive = False
  c.gnp.eta = 0.01  # η, T's floor; only with adaptive.
  c.sam = ml_collections.ConfigDict()
  c.sam.rho = 0.05  # The ascent radius ρ (ASAM's are larger: 0.5, 1.0).
  c.sam.group_size = config_dict.placeholder(int)  # m-sharpness; None = batch.
  c.sam.adaptive = False  # ASAM: ε = ρ T²g/‖Tg‖, T = |θ| + eta.
  c.sam.eta = 0.01  # η, T's floor; only with adaptive.
  # RST (Zhao et al., 2022): each step is a SAM step with this probability
  # and a plain step otherwise; expected cost 1 + p (SAM/plain − 1) plain
  # steps. None = SAM on every step.
  c.sam.probability = config_dict.placeholder(float)
  c.gnvr = ml_collections.ConfigDict()
  c.gnvr.lam = 0.01  # λ: weight of the per-example gradient-norm variance.
  c.gnvr.ddof = 1  # The variance divides by batch_size - ddof.
  c.gnvr.method = "auto"  # Per-example norms: auto, ghost or vmap.
  c.gvr = ml_collections.ConfigDict()
  c.gvr.alpha = 0.01  # α: weight of ‖∇L(view 1) − ∇L(view 2)‖².
  c.gvr.wrt = config_dict.placeholder(str)  # Regex on param paths; None = last layer.
  c.hessian = ml_collections.ConfigDict()
  c.hessian.lam = 0.001  # λ: weight of the Hutchinson estimate of ‖H‖_F².
  c.hessian.num_probes = 1  # Rademacher probes per step.
  # Per-example gradient clipping: (1/B) Σ min(1, τ/‖∇ℓ_i‖) ∇ℓ_i. Set
  # exactly one threshold, max_norm (a fixed τ) or outlier_mads (τ = median +
  # k · 1.4826 · MAD of the batch's per-example gradient norms; e.g. 3). Not
  # optimizer.grad_clip, which clips the batch's update.
  c.clip = ml_collections.ConfigDict()
  # A fixed threshold τ > 0 on each example's gradient norm (or outlier_mads).
  c.clip.max_norm = config_dict.placeholder(float)
  # k ≥ 0 for τ = median + k · 1.4826 · MAD of the batch's per-example
  # gradient norms, e.g. 3 (or max_norm).
  c.clip.outlier_mads = config_dict.placeholder(float)
  c.clip.method = "auto"  # Per-example norms: auto, ghost or vmap.
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
  # Gradient accumulation: each step runs batch_size / grad_accum_steps
  # examples at a time (on each device, its share), one microbatch after
  # another, and takes the whole batch's step, to rounding, for every method
  # (gnp.penalties.accumulation), in less memory; it must divide each
  # device's share of the batch. It changes two things: dropout masks are
  # drawn per microbatch, and batch normalisation normalises each microbatch
  # with its own statistics, the running ones averaging the microbatches'.
  c.grad_accum_steps = 1
  c.num_epochs = 30  # Passes over the training split.
  c.num_steps = config_dict.placeholder(int)  # Stop early (smoke runs).
  c.eval_batch_size = 1000  # Evaluation is exact whatever its size.
  c.eval_every_epochs = 1  # Validation and test evaluation.
  c.log_every_steps = 100  # Progress line and metrics.jsonl record.
  c.checkpoint_every_steps = 1000  # And at the end, and on SIGTERM.
  # Training steps the loop dispatches at once, as one program (lax.scan):
  # the same steps, less dispatch and launch overhead per step. The loop
  # still stops at every log, epoch and checkpoint step (a stretch shorter
  # than this runs step by step), so take a divisor of log_every_steps and
  # of the steps per epoch; a signal is answered after the running stretch.
  c.steps_per_dispatch = 1
  c.keep_checkpoints = 2  # The last this many are kept.
  # A NaN or Inf in the loss or the update: "stop" ends the run with the step
  # and the quantity, keeping the last good checkpoint; "skip" leaves the
  # state as it was, moves on to the next batch and counts the step in
  # train/skipped.
  c.on_nonfinite = "stop"
  return c


# Keys a run may change when it resumes from its workdir: how long it trains
# (with a decaying schedule, num_epochs also stretches the schedule), how
# often it logs, evaluates and saves, how many steps it dispatches at once,
# where the data is, and what a non-finite step does. Any other change would continue one run's checkpoint
# as another's, so `gnp.checkpoints.check_workdir` refuses it.
RESUMABLE_KEYS = (
    "num_epochs", "num_steps", "eval_batch_size", "eval_every_epochs",
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "steps_per_dispatch", "on_nonfinite", "dataset.data_dir", "dataset.download",
)


_IMAGE_DATASETS = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100)}
# The per-example input shape of each dataset with a fixed one (synthetic:
# ``dataset.input_shape``), for the checks that need it before the data loads.
INPUT_SHAPES = {"mnist1d": (40,),
                **{name: shape for name, (shape, _) in _IMAGE_DATASETS.items()}}

# Upper bounds: far above any run gnp makes, low enough that a value with a
# few zeros too many is refused here, before it exhausts the memory or runs
# for ever.
MAX_STEPS = 2**31 - 1  # The step counter is int32.
MAX_WIDTH = 2**16  # Units or channels of one layer.
MAX_EVAL_BATCH = 2**16
MAX_DEPTH = 1000  # wide_resnet
MAX_PROBES = 1000  # hessian: probes are vmapped, each a copy of the params.
NUM_SEEDS = 2**32  # PRNGKey and mnist1d's generator take 32-bit seeds.


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


def nest(flat: dict) -> dict:
  """``{"a.b": value}`` -> ``{"a": {"b": value}}``: `flatten`'s inverse
  (ConfigDict keys cannot hold dots)."""
  nested = {}
  for key, value in flat.items():
    *sections, name = key.split(".")
    node = nested
    for section in sections:
      node = node.setdefault(section, {})
    node[name] = value
  return nested


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


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _nonnegative(name: str, value, *, strict=False):
  ok = _is_number(value) and math.isfinite(value)
  ok = ok and (value > 0 if strict else value >= 0)
  _check(ok, f"{name} must be finite and {'> 0' if strict else '≥ 0'}, "
         f"got {name}={value!r}.")


def _fraction(name: str, value):
  """A number in [0, 1): momenta, dropout."""
  _check(_is_number(value) and 0 <= value < 1,  # also rejects NaN
         f"{name} must be in [0, 1), got {name}={value!r}.")


def _positive_int(name: str, value, *, allow_none=False):
  if value is None and allow_none:
    return
  ok = _is_int(value) and value >= 1
  _check(ok, f"{name} must be a positive integer, got {name}={value!r}.")


def _int_in(name: str, value, low: int, high: int, why: str = "", *,
            allow_none=False):
  """An integer in [low, high]; ``why`` explains the bound, e.g. " (int32)"."""
  if value is None and allow_none:
    return
  _check(_is_int(value) and low <= value <= high,
         f"{name} must be an integer in [{low}, {high}]{why}, got"
         f" {name}={value!r}.")


def input_shape(dataset: ml_collections.ConfigDict) -> tuple[int, ...] | None:
  """The per-example input shape the ``dataset`` section will load, or None
  if its name or its ``input_shape`` is wrong (the data refuses those)."""
  if dataset.name in INPUT_SHAPES:
    return INPUT_SHAPES[dataset.name]
  shape = dataset.input_shape
  if (dataset.name == "synthetic" and isinstance(shape, (tuple, list))
      and shape and all(_is_int(d) and d >= 1 for d in shape)):
    return tuple(shape)
  return None


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
  the closest known key), names, types and ranges (sizes up to the ``MAX_*``
  bounds), divisibility of the batch by the device count, of each device's
  share by the microbatches (``grad_accum_steps``) and of the batch by the
  m-sharpness group, and augmentations against the dataset's input shape.
  The dataset checks its own fields (sizes, label noise) when it loads,
  still before compilation.
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
  _one_of("clip.method", config.clip.method, ("auto", "ghost", "vmap"))
  _one_of("on_nonfinite", config.on_nonfinite, ("stop", "skip"))

  _int_in("seed", config.seed, 0, NUM_SEEDS - 1)
  _int_in("dataset.seed", config.dataset.seed, 0, NUM_SEEDS - 1,
          allow_none=True)

  # The loop first: the optimiser's and the regularisers' checks use it.
  _positive_int("batch_size", config.batch_size)
  _int_in("num_epochs", config.num_epochs, 1, MAX_STEPS,
          " (the step counter is int32)")
  _int_in("num_steps", config.num_steps, 1, MAX_STEPS,
          " (the step counter is int32)", allow_none=True)
  _int_in("eval_batch_size", config.eval_batch_size, 1, MAX_EVAL_BATCH)
  for name in ("eval_every_epochs", "log_every_steps",
               "checkpoint_every_steps", "keep_checkpoints",
               "steps_per_dispatch"):
    _positive_int(name, config[name])
  _check(
      config.batch_size % num_devices == 0,
      f"batch_size={config.batch_size} is not divisible by the device count"
      f" {num_devices}.",
  )
  accum = config.grad_accum_steps
  _positive_int("grad_accum_steps", accum)
  share = config.batch_size // num_devices
  _check(share % accum == 0,
         f"grad_accum_steps={accum} does not divide batch_size="
         f"{config.batch_size}" + (f"'s {share} examples per device (of"
                                   f" {num_devices})" if num_devices > 1
                                   else "") + ".")

  opt = config.optimizer
  for name in ("learning_rate", "weight_decay", "l2", "warmup_epochs",
               "step_factor"):
    _nonnegative(f"optimizer.{name}", opt[name])
  _check(opt.warmup_epochs <= config.num_epochs,
         "optimizer.warmup_epochs must be finite and in [0, num_epochs="
         f"{config.num_epochs}], got optimizer.warmup_epochs="
         f"{opt.warmup_epochs!r}.")
  if opt.grad_clip is not None:
    _nonnegative("optimizer.grad_clip", opt.grad_clip, strict=True)
  for name in ("momentum", "b1", "b2"):
    _fraction(f"optimizer.{name}", opt[name])
  epochs = opt.step_epochs
  _check(isinstance(epochs, (tuple, list))
         and all(_is_int(e) and e >= 1 for e in epochs),
         "optimizer.step_epochs must be a tuple of positive integers (the"
         f" epochs where the learning rate drops), got {epochs!r}.")
  if opt.schedule == "step":
    _check(epochs and max(epochs) <= config.num_epochs,
           "optimizer.schedule='step' needs optimizer.step_epochs, a"
           f" non-empty tuple of integers in [1, num_epochs={config.num_epochs}"
           f"], got {epochs!r}.")

  for name in ("gnp.r", "gnp.alpha", "sam.rho", "gnvr.lam", "gvr.alpha",
               "hessian.lam"):
    section, field = name.split(".")
    _nonnegative(name, config[section][field])
  _check(not (config.gnp.exact and config.gnp.normalize_first),
         "gnp.exact and gnp.normalize_first cannot both be set.")
  for section in ("gnp", "sam"):
    adaptive = config[section].adaptive
    _check(isinstance(adaptive, bool),
           f"{section}.adaptive must be True or False, got {adaptive!r}.")
    _nonnegative(f"{section}.eta", config[section].eta)
  probability = config.sam.probability
  if probability is not None:
    _check(_is_number(probability) and 0 < probability <= 1,  # rejects NaN
           "sam.probability must be in (0, 1] (the chance of a SAM step; None"
           f" = every step), got sam.probability={probability!r}.")
  _check(not (config.gnp.adaptive and config.gnp.normalize_first),
         "gnp.adaptive and gnp.normalize_first cannot both be set.")
  clip = config.clip
  if clip.max_norm is not None:
    _nonnegative("clip.max_norm", clip.max_norm, strict=True)
  if clip.outlier_mads is not None:
    _nonnegative("clip.outlier_mads", clip.outlier_mads)
  if config.method == "clip":
    _check((clip.max_norm is None) != (clip.outlier_mads is None),
           "method='clip' needs exactly one threshold: clip.max_norm (a fixed"
           " τ) or clip.outlier_mads (τ = median + k·1.4826·MAD of the"
           " per-example norms, e.g. 3); got clip.max_norm="
           f"{clip.max_norm!r}, clip.outlier_mads={clip.outlier_mads!r}.")
  _int_in("hessian.num_probes", config.hessian.num_probes, 1, MAX_PROBES)
  _check(_is_int(config.gnvr.ddof) and 0 <= config.gnvr.ddof,
         f"gnvr.ddof must be a non-negative integer, got {config.gnvr.ddof!r}.")
  if config.method == "gnvr":
    _int_in("gnvr.ddof", config.gnvr.ddof, 0, config.batch_size - 1,
            " (the variance over a batch of batch_size="
            f"{config.batch_size} divides by batch_size - ddof)")
  wrt = config.gvr.wrt
  if wrt is not None:
    try:
      re.compile(wrt)
    except (re.error, TypeError) as e:
      _fail("gvr.wrt must be a regular expression searched in the parameters'"
            f" paths (e.g. 'Dense_2|stage4'), got gvr.wrt={wrt!r}: {e}.")
  if config.regularizer_warmup == "r":
    _check(config.method in ("gnp", "sam"),
           "regularizer_warmup='r' ramps a radius: it applies to gnp and sam,"
           f" not method={config.method!r}.")
  if config.regularizer_warmup != "none":
    _check(config.method != "plain",
           "regularizer_warmup needs a regulariser; method='plain' has none.")
    _check(config.method != "clip",
           "regularizer_warmup ramps a penalty's strength; method='clip' has"
           " none (its threshold is not ramped).")
    _check(opt.warmup_epochs > 0,
           f"regularizer_warmup={config.regularizer_warmup!r} needs "
           "optimizer.warmup_epochs > 0.")
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
    _check(group_size % accum == 0,
           f"grad_accum_steps={accum} does not divide {section}.group_size="
           f"{group_size} (each group is accumulated in that many"
           " microbatches).")

  model = config.model
  if model.name in ("mlp", "mlp_jnp", "cnn"):
    hidden = model.hidden
    _check(isinstance(hidden, (tuple, list)) and len(hidden) > 0
           and all(_is_int(w) and 1 <= w <= MAX_WIDTH for w in hidden),
           "model.hidden must be a non-empty tuple of positive integers up"
           f" to {MAX_WIDTH} (the hidden widths), got {hidden!r}.")
  if model.name == "wide_resnet":
    depth = model.depth
    _check(_is_int(depth) and 10 <= depth <= MAX_DEPTH
           and (depth - 4) % 6 == 0,
           "model.depth must be 6n + 4 with n ≥ 1 (10, 16, 22, 28, 40, ...)"
           f" and at most {MAX_DEPTH}, got model.depth={depth!r}.")
    _int_in("model.width", model.width, 1, MAX_WIDTH // 64,
            " (the last stage has 64 × width channels)")
    _fraction("model.dropout_rate", model.dropout_rate)

  data = config.dataset
  _check(_is_int(data.validation_size) and data.validation_size >= 0,
         "dataset.validation_size must be a non-negative integer, got "
         f"{data.validation_size!r}.")
  _validate_augment(config.augment, data)
  if config.method == "gvr":
    aug = config.augment
    _check(
        any((aug.crop_padding, aug.flip, aug.cutout, aug.noise_std,
             aug.max_shift)),
        "method='gvr' compares two augmented views; configure augment.*.",
    )


def _validate_augment(aug: ml_collections.ConfigDict,
                      dataset: ml_collections.ConfigDict) -> None:
  """Types and ranges of ``augment``, and that they fit the inputs' shape."""
  for name in ("crop_padding", "cutout", "max_shift"):
    _check(_is_int(aug[name]) and aug[name] >= 0,
           f"augment.{name} must be a non-negative integer, got {aug[name]!r}.")
  _check(isinstance(aug.flip, bool),
         f"augment.flip must be True or False, got {aug.flip!r}.")
  _nonnegative("augment.noise_std", aug.noise_std)
  shape = input_shape(dataset)
  if shape is None:
    return
  image_ops = [n for n in ("crop_padding", "flip", "cutout") if aug[n]]
  signal_ops = [n for n in ("noise_std", "max_shift") if aug[n]]
  if image_ops:
    _check(len(shape) == 3,
           f"augment.{image_ops[0]} applies to images (height, width,"
           f" channels); {dataset.name}'s inputs have shape {shape}.")
    side = min(shape[:2])
    for name in ("crop_padding", "cutout"):
      _int_in(f"augment.{name}", aug[name], 0, side,
              f" (the side of {dataset.name}'s {shape[0]}×{shape[1]} images)")
  if signal_ops:
    _check(len(shape) in (1, 2),
           f"augment.{signal_ops[0]} applies to 1-D signals (length(,"
           f" channels)); {dataset.name}'s inputs have shape {shape}.")
    _int_in("augment.max_shift", aug.max_shift, 0, shape[0],
            f" (the length of {dataset.name}'s signals)")
