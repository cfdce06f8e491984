"""The configured regulariser, with its warm-up, as a gradient function.

Zhao et al. ("When Will Gradient Regularization Be Harmful?", ICML 2024)
relax the penalty while the learning rate warms up: ``lambda`` ramps the
strength from 0, ``r`` ramps the radius (GNP, SAM), ``zero`` switches the
penalty off until warm-up ends. The ramp is computed from the step inside
the jitted step, so the values are traced and nothing recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from gnp import penalties


# method -> (factory, traced hyper-parameters, static options), each named as
# both the config field and the factory's argument. A traced hyper-parameter
# whose config value is None is left out (the factory's default, None):
# whether it is set shapes the step, its value does not. Per-example
# clipping has two, of which exactly one is set.
METHODS = {
    "plain": (penalties.plain, (), ()),
    "gnp": (penalties.gradient_norm, ("r", "alpha"),
            ("exact", "normalize_first", "group_size", "adaptive", "eta")),
    "sam": (penalties.sam, ("rho", "probability"),
            ("group_size", "adaptive", "eta")),
    "gnvr": (penalties.gradient_norm_variance, ("lam",), ("ddof", "method")),
    "gvr": (penalties.view_consistency, ("alpha",), ("wrt",)),
    "hessian": (penalties.hessian_frobenius, ("lam",), ("num_probes",)),
    "clip": (penalties.per_example_clipping, ("max_norm", "outlier_mads"),
             ("method",)),
}
# What each warm-up strategy ramps. SAM has only a radius, ρ, which is also
# its strength, so every strategy ramps it. Per-example clipping has no
# strength to ramp (`gnp.config` refuses a warm-up for it). RST's
# probability is not a strength: it is never ramped.
_RAMPED = {"r": {"r", "rho"}, "lambda": {"alpha", "lam", "rho"},
           "zero": {"alpha", "lam", "rho"}}


@dataclasses.dataclass(frozen=True)
class Regularizer:
  """The configured method: ``make(loss_fn, step)`` gives its GradientFn.

  Strengths and radii are computed from the step inside the jitted step
  (warm-up strategies), so they are traced and nothing recompiles.
  """

  method: str
  hparams: dict  # Strengths / radii by argument name.
  options: dict  # Static arguments (exact, group_size, views, ...).
  warmup: str
  warmup_steps: int

  @property
  def group_size(self) -> int | None:
    return self.options.get("group_size")

  @property
  def views(self) -> Callable | None:
    return self.options.get("views")

  def values(self, step, hparams=None) -> dict:
    """The strengths at ``step``: ``hparams`` (default: the config's), ramped."""
    hparams = self.hparams if hparams is None else hparams
    if self.warmup == "none":
      return dict(hparams)
    if self.warmup == "zero":
      ramp = (step >= self.warmup_steps).astype(jnp.float32)
    else:
      ramp = jnp.minimum(step / self.warmup_steps, 1.0)
    ramped = _RAMPED[self.warmup]
    return {k: v * ramp if k in ramped else v for k, v in hparams.items()}

  def make(self, loss_fn, step, hparams=None) -> penalties.GradientFn:
    """The GradientFn at ``step``, with ``hparams`` (traced) if given."""
    factory = METHODS[self.method][0]
    return factory(loss_fn, **self.values(step, hparams), **self.options)


def traced_values(config) -> dict:
  """The method's traced hyper-parameters that are set: ``{name: value}``."""
  section = config.get(config.method, {})
  return {name: section[name] for name in METHODS[config.method][1]
          if section[name] is not None}


def build_regularizer(config, steps_per_epoch: int, augment) -> Regularizer:
  option_names = METHODS[config.method][2]
  section = config.get(config.method, {})
  options = {name: section[name] for name in option_names}
  if config.method == "gvr":

    def views(batch, key):
      x, y = batch
      first, second = jax.random.split(key)
      return (augment(first, x), y), (augment(second, x), y)

    options["views"] = views
  return Regularizer(
      method=config.method,
      hparams=traced_values(config),
      options=options,
      warmup=config.regularizer_warmup,
      warmup_steps=max(round(config.optimizer.warmup_epochs * steps_per_epoch), 1),
  )
