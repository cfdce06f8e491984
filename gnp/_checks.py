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
