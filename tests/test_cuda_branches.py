"""Every CUDA-only branch of the experiment, trainer and benchmark, driven on the CPU with the CUDA
runtime calls monkeypatched (tests/fake_cuda.py). A misspelt torch.cuda call, a wrong argument or
a branch that crashes fails here, not on a user's first GPU run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import hardware
from config.settings import ExperimentConfig
from exp6_flash_attention_model import FlashAttentionModel
from models.moe import GROUPED_FUSED, MASK_LOOP, SORTED_SPLIT
from tests.fake_cuda import FAKE_PEAK_MEMORY_BYTES, CudaOnCpu, install_fake_cuda
from training import benchmark
from training.experiment import run_experiment
from training.optim import build_optimizers
from training.results import RESULTS_FILE

CUDA = torch.device("cuda")
# PyTorch disables autocast("cuda") on a CPU-only build, with a warning; the CPU bf16 tests cover the math.
pytestmark = pytest.mark.filterwarnings("ignore:.*CUDA is not available.*:UserWarning",
                                        "ignore:.*autocast.*:UserWarning")


def test_hardware_helpers_call_the_cuda_runtime(monkeypatch):
    calls = install_fake_cuda(monkeypatch, "NVIDIA H200", (9, 0))
    assert hardware.device_name(CUDA) == "NVIDIA H200 (sm90)"
    assert hardware.cuda_capability(CUDA) == (9, 0)
    hardware.synchronize(CUDA)
    hardware.reset_peak_memory(CUDA)
    assert hardware.peak_memory_mb(CUDA) == FAKE_PEAK_MEMORY_BYTES / 2**20
    hardware.release_memory(CUDA)
    assert calls.synchronize == [CUDA] and calls.reset_peak == [CUDA] and calls.empty_cache == 1
    assert hardware.resolve_precision(hardware_config("auto").precision, CUDA) == "bf16"
    assert hardware.resolve_device(hardware_config("auto").device) == CUDA


def hardware_config(precision: str) -> ExperimentConfig:
    return ExperimentConfig(precision=precision)


@pytest.mark.parametrize("capability,path", [((8, 9), SORTED_SPLIT), ((9, 0), GROUPED_FUSED)])
def test_moe_plan_for_the_card(monkeypatch, config, capability, path):
    install_fake_cuda(monkeypatch, capability=capability)
    model = FlashAttentionModel(config.replace(vocab_size=50))
    assert model.plan_moe_dispatch(CUDA, torch.bfloat16) == [path]


def test_an_unplanned_moe_layer_asks_the_card(monkeypatch, config):
    """A layer used on its own (not planned by the trainer) plans itself on first use, per card."""
    install_fake_cuda(monkeypatch, capability=(8, 0))
    moe = FlashAttentionModel(config.replace(vocab_size=50)).moe_layers()[0]
    assert moe.planned == {}
    assert moe._path(CUDA, torch.bfloat16) == SORTED_SPLIT
    assert moe.planned == {("auto", "cuda", torch.bfloat16): SORTED_SPLIT}


def test_adamw_is_fused_on_cuda(config):
    model = FlashAttentionModel(config.replace(vocab_size=50))
    _, adamw = build_optimizers(model, config, CUDA)
    assert adamw.defaults["fused"] is True
    _, adamw_cpu = build_optimizers(model, config, torch.device("cpu"))
    assert adamw_cpu.defaults["fused"] is True  # one operator on the CPU as well
    _, adamw_before = build_optimizers(model, config, torch.device("cpu"), reference=True)
    assert not adamw_before.defaults["fused"]
    (control,) = build_optimizers(model, config.replace(optimizer="adamw"), CUDA)  # the AdamW-only control
    assert isinstance(control, torch.optim.AdamW) and control.defaults["fused"] is True


@pytest.mark.parametrize("card,capability", [("NVIDIA GeForce RTX 4090", (8, 9)), ("NVIDIA H200", (9, 0))])
def test_experiment_cuda_branches(monkeypatch, config, card, capability):
    calls = install_fake_cuda(monkeypatch, card, capability)
    lines: list[str] = []
    with CudaOnCpu():
        results = run_experiment(config.replace(device="cuda"), log=lines.append)
    written = json.loads((Path(config.output_dir) / RESULTS_FILE).read_text())
    header = written["experiment"]
    major, minor = capability
    assert header["device"] == "cuda" and header["device_name"] == f"{card} (sm{major}{minor})"
    assert header["precision"] == "bf16 autocast" and header["status"] == "completed"
    assert any(f"{card} (sm{major}{minor})" in line for line in lines)
    for name in ("baseline", "deepseek"):
        run = written[name]["runs"][0]
        assert run["status"] == "completed" and run["peak_gpu_memory_mb"] == FAKE_PEAK_MEMORY_BYTES / 2**20
        assert run["precision"] == "bf16 autocast"
    assert len(calls.reset_peak) == 2 and len(calls.peak_reads) == 2  # once per model run
    assert calls.empty_cache == 2  # GPU memory released after each model run
    assert len(calls.synchronize) >= 2 * (config.max_steps // config.log_every)  # timing syncs at logging steps
    assert all(device == CUDA for device in calls.synchronize)
    assert results["comparison"]["verdict"]


def test_benchmark_cuda_branches(monkeypatch, tmp_path):
    calls = install_fake_cuda(monkeypatch)
    output = tmp_path / "bench.json"
    with CudaOnCpu():
        results = benchmark.run_benchmark(["--device", "cuda", "--small", "--steps", "1", "--warmup", "0",
                                           "--seq-lens", "16", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["status"] == "completed", saved["failed"]
    assert saved["device_name"] == "NVIDIA GeForce RTX 4090 (sm89)"
    assert saved["peak_tflops"]["value"] == 165.2 and saved["measured_bf16_matmul_tflops"] is None
    for row in saved["rows"] + saved["attention_rows"]:
        assert row["peak_memory_mb"] == FAKE_PEAK_MEMORY_BYTES / 2**20 and row["mfu"] is not None and row["mfu"] > 0
    ours = [r for r in saved["rows"] if r["variant"] == "ours"]
    assert all(r["precision"] == "bf16 autocast" for r in ours)
    assert calls.synchronize and calls.reset_peak and calls.empty_cache >= len(results["rows"])


def test_benchmark_matmul_measurement_runs_its_cuda_branch(monkeypatch):
    calls = install_fake_cuda(monkeypatch, "Mystery card", (12, 0))
    with CudaOnCpu():
        tflops = benchmark.measure_matmul_tflops(CUDA, size=64, repeats=2)
    assert tflops is not None and tflops > 0 and len(calls.synchronize) == 2


def test_benchmark_cuda_graph_on_a_card_without_it_still_times_the_eager_variants(monkeypatch, tmp_path):
    """--cuda-graph on an RTX 4090 (sm89: no fused grouped_mm, so no graph): ours is refused before any step, but
    the before-batching and public-style rows, which never graph, are timed eagerly, each in its own settings."""
    install_fake_cuda(monkeypatch)
    monkeypatch.setitem(benchmark.ATTENTION_TOKENS, "cuda", 32)  # the attention rows are not what this test is about
    with CudaOnCpu():
        results = benchmark.run_benchmark(["--device", "cuda", "--small", "--steps", "1", "--warmup", "0",
                                           "--seq-lens", "16", "--models", "baseline", "--cuda-graph", "--before",
                                           "--output", str(tmp_path / "bench.json")])
    rows = {row["variant"]: row for row in results["rows"]}
    assert "needs static shapes" in rows["ours"]["skipped"] and "median_step_s" not in rows["ours"]
    for variant, precision in (("before batching", "bf16 autocast"), ("public style", "float32")):
        row = rows[variant]
        assert "skipped" not in row and "error" not in row, row
        assert row["step_mode"] == "eager" and row["median_step_s"] > 0 and row["precision"] == precision
    assert rows["public style"]["moe_dispatch"] == [MASK_LOOP]
    assert results["status"] == "completed" and results["failed"] == []
