"""Argument checks shared by gnp's public factories: one clear ValueError."""

import numbers

import jax
import jax.numpy as jnp


def check_nonnegative(name: str, value) -> None:
  """Raises ValueError for a concrete negative (or NaN) hyper-parameter.

  Traced values (a schedule inside a jitted step) cannot be inspected and are
  passed through: checking them would force a host round trip.
  """
  if value is None:
    raise ValueError(f"{name} must be a non-negative scalar, got None.")
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
    return
  try:
    concrete = float(value)
  except (TypeError, ValueError):
    raise ValueError(
        f"{name} must be a non-negative scalar, got {value!r}."
    ) from None
  if not concrete >= 0:  # also rejects NaN
    raise ValueError(f"{name} must be non-negative, got {name}={value}.")


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or value < 1
  ):
    raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")


def check_probability(name: str, value) -> None:
  """Raises ValueError unless a concrete ``value`` is in (0, 1].

  A traced value (a population's or a schedule's) passes if it is a scalar.
  """
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
    return
  try:
    concrete = None if isinstance(value, bool) else float(value)
  except (TypeError, ValueError):
    concrete = None
  if concrete is None:
    raise ValueError(f"{name} must be a probability in (0, 1], got {value!r}.")
  if not 0 < concrete <= 1:  # also rejects NaN
    raise ValueError(f"{name} must be in (0, 1], got {name}={value!r}.")
