"""Multi-query attention: the baseline's attention with one K/V head, compared with MLA too, at the smallest cache."""

from arms.arm import Arm, ArmTests
from exp6_baseline_attention_model import MultiQueryAttention

ARM = Arm("mqa", "MQA (1 KV head)", MultiQueryAttention, short="MQA", color="tab:purple", rivals=("deepseek",),
          hub_tags=("multi-query-attention",),
          tests=ArmTests(step_operators={"forward": 399, "backward_and_clip": 602, "optimizer": 120}))
