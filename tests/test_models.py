"""The models: shapes, parameter counts, BatchNorm, bfloat16, the registry.

Parameter counts of the big models come from `jax.eval_shape`, so nothing is
allocated or computed; forward passes run on small members of each family.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnp import models
from gnp.errors import ConfigError
from gnp.models import CNN
from gnp.models import MLP
from gnp.models import ResNet
from gnp.models import ResNet18
from gnp.models import VGG16BN
from gnp.models import WideResNet
from tests.helpers import equations


def test_mlp_is_the_mnist1d_architecture():
  model = MLP((256, 256, 10))
  x = jnp.ones((7, 40))
  params = model.init(jax.random.key(0), x)["params"]
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {
      "Dense_0": {"kernel": (40, 256), "bias": (256,)},
      "Dense_1": {"kernel": (256, 256), "bias": (256,)},
      "Dense_2": {"kernel": (256, 10), "bias": (10,)},
  }
  assert model.apply({"params": params}, x).shape == (7, 10)


def test_mlp_activation_is_not_applied_to_the_output():
  model = MLP((4, 3))
  x = jax.random.normal(jax.random.key(1), (32, 5))
  params = model.init(jax.random.key(0), x)
  # ReLU on the output would make every logit non-negative.
  assert jnp.min(model.apply(params, x)) < 0


@pytest.mark.parametrize("ndim, shape", [(2, (3, 8, 8, 3)), (1, (3, 40, 1))])
def test_cnn_outputs_logits(ndim, shape):
  model = CNN(features=(4, 8), num_classes=5, ndim=ndim)
  x = jnp.ones(shape)
  params = model.init(jax.random.key(0), x)["params"]
  kernels = [p.shape for p in jax.tree.leaves(params) if p.ndim == ndim + 2]
  assert kernels == [(3,) * ndim + (shape[-1], 4), (3,) * ndim + (4, 8)]
  assert model.apply({"params": params}, x).shape == (3, 5)


def test_cnn_gives_channelless_signals_one_channel():
  # mnist1d's [B, 40]: 1-D convolutions over the signal, not a Dense layer.
  model = CNN(features=(4, 8), num_classes=5, ndim=1)
  x = jax.random.normal(jax.random.key(1), (3, 40))
  params = model.init(jax.random.key(0), x)["params"]
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes["Conv_0"]["kernel"] == (3, 1, 4)
  assert shapes["Dense_0"]["kernel"] == (10 * 8, 5)  # 40 → 20 → 10.
  np.testing.assert_array_equal(
      model.apply({"params": params}, x),
      model.apply({"params": params}, x[..., None]),
  )


def test_cnn_refuses_no_spatial_axis_and_inputs_of_another_rank():
  with pytest.raises(ConfigError, match="ndim must be >= 1"):
    CNN(ndim=0)
  with pytest.raises(ValueError, match="ndim=1 takes inputs"):
    jax.eval_shape(CNN(ndim=1).init, jax.random.key(0),
                   jnp.ones((2, 8, 8, 3)))


def test_cnn_refuses_inputs_too_short_for_its_pools():
  model = CNN(features=(4,) * 6, ndim=1)  # 40 → 20 → 10 → 5 → 2 → 1 → 0.
  with pytest.raises(ConfigError, match="at least 64 long"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 40)))
  jax.eval_shape(model.clone(features=(4,) * 5).init, jax.random.key(0),
                 jnp.ones((2, 40)))


@pytest.mark.parametrize("model, shape", [
    (MLP((4, 3)), (5,)), (CNN((2,), num_classes=3, ndim=1), (8, 2))])
def test_small_models_default_to_the_dtype_of_their_inputs(model, shape, x64):
  x = jnp.ones((2, *shape), jnp.float64)
  variables = jax.tree.map(lambda a: a.astype(jnp.float64),
                           model.init(jax.random.key(0), x))
  assert model.apply(variables, x).dtype == jnp.float64
  # A dtype given is the computation's; the logits are float32 at least.
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert bf16.apply(variables, x).dtype == jnp.float32


def test_small_models_take_and_ignore_train():
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  for model in (MLP((4, 3)), CNN(features=(4,), num_classes=3)):
    variables = model.init(jax.random.key(0), x)
    assert list(variables) == ["params"]
    np.testing.assert_array_equal(
        model.apply(variables, x, train=True), model.apply(variables, x)
    )


def _num_params(model, image_size=32):
  x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return sum(p.size for p in jax.tree.leaves(variables["params"]))


def _bn(channels):
  return 2 * channels  # scale and bias; running statistics are not params.


@pytest.mark.parametrize("num_classes, expected", [(10, 11_173_962),
                                                   (100, 11_220_132)])
def test_resnet18_has_the_pytorch_parameter_count(num_classes, expected):
  # The figures of the PyTorch CIFAR ResNet-18 (kuangliu/pytorch-cifar).
  assert _num_params(ResNet18(num_classes=num_classes)) == expected


def test_resnet_parameter_count_is_the_sum_over_layers():
  stage_sizes, k, num_classes = (2, 1, 3), 8, 7
  expected = 9 * 3 * k + _bn(k)  # stem
  width = k
  for i, num_blocks in enumerate(stage_sizes):
    for j in range(num_blocks):
      out = k * 2**i
      expected += 9 * width * out + _bn(out) + 9 * out * out + _bn(out)
      if width != out:
        expected += width * out + _bn(out)  # projection shortcut
      width = out
  expected += width * num_classes + num_classes
  model = ResNet(stage_sizes, num_filters=k, num_classes=num_classes)
  assert _num_params(model) == expected


def _wrn_num_params(depth, k, num_classes):
  """Zagoruyko & Komodakis's WRN, layer by layer."""
  expected = 9 * 3 * 16  # stem
  width = 16
  for out in (16 * k, 32 * k, 64 * k):
    for _ in range((depth - 4) // 6):
      expected += _bn(width) + 9 * width * out + _bn(out) + 9 * out * out
      if width != out:
        expected += width * out  # 1×1 shortcut
      width = out
  return expected + _bn(width) + width * num_classes + num_classes


def test_wrn_28_10_has_the_pytorch_parameter_count():
  # xternalz/WideResNet-pytorch, WRN-28-10 on CIFAR-10.
  assert _wrn_num_params(28, 10, 10) == 36_479_194
  assert _num_params(WideResNet(depth=28, width=10)) == 36_479_194


@pytest.mark.parametrize("depth, width", [(10, 1), (16, 4), (40, 2)])
def test_wrn_parameter_count_is_the_sum_over_layers(depth, width):
  model = WideResNet(depth=depth, width=width, num_classes=100)
  assert _num_params(model) == _wrn_num_params(depth, width, 100)


@pytest.mark.parametrize("depth", [4, 27, 30])
def test_wrn_rejects_a_depth_that_is_not_6n_plus_4(depth):
  with pytest.raises(ConfigError, match="6n \\+ 4"):
    WideResNet(depth=depth)


def test_vgg16_bn_parameter_count_is_the_sum_over_layers():
  widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  expected, fan_in = 0, 3
  for out in widths:
    expected += 9 * fan_in * out + _bn(out)
    fan_in = out
  expected += 512 * 100 + 100
  assert _num_params(VGG16BN(num_classes=100)) == expected
  # kuangliu/pytorch-cifar's VGG16 has 14,728,266 for 10 classes, conv biases
  # included; ours leaves out those 4,224 (each is followed by a BN shift).
  assert _num_params(VGG16BN(num_classes=10)) == 14_728_266 - sum(widths)


# Small members of each BatchNorm family, with images just large enough.
_BN_MODELS = {
    "resnet": (ResNet((1, 1), num_filters=8, num_classes=5), 8),
    "wide_resnet": (WideResNet(depth=10, width=1, num_classes=5), 8),
    "vgg16_bn": (VGG16BN(num_classes=5), 32),
}


def _key(seed):
  # XLA:CPU takes ~4 s to compile threefry for a whole model's initialisers,
  # and <1 s for rbg; the models' behaviour does not depend on the generator.
  return jax.random.key(seed, impl="rbg")


def _train_fn(model):
  return jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  )


