"""The baseline arm: standard multi-head attention (exp6_baseline_attention_model.MultiHeadAttention)."""

from arms.arm import Arm, ArmTests
from exp6_baseline_attention_model import MultiHeadAttention

ARM = Arm("baseline", "Baseline (MHA)", MultiHeadAttention, short="MHA", color="tab:blue",
          hub_tags=("multi-head-attention",),
          tests=ArmTests(step_operators={"forward": 399, "backward_and_clip": 605, "optimizer": 93}))
