"""Tests for gnp.penalties.view_consistency (GVR) and last_layer.

The reference objective is written out by hand, with one loss_fn call per
view (the library makes one call on the two views concatenated):

    J(θ) = L(x¹) + L(x²) + α Σ_{w ∈ W} ‖∂L(x¹)/∂w − ∂L(x²)/∂w‖²,

with the selected parameters W picked by their paths in the flax params dict,
and its gradient with respect to all of θ from `jax.grad`. The model has no
batch-dependent layer, so the joint and separate calls agree. All in float64.
"""

import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnp

SEEDS = [0, 1, 2]
ALPHA = 0.5
BATCH = 6
RTOL, ATOL = 1e-10, 1e-12


# Every test here runs in float64 (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("x64")


def _f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


# A tanh MLP 4 → 5 → 4 → 3 with cross-entropy; the loss ignores its key.
_MODEL = gnp.models.MLP((5, 4, 3), activation=jnp.tanh)
LAST = (("params", "Dense_2", "bias"), ("params", "Dense_2", "kernel"))
FIRST = (("params", "Dense_0", "bias"), ("params", "Dense_0", "kernel"))
MIDDLE_KERNEL = (("params", "Dense_1", "kernel"),)
ALL = FIRST + (("params", "Dense_1", "bias"),) + MIDDLE_KERNEL + LAST


def _loss(params, batch, key):
  del key
  x, y = batch
  logits = _MODEL.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits


def _views(batch, key):
  """Noisy copy and noisy feature-reversed copy; the labels are shared."""
  x, y = batch
  key1, key2 = jax.random.split(key)
  first = x + 0.3 * jax.random.normal(key1, x.shape, x.dtype)
  second = x[:, ::-1] + 0.3 * jax.random.normal(key2, x.shape, x.dtype)
  return (first, y), (second, y)


class _RecordingViews:
  """`_views` that remembers the keys it was called with (eager calls only)."""

  def __init__(self):
    self.keys = []

  def __call__(self, batch, key):
    self.keys.append(key)
    return _views(batch, key)


def _problem(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(BATCH, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=BATCH))
  params = _f64(_MODEL.init(jax.random.key(seed), x))
  return jax.tree.map(lambda p: 1.5 * p, params), (x, y)


@functools.partial(jax.jit, static_argnums=(4,))
def _reference(params, batch, view_key, alpha, selected):
  """J, its pieces and ∇_θ J, for W = the params at the paths `selected`."""
  view1, view2 = _views(batch, view_key)
  mean_loss = lambda p, view: jnp.mean(_loss(p, view, None)[0])

  def with_selected(p, chosen):
    flat = traverse_util.flatten_dict(p)
    flat.update(chosen)
    return traverse_util.unflatten_dict(flat)

  def objective(p):
    flat = traverse_util.flatten_dict(p)
    chosen = {path: flat[path] for path in selected}
    grad1 = jax.grad(lambda c: mean_loss(with_selected(p, c), view1))(chosen)
    grad2 = jax.grad(lambda c: mean_loss(with_selected(p, c), view2))(chosen)
    penalty = sum(jnp.sum((grad1[k] - grad2[k]) ** 2) for k in selected)
    loss1, loss2 = mean_loss(p, view1), mean_loss(p, view2)
    return loss1 + loss2 + alpha * penalty, (loss1, loss2, penalty)

  (value, (loss1, loss2, penalty)), grads = jax.value_and_grad(
      objective, has_aux=True
  )(params)
  logits = _MODEL.apply(params, jnp.concatenate([view1[0], view2[0]]))
  return {
      "loss": value,
      "view1_loss": loss1,
      "view2_loss": loss2,
      "penalty": penalty,
      "grads": grads,
      "logits": logits,
  }


