"""Baseline arm and its KV-head variants: standard multi-head attention (fused QKV, RoPE, causal SDPA) in the
shared MoE LM, and the same attention with fewer K/V heads: grouped-query (GQA) and multi-query (MQA) attention."""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError
from config.settings import ExperimentConfig
from models.attention import CausalSelfAttention, KVCache
from models.attention_ops import (
    CACHED_ATTENTION_KERNELS,
    cached_causal_attention,
    eager_causal_attention,
    half_precision_cuda,
    sdpa_causal_attention,
)
from models.rope import RotaryEmbedding, apply_rope_half
from models.transformer import MoELanguageModel


class MultiHeadAttention(CausalSelfAttention):
    """Fused QKV projection, RoPE (base 10000, half-split layout), causal SDPA, output projection.

    With n_kv_heads < n_heads (GQA; MQA with one) the fused projection is
    d_model -> (n_heads + 2 * n_kv_heads) * head_dim, laid out [Q of every head | K | V], and query head h
    attends with K/V head h // (n_heads / n_kv_heads), as SDPA's enable_gqa does. With n_kv_heads == n_heads
    (the default) it is exactly the baseline's MHA: same parameters, same shapes, same math.

    On CUDA in bf16/fp16, SDPA is pinned to PyTorch's FlashAttention backend, the same kernel family
    the MLA arm runs, so the arms time the same kind of kernel. Decoding caches K and V of every
    K/V head (mode "kv"), n_kv_heads of them.
    """

    cache_modes: tuple[str, ...] = ("kv",)

    def __init__(self, config: ExperimentConfig, layer_idx: int = 0, backend: str = "sdpa",
                 n_kv_heads: int | None = None) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_heads if n_kv_heads is None else n_kv_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} must be at least 1 and divide n_heads={self.n_heads}")
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, config.max_seq_len, config.rope_base)
        self.backend = backend  # "sdpa", or "eager" for the public-style benchmark reference

    @property
    def grouped(self) -> bool:
        """True when several query heads share one K/V head (GQA, MQA)."""
        return self.n_kv_heads != self.n_heads

    def kv_cache_values_per_token(self, mode: str | None = None) -> int:
        """Decoding keeps K and V for every K/V head."""
        return 2 * self.n_kv_heads * self.head_dim

    def score_dims(self) -> tuple[int, int, int]:
        """(heads, q/k head dim, v head dim) for the analytic FLOP count (every query head scores every key)."""
        return self.n_heads, self.head_dim, self.head_dim

    def muon_blocks(self) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """qkv_proj's rows are [Q of every head | K | V]: three logical matrices for Muon."""
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        rows = torch.arange(q_width + 2 * kv_width, device=self.qkv_proj.weight.device)
        return {"qkv_proj.weight": [("q", rows[:q_width]), ("k", rows[q_width:q_width + kv_width]),
                                    ("v", rows[q_width + kv_width:])]}

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> q (batch, heads, seq, head_dim), k and v (batch, kv heads, seq, head_dim), before
        RoPE: the place a variant changes what the heads are (e.g. a norm on q and k)."""
        batch, seq, _ = x.shape
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((q_width, kv_width, kv_width), dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.heads(x)
        cos, sin = self.rope(seq, start=cache.length if cache is not None else 0)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        if cache is not None:  # stored (batch, tokens, kv heads, d); attended as (batch, kv heads, tokens, d) views
            cached = cache.update(k=k.transpose(1, 2), v=v.transpose(1, 2))
            out = cached_causal_attention(q, cached["k"].transpose(1, 2), cached["v"].transpose(1, 2), self.scale)
            self.backend_used = f"{CACHED_ATTENTION_KERNELS}, kv cache"
        elif self.backend == "eager":
            groups = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out, self.backend_used = eager_causal_attention(q, k, v, self.scale), "eager"
        else:
            flash = half_precision_cuda(q, k, v)
            out = sdpa_causal_attention(q, k, v, self.scale, force_flash=flash, enable_gqa=self.grouped)
            self.backend_used = "sdpa[FLASH_ATTENTION]" if flash else "sdpa[auto]"
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class GroupedQueryAttention(MultiHeadAttention):
    """Grouped-query attention (GQA): the baseline's attention with config.gqa_kv_heads K/V heads."""

    def __init__(self, config: ExperimentConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx, n_kv_heads=config.gqa_kv_heads)


class MultiQueryAttention(MultiHeadAttention):
    """Multi-query attention (MQA): the baseline's attention with one K/V head shared by every query head."""

    def __init__(self, config: ExperimentConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx, n_kv_heads=1)


class BaselineAttentionModel(MoELanguageModel):
    """The shared MoE language model with standard multi-head attention (the registry's "baseline" arm)."""

    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, MultiHeadAttention, seed=seed)


class GroupedQueryAttentionModel(MoELanguageModel):
    """The shared MoE language model with grouped-query attention: config.gqa_kv_heads K/V heads ("gqa")."""

    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, GroupedQueryAttention, seed=seed)


class MultiQueryAttentionModel(MoELanguageModel):
    """The shared MoE language model with multi-query attention: one K/V head shared by every query head ("mqa")."""

    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, MultiQueryAttention, seed=seed)
