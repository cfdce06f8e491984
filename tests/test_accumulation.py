"""Gradient accumulation against the single big batch.

Every method's step from `gnp.penalties.accumulate(loss_fn, k)` equals the
step on the whole batch: in float64 to ~1e-12 for the gradient functions, in
float32 to rounding for the train step with its optimiser (GC, NGS), and on 8
simulated devices. Batch normalisation's statistics follow the documented
per-microbatch rule; the memory is that of a microbatch.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gnp import config as config_lib
from gnp import penalties
from gnp import population
from gnp import train
from gnp.errors import ConfigError
from tests.helpers import equations
from tests.helpers import run
from tests.helpers import tiny_mnist1d
from tests.problems import tiny_problem

K = 4  # Microbatches.


def _cnn_problem(batch_size=16):
  """A 1-D CNN (two convolutions, a Dense head) in float64, data and loss."""
  model = nn.Sequential([
      nn.Conv(3, (3,)), jnp.tanh, nn.Conv(4, (3,), strides=2), jnp.tanh,
      lambda x: x.reshape((x.shape[0], -1)), nn.Dense(3)])
  data_key, label_key, init_key = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(data_key, (batch_size, 8, 2))
  y = jax.random.randint(label_key, (batch_size,), 0, 3)
  params = jax.tree.map(lambda p: p.astype(jnp.result_type(float)),
                        model.init(init_key, x)["params"])

  def loss_fn(params, batch, key):
    del key
    logits = model.apply({"params": params}, batch[0])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
    return losses, {"logits": logits}

  return loss_fn, params, (x, y)


def _views(batch, key):
  """GVR's two views: Gaussian noise on the inputs, drawn per view."""
  x, y = batch
  first, second = jax.random.split(key)
  noisy = lambda k: x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
  return (noisy(first), y), (noisy(second), y)


# name -> loss_fn -> GradientFn.
METHODS = {
    "plain": penalties.plain,
    "sam": lambda f: penalties.sam(f, rho=0.1),
    # m-sharpness: each group of 8 accumulated in K microbatches of 2.
    "sam_groups": lambda f: penalties.sam(f, rho=0.1, group_size=8),
    "gnp": lambda f: penalties.gradient_norm(f, r=0.1, alpha=0.5),
    "gnp_exact": lambda f: penalties.gradient_norm(f, r=0.1, alpha=0.5,
                                                   exact=True),
    "gnp_exact_adaptive": lambda f: penalties.gradient_norm(
        f, r=0.1, alpha=0.5, exact=True, adaptive=True),
    "hessian": lambda f: penalties.hessian_frobenius(f, lam=0.1),
    "hessian_probes": lambda f: penalties.hessian_frobenius(f, lam=0.1,
                                                            num_probes=2),
    "gvr": lambda f: penalties.view_consistency(f, alpha=0.5, views=_views),
    "gnvr_vmap": lambda f: penalties.gradient_norm_variance(f, lam=0.5,
                                                            method="vmap"),
    "gnvr_ghost": lambda f: penalties.gradient_norm_variance(f, lam=0.5,
                                                             method="ghost"),
    "clip_ghost": lambda f: penalties.per_example_clipping(f, max_norm=2.0,
                                                           method="ghost"),
    "clip_robust_vmap": lambda f: penalties.per_example_clipping(
        f, outlier_mads=0.5, method="vmap"),
    "clip_robust_ghost": lambda f: penalties.per_example_clipping(
        f, outlier_mads=0.5, method="ghost"),
}
PROBLEMS = {"mlp": lambda: tiny_problem(0, batch_size=16),
            "cnn": _cnn_problem}
# One of each code path, on the MLP; the same on the CNN and the MLP's other
# variants (~7 s of compilation each) are marked slow.
PATHS = ("plain", "sam", "gnp_exact", "hessian", "gvr", "gnvr_ghost",
         "clip_robust_ghost")
