"""Gradient Centralisation (GC) and neuron-wise Gradient Standardisation (NGS).

Both act on each output neuron's fan-in slice of a weight gradient. Flax
stores kernels as ``(in, out)`` (Dense) and ``(..., in, out)`` (Conv), so the
fan-in is every axis but the LAST. ``optax.centralize`` follows PyTorch's
``(out, in, ...)`` layout and averages over every axis but the FIRST; on a
Flax kernel it therefore centres each input unit's slice across output units,
which is not Gradient Centralisation. The transformations here use the Flax
layout.

Which leaves are transformed is decided by default from ``ndim`` alone, which
is right for Flax ``Dense`` and ``Conv`` kernels and wrong for other layouts:
an ``nn.DenseGeneral`` kernel ``(in, heads, head_dim)`` is centred over
``(in, heads)`` rather than ``in``, its 2-D bias ``(heads, head_dim)`` is
centred as if it were a kernel, and an ``nn.Embed`` table ``(vocab, features)``
is centred over the whole vocabulary, which moves the rows of tokens absent
from the batch. A ``mask``, in optax's idiom (``optax.masked``), overrides the
rule leaf by leaf: ``False`` passes a leaf through, a tuple of axes names its
fan-in.
"""

from collections.abc import Callable
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gnp import _checks

# A pytree with the params' structure whose leaves are True, False or a tuple
# of axes, or a function of the updates that returns one (see `centralize`).
Mask = Any | Callable[[Any], Any]


def _is_flag(spec) -> bool:
  return isinstance(spec, (bool, np.bool_))


def _is_axis(spec) -> bool:
  return isinstance(spec, numbers.Integral) and not _is_flag(spec)


def _check_mask_leaves(mask) -> None:
  """Rejects leaves that can be neither a flag nor part of a tuple of axes."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if not (_is_flag(leaf) or _is_axis(leaf)):
      raise ValueError(
          f"mask{jax.tree_util.keystr(path)} must be a Python bool or a tuple"
          f" of int axes, got {leaf!r}."
      )


def _flatten_mask(mask, updates, treedef) -> list[Any]:
  """One mask entry per leaf of ``updates``, in ``treedef``'s order."""
  if mask is None:
    return [True] * treedef.num_leaves
  if callable(mask):
    mask = mask(updates)
    _check_mask_leaves(mask)
  try:
    # Stops at the updates' leaves, so a tuple of axes there stays whole.
    return treedef.flatten_up_to(mask)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "mask must have the structure of the params (and updates), with"
        f" True, False or a tuple of axes at each leaf: {e}"
    ) from None


def _fan_in_axes(path, g, spec, min_ndim) -> tuple[int, ...] | None:
  """The axes to reduce ``g`` over, or None to pass it through unchanged."""
  if _is_flag(spec):
    if not spec or jnp.ndim(g) < min_ndim:
      return None
    return tuple(range(g.ndim - 1))
  ndim = jnp.ndim(g)
  if (isinstance(spec, (tuple, list)) and spec
      and all(_is_axis(a) and -ndim <= a < ndim for a in spec)):
    axes = tuple(sorted({int(a) % ndim for a in spec}))
    if len(axes) == len(spec):
      return axes
  raise ValueError(
      f"mask{jax.tree_util.keystr(path)} must be True, False or a non-empty"
      f" tuple of distinct axes of a leaf of shape {jnp.shape(g)}, got"
      f" {spec!r}."
  )


