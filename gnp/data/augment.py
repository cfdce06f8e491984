"""Data augmentation in JAX, on the device, inside the jitted train step.

Every function takes a PRNG key and a preprocessed float batch and draws an
independent transformation per example; the same key gives the same output.
Images are [B, H, W, C]; 1-D signals (mnist1d) are [B, T] or [B, T, C].

The batch is already standardised when it gets here, so the zeros that
padding (crop, shift) and Cutout insert are the dataset's mean, which is what
DeVries & Taylor's Cutout (applied after normalisation) inserts too. The
usual PyTorch random crop pads the raw image with black instead; the
difference is a border of mean colour instead of a black one.

>>> import ml_collections
>>> augment = make_augment(ml_collections.ConfigDict(dict(
...     crop_padding=4, flip=True, cutout=8, noise_std=0.0, max_shift=0)))
>>> augment(jax.random.key(0), jnp.ones((2, 32, 32, 3))).shape
(2, 32, 32, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import numbers

import jax
import jax.numpy as jnp
import ml_collections

from gnp.errors import ConfigError

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _check_rank(name: str, x: jax.Array, ndims: Sequence[int], layout: str):
  if x.ndim not in ndims:
    raise ValueError(f"{name} expects a batch {layout}, got shape {x.shape}.")


def _check_size(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < 0):
    raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def _windows(x: jax.Array, offsets_BxA: jax.Array, axes: Sequence[int],
             padding: int) -> jax.Array:
  """Per-example windows of ``x``'s size out of ``x`` zero-padded on ``axes``.

  Example b's window starts at ``offsets_BxA[b, k]`` along ``axes[k]`` of the
  input padded by ``padding`` on both sides, so offset ``padding`` is the
  identity. A vmapped dynamic_slice lowers to one gather of contiguous
  windows, with no per-example loop.
  """
  pad_width = [(0, 0)] * x.ndim
  for axis in axes:
    pad_width[axis] = (padding, padding)
  padded = jnp.pad(x, pad_width)

  def window(example, offsets_A):
    starts = [jnp.zeros((), offsets_A.dtype)] * (x.ndim - 1)
    for k, axis in enumerate(axes):
      starts[axis - 1] = offsets_A[k]
    return jax.lax.dynamic_slice(example, starts, x.shape[1:])

  return jax.vmap(window)(padded, offsets_BxA)


def random_crop(key: jax.Array, x_BHWC: jax.Array,
                padding: int = 4) -> jax.Array:
  """Random crop of the input's size from the input zero-padded by ``padding``.

  Each example's offsets (row and column, independent) are uniform in
  ``[0, 2 * padding]``, so the image moves by up to ``padding`` pixels in
  each direction, the uncovered border filled with zeros.

  Args:
    key: a PRNG key.
    x_BHWC: images [B, H, W, C].
    padding: a non-negative Python int.

  Returns:
    An array of the input's shape and dtype.
  """
  _check_rank("random_crop", x_BHWC, (4,), "[B, H, W, C]")
  _check_size("padding", padding)
  if padding == 0:
    return x_BHWC
  offsets = jax.random.randint(key, (x_BHWC.shape[0], 2), 0, 2 * padding + 1)
  return _windows(x_BHWC, offsets, axes=(1, 2), padding=padding)


def random_flip(key: jax.Array, x_BHWC: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  _check_rank("random_flip", x_BHWC, (4,), "[B, H, W, C]")
  flip = jax.random.bernoulli(key, 0.5, (x_BHWC.shape[0], 1, 1, 1))
  return jnp.where(flip, x_BHWC[:, :, ::-1, :], x_BHWC)


def cutout(key: jax.Array, x_BHWC: jax.Array, size: int) -> jax.Array:
  """Cutout: zeroes a ``size`` x ``size`` square at a random centre per image.

  The centre is uniform over the pixels; rows ``[cy - size // 2, cy - size
  // 2 + size)`` and the like columns are zeroed, clipped at the borders, so
  a square near an edge is partly outside the image (as in the paper). For
  odd sizes the reference code zeroes (size - 1)² pixels; here it is size².

  Reference: T. DeVries and G. W. Taylor, "Improved Regularization of
  Convolutional Neural Networks with Cutout", 2017,
  https://arxiv.org/abs/1708.04552

  Args:
    key: a PRNG key.
    x_BHWC: images [B, H, W, C].
    size: the side of the square, a non-negative Python int; 0 is a no-op.

  Returns:
    An array of the input's shape and dtype.
  """
  _check_rank("cutout", x_BHWC, (4,), "[B, H, W, C]")
  _check_size("size", size)
  if size == 0:
    return x_BHWC
  batch, height, width, _ = x_BHWC.shape
  key_rows, key_cols = jax.random.split(key)
  top_B = jax.random.randint(key_rows, (batch,), 0, height) - size // 2
  left_B = jax.random.randint(key_cols, (batch,), 0, width) - size // 2
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows_BxH = (rows >= top_B[:, None]) & (rows < top_B[:, None] + size)
  in_cols_BxW = (cols >= left_B[:, None]) & (cols < left_B[:, None] + size)
  hole_BHW1 = (in_rows_BxH[:, :, None] & in_cols_BxW[:, None, :])[..., None]
  return jnp.where(hole_BHW1, jnp.zeros((), x_BHWC.dtype), x_BHWC)


def noise_and_shift(key: jax.Array, x_BT: jax.Array, noise_std,
                    max_shift: int) -> jax.Array:
  """Shifts each 1-D signal by a random offset, then adds Gaussian noise.

  The shift is uniform over ``{-max_shift, ..., max_shift}`` positions along
  axis 1, and zero-padded rather than circular: a circular shift would join
  the signal's two ends, a discontinuity real mnist1d samples never have,
  whereas zero is the dataset's mean. The noise, i.i.d. N(0, noise_std²),
  comes after the shift so that the padded positions are as noisy as the
  rest.

  Args:
    key: a PRNG key.
    x_BT: signals [B, T] or [B, T, C].
    noise_std: the noise's standard deviation (may be traced); 0 for none.
    max_shift: a non-negative Python int; 0 for no shift.

  Returns:
    An array of the input's shape and dtype.
  """
  _check_rank("noise_and_shift", x_BT, (2, 3), "[B, T] or [B, T, C]")
  _check_size("max_shift", max_shift)
  key_shift, key_noise = jax.random.split(key)
  if max_shift:
    offsets = jax.random.randint(key_shift, (x_BT.shape[0], 1), 0,
                                 2 * max_shift + 1)
    x_BT = _windows(x_BT, offsets, axes=(1,), padding=max_shift)
  if isinstance(noise_std, numbers.Real) and noise_std == 0:
    return x_BT
  noise = jax.random.normal(key_noise, x_BT.shape, x_BT.dtype)
  return x_BT + (noise * noise_std).astype(x_BT.dtype)


def make_augment(config: ml_collections.ConfigDict) -> Augment:
  """The augmentation ``config`` describes, as ``augment(key, x) -> x``.

  Images go through random crop, flip, then Cutout (the usual CIFAR order,
  Cutout last as in DeVries & Taylor); 1-D signals through shift and noise.
  Each operation has its own part of the key, so turning one on or off does
  not change the draws of the others.

  Args:
    config: the ``augment`` section: ``crop_padding`` (int, 0 off), ``flip``
      (bool), ``cutout`` (int, the square's side, 0 off), ``noise_std``
      (float, 0 off), ``max_shift`` (int, 0 off).

  Returns:
    A jittable function of a PRNG key and a preprocessed batch; the identity
    when everything is off.

  Raises:
    ConfigError: for a negative or non-numeric field, here; and when the
      returned function is traced on a batch of the wrong rank (image options
      on 1-D signals, or the reverse).
  """
  crop_padding = _config_int(config, "crop_padding")
  cutout_size = _config_int(config, "cutout")
  max_shift = _config_int(config, "max_shift")
  flip = config.flip
  if not isinstance(flip, bool):
    raise ConfigError(f"augment.flip must be True or False, got {flip!r}.")
  noise_std = config.noise_std
  if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or (
      not noise_std >= 0):  # also rejects NaN
    raise ConfigError(
        f"augment.noise_std must be a non-negative number, got {noise_std!r}."
    )
  image_ops = [name for name, on in (("crop_padding", crop_padding),
                                     ("flip", flip), ("cutout", cutout_size))
               if on]
  signal_ops = [name for name, on in (("noise_std", noise_std),
                                      ("max_shift", max_shift)) if on]
  if not image_ops and not signal_ops:
    return _identity

  def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    if image_ops and x.ndim != 4:
      raise ConfigError(f"augment.{image_ops[0]} applies to images [B, H, W,"
                        f" C]; this dataset's batches have shape {x.shape}.")
    if signal_ops and x.ndim not in (2, 3):
      raise ConfigError(f"augment.{signal_ops[0]} applies to 1-D signals [B,"
                        f" T(, C)]; this dataset's batches have shape"
                        f" {x.shape}.")
    # Larger sizes pad or blank beyond the whole input (and 10**12 would not
    # fit in memory): `gnp.config.validate` refuses them for named datasets.
    side = min(x.shape[1:3]) if image_ops else x.shape[1]
    for name, size in (("crop_padding", crop_padding), ("cutout", cutout_size),
                       ("max_shift", max_shift)):
      if size > side:
        raise ConfigError(f"augment.{name} must be an integer in [0, {side}]"
                          f" (the inputs' side), got augment.{name}={size}.")
    key_crop, key_flip, key_cutout, key_signal = jax.random.split(key, 4)
    if crop_padding:
      x = random_crop(key_crop, x, crop_padding)
    if flip:
      x = random_flip(key_flip, x)
    if cutout_size:
      x = cutout(key_cutout, x, cutout_size)
    if signal_ops:
      x = noise_and_shift(key_signal, x, noise_std, max_shift)
    return x

  return augment


def _identity(key: jax.Array, x: jax.Array) -> jax.Array:
  del key
  return x


def _config_int(config: ml_collections.ConfigDict, field: str) -> int:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < 0):
    raise ConfigError(
        f"augment.{field} must be a non-negative integer, got {value!r}."
    )
  return int(value)
