"""A config turned into an experiment: data, model, regulariser, jitted step.

`create_experiment(config)` validates the config, loads the data, builds the
model, the optimiser and the regulariser, and jits the step (`gnp.step`) and
the evaluation (`gnp.evaluation`) over a 1-D ``data`` mesh of every device.
Nothing is compiled until a step runs and nothing is written, so an
`Experiment` is cheap to make in a test or a notebook; `gnp.loop` runs one,
`gnp.population` vmaps several.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gnp import config as config_lib
from gnp import data as data_lib
from gnp import evaluation
from gnp import models
from gnp import optim
from gnp import regularizers
from gnp.data import augment as augment_lib
from gnp.data import pipeline
from gnp.errors import ConfigError
from gnp.step import TrainState
from gnp.step import hyperparameters
from gnp.step import train_step
from gnp.step import train_step_on_device_data
from gnp.step import train_steps_on_device_data


def build_model(config: ml_collections.ConfigDict, dataset) -> Any:
  """The model ``config.model`` names, sized for ``dataset``, computing in
  ``model.dtype``."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  if m.name in ("mlp", "mlp_jnp"):
    return models.create(m.name, features=(*m.hidden, dataset.num_classes),
                         dtype=dtype)
  if m.name == "cnn":
    # Inputs of shape (H, W, C) are images: 2-D convolutions. (T,) and (T, C)
    # are 1-D signals, as mnist1d's (40,): 1-D convolutions, the model adding
    # the channel axis to (T,).
    ndim = max(len(dataset.input_shape) - 1, 1)
    return models.create(
        "cnn", features=tuple(m.hidden), num_classes=dataset.num_classes,
        ndim=ndim, dtype=dtype,
    )
  kwargs = {"num_classes": dataset.num_classes, "dtype": dtype}
  if m.name == "wide_resnet":
    kwargs.update(depth=m.depth, width=m.width, dropout_rate=m.dropout_rate)
  return models.create(m.name, **kwargs)



def _to_device(arrays, sharding, axis=0):
  """This process's slice (along ``axis``) of global arrays -> global arrays."""
  if sharding.is_fully_replicated:
    return tuple(jax.make_array_from_process_local_data(sharding, a, a.shape)
                 for a in arrays)
  size = arrays[0].shape[axis] // jax.process_count()
  start = jax.process_index() * size
  return tuple(
      jax.make_array_from_process_local_data(
          sharding, np.take(a, np.arange(start, start + size), axis=axis),
          a.shape)
      for a in arrays
  )



@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a config turns into, before the loop: importable, testable.

  ``init()`` gives the initial state, replicated over the mesh; ``step`` and
  ``eval`` are the jitted step and evaluation; ``batch(arrays)`` places this
  process's rows of a global batch onto the devices.
  """

  config: ml_collections.ConfigDict
  dataset: Any
  model: Any
  regularizer: regularizers.Regularizer
  steps_per_epoch: int
  total_steps: int
  mesh: jax.sharding.Mesh
  abstract_state: TrainState
  init: Callable[[], TrainState]
  # (rng, hparams) -> TrainState, pure: the state of another seed or
  # hyper-parameter setting of the same compiled step (`gnp.population`).
  init_state: Callable
  step: Callable  # (state, (x, y)) -> (state, metrics)
  # (state, train_data, epoch_indices) -> (state, metrics): what the loop runs.
  step_on_device_data: Callable
  # (state, train_data, epoch_indices, n) -> (state, metrics [n]): n steps of
  # one epoch in one dispatch (``steps_per_dispatch``); n is static.
  steps_on_device_data: Callable
  eval: Callable  # (state, (x, y, mask)) -> sums

  def batch(self, arrays):
    return _to_device(arrays, NamedSharding(self.mesh, P("data")))

  def train_data(self):
    """The train split, replicated on every device."""
    return _to_device(self.dataset.train, NamedSharding(self.mesh, P()))

  def epoch_indices(self, epoch: int):
    """[steps_per_epoch, batch_size] example indices, split along the batch."""
    idx = pipeline.epoch_indices(len(self.dataset.train[0]),
                                 self.config.batch_size, self.config.seed,
                                 epoch)
    return _to_device((idx,), NamedSharding(self.mesh, P(None, "data")),
                      axis=1)[0]

  def train_batch(self, step: int):
    """The global batch of (0-based) ``step``, placed on the devices."""
    x, y = self.dataset.train
    idx = pipeline.train_indices(len(x), self.config.batch_size,
                                 self.config.seed, step)
    return self.batch((x[idx], y[idx]))

  def evaluation_sums(self, state, arrays, *, eval_fn=None, place=None):
    """Sums of `eval`'s loss, correct predictions and count over ``arrays``.

    ``arrays`` is a split, ``(x, y)`` as numpy. ``eval_fn`` and ``place``
    stand in for `eval` and `batch` (`gnp.population` passes its vmapped
    evaluation). The sums come back as numpy.
    """
    return evaluation.evaluation_sums(
        state, arrays, eval_fn=eval_fn or self.eval,
        place=place or self.batch, batch_size=self.config.eval_batch_size,
        num_devices=self.mesh.size)

  def evaluate(self, state, arrays) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``state`` on a split ``(x, y)``."""
    return evaluation.means(self.evaluation_sums(state, arrays))


