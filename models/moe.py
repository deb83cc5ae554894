"""Top-k Mixture of Experts: 8 SiLU experts, top-2 routing, Switch-style load-balancing loss.

The fast path groups tokens by expert once (a stable sort) and runs all experts with two grouped
matrix products, with no host-device synchronisation. `reference_forward` is the simple per-expert
boolean-mask loop of the public version; a test checks that both compute the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiment_config import ExperimentConfig


class TopKRouter(nn.Module):
    """Scores experts per token, keeps the top k and softmaxes over the chosen logits."""

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__()
        self.top_k = config.expert_top_k
        self.noise_std = config.router_noise_std
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, d) -> weights (tokens, k), expert ids (tokens, k), all-expert probs (tokens, E)."""
        logits = self.gate(x).float()
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, top_ids = logits.topk(self.top_k, dim=-1)
        return top_logits.softmax(dim=-1), top_ids, logits.softmax(dim=-1)


class Expert(nn.Module):
    """One feed-forward expert: up projection, SiLU, down projection."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert; a fixed-size scatter, unlike torch.bincount, which syncs on CUDA to size its output."""
    flat = expert_ids.flatten()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(router_probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer loss E * sum_e f_e * P_e; equals 1 when routing is perfectly balanced."""
    counts = expert_counts(expert_ids, num_experts).to(router_probs.dtype)
    fraction_routed = counts / expert_ids.numel()
    return num_experts * (fraction_routed * router_probs.mean(dim=0)).sum()


# F.grouped_mm in current PyTorch; some earlier releases expose the same op only as torch._grouped_mm.
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if grouped_mm is None:
        return False
    return x.dtype == torch.bfloat16 if x.is_cuda else x.dtype == torch.float32


class MixtureOfExperts(nn.Module):
    """Routes each token to `expert_top_k` of `num_experts` experts and mixes their outputs."""

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.expert_top_k
        self.router = TopKRouter(config)
        self.experts = nn.ModuleList(Expert(config.d_model, config.d_ff) for _ in range(config.num_experts))
        self.dispatch = "grouped"  # "grouped" (fast path) or "loop" (public-style reference)
        self.dispatch_used: str | None = None  # what really ran in the last forward pass

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> (output of the same shape, load-balancing loss)."""
        flat = x.reshape(-1, x.shape[-1])
        weights, expert_ids, probs = self.router(flat)
        if self.dispatch == "loop":
            out = self._loop_dispatch(flat, weights, expert_ids)
        else:
            out = self._grouped_dispatch(flat, weights, expert_ids)
        return out.view_as(x), load_balancing_loss(probs, expert_ids, self.num_experts)

    def _grouped_dispatch(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Sort (token, slot) pairs by expert once, run every expert as one grouped GEMM, unsort."""
        compute_dtype = torch.get_autocast_dtype("cuda") if flat.is_cuda and torch.is_autocast_enabled("cuda") else flat.dtype
        tokens = flat.to(compute_dtype)
        if not _grouped_mm_supported(tokens):
            return self._sorted_loop_dispatch(flat, weights, expert_ids)
        self.dispatch_used = "grouped_mm"
        order = expert_ids.flatten().argsort(stable=True)
        offsets = expert_counts(expert_ids, self.num_experts).cumsum(0).to(torch.int32)
        routed = tokens[order // self.top_k]
        w_up = torch.stack([e.up.weight for e in self.experts]).to(compute_dtype)
        w_down = torch.stack([e.down.weight for e in self.experts]).to(compute_dtype)
        hidden = F.silu(grouped_mm(routed, w_up.transpose(-2, -1), offs=offsets))
        expert_out = grouped_mm(hidden, w_down.transpose(-2, -1), offs=offsets)
        return self._unsort_and_mix(expert_out, order, weights, flat)

    def _sorted_loop_dispatch(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Fallback where grouped GEMMs are unavailable: one sort, one split (a single host sync)."""
        self.dispatch_used = "sorted split (grouped_mm unavailable for this dtype/device)"
        order = expert_ids.flatten().argsort(stable=True)
        counts = expert_counts(expert_ids, self.num_experts).tolist()
        routed = flat[order // self.top_k].split(counts)
        expert_out = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, routed, strict=True)])
        return self._unsort_and_mix(expert_out, order, weights, flat)

    def _unsort_and_mix(self, expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                        flat: torch.Tensor) -> torch.Tensor:
        """Put expert outputs back in (token, slot) order and sum each token's k outputs by router weight."""
        unsorted = expert_out[order.argsort()].view(-1, self.top_k, flat.shape[-1])
        return (unsorted * weights.unsqueeze(-1).to(unsorted.dtype)).sum(dim=1).to(flat.dtype)

    def _loop_dispatch(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The public version's style: a boolean mask and a gather per expert, syncing on each."""
        self.dispatch_used = "boolean-mask loop"
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (expert_ids == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            contribution = expert(flat[token_idx]) * weights[token_idx, slot].unsqueeze(-1).to(flat.dtype)
            out = out.index_add(0, token_idx, contribution.to(out.dtype))
        return out
