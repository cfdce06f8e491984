"""Shared fixtures, and a persistent compilation cache for each test process.

Compilation is most of the suite's time on a CPU, and tests compile the
same programs again: the same tiny model under another learning rate, seed
or test, a run and its rerun. So each pytest process (each xdist worker)
keeps XLA's persistent cache in a fresh temporary folder, removed when it
ends, and passes it on to the processes its tests start, which run while it
waits (``JAX_COMPILATION_CACHE_DIR``). A loaded program is the program
compiled: the cache changes how long a test takes, never what it computes.

Only programs that take `_MIN_COMPILE_S` or more to compile are kept: the
many single operations run eagerly compile faster than an entry is written.
No two processes write one folder at once, since jax writes entries without
a lock: tests that start processes side by side, or kill one (which could
leave a truncated entry), give them `tests.helpers.NO_CACHE`.
``GNP_TEST_XLA_CACHE=0`` runs without the cache.
"""

import os
import shutil
import tempfile

import jax
import pytest

_MIN_COMPILE_S = 0.3
_MADE_HERE = []


def pytest_configure(config):
  del config
  if os.environ.get("GNP_TEST_XLA_CACHE", "1") == "0":
    return
  path = tempfile.mkdtemp(prefix="gnp-xla-cache-")
  _MADE_HERE.append(path)
  # For the processes the tests start: jax reads these when it is imported.
  os.environ.update({
      "JAX_COMPILATION_CACHE_DIR": path,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(_MIN_COMPILE_S),
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  })
  # This process imported jax (above) before they were set.
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    _MIN_COMPILE_S)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  del config
  for path in _MADE_HERE:
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def x64():
  """Runs the test in float64, restoring the previous setting afterwards."""
  previous = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)