def _assert_trees_close(got, expected, rtol=RTOL, atol=ATOL):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for (path, g), e in zip(
      jax.tree.leaves_with_path(got), jax.tree.leaves(expected)
  ):
    np.testing.assert_allclose(
        g, e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


def _select_all(params):
  return jax.tree.map(lambda _: True, params)


def _select_layer(name):
  """An optax.masked-style mask: True on every leaf of the named layer."""
  return lambda params: {
      "params": {
          layer: jax.tree.map(lambda _: layer == name, leaves)
          for layer, leaves in params["params"].items()
      }
  }


WRT_CASES = {
    "default_is_last_layer": (None, LAST),
    "regex_last_layer": ("Dense_2", LAST),
    "regex_first_layer": ("Dense_0", FIRST),
    "regex_one_leaf": ("Dense_1/kernel", MIDDLE_KERNEL),
    "callable_all": (_select_all, ALL),
}


def _run(params, batch, key, alpha, wrt):
  views = _RecordingViews()
  grad_fn = gnp.penalties.view_consistency(
      _loss, alpha=alpha, views=views, wrt=wrt
  )
  out = grad_fn.with_stats(params, batch, key)
  assert len(views.keys) == 1  # one pair of views per step.
  return out, views.keys[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", list(WRT_CASES))
def test_matches_hand_written_objective(seed, case):
  wrt, selected = WRT_CASES[case]
  params, batch = _problem(seed)
  ((loss, aux), grads, stats), view_key = _run(
      params, batch, jax.random.key(seed), ALPHA, wrt
  )
  # The reference draws the views from the key the library gave `views`.
  ref = _reference(params, batch, view_key, ALPHA, selected)
  np.testing.assert_allclose(loss, ref["loss"], rtol=RTOL)
  _assert_trees_close(grads, ref["grads"])
  assert set(stats) == {"task_loss", "penalty", "view1_loss", "view2_loss"}
  for name in ("penalty", "view1_loss", "view2_loss"):
    np.testing.assert_allclose(stats[name], ref[name], rtol=RTOL, err_msg=name)
  np.testing.assert_allclose(
      stats["task_loss"], (ref["view1_loss"] + ref["view2_loss"]) / 2, rtol=RTOL
  )
  np.testing.assert_allclose(
      loss,
      stats["view1_loss"] + stats["view2_loss"] + ALPHA * stats["penalty"],
      rtol=RTOL,
  )
  # aux is the loss_fn's aux of the one call on the 2B concatenated examples.
  assert aux.shape == (2 * BATCH, 3)
  np.testing.assert_allclose(aux, ref["logits"], rtol=RTOL, atol=ATOL)
  # The check is not vacuous: the two views disagree, so does their gradient.
  assert ref["penalty"] > 1e-3
  assert abs(ref["view1_loss"] - ref["view2_loss"]) > 1e-3


def test_selected_parameters_change_the_result():
  params, batch = _problem(0)
  key = jax.random.key(0)
  results = {}
  for name, wrt in [
      ("last", None),
      ("first", "Dense_0"),
      ("middle", "Dense_1"),
      ("all", _select_all),
  ]:
    (_, _), grads, stats = _run(params, batch, key, ALPHA, wrt)[0]
    results[name] = (stats["penalty"], grads)
  for a, b in [("last", "first"), ("last", "all"), ("first", "all")]:
    assert abs(results[a][0] - results[b][0]) > 1e-3 * results["all"][0], (a, b)
    difference = jax.tree.map(lambda x, y: x - y, results[a][1], results[b][1])
    assert optax.tree_utils.tree_norm(difference) > 1e-4, (a, b)
  # Σ over all layers of ‖g¹ − g²‖² is the sum of the layers' penalties.
  np.testing.assert_allclose(
      results["all"][0],
      results["first"][0] + results["middle"][0] + results["last"][0],
      rtol=RTOL,
  )


@pytest.mark.parametrize("seed", SEEDS)
def test_penalty_gradient_reaches_every_layer(seed):
  """W is the last layer, yet α changes the gradient of every leaf."""
  params, batch = _problem(seed)
  key = jax.random.key(seed)
  grads = {}
  for alpha in (0.0, ALPHA, 2 * ALPHA):
    ((_, _), grads[alpha], _), view_key = _run(params, batch, key, alpha, None)
  # α = 0: the plain gradient of L(x¹) + L(x²).
  _assert_trees_close(
      grads[0.0], _reference(params, batch, view_key, 0.0, LAST)["grads"]
  )
  difference = jax.tree.map(lambda a, b: a - b, grads[ALPHA], grads[0.0])
  ref_difference = jax.tree.map(
      lambda a, b: a - b,
      _reference(params, batch, view_key, ALPHA, LAST)["grads"],
      _reference(params, batch, view_key, 0.0, LAST)["grads"],
  )
  _assert_trees_close(difference, ref_difference, rtol=1e-8, atol=1e-12)
  for (path, leaf), expected in zip(
      jax.tree.leaves_with_path(difference), jax.tree.leaves(ref_difference)
  ):
    assert np.linalg.norm(leaf) > 0.5 * np.linalg.norm(expected)
    assert np.linalg.norm(expected) > 1e-2, jax.tree_util.keystr(path)
  # The penalty's share is linear in α.
  _assert_trees_close(
      jax.tree.map(lambda a, b: a - b, grads[2 * ALPHA], grads[0.0]),
      jax.tree.map(lambda d: 2 * d, difference),
      rtol=1e-8,
  )


def test_wrt_forms_agree_when_they_select_the_same_leaves():
  params, batch = _problem(1)
  key = jax.random.key(1)
  for same in [
      ("Dense_0", r"^params/Dense_0/", _select_layer("Dense_0")),
      (None, "Dense_2", _select_layer("Dense_2")),
  ]:
    outs = [_run(params, batch, key, ALPHA, wrt)[0] for wrt in same]
    (loss, aux), grads, stats = outs[0]
    for (loss2, aux2), grads2, stats2 in outs[1:]:
      np.testing.assert_allclose(loss2, loss, rtol=1e-14)
      np.testing.assert_allclose(aux2, aux, rtol=1e-14)
      _assert_trees_close(grads2, grads, rtol=1e-14, atol=0)
      _assert_trees_close(stats2, stats, rtol=1e-14, atol=0)


# last_layer: the leaves of the final Dense, whatever the model and loss.


def _sum_of_squares(params):
  return sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def _classifier_loss(model, weight_decay=0.0, jit=False, l2=_sum_of_squares):
  def loss_fn(params, batch, key):
    del key
    x, y = batch
    logits = model.apply(params, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    if weight_decay:
      losses = losses + 0.5 * weight_decay * l2(params)
    return losses, logits

  return jax.jit(loss_fn) if jit else loss_fn


def _tree_norm_l2(params):
  return optax.tree_utils.tree_norm(params, squared=True)


_CNN = gnp.models.CNN((2, 3), num_classes=3)
LAST_LAYER_CASES = {
    # name: (model, input shape, final Dense, weight decay, jit, L2 form)
    "mlp": (gnp.models.MLP((5, 4, 3)), (4,), "Dense_2", 0.0, False),
    "mlp_tanh_l2": (
        gnp.models.MLP((5, 4, 3), activation=jnp.tanh), (4,), "Dense_2", 1e-3,
        False,
    ),
    "mlp_tree_norm_l2": (
        gnp.models.MLP((5, 4, 3)), (4,), "Dense_2", 1e-3, False, _tree_norm_l2
    ),
    # Dense_11 sorts before Dense_2 in the params dict.
    "mlp_12_layers": (gnp.models.MLP((3,) * 12), (4,), "Dense_11", 0.0, False),
    "mlp_12_layers_l2": (
        gnp.models.MLP((3,) * 12), (4,), "Dense_11", 1e-3, False
    ),
    "mlp_jitted_loss": (gnp.models.MLP((5, 4, 3)), (4,), "Dense_2", 0.0, True),
    "cnn": (_CNN, (8, 8, 1), "Dense_0", 0.0, False),
    "cnn_l2": (_CNN, (8, 8, 1), "Dense_0", 1e-3, False),
    "cnn_1d_l2": (
        gnp.models.CNN((2, 3), num_classes=3, ndim=1), (8, 2), "Dense_0", 1e-3,
        False,
    ),
    # optax's tree_norm sums the leaves' squares in sorted-key order (Dense_0,
    # Dense_1, Dense_10, Dense_11, Dense_2, ...): a longest-path rule would
    # pick Dense_9 here.
    "mlp_12_layers_tree_norm_l2": (
        gnp.models.MLP((3,) * 12), (4,), "Dense_11", 1e-3, False, _tree_norm_l2
    ),
}
@pytest.mark.parametrize("case", list(LAST_LAYER_CASES))
def test_last_layer_is_the_final_dense(case):
  model, shape, final, weight_decay, jit, *l2 = LAST_LAYER_CASES[case]
  x = jnp.ones((BATCH,) + shape)
  y = jnp.zeros((BATCH,), jnp.int32)
  params = _f64(model.init(jax.random.key(0), x))
  loss_fn = _classifier_loss(model, weight_decay, jit, *l2)
  mask = gnp.penalties.last_layer(loss_fn, params, (x, y), jax.random.key(1))
  paths = [path for path, _ in jax.tree.leaves_with_path(params)]
  expected = [path[1].key == final for path in paths]
  assert sum(expected) == 2  # kernel and bias
  assert list(mask) == expected, [
      jax.tree_util.keystr(p) for p, m in zip(paths, mask) if m
  ]


def test_default_wrt_on_12_layers_is_the_final_dense():
  model = gnp.models.MLP((3,) * 12, activation=jnp.tanh)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=BATCH))
  params = _f64(model.init(jax.random.key(0), x))
  loss_fn = _classifier_loss(model)

  @functools.partial(jax.jit, static_argnums=(0,))
  def run(wrt, key):
    grad_fn = gnp.penalties.view_consistency(
        loss_fn, alpha=ALPHA, views=_views, wrt=wrt
    )
    return grad_fn.with_stats(params, (x, y), key)

  key = jax.random.key(3)
  default = run(None, key)
  chosen = run("Dense_11/", key)
  other = run("Dense_2/", key)
  _assert_trees_close(default, chosen, rtol=1e-14, atol=0)
  assert abs(default[2]["penalty"] - other[2]["penalty"]) > 1e-6


def test_jit_with_traced_alpha_matches_eager_without_recompiling():
  params, batch = _problem(2)
  key = jax.random.key(5)

  @jax.jit
  def step(params, batch, key, alpha):
    grad_fn = gnp.penalties.view_consistency(_loss, alpha=alpha, views=_views)
    return grad_fn.with_stats(params, batch, key)

  for alpha in (0.5, 0.01):
    jitted = step(params, batch, key, jnp.float64(alpha))
    eager = gnp.penalties.view_consistency(
        _loss, alpha=alpha, views=_views
    ).with_stats(params, batch, key)
    _assert_trees_close(jitted, eager)
  assert step._cache_size() == 1


@pytest.mark.parametrize(
    "alpha, match", [(-0.5, "-0.5"), (float("nan"), "nan"), (None, "alpha")]
)
def test_invalid_alpha_raises(alpha, match):
  with pytest.raises(ValueError, match=match):
    gnp.penalties.view_consistency(_loss, alpha=alpha, views=_views)


@pytest.mark.parametrize(
    "wrt", ["Dense_7", lambda params: jax.tree.map(lambda _: False, params)]
)
def test_wrt_selecting_nothing_raises(wrt):
  params, batch = _problem(0)
  grad_fn = gnp.penalties.view_consistency(
      _loss, alpha=ALPHA, views=_views, wrt=wrt
  )
  with pytest.raises(ValueError, match="selects no parameter"):
    grad_fn(params, batch, jax.random.key(0))


def test_missing_key_raises():
  params, batch = _problem(0)
  grad_fn = gnp.penalties.view_consistency(_loss, alpha=ALPHA, views=_views)
  with pytest.raises(ValueError, match="key"):
    grad_fn(params, batch, None)
  with pytest.raises(ValueError, match="key"):
    grad_fn.with_stats(params, batch)
