"""``model.dtype`` reaches every model; the mnist1d CNN convolves in 1-D.

Each model is built as training builds it, by `build_model` from a real config
and dataset, and its forward pass and gradient are traced, never compiled:
the jaxpr tells in which dtype each matmul and convolution runs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnp import config as config_lib
from gnp import data
from gnp import train
from gnp.experiment import build_model
from tests.helpers import equations
from tests.helpers import tiny_mnist1d

MATMULS = ("dot_general", "conv_general_dilated")

# Model name -> (dataset, config overrides): each model of gnp.config.MODELS,
# small enough to trace in a second or two. ResNet-18 and VGG-16-BN have no
# size in the config; they are traced at full width.
CASES = {
    "mlp": ("mnist1d", {"model.hidden": (8, 8)}),
    "mlp_jnp": ("mnist1d", {"model.hidden": (8, 8)}),
    "cnn_mnist1d": ("mnist1d", {"model.hidden": (4, 8)}),
    "cnn_image": ("image", {"model.hidden": (4, 8)}),
    "resnet18": ("image", {}),
    "wide_resnet": ("image", {"model.depth": 10, "model.width": 1}),
    "vgg16_bn": ("image", {}),
}


def _model_name(case):
  return "cnn" if case.startswith("cnn_") else case


def test_the_cases_cover_every_model():
  assert {_model_name(case) for case in CASES} == set(config_lib.MODELS)


@functools.cache
def _dataset(kind):
  if kind == "mnist1d":
    config = tiny_mnist1d()
  else:  # VGG-16 needs 32×32 images for its five max-pools.
    config = config_lib.default_config()
    config.dataset.name = "synthetic"
    config.dataset.input_shape = (32, 32, 3)
    config.dataset.num_train = 8
    config.dataset.num_test = 4
    config.dataset.validation_size = 0
  return data.load(config.dataset, seed=0)


def _build(case, dtype):
  kind, overrides = CASES[case]
  config = tiny_mnist1d() if kind == "mnist1d" else config_lib.default_config()
  config.model.name = _model_name(case)
  config.model.dtype = dtype
  config.update_from_flattened_dict(overrides)
  dataset = _dataset(kind)
  model = build_model(config, dataset)
  # As the step feeds it: the preprocessed float32 batch.
  x = jax.ShapeDtypeStruct((2, *dataset.input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return model, variables, x


def _matmuls(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [eqn for eqn in equations(jaxpr) if eqn.primitive.name in MATMULS]


def _dtypes(eqn):
  return {str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)}


def _forward(model, variables, x):
  return model.apply(variables, x, train=False)


def _loss(model, variables, x):
  """The training loss's shape: train mode, float32 logits, a scalar."""
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    logits, _ = model.apply({"params": params, **rest}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  return jax.grad(loss)(params)


@pytest.mark.parametrize("dtype", config_lib.DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_the_forward_pass_computes_in_model_dtype(case, dtype):
  model, variables, x = _build(case, dtype)
  # Parameters (and batch statistics) stay float32 whatever the dtype.
  assert {str(a.dtype) for a in jax.tree.leaves(variables)} == {"float32"}
  logits = jax.eval_shape(functools.partial(_forward, model), variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  matmuls = _matmuls(functools.partial(_forward, model), variables, x)
  assert matmuls
  for eqn in matmuls:
    assert _dtypes(eqn) == {dtype}, eqn


@pytest.mark.parametrize("case", ["mlp", "cnn_mnist1d", "wide_resnet"])
def test_the_gradient_computes_in_bfloat16_too(case):
  model, variables, x = _build(case, "bfloat16")
  # The backward pass's matmuls too: the cotangents flow in bfloat16.
  matmuls = _matmuls(functools.partial(_loss, model), variables, x)
  assert matmuls
  for eqn in matmuls:
    assert _dtypes(eqn) == {"bfloat16"}, eqn
  grads = jax.eval_shape(functools.partial(_loss, model), variables, x)
  assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}


def test_the_mnist1d_cnn_convolves_and_pools_along_the_signal():
  model, variables, x = _build("cnn_mnist1d", "float32")
  assert x.shape == (2, 40)
  shapes = jax.tree.map(lambda a: a.shape, variables["params"])
  assert shapes == {
      "Conv_0": {"kernel": (3, 1, 4), "bias": (4,)},
      "Conv_1": {"kernel": (3, 4, 8), "bias": (8,)},
      # Two poolings: 40 → 20 → 10 positions of 8 channels.
      "Dense_0": {"kernel": (10 * 8, 10), "bias": (10,)},
  }
  jaxpr = jax.make_jaxpr(functools.partial(_forward, model))(variables, x)
  eqns = list(equations(jaxpr.jaxpr))
  convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
  assert [len(e.params["window_strides"]) for e in convs] == [1, 1]
  assert [e.invars[0].aval.shape for e in convs] == [(2, 40, 1), (2, 20, 4)]
  pools = [e for e in eqns if e.primitive.name == "reduce_window_max"]
  assert [(e.invars[0].aval.shape, e.outvars[0].aval.shape) for e in pools] == [
      ((2, 40, 4), (2, 20, 4)), ((2, 20, 8), (2, 10, 8))]



def test_the_mnist1d_cnn_trains_in_bfloat16():
  # Through the training system: config → experiment → jitted step.
  config = tiny_mnist1d(**{
      "model.name": "cnn", "model.hidden": (16, 32),
      "model.dtype": "bfloat16", "optimizer.learning_rate": 3e-3})
  exp = train.create_experiment(config)
  assert exp.model.ndim == 1 and exp.model.dtype == jnp.bfloat16
  state = exp.init()
  assert state.params["Conv_0"]["kernel"].shape == (3, 1, 16)
  losses = []
  for step in range(20):
    state, metrics = exp.step(state, exp.train_batch(step))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
