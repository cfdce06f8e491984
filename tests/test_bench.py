"""The step-cost benchmark: what it writes, and that its arithmetic holds.

Speed itself is never asserted (the machine is shared); these tests check
the artefacts of a smoke run, the ratios against the medians they come from,
the target verdicts, and that the benchmark's configs are the experiments'.
"""

import json

import numpy as np
import pytest

from gnp import bench
from gnp import train
from gnp.errors import ConfigError
from gnp.errors import UserError
from tests.helpers import load_config
from tests.helpers import run

COLUMNS = ("| method | ms/step (median) | IQR (ms) | examples/s | × plain "
           "| pipelined ms/step | pipelined examples/s "
           "| XLA memory | device peak | target | met? |")  # Spelled out.


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  # "sam" first and "plain" left out: plain is added, and rows keep the
  # canonical order.
  bench.run(models=("mlp",), methods=("sam",), repeats=6, warmup=1, block=2,
            out=str(out), smoke=True, command="test")
  return json.load(open(out / "bench.json")), open(out / "bench.md").read()


def test_smoke_run_writes_one_row_per_method(smoke):
  results, _ = smoke
  assert results["command"] == "test"
  assert {"cpu", "cpu_cores", "jax", "jaxlib", "backend",
          "device_kind"} <= set(results["machine"])
  (section,) = results["models"]
  assert section["model"] == "mlp" and section["setting"]["smoke"]
  rows = section["rows"]
  assert [r["method"] for r in rows] == ["plain", "sam"]
  for row in rows:
    assert row["status"] == "ok"
    assert len(row["times_ms"]) == 6
    assert row["q25_ms"] <= row["median_ms"] <= row["q75_ms"]
    assert row["median_ms"] == pytest.approx(np.median(row["times_ms"]),
                                             rel=1e-3)
    batch = section["setting"]["batch_size"]
    assert row["examples_per_s"] == pytest.approx(
        batch / row["median_ms"] * 1e3)
    # Pipelined: three bursts of 2 steps, each a per-step time.
    assert len(row["burst_ms"]) == 3
    assert row["pipelined_ms"] == pytest.approx(np.median(row["burst_ms"]),
                                                rel=1e-3)
    assert row["pipelined_examples_per_s"] == pytest.approx(
        batch / row["pipelined_ms"] * 1e3, rel=1e-3)


def test_ratios_are_quotients_of_medians(smoke):
  plain, sam = smoke[0]["models"][0]["rows"]
  assert plain["ratio"] == 1.0
  assert plain["ratio_q25"] == plain["ratio_q75"] == 1.0
  assert sam["ratio"] == pytest.approx(sam["median_ms"] / plain["median_ms"],
                                       rel=1e-12)
  # The spread: quartiles of the quotients of each round's block medians
  # (6 steps in blocks of 2: three rounds).
  per_round = [np.median(sam["times_ms"][i:i + 2])
               / np.median(plain["times_ms"][i:i + 2]) for i in (0, 2, 4)]
  assert [sam["ratio_q25"], sam["ratio_q75"]] == pytest.approx(
      np.percentile(per_round, [25, 75]), rel=1e-3)


def test_targets_do_not_apply_to_a_smoke_run(smoke):
  plain, sam = smoke[0]["models"][0]["rows"]
  assert plain["target"] is None and plain["met"] is None
  assert sam["target"] == "≤ 2× plain"
  assert sam["met"] is None and sam["met_note"] == "stated for backend=cpu, batch_size=100"


def test_markdown_has_the_columns_and_rows(smoke):
  results, markdown = smoke
  lines = markdown.splitlines()
  assert COLUMNS in lines
  table = lines[lines.index(COLUMNS) + 2:]
  plain, sam = results["models"][0]["rows"]
  assert table[0].startswith(f"| plain | {plain['median_ms']:.3f} |")
  assert "| 1.00× (1.00–1.00) |" in table[0]
  assert table[1].startswith(f"| SAM | {sam['median_ms']:.3f} |")
  assert (f"| {sam['ratio']:.2f}× ({sam['ratio_q25']:.2f}–"
          f"{sam['ratio_q75']:.2f}) |") in table[1]
  assert len(table[1].split("|")) == len(COLUMNS.split("|"))
  assert results["machine"]["cpu"] in markdown


def _row(**values):
  return {"status": "ok", "ratio": None, "examples_per_s": None, **values}


CPU_MLP = {"backend": "cpu", "batch_size": 100, "dtype": "float32",
           "smoke": False}
GPU_RESNET = {"backend": "gpu", "batch_size": 128, "dtype": "bfloat16",
              "smoke": False}
H200_RESNET = {**GPU_RESNET, "device": "NVIDIA H200"}