CASES = ([pytest.param(name, "mlp") for name in PATHS]
         + [pytest.param(name, "cnn", marks=pytest.mark.slow)
            for name in PATHS]
         + [pytest.param(name, "mlp", marks=pytest.mark.slow)
            for name in sorted(METHODS) if name not in PATHS])


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


@pytest.mark.parametrize("name, problem", CASES)
def test_the_step_equals_the_whole_batch_in_float64(name, problem, x64):
  loss_fn, params, batch = PROBLEMS[problem]()
  key = jax.random.key(1)
  make = METHODS[name]
  (loss, aux), grads, stats = jax.jit(make(loss_fn).with_stats)(
      params, batch, key)
  accumulated = penalties.accumulate(loss_fn, K)
  (acc_loss, acc_aux), acc_grads, acc_stats = jax.jit(
      make(accumulated).with_stats)(params, batch, key)
  np.testing.assert_allclose(_flat(acc_grads), _flat(grads), rtol=1e-12,
                             atol=1e-12 * np.abs(_flat(grads)).max())
  np.testing.assert_allclose(acc_loss, loss, rtol=1e-12)
  assert sorted(acc_stats) == sorted(stats)
  for stat in stats:
    np.testing.assert_allclose(acc_stats[stat], stats[stat], rtol=1e-11,
                               atol=1e-14, err_msg=stat)
  # aux: one entry per microbatch (and per group, first, with m-sharpness);
  # GVR's loss sees both views.
  logits = np.asarray(acc_aux["logits"])
  examples = len(batch[1]) * (2 if name.startswith("gvr") else 1)
  assert logits.shape[-3] == K and logits.size // 3 == examples
  if name.startswith("clip"):  # Some examples clipped, not all.
    assert 0 < stats["penalty"] < 1, stats["penalty"]
  if name != "plain":  # The method moves the update: the test can fail.
    assert np.abs(_flat(grads) - _plain_gradient(problem)).max() > 1e-4 * (
        np.abs(_flat(grads)).max())


@functools.cache
def _plain_gradient(problem):
  loss_fn, params, batch = PROBLEMS[problem]()
  return _flat(jax.jit(penalties.plain(loss_fn))(params, batch, None)[1])


@pytest.mark.slow
def test_per_microbatch_definitions_would_fail_the_test(x64):
  # The step on the whole batch is not the mean of the microbatches' steps
  # for these methods (a perturbation, a variance, a median per microbatch),
  # by far more than the tolerance above: the test tells them apart.
  loss_fn, params, batch = tiny_problem(0, batch_size=16)
  key = jax.random.key(1)
  for name in ("sam", "hessian", "gnvr_ghost", "clip_robust_ghost"):
    grad_fn = jax.jit(METHODS[name](loss_fn))
    _, whole = grad_fn(params, batch, key)
    per_microbatch = np.mean([
        _flat(grad_fn(params, jax.tree.map(lambda x, j=j: x[j::K], batch),
                      key)[1]) for j in range(K)], axis=0)
    # 0.17 to 0.30 of the largest entry on this problem.
    assert np.abs(per_microbatch - _flat(whole)).max() > 1e-2 * np.abs(
        _flat(whole)).max(), name


def test_losses_come_back_in_batch_order_and_keys_per_microbatch(x64):
  loss_fn, params, batch = tiny_problem(0, batch_size=12)
  accumulated = penalties.accumulate(loss_fn, 3)
  losses, aux = jax.jit(accumulated)(params, batch, None)
  expected, expected_aux = jax.jit(loss_fn)(params, batch, None)
  np.testing.assert_allclose(losses, expected, rtol=1e-14)
  # Microbatch j holds examples j, j + 3, j + 6, ...
  for j in range(3):
    np.testing.assert_allclose(aux["logits"][j],
                               expected_aux["logits"][j::3], rtol=1e-14)

  def random_loss(params, batch, key):
    del params
    return jax.random.uniform(key, (len(batch),)), None

  key = jax.random.key(7)
  drawn, _ = jax.jit(penalties.accumulate(random_loss, 3))(
      None, jnp.zeros(12), key)
  for j in range(3):
    np.testing.assert_array_equal(
        drawn[j::3],
        jax.random.uniform(jax.random.fold_in(key, j), (4,)))


