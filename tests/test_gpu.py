"""The GPU's own checks, each run twice: on a CUDA GPU when there is one, and as a CPU twin that CI runs.

Every test body takes the device as a parameter, so the code under test (and the test's own code) runs
on the CPU in every CI run. Where a kernel exists only on CUDA, the CPU twin runs the same code path up
to that kernel and checks the same numerics on the CPU's kernel:
- PyTorch's FlashAttention SDPA backend: the CPU has its own (`_scaled_dot_product_flash_attention_for_cpu`);
  the attention modules are told that CPU bf16 tensors qualify for it, as CUDA bf16 tensors do;
- flash-attn: a stand-in `flash_attn` module with `flash_attn_func`'s signature, layout and dtype rules,
  computing with the plain-math reference attention (the real package is CUDA-only);
- the fused grouped_mm (sm90 only): the CPU's grouped_mm kernel;
- `torch.cuda.set_sync_debug_mode("error")`: the CPU stand-in in tests/host_sync.py;
- CUDA graphs: tests/fake_cuda.py's stand-in, which replays exactly the captured operators.
The CUDA runs are skipped without a GPU; a CUDA flash-attn case is skipped, and named, without flash-attn.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import deepseek_modeling
import exp6_baseline_attention_model
from arms.registry import ARM_NAMES, ARMS
from common.hardware import cuda_capability
from config.settings import ExperimentConfig
from deepseek_modeling import DeepseekV3Attention, DeepseekV3FlashAttention2
from exp6_baseline_attention_model import MultiHeadAttention
from models.attention_ops import (
    FLASH_ATTN_INSTALL,
    eager_causal_attention,
    flash_attn_import_error,
    sdpa_causal_attention,
)
from models.moe import GROUPED_CPU, GROUPED_FUSED, GROUPED_PER_GROUP, MASK_LOOP, SORTED_SPLIT, MixtureOfExperts
from tests.fake_cuda import CudaOnCpu, install_fake_cuda, install_fake_cuda_graphs
from tests.host_sync import HostSyncDetector
from tests.moe_routing import force_uneven_routing
from training.optim import build_optimizers, build_schedulers
from training.step import GraphedStep, training_step
from training.trainer import make_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

BF16_ATOL, BF16_RTOL = 2e-2, 2e-2
SDPA_FLASH_OP = {"cuda": "aten::_scaled_dot_product_flash_attention",
                 "cpu": "aten::_scaled_dot_product_flash_attention_for_cpu"}
VOCAB_SIZE = 1000


def _half(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The device a test runs on. On the CPU, CPU half-precision tensors count as FlashAttention-eligible
    (on CUDA, CUDA half tensors do), so both arms take the pinned-flash path and PyTorch's CPU flash
    kernel runs; flash-attn is judged by its import alone, as on an sm80-sm90 card."""
    if request.param == "cpu":
        for module in (deepseek_modeling, exp6_baseline_attention_model):
            monkeypatch.setattr(module, "half_precision_cuda", _half)
        monkeypatch.setattr(deepseek_modeling, "flash_attn_unusable", lambda capability: flash_attn_import_error())
    return str(request.param)


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or installed but built against another torch/CUDA
        return False
    return True


def _stand_in_flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                              softmax_scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """flash_attn_func on the CPU: (batch, seq, heads, d) in and out, fp16/bf16 only, one head dim for q, k
    and v (flash-attn 2's rules, which the caller must meet), computed by the plain-math reference."""
    assert q.dtype == k.dtype == v.dtype and _half(q), f"flash-attn takes fp16/bf16, got {q.dtype}"
    assert q.ndim == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attn needs one head dim for q, k, v"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "flash-attn needs a contiguous last dim"
    assert causal and dropout_p == 0.0
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return eager_causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)


