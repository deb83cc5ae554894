"""Baseline arm: standard multi-head attention (fused QKV, RoPE, causal SDPA) in the shared MoE LM."""

from __future__ import annotations

import torch
from torch import nn

from models.attention import CausalSelfAttention, KVCache
from models.attention_ops import (cached_causal_attention, eager_causal_attention, half_precision_cuda,
                                  sdpa_causal_attention)
from models.rope import RotaryEmbedding, apply_rope_half
from models.transformer import MoELanguageModel
from experiment_config import ExperimentConfig


class MultiHeadAttention(CausalSelfAttention):
    """Fused QKV projection, RoPE (base 10000, half-split layout), causal SDPA, output projection.

    On CUDA in bf16/fp16, SDPA is pinned to PyTorch's FlashAttention backend, the same kernel family
    the MLA arm runs, so the two arms time the same kind of kernel. Decoding caches K and V of every
    head (mode "kv").
    """

    cache_modes = ("kv",)

    def __init__(self, config: ExperimentConfig, layer_idx: int = 0, backend: str = "sdpa") -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, config.max_seq_len, config.rope_base)
        self.backend = backend  # "sdpa", or "eager" for the public-style benchmark reference

    def kv_cache_values_per_token(self, mode: str | None = None) -> int:
        """Decoding keeps K and V for every head."""
        return 2 * self.n_heads * self.head_dim

    def score_dims(self) -> tuple[int, int, int]:
        """(heads, q/k head dim, v head dim) for the analytic FLOP count."""
        return self.n_heads, self.head_dim, self.head_dim

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self.rope(seq, start=cache.length if cache is not None else 0)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        if cache is not None:  # stored (batch, tokens, heads, d); attended as (batch, heads, tokens, d) views
            cached = cache.update(k=k.transpose(1, 2), v=v.transpose(1, 2))
            out = cached_causal_attention(q, cached["k"].transpose(1, 2), cached["v"].transpose(1, 2), self.scale)
            self.backend_used = "sdpa[auto], kv cache"
        elif self.backend == "eager":
            out, self.backend_used = eager_causal_attention(q, k, v, self.scale), "eager"
        else:
            flash = half_precision_cuda(q, k, v)
            out = sdpa_causal_attention(q, k, v, self.scale, force_flash=flash)
            self.backend_used = "sdpa[FLASH_ATTENTION]" if flash else "sdpa[auto]"
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class BaselineAttentionModel(MoELanguageModel):
    """The shared MoE language model with standard multi-head attention."""

    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, MultiHeadAttention, seed=seed)
