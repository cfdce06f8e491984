"""Tests for gnp.data: the loaders, the validation split and label noise, and
the batch order of gnp.data.pipeline. No test touches the network."""

import importlib.resources
import io
import random
import time
from unittest import mock

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder as tfds_dataset_builder

from gnp import data
from gnp.data import cifar
from gnp.data import mnist1d
from gnp.data import pipeline
from gnp.errors import ConfigError
from gnp.errors import DatasetUnavailableError


def _config(**overrides):
  """A ``dataset`` section with every field, as the config files give it."""
  fields = dict(
      name="mnist1d", validation_size=0, num_samples=500, label_noise=0.0,
      data_dir=None, download=False, input_shape=(40,), num_classes=10,
      num_train=100, num_test=20)
  return ml_collections.ConfigDict({**fields, **overrides})


def _rows(x):
  """The examples of ``x`` as a set of bytes, to compare splits by content."""
  return {row.tobytes() for row in x.reshape(len(x), -1)}


# --- mnist1d -----------------------------------------------------------------


def test_mnist1d_shapes_and_dtypes():
  ds = data.load(_config(validation_size=50), seed=0)
  assert ds.name == "mnist1d" and ds.num_classes == 10
  (x, y), (xv, yv), (xt, yt) = ds.train, ds.validation, ds.test
  # 500 samples: 80% (400) train, of which 50 are held out; 100 test.
  assert x.shape == (350, 40) and xv.shape == (50, 40) and xt.shape == (100, 40)
  assert y.shape == (350,) and yv.shape == (50,) and yt.shape == (100,)
  for features, labels in (ds.train, ds.validation, ds.test):
    assert features.dtype == np.float32 and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10
  assert ds.input_shape == (40,)
  out = jax.jit(ds.preprocess)(x[:3])
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, x[:3])


def test_mnist1d_is_deterministic_and_cached():
  mnist1d._generate.cache_clear()
  first = data.load(_config(validation_size=30, label_noise=0.3), seed=3)
  mnist1d._generate.cache_clear()  # The second load generates anew.
  second = data.load(_config(validation_size=30, label_noise=0.3), seed=3)
  for split in ("train", "validation", "test"):
    for a, b in zip(getattr(first, split), getattr(second, split)):
      np.testing.assert_array_equal(a, b)
  started = time.perf_counter()
  data.load(_config(validation_size=30, label_noise=0.3), seed=3)
  assert time.perf_counter() - started < 0.1  # From the cache.


def test_mnist1d_leaves_the_global_generators_alone():
  # make_dataset reseeds `random` and `np.random`; gnp must restore them.
  mnist1d._generate.cache_clear()
  random.seed(123)
  np.random.seed(123)
  expected = (random.random(), np.random.rand())
  random.seed(123)
  np.random.seed(123)
  data.load(_config(), seed=5)
  assert (random.random(), np.random.rand()) == expected


def test_label_noise_rate_and_only_training_labels():
  kwargs = dict(num_samples=2000, validation_size=200)
  clean = data.load(_config(**kwargs), seed=1)
  noisy = data.load(_config(label_noise=0.5, **kwargs), seed=1)
  # Same inputs and split; validation and test labels untouched.
  np.testing.assert_array_equal(noisy.train[0], clean.train[0])
  for split in ("validation", "test"):
    for a, b in zip(getattr(noisy, split), getattr(clean, split)):
      np.testing.assert_array_equal(a, b)
  # round(0.5 * 1400) labels redrawn uniformly; 9 in 10 of them change.
  changed = int(np.sum(noisy.train[1] != clean.train[1]))
  redrawn = 700
  mean, sd = redrawn * 0.9, np.sqrt(redrawn * 0.9 * 0.1)
  assert abs(changed - mean) < 5 * sd
  assert noisy.train[1].min() >= 0 and noisy.train[1].max() < 10


def test_label_noise_differs_across_seeds():
  def changed(seed):
    clean = data.load(_config(), seed=seed)
    noisy = data.load(_config(label_noise=0.2), seed=seed)
    return noisy.train[1] != clean.train[1]

  a, b = changed(0), changed(1)
  assert a.any() and b.any() and not np.array_equal(a, b)


def test_validation_is_disjoint_from_train_and_covers_the_rest():
  (full_x, _), _ = mnist1d.load(500, seed=2)
  ds = data.load(_config(validation_size=100), seed=2)
  train, held = _rows(ds.train[0]), _rows(ds.validation[0])
  assert len(train) == 300 and len(held) == 100
  assert not train & held
  assert train | held == _rows(full_x)
  # Another seed holds out other examples.
  other = data.load(_config(validation_size=100), seed=3)
  assert _rows(other.validation[0]) != held