def data_seed(config: ml_collections.ConfigDict) -> int:
  """The seed that fixes the data: ``dataset.seed``, else ``seed``."""
  return config.seed if config.dataset.seed is None else config.dataset.seed


def create_experiment(config: ml_collections.ConfigDict,
                      dataset=None) -> Experiment:
  """Validates ``config``, loads the data (unless given) and builds the step.

  Raises `gnp.errors.UserError` for a mistake in the input, before anything
  is compiled. Nothing is written.
  """
  config_lib.validate(config, num_devices=jax.device_count())
  if dataset is None:
    dataset = data_lib.load(config.dataset, seed=data_seed(config))
  steps_per_epoch = pipeline.steps_per_epoch(len(dataset.train[0]),
                                             config.batch_size)
  if not config.num_steps and (config.num_epochs * steps_per_epoch
                               > config_lib.MAX_STEPS):
    raise ConfigError(
        f"num_epochs={config.num_epochs} × {steps_per_epoch} steps per epoch"
        f" is more than the {config_lib.MAX_STEPS} steps the int32 step"
        " counter holds; lower num_epochs.")
  model = build_model(config, dataset)
  unit_schedule = optim.learning_rate_schedule(
      config.optimizer, steps_per_epoch, config.num_epochs * steps_per_epoch,
      peak=1.0)
  make_tx = functools.partial(optim.build_optimizer, config.optimizer)
  hparams = hyperparameters(config)
  augment = augment_lib.make_augment(config.augment)
  regularizer = regularizers.build_regularizer(config, steps_per_epoch, augment)

  def init(rng, hparams=hparams):
    sample = jnp.zeros((1, *dataset.input_shape), jnp.float32)
    variables = model.init({"params": rng, "dropout": rng}, sample, train=False)
    params = variables["params"]
    tx = make_tx(optax.constant_schedule(0.0), 0.0)  # The state's structure.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng,
                      hparams=jax.tree.map(jnp.asarray, hparams),
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      nonfinite_what=jnp.zeros((), jnp.int32),
                      skipped_steps=jnp.zeros((), jnp.int32))

  def init_from_seed(hparams):
    # The key is made inside: making it eagerly would compile a program
    # before the checks below.
    return init(jax.random.key(config.seed), hparams)

  abstract = jax.eval_shape(init_from_seed, hparams)
  if config.method == "gvr" and config.gvr.wrt is not None:
    paths = [jax.tree_util.keystr(path, simple=True, separator="/")
             for path, _ in jax.tree.leaves_with_path(abstract.params)]
    if not any(re.search(config.gvr.wrt, path) for path in paths):
      raise ConfigError(
          f"gvr.wrt={config.gvr.wrt!r} matches none of the parameters'"
          f" paths ({', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''}).")
  if config.method == "gnvr" and abstract.batch_stats:
    raise ConfigError(
        "method='gnvr' needs per-example gradients, which batch normalisation"
        f" in training mode makes ill-defined; model {config.model.name!r} has"
        " BatchNorm layers."
    )

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P("data"))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  step_args = dict(model=model, make_tx=make_tx, unit_schedule=unit_schedule,
                   regularizer=regularizer, preprocess=dataset.preprocess,
                   augment=augment, use_l2=bool(config.optimizer.l2),
                   skip_nonfinite=config.on_nonfinite == "skip",
                   grad_accum_steps=config.grad_accum_steps)
  init_jit = jax.jit(init_from_seed, out_shardings=state_sharding)
  step_fn = jax.jit(
      functools.partial(train_step, **step_args),
      in_shardings=(state_sharding, split),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
  )
  step_on_device_data = jax.jit(
      functools.partial(train_step_on_device_data, **step_args),
      in_shardings=(state_sharding, replicated,
                    NamedSharding(mesh, P(None, "data"))),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
  )
  steps_on_device_data = jax.jit(
      functools.partial(train_steps_on_device_data, **step_args),
      in_shardings=(state_sharding, replicated,
                    NamedSharding(mesh, P(None, "data"))),
      out_shardings=(state_sharding, replicated),
      static_argnums=3, donate_argnums=0,
  )
  eval_fn = jax.jit(
      functools.partial(evaluation.eval_step, model=model,
                        preprocess=dataset.preprocess),
      in_shardings=(state_sharding, split), out_shardings=replicated,
  )
  return Experiment(
      config=config, dataset=dataset, model=model, regularizer=regularizer,
      steps_per_epoch=steps_per_epoch,
      total_steps=config.num_steps or config.num_epochs * steps_per_epoch,
      mesh=mesh, abstract_state=abstract,
      # hparams as an argument, not a constant: one compiled init for every
      # setting of the traced hyper-parameters.
      init=lambda: init_jit(hparams),
      init_state=init,
      step=step_fn, step_on_device_data=step_on_device_data,
      steps_on_device_data=steps_on_device_data, eval=eval_fn,
  )

