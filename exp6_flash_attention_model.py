"""DeepSeek arm: DeepSeek-V3 MLA through FlashAttention-2 in the shared MoE LM."""

from __future__ import annotations

from config.settings import ExperimentConfig
from deepseek_modeling import DeepseekV3FlashAttention2
from models.transformer import MoELanguageModel


class FlashAttentionModel(MoELanguageModel):
    """The shared MoE language model with DeepSeek-V3 Multi-head Latent Attention."""

    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, DeepseekV3FlashAttention2, seed=seed)