@pytest.mark.parametrize("overrides, option", [
    (dict(label_noise=1.0), "dataset.label_noise"),
    (dict(label_noise=-0.1), "dataset.label_noise"),
    (dict(label_noise=float("nan")), "dataset.label_noise"),
    (dict(validation_size=400), "dataset.validation_size"),  # = train size
    (dict(validation_size=-1), "dataset.validation_size"),
    (dict(name="mnist"), "dataset.name"),
    (dict(num_samples=505), "dataset.num_samples"),
    (dict(num_samples=0), "dataset.num_samples"),
    (dict(name="synthetic", input_shape=(8, 0)), "dataset.input_shape"),
    (dict(name="synthetic", num_classes=1), "dataset.num_classes"),
    (dict(name="cifar10", download="no"), "dataset.download"),
])
def test_bad_options_raise_one_line_naming_them(overrides, option):
  with pytest.raises(ConfigError) as error:
    data.load(_config(**overrides), seed=0)
  message = str(error.value)
  assert option in message and "\n" not in message


def test_unknown_name_lists_the_choices():
  choices = "mnist1d, cifar10, cifar100, synthetic"
  with pytest.raises(ConfigError, match=choices):
    data.load(_config(name="imagenet"), seed=0)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_bad_seed(seed):
  with pytest.raises(ConfigError, match="seed"):
    data.load(_config(), seed=seed)


# --- synthetic ---------------------------------------------------------------


def _synthetic(**overrides):
  return _config(**{"name": "synthetic", "input_shape": (8,),
                    "num_classes": 4, "num_train": 2000, "num_test": 500,
                    **overrides})


def test_synthetic_shapes_determinism_and_streams():
  ds = data.load(_synthetic(input_shape=(4, 4, 3), num_train=50, num_test=10,
                            validation_size=10), seed=0)
  assert ds.train[0].shape == (40, 4, 4, 3) and ds.train[0].dtype == np.float32
  assert ds.validation[0].shape == (10, 4, 4, 3) and ds.test[1].shape == (10,)
  assert ds.test[1].dtype == np.int32 and ds.input_shape == (4, 4, 3)
  again = data.load(_synthetic(input_shape=(4, 4, 3), num_train=50,
                               num_test=10, validation_size=10), seed=0)
  np.testing.assert_array_equal(ds.train[0], again.train[0])
  np.testing.assert_array_equal(ds.test[1], again.test[1])
  other = data.load(_synthetic(input_shape=(4, 4, 3), num_train=50,
                               num_test=10, validation_size=10), seed=1)
  assert not np.array_equal(ds.test[0], other.test[0])
  # More training data leaves the test set (and the teacher) unchanged.
  more = data.load(_synthetic(input_shape=(4, 4, 3), num_train=80,
                              num_test=10, validation_size=10), seed=0)
  np.testing.assert_array_equal(ds.test[0], more.test[0])
  np.testing.assert_array_equal(ds.test[1], more.test[1])


def test_synthetic_labels_are_learnable_by_a_linear_model():
  ds = data.load(_synthetic(), seed=0)
  (x, y), (xt, yt) = ds.train, ds.test
  assert np.bincount(y, minlength=4).min() > 2000 / 4 / 2  # Roughly balanced.
  # Least squares on one-hot targets: far above chance (1/4).
  design = np.c_[x, np.ones(len(x))]
  weights = np.linalg.lstsq(design, np.eye(4)[y], rcond=None)[0]
  accuracy = np.mean(np.argmax(np.c_[xt, np.ones(len(xt))] @ weights, 1) == yt)
  assert accuracy > 0.8


# --- CIFAR through TFDS ------------------------------------------------------

# The train split's per-channel pixel statistics, as published (0-255 scale).
CIFAR_STATS = {
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}


@pytest.fixture
def mock_cifar():
  """tfds.testing.mock_data, with the dataset reported as prepared.

  mock_data replaces the reading (`as_data_source`, which needs no
  TensorFlow) with random examples but leaves `is_prepared` alone, and
  `cifar.load` asks it first.
  """
  with tfds.testing.mock_data(num_examples=12), mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    yield


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10),
                                               ("cifar100", 100)])
