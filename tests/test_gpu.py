"""CUDA-only checks: bf16 kernel parity, proof of which attention kernel ran, full-model training
steps under autocast, and a sync-free MoE training step. Skipped as a whole without a CUDA GPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_modeling import DeepseekV3Attention, DeepseekV3FlashAttention2
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_flash_attention_model import FlashAttentionModel
from models.attention_ops import FLASH_ATTN_INSTALL, flash_attn_installed, sdpa_causal_attention
from models.moe import GROUPED_FUSED, GROUPED_PER_GROUP, MASK_LOOP, SORTED_SPLIT, MixtureOfExperts
from tests.moe_routing import force_uneven_routing
from experiment_config import ExperimentConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
BF16_ATOL, BF16_RTOL = 2e-2, 2e-2
SDPA_FLASH_OP = "aten::_scaled_dot_product_flash_attention"


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or installed but built against another torch/CUDA
        return False
    return True


needs_flash_attn = pytest.mark.skipif(
    not _flash_attn_importable(), reason=f"flash-attn is not importable ({FLASH_ATTN_INSTALL})"
)


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


def _mla_pair(attention_backend: str, seed: int = 0):
    """(fp32 eager reference, bf16 eager, bf16 DeepseekV3FlashAttention2) with the same bf16-exact weights."""
    config = ExperimentConfig(vocab_size=1000, attention_backend=attention_backend)
    reference = DeepseekV3Attention(config)
    _randomize_(reference, seed)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # so the fp32 reference uses exactly the bf16 weights
    reference = reference.to(DEVICE).eval()
    eager = DeepseekV3Attention(config)
    eager.load_state_dict(reference.state_dict(), strict=True)
    flash = DeepseekV3FlashAttention2(config)
    flash.load_state_dict(reference.state_dict(), strict=True)
    return config, reference, eager.to(DEVICE, torch.bfloat16).eval(), flash.to(DEVICE, torch.bfloat16).eval()


def _bf16_input(config: ExperimentConfig, batch: int = 4, seq: int | None = None, seed: int = 1) -> torch.Tensor:
    seq = seq or config.max_seq_len
    x = torch.randn(batch, seq, config.d_model, generator=torch.Generator().manual_seed(seed))
    return x.to(DEVICE, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# (a) bf16 parity of the MLA kernels
# --------------------------------------------------------------------------------------------

EXPECTED_BACKEND_USED = {"sdpa": "sdpa[FLASH_ATTENTION]", "flash-attn": "flash_attn.flash_attn_func"}


@pytest.mark.parametrize("seq", [1, 77, 256])
@pytest.mark.parametrize("attention_backend", ["sdpa", pytest.param("flash-attn", marks=needs_flash_attn)])
def test_mla_bf16_kernels_agree_with_eager(attention_backend, seq):
    config, reference, eager, flash = _mla_pair(attention_backend)
    x = _bf16_input(config, seq=seq)
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


def test_sdpa_path_runs_pytorch_flash_kernel():
    config, _, _, flash = _mla_pair("sdpa")
    x = _bf16_input(config)
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = flash(x)
        assert flash.backend_used == "sdpa[FLASH_ATTENTION]"
        ops = {event.key for event in prof.key_averages()}
        assert SDPA_FLASH_OP in ops, f"PyTorch's flash SDPA op did not run; ops seen: {sorted(ops)}"

        # The pinned call itself: sdpa_kernel([FLASH_ATTENTION]) would raise if flash could not run.
        q, k, v = flash.project_qkv(x)
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] != v.shape[-1]
        pinned = sdpa_causal_attention(q, k, v, flash.softmax_scale, force_flash=True)
        assert pinned.shape == v.shape
        assert torch.isfinite(pinned).all()
        o_in = pinned.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        torch.testing.assert_close(flash.o_proj(o_in), out, atol=0, rtol=0)


def test_sdpa_flash_pin_is_binding():
    """Where PyTorch's flash backend cannot run (float32), the pinned call raises instead of falling back."""
    q = torch.randn(2, 4, 16, 96, device=DEVICE)
    k = torch.randn(2, 4, 16, 96, device=DEVICE)
    v = torch.randn(2, 4, 16, 64, device=DEVICE)
    with pytest.raises(RuntimeError):
        sdpa_causal_attention(q, k, v, 96 ** -0.5, force_flash=True)


