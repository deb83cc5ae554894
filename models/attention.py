"""What the shared LM needs from an attention module; each arm's attention subclasses this.

The LM and the cost accounting only see this interface, so an arm is one small module passed in,
and mypy checks every use of it.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalSelfAttention(nn.Module):
    """(batch, seq, d_model) -> (batch, seq, d_model), causal; records the kernel that really ran."""

    def __init__(self) -> None:
        super().__init__()
        self.backend = "auto"  # which kernel to use; "eager" selects the plain-math reference
        self.backend_used: str | None = None  # the kernel that ran in the last forward pass

    def kv_cache_values_per_token(self) -> int:
        """Values a decoder keeps per token in this layer's KV cache."""
        raise NotImplementedError

    def score_dims(self) -> tuple[int, int, int]:
        """(heads, q/k head dim, v head dim) for the analytic FLOP count."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
