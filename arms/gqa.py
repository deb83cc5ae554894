"""Grouped-query attention: the baseline's attention with --gqa-kv-heads K/V heads, compared with MLA too, at a
KV cache of comparable size."""

from typing import Any, Mapping

from arms.arm import Arm, ArmTests
from exp6_baseline_attention_model import GroupedQueryAttention


def label(config: Mapping[str, Any]) -> str:
    heads = config["gqa_kv_heads"]
    return f"GQA ({heads} KV head{'' if heads == 1 else 's'})"


ARM = Arm("gqa", label, GroupedQueryAttention, short="GQA", color="tab:green", rivals=("deepseek",),
          hub_tags=("grouped-query-attention",), settings=(("gqa_kv_heads", "K/V heads"),),
          tests=ArmTests(step_operators={"forward": 399, "backward_and_clip": 605, "optimizer": 120}))