@pytest.mark.parametrize("model, method, setting, row, met", [
    ("mlp", "sam", CPU_MLP, _row(ratio=1.99), True),
    ("mlp", "sam", CPU_MLP, _row(ratio=2.01), False),
    ("mlp", "hessian", CPU_MLP, _row(ratio=4.5), True),
    ("mlp", "gc", CPU_MLP, _row(ratio=1.2), False),
    ("mlp", "gnvr_ghost", {**CPU_MLP, "batch_size": 50}, _row(ratio=1.0), None),
    ("mlp", "sam", {**CPU_MLP, "backend": "gpu"}, _row(ratio=1.0), None),
    ("resnet18", "plain", GPU_RESNET, _row(examples_per_s=31_000), True),
    ("resnet18", "plain", GPU_RESNET, _row(examples_per_s=29_000), False),
    ("resnet18", "plain", {**GPU_RESNET, "dtype": "float32"},
     _row(examples_per_s=31_000), None),
    ("resnet18", "gnp", GPU_RESNET, _row(ratio=2.05), True),
    ("mlp", "gnp_exact", CPU_MLP, _row(ratio=9.0), None),  # No target.
    ("mlp", "clip_ghost", CPU_MLP, _row(ratio=2.2), True),
    ("mlp", "clip_ghost", CPU_MLP, _row(ratio=2.21), False),
    ("mlp", "asam", CPU_MLP, _row(ratio=9.0), None),  # No target.
    ("mlp", "rst", CPU_MLP, _row(ratio=1.15), True),
    ("mlp", "rst", CPU_MLP, _row(ratio=1.16), False),
    ("resnet18", "rst", GPU_RESNET, _row(ratio=1.1), True),
    ("resnet18", "rst", CPU_MLP, _row(ratio=1.1), None),
    # On an H200, its own targets: plain judged on the pipelined rate.
    ("resnet18", "plain", H200_RESNET,
     _row(examples_per_s=31_000, pipelined_examples_per_s=46_000), True),
    ("resnet18", "plain", H200_RESNET,
     _row(examples_per_s=50_000, pipelined_examples_per_s=44_000), False),
    ("resnet18", "plain", {**H200_RESNET, "batch_size": 512},
     _row(examples_per_s=1, pipelined_examples_per_s=90_000), True),
    ("resnet18", "plain", {**H200_RESNET, "batch_size": 512},
     _row(examples_per_s=1, pipelined_examples_per_s=89_000), False),
    ("resnet18", "sam", H200_RESNET, _row(ratio=1.7), False),
    ("resnet18", "sam", GPU_RESNET, _row(ratio=1.7), True),
    ("resnet18", "gnp", H200_RESNET, _row(ratio=1.6), True),
    ("resnet18", "hessian", H200_RESNET, _row(ratio=4.1), False),
    ("resnet18", "hessian", GPU_RESNET, _row(ratio=1.0), None),
])
def test_target_verdicts(model, method, setting, row, met):
  assert bench._judge(model, method, row, setting)["met"] is met


def test_expected_cost_of_a_randomized_row_by_hand():
  # Rounds of 2 steps. Plain: rounds at 1.0 and 2.0 ms (a slower machine
  # in the second). RST: plain-branch steps of 1.0 and 2.4 ms, SAM-branch
  # steps of 2.0 (first round) and 3.0 ms (second), and an outlier of 9.0 ms
  # in a third round where plain took 1.0 ms.
  plain_s = [1.0e-3, 1.0e-3, 2.0e-3, 2.0e-3, 1.0e-3, 1.0e-3]
  times_s = [1.0e-3, 2.0e-3, 2.4e-3, 3.0e-3, 9.0e-3, 1.0e-3]
  sam_steps = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
  cost = bench._expected_cost(times_s, sam_steps, plain_s, block=2)
  assert cost["sam_fraction"] == pytest.approx(0.5)
  # Absolute: medians 3.0 ms (SAM branch) and 1.0 ms (plain branch).
  assert cost["sam_branch_ms"] == pytest.approx(3.0)
  assert cost["plain_branch_ms"] == pytest.approx(1.0)
  assert cost["expected_ms"] == pytest.approx(2.0)
  # Each step over its round's plain median: SAM 2.0, 1.5, 9.0 -> 2.0;
  # plain 1.0, 1.2, 1.0 -> 1.0; 0.5 × 2.0 + 0.5 × 1.0.
  assert cost["ratio"] == pytest.approx(1.5)
  # At the configured probability rather than the fraction timed:
  # 0.1 × 3.0 + 0.9 × 1.0 ms and 0.1 × 2.0 + 0.9 × 1.0.
  at_p = bench._expected_cost(times_s, sam_steps, plain_s, block=2,
                              probability=0.1)
  assert at_p["sam_fraction"] == pytest.approx(0.5)
  assert at_p["expected_ms"] == pytest.approx(1.2)
  assert at_p["ratio"] == pytest.approx(1.1)
  # A branch never taken weighs nothing.
  only_plain = bench._expected_cost([1e-3, 3e-3, 2e-3], [0.0, 0.0, 0.0],
                                    [1e-3, 1e-3, 1e-3], block=1)
  assert only_plain["sam_branch_ms"] is None
  assert only_plain["expected_ms"] == pytest.approx(2.0)
  assert only_plain["ratio"] == pytest.approx(2.0)