def test_bad_steps_and_batches_are_refused():
  loss_fn, params, batch = tiny_problem(0, batch_size=6)
  for steps in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="steps"):
      penalties.accumulate(loss_fn, steps)
  assert penalties.accumulate(loss_fn, 1) is loss_fn
  with pytest.raises(ValueError, match="4 microbatches do not divide the "
                     "batch of 6"):
    penalties.plain(penalties.accumulate(loss_fn, 4))(params, batch, None)
  with pytest.raises(ValueError, match="split_perturbation"):
    penalties.sam(penalties.accumulate(loss_fn, 2), rho=0.1,
                  split_perturbation=True)(params, batch, None)


def test_first_order_methods_do_not_recompute_the_forward_pass():
  # value_and_grad sums the microbatches' gradients: no rematerialised pass
  # (which differentiating through the accumulated loss would have).
  checkpoint = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive
  checkpoint = checkpoint.name  # Its name varies with JAX's version.
  loss_fn, params, batch = tiny_problem(0, batch_size=8)
  for grad_fn in (penalties.plain, METHODS["sam"]):
    jaxpr = jax.make_jaxpr(grad_fn(penalties.accumulate(loss_fn, 2)))(
        params, batch, None)
    names = [eqn.primitive.name for eqn in equations(jaxpr.jaxpr)]
    assert "scan" in names and checkpoint not in names, names
  jaxpr = jax.make_jaxpr(METHODS["gnp_exact"](penalties.accumulate(loss_fn, 2)))(
      params, batch, None)
  assert checkpoint in [e.primitive.name for e in equations(jaxpr.jaxpr)]


@pytest.mark.slow
def test_memory_is_that_of_a_microbatch():
  # XLA's own accounting of the compiled programs' temporary buffers: a
  # 64 -> 256 -> 256 -> 256 -> 10 MLP on 2048 examples, whose activations
  # (2 MiB per layer) dwarf its parameters (0.6 MiB).
  model = nn.Sequential([nn.Dense(256), jnp.tanh, nn.Dense(256), jnp.tanh,
                         nn.Dense(256), jnp.tanh, nn.Dense(10)])
  x = jnp.zeros((2048, 64))
  y = jnp.zeros((2048,), jnp.int32)
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss_fn(params, batch, key):
    del key
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch[1]), {}

  def temporary_bytes(make, steps):
    grad_fn = make(penalties.accumulate(loss_fn, steps))
    compiled = jax.jit(grad_fn).lower(params, (x, y), jax.random.key(0))
    analysis = compiled.compile().memory_analysis()
    if analysis is None:
      pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes

  for name in ("plain", "hessian", "gvr"):
    whole, accumulated = (temporary_bytes(METHODS[name], k) for k in (1, 8))
    assert accumulated < 0.5 * whole, (name, whole, accumulated)


# --- The train step ---------------------------------------------------------

# name -> overrides of tiny_mnist1d; batch_size 48, K microbatches.
STEPS = {
    "gc": {"optimizer.centralize": True},
    "ngs": {"optimizer.standardize": True},
    "sam": {"method": "sam", "sam.rho": 0.1},
    "gnp_exact": {"method": "gnp", "gnp.exact": True, "gnp.r": 0.1},
}


