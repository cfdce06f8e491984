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


# --- Masks -----------------------------------------------------------------


def _ndim_rule_before_masks(name, conv_only=False, eps=1e-8):
  """The transforms as they were before masks, copied verbatim: the reference
  that ``mask=None`` must reproduce bit for bit."""
  min_ndim = 3 if conv_only else 2

  def gc(g, axes):
    return g - g.mean(axes, keepdims=True)

  def ngs(g, axes):
    centred = g - g.mean(axes, keepdims=True)
    scale = g.std(axes, keepdims=True) + eps
    return jnp.where(scale > 0, centred / jnp.where(scale > 0, scale, 1), 0)

  fn = gc if name == "centralize" else ngs

  def leaf_fn(g):
    if jnp.ndim(g) < min_ndim:
      return g
    return fn(g, tuple(range(g.ndim - 1))).astype(g.dtype)

  return lambda updates: jax.tree.map(leaf_fn, updates)


def _np_over(g, axes, name, eps=1e-8):
  """Loops over every index of the axes NOT in ``axes``: each such slice is one
  neuron, centred (GC) or standardised (NGS) over exactly ``axes``."""
  g = np.asarray(g, np.float64)
  axes = {a % g.ndim for a in axes}
  rest = [a for a in range(g.ndim) if a not in axes]
  out = np.empty_like(g)
  for idx in np.ndindex(*(g.shape[a] for a in rest)):
    where = [slice(None)] * g.ndim
    for a, i in zip(rest, idx):
      where[a] = i
    s = g[tuple(where)]
    out[tuple(where)] = (s - s.mean() if name == "centralize"
                         else (s - s.mean()) / (s.std() + eps))
  return out


def _net_grads(seed=0):
  model = _Net()
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 5, 5, 3))
  params = model.init(jax.random.PRNGKey(seed), x)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  return params, jax.grad(loss)(params)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("conv_only", [False, True])
@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_mask_none_is_bitwise_the_ndim_rule(name, conv_only):
  factory = getattr(transforms, name)
  params, grads = _net_grads()
  ranks = {k: {n: v.ndim for n, v in m.items()} for k, m in grads.items()}
  assert ranks == {"Conv_0": {"kernel": 4, "bias": 1},
                   "LayerNorm_0": {"scale": 1, "bias": 1},
                   "Dense_0": {"kernel": 2, "bias": 1}}
  reference = _ndim_rule_before_masks(name, conv_only)
  all_true = jax.tree.map(lambda _: True, params)
  for tx in (factory(conv_only=conv_only),
             factory(conv_only=conv_only, mask=all_true)):
    _assert_trees_equal(_apply(tx, grads), reference(grads))
    _assert_trees_equal(jax.jit(tx.update)(grads, tx.init(params))[0],
                        jax.jit(reference)(grads))


@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_mask_false_leaves_kernels_untouched(name):
  factory = getattr(transforms, name)
  params, grads = _net_grads(1)
  mask = jax.tree.map(lambda _: True, params)
  # Not the Dense kernel: it follows a LayerNorm, whose output has zero mean
  # over the features, so its fan-in gradient is centred already.
  mask["Conv_0"]["kernel"] = False
  out = _apply(factory(mask=mask), grads)
  unmasked = _apply(factory(), grads)
  np.testing.assert_array_equal(out["Conv_0"]["kernel"],
                                grads["Conv_0"]["kernel"])
  assert np.max(np.abs(unmasked["Conv_0"]["kernel"]
                       - grads["Conv_0"]["kernel"])) > 1e-3
  out["Conv_0"]["kernel"] = unmasked["Conv_0"]["kernel"]
  _assert_trees_equal(out, unmasked)  # Every other leaf as before.
  # With flags only, the mask is optax's: the unmasked transform under masked.
  _assert_trees_equal(_apply(factory(mask=mask), grads),
                      _apply(optax.masked(factory(), mask), grads))


def _no_conv_kernel(tree):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path) != "['Conv_0']['kernel']",
      tree)


