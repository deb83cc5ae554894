"""The benchmark (python -m training.benchmark) runs end to end on CPU with small shapes."""

from __future__ import annotations

import argparse
import json
import math
from typing import Callable

import pytest
import torch

from arms import registry
from arms.arm import Arm
from config.settings import DEFAULT_ARMS, ExperimentConfig, cpu_preset
from exp6_baseline_attention_model import MultiHeadAttention
from models.attention import CausalSelfAttention
from training import benchmark

# the default --models arms' rows: ours, then the public style; --before adds one more each
MODEL_ROWS = tuple(f"{arm} ({variant})" for arm in DEFAULT_ARMS for variant in ("ours", "public style"))
BEFORE_ROWS = tuple(f"{arm} (before batching)" for arm in DEFAULT_ARMS)
SEQ_LENS = (32, 64)


@pytest.fixture(scope="module")
def one_thread():
    """Two OpenMP threads on a small shared VM make step times erratic and slow; one is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("bench") / "out" / "benchmark.json"
    results = benchmark.run_benchmark([
        "--device", "cpu", "--small", "--steps", "2", "--warmup", "1", "--before",
        "--seq-lens", *map(str, SEQ_LENS), "--output", str(output),
    ])
    return results, output


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_json_has_every_model_row_with_timings(cpu_run):
    results, output = cpu_run
    assert output.exists()
    saved = json.loads(output.read_text())
    assert saved["status"] == "completed" and saved["failed"] == []
    rows = {row["name"]: row for row in saved["rows"]}
    assert set(rows) == set(MODEL_ROWS + BEFORE_ROWS)
    for name, row in rows.items():
        assert "error" not in row, row.get("error")
        assert _positive_finite(row["median_step_s"]), name
        assert _positive_finite(row["tokens_per_s"]), name
        assert _positive_finite(row["achieved_tflops"]), name
        assert row["tokens_per_step"] == 4 * 128  # --small: batch 4 x the CPU preset's 128 tokens
        assert len(row["step_times_s"]) == 2
        assert row["mfu"] is None and row["peak_memory_mb"] is None  # CPU: no peak, no CUDA memory
        assert math.isfinite(row["last_loss"])
    assert saved["config"]["vocab_size"] == 2048 and saved["config"]["preset"] == "cpu"
    assert saved["peak_tflops"]["value"] is None and saved["peak_tflops"]["source"]
    for key in ("device_name", "torch_version", "date_utc"):
        assert saved[key]


def test_public_style_rows_really_run_the_reference_paths(cpu_run):
    rows = {row["name"]: row for row in cpu_run[0]["rows"]}
    for model in DEFAULT_ARMS:
        public, ours = rows[f"{model} (public style)"], rows[f"{model} (ours)"]
        assert public["moe_dispatch"] == ["boolean-mask loop"]
        assert public["attention_backend"] == ["eager"]
        assert public["precision"] == "float32"
        assert ours["moe_dispatch"] != ["boolean-mask loop"]
        assert "eager" not in ours["attention_backend"]
        assert public["training_flops_per_token"] == ours["training_flops_per_token"]


def test_speedups_present(cpu_run):
    results, output = cpu_run
    saved = json.loads(output.read_text())
    assert set(saved["speedups"]) == set(DEFAULT_ARMS)
    rows = {row["name"]: row for row in saved["rows"]}
    for model, speedup in saved["speedups"].items():
        assert _positive_finite(speedup)
        expected = rows[f"{model} (public style)"]["median_step_s"] / rows[f"{model} (ours)"]["median_step_s"]
        assert speedup == pytest.approx(expected)


def test_rows_count_the_operators_of_a_step_and_before_batching_dispatches_more(cpu_run):
    """Each row counts the aten operators of one step by part; the optimizers before batching (torch.optim.Muon
    per block) dispatch many times more than BlockMuon, with the same forward and backward."""
    saved = json.loads(cpu_run[1].read_text())
    rows = {row["name"]: row for row in saved["rows"]}
    for model in DEFAULT_ARMS:
        ours, before = rows[f"{model} (ours)"]["step_operators"], rows[f"{model} (before batching)"]["step_operators"]
        assert ours["total"] == ours["forward"] + ours["backward_and_clip"] + ours["optimizer"]
        assert 0 < ours["optimizer"] <= 300 < 5 * ours["optimizer"] < before["optimizer"]
        assert (ours["forward"], ours["backward_and_clip"]) == (before["forward"], before["backward_and_clip"])
        assert saved["speedups_over_before"][model] == pytest.approx(
            rows[f"{model} (before batching)"]["median_step_s"] / rows[f"{model} (ours)"]["median_step_s"])


def test_step_modes_give_one_row_each_and_a_mode_the_device_cannot_run_is_skipped(tmp_path, capsys, one_thread):
    results = benchmark.run_benchmark(["--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--seq-lens", "16",
                                       "--models", "baseline", "--skip-public-style", "--step-modes", "eager", "cuda-graph",
                                       "--output", str(tmp_path / "b.json")])
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) == {"baseline (ours, eager)", "baseline (ours, cuda-graph)"}
    assert rows["baseline (ours, eager)"]["step_mode"] == "eager" and "error" not in rows["baseline (ours, eager)"]
    assert "needs a CUDA GPU" in rows["baseline (ours, cuda-graph)"]["skipped"]
    assert results["status"] == "completed" and results["failed"] == []  # a skipped mode is not a failure
    assert "skipped: --cuda-graph needs a CUDA GPU" in capsys.readouterr().out


def _small_config() -> ExperimentConfig:
    return cpu_preset(ExperimentConfig(vocab_size=benchmark.SMALL_VOCAB_SIZE))


def _attention_of(arm: str) -> CausalSelfAttention:
    """The arm's attention module of layer 0 at the --small shapes, built here from the registry."""
    return registry.ARMS[arm].attention(_small_config(), 0)