def _step(overrides, steps):
  """(params before, state after, metrics) of the first step."""
  # SGD: Adam's first step, g / (|g| + ε), would magnify the rounding of
  # gradients near 0.
  config = tiny_mnist1d(**{"batch_size": 48, "model.hidden": (32, 32),
                           "optimizer.name": "sgd",
                           "optimizer.learning_rate": 0.1, **overrides,
                           "grad_accum_steps": steps})
  exp = train.create_experiment(config)
  state = exp.init()
  before = _flat(jax.device_get(state.params))  # The step donates its state.
  return (before, *exp.step(state, exp.train_batch(0)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STEPS))
def test_the_train_step_equals_the_whole_batch(name):
  # float32, so to rounding: the microbatches sum in another order.
  (before, whole, whole_metrics), (_, acc, acc_metrics) = (
      _step(STEPS[name], k) for k in (1, K))
  moved = _flat(whole.params) - before
  np.testing.assert_allclose(_flat(acc.params) - before, moved, rtol=0,
                             atol=1e-4 * np.abs(moved).max())
  np.testing.assert_allclose(_flat(acc.opt_state), _flat(whole.opt_state),
                             rtol=0,
                             atol=1e-4 * np.abs(_flat(whole.opt_state)).max())
  for metric, value in whole_metrics.items():
    np.testing.assert_allclose(acc_metrics[metric], value, rtol=1e-5,
                               atol=1e-7, err_msg=metric)


@pytest.mark.slow
def test_k_of_one_compiles_the_step_without_a_microbatch_loop():
  config = tiny_mnist1d(**{"method": "sam"})
  exp = train.create_experiment(config)
  state = exp.init()
  jaxpr = jax.make_jaxpr(exp.step)(state, exp.train_batch(0))
  assert "scan" not in [e.primitive.name for e in equations(jaxpr.jaxpr)]
  assert config_lib.default_config().grad_accum_steps == 1


@pytest.mark.slow
def test_batch_norm_statistics_are_the_mean_over_microbatches():
  config = tiny_mnist1d(**{
      "grad_accum_steps": K, "dataset.name": "synthetic",
      "dataset.input_shape": (8, 8, 3), "dataset.num_train": 32,
      "dataset.validation_size": 0, "batch_size": 16,
      "model.name": "wide_resnet", "model.depth": 10, "model.width": 1})
  exp = train.create_experiment(config)
  state = exp.init()
  batch = exp.train_batch(0)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = exp.dataset.preprocess(batch[0])
  update = lambda x: exp.model.apply(variables, x, train=True,
                                     mutable=["batch_stats"])[1]["batch_stats"]
  per_microbatch = [update(x[j::K]) for j in range(K)]
  expected = jax.tree.map(lambda *s: np.mean(np.stack(s), axis=0),
                          *per_microbatch)
  whole = update(x)
  new_state, metrics = exp.step(state, batch)
  assert float(metrics["nonfinite"]) == 0
  for actual, wanted, whole_batch in zip(
      jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(expected),
      jax.tree.leaves(whole)):
    np.testing.assert_allclose(actual, wanted, rtol=1e-5, atol=1e-6)
  # The running variances lack the spread between the microbatches' means:
  # not the whole batch's statistics.
  assert not np.allclose(_flat(new_state.batch_stats), _flat(whole),
                         rtol=1e-4)


