"""Shared helpers for the training-system tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The environment of a process a test kills or starts beside another: without
# the test process's XLA cache (tests/conftest.py), which a kill during a
# write would leave with a truncated entry, and which jax writes unlocked.
NO_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``, as gnp.main would load it."""
  from gnp import study  # pylint: disable=g-import-not-at-top

  return study.load_config(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def tiny_mnist1d(**overrides):
  """The default config on 1,000 mnist1d samples, quick to train."""
  config = load_config("mnist1d")
  config.dataset.num_samples = 1000
  config.dataset.validation_size = 100
  config.batch_size = 50
  config.eval_batch_size = 200
  config.log_every_steps = 5
  config.update_from_flattened_dict(overrides)
  return config


def run(args, *, env=None, timeout=600, cwd=ROOT):
  """Runs ``python args...`` in a fresh process; returns CompletedProcess."""
  full_env = dict(os.environ)
  full_env.pop("XLA_FLAGS", None)
  full_env.update(env or {})
  return subprocess.run(
      [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
      text=True, timeout=timeout,
  )


def tiny_study(**overrides):
  """A two-arm study (plain, SAM) of 2 trials and 2 seeds on tiny mnist1d."""
  from gnp import study  # pylint: disable=g-import-not-at-top

  config = study.default_study()
  config.name = "tiny"
  config.train = tiny_mnist1d()
  lr = {"optimizer.learning_rate": ("log", 1e-3, 1e-2)}
  config.arms = (
      study.arm("plain", "AdamW", search=lr),
      study.arm("sam", "SAM", overrides={"method": "sam"},
                search={**lr, "sam.rho": ("log", 1e-3, 0.1)}),
  )
  config.tuning.num_trials = 2
  config.tuning.trials_at_once = 2
  config.tuning.num_epochs = 2
  config.final.num_seeds = 2
  config.final.num_epochs = 2
  config.update_from_flattened_dict(overrides)
  return config


def equations(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from equations(sub)


def assert_auto_falls_back_to_vmap(monkeypatch, loss_fn, params, batch):
  """GNVR's ``method="auto"`` takes the vmap path for ``loss_fn`` (traced
  only: nothing is compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  from gnp import penalties  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  # The module: gnp.penalties.gradient_norm_variance is also the function.
  gnvr = importlib.import_module("gnp.penalties.gradient_norm_variance")

  calls = []
  vmap = gnvr.vmap_per_example_norms
  monkeypatch.setattr(gnvr, "vmap_per_example_norms",
                      lambda *args: calls.append(1) or vmap(*args))
  jax.eval_shape(penalties.gradient_norm_variance(loss_fn, lam=0.1),
                 params, batch, None)
  assert calls


def plain_types(value) -> bool:
  """Whether ``value`` holds only what `json` writes as it is: dicts with
  string keys, lists, str, int, float, bool and None (no numpy scalars)."""
  if isinstance(value, dict):
    return all(isinstance(k, str) and plain_types(v)
               for k, v in value.items())
  if isinstance(value, list):
    return all(plain_types(v) for v in value)
  return value is None or type(value) in (str, int, float, bool)