def test_attention_rows_time_each_models_arm(cpu_run):
    """One row per --models arm and sequence length, named by the arm, each timing that arm's own module (its
    class and FLOP count)."""
    saved = json.loads(cpu_run[1].read_text())
    rows = {(r["arm"], r["seq_len"]): r for r in saved["attention_rows"]}
    assert set(rows) == {(arm, seq) for arm in DEFAULT_ARMS for seq in SEQ_LENS}
    assert len(saved["attention_rows"]) == len(rows)
    for (arm, seq), row in rows.items():
        assert "error" not in row, row.get("error")
        module = _attention_of(arm)
        assert row["name"] == f"{arm} @ {seq}" and row["module"] == type(module).__name__
        assert row["flops_per_token"] == benchmark.attention_flops_per_token(module, seq)
        assert _positive_finite(row["median_fwd_bwd_s"]) and _positive_finite(row["tokens_per_s"])
        assert row["backend_used"]
        assert row["batch_size"] * row["seq_len"] == 1024  # ~1024 tokens per measurement on CPU
    assert len({row["flops_per_token"] for row in rows.values()}) > 1  # not one module timed under every name


class MadeUpAttention(MultiHeadAttention):
    """A made-up arm's attention: the baseline's under a name of its own, to be told apart in the rows."""


def test_an_arm_added_to_the_registry_gets_attention_rows_with_no_edit(tmp_path, monkeypatch, one_thread):
    arm = Arm("madeup", "made up", MadeUpAttention)
    monkeypatch.setitem(registry.ARMS, "madeup", arm)
    monkeypatch.setitem(benchmark.MODELS, "madeup", arm.build)  # the registry's builders, read when imported
    results = benchmark.run_benchmark(["--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--seq-lens", "16",
                                       "--models", "baseline", "madeup", "--skip-public-style",
                                       "--output", str(tmp_path / "b.json")])
    rows = {r["arm"]: r for r in results["attention_rows"]}
    assert set(rows) == {"baseline", "madeup"}
    assert rows["madeup"]["name"] == "madeup @ 16" and rows["madeup"]["module"] == "MadeUpAttention"
    assert "error" not in rows["madeup"] and _positive_finite(rows["madeup"]["median_fwd_bwd_s"])


def test_table_printed(tmp_path, capsys, one_thread):
    benchmark.run_benchmark(["--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--seq-lens", "16",
                             "--output", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    attention_labels = tuple(f"{arm} ({type(_attention_of(arm)).__name__})" for arm in DEFAULT_ARMS)
    speedups = tuple(f"Speedup, {arm}: public style / ours" for arm in DEFAULT_ARMS)
    columns = ("Step ms", "Ops fwd/bwd/opt", "Tokens/s", "TFLOP/s", "MFU %")
    for name in MODEL_ROWS + attention_labels + speedups + columns:
        assert name in out, name


def test_format_tables_marks_failed_rows():
    results = {
        "device_name": "CPU", "torch_version": torch.__version__, "shapes": "small", "batch_size": 4, "seq_len": 8,
        "config": {"vocab_size": 16}, "steps": 1, "warmup": 0, "peak_tflops": {"value": None, "source": "none"},
        "rows": [{"name": "baseline (ours)", "model": "baseline", "variant": "ours", "error": "OutOfMemoryError: boom"}],
        "speedups": {"baseline": None},
        "attention_rows": [{"name": "deepseek @ 16", "arm": "deepseek", "seq_len": 16, "error": "ValueError: bad"}],
    }
    table = benchmark.format_tables(results)
    assert "FAILED: OutOfMemoryError: boom" in table
    assert "Speedup, baseline: public style / ours median step time = -x" in table
    failed_attention = next(line for line in table.splitlines() if "FAILED: ValueError: bad" in line)
    assert failed_attention.split()[:2] == ["deepseek", "16"]  # the arm whose module failed to build, and the length


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", 165.2),
    ("Some Unknown GPU", None),
])
def test_datasheet_peaks(name, expected):
    entry = benchmark.datasheet_peak_tflops(name)
    assert (entry and entry[0]) == expected or (entry is None and expected is None)


def test_peak_resolution():
    """Datasheet first; a matmul is measured only for a card the table does not know."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    args = argparse.Namespace(peak_tflops=None)
    measured: list[str] = []

    def measure(value: float) -> Callable[[], float]:
        def run() -> float:
            measured.append("measured")
            return value
        return run

    assert benchmark.resolve_peak(args, cpu, "CPU", measure(1.0))[0] is None
    value, source = benchmark.resolve_peak(args, cuda, "NVIDIA H200", measure(700.0))
    assert value == 989.4 and source.startswith("datasheet") and measured == []
    value, source = benchmark.resolve_peak(args, cuda, "Mystery card", measure(123.0))
    assert value == 123.0 and source.startswith("measured") and measured == ["measured"]
    value, source = benchmark.resolve_peak(argparse.Namespace(peak_tflops=50.0), cpu, "CPU", measure(1.0))
    assert value == 50.0 and source.startswith("user")
