"""DeepSeek-V3 Multi-head Latent Attention (MLA), eager and FlashAttention-2 variants.

Parameter names are DeepSeek-V3's checkpoint names (q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), so weights interchange with that format.
Per head, the query and key are [nope part | rope part]: the nope part of the key comes from the
compressed latent through kv_b_proj, the rope part is one decoupled rotary key shared by all heads,
rotated in DeepSeek's interleaved pair layout. Both classes hold the same weights; they differ only
in the kernel that computes softmax(q k^T / sqrt(d_nope + d_rope)) v.
"""

from __future__ import annotations

import torch
from torch import nn

from common.hardware import cuda_capability
from config.settings import ExperimentConfig
from models.attention import CausalSelfAttention, KVCache, float32_rms_norm
from models.attention_ops import (
    CACHED_ATTENTION_KERNELS,
    FLASH_ATTN_NOT_INSTALLED,
    cached_causal_attention,
    eager_causal_attention,
    flash_attn_causal_attention,
    flash_attn_unusable,
    half_precision_cuda,
    sdpa_causal_attention,
)
from models.rope import RotaryEmbedding, apply_rope_interleaved

NORM_EPS = 1e-6
LATENT_QUERY_CHUNK = 512  # queries per attention call when prefilling through the latent cache


def device_type(x: torch.Tensor) -> str:
    """The device type a kernel choice was planned for ("cuda", "cpu")."""
    return x.device.type


class DeepseekV3Attention(CausalSelfAttention):
    """MLA with the plain-math (eager) causal attention; the reference the flash class must match."""

    cache_modes: tuple[str, ...] = ("latent", "expanded")

    def __init__(self, config: ExperimentConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.n_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.d_model, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.d_model, self.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.d_model, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.d_model, bias=False)
        self.rope = RotaryEmbedding(self.qk_rope_head_dim, config.max_seq_len, config.rope_base)
        self.backend = "eager"

    def kv_cache_values_per_token(self, mode: str | None = None) -> int:
        """Latent mode keeps only the compressed latent and the shared rotary key; expanded mode keeps
        every head's key (nope + rope) and value, as earlier transformers versions and naive implementations
        cache MLA (transformers 5.24 caches the latent and rotary key, then re-expands them at every step)."""
        if (mode or self.cache_modes[0]) == "latent":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_heads * (self.qk_head_dim + self.v_head_dim)

    def score_dims(self) -> tuple[int, int, int]:
        """(heads, q/k head dim, v head dim) for the analytic FLOP count."""
        return self.num_heads, self.qk_head_dim, self.v_head_dim

    def muon_blocks(self) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """Logical matrices for Muon: kv_a_proj_with_mqa's rows are [latent | rope key]; kv_b_proj's rows are,
        per head, [k_nope | v], so "k_nope" is every head's nope rows and "v" every head's value rows.
        q_proj (or q_a_proj, q_b_proj) and o_proj are one matrix each."""
        device = self.kv_b_proj.weight.device
        kv_a = torch.arange(self.kv_lora_rank + self.qk_rope_head_dim, device=device)
        kv_b = torch.arange(self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), device=device)
        per_head = kv_b.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        return {
            "kv_a_proj_with_mqa.weight": [("latent", kv_a[:self.kv_lora_rank]), ("k_rope", kv_a[self.kv_lora_rank:])],
            "kv_b_proj.weight": [("k_nope", per_head[:, :self.qk_nope_head_dim].reshape(-1)),
                                 ("v", per_head[:, self.qk_nope_head_dim:].reshape(-1))],
        }

    def query(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> q_nope (batch, heads, seq, d_nope), rotated q_rope (batch, heads, seq, d_rope)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(float32_rms_norm(self.q_a_layernorm, self.q_a_proj(x)))
        q = q.view(batch, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        cos, sin = self.rope(seq, start)
        return q_nope, apply_rope_interleaved(q_rope, cos, sin)

    def latent(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> normalised latent (batch, seq, kv_lora_rank), rotated rope key (batch, seq, d_rope):
        everything MLA's keys and values are made of, and all its latent cache keeps."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        cos, sin = self.rope(x.shape[1], start)
        return float32_rms_norm(self.kv_a_layernorm, latent), apply_rope_interleaved(k_rope, cos, sin)

    def project_qkv(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, seq, d) -> q, k (batch, heads, seq, d_nope + d_rope) and v (batch, heads, seq, d_v)."""
        batch, seq, _ = x.shape
        q_nope, q_rope = self.query(x, start)
        latent, k_rope = self.latent(x, start)
        kv = self.kv_b_proj(latent).view(batch, seq, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(-1, self.num_heads, -1, -1)], dim=-1)  # one shared rope key
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.backend_used = "eager"
        return eager_causal_attention(q, k, v, self.softmax_scale)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        if cache is None:
            out = self.attend(*self.project_qkv(x))
        elif cache.mode == "latent":
            out = self.attend_latent_cache(x, cache)
        else:  # expanded: per-head K and V, stored (batch, tokens, heads, d)
            q, k, v = self.project_qkv(x, start=cache.length)
            cached = cache.update(k=k.transpose(1, 2), v=v.transpose(1, 2))
            out = cached_causal_attention(q, cached["k"].transpose(1, 2), cached["v"].transpose(1, 2), self.softmax_scale)
            self.backend_used = f"{CACHED_ATTENTION_KERNELS}, expanded cache"
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.v_head_dim))

    def attend_latent_cache(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attention over a cache of [latent | rope key] per token, with kv_b_proj absorbed (DeepSeek's
        "absorb" inference): no per-head key or value is ever formed.

        The nope query is mapped into latent space by the key half of kv_b_proj, so that q_nope . k_nope
        = (W_k^T q_nope) . latent; the scores add q_rope . k_rope, times the same softmax scale. The
        output stays in latent space and the value half of kv_b_proj maps it to each head. This is
        multi-query attention with one shared head of width kv_lora_rank + d_rope (values: the latent).
        """
        q_nope, q_rope = self.query(x, start=cache.length)
        latent, k_rope = self.latent(x, start=cache.length)
        cached = cache.update(latent_rope=torch.cat([latent, k_rope], dim=-1))["latent_rope"]
        weight = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_k, w_v = weight.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        queries = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_nope, w_k), q_rope], dim=-1)
        keys = cached.unsqueeze(1)  # (batch, 1, tokens, rank + d_rope): one head, broadcast as a view
        values = cached[..., : self.kv_lora_rank].unsqueeze(1)
        # Long prefills go in query chunks: the shared head's scores have no fused kernel here, so each
        # chunk holds a (chunk x keys) score matrix instead of (prompt x keys).
        past = cached.shape[1] - queries.shape[2]
        out_latent = torch.cat([
            cached_causal_attention(queries[:, :, start : start + LATENT_QUERY_CHUNK],
                                    keys[:, :, : past + start + LATENT_QUERY_CHUNK],
                                    values[:, :, : past + start + LATENT_QUERY_CHUNK], self.softmax_scale)
            for start in range(0, queries.shape[2], LATENT_QUERY_CHUNK)], dim=2)
        self.backend_used = f"{CACHED_ATTENTION_KERNELS}, latent cache (absorbed)"
        return torch.einsum("bhtr,hvr->bhtv", out_latent, w_v)


