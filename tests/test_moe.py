"""Every MoE dispatch path computes exactly what the simple per-expert loop computes, and the path
chosen for each card is the one the hardware runs well."""

from __future__ import annotations

import copy

import pytest
import torch

from models.moe import (
    GROUPED_CPU,
    GROUPED_FUSED,
    GROUPED_PER_GROUP,
    MASK_LOOP,
    SORTED_SPLIT,
    MixtureOfExperts,
    expert_counts,
    load_balancing_loss,
    plan_dispatch,
)
from tests.moe_routing import force_uneven_routing


def _pair(config, dispatch: str, uneven: bool) -> tuple[MixtureOfExperts, MixtureOfExperts]:
    """(the layer with `dispatch`, an identical copy running the reference mask loop)."""
    moe = MixtureOfExperts(config.replace(moe_dispatch=dispatch))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if uneven:
        force_uneven_routing(moe, config)
    loop = copy.deepcopy(moe)
    loop.dispatch = "loop"
    return moe, loop


def _assert_same_forward_and_backward(moe: MixtureOfExperts, loop: MixtureOfExperts, x: torch.Tensor,
                                      rtol: float = 1e-5, atol: float = 1e-6) -> None:
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_m, aux_m = moe(x1)
    out_l, aux_l = loop(x2)
    torch.testing.assert_close(out_m, out_l, rtol=rtol, atol=atol)
    torch.testing.assert_close(aux_m, aux_l)
    grad = torch.randn_like(out_m)
    ((out_m * grad).sum() + aux_m).backward()
    ((out_l * grad).sum() + aux_l).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=atol)
    for (name, pm), pl in zip(moe.named_parameters(), loop.parameters(), strict=True):
        if pl.grad is None:  # an expert the loop never called; the other path must give it zero gradient
            assert pm.grad is None or torch.count_nonzero(pm.grad) == 0, name
        else:
            torch.testing.assert_close(pm.grad, pl.grad, rtol=rtol, atol=atol, msg=name)


