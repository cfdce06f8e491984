"""Mutation audit: would the tests notice a plausible one-line slip?

    python tools/mutation.py                  # every mutant (see the README)
    python tools/mutation.py --only lr_ --only keys_  # names starting so
    python tools/mutation.py --check          # only that each mutant applies

Each entry of `MUTANTS` replaces one exact piece of one line of gnp (it must
occur exactly once in its file) and names the tests that should notice. The
tree (the files git tracks, as they are in the work tree) is copied to a
temporary directory once; each mutant is applied there, its tests run with
``python -m pytest -x`` in that copy (which imports the copy's gnp), and the
file is restored. A mutant is *killed* when its tests fail, *survives* when
they pass. The first run, on the unmutated copy, must pass: otherwise a
failure would say nothing about the mutant.

The list holds the audit's 31 slips (the mathematics of the penalties, each
already caught then, and the wiring around them, nine of which then passed
the whole suite) and the ones added with the tests that now catch them.
`SURVIVING` lists mutants known to survive, each with why it is harmless;
the README's testing section gives the last score. This is not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  old: str  # Exactly once in the file, on one line.
  new: str
  tests: tuple[str, ...]
  why: str  # The slip it stands for.


def _m(name, path, old, new, tests, why):
  return Mutant(name, path, old, new, tuple(tests), why)


T = "tests/"
MUTANTS = [
    # --- The audit's slips in the mathematics (all caught then). ---------
    _m("sam_ascends_backwards", "gnp/penalties/gradient_norm.py",
       "perturbed = _mix(params, direction, 1.0, radius)",
       "perturbed = _mix(params, direction, 1.0, -radius)",
       [T + "test_gradient_norm.py::test_alpha_one_is_sam", T + "test_gradient_norm.py::test_finite_difference_equals_formula"],
       "SAM/GNP perturb against the gradient"),
    _m("sam_unnormalised", "gnp/penalties/gradient_norm.py",
       "perturbed = _mix(params, direction, 1.0, radius)",
       "perturbed = _mix(params, grads, 1.0, radius)",
       [T + "test_gradient_norm.py::test_alpha_one_is_sam", T + "test_gradient_norm.py::test_finite_difference_equals_formula"],
       "θ + ρ g instead of θ + ρ g/‖g‖"),
    _m("gnp_mix_swapped", "gnp/penalties/gradient_norm.py",
       "update = _mix(first, perturbed_grads, 1.0 - alpha, alpha)",
       "update = _mix(first, perturbed_grads, alpha, 1.0 - alpha)",
       [T + "test_gradient_norm.py::test_finite_difference_equals_formula"], "GNP's mixing weights swapped"),
    _m("gnp_exact_scale", "gnp/penalties/gradient_norm.py",
       "update = _mix(grads, hvp(direction), 1.0, alpha * r)",
       "update = _mix(grads, hvp(direction), 1.0, r)",
       [T + "test_gradient_norm.py::test_exact_equals_grad_of_penalised_objective"], "exact GNP forgets α"),
    _m("gnp_normalize_first_ignored", "gnp/penalties/gradient_norm.py",
       "first = direction if normalize_first else grads", "first = grads",
       [T + "test_gradient_norm.py::test_finite_difference_equals_formula"], "normalize_first mixes g, not ĝ"),
    _m("gnvr_no_second_order", "gnp/penalties/gradient_norm_variance.py",
       "variance = jnp.sum((norms - jnp.mean(norms)) ** 2) / (size - ddof)",
       "variance = jnp.sum((jax.lax.stop_gradient(norms) - jnp.mean(norms))"
       " ** 2) / (size - ddof)",
       [T + "test_gradient_norm_variance.py::test_equals_python_loop_reference"],
       "GNVR's gradient stops at the per-example norms"),
    _m("gnvr_ddof_ignored", "gnp/penalties/gradient_norm_variance.py",
       "variance = jnp.sum((norms - jnp.mean(norms)) ** 2) / (size - ddof)",
       "variance = jnp.sum((norms - jnp.mean(norms)) ** 2) / (size - 1)",
       [T + "test_gradient_norm_variance.py::test_ddof_convention"],
       "the variance ignores ddof"),
    _m("hessian_reused_probe_bits", "gnp/penalties/hessian.py",
       "jax.random.split(probe_key, num_probes)",
       "jnp.stack([probe_key] * num_probes)",
       [T + "test_hessian.py"], "every probe draws the same random bits"),
    _m("hessian_no_third_order", "gnp/penalties/hessian.py",
       "return loss, aux, grads, otu.tree_norm(hvp, squared=True)",
       "return loss, aux, grads, otu.tree_norm(jax.lax.stop_gradient(hvp),"
       " squared=True)",
       [T + "test_hessian.py::test_penalty_gradient_flows_through_hessian_vector_product"],
       "the penalty's gradient stops at the Hessian-vector product"),
    _m("gvr_views_share_a_key", "gnp/regularizers.py",
       "first, second = jax.random.split(key)",
       "first = second = key",
       [T + "test_step.py::test_each_step_draws_its_own_randomness"],
       "GVR's two views are the same view"),
    _m("gvr_penalty_unsquared", "gnp/penalties/view_consistency.py",
       "penalty = otu.tree_norm(difference, squared=True)\n      stats = {",
       "penalty = otu.tree_norm(difference)\n      stats = {",
       [T + "test_view_consistency.py::test_matches_hand_written_objective"], "‖g¹ − g²‖ for ‖g¹ − g²‖²"),
    _m("zero_gradient_nan", "gnp/penalties/_base.py",
       "inverse = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0),"
       " 0.0)",
       "inverse = 1.0 / norm",
       [T + "test_gradient_norm.py::test_zero_gradient_gives_finite_zero_update"], "‖g‖ = 0 gives NaN"),
    _m("groups_share_a_key", "gnp/penalties/_base.py",
       "jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))",
       "jax.random.fold_in, in_axes=(None, 0))(key, 0 * jnp.arange(n))",
       [T + "test_gradient_norm.py::test_group_size_is_mean_over_groups"],
       "every m-sharpness group draws the same randomness"),
    _m("ghost_gram_without_bias", "gnp/penalties/ghost.py",
       'gram_a = jnp.einsum("btgp,bsgp->bgts", a, a) + with_bias',
       'gram_a = jnp.einsum("btgp,bsgp->bgts", a, a)',
       [T + "test_ghost.py::test_norms_equal_vmap_in_both_forms"], "the Gram form drops the bias"),
    _m("ghost_shared_bias_dropped", "gnp/penalties/ghost.py",
       "g, w1 = _bias_view_grads(site, deltas[n], dtype)",
       "g, w1 = _bias_view_grads(site, 0 * deltas[n], dtype)",
       [T + "test_ghost.py::test_a_leaf_shared_between_layers_is_exact", T + "test_ghost.py::test_norms_equal_vmap_in_both_forms"], "a bias shared by layers is not counted"),
    _m("gc_wrong_axis", "gnp/transforms.py",
       "lambda g, axes: g - g.mean(axes, keepdims=True), conv_only",
       "lambda g, axes: g - g.mean(-1, keepdims=True), conv_only",
       [T + "test_transforms.py"], "GC centres over the output axis"),
    _m("ngs_sample_std", "gnp/transforms.py",
       "scale = g.std(axes, keepdims=True) + eps",
       "scale = g.std(axes, keepdims=True, ddof=1) + eps",
       [T + "test_transforms.py"], "NGS divides by the sample std"),
    _m("ngs_dead_neuron_nan", "gnp/transforms.py",
       "return jnp.where(scale > 0, centred / jnp.where(scale > 0, scale, 1),"
       " 0)", "return centred / scale",
       [T + "test_transforms.py"], "eps = 0 turns a dead neuron's 0/0 NaN"),
    _m("l2_on_biases", "gnp/step.py",
       "return jax.tree.map(lambda w: w.ndim > 1, params)",
       "return jax.tree.map(lambda w: w.ndim >= 1, params)",
       [T + "test_train.py::test_the_step_is_the_regularised_gradient_through_the_optimiser"], "L2 on biases too"),
    _m("epoch_order_fixed", "gnp/data/pipeline.py",
       "order = np.random.default_rng([seed, epoch]).permutation(num_examples)",
       "order = np.random.default_rng([seed, 0]).permutation(num_examples)",
       [T + "test_data.py::test_every_example_once_per_epoch_and_epochs_differ"], "every epoch in the same order"),
    _m("report_t_dof", "gnp/results.py",
       "return float(stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1)",
       "return float(stats.t.ppf(0.975, values.size) * values.std(ddof=1)",
       [T + "test_report.py"], "the t interval with n degrees of freedom"),
    _m("replicates_pooled_as_seeds", "gnp/results.py",
       "values = means if replicated else diffs",
       "values = diffs",
       [T + "test_report.py"],
       "a replicated study's interval over seeds, blind to the tuning draw"),
    _m("collapse_pooled_median", "gnp/results.py",
       "median = medians[replicate[seed]]",
       "median = float(np.median(list(accuracies.values())))",
       [T + "test_report.py"],
       "the collapse rule against the median of every replicate's seeds"),
    _m("population_stale_rows", "gnp/population.py",
       "          epoch_of[row] = 0",
       "          pass",
       [T + "test_population.py::test_a_stream_trains_each_run_as_alone_in_rows_it_refills"],
       "a refilled row's run starts at the epoch its predecessor ended"),
    _m("report_population_std", "gnp/results.py",
       '"std": float(values.std(ddof=1)) if values.size > 1 else None}',
       '"std": float(values.std()) if values.size > 1 else None}',
       [T + "test_report.py"], "the table's std with ddof 0"),
    _m("bn_stats_from_perturbed_pass", "gnp/penalties/gradient_norm.py",
       "(perturbed_loss, _), perturbed_grads = value_and_grad(perturbed)",
       "(perturbed_loss, aux), perturbed_grads = value_and_grad(perturbed)",
       [T + "test_train.py::test_batch_norm_statistics_come_from_the_unperturbed_pass"],
       "batch statistics from the perturbed pass"),
    # --- The audit's slips in the wiring (nine passed the suite then). ----
    _m("eval_counts_padding", "gnp/evaluation.py",
       'return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct *'
       ' mask),',
       'return {"loss": jnp.sum(losses), "correct": jnp.sum(correct * mask),',
       [T + "test_evaluation.py::test_evaluation_equals_a_hand_computation_on_a_padded_split"], "evaluation sums the loss of padded rows"),
    _m("lr_one_step_late", "gnp/step.py",
       'learning_rate = hparams["learning_rate"] * unit_schedule(state.step)',
       'learning_rate = hparams["learning_rate"] * unit_schedule('
       "jnp.maximum(state.step - 1, 0))",
       [T + "test_step.py::test_the_step_applies_the_scheduled_learning_rate"],
       "the step reads the schedule one step late"),
    _m("keys_reused_every_step", "gnp/step.py",
       "key = jax.random.fold_in(state.rng, state.step)",
       "key = jax.random.fold_in(state.rng, 0)",
       [T + "test_step.py::test_per_step_keys_are_the_run_key_folded_with_the_step", T + "test_step.py::test_each_step_draws_its_own_randomness"], "every step draws the same randomness"),
    _m("gc_ngs_dropped_for_adam", "gnp/optim.py",
       "if opt.centralize:",
       'if opt.centralize and opt.name == "sgd":',
       [T + "test_optim.py"], "GC left out of the Adam/AdamW chains"),
    _m("m_sharpness_bn_one_group", "gnp/step.py",
       "lambda new, old: jnp.mean(new.reshape((-1,) + old.shape), axis=0),",
       "lambda new, old: new.reshape((-1,) + old.shape)[0],",
       [T + "test_step.py::test_m_sharpness_batch_norm_statistics_are_the_mean_over_groups"], "m-sharpness keeps one group's BN statistics"),
    _m("report_pairs_by_position", "gnp/results.py",
       "diffs = np.array([mine[k] - theirs[k] for k in common],"
       " dtype=np.float64)",
       "diffs = np.array([a - b for a, b in zip(mine.values(),"
       " theirs.values())], dtype=np.float64)",
       [T + "test_report.py"], "the report pairs seeds by position"),
    _m("gnvr_mean_norm_is_rms", "gnp/penalties/gradient_norm_variance.py",
       '"mean_example_grad_norm": jnp.mean(norms),',
       '"mean_example_grad_norm": jnp.sqrt(jnp.mean(norms ** 2)),',
       [T + "test_stats.py"], "mean_example_grad_norm is the RMS"),
    _m("plot_population_std", "gnp/figures.py",
       "values.std(axis=0, ddof=1)", "values.std(axis=0, ddof=0)",
       [T + "test_report.py"], "the plotted band is the population std"),
    _m("ghost_transformed_kernel", "gnp/penalties/ghost_jaxpr.py",
       'param.preserving and name not in ("mul", "div")',
       "param.preserving",
       [T + "test_ghost.py::test_auto_gives_the_exact_norms_of_a_scaled_kernel", T + "test_ghost.py::test_a_layer_given_a_transformed_parameter_is_refused"],
       "a scaled kernel is taken for a relabelling of the leaf (its norms in the fast form)"),
    # --- Added with the tests that catch them. -----------------------------
    _m("lr_logged_one_step_early", "gnp/step.py",
       '"learning_rate": learning_rate,',
       '"learning_rate": hparams["learning_rate"] * unit_schedule('
       "state.step + 1),",
       [T + "test_step.py::test_the_step_applies_the_scheduled_learning_rate"],
       "the logged learning rate is not the applied one"),
    _m("schedule_follows_optax_count", "gnp/step.py",
       "tx = make_tx(lambda count: learning_rate, hparams[\"weight_decay\"])",
       'tx = make_tx(lambda count: hparams["learning_rate"] *'
       ' unit_schedule(count), hparams["weight_decay"])',
       [T + "test_step.py::test_a_skipped_step_does_not_shift_the_schedule"],
       "a skipped step shifts the applied schedule against the logged one"),
    _m("warmup_ramp_off_by_one", "gnp/optim.py",
       "ramp = optax.linear_schedule(0.0, peak, warmup)",
       "ramp = optax.linear_schedule(0.0, peak, warmup + 1)",
       [T + "test_step.py::test_the_step_applies_the_scheduled_learning_rate"], "warm-up ends a step late"),
    _m("augment_and_loss_share_a_key", "gnp/step.py",
       "augment_key, loss_key = jax.random.split(key)",
       "augment_key = loss_key = key",
       [T + "test_step.py::test_per_step_keys_are_the_run_key_folded_with_the_step"], "augmentation uses the unsplit step key"),
    _m("eval_count_includes_padding", "gnp/evaluation.py",
       '"count": jnp.sum(mask)}', '"count": jnp.sum(jnp.ones_like(mask))}',
       [T + "test_evaluation.py::test_evaluation_equals_a_hand_computation_on_a_padded_split"], "evaluation divides by the padded size"),
    _m("eval_skips_preprocessing", "gnp/evaluation.py",
       "logits = model.apply(variables, preprocess(x), train=False)",
       "logits = model.apply(variables, x, train=False)",
       [T + "test_evaluation.py::test_evaluation_equals_a_hand_computation_on_a_padded_split"], "evaluation skips preprocessing"),
    _m("population_eval_wrong_member", "gnp/population.py",
       'float(sums["loss"][row] / sums["count"][row]))',
       'float(sums["loss"][0] / sums["count"][row]))',
       [T + "test_evaluation.py::test_a_population_evaluates_each_member_as_by_hand"],
       "a population reports the first member's loss for every member"),
    _m("clip_dropped", "gnp/optim.py",
       "chain.append(optax.clip_by_global_norm(opt.grad_clip))",
       "pass",
       [T + "test_optim.py"], "gradient clipping left out"),
    _m("coupled_decay_for_adamw", "gnp/optim.py",
       'if opt.weight_decay and opt.name != "adamw":',
       "if opt.weight_decay:",
       [T + "test_optim.py"], "AdamW decays twice (coupled too)"),
    _m("coupled_decay_dropped", "gnp/optim.py",
       "chain.append(optax.add_decayed_weights(decay))", "pass",
       [T + "test_optim.py"], "coupled decay left out of SGD/Adam"),
    _m("nesterov_ignored", "gnp/optim.py",
       "nesterov=opt.nesterov))", "nesterov=False))",
       [T + "test_optim.py"], "Nesterov momentum ignored"),
    _m("adam_b2_for_b1", "gnp/optim.py",
       "chain.append(optax.adam(schedule, b1=opt.b1, b2=opt.b2))",
       "chain.append(optax.adam(schedule, b1=opt.b2, b2=opt.b2))",
       [T + "test_optim.py"], "Adam's β1 from the wrong key"),
    _m("sam_penalty_is_perturbed_loss", "gnp/penalties/sam.py",
       '"penalty": perturbed_loss - loss,', '"penalty": perturbed_loss,',
       [T + "test_stats.py"], "SAM's sharpness reported as L(θ + ρĝ)"),
    _m("gnp_perturbed_loss_unperturbed", "gnp/penalties/gradient_norm.py",
       '"perturbed_loss": perturbed_loss,', '"perturbed_loss": loss,',
       [T + "test_stats.py"], "GNP's perturbed_loss is L(θ)"),
    _m("groups_stats_first_group", "gnp/penalties/_base.py",
       "return mean(loss), aux, mean(grads), mean(stats)",
       "return mean(loss), aux, mean(grads), jax.tree.map(lambda x: x[0],"
       " stats)",
       [T + "test_stats.py"], "m-sharpness statistics of one group"),
    _m("gvr_task_loss_sum", "gnp/penalties/view_consistency.py",
       'stats = {\n          "task_loss": (loss1 + loss2) / 2,',
       'stats = {\n          "task_loss": loss1 + loss2,',
       [T + "test_stats.py"], "GVR's task loss is the sum of the views'"),
    _m("hessian_first_probe_only", "gnp/penalties/hessian.py",
       "penalty = jnp.mean(squared_norms)", "penalty = squared_norms[0]",
       [T + "test_stats.py"], "the Hutchinson estimate uses one probe"),
    _m("param_norm_before_update", "gnp/step.py",
       '"param_norm": otu.tree_norm(params),',
       '"param_norm": otu.tree_norm(state.params),',
       [T + "test_stats.py"], "param_norm of the old parameters"),
    _m("cross_entropy_includes_l2", "gnp/step.py",
       '"cross_entropy": cross_entropy,', '"cross_entropy": losses,',
       [T + "test_stats.py"], "the cross-entropy metric includes L2"),
    _m("accuracy_wrong_labels", "gnp/step.py",
       '"correct": (jnp.argmax(logits, -1) == y).astype(jnp.float32),',
       '"correct": (jnp.argmax(logits, -1) == y[::-1]).astype(jnp.float32),',
       [T + "test_stats.py"], "train accuracy against shuffled labels"),
    _m("report_seeds_in_listing_order", "gnp/results.py",
       'seeds = sorted(s["seed"] for s in arm.get("seeds", []))',
       'seeds = [s["seed"] for s in arm.get("seeds", [])]',
       [T + "test_report.py"], "the report lists seeds as results.json does"),
    _m("plot_band_two_std", "gnp/figures.py",
       '"high": (mean + std) * scale}', '"high": (mean + 2 * std) * scale}',
       [T + "test_report.py"], "the plotted band is not ± one std"),
    _m("plot_last_seed", "gnp/figures.py",
       "mean = values.mean(axis=0)", "mean = values[-1]",
       [T + "test_report.py"], "the plotted line is one seed"),
    _m("plot_band_from_mean", "gnp/figures.py",
       'ax.fill_between(arm["epochs"], arm["low"], arm["high"],',
       'ax.fill_between(arm["epochs"], arm["mean"], arm["high"],',
       [T + "test_report.py"], "the drawn band is not the computed one"),
    _m("failed_runs_averaged", "gnp/results.py",
       "skipped = {name: () if include_failed else set(f)",
       "skipped = {name: () if True else set(f)",
       [T + "test_report.py"], "a failed seed enters the arm's means"),
    _m("failed_runs_paired", "gnp/results.py",
       "arm, arms[0], set(skipped[name]) | set(skipped[reference])),",
       "arm, arms[0], set()),",
       [T + "test_report.py"], "a failed seed enters the paired interval"),
    _m("diverged_seed_not_failed", "gnp/results.py",
       'if "diverged" in seed:', "if False:",
       [T + "test_report.py", T + "test_study.py::"
        "test_a_diverging_trial_is_failed_not_scored"],
       "a diverged seed's frozen state counts as a result"),
    _m("arms_never_cancelled", "gnp/study.py",
       "  if cancelled.is_set():\n    raise _Cancelled()",
       "  if False:\n    raise _Cancelled()",
       [T + "test_study.py::test_an_arm_that_fails_stops_the_others_and_the_"
        "study_resumes"],
       "an arm trains on after another arm failed the study"),
    _m("population_shared_unlocked", "gnp/study.py",
       "    with lock:\n      yield pop", "    yield pop",
       [T + "test_study.py::test_arms_of_one_structure_take_turns"],
       "two arms train one population's stack at once"),
    _m("lock_not_taken", "gnp/loop.py",
       "with checkpoints.WorkdirLock(workdir, enabled=jax.process_index() =="
       " 0):", "with checkpoints.WorkdirLock(workdir, enabled=False):",
       [T + "test_workdir.py::test_a_second_run_into_a_busy_workdir_is_"
        "refused_and_the_first_is_clean"],
       "two runs write into one workdir"),
    _m("finished_run_rewritten", "gnp/loop.py",
       "if finished is not None:", "if False:",
       [T + "test_workdir.py::test_a_finished_run_run_again_changes_no_file"],
       "running a finished run again rewrites its summary"),
    _m("wall_time_last_invocation_only", "gnp/loop.py",
       'totals = {"wall_time_s": self._before + seconds,',
       'totals = {"wall_time_s": seconds,',
       [T + "test_workdir.py::test_a_resumed_run_adds_up_the_wall_time_of_"
        "its_invocations"],
       "a resumed run's wall time counts its last invocation only"),
    _m("bench_numpy_bool", "gnp/bench.py",
       "met = bool(value >= target.bound if target.throughput",
       "met = (value >= target.bound if target.throughput",
       [T + "test_bench.py::test_a_gpu_run_with_numpy_numbers_writes_both_"
        "files"], "a GPU run's verdict is a numpy bool json cannot write"),
    _m("collapse_threshold", "gnp/results.py",
       "if (value < chance + (median - chance) / 2",
       "if (value < chance + (median - chance) / 4",
       [T + "test_report.py"], "the collapse rule is looser than documented"),
    _m("timing_partial_epoch", "gnp/loop.py",
       "if step - self._steps_per_epoch >= self._start:  # Run whole here.",
       "if True:  # Run whole here.",
       [T + "test_loop_speed.py::test_a_resumed_run_times_only_the_epochs_it_"
        "ran_whole"],
       "a resumed run times the epoch it began before the resume"),
    _m("timing_evaluation_in_epoch", "gnp/loop.py",
       "self._since = now  # The next epoch's time starts after the evaluation.",
       "pass",
       [T + "test_loop_speed.py::test_a_run_times_each_epoch_and_each_"
        "evaluation_apart"],
       "an evaluation's time also counted in the epoch after it"),
    _m("loop_speed_evaluations_rounded_down", "tools/loop_speed.py",
       "num_evaluations = math.ceil(num_epochs / eval_every_epochs)",
       "num_evaluations = num_epochs // eval_every_epochs",
       [T + "test_loop_speed.py::test_the_estimate_is_the_formula_worked_out_"
        "by_hand"],
       "the estimate leaves out the last evaluation of an uneven period"),
]

# name -> why it survives and is harmless (empty when every mutant dies).
SURVIVING: dict[str, str] = {}


def _tracked_files() -> list[str]:
  out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return [p for p in out.split("\0") if p and os.path.exists(
      os.path.join(ROOT, p))]


def _copy_tree(dest: str) -> None:
  for path in _tracked_files():
    target = os.path.join(dest, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.join(ROOT, path), target)


def _apply(mutant: Mutant, tree: str) -> str:
  """Applies ``mutant`` in ``tree``; returns the original text to restore."""
  path = os.path.join(tree, mutant.path)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  count = text.count(mutant.old)
  if count != 1:
    raise ValueError(f"{mutant.name}: {mutant.old!r} occurs {count} times in"
                     f" {mutant.path}, not once.")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(mutant.old, mutant.new))
  return text


def _pytest(tree: str, tests, timeout: float,
            workers: int = 0) -> tuple[str, float, str]:
  """("passed" | "failed" | "timeout", seconds, last lines of output)."""
  env = dict(os.environ, PYTHONPATH=tree)
  env.pop("XLA_FLAGS", None)
  started = time.perf_counter()
  try:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         "-o", "addopts=", "-n", str(workers), *tests], cwd=tree, env=env,
        capture_output=True,
        text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - started, ""
  outcome = "passed" if result.returncode == 0 else "failed"
  tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
  return outcome, time.perf_counter() - started, tail


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", action="append", default=[],
                      help="run the mutants whose name starts with this")
  parser.add_argument("--check", action="store_true",
                      help="only check that every mutant applies")
  parser.add_argument("--timeout", type=float, default=900,
                      help="seconds per mutant's tests")
  parser.add_argument("--json", help="write the outcomes to this file")
  args = parser.parse_args(argv)
  mutants = [m for m in MUTANTS
             if not args.only or any(m.name.startswith(o) for o in args.only)]
  names = [m.name for m in MUTANTS]
  if len(set(names)) != len(names):
    raise SystemExit("mutation.py: two mutants share a name.")
  with tempfile.TemporaryDirectory(prefix="gnp-mutation-") as tree:
    _copy_tree(tree)
    for mutant in mutants:  # Every mutant applies and restores cleanly.
      text = _apply(mutant, tree)
      with open(os.path.join(tree, mutant.path), "w", encoding="utf-8") as f:
        f.write(text)
    if args.check:
      print(f"{len(mutants)} mutants apply.")
      return 0
    tests = sorted({t for m in mutants for t in m.tests})
    where = subprocess.run(
        [sys.executable, "-c", "import gnp; print(gnp.__file__)"], cwd=tree,
        env=dict(os.environ, PYTHONPATH=tree), capture_output=True,
        text=True, check=True).stdout.strip()
    if not where.startswith(tree):
      raise SystemExit(f"mutation.py: the copy imports gnp from {where}.")
    outcome, seconds, tail = _pytest(tree, tests, args.timeout * 4,
                                     workers=2)
    print(f"unmutated: {outcome} ({seconds:.0f} s)", flush=True)
    if outcome != "passed":
      print(tail)
      return 2
    results = []
    for mutant in mutants:
      text = _apply(mutant, tree)
      try:
        outcome, seconds, tail = _pytest(tree, mutant.tests, args.timeout)
      finally:
        with open(os.path.join(tree, mutant.path), "w",
                  encoding="utf-8") as f:
          f.write(text)
      status = {"passed": "SURVIVED", "failed": "killed",
                "timeout": "timeout"}[outcome]
      results.append({"name": mutant.name, "status": status,
                      "seconds": round(seconds, 1), "why": mutant.why})
      print(f"{status:8s} {mutant.name:34s} {seconds:5.0f} s  {mutant.why}",
            flush=True)
  killed = sum(r["status"] == "killed" for r in results)
  print(f"score: {killed}/{len(results)} killed"
        f" ({100 * killed / len(results):.0f} %)")
  for r in results:
    if r["status"] != "killed":
      print(f"  {r['name']}: {SURVIVING.get(r['name'], 'no reason recorded')}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return 0 if all(r["status"] == "killed" or r["name"] in SURVIVING
                  for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
