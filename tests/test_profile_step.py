"""The step profiler (tools/profile_step.py, tools/hlo_kernels.py).

A smoke run of the command line on the MLP (plain and SAM, traced), checked
for what it writes and for its counts agreeing with each other: on a CPU
every kernel of the static count is one thunk event of the trace. The HLO
reader and the trace arithmetic are checked on small hand-written inputs
whose answers are counted by hand, the GPU's among them, since no GPU is
needed to read a GPU trace.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import pytest

from tools import hlo_kernels
from tools import profile_step
from tools import step_trace
from tests.helpers import plain_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("profile")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    profile_step.main(["--smoke", "--model=mlp", "--method=plain,sam",
                       "--trace", "--steps=3", "--warmup=1", f"--out={out}"])
  with open(out / "profile.json") as f:
    results = json.load(f)
  return results, {r["method"]: r for r in results["rows"]}, out, printed


def test_smoke_run_writes_plain_json_and_prints_its_table(smoke):
  results, rows, out, printed = smoke
  assert plain_types(results)
  assert results["setting"]["smoke"] and results["setting"]["steps"] == 3
  assert list(rows) == ["plain", "sam"]
  with open(out / "profile.md") as f:
    assert printed.getvalue() == f.read()
  for row in rows.values():
    assert row["status"] == "ok"
    assert row["label"] in printed.getvalue()
    assert os.path.exists(out / "hlo" / f"{row['method']}.txt")
    assert os.path.exists(out / row["trace"]["file"])


def test_static_counts_add_up_and_sam_launches_more(smoke):
  _, rows, _, _ = smoke
  for row in rows.values():
    assert type(row["kernels"]) is int and row["kernels"] > 0
    assert all(type(n) is int and n >= 0 for n in row["categories"].values())
    assert sum(row["categories"].values()) == row["kernels"]
    assert sum(row["phases"].values()) == row["kernels"]
    assert row["attributed"] and row["bodies"] == []  # No loop, no branch.
    for phase in ("input", "gradient", "optimizer", "metrics & bookkeeping"):
      assert row["phases"][phase] > 0, (row["method"], phase)
  plain, sam = rows["plain"], rows["sam"]
  # SAM's second forward and backward pass: more kernels, in the gradient.
  assert sam["kernels"] > plain["kernels"]
  assert sam["phases"]["gradient"] > plain["phases"]["gradient"]
  assert sam["phases"]["optimizer"] == plain["phases"]["optimizer"]


def test_traced_steps_add_up_and_match_the_static_count(smoke):
  _, rows, _, _ = smoke
  for row in rows.values():
    trace = row["trace"]
    assert len(trace["steps"]) == 3
    if not trace["per_op_events"]:
      assert "no per-op events" in trace["note"]
      continue
    for step in trace["steps"]:
      assert step["ops"] >= 0 and step["gaps_ms"] >= -1e-9
      assert step["busy_ms"] <= step["op_time_ms"] + 1e-9
      assert step["busy_ms"] + step["gaps_ms"] <= step["wall_ms"] + 1e-9
      assert step["outside_ms"] == pytest.approx(
          step["wall_ms"] - step["busy_ms"] - step["gaps_ms"], abs=1e-9)
    assert 0 <= trace["idle_fraction"] <= 1
    if jax.default_backend() == "cpu":  # One thunk event per kernel.
      assert [s["ops"] for s in trace["steps"]] == [row["kernels"]] * 3


@pytest.mark.parametrize("args, message", [
    (["--model=vgg"], "unknown model 'vgg'"),
    (["--method=plain,sharp"], "unknown methods ['sharp']"),
    (["--steps=0"], "steps and batch_size must be ≥ 1"),
    (["--steps=two"], "argument --steps: invalid int value"),
    (["--model=resnet18", "--method=gnvr_ghost_jnp"], "exist only for"),
])
def test_bad_input_is_one_line_before_anything_is_built(
    args, message, monkeypatch, tmp_path):
  def built(*args, **kwargs):
    raise AssertionError("built an experiment for bad input")
  monkeypatch.setattr(profile_step, "create_experiment", built)
  monkeypatch.setattr(profile_step.data_lib, "load", built)
  with pytest.raises(SystemExit) as raised:
    profile_step.main(args + [f"--out={tmp_path}"])
  text = str(raised.value.code)
  assert text.startswith("profile_step: error: ") and message in text
  assert "\n" not in text
  assert not os.listdir(tmp_path)


def test_bad_input_from_the_command_line_exits_nonzero_with_one_line(
    tmp_path):
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "profile_step.py"),
       "--model=mlp", "--method=plain", "--steps=-1", f"--out={tmp_path}"],
      capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [
      "profile_step: error: steps and batch_size must be ≥ 1 and warmup ≥ 0."]


# --- The HLO reader, on a hand-written GPU-style module ----------------------

_HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/src/gnp/step.py"

FunctionNames
1 "train_step"

FileLocations
1 {file_name_id=1 function_name_id=1 line=3 end_line=3 column=0 end_column=9}
2 {file_name_id=1 function_name_id=1 line=4 end_line=4 column=0 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=0}

%fused_add (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %add.1 = f32[8]{0} add(%p0, %p0), metadata={op_name="add" stack_frame_id=1}
}

%fused_mul (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %neg.1 = f32[8]{0} negate(%p0), metadata={op_name="neg" stack_frame_id=1}
  ROOT %mul.1 = f32[8]{0} multiply(%neg.1, %p0), metadata={op_name="mul" stack_frame_id=2}
}

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%command_buffer (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %f1 = f32[8]{0} fusion(%p0), kind=kLoop, calls=%fused_add, metadata={op_name="add" stack_frame_id=1}
  ROOT %f2 = f32[8]{0} fusion(%f1), kind=kLoop, calls=%fused_mul, metadata={op_name="mul" stack_frame_id=2}
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[8]{0} get-tuple-element(%t), index=1
  %g = f32[8]{0} custom-call(%v), custom_call_target="__cublas$gemm"
  %j = s32[] fusion(%i), kind=kLoop, calls=%fused_add
  ROOT %r = (s32[], f32[8]{0}) tuple(%j, %g)
}

%cond (t: (s32[], f32[8])) -> pred[] {
  %t = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%branch_a (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p)
}

%branch_b (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %x = f32[8]{0} fusion(%p), kind=kCustom, calls=%fused_add, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %y = f32[8]{0} copy(%x)
}

ENTRY %main (a: f32[8], k: s32[]) -> (f32[8], f32[8]) {
  %a = f32[8]{0} parameter(0)
  %k = s32[] parameter(1)
  %z = s32[] constant(0)
  %b = f32[8]{0} bitcast(%a)
  %cb = f32[8]{0} call(%b), to_apply=%command_buffer
  %cp = f32[8]{0} copy(%cb)
  %ars = f32[8]{0} all-reduce-start(%cp), replica_groups={}, to_apply=%sum
  %ard = f32[8]{0} all-reduce-done(%ars)
  %init = (s32[], f32[8]{0}) tuple(%z, %ard)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %wv = f32[8]{0} get-tuple-element(%w), index=1
  %c = f32[8]{0} conditional(%k, %wv, %wv), branch_computations={%branch_a, %branch_b}
  ROOT %out = (f32[8]{0}, f32[8]{0}) tuple(%c, %cp)
}
"""


