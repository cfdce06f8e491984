#!/usr/bin/env bash
# CIFAR-100, ResNet-18, SAM (ρ 0.1), 200 epochs.
#
# Runs from the repository root, unedited:   ./recipes/cifar100_sam.sh
# Every value can be changed without editing this file:
#   WORKDIR=runs/x   where checkpoints and metrics go (a rerun resumes there)
#   DATA_DIR=/data   tensorflow-datasets directory (default: TFDS's own)
#   SEED=1           the run's seed
#   VARIANT=...      a variant of the config (see configs/cifar100_sam.py)
#   SMOKE=1          synthetic data of CIFAR's shape, 2 steps of the real model:
#                    checks an install, no dataset (1-3 min on a 2-core CPU,
#                    nearly all of it compilation)
# and any further arguments go to gnp.main, e.g. --config.num_epochs=100.
#
# GPU: JAX preallocates 75% of GPU memory; XLA_PYTHON_CLIENT_MEM_FRACTION=.9
#   gives it more, XLA_PYTHON_CLIENT_PREALLOCATE=false allocates on demand.
#   All visible GPUs are used (data parallel); pick them with
#   CUDA_VISIBLE_DEVICES. --config.model.dtype=bfloat16 halves activations.
# TPU pod / multi-host: run the same command on every host with
#   MULTIHOST=1, e.g. gcloud compute tpus tpu-vm ssh NAME --worker=all
#   --command="cd gnp && MULTIHOST=1 WORKDIR=/mnt/shared/run ./recipes/cifar100_sam.sh";
#   WORKDIR must be a directory every host sees (NFS, GCSFuse);
#   the batch size is global and must divide by the total device count.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKDIR="${WORKDIR:-runs/cifar100_sam}"
VARIANT="${VARIANT:-}"
if [[ "${SMOKE:-0}" == 1 ]]; then
  VARIANT="${VARIANT:+${VARIANT},}smoke"
  WORKDIR="${WORKDIR}_smoke"
fi
args=(--config="configs/cifar100_sam.py${VARIANT:+:${VARIANT}}" --workdir="${WORKDIR}")
[[ -n "${DATA_DIR:-}" ]] && args+=(--config.dataset.data_dir="${DATA_DIR}")
[[ -n "${SEED:-}" ]] && args+=(--config.seed="${SEED}")
[[ "${MULTIHOST:-0}" == 1 ]] && args+=(--multihost)

exec python -m gnp.main "${args[@]}" "$@"
