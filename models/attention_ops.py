"""Causal attention kernels shared by both attention modules.

Each function takes q, k of shape (batch, heads, seq, d_qk) and v of shape (batch, heads, seq, d_v)
and returns (batch, heads, seq, d_v). The eager one is the plain-math reference; the others call
fused kernels. Which one really ran is reported by the caller, never assumed.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"


def flash_attn_installed() -> bool:
    """True when the flash-attn package can be imported (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def half_precision_cuda(*tensors: torch.Tensor) -> bool:
    """FlashAttention kernels need fp16/bf16 tensors on a CUDA device."""
    return all(t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, written out; the reference the kernels must match."""
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    future = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).triu(1 + seq_k - seq_q)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def _pad_last_dim(v: torch.Tensor, size: int) -> torch.Tensor:
    return v if v.shape[-1] == size else F.pad(v, (0, size - v.shape[-1]))


def sdpa_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, force_flash: bool = False
) -> torch.Tensor:
    """Causal SDPA; with force_flash, only PyTorch's FlashAttention backend may run (V padded to d_qk)."""
    if not force_flash:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    d_v = v.shape[-1]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, _pad_last_dim(v, q.shape[-1]), is_causal=True, scale=scale)
    return out[..., :d_v]


def cached_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA for new queries at the end of a longer key sequence (decoding with a cache).

    The queries are the last q_len positions of the k_len keys, so the mask is aligned bottom-right;
    SDPA's is_causal aligns top-left, right only when q_len == k_len. One new token sees every key.
    k and v may have fewer heads than q (one shared latent head in MLA's latent mode): they are
    broadcast as views, never copied per head.
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:
        shape = (q.shape[0], q.shape[1], k_len)
        k, v = k.expand(*shape, k.shape[-1]), v.expand(*shape, v.shape[-1])
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def flash_attn_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """flash_attn.flash_attn_func(causal=True); it wants (batch, seq, heads, d) and equal head dims."""
    from flash_attn import flash_attn_func  # optional dependency, imported only when used

    d_v = v.shape[-1]
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), _pad_last_dim(v, q.shape[-1]).transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=True,
    )
    return out[..., :d_v].transpose(1, 2)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