def test_kernels_of_a_hand_counted_module():
  module = hlo_kernels.parse(_HLO)
  assert module.name == "jit_step" and module.entry == "main"
  entry, cond, body, branch_a, branch_b = hlo_kernels.count_kernels(module)
  # Two fusions inside the command buffer, a copy, the all-reduce (its
  # -done is a wait), the while and the conditional; nothing else.
  assert entry.categories() == {"fusion (kLoop)": 2, "copy": 1,
                                "all-reduce-start": 1, "while": 1,
                                "conditional": 1}
  assert entry.in_command_buffers == 2
  assert (cond.kind, cond.categories()) == ("while condition",
                                            {"compare": 1})
  assert (body.kind, body.trip_count, body.parent) == ("while body", 4,
                                                       "main")
  assert body.categories() == {"custom-call (__cublas$gemm)": 1,
                               "fusion (kLoop)": 1}
  assert branch_a.categories() == {"negate": 1}
  assert branch_b.categories() == {"fusion (__triton_gemm)": 1, "copy": 1}


def test_phases_follow_the_statement_a_kernel_computes():
  source = ("def train_step(state, batch):\n"  # Line 1.
            "  x, y = batch\n"
            "  grads = g(x)\n"
            "  metrics = {'norm': n(grads)}\n"
            "  return state, metrics\n")
  statements = hlo_kernels.statement_phases(source)
  assert [statements[line][2] for line in (2, 3, 4, 5)] == [
      "input", "gradient", "metrics & bookkeeping", "metrics & bookkeeping"]
  module = hlo_kernels.parse(_HLO)
  entry = hlo_kernels.count_kernels(module)[0]
  phases, mixed, by_statement = hlo_kernels.attribute(
      entry, module, "/src/gnp/step.py", statements)
  # fused_add's root is line 3; fused_mul's root line 4, with a line-3
  # negate fused in; the rest have no frames.
  assert phases == {"input": 0, "gradient": 1, "optimizer": 0,
                    "metrics & bookkeeping": 1, "unattributed": 4}
  assert mixed == {"gradient + metrics & bookkeeping": 1}
  assert by_statement == {"3: grads = g(x)": 1,
                          "4: metrics = {'norm': n(grads)}": 1}


