"""Shared fixtures."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test in float64, restoring the previous setting afterwards."""
  previous = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)
