"""Top-k Mixture of Experts: 8 SiLU experts, top-2 routing, Switch-style load-balancing loss.

The fast path groups tokens by expert once (a stable sort) and runs all experts with two grouped
matrix products, with no host-device synchronisation where grouped_mm runs fused. Where it would
not (see `plan_dispatch`) a sorted split with one host sync per layer takes its place. The
per-expert boolean-mask loop of the public version is kept as the reference; tests check that
every path computes the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.hardware import cuda_capability
from config.settings import ExperimentConfig


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


def load_balancing_loss(router_probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer loss E * sum_e f_e * P_e; equals 1 when routing is perfectly balanced.

    `counts`: the assignments per expert that f_e is taken from, when they are not this batch's own
    (under data-parallel, summed over every rank's slice of the global batch)."""
    if counts is None:
        counts = expert_counts(expert_ids, num_experts)
    fraction_routed = counts.to(router_probs.dtype) / counts.sum()
    return num_experts * (fraction_routed * router_probs.mean(dim=0)).sum()


# F.grouped_mm in current PyTorch; some earlier releases expose the same op only as torch._grouped_mm.
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

# What each dispatch path is called in the results (MixtureOfExperts.dispatch_used).
GROUPED_FUSED = "grouped_mm (fused kernel, sm90+)"
GROUPED_PER_GROUP = "grouped_mm (per-group fallback kernel, a host sync per call)"
GROUPED_CPU = "grouped_mm (CPU kernel)"
SORTED_SPLIT = "sorted split (one host sync per layer)"
MASK_LOOP = "boolean-mask loop"


