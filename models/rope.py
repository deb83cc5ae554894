"""Rotary position embeddings (RoPE) in the two layouts the experiment uses.

The baseline rotates the two halves of each head (the GPT-NeoX / Llama layout); DeepSeek-V3 rotates
adjacent pairs (x0, x1), (x2, x3), ... (its "interleaved" layout). Both use the same angles.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin of the rotation angles, (positions, dim // 2) in float32: precomputed up to max_seq_len,
    computed on the fly beyond it (decoding past the training length)."""

    inv_freq: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", torch.empty(dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("cos", torch.empty(max_seq_len, dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim // 2, dtype=torch.float32), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Compute the tables (in float32 on the CPU, then copied to the buffers' device) in place: at construction,
        and again when a loader that builds modules on the meta device (transformers' from_pretrained) leaves these
        non-persistent buffers unset."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        angles = torch.outer(torch.arange(len(self.cos), dtype=torch.float32), inv_freq)
        self.inv_freq.copy_(inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start .. start + seq_len - 1."""
        if start + seq_len <= len(self.cos):
            return self.cos[start : start + seq_len], self.sin[start : start + seq_len]
        positions = torch.arange(start, start + seq_len, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq)
        return angles.cos(), angles.sin()


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x[i], x[i + d/2]) pairs; x is (..., seq, d), cos/sin are (seq, d/2)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent (x[2i], x[2i+1]) pairs and keep them interleaved, as DeepSeek-V3's reference does."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).type_as(x)
