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


@dataclasses.dataclass(frozen=True)
class Regularizer:
  """The configured method: ``make(loss_fn, step)`` gives its GradientFn.

  Strengths and radii are computed from the step inside the jitted step
  (warm-up strategies), so they are traced and nothing recompiles.
  """

  method: str
  hparams: dict  # Strengths / radii by argument name.
  options: dict  # Static arguments (exact, group_size, ddof, ...).
  warmup: str
  warmup_steps: int
  views: Callable | None = None

  @property
  def group_size(self) -> int | None:
    return self.options.get("group_size")

  def values(self, step) -> dict:
    if self.warmup == "none":
      return dict(self.hparams)
    ramp = jnp.minimum(step / self.warmup_steps, 1.0)
    if self.warmup == "zero":
      ramp = (step >= self.warmup_steps).astype(jnp.float32)
    # "r" ramps the radius; "lambda" and "zero" the strength. SAM has only a
    # radius, so every strategy ramps ρ.
    ramped = {"r": ("r",), "lambda": ("alpha", "lam", "rho"),
              "zero": ("alpha", "lam", "rho")}[self.warmup]
    if self.method == "sam":
      ramped = ("rho",)
    return {k: v * ramp if k in ramped else v for k, v in self.hparams.items()}

  def make(self, loss_fn, step) -> penalties.GradientFn:
    kwargs = {**self.values(step), **self.options}
    if self.method == "plain":
      return penalties.plain(loss_fn)
    if self.method == "gnp":
      return penalties.gradient_norm(loss_fn, **kwargs)
    if self.method == "sam":
      return penalties.sam(loss_fn, **kwargs)
    if self.method == "gnvr":
      return penalties.gradient_norm_variance(loss_fn, **kwargs)
    if self.method == "gvr":
      return penalties.view_consistency(loss_fn, views=self.views, **kwargs)
    return penalties.hessian_frobenius(loss_fn, **kwargs)


def build_regularizer(config, steps_per_epoch: int, augment) -> Regularizer:
  c = config[config.method] if config.method != "plain" else {}
  hparams, options = {}, {}
  if config.method == "gnp":
    hparams = {"r": c.r, "alpha": c.alpha}
    options = {"exact": c.exact, "normalize_first": c.normalize_first,
               "group_size": c.group_size}
  elif config.method == "sam":
    hparams, options = {"rho": c.rho}, {"group_size": c.group_size}
  elif config.method == "gnvr":
    hparams, options = {"lam": c.lam}, {"ddof": c.ddof, "method": c.method}
  elif config.method == "gvr":
    hparams, options = {"alpha": c.alpha}, {"wrt": c.wrt}
  elif config.method == "hessian":
    hparams, options = {"lam": c.lam}, {"num_probes": c.num_probes}

  def views(batch, key):
    x, y = batch
    first, second = jax.random.split(key)
    return (augment(first, x), y), (augment(second, x), y)

  return Regularizer(
      method=config.method, hparams=hparams, options=options,
      warmup=config.regularizer_warmup,
      warmup_steps=max(round(config.optimizer.warmup_epochs * steps_per_epoch), 1),
      views=views if config.method == "gvr" else None,
  )
