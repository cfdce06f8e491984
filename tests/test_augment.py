"""Tests for gnp.data.augment against numpy references and expected rates.

Statistical checks use thousands of examples and 5-sigma bounds: a correct
implementation fails them with probability below 1e-6, and the keys are
fixed, so they either always pass or always fail.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gnp.data import augment
from gnp.errors import ConfigError

KEY = jax.random.key(0)


def _images(batch, height=6, width=6, channels=2, seed=0):
  """Strictly positive, distinct values: zeros only come from padding or
  Cutout, and every shifted or mirrored copy is told apart."""
  rng = np.random.default_rng(seed)
  return rng.uniform(1, 2, (batch, height, width, channels)).astype(np.float32)


def _within(count, n, p, sigmas=5.0):
  return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def _pad(x, padding, axes):
  widths = [(0, 0)] * x.ndim
  for axis in axes:
    widths[axis] = (padding, padding)
  return np.pad(x, widths)


# --- shapes, dtypes, keys ----------------------------------------------------

OPS = {
    "crop": lambda k, x: augment.random_crop(k, x, 2),
    "flip": augment.random_flip,
    "cutout": lambda k, x: augment.cutout(k, x, 3),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_image_ops_keep_shape_dtype_and_follow_the_key(name, dtype):
  op = jax.jit(OPS[name])
  x = jnp.asarray(_images(64), dtype)
  out = op(KEY, x)
  assert out.shape == x.shape and out.dtype == dtype
  np.testing.assert_array_equal(out, op(KEY, x))
  assert not np.array_equal(out, op(jax.random.key(1), x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(64, 40), (64, 40, 2)])
def test_noise_and_shift_keeps_shape_dtype_and_follows_the_key(dtype, shape):
  op = jax.jit(lambda k, x: augment.noise_and_shift(k, x, 0.1, 3))
  x = jnp.ones(shape, dtype)
  out = op(KEY, x)
  assert out.shape == shape and out.dtype == dtype
  np.testing.assert_array_equal(out, op(KEY, x))
  assert not np.array_equal(out, op(jax.random.key(1), x))


# --- random crop -------------------------------------------------------------


def _crop_offsets(x, out, padding):
  """For each example, the (row, col) offsets of its window in the zero-padded
  input, found by trying every offset; -1 where none matches."""
  padded = _pad(x, padding, (1, 2))
  height, width = x.shape[1:3]
  offsets = np.full((len(x), 2), -1)
  for dy, dx in itertools.product(range(2 * padding + 1), repeat=2):
    window = padded[:, dy:dy + height, dx:dx + width]
    match = np.all(window == out, axis=(1, 2, 3))
    assert not np.any(match & (offsets[:, 0] >= 0))  # At most one match.
    offsets[match] = (dy, dx)
  return offsets


def test_random_crop_is_a_window_of_the_padded_input():
  x = _images(8, height=5, width=7, channels=3)
  out = np.asarray(augment.random_crop(KEY, jnp.asarray(x), padding=3))
  assert (_crop_offsets(x, out, 3) >= 0).all()


def test_random_crop_offsets_are_uniform_and_independent():
  padding, batch = 2, 4000
  x = _images(batch)
  out = np.asarray(augment.random_crop(KEY, jnp.asarray(x), padding))
  offsets = _crop_offsets(x, out, padding)
  assert (offsets >= 0).all()
  values = 2 * padding + 1
  for axis in (0, 1):
    counts = np.bincount(offsets[:, axis], minlength=values)
    assert all(_within(c, batch, 1 / values) for c in counts), counts
  # Each (row, col) pair, 1/25 each, so rows and columns are not tied.
  pairs = np.bincount(offsets[:, 0] * values + offsets[:, 1],
                      minlength=values**2)
  assert all(_within(c, batch, 1 / values**2) for c in pairs), pairs


def test_random_crop_without_padding_is_the_identity():
  x = jnp.asarray(_images(4))
  np.testing.assert_array_equal(augment.random_crop(KEY, x, 0), x)


# --- random flip -------------------------------------------------------------


def test_random_flip_mirrors_about_half():
  batch = 4000
  x = _images(batch)
  out = np.asarray(augment.random_flip(KEY, jnp.asarray(x)))
  same = np.all(out == x, axis=(1, 2, 3))
  mirrored = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)  # Exactly one of the two, every time.
  assert _within(mirrored.sum(), batch, 0.5)


# --- Cutout ------------------------------------------------------------------


def _holes(out):
  """Per example, the bounding box of its zeroed pixels and whether the
  zeroed pixels fill it: (top, bottom, left, right, filled)."""
  boxes = []
  for hole in np.all(out == 0, axis=-1):
    rows, cols = np.nonzero(hole.any(1))[0], np.nonzero(hole.any(0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    filled = hole[top:bottom, left:right].all() and hole.sum() == (
        (bottom - top) * (right - left))
    boxes.append((top, bottom, left, right, filled))
  return np.array(boxes)


def _expected_cutout_area(height, width, size):
  """Mean and variance of the zeroed area over all centres (brute force)."""
  areas = []
  for cy, cx in itertools.product(range(height), range(width)):
    rows = len(set(range(cy - size // 2, cy - size // 2 + size)) &
               set(range(height)))
    cols = len(set(range(cx - size // 2, cx - size // 2 + size)) &
               set(range(width)))
    areas.append(rows * cols)
  return np.mean(areas), np.var(areas)


@pytest.mark.parametrize("size", [3, 4])
def test_cutout_zeroes_one_clipped_square(size):
  batch, height, width = 3000, 10, 9
  x = _images(batch, height, width)
  out = np.asarray(augment.cutout(KEY, jnp.asarray(x), size))
  kept = np.any(out != 0, axis=-1)
  np.testing.assert_array_equal(out[kept], x[kept])  # Elsewhere untouched.
  top, bottom, left, right, filled = _holes(out).T
  assert filled.all()  # One solid rectangle, all channels.
  interior = (top > 0) & (left > 0) & (bottom < height) & (right < width)
  assert interior.sum() > batch / 10
  assert np.all(bottom[interior] - top[interior] == size)
  assert np.all(right[interior] - left[interior] == size)
  assert np.all(bottom - top <= size) and np.all(right - left <= size)
  # The zeroed area: mean over a uniform centre, as enumerated.
  mean, var = _expected_cutout_area(height, width, size)
  area = (bottom - top) * (right - left)
  assert abs(area.mean() - mean) < 5 * np.sqrt(var / batch)


def test_cutout_of_size_zero_is_the_identity():
  x = jnp.asarray(_images(4))
  np.testing.assert_array_equal(augment.cutout(KEY, x, 0), x)


# --- 1-D noise and shift -----------------------------------------------------


def _best_shifts(x, out, max_shift):
  """Per example, the shift s of the zero-padded input closest to the
  output (out[t] ~ x[t - s]), and the residual of that fit."""
  padded = _pad(x, max_shift, (1,))
  length = x.shape[1]
  shifts = np.arange(-max_shift, max_shift + 1)
  errors = np.stack([
      np.sum((padded[:, max_shift - s:max_shift - s + length] - out) ** 2,
             axis=tuple(range(1, x.ndim)))
      for s in shifts
  ])
  best = np.argmin(errors, axis=0)
  windows = np.stack([padded[i, max_shift - s:max_shift - s + length]
                      for i, s in enumerate(shifts[best])])
  return shifts[best], out - windows


def test_shift_is_zero_padded_and_uniform():
  batch, max_shift = 4000, 3
  x = np.random.default_rng(1).normal(size=(batch, 40)).astype(np.float32)
  out = np.asarray(augment.noise_and_shift(KEY, jnp.asarray(x), 0.0, max_shift))
  shifts, residual = _best_shifts(x, out, max_shift)
  np.testing.assert_array_equal(residual, 0)  # Exactly a shifted copy.
  counts = np.bincount(shifts + max_shift, minlength=2 * max_shift + 1)
  assert all(_within(c, batch, 1 / (2 * max_shift + 1)) for c in counts), counts


def test_noise_alone_has_the_requested_moments():
  x = np.random.default_rng(2).normal(size=(1000, 40)).astype(np.float32)
  out = np.asarray(augment.noise_and_shift(KEY, jnp.asarray(x), 0.3, 0))
  noise = (out - x).ravel()
  n = noise.size  # 40,000 draws.
  assert abs(noise.mean()) < 5 * 0.3 / np.sqrt(n)
  assert abs(noise.std() / 0.3 - 1) < 5 / np.sqrt(2 * n)


def test_noise_and_shift_together():
  # Noise after the shift: the residual of the best shift is the noise,
  # padded positions included.
  batch, max_shift, std = 2000, 4, 0.05
  x = np.random.default_rng(3).normal(size=(batch, 40, 2)).astype(np.float32)
  out = np.asarray(augment.noise_and_shift(KEY, jnp.asarray(x), std,
                                           max_shift))
  shifts, residual = _best_shifts(x, out, max_shift)
  assert abs(residual.std() / std - 1) < 0.02
  counts = np.bincount(shifts + max_shift, minlength=2 * max_shift + 1)
  assert all(_within(c, batch, 1 / (2 * max_shift + 1)) for c in counts), counts


# --- make_augment ------------------------------------------------------------


def _augment_config(**overrides):
  fields = dict(crop_padding=0, flip=False, cutout=0, noise_std=0.0,
                max_shift=0)
  return ml_collections.ConfigDict({**fields, **overrides})


def test_all_off_is_the_identity():
  x = jnp.asarray(_images(4))
  np.testing.assert_array_equal(
      augment.make_augment(_augment_config())(KEY, x), x)


def test_turning_one_op_on_leaves_the_others_draws_alone():
  # Crop + flip: each output is the crop-only output or its mirror.
  x = jnp.asarray(_images(500))
  cropped = np.asarray(augment.make_augment(_augment_config(crop_padding=2))(
      KEY, x))
  both = np.asarray(jax.jit(augment.make_augment(
      _augment_config(crop_padding=2, flip=True)))(KEY, x))
  same = np.all(both == cropped, axis=(1, 2, 3))
  mirrored = np.all(both == cropped[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and mirrored.any() and same.any()


def test_full_cifar_recipe_under_jit():
  config = _augment_config(crop_padding=4, flip=True, cutout=8)
  fn = jax.jit(augment.make_augment(config))
  x = jnp.asarray(_images(16, 32, 32, 3))
  out = fn(KEY, x)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(out, fn(KEY, x))
  assert np.any(np.all(np.asarray(out) == 0, axis=-1))  # Cutout holes.


@pytest.mark.parametrize("field, value", [
    ("crop_padding", -1), ("cutout", -8), ("max_shift", -2),
    ("crop_padding", 1.5), ("noise_std", -0.1), ("noise_std", float("nan")),
    ("flip", 1),
])
def test_bad_options_raise_one_line_naming_them(field, value):
  with pytest.raises(ConfigError) as error:
    augment.make_augment(_augment_config(**{field: value}))
  assert f"augment.{field}" in str(error.value)
  assert "\n" not in str(error.value)


def test_options_that_do_not_fit_the_data_raise_config_errors():
  flip = augment.make_augment(_augment_config(flip=True))
  with pytest.raises(ConfigError, match="augment.flip"):
    flip(KEY, jnp.ones((4, 40)))
  shift = augment.make_augment(_augment_config(max_shift=2))
  with pytest.raises(ConfigError, match="augment.max_shift"):
    shift(KEY, jnp.ones((4, 8, 8, 3)))


@pytest.mark.parametrize("field, shape", [
    ("crop_padding", (2, 8, 8, 3)), ("cutout", (2, 8, 6, 3)),
    ("max_shift", (2, 40))])
def test_sizes_beyond_the_input_raise_config_errors(field, shape):
  side = min(shape[1:3])
  fits = augment.make_augment(_augment_config(**{field: side}))
  assert fits(KEY, jnp.ones(shape)).shape == shape
  too_big = augment.make_augment(_augment_config(**{field: side + 1}))
  with pytest.raises(ConfigError, match=rf"augment.{field} must be an integer"
                     rf" in \[0, {side}\]"):
    too_big(KEY, jnp.ones(shape))
