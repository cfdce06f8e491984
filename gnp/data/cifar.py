"""CIFAR-10 and CIFAR-100 through tensorflow-datasets, whole splits in memory.

Images stay uint8 [N, 32, 32, 3] on the host (150 MB for the train split);
``PREPROCESS[name]`` turns a batch into float32 on the device: /255, then
per-channel standardisation with the train split's mean and standard
deviation over all pixels.

Reading needs no TensorFlow when the dataset was prepared in the ArrayRecord
format, which TFDS reads through ``builder.as_data_source``; a dataset in
TFDS's default TFRecord format is read with ``builder.as_dataset``, which
needs TensorFlow. Preparing (downloading) always needs TensorFlow: TFDS's
CIFAR builder reads the archive with ``tf.io.gfile``. The usual way::

    pip install tensorflow   # on a machine with internet
    tfds build cifar100 --data_dir=DIR --file_format=array_record

then ``--config.dataset.data_dir=DIR`` (copy DIR over if need be).

Failing fast matters here: without network, TFDS's downloader retries for
about 3.5 minutes (10 retries with back-off, measured) before giving up. So a
dataset that is not prepared raises `DatasetUnavailableError` at once when
``download`` is False, and after a 5-second reachability check of the
download host when it is True.
"""

from __future__ import annotations

import functools
import importlib.util
import socket
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

from gnp.errors import DatasetUnavailableError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

# Per-channel mean and standard deviation of the train split's pixels, /255.
# (The often copied CIFAR-10 std (0.2023, 0.1994, 0.2010) is a different
# statistic, the mean of per-image standard deviations.)
_MEAN = {
    "cifar10": (0.4914, 0.4822, 0.4465),
    "cifar100": (0.5071, 0.4865, 0.4409),
}
_STD = {
    "cifar10": (0.2470, 0.2435, 0.2616),
    "cifar100": (0.2673, 0.2564, 0.2762),
}

# Where TFDS's CIFAR builders download the archives from.
_DOWNLOAD_HOST = "www.cs.toronto.edu"
_REACH_TIMEOUT_S = 5.0


def _standardise(x: jax.Array, *, mean, std) -> jax.Array:
  x = jnp.asarray(x, jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# One function object per dataset, created once, so that jit caches keyed on
# it are shared by every load.
PREPROCESS = {
    name: functools.partial(_standardise, mean=_MEAN[name], std=_STD[name])
    for name in NUM_CLASSES
}


def load(name: str, *, data_dir: str | None, download: bool):
  """Loads ``((x_train, y_train), (x_test, y_test))`` into host memory.

  Args:
    name: "cifar10" or "cifar100".
    data_dir: the TFDS data directory; None for TFDS's default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    download: whether to download and prepare the dataset when it is not in
      ``data_dir``.

  Returns:
    x uint8 [N, 32, 32, 3] and y int32 [N] for each split.

  Raises:
    DatasetUnavailableError: the dataset is not prepared and cannot be
      prepared here (download off, no network, no TensorFlow), or it is
      stored as TFRecord and TensorFlow is missing.
  """
  # Imported here: tensorflow_datasets takes a while to import, and runs on
  # other datasets do not need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    _prepare(builder, download=download)
  return _read(builder, "train"), _read(builder, "test")


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _build_hint(name: str) -> str:
  return (f"prepare it with `tfds build {name} --data_dir=DIR"
          " --file_format=array_record` (needs internet and TensorFlow) and"
          " set dataset.data_dir=DIR")


def _prepare(builder, *, download: bool) -> None:
  """Downloads and prepares ``builder``'s dataset, or says why it cannot."""
  name, where = builder.name, builder.data_dir
  if not download:
    raise DatasetUnavailableError(
        f"{name} is not prepared in {where} and dataset.download is False;"
        f" {_build_hint(name)}, or set dataset.download=True."
    )
  if not _has_tensorflow():
    raise DatasetUnavailableError(
        f"{name} is not prepared in {where}, and TFDS needs TensorFlow to"
        f" prepare it: pip install tensorflow; or {_build_hint(name)}."
    )
  # Behind a proxy, a direct connection says nothing; the download will tell.
  if "https" not in urllib.request.getproxies():
    try:
      socket.create_connection((_DOWNLOAD_HOST, 443),
                               timeout=_REACH_TIMEOUT_S).close()
    except OSError as e:
      raise DatasetUnavailableError(
          f"{name} is not prepared in {where} and cannot be downloaded:"
          f" {_DOWNLOAD_HOST} is unreachable ({e}); {_build_hint(name)}."
      ) from None
  try:
    # ArrayRecord, so that later runs can read it without TensorFlow.
    builder.download_and_prepare(file_format="array_record")
  except (OSError, ImportError) as e:  # requests' errors are OSErrors.
    raise DatasetUnavailableError(
        f"downloading {name} into {where} failed ({type(e).__name__}: {e});"
        f" {_build_hint(name)}."
    ) from e


def _read(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError:  # TFRecord files: no random access.
    return _read_with_tensorflow(builder, split)
  # One record at a time: measured 0.15 ms each with PIL decoding (8 s for
  # the train split), barely slower than batched __getitems__, which
  # tfds.testing.mock_data does not support.
  n = len(source)
  x = np.empty((n, 32, 32, 3), np.uint8)
  y = np.empty((n,), np.int32)
  for i in range(n):
    example = source[i]
    x[i] = example["image"]
    y[i] = example["label"]
  return x, y


def _read_with_tensorflow(builder, split: str):
  if not _has_tensorflow():
    raise DatasetUnavailableError(
        f"{builder.name} in {builder.data_dir} is stored as TFRecord, which"
        " needs TensorFlow to read: pip install tensorflow; or"
        f" {_build_hint(builder.name)}."
    )
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  x, y = tfds.as_numpy(
      builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  return np.asarray(x, np.uint8), np.asarray(y, np.int32)
