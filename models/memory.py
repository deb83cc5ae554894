"""What a model needs in memory, estimated before anything is allocated, and the check against the machine.

Parameters are counted exactly, from the arm's own model built on PyTorch's "meta" device (shapes
only, no storage), so a new arm or a new setting is counted without a formula of its own. The rest
is an upper-end estimate from the shapes:

- training: weights, gradients and optimizer state (Muon momentum or AdamW's two moments) at fp32,
  plus a bf16 copy of the weights under autocast: 18 bytes per parameter;
- activations kept for the backward pass: per token and layer, every nn.Linear's output (the MoE
  experts' at top_k / num_experts of the tokens) and a dozen d_model-wide tensors (norms, residuals,
  dropout), at fp32, doubled for the nonlinearities and their gradients; the logits four times
  (logits and their bf16 copy, log-softmax, their gradient); with the eager attention backend, the
  score matrices. Measured on the CPU (peak RSS of a training step), this is 1.4-2.0x what one step
  really takes;
- a decode cache: the attention's cached values per token, per layer, at the model's precision.

A run whose estimate exceeds the machine is refused with one line: "needs ~X GB, this machine has Y".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from common.errors import ConfigError
from common.hardware import memory_capacity
from config.settings import ExperimentConfig
from models.attention import CausalSelfAttention
from models.moe import Expert
from models.transformer import ModelBuilder, MoELanguageModel

T = TypeVar("T")
GB = 1e9
FP32 = 4
TRAINING_BYTES_PER_PARAMETER = 4 + 4 + 2 * 4 + 2  # weight, gradient, two optimizer moments (fp32), bf16 weight copy
D_MODEL_WIDE_PER_LAYER = 12  # norms' inputs and outputs, residual sums, dropout masks, the MoE combine
NONLINEAR_FACTOR = 2  # SiLU / softmax / RoPE intermediates and the backward pass's own temporaries
LOGIT_COPIES = 4  # logits (and their bf16 copy under autocast), log-softmax, gradient of the logits


def shape_only(build: Callable[[], T]) -> T:
    """build() on the meta device: every tensor's shape, no storage, nothing drawn. Settings whose shapes
    cannot exist (a tensor of more than 2**63 elements) raise ConfigError."""
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, ValueError, OverflowError, TypeError) as error:  # TypeError: a size beyond int64
        raise ConfigError(f"these settings give a model that cannot be built ({type(error).__name__}: "
                          f"{str(error)[:120]}); lower its sizes") from None


def shape_only_model(builder: ModelBuilder, config: ExperimentConfig) -> MoELanguageModel:
    """The arm's model as shapes only (shape_only)."""
    return shape_only(lambda: builder(config, seed=0))


def _values_per_token_per_layer(model: MoELanguageModel) -> float:
    """Activation values one token leaves for the backward pass in one block (see the module docstring)."""
    config = model.config
    block = model.transformer_blocks()[0]
    expert_share = config.expert_top_k / config.num_experts
    experts = {id(linear) for expert in block.modules() if isinstance(expert, Expert)
               for linear in expert.modules() if isinstance(linear, nn.Linear)}
    linear_outputs = sum(m.out_features * (expert_share if id(m) in experts else 1.0)
                         for m in block.modules() if isinstance(m, nn.Linear))
    return NONLINEAR_FACTOR * (linear_outputs + D_MODEL_WIDE_PER_LAYER * config.d_model)


def _eager_score_values(attention: nn.Module, batch: int, seq_len: int) -> int:
    """The score and softmax matrices the plain-math reference (backend "eager") materialises; 0 for a fused kernel."""
    if getattr(attention, "backend", None) != "eager" or not isinstance(attention, CausalSelfAttention):
        return 0
    heads, _, _ = attention.score_dims()
    return 2 * batch * heads * seq_len * seq_len


def training_activation_bytes(model: MoELanguageModel, batch: int, seq_len: int) -> int:
    """Bytes the forward pass keeps for the backward pass of one training step of `batch` windows."""
    config = model.config
    assert config.vocab_size is not None  # a built model has one
    tokens = batch * seq_len
    per_layer = (_values_per_token_per_layer(model) * tokens
                 + _eager_score_values(model.attention_modules()[0], batch, seq_len))
    logits = LOGIT_COPIES * tokens * config.vocab_size
    return int(FP32 * (config.n_layers * per_layer + logits))


def inference_activation_bytes(model: MoELanguageModel, batch: int, tokens: int) -> int:
    """Bytes of one layer's forward pass over `batch` x `tokens` without gradients (a prefill, or a
    cacheless decode step that recomputes the whole prefix): the activations live one layer at a time."""
    per_layer = (_values_per_token_per_layer(model) * batch * tokens
                 + _eager_score_values(model.attention_modules()[0], batch, tokens))
    return int(FP32 * per_layer)


def attention_training_bytes(attention: nn.Module, batch: int, seq_len: int, d_model: int) -> int:
    """Bytes one attention module alone keeps for the backward pass of a (batch, seq_len, d_model) input."""
    linear_outputs = sum(m.out_features for m in attention.modules() if isinstance(m, nn.Linear))
    values = NONLINEAR_FACTOR * batch * seq_len * (linear_outputs + 4 * d_model)
    return int(FP32 * (values + _eager_score_values(attention, batch, seq_len)))


def decode_cache_bytes(model: MoELanguageModel, mode: str | None, tokens: int, batch: int = 1,
                       bytes_per_value: int = FP32) -> int:
    """The KV caches of every layer for `batch` sequences of `tokens` tokens (0: no cache, mode "none" or an
    attention with no cached decode path)."""
    attention = model.attention_modules()[0]
    if mode == "none" or not attention.cache_modes:
        return 0
    return int(attention.kv_cache_values_per_token(mode) * bytes_per_value * tokens * batch * model.config.n_layers)


@dataclass
class MemoryNeed:
    """Estimated bytes by part: on the device that computes, and in the machine's RAM (text, token
    arrays made on the CPU). On the CPU both are RAM."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    def on(self, device: torch.device) -> list[tuple[str, dict[str, int]]]:
        """The budgets to check: the card and the RAM on CUDA; the RAM alone (everything) on the CPU."""
        if device.type == "cuda":
            return [("device", self.device), ("host", self.host)]
        merged = dict(self.host)
        for part, size in self.device.items():
            merged[part] = merged.get(part, 0) + size
        return [("host", merged)]


def _gb(size: float) -> str:
    return f"{size / GB:,.1f} GB" if size >= 0.05 * GB else f"{size / GB:.3f} GB"


def check_fits(need: MemoryNeed, device: torch.device, advice: str, processes: int = 1) -> None:
    """Raise ConfigError, in one line, when the estimate exceeds the card's memory (CUDA) or the RAM that is
    free (the CPU, and on CUDA the host-side parts); `processes` of this size share the machine's RAM."""
    for where, parts in need.on(device):
        share = processes if where == "host" else 1
        total = sum(parts.values()) * share
        capacity, label = memory_capacity(device if where == "device" else torch.device("cpu"))
        if total > capacity:
            ranked = sorted(parts.items(), key=lambda item: -item[1])
            biggest = ", ".join(f"{part} {_gb(size * share)}" for i, (part, size) in enumerate(ranked)
                                if i == 0 or size * share >= total / 100)  # the parts that matter
            who = f" for {processes} processes" if share > 1 else ""
            raise ConfigError(f"needs ~{_gb(total)}{who}, this machine has {_gb(capacity)} ({label}): {biggest}; {advice}")