def test_a_randomized_row_reports_its_expected_cost(tmp_path):
  results = bench.run(models=("mlp",), methods=("rst",), repeats=8,
                      warmup=1, block=2, out=str(tmp_path), smoke=True,
                      command="test")
  plain, rst = results["models"][0]["rows"]
  assert "expected_ms" not in plain
  # One branch record per timed step: the fraction is a multiple of 1/8.
  assert rst["sam_fraction"] * 8 == pytest.approx(round(rst["sam_fraction"] * 8))
  assert rst["sam_probability"] == 0.1  # The row's configured p.
  assert rst["ratio"] == pytest.approx(bench._expected_cost(
      np.array(rst["times_ms"]) / 1e3, rst["sam_steps"],
      np.array(plain["times_ms"]) / 1e3, block=2, probability=0.1)["ratio"],
                                       rel=1e-3)
  assert rst["ratio_q25"] is None and rst["target"] == "≤ 1.15× plain"
  markdown = open(tmp_path / "bench.md").read()
  assert f"| {rst['ratio']:.2f}× (expected) |" in markdown
  assert f"{rst['label']}: {rst['sam_fraction']:.1%} of its timed" in markdown


def test_a_refused_method_is_na_with_its_reason():
  row = {"status": "n/a", "reason": "BatchNorm"}
  verdict = bench._judge("mlp", "gnvr_ghost", row, CPU_MLP)
  assert verdict["met"] is None and verdict["met_note"] == "BatchNorm"
  results = {
      "command": "c", "machine": bench.machine(),
      "models": [{"model": "resnet18", "setting": GPU_RESNET, "repeats": 1,
                  "warmup": 0, "block": 1,
                  "rows": [{"method": "gnvr_vmap", "label": "GNVR (vmap)",
                            **row, "target": None, "met": None,
                            "met_note": None}]}],
  }
  markdown = bench.to_markdown(results)
  assert "| GNVR (vmap) | n/a |" in markdown
  assert "GNVR (vmap): n/a — BatchNorm" in markdown


def test_gnvr_on_resnet_is_refused_before_compilation():
  config = bench.method_config(bench.base_config("resnet18", smoke=True),
                               "gnvr_vmap")
  with pytest.raises(ConfigError, match="BatchNorm"):
    train.create_experiment(config)


def test_clipping_with_ghost_norms_is_refused_on_resnet_when_traced():
  # The ResNet has BatchNorm: its row is n/a (bench_model catches this at
  # compilation), not a crash, nor a silent fall-back to vmap.
  config = bench.method_config(bench.base_config("resnet18", smoke=True),
                               "clip_ghost")
  exp = train.create_experiment(config)
  with pytest.raises(UserError, match="BatchNorm"):
    exp.step.lower(exp.abstract_state, exp.train_batch(0))


def test_the_mlp_rows_are_configs_mnist1d():
  assert bench.base_config("mlp").to_dict() == load_config("mnist1d").to_dict()


@pytest.mark.parametrize("method", sorted(bench.METHODS))
def test_every_row_is_a_valid_config(method):
  for model in bench.MODELS:
    if bench.ONLY_FOR.get(method, model) != model:
      continue  # A row that replaces the model is timed for its model only.
    config = bench.method_config(bench.base_config(model), method)
    bench.config_lib.validate(config)