@pytest.fixture
def flash_attn(device: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The flash_attn module: the real package on CUDA (skipped, and named, when it is not importable); on
    the CPU a stand-in module whose flash_attn_func checks flash-attn's rules and computes the reference."""
    if device == "cuda":
        if not _flash_attn_importable():
            pytest.skip(f"flash-attn is not importable ({FLASH_ATTN_INSTALL})")
        import flash_attn as real

        return real
    stand_in = types.ModuleType("flash_attn")
    stand_in.flash_attn_func = _stand_in_flash_attn_func  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    monkeypatch.setattr(deepseek_modeling, "flash_attn_unusable", lambda capability: None)
    return stand_in


def _autocast(device: str) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device, dtype=torch.bfloat16)


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """O(1) activations: weights ~ N(0, 1/fan_in), norm gains around 1 (drawn on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                values = 1.0 + 0.3 * torch.randn(p.shape, generator=gen)
            else:
                values = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
            p.copy_(values.to(device=p.device, dtype=p.dtype))


def _mla_pair(attention_backend: str, device: str, seed: int = 0) -> tuple[
        ExperimentConfig, DeepseekV3Attention, DeepseekV3Attention, DeepseekV3FlashAttention2]:
    """(fp32 eager reference, bf16 eager, bf16 DeepseekV3FlashAttention2) with the same bf16-exact weights.
    The bf16 modules are cast to bf16 and called without autocast."""
    config = ExperimentConfig(vocab_size=VOCAB_SIZE, attention_backend=attention_backend)
    reference = DeepseekV3Attention(config)
    _randomize_(reference, seed)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # so the fp32 reference uses exactly the bf16 weights
    reference = reference.to(device).eval()
    eager = DeepseekV3Attention(config)
    eager.load_state_dict(reference.state_dict(), strict=True)
    flash = DeepseekV3FlashAttention2(config)
    flash.load_state_dict(reference.state_dict(), strict=True)
    return config, reference, eager.to(device, torch.bfloat16).eval(), flash.to(device, torch.bfloat16).eval()


def _bf16_input(config: ExperimentConfig, device: str, batch: int = 4, seq: int | None = None,
                seed: int = 1) -> torch.Tensor:
    seq = seq or config.max_seq_len
    x = torch.randn(batch, seq, config.d_model, generator=torch.Generator().manual_seed(seed))
    return x.to(device, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# (a) bf16 parity of the MLA kernels
# --------------------------------------------------------------------------------------------

EXPECTED_BACKEND_USED = {"sdpa": "sdpa[FLASH_ATTENTION]", "flash-attn": "flash_attn.flash_attn_func"}


@pytest.mark.parametrize("seq", [1, 77, 256])
@pytest.mark.parametrize("attention_backend", ["sdpa", "flash-attn"])
def test_mla_bf16_kernels_agree_with_eager(device, attention_backend, seq, request):
    if attention_backend == "flash-attn":
        request.getfixturevalue("flash_attn")
    config, reference, eager, flash = _mla_pair(attention_backend, device)
    x = _bf16_input(config, device, seq=seq)
    with torch.no_grad():
        ref = reference(x.float())
        out_eager = eager(x)
        out_flash = flash(x)
    assert out_eager.dtype == out_flash.dtype == torch.bfloat16
    assert eager.backend_used == "eager"
    assert flash.backend_used == EXPECTED_BACKEND_USED[attention_backend]
    torch.testing.assert_close(out_flash.float(), out_eager.float(), atol=BF16_ATOL, rtol=BF16_RTOL)
    torch.testing.assert_close(out_eager.float(), ref, atol=BF16_ATOL, rtol=BF16_RTOL)
    torch.testing.assert_close(out_flash.float(), ref, atol=BF16_ATOL, rtol=BF16_RTOL)


# --------------------------------------------------------------------------------------------
# (b) the intended kernel really ran
# --------------------------------------------------------------------------------------------


def test_sdpa_path_runs_pytorch_flash_kernel(device):
    config, _, _, flash = _mla_pair("sdpa", device)
    x = _bf16_input(config, device)
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = flash(x)
        assert flash.backend_used == "sdpa[FLASH_ATTENTION]"
        ops = {event.key for event in prof.key_averages()}
        assert SDPA_FLASH_OP[device] in ops, f"PyTorch's flash SDPA op did not run; ops seen: {sorted(ops)}"

        # The pinned call itself: sdpa_kernel([FLASH_ATTENTION]) would raise if flash could not run.
        q, k, v = flash.project_qkv(x)
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] != v.shape[-1]
        pinned = sdpa_causal_attention(q, k, v, flash.softmax_scale, force_flash=True)
        assert pinned.shape == v.shape
        assert torch.isfinite(pinned).all()
        o_in = pinned.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        torch.testing.assert_close(flash.o_proj(o_in), out, atol=0, rtol=0)


def _strided_last_dim(device: str) -> torch.Tensor:
    return torch.randn(2, 4, 96, 16, device=device).transpose(-1, -2)  # last dim has stride 16, not 1


def _float32(device: str) -> torch.Tensor:
    return torch.randn(2, 4, 16, 96, device=device)


@pytest.mark.parametrize("device,inadmissible", [
    ("cpu", _strided_last_dim),  # no flash kernel takes a strided last dim, on either device
    pytest.param("cuda", _strided_last_dim, marks=needs_cuda),
    pytest.param("cuda", _float32, marks=needs_cuda),  # CUDA's flash kernel takes only fp16/bf16 (the CPU's takes fp32)
])
@pytest.mark.filterwarnings("ignore:All fused kernels require the last dimension", "ignore:Flash attention kernel not used because")
def test_sdpa_flash_pin_is_binding(device, inadmissible):
    """Where PyTorch's flash backend cannot run, the pinned call raises instead of falling back."""
    q = inadmissible(device)
    v = torch.randn(*q.shape[:-1], 64, device=device, dtype=q.dtype)
    F.scaled_dot_product_attention(q, q, v, is_causal=True)  # any backend may run it unpinned
    with pytest.raises(RuntimeError):
        sdpa_causal_attention(q, q, v, 96 ** -0.5, force_flash=True)