def _assert_same_in_bf16(moe: MixtureOfExperts, loop: MixtureOfExperts, x: torch.Tensor) -> None:
    """Both layers' outputs under CPU bf16 autocast agree within bf16 tolerance."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = moe(x)
        expected, _ = loop(x)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dispatch,expected", [("grouped_mm", GROUPED_CPU), ("sorted", SORTED_SPLIT)])
@pytest.mark.parametrize("top_k,num_experts", [(2, 4), (1, 3), (3, 8)])
def test_dispatch_matches_loop_forward_and_backward(config, dispatch, expected, top_k, num_experts):
    config = config.replace(expert_top_k=top_k, num_experts=num_experts, router_noise_std=0.0)
    moe, loop = _pair(config, dispatch, uneven=False)
    _assert_same_forward_and_backward(moe, loop, torch.randn(3, 7, config.d_model))
    assert moe.dispatch_used == expected and loop.dispatch_used == MASK_LOOP


@pytest.mark.parametrize("dispatch", ["grouped_mm", "sorted"])
def test_empty_experts_and_uneven_groups_match_loop(config, dispatch):
    config = config.replace(expert_top_k=2, num_experts=8, router_noise_std=0.0)
    moe, loop = _pair(config, dispatch, uneven=True)
    x = torch.randn(2, 9, config.d_model)
    _, ids, _ = moe.router(x.view(-1, config.d_model))
    counts = expert_counts(ids, config.num_experts)
    assert counts[0] == 0 and (counts == 0).sum() >= 2 and counts.max() >= 2 * counts[counts > 0].min()
    _assert_same_forward_and_backward(moe, loop, x)
    assert all(p.grad is None for p in loop.experts[0].parameters())  # the loop's empty-expert branch ran


def test_bf16_grouped_mm_matches_loop_on_cpu(config):
    """The bf16 grouped GEMM that CUDA runs, here on the CPU under the same autocast."""
    config = config.replace(expert_top_k=2, num_experts=8, router_noise_std=0.0)
    moe, loop = _pair(config, "auto", uneven=True)
    _assert_same_in_bf16(moe, loop, torch.randn(2, 9, config.d_model))
    assert moe.dispatch_used == GROUPED_CPU


@pytest.mark.parametrize("capability,dtype,requested,expected", [
    ((9, 0), torch.bfloat16, "auto", GROUPED_FUSED),  # H100 / H200
    ((10, 0), torch.bfloat16, "auto", SORTED_SPLIT),  # B200: PyTorch's fused kernel has open bugs there; the safe path
    ((10, 3), torch.bfloat16, "auto", SORTED_SPLIT),  # B300 (sm103: NaN backward)
    ((12, 0), torch.bfloat16, "auto", SORTED_SPLIT),  # RTX 50xx: no fused kernel
    ((10, 0), torch.bfloat16, "grouped_mm", GROUPED_FUSED),  # asked for on sm100: the fused kernel runs
    ((8, 9), torch.bfloat16, "auto", SORTED_SPLIT),  # RTX 4090: grouped_mm would loop with a host sync per call
    ((8, 0), torch.bfloat16, "auto", SORTED_SPLIT),  # A100
    ((8, 9), torch.bfloat16, "grouped_mm", GROUPED_PER_GROUP),  # asked for: runs, and says what it is
    ((9, 0), torch.float32, "auto", SORTED_SPLIT),  # fused kernel is bf16-only
    ((9, 0), torch.bfloat16, "sorted", SORTED_SPLIT),
    ((9, 0), torch.bfloat16, "loop", MASK_LOOP),
])
def test_dispatch_plan_per_card(capability, dtype, requested, expected):
    assert plan_dispatch(requested, torch.device("cuda"), dtype, 256, 1024, capability) == expected


def test_dims_that_break_the_16_byte_stride_rule_take_the_sorted_split(config):
    """d_ff=100 in bf16 is 200 bytes per row: grouped_mm would raise, so the layer must not call it."""
    assert plan_dispatch("auto", torch.device("cuda"), torch.bfloat16, 256, 100, (9, 0)) == SORTED_SPLIT
    assert plan_dispatch("grouped_mm", torch.device("cpu"), torch.bfloat16, 32, 100, None) == SORTED_SPLIT
    config = config.replace(d_ff=100, router_noise_std=0.0)
    moe, loop = _pair(config, "grouped_mm", uneven=False)
    _assert_same_in_bf16(moe, loop, torch.randn(2, 5, config.d_model))
    assert moe.dispatch_used == SORTED_SPLIT


def test_each_token_mixes_exactly_its_top_k_experts(config):
    """Against an independent dense computation: sum over chosen experts of weight * expert(x)."""
    config = config.replace(router_noise_std=0.0)
    moe = MixtureOfExperts(config).eval()
    x = torch.randn(1, 5, config.d_model)
    out, _ = moe(x)
    flat = x.view(-1, config.d_model)
    logits = moe.router.gate(flat)
    top_logits, ids = logits.topk(config.expert_top_k, dim=-1)
    weights = top_logits.softmax(-1)
    expected = torch.stack([
        sum(weights[t, j] * moe.experts[int(ids[t, j])](flat[t]) for j in range(config.expert_top_k)) for t in range(5)
    ])
    torch.testing.assert_close(out.view(-1, config.d_model), expected, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not():
    probs = torch.full((8, 4), 0.25)
    balanced_ids = torch.arange(8).remainder(4).view(8, 1)
    assert load_balancing_loss(probs, balanced_ids, 4).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    skewed_ids = torch.zeros(8, 1, dtype=torch.long)
    assert load_balancing_loss(skewed_probs, skewed_ids, 4).item() == pytest.approx(4 * 0.7)


def test_router_noise_only_while_training(config):
    moe = MixtureOfExperts(config.replace(router_noise_std=5.0))
    x = torch.randn(64, config.d_model)
    moe.eval()
    assert torch.equal(moe.router(x)[1], moe.router(x)[1])
    moe.train()
    assert not torch.equal(moe.router(x)[1], moe.router(x)[1])