def test_command_line_smoke_and_bad_method(tmp_path):
  result = run(["-m", "gnp.bench", "--smoke", "--methods=plain",
                "--repeats=2", "--warmup=0", f"--out={tmp_path}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| plain |" in result.stdout
  assert (tmp_path / "bench.json").exists()
  result = run(["-m", "gnp.bench", "--methods=adam", f"--out={tmp_path}"])
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "gnp.bench: error: unknown methods ['adam']")


@pytest.mark.slow
def test_the_resnet_section_runs_in_bfloat16(tmp_path):
  # The path a GPU run takes (ResNet-18, bfloat16, a refused GNVR row), at
  # smoke size on whatever backend is here.
  results = bench.run(models=("resnet18",),
                      methods=("plain", "gnvr_ghost", "clip_ghost"),
                      repeats=2, warmup=0, block=1, out=str(tmp_path),
                      dtype="bfloat16", smoke=True, command="test")
  (section,) = results["models"]
  assert section["setting"]["dtype"] == "bfloat16"
  plain, gnvr, clip = section["rows"]
  assert clip["status"] == "n/a" and "BatchNorm" in clip["reason"]
  assert plain["status"] == "ok" and len(plain["times_ms"]) == 2
  assert plain["xla_memory_bytes"] > 0
  assert plain["target"] == "≥ 45,000 ex/s pipelined" and plain["met"] is None
  assert gnvr["status"] == "n/a" and "BatchNorm" in gnvr["reason"]
  markdown = open(tmp_path / "bench.md").read()
  assert "## resnet18, batch 8, bfloat16 (smoke)" in markdown


def test_a_gpu_run_with_numpy_numbers_writes_both_files(tmp_path):
  # The first GPU run crashed at its end: a numpy float64 throughput
  # compared with the target gave a numpy bool that json could not write,
  # and left bench.json half written.
  row = {"method": "plain", "label": "plain", "status": "ok",
         "median_ms": np.float64(5.39), "q25_ms": np.float64(5.3),
         "q75_ms": np.float64(5.5), "examples_per_s": np.float64(23_751.0),
         "ratio": np.float64(1.0), "ratio_q25": np.float64(1.0),
         "ratio_q75": np.float64(1.0), "pipelined_ms": np.float64(4.1),
         "pipelined_examples_per_s": np.float64(31_219.5),
         "xla_memory_bytes": np.int64(2 ** 30), "device_peak_bytes": None,
         "times_ms": np.array([5.39, 5.4]), "burst_ms": [np.float32(4.1)]}
  verdict = bench._judge("resnet18", "plain", row, GPU_RESNET)
  assert verdict["met"] is False and type(verdict["met"]) is bool
  row.update(verdict)
  results = {"command": "test", "machine": {
      "cpu": "x", "cpu_cores": np.int64(16), "python": "3.11", "jax": "0",
      "jaxlib": "0", "backend": "gpu", "device_kind": "NVIDIA H200",
      "device_count": 1, "git": None},
             "models": [{"model": "resnet18", "setting": GPU_RESNET,
                         "repeats": 2, "warmup": 1, "block": 2,
                         "rows": [row], "config": {}}]}
  bench.write(results, str(tmp_path))
  written = json.load(open(tmp_path / "bench.json"))
  assert written["models"][0]["rows"][0]["examples_per_s"] == 23_751.0
  assert written["models"][0]["rows"][0]["times_ms"] == [5.39, 5.4]
  assert "| plain | 5.390 |" in (tmp_path / "bench.md").read_text()


def test_a_failed_write_leaves_the_previous_files_whole(tmp_path):
  (tmp_path / "bench.json").write_text('{"old": true}')
  with pytest.raises(TypeError):
    bench.write({"command": object()}, str(tmp_path))  # Not serialisable.
  assert json.load(open(tmp_path / "bench.json")) == {"old": True}


def test_steps_per_dispatch_times_the_loops_stretches(tmp_path):
  results = bench.run(models=("mlp",), methods=("sam",), repeats=6, warmup=1,
                      block=4, out=str(tmp_path), smoke=True,
                      steps_per_dispatch=2, command="test")
  section = results["models"][0]
  markdown = open(tmp_path / "bench.md").read()
  assert "2 steps per dispatch (`steps_per_dispatch=2`" in markdown
  for row in section["rows"]:
    # Bursts of 4 and 2 steps: stretches of 2, two and then one of them.
    assert row["steps_per_dispatch"] == 2 and len(row["stretch_ms"]) == 2
    assert row["dispatch_ms"] == pytest.approx(np.median(row["stretch_ms"]),
                                               rel=1e-3)
    assert row["dispatch_examples_per_s"] == pytest.approx(
        section["setting"]["batch_size"] / row["dispatch_ms"] * 1e3)
    assert (f"| {row['label']} | {row['dispatch_ms']:.3f} "
            f"| {row['dispatch_examples_per_s']:,.0f} "
            f"| {row['dispatch_ms'] / row['pipelined_ms']:.2f}× |") in markdown
  with pytest.raises(UserError, match="steps_per_dispatch must be ≥ 1"):
    bench.run(models=("mlp",), methods=("plain",), steps_per_dispatch=0)


def test_a_stretch_runs_its_k_steps():
  config = bench.base_config("mlp", smoke=True)
  exp = train.create_experiment(config)
  runner = bench._Runner(exp, warmup=0, steps_per_dispatch=3)
  assert int(runner.state.step) == 1 + 3  # One step, one compiling stretch.
  runner.stretch(2)
  assert int(runner.state.step) == 10