@pytest.mark.parametrize("attention_backend", ["flash-attn", "auto"])
def test_flash_attn_path_calls_flash_attn_func(device, flash_attn, monkeypatch, attention_backend):
    calls = []
    original = flash_attn.flash_attn_func

    def spy(*args, **kwargs):
        calls.append((tuple(a.shape for a in args[:3]), kwargs.get("causal"), kwargs.get("softmax_scale")))
        return original(*args, **kwargs)

    monkeypatch.setattr(flash_attn, "flash_attn_func", spy)
    config, _, eager, flash = _mla_pair(attention_backend, device)
    x = _bf16_input(config, device, seq=96)
    with torch.no_grad():
        out = flash(x)
        expected = eager(x)
    assert flash.backend_used == "flash_attn.flash_attn_func"
    assert len(calls) == 1, f"flash_attn_func called {len(calls)} times"
    shapes, causal, scale = calls[0]
    assert causal is True and scale == pytest.approx(flash.softmax_scale)
    assert shapes[0] == (x.shape[0], x.shape[1], config.n_heads, flash.qk_head_dim)  # (batch, seq, heads, d)
    torch.testing.assert_close(out.float(), expected.float(), atol=BF16_ATOL, rtol=BF16_RTOL)


# --------------------------------------------------------------------------------------------
# (c) full models: bf16 autocast forward + backward
# --------------------------------------------------------------------------------------------


def _model_config(**changes: Any) -> ExperimentConfig:
    return ExperimentConfig(vocab_size=VOCAB_SIZE, n_layers=2, max_seq_len=128, **changes)


def _train_step(model: torch.nn.Module, config: ExperimentConfig, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB_SIZE, (4, config.max_seq_len + 1), generator=gen).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model.train()
    with _autocast(device):
        logits, aux = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss = loss + config.load_balancing_weight * aux
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(
    "arm,attention_backend",
    [(arm, "auto") for arm in ARM_NAMES] + [("deepseek", "sdpa"), ("deepseek", "eager"), ("deepseek", "flash-attn")],
)
def test_full_model_bf16_autocast_forward_backward(device, arm, attention_backend, request):
    if attention_backend == "flash-attn":
        request.getfixturevalue("flash_attn")
    config = _model_config(attention_backend=attention_backend)
    model = ARMS[arm].build(config).to(device)
    loss = _train_step(model, config, device)
    assert torch.isfinite(loss).item(), f"loss {loss.item()}"
    assert math.log(VOCAB_SIZE) * 0.5 < loss.item() < math.log(VOCAB_SIZE) * 2
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no grad for {name}"
        assert torch.isfinite(p.grad).all().item(), f"non-finite grad for {name}"
    attention = model.attention_modules()[0]
    if isinstance(attention, MultiHeadAttention):
        expected = ["sdpa[FLASH_ATTENTION]"]  # pinned to the same kernel family as MLA
    elif not isinstance(attention, DeepseekV3FlashAttention2):  # another arm's kernel: one, recorded by every layer
        expected = [attention.backend_used or "not run yet"]
        assert expected != ["not run yet"]
    elif attention_backend == "eager":
        expected = ["eager"]
    elif attention_backend == "flash-attn" or (attention_backend == "auto" and _flash_attn_importable()):
        expected = ["flash_attn.flash_attn_func"]
    else:
        expected = ["sdpa[FLASH_ATTENTION]"]
    assert model.attention_backends() == expected


