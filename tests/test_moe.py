"""The grouped MoE dispatch computes exactly what the simple per-expert loop computes."""

from __future__ import annotations

import copy

import pytest
import torch

from models.moe import MixtureOfExperts, load_balancing_loss


@pytest.mark.parametrize("top_k,num_experts", [(2, 4), (1, 3), (3, 8)])
def test_grouped_dispatch_matches_loop_forward_and_backward(config, top_k, num_experts):
    config = config.replace(expert_top_k=top_k, num_experts=num_experts, router_noise_std=0.0)
    grouped = MixtureOfExperts(config)
    for p in grouped.parameters():
        torch.nn.init.normal_(p, std=0.3)
    loop = copy.deepcopy(grouped)
    loop.dispatch = "loop"
    x = torch.randn(3, 7, config.d_model)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_g, aux_g = grouped(x1)
    out_l, aux_l = loop(x2)
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_g, aux_l)
    assert grouped.dispatch_used == "grouped_mm" and loop.dispatch_used == "boolean-mask loop"

    grad = torch.randn_like(out_g)
    ((out_g * grad).sum() + aux_g).backward()
    ((out_l * grad).sum() + aux_l).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for (name, pg), pl in zip(grouped.named_parameters(), loop.parameters(), strict=True):
        if pl.grad is None:  # an expert the loop never called; the grouped path must give it zero gradient
            assert pg.grad is None or torch.count_nonzero(pg.grad) == 0, name
        else:
            torch.testing.assert_close(pg.grad, pl.grad, rtol=1e-5, atol=1e-6, msg=name)


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
        sum(weights[t, j] * moe.experts[ids[t, j]](flat[t]) for j in range(config.expert_top_k)) for t in range(5)
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