@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_callable_mask_equals_its_pytree(name):
  factory = getattr(transforms, name)
  params, grads = _net_grads(2)
  pytree = jax.tree.map(lambda _: True, params)
  pytree["Conv_0"]["kernel"] = False
  assert _no_conv_kernel(params) == pytree
  _assert_trees_equal(_apply(factory(mask=_no_conv_kernel), grads),
                      _apply(factory(mask=pytree), grads))
  axes = lambda p: jax.tree.map(lambda x: (0, 1, 2) if x.ndim == 4 else False,
                                p)
  _assert_trees_equal(
      _apply(factory(mask=axes), grads),
      _apply(factory(mask=axes(params)), grads))


@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_masked_transform_in_chain_under_jit(name):
  factory = getattr(transforms, name)
  params, _ = _net_grads(3)
  model = _Net()
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 5, 3))
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  opt = optax.chain(factory(mask=_no_conv_kernel), optax.sgd(0.1, 0.9))
  first, sgd = factory(mask=_no_conv_kernel(params)), optax.sgd(0.1, 0.9)

  @jax.jit
  def step(p, s, ref_s):
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    ref_u, ref_s = sgd.update(_apply(first, g), ref_s, p)
    return optax.apply_updates(p, u), s, ref_s, u, ref_u, g

  state, ref_state = opt.init(params), sgd.init(params)
  for _ in range(3):
    params, state, ref_state, u, ref_u, g = step(params, state, ref_state)
    _assert_trees_equal(u, ref_u)
  # The Conv kernel reached SGD as it was; the Dense kernel transformed.
  ref = _np_gc if name == "centralize" else (lambda g: _np_ngs(g, 1e-8))
  np.testing.assert_allclose(_apply(first, g)["Dense_0"]["kernel"],
                             ref(g["Dense_0"]["kernel"]), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(_apply(first, g)["Conv_0"]["kernel"],
                                g["Conv_0"]["kernel"])
  # A callable mask under inject_hyperparams must be named static.
  tx = optax.inject_hyperparams(transforms.standardize, static_args="mask")(
      eps=0.1, mask=_no_conv_kernel)
  out = jax.jit(tx.update)(g, tx.init(g))[0]
  _assert_trees_equal(out, _apply(transforms.standardize(
      0.1, mask=_no_conv_kernel(g)), g))


class _Tokens(nn.Module):
  """Embed -> DenseGeneral to (heads, head_dim) -> Dense: two layouts that
  the ndim rule misreads."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 4)(tokens)
    x = nn.DenseGeneral((2, 3))(x)  # kernel (in, heads, head_dim) = (4, 2, 3)
    return nn.Dense(1)(x.reshape(*x.shape[:-2], 6))


@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_dense_general_and_embed(name):
  factory = getattr(transforms, name)
  model = _Tokens()
  tokens = jnp.array([[0, 1, 2], [3, 4, 1]])  # Tokens 5..9 are absent.
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)
  g = jax.grad(loss)(params)
  kernel, bias = g["DenseGeneral_0"]["kernel"], g["DenseGeneral_0"]["bias"]
  table = g["Embed_0"]["embedding"]
  assert (kernel.shape, bias.shape, table.shape) == ((4, 2, 3), (2, 3), (10, 4))
  np.testing.assert_array_equal(table[5:], 0.0)

  # The ndim rule: the kernel's fan-in read as (in, heads), one "neuron" per
  # head_dim index; the 2-D bias centred across heads; the table centred over
  # the vocabulary, which moves the rows of the absent tokens.
  out = _apply(factory(), g)
  np.testing.assert_allclose(out["DenseGeneral_0"]["kernel"],
                             _np_over(kernel, (0, 1), name), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(out["DenseGeneral_0"]["bias"],
                             _np_over(bias, (0,), name), rtol=1e-4, atol=1e-5)
  assert np.min(np.abs(out["Embed_0"]["embedding"][5:])) > 1e-4

  # The mask: each (head, unit) over its real fan-in, the bias and the table
  # untouched, the Dense layer by the default rule.
  mask = {"Embed_0": {"embedding": False},
          "DenseGeneral_0": {"kernel": (0,), "bias": False},
          "Dense_0": {"kernel": True, "bias": True}}
  out = _apply(factory(mask=mask), g)
  np.testing.assert_allclose(out["DenseGeneral_0"]["kernel"],
                             _np_over(kernel, (0,), name), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(out["DenseGeneral_0"]["bias"], bias)
  np.testing.assert_array_equal(out["Embed_0"]["embedding"], table)
  np.testing.assert_allclose(out["Dense_0"]["kernel"],
                             _np_over(g["Dense_0"]["kernel"], (0,), name),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out["Dense_0"]["bias"], g["Dense_0"]["bias"])


@pytest.mark.parametrize("shape, axes", [
    ((4, 2, 3), (0,)), ((4, 2, 3), (-3,)), ((2, 3, 5), (1, 2)),
    ((3, 3, 4, 6), (2, 0)), ((5, 7), (0, 1)), ((7,), (0,)), ((6, 5), (-1,))])
@pytest.mark.parametrize("name", ["centralize", "standardize"])
def test_axes_in_mask_match_numpy(name, shape, axes):
  g = _rand(len(shape) + axes[0], shape)
  eps = 0.3
  factory = (transforms.centralize if name == "centralize"
             else lambda **kw: transforms.standardize(eps, **kw))
  # The axes decide alone: not the leaf's ndim, nor conv_only.
  for conv_only in (False, True):
    out = _apply(factory(mask={"w": axes}, conv_only=conv_only),
                 {"w": jnp.asarray(g)})["w"]
    np.testing.assert_allclose(out, _np_over(g, axes, name, eps), rtol=1e-5,
                               atol=1e-5)
    assert out.dtype == jnp.float32


def test_axes_keep_a_dead_neuron_at_zero():
  g = _rand(0, (4, 2, 3))
  g[:, 1, 0], g[:, 0, 2] = 0.0, 3.0  # Two (head, unit) neurons, constant.
  out = np.asarray(_apply(transforms.standardize(0.0, mask=(0,)),
                          jnp.asarray(g)))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:, 1, 0], 0.0)
  np.testing.assert_array_equal(out[:, 0, 2], 0.0)
  np.testing.assert_allclose(out[:, 1, 1:],
                             _np_over(g[:, 1, 1:], (0,), "standardize", 0.0),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", ["yes", {"w": 1.0, "b": True},
                                  {"w": (0, "1"), "b": True},
                                  {"w": jnp.array(True), "b": True}])
def test_mask_with_bad_leaves_raises_at_construction(mask):
  for factory in (transforms.centralize, transforms.standardize):
    with pytest.raises(ValueError, match="must be a Python bool or a tuple"):
      factory(mask=mask)


@pytest.mark.parametrize("mask, message", [
    ({"w": True}, "structure of the params.*keys"),
    ({"w": True, "b": True, "c": False}, "structure of the params.*keys"),
    (True, "structure of the params"),  # A prefix, which optax.masked takes.
    ([True, False], "structure of the params"),
    (lambda p: {"w": True}, "structure of the params"),
    ({"w": (), "b": True}, r"mask\['w'\] must be .* shape \(3, 4\), got \(\)"),
    ({"w": (2,), "b": True}, r"mask\['w'\] .* shape \(3, 4\), got \(2,\)"),
    ({"w": (0, -2), "b": True}, r"distinct axes .* got \(0, -2\)"),
    ({"w": (True,), "b": True}, r"mask\['w'\] .* got \(True,\)"),
    ({"w": {"x": True}, "b": True}, r"mask\['w'\] .* got \{'x': True\}"),
    ({"w": None, "b": True}, r"mask\['w'\] .* got None"),
    ({"w": 0, "b": True}, r"mask\['w'\] .* got 0"),
    (lambda p: {"w": "no", "b": True}, r"mask\['w'\] must be a Python bool"),
])
def test_mask_not_fitting_the_updates_raises(mask, message):
  g = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
  for factory in (transforms.centralize, transforms.standardize):
    tx = factory(mask=mask)
    with pytest.raises(ValueError, match=message):
      tx.update(g, tx.init(g))
    with pytest.raises(ValueError, match=message):
      jax.jit(tx.update)(g, tx.init(g))