class DeepseekV3FlashAttention2(DeepseekV3Attention):
    """MLA through FlashAttention-2: flash-attn when it can run here (fp16/bf16 on an sm80-sm90 GPU, the
    package importable), else causal SDPA pinned to PyTorch's FlashAttention backend where it applies,
    else plain SDPA (e.g. on CPU)."""

    def __init__(self, config: ExperimentConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.backend = config.attention_backend  # auto | flash-attn | sdpa | eager
        self.flash_attn_unusable: dict[str, str | None] = {}  # device type -> why flash-attn cannot run there; plan()

    def plan(self, device: torch.device) -> str | None:
        """Decide ahead of time whether flash-attn can run on `device` (no CUDA query or import inside
        forward, so a compiled block never traces one); returns why not, or None."""
        reason = flash_attn_unusable(cuda_capability(device))
        self.flash_attn_unusable[device.type] = reason
        return reason

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        flash_ok = half_precision_cuda(q, k, v)
        if self.backend == "eager":
            return super().attend(q, k, v)
        if self.backend == "flash-attn":
            if not flash_ok:
                raise RuntimeError("flash-attn needs fp16/bf16 tensors on a CUDA GPU; use --attention-backend sdpa")
            self.backend_used = "flash_attn.flash_attn_func"
            return flash_attn_causal_attention(q, k, v, self.softmax_scale)
        if not flash_ok:
            self.backend_used = "sdpa[auto]"
            return sdpa_causal_attention(q, k, v, self.softmax_scale)
        why = ""
        if self.backend == "auto":
            planned = device_type(q) in self.flash_attn_unusable  # else a module used on its own: plan now
            reason = self.flash_attn_unusable[device_type(q)] if planned else self.plan(q.device)
            if reason is None:
                self.backend_used = "flash_attn.flash_attn_func"
                return flash_attn_causal_attention(q, k, v, self.softmax_scale)
            if reason != FLASH_ATTN_NOT_INSTALLED:  # not installed is the documented default; anything else is news
                why = f" (flash-attn not used: {reason})"
        self.backend_used = f"sdpa[FLASH_ATTENTION]{why}"
        return sdpa_causal_attention(q, k, v, self.softmax_scale, force_flash=True)
