"""Tests for gnp.transforms (GC and NGS), against brute-force numpy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gnp import transforms

SEEDS = [0, 1, 2]
KERNEL_SHAPES = [(5, 7), (3, 3, 4, 6), (3, 4, 6)]  # Dense, Conv2D, Conv1D.


def _rand(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype) + 0.5


def _np_gc(g):
  """Loops over output units: each fan-in slice minus its own mean."""
  g = np.asarray(g, np.float64)
  out = np.empty_like(g)
  for o in range(g.shape[-1]):
    s = g[..., o]
    out[..., o] = s - s.mean()
  return out


def _np_ngs(g, eps):
  g = np.asarray(g, np.float64)
  out = np.empty_like(g)
  for o in range(g.shape[-1]):
    s = g[..., o]
    out[..., o] = (s - s.mean()) / (s.std() + eps)  # numpy std is ddof=0.
  return out


def _apply(tx, updates):
  return tx.update(updates, tx.init(updates))[0]


def _fan_in_stats(x):
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return x.mean(0), x.std(0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_centralize_matches_numpy_loop(seed, shape):
  g = _rand(seed, shape)
  out = _apply(transforms.centralize(), jnp.asarray(g))
  np.testing.assert_allclose(out, _np_gc(g), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_fan_in_stats(out)[0], 0.0, atol=1e-5)
  assert out.dtype == jnp.float32 and out.shape == shape


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_standardize_matches_numpy_loop(seed, shape):
  g = _rand(seed, shape)
  out = _apply(transforms.standardize(1e-12), jnp.asarray(g))
  np.testing.assert_allclose(out, _np_ngs(g, 1e-12), rtol=1e-4, atol=1e-5)
  mean, std = _fan_in_stats(out)
  np.testing.assert_allclose(mean, 0.0, atol=1e-5)
  np.testing.assert_allclose(std, 1.0, atol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps", [0.5, 3.0])
def test_standardize_honours_eps(seed, eps):
  g = _rand(seed, (3, 3, 4, 6))
  out = _apply(transforms.standardize(eps), jnp.asarray(g))
  np.testing.assert_allclose(out, _np_ngs(g, eps), rtol=1e-5, atol=1e-6)
  # eps shrinks each output's std from 1 to s / (s + eps), s the input std.
  s = _fan_in_stats(g)[1]
  np.testing.assert_allclose(_fan_in_stats(out)[1], s / (s + eps), rtol=1e-5)


@pytest.mark.parametrize(
    "tx", [transforms.centralize(), transforms.standardize(),
           transforms.centralize(conv_only=True),
           transforms.standardize(conv_only=True)])
def test_biases_and_scalars_untouched(tx):
  tree = {"bias": jnp.asarray(_rand(0, (7,))), "scale": jnp.float32(3.5),
          "b16": jnp.asarray(_rand(1, (4,)), jnp.bfloat16)}
  out = _apply(tx, tree)
  for k, v in tree.items():
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(v))
    assert out[k].dtype == v.dtype


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_conv_only_skips_dense(seed, name):
  factory = getattr(transforms, name)
  dense, conv, conv1d = (jnp.asarray(_rand(seed + i, s))
                         for i, s in enumerate(KERNEL_SHAPES))
  out = _apply(factory(conv_only=True), {"d": dense, "c": conv, "c1": conv1d})
  np.testing.assert_array_equal(out["d"], dense)
  ref = _np_gc if name == "centralize" else (lambda g: _np_ngs(g, 1e-8))
  np.testing.assert_allclose(out["c"], ref(conv), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["c1"], ref(conv1d), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_differs_from_optax_centralize(seed):
  g = jnp.asarray(_rand(seed, (5, 7)))  # Flax Dense layout: (in, out).
  theirs = _apply(optax.centralize(), g)
  ours = _apply(transforms.centralize(), g)
  # optax centres each input row across outputs, not each fan-in.
  np.testing.assert_allclose(np.mean(theirs, axis=-1), 0.0, atol=1e-5)
  assert np.max(np.abs(np.mean(theirs, axis=0))) > 1e-2
  np.testing.assert_allclose(np.mean(ours, axis=0), 0.0, atol=1e-5)
  # Ours is optax's on the PyTorch (out, in) layout, transposed back.
  np.testing.assert_allclose(
      ours, _apply(optax.centralize(), g.T).T, rtol=1e-5, atol=1e-6)


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.Dense(2)(x)


@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_chain_on_flax_params(name):
  factory = getattr(transforms, name)
  model = _Net()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  opt = optax.chain(factory(), optax.adam(1e-2))
  first, adam = factory(), optax.adam(1e-2)

  @jax.jit
  def step(p, s, ref_s):
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    # Reference: the transform alone, then a separate Adam.
    gc = first.update(g, first.init(g))[0]
    ref_u, ref_s = adam.update(gc, ref_s, p)
    return optax.apply_updates(p, u), s, u, gc, ref_u, ref_s

  state, ref_state = opt.init(params), adam.init(params)
  losses = [loss(params)]
  for _ in range(3):
    params, state, u, gc, ref_u, ref_state = step(params, state, ref_state)
    losses.append(loss(params))
    assert jax.tree.structure(u) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: (a.dtype, a.shape) == (b.dtype, b.shape)
                 or pytest.fail("dtype/shape"), u, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-7), u, ref_u)
    for mod in ("Conv_0", "Dense_0"):
      mean = _fan_in_stats(gc[mod]["kernel"])[0]
      np.testing.assert_allclose(mean, 0.0, atol=1e-5)
  assert losses[-1] < losses[0]


def test_jit_and_inject_hyperparams():
  g = {"w": jnp.asarray(_rand(3, (3, 3, 4, 6))), "b": jnp.ones((6,))}
  gc = transforms.centralize()
  out = jax.jit(gc.update)(g, gc.init(g))[0]
  np.testing.assert_allclose(out["w"], _np_gc(g["w"]), rtol=1e-5, atol=1e-5)

  tx = optax.inject_hyperparams(transforms.standardize)(eps=0.1)
  state = tx.init(g)
  out, state = jax.jit(tx.update)(g, state)
  np.testing.assert_allclose(out["w"], _np_ngs(g["w"], 0.1), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(out["b"], g["b"])
  state.hyperparams["eps"] = jnp.asarray(2.0)
  out, _ = jax.jit(tx.update)(g, state)
  np.testing.assert_allclose(out["w"], _np_ngs(g["w"], 2.0), rtol=1e-5,
                             atol=1e-6)


def test_low_precision_dtype_kept():
  g = jnp.asarray(_rand(0, (3, 4, 6)), jnp.bfloat16)
  tx = optax.inject_hyperparams(transforms.standardize)(eps=0.1)
  for t in (transforms.centralize(), transforms.standardize(), tx):
    assert _apply(t, g).dtype == jnp.bfloat16


@pytest.mark.parametrize("eps", [-1e-3, -2.5, float("nan")])
def test_negative_or_nan_eps_raises(eps):
  message = f"eps={eps}"
  with pytest.raises(ValueError, match=message):
    transforms.standardize(eps)
  with pytest.raises(ValueError, match=message):
    optax.inject_hyperparams(transforms.standardize)(eps=eps).init({})


def test_standardize_without_eps_leaves_a_dead_neuron_at_zero():
  # Output neuron 1 has a zero gradient over its whole fan-in (a dead ReLU),
  # neuron 2 a constant one: both centre to zeros, which eps = 0 must not
  # turn into 0 / 0 = NaN. The others are standardised as usual.
  g = _rand(0, (5, 4))
  g[:, 1], g[:, 2] = 0.0, 3.0
  out = np.asarray(_apply(transforms.standardize(0.0), jnp.asarray(g)))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:, 1:3], 0.0)
  expected = _np_ngs(g[:, [0, 3]], 0.0)
  np.testing.assert_allclose(out[:, [0, 3]], expected, rtol=1e-5,
                             atol=1e-6)
