"""The step modes, rehearsed on the CPU: compiled blocks and optimizer (bf16) with no compilation after the
warm-up on any MoE dispatch path, a compiled optimizer step equal to the eager one, and the whole step in a
CUDA graph (tests/fake_cuda.py replays the captured operators) equal to the eager step; and the settings
that cannot work are refused before training."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
import torch._dynamo
import torch._logging

import training.distributed
import training.experiment
from arms.registry import arm_builders
from common.errors import ConfigError
from config.cli import config_from_args
from config.settings import ExperimentConfig
from data.dataset import TokenData
from exp6_trainer import build_parser
from models.moe import GROUPED_CPU, MASK_LOOP, SORTED_SPLIT
from tests.fake_cuda import CudaOnCpu, install_fake_cuda, install_fake_cuda_graphs
from tests.host_sync import HostSyncError
from training.experiment import preflight, run_experiment
from training.optim import BlockMuon, build_optimizers, build_schedulers
from training.step import GraphedStep
from training.trainer import new_run_record, step_mode_label, train_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
pytestmark = pytest.mark.filterwarnings("ignore:.*CUDA is not available.*:UserWarning",
                                        "ignore:.*autocast.*:UserWarning")


def _tokens(vocab: int, count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed))


class _RecompileReasons(logging.Handler):
    """Collects dynamo's recompile messages (what TORCH_LOGS=recompiles prints) while installed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def recompile_reasons(monkeypatch):
    """Dynamo's recompile messages, from a fresh compile cache (another test's compiled code would hide this
    one's compilations)."""
    handler = _RecompileReasons()
    log = torch._dynamo.guards.recompiles_log
    monkeypatch.setattr(torch._dynamo.guards, "is_recompiles_enabled", lambda: True)
    monkeypatch.setattr(log, "propagate", False)
    level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    torch._dynamo.reset()
    yield handler.messages
    log.removeHandler(handler)
    log.setLevel(level)
    torch._dynamo.reset()


@pytest.mark.parametrize("dispatch,path", [("grouped_mm", GROUPED_CPU), ("sorted", SORTED_SPLIT), ("loop", MASK_LOOP)])
def test_compiled_training_compiles_nothing_after_warm_up(config, recompile_reasons, monkeypatch, dispatch, path):
    """--precision bf16 --compile: every compilation happens before the clock (warm-up and the first
    evaluation), none in the training loop, on every MoE path. The sorted split and the mask loop run their
    data-dependent part eagerly, so no recompile is ever caused by expert sizes (one token per expert group
    and top-1 routing make sizes of 0 and 1 common): the only recompiles are for evaluation (no grad). Those two
    paths' property is dynamo's (graph breaks and guards), so they compile with the eager backend, which skips
    inductor's code generation; grouped_mm compiles with inductor. (The compiled optimizer: the next test.)"""
    if dispatch != "grouped_mm":  # torch.compiler.set_default_backend would do, but is new in torch 2.13
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = config.replace(vocab_size=64, precision="bf16", compile=True, moe_dispatch=dispatch, batch_size=1,
                         max_seq_len=8, num_experts=8, expert_top_k=1, max_steps=4, eval_every=2)
    data = TokenData(train=_tokens(64, 400, 1), val=_tokens(64, 40, 2), vocab_size=64)
    model = arm_builders()["baseline"](cfg)
    record = train_model(model, data, cfg, cfg.seed, CPU, new_run_record("baseline", model, cfg.seed))
    assert record["status"] == "completed" and math.isfinite(record["val_loss"])
    assert record["moe_dispatch"] == [path] and record["step_operators"]["total"] > 0
    assert record["step_mode"] == "blocks compiled" and record["muon_lr_scales"]["blocks.*.attention.o_proj.weight"] == 1
    compilation = record["compilation"]
    assert compilation["frames_compiled_before_training"] > 0  # the counter sees compilation
    assert compilation["frames_compiled_during_training"] == compilation["graphs_during_training"] == 0
    recompiles = [m for m in recompile_reasons if "Recompiling" in m]
    assert recompiles and all("grad_mode" in m for m in recompiles), recompiles


