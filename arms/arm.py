"""What an arm is: a name, how it is shown, and the attention module every block of its model gets.

An arm's own file (arms/<name>.py) defines `ARM = Arm(...)`; arms/registry.py finds it there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from config.settings import ExperimentConfig
from models.transformer import AttentionFactory, MoELanguageModel


@dataclass(frozen=True)
class ArmTests:
    """What the generic tests need to know of an arm beyond its attention module's own declarations.

    The tests run every arm of the registry; what they expect of one comes from its attention module (cache_modes,
    kv_cache_values_per_token(), muon_blocks(), ...) and from these fields, whose defaults suit a new arm.
    `step_operators`: upper bounds on the aten operators one training step dispatches at the full model size,
    per step part (forward, backward_and_clip, optimizer); None holds the arm to the optimizer target alone.
    `fp32_atol`: how closely its fp32 forward must match itself across code paths (eager reference and fused
    kernel, cache, compile).
    """

    step_operators: Mapping[str, int] | None = None
    fp32_atol: float = 1e-5


@dataclass(frozen=True)
class Arm:
    """One arm: a name, how it is shown, and the attention module every block of its model gets."""

    name: str  # the --arms value, the results' top-level key, a saved model's "arm"
    label: str | Callable[[Mapping[str, Any]], str]  # legend and table header; a function of the run's config
    attention: AttentionFactory  # (config, layer index) -> the attention module of that block
    short: str = ""  # its attention's short name in the decode benchmark ("MHA", "MLA"); "" for the arm's name
    color: str = ""  # one matplotlib colour, the same in every plot; "" for the next free one of PALETTE
    rivals: tuple[str, ...] = ()  # arms compared with this one besides the baseline, reported as "rival - name"
    hub_tags: tuple[str, ...] = ()  # its saved models' tags on the Hugging Face Hub (model card), e.g. its attention
    settings: tuple[tuple[str, str], ...] = ()  # (config field, what it is) that size its attention: the card lists them
    tests: ArmTests = field(default_factory=ArmTests)

    def build(self, config: ExperimentConfig, seed: int | None = None) -> MoELanguageModel:
        """This arm's model: the shared LM with this arm's attention in every block."""
        return MoELanguageModel(config, self.attention, seed=seed)

    def label_for(self, config: ExperimentConfig | Mapping[str, Any] | None = None) -> str:
        """The label for a run's config (an ExperimentConfig or its to_dict()); the defaults' when None."""
        if isinstance(self.label, str):
            return self.label
        values = config.to_dict() if isinstance(config, ExperimentConfig) else dict(config or {})
        return self.label({**ExperimentConfig().to_dict(), **values})
