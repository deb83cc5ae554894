"""Optimisers and learning-rate schedule: per-matrix Muon for the blocks' matrices, AdamW for the rest.

Muon orthogonalises each matrix it is given and scales its LR by sqrt(max(1, rows/cols)). The arms pack
their attention weights differently (the baseline's fused `qkv_proj`; MLA's `kv_a_proj_with_mqa` =
[latent | rope key] and `kv_b_proj` = per head [k_nope | v]), so handing Muon the raw parameters would
treat a fused Q/K/V as one matrix in one arm and separate matrices in another. `BlockMuon` instead runs
Muon on every *logical* matrix (each attention module declares them in `muon_blocks()`): Q, K, V, O;
MLA's q_a, q_b, latent, rope key, k_nope, v, o; the router and every expert matrix. Every block gets the
same update rule and the same LR rule. The model's parameters and its fused forward pass are unchanged.

Weight decay: Muon's matrices decay with config.weight_decay; the AdamW parameters (the embedding, which
is also the tied output head, every RMSNorm gain, including MLA's two latent norms, and any bias) get
weight_decay=0, in every arm. `--optimizer adamw` (config.optimizer) is an AdamW-only control run with
the same two decay groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, overload

import torch
from torch import nn

from experiment_config import ExperimentConfig
from models.attention import CausalSelfAttention


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D weight matrices inside the blocks -> Muon, everything else -> AdamW without weight decay)."""
    muon: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (muon if name.startswith("blocks.") and param.ndim == 2 else adamw).append(param)
    return muon, adamw


@dataclass(frozen=True)
class MatrixBlock:
    """One logical matrix: the rows `rows` of the model parameter `source` (all of it when rows is None)."""

    name: str  # e.g. "blocks.0.attention.qkv_proj.weight[k]"; a whole matrix is named as its parameter
    source: nn.Parameter
    rows: torch.Tensor | None  # int64 row indices on source's device; None: the whole matrix

    @property
    def shape(self) -> torch.Size:
        if self.rows is None:
            return self.source.shape
        return torch.Size((self.rows.numel(), *self.source.shape[1:]))


def matrix_blocks(model: nn.Module) -> list[MatrixBlock]:
    """Every Muon matrix of `model` (see split_parameters) split into its logical blocks, as each attention
    module declares them in muon_blocks(); a matrix no module splits is one block."""
    declared: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            for attr, blocks in module.muon_blocks().items():
                declared[id(module.get_parameter(attr))] = blocks
    matrices = {id(p) for p in split_parameters(model)[0]}
    result: list[MatrixBlock] = []
    for name, param in model.named_parameters():
        if id(param) not in matrices:
            continue
        blocks = declared.pop(id(param), [])
        if not blocks:
            result.append(MatrixBlock(name, param, None))
            continue
        if sum(rows.numel() for _, rows in blocks) != param.shape[0]:
            raise ValueError(f"{name}: the blocks {[b for b, _ in blocks]} do not cover its {param.shape[0]} rows")
        result.extend(MatrixBlock(f"{name}[{block}]", param, rows.to(param.device)) for block, rows in blocks)
    if declared:
        raise ValueError("muon_blocks() names a parameter that is not a Muon matrix")
    return result


class BlockMuon(torch.optim.Muon):
    """torch.optim.Muon run on logical blocks of fused matrices.

    A whole-matrix block is handed to Muon as the model parameter itself. For a block of a fused
    parameter, a block parameter holding a copy of its rows is created once and handed to Muon instead;
    each step() gathers the fused parameter's current rows and gradient rows into it (index_select),
    runs Muon's own step, and scatters the updated rows back (index_copy_). So every block is
    orthogonalised on its own, with its own momentum buffer (kept across steps), LR scaled by
    sqrt(max(1, block rows / cols)) and decoupled weight decay, exactly as Muon treats a separate
    matrix. No host syncs: the index tensors live on the parameters' device.

    param_groups hold the block parameters, so LR schedulers work as with Muon; zero_grad() also clears
    the fused parameters' gradients.
    """

    def __init__(self, blocks: Sequence[MatrixBlock], **muon_kwargs: Any) -> None:
        self.blocks: list[tuple[MatrixBlock, nn.Parameter]] = []
        for block in blocks:
            if block.rows is None:
                param = block.source
            else:
                param = nn.Parameter(block.source.detach().index_select(0, block.rows).clone())
            self.blocks.append((block, param))
        self._fused = [(block, param) for block, param in self.blocks if block.rows is not None]
        self._fused_sources = list({id(b.source): b.source for b, _ in self._fused}.values())
        super().__init__([param for _, param in self.blocks], **muon_kwargs)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped: list[tuple[MatrixBlock, nn.Parameter]] = []
        for block, param in self._fused:
            grad = block.source.grad
            assert block.rows is not None
            if grad is None:
                param.grad = None
                continue
            param.copy_(block.source.index_select(0, block.rows))
            param.grad = grad.index_select(0, block.rows)
            stepped.append((block, param))
        super().step()
        for block, param in stepped:
            assert block.rows is not None
            block.source.index_copy_(0, block.rows, param)
            param.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for source in self._fused_sources:
            if set_to_none:
                source.grad = None
            elif source.grad is not None:
                source.grad.detach_().zero_()


def build_optimizers(model: nn.Module, config: ExperimentConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """config.optimizer "muon": [BlockMuon (Nesterov, momentum 0.95, lr muon_lr, weight decay) on every
    logical matrix of the blocks, AdamW (lr adamw_lr, no weight decay) on the embedding/tied head, norm
    gains and biases]. "adamw": [one AdamW at adamw_lr with two groups: the block matrices with weight
    decay, the rest without] (AdamW is elementwise, so fused or split matrices are the same to it).
    AdamW runs its fused kernel on CUDA."""
    matrices, others = split_parameters(model)
    fused = device.type == "cuda" or None
    if config.optimizer == "adamw":
        groups: list[dict[str, Any]] = [{"params": matrices}, {"params": others, "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=config.adamw_lr, weight_decay=config.weight_decay, fused=fused)]
    return [
        BlockMuon(matrix_blocks(model), lr=config.muon_lr, weight_decay=config.weight_decay, momentum=0.95,
                  nesterov=True, adjust_lr_fn="original"),
        torch.optim.AdamW(others, lr=config.adamw_lr, weight_decay=0.0, fused=fused),
    ]


def lr_factor(step: int, config: ExperimentConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    The cosine reaches min_lr_ratio exactly at the last step, max_steps - 1.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, config.max_steps - 1 - warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_schedulers(optimizers: list[torch.optim.Optimizer], config: ExperimentConfig) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer, stepped once per optimizer step."""
    return [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, config)) for opt in optimizers]
