"""Analytic cost accounting: parameters (total, active per token, attention), FLOPs, KV cache.

FLOPs count the matrix products only (norms, softmax, RoPE and the router's top-k are left out):
2 FLOPs per multiply-add per token in the forward pass, times 3 for forward plus backward. Every
nn.Linear is applied to every token in training (MLA is run un-absorbed), experts are counted at
top_k / num_experts, and attention scores and the value mix use the mean causal context (T + 1) / 2.
The KV cache is counted both ways: analytically, and measured from the cache tensors of a bf16 decode.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from models.attention import CausalSelfAttention
from models.moe import Expert
from models.transformer import MoELanguageModel

KV_CACHE_BYTES_PER_VALUE = 2  # bf16


def parameter_count(module: nn.Module) -> int:
    """Parameters of `module`, each tensor once (the LM head tied to the embedding counts once)."""
    return sum(p.numel() for p in module.parameters())


def non_embedding_parameters(model: MoELanguageModel) -> int:
    """Parameters outside the token embedding (which is also the tied output head): the N of a scaling law."""
    return parameter_count(model) - model.embed.weight.numel()


def attention_score_macs(attention: CausalSelfAttention, seq_len: int) -> float:
    """Multiply-adds per token of q k^T and the value mix, at the mean causal context (T + 1) / 2."""
    heads, d_qk, d_v = attention.score_dims()
    return heads * (d_qk + d_v) * (seq_len + 1) / 2


@torch.no_grad()
def measured_cache_bytes_per_token(attention: CausalSelfAttention, mode: str, d_model: int, tokens: int = 4) -> float:
    """Bytes per token a bf16 decoder really caches in this layer: a few tokens are run through a copy
    of the layer with a `mode` cache under bf16 autocast on the CPU, and the cache tensors are measured."""
    layer = copy.deepcopy(attention).cpu().eval()
    cache = layer.new_cache(mode, capacity=tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.zeros(1, tokens, d_model), cache)
    return cache.bytes_per_token()


def cost_report(model: MoELanguageModel, seq_len: int | None = None) -> dict[str, Any]:
    config = model.config
    seq_len = seq_len or config.max_seq_len
    expert_fraction = config.expert_top_k / config.num_experts
    total = parameter_count(model)
    expert_params = sum(parameter_count(m) for m in model.modules() if isinstance(m, Expert))
    attention = model.attention_modules()

    inactive_expert_params = (1 - expert_fraction) * expert_params
    linear_macs = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) - inactive_expert_params
    score_macs = sum(attention_score_macs(m, seq_len) for m in attention)
    forward_flops = 2 * (linear_macs + score_macs)
    return {
        "parameters_total": total,
        "parameters_non_embedding": non_embedding_parameters(model),
        "parameters_active_per_token": int(total - inactive_expert_params),
        "parameters_attention": sum(parameter_count(m) for m in attention),
        "parameters_attention_per_layer": parameter_count(attention[0]),
        "training_flops_per_token": int(3 * forward_flops),
        "attention_score_flops_per_token": int(3 * 2 * score_macs),
        **kv_cache_costs(attention[0], config.d_model, config.n_layers),
        "flops_note": "matmuls only; forward+backward = 3x forward; experts at top_k/num_experts; causal mean context",
    }


def kv_cache_costs(attention: CausalSelfAttention, d_model: int, n_layers: int) -> dict[str, Any]:
    """The KV cache a bf16 decoder keeps per token, counted and measured, for the attention's own (first) cache
    mode and every mode it has; None for an attention with no cached decode path (it recomputes the prefix)."""
    if not attention.cache_modes:
        return {"kv_cache_bytes_per_token_per_layer_bf16": None, "kv_cache_bytes_per_token_all_layers_bf16": None,
                "kv_cache_mode": None, "kv_cache_bytes_per_token_per_layer_bf16_measured": None,
                "kv_cache_bytes_per_token_per_layer_bf16_by_mode": {},
                "kv_cache_note": "no cached decode path: generation recomputes the whole prefix at every token"}
    by_mode = {mode: {"analytic": attention.kv_cache_values_per_token(mode) * KV_CACHE_BYTES_PER_VALUE,
                      "measured": measured_cache_bytes_per_token(attention, mode, d_model)}
               for mode in attention.cache_modes}
    own = by_mode[attention.cache_modes[0]]
    return {"kv_cache_bytes_per_token_per_layer_bf16": own["analytic"],
            "kv_cache_bytes_per_token_all_layers_bf16": own["analytic"] * n_layers,
            "kv_cache_mode": attention.cache_modes[0],
            "kv_cache_bytes_per_token_per_layer_bf16_measured": own["measured"],
            "kv_cache_bytes_per_token_per_layer_bf16_by_mode": by_mode}