@needs_flash_attn
@pytest.mark.parametrize("attention_backend", ["flash-attn", "auto"])
def test_flash_attn_path_calls_flash_attn_func(monkeypatch, attention_backend):
    import flash_attn

    calls = []
    original = flash_attn.flash_attn_func

    def spy(*args, **kwargs):
        calls.append((tuple(a.shape for a in args[:3]), kwargs.get("causal"), kwargs.get("softmax_scale")))
        return original(*args, **kwargs)

    monkeypatch.setattr(flash_attn, "flash_attn_func", spy)
    config, _, eager, flash = _mla_pair(attention_backend)
    x = _bf16_input(config, seq=96)
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


VOCAB_SIZE = 1000


def _model_config(**changes) -> ExperimentConfig:
    return ExperimentConfig(vocab_size=VOCAB_SIZE, n_layers=2, max_seq_len=128, **changes)


def _train_step(model, config: ExperimentConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB_SIZE, (4, config.max_seq_len + 1), generator=gen).to(DEVICE)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, aux = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss = loss + config.load_balancing_weight * aux
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(
    "model_name,attention_backend",
    [("baseline", "auto"), ("mla", "auto"), ("mla", "sdpa"), ("mla", "eager"),
     pytest.param("mla", "flash-attn", marks=needs_flash_attn)],
)
def test_full_model_bf16_autocast_forward_backward(model_name, attention_backend):
    config = _model_config(attention_backend=attention_backend)
    cls = BaselineAttentionModel if model_name == "baseline" else FlashAttentionModel
    model = cls(config).to(DEVICE)
    loss = _train_step(model, config)
    assert torch.isfinite(loss).item(), f"loss {loss.item()}"
    assert math.log(VOCAB_SIZE) * 0.5 < loss.item() < math.log(VOCAB_SIZE) * 2
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no grad for {name}"
        assert torch.isfinite(p.grad).all().item(), f"non-finite grad for {name}"
    if model_name == "baseline":
        expected = ["sdpa[FLASH_ATTENTION]"]  # pinned to the same kernel family as MLA
    elif attention_backend == "eager":
        expected = ["eager"]
    elif attention_backend == "flash-attn" or (attention_backend == "auto" and flash_attn_installed()):
        expected = ["flash_attn.flash_attn_func"]
    else:
        expected = ["sdpa[FLASH_ATTENTION]"]
    assert model.attention_backends() == expected


# --------------------------------------------------------------------------------------------
# (d) the MoE: every dispatch path agrees with the loop in bf16; the auto path is sync-free where
#     grouped_mm runs fused (sm90+), and says so where it cannot be (sm80/sm89)
# --------------------------------------------------------------------------------------------


def _moe_step(moe: MixtureOfExperts, x: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, aux = moe(x)
        loss = out.float().square().mean() + 0.01 * aux
    loss.backward()


@pytest.mark.parametrize("dispatch", ["grouped_mm", "sorted"])
def test_moe_dispatch_matches_loop_in_bf16_with_empty_experts_and_uneven_groups(dispatch):
    config = ExperimentConfig(vocab_size=VOCAB_SIZE, router_noise_std=0.0, moe_dispatch=dispatch)
    moe = MixtureOfExperts(config)
    _randomize_(moe, seed=3)
    force_uneven_routing(moe, config)
    loop = copy.deepcopy(moe)
    loop.dispatch = "loop"
    moe, loop = moe.to(DEVICE).train(), loop.to(DEVICE).train()
    x = torch.randn(4, 64, config.d_model, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    _moe_step(moe, x1)
    _moe_step(loop, x2)
    expected = {"grouped_mm": (GROUPED_FUSED, GROUPED_PER_GROUP), "sorted": (SORTED_SPLIT,)}[dispatch]
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


def test_moe_auto_dispatch_is_sync_free_on_sm90_and_the_recorded_fallback_elsewhere():
    config = ExperimentConfig(vocab_size=VOCAB_SIZE)
    moe = MixtureOfExperts(config).to(DEVICE).train()
    capability = torch.cuda.get_device_capability()
    planned = moe.plan(torch.device(DEVICE), torch.bfloat16, capability)
    x = torch.randn(4, 128, config.d_model, device=DEVICE, requires_grad=True)
    _moe_step(moe, x)  # warm-up outside the check: lazy CUDA/cuBLAS initialisation is not the code under test
    moe.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    if capability[0] in (9, 10):
        assert planned == GROUPED_FUSED
        try:
            torch.cuda.set_sync_debug_mode("error")
            _moe_step(moe, x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:  # sm80/sm89: grouped_mm would sync per call, so the one-sync sorted split runs, and is recorded
        assert planned == SORTED_SPLIT
        _moe_step(moe, x)
    torch.cuda.synchronize()
    assert moe.dispatch_used == planned
    assert x.grad is not None and torch.isfinite(x.grad).all().item()