def test_compiled_optimizer_step_equals_the_eager_one(config):
    """--compile-optimizer: Muon's update compiled (bf16 Newton-Schulz, LR read from a device tensor that the
    scheduler updates) gives the eager update, step after step, and compiles once: a new LR recompiles nothing."""
    torch._dynamo.reset()
    cfg = config.replace(vocab_size=50, n_heads=4, max_steps=4)
    models = [arm_builders()["deepseek"](cfg) for _ in range(2)]
    muons = []
    for model, compile_optimizer in zip(models, (False, True)):
        (muon, _) = build_optimizers(model, cfg.replace(compile_optimizer=compile_optimizer), CPU)
        assert isinstance(muon, BlockMuon)
        muons.append(muon)
    assert isinstance(muons[1].param_groups[0]["lr"], torch.Tensor)
    schedulers = [build_schedulers([muon], cfg)[0] for muon in muons]
    start = [p.detach().clone() for p in models[0].parameters()]
    frames = []
    for step in range(cfg.max_steps):
        grads = {name: torch.randn_like(p) for name, p in models[0].named_parameters()}
        for model, muon, scheduler in zip(models, muons, schedulers):
            for name, param in model.named_parameters():
                param.grad = grads[name].clone()
            muon.step()
            scheduler.step()
        frames.append(torch._dynamo.utils.counters["frames"]["ok"])
    assert frames[0] >= 1 and frames[-1] == frames[0]  # compiled at the first step, never again
    # Newton-Schulz in bf16 is accurate to 1-3% (torch.optim.Muon's own, against float64); fused by inductor
    # it rounds differently, so the two updates agree to that accuracy, not bit for bit
    for (name, eager), compiled, before in zip(models[0].named_parameters(), models[1].parameters(), start):
        if eager.ndim == 2 and name.startswith("blocks."):
            moved, moved_compiled = eager.detach() - before, compiled.detach() - before
            assert (moved_compiled - moved).norm() < 0.06 * moved.norm(), name
    torch._dynamo.reset()


def _graph_config(config: ExperimentConfig) -> ExperimentConfig:
    return config.replace(vocab_size=50, n_heads=4, max_steps=5, device="cuda", cuda_graph=True)