def grouped_mm_strides_ok(dtype: torch.dtype, *dims: int) -> bool:
    """grouped_mm needs every non-unit stride to be a multiple of 16 bytes (e.g. 8 bf16 values)."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(dim * size % 16 == 0 for dim in dims)


def plan_dispatch(requested: str, device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int,
                  capability: tuple[int, int] | None) -> str:
    """The dispatch path a MoE layer will run, given what was asked for and what the hardware does.

    PyTorch's grouped_mm runs one fused kernel only on CUDA compute capability 9.x/10.x with bf16
    operands; on other cards (A100 sm80, RTX 4090 sm89) it copies the group offsets to the host and
    loops one matmul per group, a host sync on every call (forward and backward). There `auto` takes
    the sorted split instead, which syncs once per layer forward. On Blackwell (sm100+) PyTorch has open
    bugs in the fused kernel (wrong gradients for empty experts; NaN backward on sm103), so `auto` takes
    the safe sorted split there too until a test on such a card passes (`grouped_mm`, asked for, runs it).
    Shapes that break grouped_mm's 16-byte stride rule, or a dtype it lacks, fall back to the sorted
    split instead of crashing.
    """
    if requested == "loop":
        return MASK_LOOP
    if requested == "sorted":
        return SORTED_SPLIT
    usable = grouped_mm is not None and grouped_mm_strides_ok(dtype, d_model, d_ff)
    if device.type == "cuda":
        major = capability[0] if capability is not None else None
        # the fused kernel in bf16: on sm90, and on sm100/sm103 only when asked for (grouped_mm)
        fused = dtype == torch.bfloat16 and (major == 9 or major == 10 and requested == "grouped_mm")
        usable = usable and dtype in (torch.bfloat16, torch.float16, torch.float32)
        if usable and fused:
            return GROUPED_FUSED
        return GROUPED_PER_GROUP if usable and requested == "grouped_mm" else SORTED_SPLIT
    usable = usable and dtype in (torch.bfloat16, torch.float32)
    return GROUPED_CPU if usable else SORTED_SPLIT


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype when autocast is on for x's device, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class MixtureOfExperts(nn.Module):
    """Routes each token to `expert_top_k` of `num_experts` experts and mixes their outputs."""

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.expert_top_k
        self.d_model, self.d_ff = config.d_model, config.d_ff
        self.router = TopKRouter(config)
        self.experts = nn.ModuleList(Expert(config.d_model, config.d_ff) for _ in range(config.num_experts))
        self.dispatch = config.moe_dispatch  # what was asked for: auto | grouped_mm | sorted | loop
        self.planned: dict[tuple[str, str, torch.dtype], str] = {}  # (dispatch, device, dtype) -> path; plan()
        self.dispatch_used: str | None = None  # what really ran in the last forward pass
        # Data-parallel training sets this to a sum over ranks, so that f_e in the load-balancing loss is the
        # global batch's, as in one process (each rank's P_e is averaged with the gradients); never in eval.
        self.expert_count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def plan(self, device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None) -> str:
        """Fix the path for this device and compute dtype ahead of time (no CUDA query inside forward)."""
        path = plan_dispatch(self.dispatch, device, dtype, self.d_model, self.d_ff, capability)
        self.planned[(self.dispatch, device.type, dtype)] = path
        return path

    def _path(self, device: torch.device, dtype: torch.dtype) -> str:
        path = self.planned.get((self.dispatch, device.type, dtype))
        if path is None:  # not planned ahead (e.g. a layer used on its own): plan now
            path = self.plan(device, dtype, cuda_capability(device))
        return path

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> (output of the same shape, load-balancing loss)."""
        flat = x.reshape(-1, x.shape[-1])
        weights, expert_ids, probs = self.router(flat)
        path = self._path(flat.device, autocast_dtype(flat))
        if path == MASK_LOOP:
            out = self._loop_dispatch(flat, weights, expert_ids)
        elif path == SORTED_SPLIT:
            out = self._sorted_split_dispatch(flat, weights, expert_ids)
        else:
            out = self._grouped_dispatch(flat, weights, expert_ids)
        self.dispatch_used = path
        counts = None
        if self.training and self.expert_count_reducer is not None:
            counts = self.expert_count_reducer(expert_counts(expert_ids, self.num_experts))
        return out.view_as(x), load_balancing_loss(probs, expert_ids, self.num_experts, counts)

    def _grouped_dispatch(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Sort (token, slot) pairs by expert once, run every expert as one grouped GEMM, unsort."""
        assert grouped_mm is not None  # plan_dispatch chose this path only where it exists
        compute_dtype = autocast_dtype(flat)
        tokens = flat.to(compute_dtype)
        order = expert_ids.flatten().argsort(stable=True)
        offsets = expert_counts(expert_ids, self.num_experts).cumsum(0).to(torch.int32)
        routed = tokens[order // self.top_k]
        w_up = torch.stack([expert.up.weight for expert in self._experts()]).to(compute_dtype)
        w_down = torch.stack([expert.down.weight for expert in self._experts()]).to(compute_dtype)
        hidden = F.silu(grouped_mm(routed, w_up.transpose(-2, -1), offs=offsets))
        expert_out = grouped_mm(hidden, w_down.transpose(-2, -1), offs=offsets)
        return self._unsort_and_mix(expert_out, order, weights, flat)

    # Under torch.compile the two data-dependent paths run eagerly, on purpose: traced, every new set of expert
    # sizes (a size of 0 or 1 in particular) would recompile, inside the timed loop; here the graph breaks at
    # the call, and the frames around it see only fixed shapes. The grouped path compiles whole.
    @torch._disable_dynamo  # torch.compiler.disable, imported at the first call: not a second at every start
    def _sorted_split_dispatch(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """One sort, one split by expert (a single host sync to read the group sizes), one matmul pair per expert."""
        order = expert_ids.flatten().argsort(stable=True)
        counts = expert_counts(expert_ids, self.num_experts).tolist()
        routed = flat[order // self.top_k].split(counts)
        expert_out = torch.cat([expert(chunk) for expert, chunk in zip(self._experts(), routed, strict=True)])
        return self._unsort_and_mix(expert_out, order, weights, flat)

    def _experts(self) -> list[Expert]:
        return [expert for expert in self.experts if isinstance(expert, Expert)]

    def _unsort_and_mix(self, expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                        flat: torch.Tensor) -> torch.Tensor:
        """Put expert outputs back in (token, slot) order and sum each token's k outputs by router weight."""
        unsorted = expert_out[order.argsort()].view(-1, self.top_k, flat.shape[-1])
        return (unsorted * weights.unsqueeze(-1).to(unsorted.dtype)).sum(dim=1).to(flat.dtype)

    @torch._disable_dynamo  # torch.compiler.disable, imported at the first call: not a second at every start
    def _loop_dispatch(self, flat: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The public version's style: a boolean mask and a gather per expert, syncing on each."""
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self._experts()):
            token_idx, slot = (expert_ids == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            contribution = expert(flat[token_idx]) * weights[token_idx, slot].unsqueeze(-1).to(flat.dtype)
            out = out.index_add(0, token_idx, contribution.to(out.dtype))
        return out
