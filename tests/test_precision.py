"""Mixed precision and torch.compile, rehearsed on the CPU: the same autocast, bf16 grouped GEMM,
attention and compiled blocks a CUDA run uses, so a GPU run is not their first run."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from arms.registry import ARM_NAMES, ARMS
from common.errors import ConfigError
from models.moe import GROUPED_CPU
from models.transformer import TransformerBlock
from training import benchmark
from training.experiment import preflight, run_experiment
from training.optim import build_optimizers, build_schedulers
from training.results import RESULTS_FILE
from training.trainer import prepare_model, training_step

CPU = torch.device("cpu")
# nn.RMSNorm warns when autocast hands it bf16 input with an fp32 gain (it then runs unfused): an error here.
pytestmark = pytest.mark.filterwarnings("error:Mismatch dtype between input and weight:UserWarning")


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_bf16_steps_on_cpu_are_finite_and_close_to_fp32(config, arm):
    cfg = config.replace(vocab_size=64, dropout=0.0, router_noise_std=0.0)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    losses = {}
    for precision in ("fp32", "bf16"):
        model = ARMS[arm].build(cfg, seed=3)
        prepare_model(model, cfg, CPU, precision)
        optimizers = build_optimizers(model, cfg, CPU)
        schedulers = build_schedulers(optimizers, cfg)
        losses[precision] = [training_step(model, optimizers, schedulers, x, y, cfg, CPU, precision).item()
                             for _ in range(5)]
        assert model.moe_dispatch_used() == [GROUPED_CPU]
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)
    assert losses["bf16"] != losses["fp32"]  # bf16 really ran
    assert losses["bf16"][-1] < losses["bf16"][0]  # and it learns


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_compiled_block_equals_eager_in_bf16_with_no_graph_break(config, arm):
    """fullgraph=True makes any graph break an error; forward and backward match eager in bf16."""
    cfg = config.replace(vocab_size=64, dropout=0.0, router_noise_std=0.0)
    model = ARMS[arm].build(cfg, seed=4)
    model.plan_moe_dispatch(CPU, torch.bfloat16)
    eager = model.transformer_blocks()[0]
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy, fullgraph=True)
    x = torch.randn(2, 16, cfg.d_model, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(2, 16, cfg.d_model, generator=torch.Generator().manual_seed(6))
    grads = []
    outputs = []
    for block, module in ((eager, eager), (compiled, compiled_copy)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, aux = block(xi)
        ((out.float() * upstream).sum() + aux).backward()
        outputs.append(out.float())
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    assert isinstance(eager, TransformerBlock) and eager.moe.dispatch_used == GROUPED_CPU
    torch.testing.assert_close(outputs[1], outputs[0], atol=3e-2, rtol=3e-2)
    for g_compiled, g_eager in zip(grads[1], grads[0], strict=True):
        assert g_compiled is not None and g_eager is not None
        torch.testing.assert_close(g_compiled.float(), g_eager.float(), atol=3e-2, rtol=3e-2)


def test_compile_needs_bf16(config):
    with pytest.raises(ConfigError, match="--precision bf16"):
        preflight(config.replace(compile=True, device="cpu"))
    assert preflight(config.replace(compile=True, device="cpu", precision="bf16")) == CPU


def test_bf16_run_compiles_every_block_and_records_precision_and_compile(config, monkeypatch):
    """Compilation itself is tested above and in the benchmark; here, that training asks for it."""
    compiled: list[TransformerBlock] = []
    monkeypatch.setattr(TransformerBlock, "compile", lambda self, *a, **k: compiled.append(self))
    cfg = config.replace(precision="bf16", compile=True, max_steps=2, eval_every=2, log_every=1)
    run_experiment(cfg, log=lambda _: None)
    assert len(compiled) == 2 * cfg.n_layers and len(set(map(id, compiled))) == len(compiled)
    written = json.loads((Path(cfg.output_dir) / RESULTS_FILE).read_text())
    assert written["experiment"]["precision"] == "bf16 autocast" and written["experiment"]["compile"] is True
    assert written["experiment"]["config"]["precision"] == "bf16"
    for name in ("baseline", "deepseek"):
        run = written[name]["runs"][0]
        assert run["status"] == "completed" and math.isfinite(run["val_loss"])
        assert run["precision"] == "bf16 autocast" and run["compiled"] is True
        assert run["moe_dispatch"] == [GROUPED_CPU]


def test_benchmark_with_bf16_and_compile_on_cpu(tmp_path, monkeypatch):
    """The benchmark's --compile and --precision bf16 reach its rows. Its blocks compile with the eager backend:
    inductor's code for every arm's block is compiled above, and inductor's C++ for the benchmark's larger shapes
    took 30-40 s of a first test run here (an empty inductor cache), for no property of its own."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    output = tmp_path / "bench.json"
    benchmark.run_benchmark(["--device", "cpu", "--small", "--precision", "bf16", "--compile", "--steps", "1",
                             "--warmup", "1", "--seq-lens", "16", "--skip-public-style", "--models", "deepseek",
                             "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["status"] == "completed", saved["failed"]
    assert saved["compile"] is True and saved["precision"] == "bf16 autocast"
    assert [row["name"] for row in saved["rows"]] == ["deepseek (ours)"]
    for row in saved["rows"]:
        assert row["compiled"] is True and row["precision"] == "bf16 autocast" and math.isfinite(row["last_loss"])
