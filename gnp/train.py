"""The training system's public names, gathered in one place.

The training system is four files, in the order data flows through them:

* `gnp.step`: the state (`TrainState`), the loss and `train_step`;
* `gnp.evaluation`: exact loss and accuracy over a split;
* `gnp.experiment`: `create_experiment(config)` turns a config into data, a
  model and the jitted step and evaluation;
* `gnp.loop`: `train_and_evaluate(config, workdir)`, the whole run.

``from gnp import train`` gives the names a notebook or a script needs:

>>> from gnp import train
>>> sorted(n for n in dir(train) if not n.startswith("_"))[:3]
['Experiment', 'NONFINITE_LOSS', 'NONFINITE_UPDATE']
"""

from gnp.evaluation import eval_step
from gnp.experiment import Experiment
from gnp.experiment import build_model
from gnp.experiment import create_experiment
from gnp.experiment import data_seed
from gnp.loop import train_and_evaluate
from gnp.step import NONFINITE_LOSS
from gnp.step import NONFINITE_UPDATE
from gnp.step import TrainState
from gnp.step import hyperparameter_keys
from gnp.step import hyperparameters
from gnp.step import make_loss_fn
from gnp.step import summarise_steps
from gnp.step import train_step
from gnp.step import train_step_on_device_data

__all__ = [
    "Experiment", "NONFINITE_LOSS", "NONFINITE_UPDATE", "TrainState",
    "build_model", "create_experiment", "data_seed", "eval_step",
    "hyperparameter_keys", "hyperparameters", "make_loss_fn",
    "summarise_steps", "train_and_evaluate", "train_step",
    "train_step_on_device_data",
]