# --------------------------------------------------------------------------------------------
# (d) the MoE: every dispatch path agrees with the loop in bf16; the auto path is sync-free where
#     grouped_mm runs fused (sm90) or on the CPU's kernel, and the recorded fallback elsewhere
# --------------------------------------------------------------------------------------------


def _moe_step(moe: MixtureOfExperts, x: torch.Tensor) -> None:
    with _autocast(x.device.type):
        out, aux = moe(x)
        loss = out.float().square().mean() + 0.01 * aux
    loss.backward()


GROUPED_PATHS = {"cuda": (GROUPED_FUSED, GROUPED_PER_GROUP), "cpu": (GROUPED_CPU,)}


@pytest.mark.parametrize("dispatch", ["grouped_mm", "sorted"])
def test_moe_dispatch_matches_loop_in_bf16_with_empty_experts_and_uneven_groups(device, dispatch):
    config = ExperimentConfig(vocab_size=VOCAB_SIZE, router_noise_std=0.0, moe_dispatch=dispatch)
    moe = MixtureOfExperts(config)
    _randomize_(moe, seed=3)
    force_uneven_routing(moe, config)
    loop = copy.deepcopy(moe)
    loop.dispatch = "loop"
    moe, loop = moe.to(device).train(), loop.to(device).train()
    x = torch.randn(4, 64, config.d_model, generator=torch.Generator().manual_seed(2)).to(device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    _moe_step(moe, x1)
    _moe_step(loop, x2)
    expected = {"grouped_mm": GROUPED_PATHS[device], "sorted": (SORTED_SPLIT,)}[dispatch]
    assert moe.dispatch_used in expected and loop.dispatch_used == MASK_LOOP
    assert x1.grad is not None and x2.grad is not None
    torch.testing.assert_close(x1.grad, x2.grad, atol=BF16_ATOL, rtol=BF16_RTOL)
    for (name, pm), pl in zip(moe.named_parameters(), loop.parameters(), strict=True):
        if pl.grad is None:  # an empty expert: the loop skipped it, the other path must give zeros
            assert pm.grad is None or torch.count_nonzero(pm.grad) == 0, name
        else:
            assert pm.grad is not None, name
            torch.testing.assert_close(pm.grad.float(), pl.grad.float(), atol=BF16_ATOL, rtol=BF16_RTOL, msg=name)
    assert all(p.grad is None for p in loop.experts[0].parameters())  # expert 0 really was empty


@contextlib.contextmanager
def _no_host_sync(device: str) -> Iterator[None]:
    """Fail on any host-device sync: CUDA's own sync debug mode, or its CPU stand-in."""
    if device == "cpu":
        with HostSyncDetector():
            yield
        return
    try:
        torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


SYNC_FREE_PATHS: dict[str, Callable[[tuple[int, int] | None], str | None]] = {
    # the path `auto` must plan, and whether it must run without a host sync (None: it syncs by design)
    "cpu": lambda capability: GROUPED_CPU,
    "cuda": lambda capability: GROUPED_FUSED if capability is not None and capability[0] == 9 else None,
}


def test_moe_auto_dispatch_is_sync_free_on_sm90_and_the_recorded_fallback_elsewhere(device):
    config = ExperimentConfig(vocab_size=VOCAB_SIZE)
    moe = MixtureOfExperts(config).to(device).train()
    capability = cuda_capability(torch.device(device))
    planned = moe.plan(torch.device(device), torch.bfloat16, capability)
    x = torch.randn(4, 128, config.d_model, device=device, requires_grad=True)
    _moe_step(moe, x)  # warm-up outside the check: lazy CUDA/cuBLAS initialisation is not the code under test
    moe.zero_grad(set_to_none=True)
    x.grad = None
    sync_free = SYNC_FREE_PATHS[device](capability)
    if sync_free is not None:
        assert planned == sync_free
        with _no_host_sync(device):
            _moe_step(moe, x)
    else:  # sm80/sm89 (grouped_mm would sync per call) and sm100+ (the safe path): the one-sync sorted split
        assert planned == SORTED_SPLIT
        _moe_step(moe, x)
    assert moe.dispatch_used == planned
    assert x.grad is not None and torch.isfinite(x.grad).all().item()


# --------------------------------------------------------------------------------------------
# (e) --cuda-graph: the whole training step captured once and replayed trains as the eager step does
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _graph_device(device: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """On CUDA, the card's own graphs (skipped, and named, where the static-shape path does not run); on the
    CPU, the runtime answering like an H200, tensors "on cuda" kept on the CPU and a stand-in graph that
    replays exactly the captured operators (tests/fake_cuda.py). Yields the stand-in graphs made (CPU)."""
    if device == "cuda":
        capability = cuda_capability(torch.device("cuda"))
        if capability is None or capability[0] != 9:
            pytest.skip(f"--cuda-graph needs the fused grouped GEMM (sm90); this card is {capability}")
        yield []
        return
    install_fake_cuda(monkeypatch, "NVIDIA H200", (9, 0))
    graphs = install_fake_cuda_graphs(monkeypatch)
    with CudaOnCpu():
        yield graphs


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_cuda_graph_step_equals_the_eager_step(device, monkeypatch, arm):
    """LRs live in device tensors the schedulers update between replays, so nothing is frozen at its
    capture-time value; the CPU twin is bit-exact, CUDA's within bf16 tolerance (its backward kernels use
    atomics, so two eager runs differ in the last bits too)."""
    cuda = torch.device("cuda")
    config = ExperimentConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_layers=2, d_ff=128, num_experts=4,
                              q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                              max_seq_len=32, max_steps=5, cuda_graph=True, device="cuda")
    losses, weights = {}, {}
    with _graph_device(device, monkeypatch) as graphs:
        for mode in ("eager", "graph"):
            model = ARMS[arm].build(config, seed=3).to(cuda).train()
            model.plan_moe_dispatch(cuda, torch.bfloat16)
            optimizers = build_optimizers(model, config, cuda)
            schedulers = build_schedulers(optimizers, config)
            gen = torch.Generator().manual_seed(0)
            batches = [torch.randint(0, VOCAB_SIZE, (2, 33), generator=gen).to(cuda) for _ in range(config.max_steps)]
            if mode == "graph":
                step = make_step(model, optimizers, schedulers, batches[0][:, :-1], batches[0][:, 1:], config, cuda, "bf16")
                assert isinstance(step, GraphedStep)
            else:
                def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                    return training_step(model, optimizers, schedulers, x, y, config, cuda, "bf16")
            torch.manual_seed(7)
            losses[mode] = torch.stack([step(b[:, :-1], b[:, 1:]) for b in batches]).float().cpu()
            weights[mode] = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    assert torch.isfinite(losses["eager"]).all() and len(set(losses["eager"].tolist())) == config.max_steps
    if device == "cpu":
        assert len(graphs) == 1 and graphs[0].replays == config.max_steps
        assert torch.equal(losses["graph"], losses["eager"])
        assert all(torch.equal(weights["graph"][n], w) for n, w in weights["eager"].items())
    else:
        torch.testing.assert_close(losses["graph"], losses["eager"], atol=BF16_ATOL, rtol=BF16_RTOL)
        for name, value in weights["eager"].items():
            torch.testing.assert_close(weights["graph"][name], value, atol=BF16_ATOL, rtol=BF16_RTOL, msg=name)
