"""A router that forces uneven expert groups with empty experts, for tests of every MoE dispatch path."""

from __future__ import annotations

import torch

from config.settings import ExperimentConfig
from models.moe import MixtureOfExperts, TopKRouter


class UnevenRouter(TopKRouter):
    """Token t goes to experts 1 + t % 2 and 3 + t^2 mod (E - 3): expert 0 never gets a token, some
    others get none either, and group sizes differ widely. Weights still come from the gate, so its
    gradient is tested too. Needs top_k = 2 and at least 4 experts."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate(x).float()
        num_experts = logits.shape[-1]
        t = torch.arange(x.shape[0], device=x.device)
        expert_ids = torch.stack([1 + t % 2, 3 + (t * t) % (num_experts - 3)], dim=-1)
        return logits.gather(-1, expert_ids).softmax(dim=-1), expert_ids, logits.softmax(dim=-1)


def force_uneven_routing(moe: MixtureOfExperts, config: ExperimentConfig) -> None:
    """Swap in UnevenRouter, keeping the gate's weights, device and dtype."""
    assert moe.top_k == 2 and moe.num_experts >= 4
    router = UnevenRouter(config).to(moe.router.gate.weight.device, moe.router.gate.weight.dtype)
    router.load_state_dict(moe.router.state_dict())
    moe.router = router
