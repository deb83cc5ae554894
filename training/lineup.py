"""What a comparison trains and compares: its entries (an arm at a config, each trained once per seed) and the
pairs whose paired differences it reports, Holm-adjusted together.

- The experiment's lineup is the arms of config.arms at one config, paired as the registry says (every arm against
  the baseline, and the rivals an arm declares).
- The cache frontier (a study) holds every attention at the config's size: MHA, GQA at each K/V head count that
  divides the heads (between MQA's 1 and MHA's all), MQA, and MLA at a ladder of latent ranks (`kv_lora_rank`;
  q_lora_rank and the nope, rope and value head dims held), each paired with MHA.
- The size ladder (a study) holds each of config.ladder_arms at config.ladder_sizes sizes by one rule (ladder_config):
  size k has 2k heads of ladder_head_dim, k layers, the config's d_ff / d_model ratio and experts, MLA's sizes by
  the presets' proportions, and trains on tokens_per_parameter tokens per non-embedding parameter of its MHA model,
  the same number of steps for every arm of that size. Its gaps are analysed per size (training/study_report.py).

Training, the ledger, resume and torchrun see only entries and pairs: a study runs on the experiment's machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from arms.registry import ARMS, arm_label, comparison_pairs, headline_arm, ordered_arms
from config.settings import BASELINE, ExperimentConfig, mla_sizes
from models.costs import non_embedding_parameters
from models.memory import shape_only_model

FRONTIER, LADDER = "frontier", "ladder"


@dataclass(frozen=True)
class Entry:
    """One line of a comparison: an arm at a config, trained once per seed."""

    name: str  # the results' key and the jobs' name: the arm's name in the experiment, e.g. "deepseek-r32" in a study
    arm: str  # its arm in the registry
    config: ExperimentConfig  # the config it trains with
    label: str  # legend and table header
    study: str | None = None  # frontier or ladder, for a study's entry
    size: int | None = None  # the ladder size (1, 2, ...)


@dataclass(frozen=True)
class Lineup:
    entries: tuple[Entry, ...]
    pairs: tuple[tuple[str, str], ...]  # (first, second): first - second is reported, Holm-adjusted over all of them
    headline: tuple[str, str] | None = None  # the pair whose verdict the experiment's headline gives
    order: tuple[str, ...] = ()  # the order runs start in on the first seed (each later seed rotates it); () the entries'

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    @property
    def run_order(self) -> tuple[str, ...]:
        return self.order or tuple(self.names)

    def entry(self, name: str) -> Entry:
        return next(entry for entry in self.entries if entry.name == name)

    def of_study(self, study: str) -> list[Entry]:
        return [entry for entry in self.entries if entry.study == study]


def lineup_of(config: ExperimentConfig) -> Lineup:
    """The lineup `config` asks for: its studies' points when it names studies, else its arms."""
    if not config.studies:
        return arms_lineup(config)
    frontier = frontier_entries(config) if FRONTIER in config.studies else []
    ladder = ladder_entries(config) if LADDER in config.studies else []
    return Lineup(entries=tuple(frontier + ladder),
                  pairs=tuple((entry.name, BASELINE) for entry in frontier if entry.name != BASELINE))


def arms_lineup(config: ExperimentConfig) -> Lineup:
    """The experiment's lineup: config.arms in registry order at the config, with the registry's pairs."""
    names = ordered_arms(config.arms)
    headline = headline_arm(names)
    return Lineup(entries=tuple(Entry(name, name, config, arm_label(name, config)) for name in names),
                  pairs=tuple(comparison_pairs(names)), headline=(headline, BASELINE) if headline else None,
                  order=config.arms)  # runs start in the order --arms gives them


def frontier_entries(config: ExperimentConfig) -> list[Entry]:
    """MHA, GQA at each K/V head count strictly between 1 and n_heads that divides n_heads, MQA, and MLA at each of
    frontier_ranks(config), all at the config's size."""
    entries = [Entry(BASELINE, BASELINE, config, "MHA", FRONTIER)]
    for heads in range(config.n_heads - 1, 1, -1):
        if config.n_heads % heads == 0:
            entries.append(Entry(f"gqa-kv{heads}", "gqa", config.replace(gqa_kv_heads=heads), f"GQA {heads} KV", FRONTIER))
    entries.append(Entry("mqa", "mqa", config, "MQA", FRONTIER))
    for rank in frontier_ranks(config):
        entries.append(Entry(f"deepseek-r{rank}", "deepseek", config.replace(kv_lora_rank=rank), f"MLA r{rank}", FRONTIER))
    return entries


def frontier_ranks(config: ExperimentConfig) -> tuple[int, ...]:
    """config.frontier_kv_ranks, or d_model/16, /8, /4, /2 and d_model (those of at least 1)."""
    if config.frontier_kv_ranks:
        return config.frontier_kv_ranks
    return tuple(sorted({max(1, config.d_model // divisor) for divisor in (16, 8, 4, 2, 1)}))


def ladder_config(config: ExperimentConfig, size: int) -> ExperimentConfig:
    """Size `size` (1, 2, ...) of the ladder, steps not yet set: 2*size heads of ladder_head_dim, `size` layers, the
    config's d_ff / d_model ratio, MLA's sizes by the presets' proportions (mla_sizes)."""
    heads = 2 * size
    d_model = heads * config.ladder_head_dim
    d_ff = max(1, round(config.d_ff / config.d_model * d_model))
    return config.replace(d_model=d_model, n_heads=heads, n_layers=size, d_ff=d_ff, **mla_sizes(d_model, heads))


def ladder_steps(config: ExperimentConfig) -> int:
    """Optimizer steps for tokens_per_parameter tokens per non-embedding parameter of the MHA model at this size."""
    model = shape_only_model(ARMS[BASELINE].build, config.replace(vocab_size=config.vocab_size or 2))
    tokens = config.tokens_per_parameter * non_embedding_parameters(model)
    return max(1, math.ceil(tokens / (config.batch_size * config.max_seq_len)))


def ladder_entries(config: ExperimentConfig) -> list[Entry]:
    """Each ladder arm at each size, the sizes' steps set (the same for every arm of a size), baseline first."""
    entries = []
    for size in range(1, config.ladder_sizes + 1):
        sized = ladder_config(config, size)
        steps = ladder_steps(sized)
        sized = sized.replace(max_steps=steps, eval_every=max(1, steps // 4))
        for arm in ordered_arms(config.ladder_arms):
            entries.append(Entry(f"{arm}-s{size}", arm, sized, f"{arm_label(arm, sized)}, size {size}", LADDER, size))
    return entries
