"""Trains one config and evaluates it on the validation and test splits.

    python -m gnp.main --config=configs/mnist1d.py --workdir=DIR
    python -m gnp.main --config=configs/mnist1d.py --workdir=D2 \\
        --config.method=sam --config.sam.rho=0.1

configs/*.py hold the experiments; any key can be changed with
--config.KEY=VALUE. Every key, its default and what it does is listed at the
end of this help, and in gnp/config.py. Rerunning the same command resumes
from the workdir's last checkpoint. A mistake in the input exits with status
1 and one line saying what is wrong; a NaN or Inf in training with status 3;
SIGTERM or SIGINT saves a checkpoint and exits with 128 + the signal's
number.
"""

import shlex
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gnp import cli
from gnp import config as config_lib
from gnp import loop
from gnp import writers
from gnp.errors import NonFiniteError
from gnp.errors import Preempted
from gnp.errors import UserError

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and the summary; a"
    " run resumes from the checkpoint it holds.", required=True)
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first. On TPU pods"
    " and SLURM it finds its peers; elsewhere give --coordinator_address,"
    " --num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--multihost: host:port of process 0"
    " (default: detected, or $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "--multihost: how many processes (default:"
    " detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "--multihost: this process's index (default:"
    " detected).")
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, configs/NAME.py[:variant];"
    " required.", lock_config=True)
cli.hide_config_default()
# --help shows this docstring: end it with every key.
__doc__ += ("\nThe config keys (--config.KEY=DEFAULT):\n"
            + cli.config_keys_help(config_lib.default_config(),
                                   config_lib.default_config) + "\n")


def _parse_flags(argv):
  return cli.parse_config_flags(argv, program="gnp",
                                example="configs/mnist1d.py",
                                check_key=config_lib.check_key)


def main(argv):
  writers.quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _MULTIHOST.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  logging.info("JAX process %d of %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    summary = loop.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
  except (UserError, NonFiniteError, Preempted) as e:
    logging.flush()
    if isinstance(e, Preempted):
      command = shlex.join(["python", "-m", "gnp.main", *sys.argv[1:]])
      print(f"gnp: stopped: {e} ({command})", file=sys.stderr)
      sys.exit(128 + e.signum)
    print(f"gnp: error: {e}", file=sys.stderr)
    sys.exit(3 if isinstance(e, NonFiniteError) else 1)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    logging.flush()
    print(f"gnp: error: out of memory: {cli.out_of_memory_line(e)}; raise"
          " grad_accum_steps, lower batch_size or the model's size, or use"
          " more devices.", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(done_line(summary, _WORKDIR.value), flush=True)


def done_line(summary: dict, workdir: str) -> str:
  """The one line a finished run prints on stdout: what it reached, in how
  long, and where the rest is."""
  reached = ", ".join(
      f"{split} accuracy {summary[f'{split}/accuracy']:.4f}"
      for split in ("test", "validation") if f"{split}/accuracy" in summary)
  return (f"gnp: done: {reached or 'no evaluation split'} after"
          f" {summary['steps']} steps in {summary['wall_time_s']:.1f} s;"
          f" summary.json, metrics.jsonl and checkpoints in {workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
