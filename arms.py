"""The arms of the experiment, in one place: each arm's name, label, attention, colour and model class.

Every arm is the same MoE language model (models/transformer.py) with a different attention module passed
in. Training, results, plots, saved models, generation and the decode benchmark all read this registry:
adding an arm here adds it everywhere. `--arms` chooses which of them a run trains (baseline always, since
every comparison pairs with it).

models/ imports this file only inside functions, when a model is built, so models/ stays importable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from exp6_baseline_attention_model import (BaselineAttentionModel, GroupedQueryAttentionModel,
                                           MultiQueryAttentionModel)
from exp6_flash_attention_model import FlashAttentionModel
from experiment_config import DEFAULT_GQA_KV_HEADS, ExperimentConfig
from models.transformer import ModelBuilder



@dataclass(frozen=True)
class Arm:
    name: str  # the results' top-level key, the checkpoint's "arm", the --arms value
    label: str  # legend, table header (at the default --gqa-kv-heads; see label_for)
    attention: str  # short name of its attention in the decode benchmark ("MHA kv", "MLA latent", ...)
    color: str  # one matplotlib colour per arm, the same in every plot
    builder: ModelBuilder
    kv_heads_label: str | None = None  # a label that names --gqa-kv-heads, e.g. "GQA ({heads} KV head{s})"

    def label_for(self, gqa_kv_heads: int) -> str:
        """The label for a run with this --gqa-kv-heads."""
        if self.kv_heads_label is None:
            return self.label
        return self.kv_heads_label.format(heads=gqa_kv_heads, s="" if gqa_kv_heads == 1 else "s")


_GQA_LABEL = "GQA ({heads} KV head{s})"

ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("baseline", "Baseline (MHA)", "MHA", "tab:blue", BaselineAttentionModel),
    Arm("deepseek", "DeepSeek-V3 MLA", "MLA", "tab:orange", FlashAttentionModel),
    Arm("gqa", _GQA_LABEL.format(heads=DEFAULT_GQA_KV_HEADS, s="s"), "GQA", "tab:green", GroupedQueryAttentionModel,
        kv_heads_label=_GQA_LABEL),
    Arm("mqa", "MQA (1 KV head)", "MQA", "tab:purple", MultiQueryAttentionModel),
)}
ARM_NAMES: tuple[str, ...] = tuple(ARMS)
BASELINE = "baseline"  # every comparison pairs with it
MLA = "deepseek"  # the arm under test: the matched-KV-budget line and the MLA-vs-X pairs are about it


def arm_builders() -> dict[str, ModelBuilder]:
    """name -> model class, in registry order."""
    return {name: arm.builder for name, arm in ARMS.items()}


def arm_label(name: str, config: ExperimentConfig | Mapping[str, Any] | None = None) -> str:
    """An arm's label for a run's config (an ExperimentConfig or its to_dict()); unknown names are returned as they are."""
    arm = ARMS.get(name)
    if arm is None:
        return name
    if isinstance(config, ExperimentConfig):
        heads: Any = config.gqa_kv_heads
    else:
        heads = (config or {}).get("gqa_kv_heads", DEFAULT_GQA_KV_HEADS)
    return arm.label_for(heads if isinstance(heads, int) else DEFAULT_GQA_KV_HEADS)


def arm_color(name: str) -> str | None:
    arm = ARMS.get(name)
    return arm.color if arm is not None else None


def ordered_arms(names: Any) -> list[str]:
    """The registry's arms among `names` (any iterable or mapping of names), in registry order."""
    present = set(names)
    return [name for name in ARM_NAMES if name in present]
