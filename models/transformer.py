"""The one MoE language model every arm of the experiment uses; only the attention module differs.

Pre-norm block: x + Attention(RMSNorm(x)), then x + MoE(RMSNorm(x)). The LM is an embedding, the
blocks, a final RMSNorm and a head tied to the embedding. Parameters are initialised per name from
the seed, so the parts the arms share start from identical values.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from torch import nn

from common.errors import ConfigError
from common.hardware import cuda_capability
from config.settings import ExperimentConfig
from models.attention import CausalSelfAttention, KVCache
from models.moe import MixtureOfExperts

AttentionFactory = Callable[[ExperimentConfig, int], CausalSelfAttention]
ModelBuilder = Callable[..., "MoELanguageModel"]  # an arm's model class: (config, seed=None) -> the model
NORM_EPS = 1e-6
INIT_STD = 0.02


class TransformerBlock(nn.Module):
    """Pre-norm residual block around the attention module it is given and a shared MoE layer."""

    def __init__(self, config: ExperimentConfig, attention: CausalSelfAttention) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.attention = attention
        self.moe_norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.moe = MixtureOfExperts(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.dropout(self.attention(self.attn_norm(x), cache))
        moe_out, aux_loss = self.moe(self.moe_norm(x))
        return x + self.dropout(moe_out), aux_loss


class MoELanguageModel(nn.Module):
    """Embedding -> blocks -> RMSNorm -> tied LM head; returns (logits, summed load-balancing loss)."""

    def __init__(self, config: ExperimentConfig, attention_factory: AttentionFactory, seed: int | None = None) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ConfigError("vocab_size is unset; it comes from the tokenizer (set config.vocab_size)")
        self.config = config
        self.attention_factory = attention_factory  # kept: a saved model's modeling file is generated from it
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(config, attention_factory(config, layer)) for layer in range(config.n_layers)
        )
        self.norm = nn.RMSNorm(config.d_model, eps=NORM_EPS)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        if self.embed.weight.device.type != "meta":  # a shape-only model (memory planning) has nothing to draw
            init_parameters(self, config.seed if seed is None else seed)

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for every input position (only the last with last_only, as a decoder prefills: the
        full (batch, prompt, vocab) logits would dwarf the cache) and the summed load-balancing loss.

        With `caches` (one per layer, from new_caches), input_ids are only the new tokens: they follow
        the cached ones, and the caches grow by them.
        """
        blocks = self.transformer_blocks()
        if caches is not None and len(caches) != len(blocks):
            raise ValueError(f"{len(caches)} caches for {len(blocks)} layers")
        x = self.dropout(self.embed(input_ids))
        aux_total = x.new_zeros((), dtype=torch.float32)
        for layer, block in enumerate(blocks):
            x, aux_loss = block(x, None if caches is None else caches[layer])
            aux_total = aux_total + aux_loss
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)), aux_total

    def new_caches(self, mode: str | None = None, capacity: int = 256) -> list[KVCache]:
        """One empty KV cache per layer; mode None takes the attention's default ("kv" for MHA, "latent" for MLA).
        An attention with no cached decode path (cache_modes ()) has none: ValueError."""
        return [attention.new_cache(mode, capacity) for attention in self.attention_modules()]

    def cache_modes(self) -> tuple[str, ...]:
        """The decode caches its attention offers, its own first; () when it has no cached decode path."""
        return self.attention_modules()[0].cache_modes

    def transformer_blocks(self) -> list[TransformerBlock]:
        return [block for block in self.blocks if isinstance(block, TransformerBlock)]

    def attention_modules(self) -> list[CausalSelfAttention]:
        return [block.attention for block in self.transformer_blocks()]

    def moe_layers(self) -> list[MixtureOfExperts]:
        return [block.moe for block in self.transformer_blocks()]

    def plan_moe_dispatch(self, device: torch.device, compute_dtype: torch.dtype) -> list[str]:
        """Fix each MoE layer's dispatch path for this device and compute dtype before training (or
        compiling), so the forward pass never queries the CUDA runtime. Returns the distinct paths."""
        capability = cuda_capability(device)
        return sorted({moe.plan(device, compute_dtype, capability) for moe in self.moe_layers()})

    def plan_attention(self, device: torch.device) -> None:
        """Let each attention module fix its device-dependent kernel choice before training (or compiling)."""
        for attention in self.attention_modules():
            attention.plan(device)

    def moe_dispatch_used(self) -> list[str]:
        """The MoE paths that really ran in the last forward passes."""
        return sorted({moe.dispatch_used or "not run yet" for moe in self.moe_layers()})

    def attention_backends(self) -> list[str]:
        """The attention kernels that really ran in the last forward passes, as the modules recorded them."""
        return sorted({m.backend_used or "not run yet" for m in self.attention_modules()})


def init_parameters(model: nn.Module, seed: int) -> None:
    """Draw every parameter from a generator keyed by (seed, parameter name).

    Shared parts of the arms have the same names, so they get identical values whatever
    the attention module draws; the values do not depend on the device either.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norm gains
                param.fill_(1.0)
                continue
            generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**64)
            values = torch.randn(param.shape, generator=generator) * INIT_STD
            param.copy_(values.to(param.dtype))
