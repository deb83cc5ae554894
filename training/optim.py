"""Optimisers and learning-rate schedule: Muon for the blocks' matrices, AdamW for the rest."""

from __future__ import annotations

import math

import torch
from torch import nn

from experiment_config import ExperimentConfig


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D weight matrices inside the blocks -> Muon, everything else -> AdamW)."""
    muon: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (muon if name.startswith("blocks.") and param.ndim == 2 else adamw).append(param)
    return muon, adamw


def build_optimizers(model: nn.Module, config: ExperimentConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """Muon (Nesterov, momentum 0.95) and AdamW; AdamW runs its fused kernel on CUDA."""
    muon_params, adamw_params = split_parameters(model)
    on_cuda = device.type == "cuda"
    return [
        torch.optim.Muon(muon_params, lr=config.muon_lr, weight_decay=config.weight_decay, momentum=0.95,
                         nesterov=True, adjust_lr_fn="original"),
        torch.optim.AdamW(adamw_params, lr=config.adamw_lr, weight_decay=config.weight_decay, fused=on_cuda or None),
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