def test_every_statement_of_gnps_train_step_has_the_expected_phase():
  from gnp import step
  with open(step.__file__) as f:
    statements = hlo_kernels.statement_phases(f.read())
  phase_of = {text: phase for _, text, phase in statements.values()}

  def phase(start):
    (found,) = {p for text, p in phase_of.items() if text.startswith(start)}
    return found
  assert phase("key = jax.random.fold_in") == "input"
  assert phase("(objective, aux), grads, stats = grad_fn.with_stats(") \
      == "gradient"
  assert phase("updates, opt_state = tx.update(") == "optimizer"
  assert phase("params = optax.apply_updates(") == "optimizer"
  assert phase("metrics = {") == "metrics & bookkeeping"
  assert phase("new_state = state.replace(") == "metrics & bookkeeping"


# --- The trace arithmetic, on hand-made traces -------------------------------


def _trace(events, threads):
  meta = [{"ph": "M", "pid": 1, "name": "process_name",
           "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 2, "name": "process_name",
           "args": {"name": "/device:GPU:0"}}]
  meta += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
            "args": {"name": name}} for (pid, tid), name in threads.items()]
  return {"traceEvents": meta + [
      {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name,
       "args": args} for pid, tid, ts, dur, name, args in events]}


def test_gpu_trace_busy_gaps_and_idle_counted_by_hand():
  threads = {(1, 1): "python", (2, 7): "Stream #7(Compute)",
             (2, 8): "Stream #8(MemcpyD2H)", (2, 9): "XLA Ops"}
  step = {"hlo_module": "jit_step"}
  trace = _trace([
      (1, 1, 0, 100, step_trace.STEP_NAME, {"step_num": "0"}),
      (2, 7, 10, 20, "fusion_1", step),        # 10-30
      (2, 8, 25, 10, "memcpy", {}),            # 25-35: overlaps, union.
      (2, 7, 50, 20, "fusion_2", step),        # 50-70
      (2, 7, 95, 20, "fusion_3", step),        # 95-115: clipped at 100.
      (2, 7, 60, 5, "other", {"hlo_module": "jit_other"}),  # Not ours.
      (2, 9, 10, 60, "fusion_1", step),        # Derived line: ignored.
      (2, 7, 150, 10, "fusion_1", step),       # Outside every step.
      (1, 1, 200, 50, step_trace.STEP_NAME, {"step_num": "1"}),
      (2, 7, 210, 10, "fusion_1", step),       # 210-220
  ], threads)
  result = step_trace.analyse(trace, "jit_step")
  assert result["source"].startswith("GPU")
  assert result["threads"] == ["Stream #7(Compute)", "Stream #8(MemcpyD2H)"]
  first, second = result["steps"]
  # Busy: 10-35, 50-70, 95-100 = 50 μs; span 10-100 = 90 μs.
  assert first == pytest.approx({
      "ops": 4, "op_time_ms": 0.055, "busy_ms": 0.050, "gaps_ms": 0.040,
      "outside_ms": 0.010, "wall_ms": 0.100})
  assert second == pytest.approx({
      "ops": 1, "op_time_ms": 0.010, "busy_ms": 0.010, "gaps_ms": 0.0,
      "outside_ms": 0.040, "wall_ms": 0.050})
  assert result["idle_fraction"] == pytest.approx((0.5 + 0.8) / 2)


def test_a_trace_without_per_op_events_says_so():
  trace = _trace([(1, 1, 0, 100, step_trace.STEP_NAME, {}),
                  (1, 1, 10, 5, "PjitFunction(step)", {})],
                 {(1, 1): "python"})
  result = step_trace.analyse(trace, "jit_step")
  assert not result["per_op_events"] and "median" not in result
  assert "no per-op events" in result["note"]