def _per_output_neuron(
    fn: Callable[[jax.Array, tuple[int, ...]], jax.Array],
    conv_only: bool,
    mask: Mask | None,
) -> optax.GradientTransformation:
  """Applies ``fn(g, fan_in_axes)`` to every weight leaf of the updates."""
  # Biases and norm scales (ndim <= 1) have no fan-in; Dense kernels are 2-D,
  # so excluding them leaves only convolution kernels (the paper's GCC).
  min_ndim = 3 if conv_only else 2
  if mask is not None and not callable(mask):
    _check_mask_leaves(mask)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    specs = _flatten_mask(mask, updates, treedef)
    out = []
    for (path, g), spec in zip(leaves, specs):
      axes = _fan_in_axes(path, g, spec, min_ndim)
      # Hyperparameters may be float32 arrays; keep low-precision leaves as is.
      out.append(g if axes is None else fn(g, axes).astype(g.dtype))
    return treedef.unflatten(out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def centralize(
    *, conv_only: bool = False, mask: Mask | None = None
) -> optax.GradientTransformation:
  """Centralises each output neuron's gradient over its fan-in (Flax layout).

  By default, for every leaf ``g`` with ``g.ndim > 1`` (``> 2`` if
  ``conv_only``)::

    g <- g - mean(g, axis=range(g.ndim - 1), keepdims=True)

  and with a ``mask``, for every leaf whose mask entry is a tuple ``axes``::

    g <- g - mean(g, axis=axes, keepdims=True)

  ``optax.centralize`` differs: it subtracts the mean over every axis but the
  FIRST (PyTorch's ``(out, in, ...)`` layout) and is therefore wrong for Flax
  kernels, where it centres each input unit's slice across output units.

  Args:
    conv_only: if True, only convolution kernels (``ndim > 2``) are centralised
      (the paper's GCC variant); Dense kernels pass through. With a mask, it
      acts only where the mask says ``True``.
    mask: which leaves to transform and over which axes, in optax's idiom
      (``optax.masked``): a pytree with exactly the params' structure (not a
      prefix of it), or a callable that returns one when called on the updates
      (which have the params' structure and shapes; it must read nothing else,
      as the mask must be static under ``jit``). Each of its leaves is

      * ``True``: the default rule (every axis but the last, if ``g.ndim > 1``,
        ``> 2`` with ``conv_only``; lower-dimensional leaves pass through);
      * ``False``: the leaf passes through unchanged;
      * a non-empty tuple of distinct ``int`` axes (negative ones count from
        the end): the leaf is centred over exactly these axes, each index of
        the other axes being one neuron, whatever its ``ndim`` and
        ``conv_only``; e.g. ``(0,)`` for an ``nn.DenseGeneral`` kernel
        ``(in, heads, head_dim)``.

      ``None`` (the default) is ``True`` at every leaf. With only ``True`` and
      ``False`` this equals ``optax.masked(centralize(), mask)``. Under
      ``optax.inject_hyperparams``, name a callable mask in ``static_args``, or
      it is taken for a schedule.

  Returns:
    A :class:`optax.GradientTransformation` with an ``optax.EmptyState``.

  Raises:
    ValueError: if a leaf of a pytree ``mask`` is neither a bool nor an int; on
      the first update, if the mask's structure is not the updates', or an
      entry is not ``True``, ``False`` or axes that fit its leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gnp
    >>> opt = optax.chain(gnp.transforms.centralize(), optax.adam(1e-3))
    >>> g = jnp.array([[1., 2.], [3., 6.]])
    >>> tx = gnp.transforms.centralize()
    >>> print(tx.update(g, tx.init(g))[0])
    [[-1. -2.]
     [ 1.  2.]]

    An ``(in, heads, head_dim)`` kernel centred over ``in`` alone, and an
    embedding table left as it is:

    >>> g = {"kernel": jnp.array([[[1., 2.], [3., 4.]], [[5., 6.], [7., 9.]]]),
    ...      "embedding": jnp.array([[1., 0.], [0., 0.]])}
    >>> tx = gnp.transforms.centralize(
    ...     mask={"kernel": (0,), "embedding": False})
    >>> out = tx.update(g, tx.init(g))[0]
    >>> print(out["kernel"][:, 0])
    [[-2. -2.]
     [ 2.  2.]]
    >>> print(out["embedding"])
    [[1. 0.]
     [0. 0.]]

  References:
    Yong et al., `Gradient Centralization: A New Optimization Technique for
    Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
  """
  return _per_output_neuron(
      lambda g, axes: g - g.mean(axes, keepdims=True), conv_only, mask
  )


def standardize(
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    conv_only: bool = False,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
  """Standardises each output neuron's gradient over its fan-in (Flax layout).

  By default, for every leaf ``g`` with ``g.ndim > 1`` (``> 2`` if
  ``conv_only``), with ``axes = range(g.ndim - 1)`` and the population
  (``ddof=0``) std::

    g <- (g - mean(g, axes)) / (std(g, axes) + eps)

  With a ``mask``, a leaf whose mask entry is a tuple of axes is standardised
  by the same formula over exactly those axes.

  ``optax.centralize`` reduces over every axis but the FIRST (PyTorch's
  ``(out, in, ...)`` layout) and is therefore wrong for Flax kernels, where it
  centres each input unit's slice across output units; here the fan-in is
  every axis but the LAST.

  Args:
    eps: non-negative constant added to the std. With ``eps = 0`` a neuron
      whose fan-in gradient is constant (a dead ReLU's: all zeros) gets a
      zero gradient, not NaN.
    conv_only: if True, only convolution kernels (``ndim > 2``) are
      standardised; Dense kernels pass through. With a mask, it acts only
      where the mask says ``True``.
    mask: as in :func:`centralize`: a pytree with exactly the params'
      structure, or a callable returning one from the updates, whose leaves
      are ``True`` (the default rule), ``False`` (pass through unchanged) or a
      non-empty tuple of distinct ``int`` axes to standardise over, whatever
      the leaf's ``ndim`` and ``conv_only``. ``None`` (the default) is
      ``True`` at every leaf.

  Returns:
    A :class:`optax.GradientTransformation` with an ``optax.EmptyState``.

  Raises:
    ValueError: if ``eps`` is a concrete negative number or NaN, or ``mask`` is
      malformed (see :func:`centralize`).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import gnp
    >>> opt = optax.chain(gnp.transforms.standardize(), optax.adam(1e-3))
    >>> g = jnp.array([[1., 2.], [3., 6.]])
    >>> tx = gnp.transforms.standardize()
    >>> print(tx.update(g, tx.init(g))[0])
    [[-1. -1.]
     [ 1.  1.]]

  References:
    Yong et al., `Gradient Centralization: A New Optimization Technique for
    Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
  """
  _checks.check_nonnegative("eps", eps)

  def fn(g, axes):
    centred = g - g.mean(axes, keepdims=True)
    scale = g.std(axes, keepdims=True) + eps
    # A neuron whose gradient is constant over its fan-in (a dead ReLU's is
    # all zeros) centres to zeros; with eps = 0 that is 0 / 0, which must
    # stay 0 rather than turn the whole update NaN.
    return jnp.where(scale > 0, centred / jnp.where(scale > 0, scale, 1), 0)

  return _per_output_neuron(fn, conv_only, mask)
