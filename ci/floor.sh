#!/usr/bin/env bash
# The dependency-floor job: installs gnp into a fresh virtual environment with
# the lowest versions setup.py allows (ci/floor-constraints.txt, `==` pins of
# its `>=` floors; tests/test_floor.py keeps the two in step) and runs a subset
# of the suite there: the penalties, the ghost norms (which match jaxpr
# primitive names), the optimiser transforms, the train step and checkpoints.
#
#   bash ci/floor.sh                      # a throwaway venv, removed afterwards
#   FLOOR_VENV=/tmp/v bash ci/floor.sh    # (re)uses and keeps /tmp/v
#   FLOOR_CONSTRAINTS=c.txt bash ci/floor.sh  # tries other pins (a bisection)
#   FLOOR_ISOLATED=1 bash ci/floor.sh     # installs every requirement afresh
#
# Raising a floor: change setup.py and ci/floor-constraints.txt together.
set -euo pipefail
cd "$(dirname "$0")/.."

tests=(
  tests/test_floor.py
  tests/test_penalties.py::test_value_and_grad_contract_under_jit
  tests/test_ghost.py::test_norms_equal_vmap_in_both_forms
  "tests/test_ghost.py::test_gnvr_gradient_equals_vmap[mlp-gram]"
  "tests/test_ghost.py::test_gnvr_gradient_equals_vmap[conv2d-outer]"
  tests/test_ghost.py::test_unsupported_models_are_refused_and_auto_uses_vmap
  tests/test_ghost.py::test_a_layer_given_a_transformed_parameter_is_refused
  tests/test_ghost.py::test_a_leaf_shared_between_layers_is_exact
  # Not the Equinox model: equinox 0.13.8 declares jax 0.7.0 incompatible.
  "tests/test_ghost_jaxpr.py::test_norms_equal_vmap_in_both_forms[jnp_cnn]"
  "tests/test_ghost_jaxpr.py::test_norms_equal_vmap_in_both_forms[jnp_transformed]"
  "tests/test_ghost_jaxpr.py::test_norms_equal_vmap_in_both_forms[nnx_cnn]"
  "tests/test_ghost_jaxpr.py::test_norms_equal_vmap_in_both_forms[eqx_cnn]"
  "tests/test_ghost_jaxpr.py::test_gnvr_gradient_equals_vmap[jnp_cnn-gram]"
  tests/test_ghost_jaxpr.py::test_refusals_name_the_parameter_and_the_primitive
  tests/test_gradient_norm_variance.py::test_stats_and_default_ddof_is_unbiased
  tests/test_transforms.py::test_centralize_matches_numpy_loop
  tests/test_transforms.py::test_chain_on_flax_params
  tests/test_transforms.py::test_jit_and_inject_hyperparams
  tests/test_step.py::test_the_run_key_is_typed_and_checkpoints_as_the_legacy_bytes
  tests/test_train.py::test_checkpoints_are_written_by_orbax_and_loadable
  tests/test_asam.py
  tests/test_clipping.py
  "tests/test_accumulation.py::test_the_step_equals_the_whole_batch_in_float64[sam-mlp]"
  "tests/test_accumulation.py::test_the_step_equals_the_whole_batch_in_float64[gnvr_ghost-mlp]"
  tests/test_accumulation.py::test_losses_come_back_in_batch_order_and_keys_per_microbatch
  "tests/test_l2_ghost.py::test_gnvr_and_clipping_equal_vmap_and_the_loop[mlp]"
  "tests/test_randomized_sam.py::test_each_branch_equals_the_hand_computation[True]"
  tests/test_randomized_sam.py::test_the_coin_is_an_independent_bernoulli_draw
)

if [[ -n "${FLOOR_VENV:-}" ]]; then
  venv=$FLOOR_VENV
else
  venv=$(mktemp -d "${TMPDIR:-/tmp}/gnp-floor.XXXXXX")
  trap 'rm -rf "$venv"' EXIT
fi
start=$SECONDS
# The venv sees the packages of the python that runs this (CI's, where gnp's
# requirements were just installed), so that only the pinned packages, which
# shadow those, are installed: a fraction of a full install's time. With
# FLOOR_ISOLATED=1 it does not, and everything is installed into it.
if [[ ! -x "$venv/bin/python" ]]; then
  if [[ -n "${FLOOR_ISOLATED:-}" ]]; then
    python -m venv "$venv"
  else
    python -m venv --system-site-packages "$venv"
  fi
fi
"$venv/bin/python" -m pip install --quiet -e ".[test]" \
  -c "${FLOOR_CONSTRAINTS:-ci/floor-constraints.txt}"
installed=$((SECONDS - start))
"$venv/bin/python" - "$installed" <<'PY'
import sys
from importlib import metadata
names = ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy")
print(f"floor job: installed in {sys.argv[1]}s:",
      " ".join(f"{name}=={metadata.version(name)}" for name in names))
PY
# pytest's closing line ("N passed in Ts") stays the last line of the job.
"$venv/bin/python" -m pytest -q -n 2 -p no:cacheprovider "${tests[@]}"