def test_the_stand_in_answers_whether_a_capture_is_running(monkeypatch):
    """Adam/AdamW ask torch.cuda.is_current_stream_capturing() on a CUDA build of torch <= 2.12: the stand-ins
    answer as CUDA would (False, and True inside a capture) without reaching a CUDA runtime this machine lacks."""
    install_fake_cuda(monkeypatch, "NVIDIA H200", (9, 0))
    assert torch.cuda.is_current_stream_capturing() is False
    install_fake_cuda_graphs(monkeypatch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert torch.cuda.is_current_stream_capturing() is True
    assert torch.cuda.is_current_stream_capturing() is False


def test_a_graph_with_a_frozen_lr_or_a_host_sync_is_caught(monkeypatch, config):
    """The stand-in graph can fail the test above: with LRs as Python numbers (frozen at capture) training drifts
    from the eager step, and a step that reads expert sizes back to the host (the sorted split) fails to capture."""
    install_fake_cuda(monkeypatch, "NVIDIA H200", (9, 0))
    install_fake_cuda_graphs(monkeypatch)
    cfg = _graph_config(config)
    with CudaOnCpu():
        model = arm_builders()["baseline"](cfg.replace(moe_dispatch="sorted"), seed=3).to(CUDA).train()
        model.plan_moe_dispatch(CUDA, torch.bfloat16)
        optimizers = build_optimizers(model, cfg, CUDA)
        x = torch.randint(0, 50, (2, 8))
        with pytest.raises(HostSyncError, match="tolist"):
            GraphedStep(model, optimizers, build_schedulers(optimizers, cfg), x, x, cfg, CUDA, "bf16")
        frozen = cfg.replace(cuda_graph=False)  # Python-number LRs, as without --cuda-graph
        trained = {}
        for name, c in (("frozen", frozen), ("device", cfg)):
            model = arm_builders()["baseline"](cfg, seed=3).to(CUDA).train()
            model.plan_moe_dispatch(CUDA, torch.bfloat16)
            optimizers = build_optimizers(model, c, CUDA)
            for group in (g for o in optimizers if isinstance(o, torch.optim.AdamW) for g in o.param_groups):
                group["capturable"] = True  # else AdamW itself refuses the capture; the frozen LRs are what's shown
            step = GraphedStep(model, optimizers, build_schedulers(optimizers, c), x, x, cfg, CUDA, "bf16")
            torch.manual_seed(7)
            for _ in range(cfg.max_steps):
                step(x, x)
            trained[name] = model.embed.weight.detach().clone()
    assert not torch.equal(trained["frozen"], trained["device"])


def test_step_mode_flags():
    args = build_parser().parse_args(["--compile", "--compile-optimizer", "--cuda-graph"])
    config = config_from_args(args, cuda_available=True)[0]
    assert config.compile and config.compile_optimizer and config.cuda_graph
    assert step_mode_label(config) == "blocks compiled, optimizer compiled, whole step in one CUDA graph"
    default = config_from_args(build_parser().parse_args([]), cuda_available=True)[0]
    assert not (default.compile or default.compile_optimizer or default.cuda_graph) and step_mode_label(default) == "eager"


class _StoreOfAlikeRanks:
    """A rendezvous store for rank 0 of 2 in which every other rank's value equals rank 0's."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.values.get(key) or self.values[key.rsplit("/", 1)[0] + "/0"]


def test_step_modes_that_cannot_work_are_refused_before_training(monkeypatch, config):
    with pytest.raises(ConfigError, match="--cuda-graph needs a CUDA GPU"):
        config.replace(cuda_graph=True, device="cpu").validate()
    with pytest.raises(ConfigError, match="--moe-dispatch sorted"):
        config.replace(cuda_graph=True, moe_dispatch="sorted").validate()
    with pytest.raises(ConfigError, match="--compile-optimizer"):
        config.replace(compile_optimizer=True, optimizer="adamw").validate()
    with pytest.raises(ConfigError, match="--cuda-graph needs a CUDA GPU"):
        preflight(config.replace(cuda_graph=True))  # auto device, no GPU here
    install_fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))  # auto dispatch takes the sorted split there
    with pytest.raises(ConfigError, match="sorted split") as no_fused_kernel:
        preflight(config.replace(cuda_graph=True, device="cuda"))
    assert str(no_fused_kernel.value).endswith(": drop --cuda-graph")  # no dispatch would run the fused kernel here
    install_fake_cuda(monkeypatch, "NVIDIA B200", (10, 0))  # auto avoids the fused kernel there; grouped_mm runs it
    with pytest.raises(ConfigError, match="sorted split.*: pass --moe-dispatch grouped_mm"):
        preflight(config.replace(cuda_graph=True, device="cuda"))
    assert preflight(config.replace(cuda_graph=True, device="cuda", moe_dispatch="grouped_mm")) == CUDA
    install_fake_cuda(monkeypatch, "NVIDIA H200", (9, 0))
    assert preflight(config.replace(cuda_graph=True, device="cuda")) == CUDA
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts rank 0 of 2: refused before joining the others
    monkeypatch.setenv("RANK", "0")
    # the ranks first meet in torchrun's store (to compare configs and share setup errors): here a store in
    # which rank 1 says what rank 0 says, since it was started alike
    monkeypatch.setattr(training.distributed, "rendezvous", lambda launch, minutes: _StoreOfAlikeRanks())
    with pytest.raises(ConfigError, match="--parallel data"):
        run_experiment(config.replace(cuda_graph=True, device="cuda", parallel="data"))
