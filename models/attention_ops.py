"""Causal attention kernels shared by every attention module.

Each function takes q, k of shape (batch, heads, seq, d_qk) and v of shape (batch, heads, seq, d_v)
and returns (batch, heads, seq, d_v). The eager one is the plain-math reference; the others call
fused kernels. Which one really ran is reported by the caller, never assumed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"
FLASH_ATTN_NOT_INSTALLED = "flash-attn is not installed"

# Prefill and decode through a cache: SDPA may pick among these, in PyTorch's order (flash first where its
# constraints hold, e.g. equal head dims and no mask; memory-efficient for masks and MLA's unequal dims;
# math last). cuDNN attention is left out on purpose: on sm90+ with a CUDA 13 build PyTorch prefers it,
# and its plans are cached per exact shape, so each decode step at a new length could build a new plan
# and the decode timings would measure plan building.
CACHED_ATTENTION_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
CACHED_ATTENTION_KERNELS = "sdpa[" + "|".join(b.name for b in CACHED_ATTENTION_BACKENDS) + "]"


@functools.cache
def flash_attn_import_error() -> str | None:
    """None when `import flash_attn` works; else why not, in one line. Tried once per process (preflight
    does it before any data is loaded): a wheel built for another torch or CUDA is found by pip but fails
    to import, and must not crash the MLA arm at its first forward pass."""
    if importlib.util.find_spec("flash_attn") is None:
        return FLASH_ATTN_NOT_INSTALLED
    try:
        import flash_attn  # noqa: F401  (optional dependency)
    except Exception as error:  # ImportError, OSError (undefined symbol), RuntimeError, ...
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"flash-attn is installed but fails to import ({type(error).__name__}: {detail})"
    return None


def flash_attn_unusable(capability: tuple[int, int] | None) -> str | None:
    """Why flash-attn 2 cannot run on a device of this compute capability (None: not a CUDA device), or
    None when it can. FlashAttention-2 supports sm80 to sm90 (A100, RTX 30xx/40xx, H100/H200); on
    Blackwell (sm100+) the safe path, PyTorch's SDPA, is preferred until a test on such a card passes."""
    if capability is None:
        return "flash-attn needs a CUDA GPU"
    if not (8, 0) <= capability < (10, 0):
        return f"flash-attn 2 supports sm80 to sm90 GPUs, not sm{capability[0]}{capability[1]}"
    return flash_attn_import_error()


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, force_flash: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal SDPA; with force_flash, only PyTorch's FlashAttention backend may run (V padded to d_qk).

    enable_gqa: k and v have fewer heads than q (a divisor of them); query head h attends with K/V head
    h // (q heads / kv heads), computed by the kernel without repeating K and V.
    """
    if not force_flash:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    d_v = v.shape[-1]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, _pad_last_dim(v, q.shape[-1]), is_causal=True, scale=scale,
                                             enable_gqa=enable_gqa)
    return out[..., :d_v]


def cached_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA for new queries at the end of a longer key sequence (decoding with a cache), run
    under an explicit backend choice (CACHED_ATTENTION_BACKENDS: no cuDNN).

    The queries are the last q_len positions of the k_len keys, so the mask is aligned bottom-right;
    SDPA's is_causal aligns top-left, right only when q_len == k_len. One new token sees every key.
    k and v may have fewer heads than q (GQA; one shared head in MQA and in MLA's latent mode). Then the
    query heads of a group are folded into the query positions of their K/V head, so the cache is never
    copied per head and a decode step reads each cached K/V once, not once per query head. (A prompt with
    no past and one K/V head broadcasts that head as a view instead, so the causal mask stays implicit.)
    """
    with cached_attention_kernels():
        return _cached_attention(q, k, v, scale)


def cached_attention_kernels() -> contextlib.AbstractContextManager[object]:
    """The SDPA backend choice every cached prefill and decode step runs under (CACHED_ATTENTION_BACKENDS)."""
    return sdpa_kernel(list(CACHED_ATTENTION_BACKENDS))


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    q_len, k_len = q.shape[-2], k.shape[-2]
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads and (q_len < k_len or kv_heads > 1):
        return _grouped_cached_attention(q, k, v, scale)
    if kv_heads != heads:  # one K/V head, a prompt without a past: broadcast it, so SDPA's is_causal needs no mask
        shape = (q.shape[0], heads, k_len)
        k, v = k.expand(*shape, k.shape[-1]), v.expand(*shape, v.shape[-1])
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _grouped_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """_cached_attention for kv_heads dividing q's heads: query head h uses K/V head h // group.

    The group's query heads become extra query positions of their K/V head: q (batch, heads, q_len, d) ->
    (batch, kv_heads, group * q_len, d), with the bottom-right causal mask repeated per group member.
    """
    batch, heads, q_len, d_qk = q.shape
    kv_heads, k_len = k.shape[1], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} K/V heads do not divide {heads} query heads")
    group = heads // kv_heads
    folded = q.reshape(batch, kv_heads, group * q_len, d_qk)
    if q_len == 1:
        out = F.scaled_dot_product_attention(folded, k, v, scale=scale)
    else:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len).repeat(group, 1)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=allowed, scale=scale)
    return out.reshape(batch, heads, q_len, v.shape[-1])


def flash_attn_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """flash_attn.flash_attn_func(causal=True); it wants (batch, seq, heads, d) and equal head dims."""
    try:  # optional, imported only when used; inside try, transformers' check of a saved model's code skips it too
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise RuntimeError(f"{FLASH_ATTN_NOT_INSTALLED} ({FLASH_ATTN_INSTALL}); use --attention-backend sdpa") from error

    d_v = v.shape[-1]
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), _pad_last_dim(v, q.shape[-1]).transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=True,
    )
    return out[..., :d_v].transpose(1, 2)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
