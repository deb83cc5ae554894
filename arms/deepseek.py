"""The arm under test: DeepSeek-V3 Multi-head Latent Attention through FlashAttention-2 (deepseek_modeling.py)."""

from arms.arm import Arm, ArmTests
from config.settings import MLA_SIZES
from deepseek_modeling import DeepseekV3FlashAttention2

ARM = Arm("deepseek", "DeepSeek-V3 MLA", DeepseekV3FlashAttention2, short="MLA", color="tab:orange",
          hub_tags=("multi-head-latent-attention", "deepseek-v3"), settings=tuple((n, "MLA size") for n in MLA_SIZES),
          tests=ArmTests(step_operators={"forward": 615, "backward_and_clip": 926, "optimizer": 180}))