@pytest.fixture(scope="module", params=list(_BN_MODELS))
def bn_model(request):
  """A BN model, its initial variables, a batch of three images, and jitted
  train and eval functions (made once, so each compiles once per module)."""
  model, size = _BN_MODELS[request.param]
  x = jax.random.normal(jax.random.key(1), (3, size, size, 3))
  variables = jax.jit(model.init)(_key(0), x[:2])
  evaluate = jax.jit(lambda v, x: model.apply(v, x))
  return model, variables, x, _train_fn(model), evaluate


def test_train_mode_updates_every_batch_statistic(bn_model):
  _, variables, x, train, _ = bn_model
  assert set(variables) == {"params", "batch_stats"}
  logits, updates = train(variables, x[:2])
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert list(updates) == ["batch_stats"]
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(updates["batch_stats"])
  assert len(new) == len(old) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old, new))


def test_eval_mode_is_per_example_and_train_mode_is_not(bn_model):
  _, variables, x, train, evaluate = bn_model
  # Evaluate with statistics that are not the initial zeros and ones, so the
  # check covers running averages that have actually been updated.
  trained = {**variables, **train(variables, x[:2])[1]}
  with_1 = x[jnp.array([0, 1])]
  with_2 = x[jnp.array([0, 2])]
  np.testing.assert_allclose(
      evaluate(trained, with_1)[0], evaluate(trained, with_2)[0],
      rtol=1e-5, atol=1e-5,
  )
  train_1 = train(trained, with_1)[0][0]
  train_2 = train(trained, with_2)[0][0]
  assert not np.allclose(train_1, train_2, rtol=1e-3, atol=1e-3)
  # And eval reads the running averages: other statistics, other logits.
  assert not np.allclose(evaluate(trained, with_1), evaluate(variables, with_1))