def test_cifar_from_mock_data(mock_cifar, name, num_classes):
  del mock_cifar
  ds = data.load(_config(name=name, validation_size=2), seed=0)
  assert ds.num_classes == num_classes
  assert ds.train[0].shape == (10, 32, 32, 3) and ds.train[0].dtype == np.uint8
  assert ds.validation[0].shape == (2, 32, 32, 3)
  assert ds.test[0].shape == (12, 32, 32, 3)
  for _, labels in (ds.train, ds.validation, ds.test):
    assert labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < num_classes
  assert ds.input_shape == (32, 32, 3)

  out = jax.jit(ds.preprocess)(ds.test[0])
  assert out.dtype == np.float32 and out.shape == (12, 32, 32, 3)
  mean, std = (np.array(s) for s in CIFAR_STATS[name])
  expected = (ds.test[0].astype(np.float64) - mean) / std
  np.testing.assert_allclose(out, expected, atol=0.02)
  # The mean colour maps to 0, one standard deviation above it to 1.
  pixels = np.stack([mean, mean + std]).reshape(2, 1, 1, 3)
  grey = ds.preprocess(np.broadcast_to(pixels, (2, 32, 32, 3)))
  np.testing.assert_allclose(grey[0], 0.0, atol=0.01)
  np.testing.assert_allclose(grey[1], 1.0, atol=0.01)


def _png(self, image):
  """Image.encode_example without TensorFlow (tests only)."""
  del self
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def prepared_cifar10(tmp_path_factory):
  """A small "cifar10" prepared as ArrayRecord files, as `tfds build` would.

  The real builder, fed random images instead of the archive; TFDS encodes
  images with TensorFlow, so PNG encoding is done with PIL here. Reading it
  back goes through the same code as the real dataset, with no mocks.
  """
  data_dir = tmp_path_factory.mktemp("tfds")
  rng = np.random.default_rng(0)
  splits = {
      split: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
              rng.integers(0, 10, n))
      for split, n in (("train", 40), ("test", 15))
  }

  def examples(split):
    x, y = splits[split]
    for i in range(len(y)):
      yield i, {"id": f"{split}{i}", "image": x[i], "label": y[i]}

  def split_generators(self, dl_manager):
    del self, dl_manager
    return {split: examples(split) for split in splits}

  cifar10 = type(tfds.builder("cifar10", data_dir=str(data_dir)))
  # TFDS imports the importlib_resources backport but declares it only for
  # Python < 3.9; the standard library's importlib.resources is the same.
  with mock.patch.object(cifar10, "_split_generators", split_generators), \
      mock.patch.object(tfds_dataset_builder, "importlib_resources",
                        importlib.resources), \
      mock.patch.object(tfds.features.Image, "encode_example", _png):
    tfds.builder("cifar10", data_dir=str(data_dir),
                 file_format="array_record").download_and_prepare()
  return str(data_dir), splits


def test_cifar_reads_array_record_without_tensorflow(prepared_cifar10):
  data_dir, splits = prepared_cifar10
  ds = data.load(_config(name="cifar10", data_dir=data_dir, download=False),
                 seed=0)
  for split in ("train", "test"):
    x, y = getattr(ds, split)
    expected_x, expected_y = splits[split]
    assert x.dtype == np.uint8 and y.dtype == np.int32
    # TFDS stores examples in its own order; compare (image, label) pairs.
    def pairs(images, labels):
      return sorted((a.tobytes(), int(b)) for a, b in zip(images, labels))
    assert pairs(x, y) == pairs(expected_x, expected_y)


def test_cifar_stored_as_tfrecord_needs_tensorflow(prepared_cifar10):
  data_dir, _ = prepared_cifar10
  with mock.patch.object(tfds.core.DatasetBuilder, "as_data_source",
                         side_effect=NotImplementedError), \
      mock.patch.object(cifar, "_has_tensorflow", return_value=False):
    with pytest.raises(DatasetUnavailableError, match="TFRecord"):
      data.load(_config(name="cifar10", data_dir=data_dir), seed=0)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_unprepared_cifar_without_download_fails_fast(tmp_path, name):
  started = time.perf_counter()
  with pytest.raises(DatasetUnavailableError) as error:
    data.load(_config(name=name, data_dir=str(tmp_path), download=False),
              seed=0)
  assert time.perf_counter() - started < 5
  message = str(error.value)
  assert "\n" not in message and str(tmp_path) in message
  assert f"tfds build {name}" in message and "dataset.download" in message


def test_unreachable_download_host_fails_before_downloading(tmp_path):
  # TFDS's downloader would retry for minutes; gnp checks the host first.
  refused = ConnectionRefusedError("no route")
  with mock.patch.object(cifar, "_has_tensorflow", return_value=True), \
      mock.patch.object(cifar.socket, "create_connection",
                        side_effect=refused), \
      mock.patch.object(cifar.urllib.request, "getproxies", return_value={}), \
      mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare") as dl:
    started = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="unreachable"):
      data.load(_config(name="cifar100", data_dir=str(tmp_path),
                        download=True), seed=0)
    assert time.perf_counter() - started < 5
  dl.assert_not_called()