@pytest.mark.slow
def test_a_population_accumulates_as_its_members_do():
  members = [[tiny_mnist1d(**{
      "seed": seed, "dataset.seed": 0, "num_epochs": 1, "batch_size": 48,
      "dataset.num_samples": 300, "dataset.validation_size": 0,
      "model.hidden": (16,), "method": "sam", "grad_accum_steps": k})
      for seed in (0, 1)] for k in (1, K)]
  (_, whole), (histories, acc) = (population.train(m) for m in members)
  assert len(histories) == 2 and histories[0]["epoch"] == [1]
  np.testing.assert_allclose(_flat(acc.params), _flat(whole.params),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"grad_accum_steps": 0}, "grad_accum_steps must be a positive integer"),
    ({"grad_accum_steps": -2}, "grad_accum_steps must be a positive integer"),
    ({"grad_accum_steps": 7},
     "grad_accum_steps=7 does not divide batch_size=48."),
    ({"grad_accum_steps": 4, "method": "sam", "sam.group_size": 6},
     r"grad_accum_steps=4 does not divide sam\.group_size=6"),
])
def test_bad_grad_accum_steps_are_refused(overrides, message):
  config = tiny_mnist1d(**{"batch_size": 48, **overrides})
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_each_device_must_hold_whole_microbatch_shares():
  config = tiny_mnist1d(**{"batch_size": 48, "grad_accum_steps": 4})
  config_lib.validate(config, num_devices=4)  # 12 examples each: 4 × 3.
  with pytest.raises(ConfigError, match="grad_accum_steps=4 does not divide "
                     "batch_size=48's 6 examples per device \\(of 8\\)"):
    config_lib.validate(config, num_devices=8)


_DEVICES_SCRIPT = """
import json, sys
import jax, numpy as np
from gnp import train
from tests.helpers import tiny_mnist1d
overrides = json.loads(sys.argv[1])
params = {}
for k in (1, 2):
  exp = train.create_experiment(tiny_mnist1d(**overrides, grad_accum_steps=k))
  state = exp.init()
  for step in range(2):
    state, _ = exp.step(state, exp.train_batch(step))
  params[k] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
      jax.device_get(state.params))])
  if k == 2:  # Each device holds its share of every microbatch.
    hlo = exp.step.lower(state, exp.train_batch(0)).compile().as_text()
    assert "all-to-all" not in hlo and "collective-permute" not in hlo
print(json.dumps({"devices": jax.device_count(),
                  "difference": float(np.abs(params[2] - params[1]).max()),
                  "scale": float(np.abs(params[1]).max())}))
"""


@pytest.mark.slow
def test_eight_devices_accumulate_as_one_batch():
  result = run(["-c", _DEVICES_SCRIPT,
                json.dumps({"method": "sam", "batch_size": 64,
                            "model.hidden": (32, 32)})],
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                    "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out["devices"] == 8
  assert out["difference"] <= 1e-5 * out["scale"], out


# L2 declared with `with_l2` (as the step declares optimizer.l2), then
# accumulated, as the step wraps it; and RST's coin, which picks one branch
# for the whole batch, taking each branch by its key.
COMBINED = {
    "gnvr_ghost_l2": (lambda f: penalties.with_l2(f, 0.05),
                      lambda f: penalties.gradient_norm_variance(
                          f, lam=0.5, method="ghost")),
    "clip_ghost_l2": (lambda f: penalties.with_l2(f, 0.05),
                      lambda f: penalties.per_example_clipping(
                          f, outlier_mads=0.5, method="ghost")),
    "rst": (lambda f: f, lambda f: penalties.sam(f, rho=0.1,
                                                 probability=0.5)),
}


@pytest.mark.parametrize("name", sorted(COMBINED))
def test_l2_and_rst_accumulate_to_the_whole_batch(name, x64):
  declare, make = COMBINED[name]
  loss_fn, params, batch = tiny_problem(0, batch_size=16)
  loss_fn = declare(loss_fn)
  whole = jax.jit(make(loss_fn).with_stats)
  accumulated = jax.jit(make(penalties.accumulate(loss_fn, K)).with_stats)
  branches = set()
  for seed in range(12 if name == "rst" else 1):
    key = jax.random.key(seed)
    (loss, _), grads, stats = whole(params, batch, key)
    (acc_loss, _), acc_grads, _ = accumulated(params, batch, key)
    np.testing.assert_allclose(_flat(acc_grads), _flat(grads), rtol=1e-12,
                               atol=1e-12 * np.abs(_flat(grads)).max())
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-12)
    branches.add(float(stats.get("sam_step", -1)))
  if name == "rst":  # Both branches were compared.
    assert branches == {0.0, 1.0}