def test_bfloat16_computes_in_bfloat16_on_float32_params(bn_model):
  model, variables, x, _, _ = bn_model
  model = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x[:2])
  assert jax.tree.map(lambda a: a.dtype, shapes) == jax.tree.map(
      lambda a: jnp.dtype(jnp.float32), variables
  )
  # The float32 model's variables fit: same tree, same dtypes.
  train = _train_fn(model)
  logits, _ = train(variables, x[:2])
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  jaxpr = jax.make_jaxpr(train)(variables, x[:2]).jaxpr
  matmuls = [
      eqn for eqn in equations(jaxpr)
      if eqn.primitive.name in ("conv_general_dilated", "dot_general")
  ]
  assert matmuls
  assert all(eqn.outvars[0].aval.dtype == jnp.bfloat16 for eqn in matmuls)


def test_wrn_dropout_needs_a_key_in_training_only():
  model, _ = _BN_MODELS["wide_resnet"]
  model = model.clone(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = jax.jit(model.init)(_key(0), x)
  evaluate = jax.jit(lambda x: model.apply(variables, x))
  assert np.all(np.isfinite(evaluate(x)))  # No key needed.

  @jax.jit
  def train(key):
    return model.apply(
        variables, x, train=True, mutable=["batch_stats"],
        rngs={"dropout": key},
    )[0]

  assert not np.allclose(train(_key(2)), train(_key(3)))
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(
        lambda: model.apply(variables, x, train=True, mutable=["batch_stats"])
    )


def test_create_builds_registered_models():
  assert set(models.MODELS) == {
      "mlp", "mlp_jnp", "cnn", "resnet18", "wide_resnet", "vgg16_bn"
  }
  model = models.create("resnet18", num_classes=100)
  assert isinstance(model, ResNet18)
  assert _num_params(model) == 11_220_132


@pytest.mark.parametrize("name, kwargs, match", [
    ("resnet", {}, "unknown model 'resnet'; choose one of: mlp, cnn, resnet18"),
    ("resnet18", {"num_clases": 10}, "num_clases"),
    ("wide_resnet", {"depth": 26}, "6n \\+ 4"),
])
def test_create_rejects_bad_configs(name, kwargs, match):
  with pytest.raises(ConfigError, match=match):
    models.create(name, **kwargs)


def test_the_jax_numpy_mlp_is_the_flax_mlp():
  x = jax.random.normal(jax.random.key(0), (3, 5, 2))
  flax_mlp, jnp_mlp = MLP((6, 4)), models.MLPJnp((6, 4))
  variables = jnp_mlp.init({"params": jax.random.key(1)}, x)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(variables) == shapes(flax_mlp.init(jax.random.key(1), x))
  np.testing.assert_array_equal(jnp_mlp.apply(variables, x),
                                flax_mlp.apply(variables, x))
  logits, mutated = jnp_mlp.apply(variables, x, train=True,
                                  mutable=["batch_stats"])
  np.testing.assert_array_equal(logits, flax_mlp.apply(variables, x))
  assert mutated == {}