def test_download_without_tensorflow_says_so(tmp_path):
  with mock.patch.object(cifar, "_has_tensorflow", return_value=False), \
      mock.patch.object(cifar.socket, "create_connection") as connect:
    with pytest.raises(DatasetUnavailableError, match="TensorFlow"):
      data.load(_config(name="cifar10", data_dir=str(tmp_path),
                        download=True), seed=0)
  connect.assert_not_called()


# --- pipeline ----------------------------------------------------------------


def test_every_example_once_per_epoch_and_epochs_differ():
  n, batch = 103, 10  # 10 steps per epoch, 3 examples left out each epoch.
  assert pipeline.steps_per_epoch(n, batch) == 10
  epochs = []
  for epoch in range(3):
    idx = np.concatenate([pipeline.train_indices(n, batch, 7, step)
                          for step in range(epoch * 10, epoch * 10 + 10)])
    assert idx.shape == (100,) and len(np.unique(idx)) == 100
    assert idx.min() >= 0 and idx.max() < n
    epochs.append(idx)
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  # Another seed, another order.
  other = np.concatenate([pipeline.train_indices(n, batch, 8, s)
                          for s in range(10)])
  assert not np.array_equal(other, epochs[0])


def test_train_indices_match_a_recomputed_permutation_in_any_order():
  n, batch, seed = 50, 8, 3  # 6 steps per epoch.
  pipeline._epoch_order.cache_clear()
  for step in (25, 0, 25, 13, 5, 6, 400):
    epoch, within = divmod(step, 6)
    expected = np.random.default_rng([seed, epoch]).permutation(n)
    np.testing.assert_array_equal(
        pipeline.train_indices(n, batch, seed, step),
        expected[within * batch:(within + 1) * batch])


def test_epoch_indices_are_the_epochs_train_indices():
  n, batch, seed = 50, 8, 3  # 6 steps per epoch; 2 examples left out.
  for epoch in (0, 4):
    rows = pipeline.epoch_indices(n, batch, seed, epoch)
    assert rows.shape == (6, batch) and rows.dtype == np.int32
    for within in range(6):
      np.testing.assert_array_equal(
          rows[within],
          pipeline.train_indices(n, batch, seed, epoch * 6 + within))


def test_train_indices_cannot_corrupt_the_cache():
  idx = pipeline.train_indices(20, 5, 0, 0)
  idx[:] = -1
  assert pipeline.train_indices(20, 5, 0, 0).min() >= 0


@pytest.mark.parametrize("batch_size", [0, -2, 104, 2.0])
def test_bad_batch_size(batch_size):
  with pytest.raises(ConfigError, match="batch_size"):
    pipeline.steps_per_epoch(103, batch_size)


@pytest.mark.parametrize("n, batch", [(23, 5), (20, 5), (3, 8), (1, 1)])
def test_eval_batches_cover_every_example_once(n, batch):
  x = np.arange(n * 6, dtype=np.uint8).reshape(n, 3, 2) + 1
  y = np.arange(n, dtype=np.int32)
  batches = list(pipeline.eval_batches(x, y, batch))
  assert len(batches) == -(-n // batch)
  for xb, yb, mask in batches:
    assert xb.shape == (batch, 3, 2) and xb.dtype == np.uint8
    assert yb.shape == (batch,) and yb.dtype == np.int32
    assert mask.shape == (batch,) and mask.dtype == np.float32
  masks = np.concatenate([m for _, _, m in batches])
  real = masks == 1
  assert set(np.unique(masks)) <= {0.0, 1.0} and real.sum() == n
  assert real[:n].all()  # Padding only at the end.
  all_x = np.concatenate([b[0] for b in batches])
  all_y = np.concatenate([b[1] for b in batches])
  np.testing.assert_array_equal(all_x[real], x)
  np.testing.assert_array_equal(all_y[real], y)
  assert not all_x[~real].any()


def test_eval_batches_of_nothing():
  assert not list(pipeline.eval_batches(np.zeros((0, 2)), np.zeros(0), 4))


def test_named_streams_are_not_epoch_orders():
  # The validation split must not reuse the randomness of any epoch's order.
  held = pipeline.rng(0, "holdout").permutation(100)
  for epoch in range(20):
    assert not np.array_equal(
        held, np.random.default_rng([0, epoch]).permutation(100))
  noise = pipeline.rng(0, "label_noise").permutation(100)
  assert not np.array_equal(held, noise)
