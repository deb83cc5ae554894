"""Compare DeepSeek-V3 MLA (via FlashAttention-2) with standard multi-head attention in one MoE LM.

    python exp6_trainer.py            # the full experiment on a CUDA GPU; the CPU preset without one
    python exp6_trainer.py --preset tiny                        # a smoke run of under a minute
    torchrun --nproc_per_node 2 exp6_trainer.py --seeds 42 43   # one seed per GPU (--parallel seeds)
    torchrun --nproc_per_node 2 exp6_trainer.py --parallel data # every batch split over both GPUs

Results: exp6_results/exp6_attention_comparison.json and two loss plots beside it, the curves as they
train in exp6_results/metrics.jsonl (and TensorBoard with --tensorboard), the trained models in
exp6_results/checkpoints/ (unless --no-save). Every setting is a flag (--help) or a key of a --config file.
The experiment itself reads as one page in training/experiment.py; the command line is training/command.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from config.settings import ExperimentConfig
from models.transformer import ModelBuilder
from training import command


def build_parser() -> argparse.ArgumentParser:
    """The experiment's flags: what to do with the output folder, where the settings come from, every setting."""
    return command.build_parser(command.EXPERIMENT)


def resolve_config(args: argparse.Namespace, cuda_available: bool) -> tuple[ExperimentConfig, str | None]:
    """The config the arguments ask for, and a notice for the user (training/command.py)."""
    return command.resolve_config(args, cuda_available, command.EXPERIMENT)


def main(argv: list[str] | None = None, builders: Mapping[str, ModelBuilder] | None = None) -> int:
    """Run the experiment; errors in one line; the exit status. `builders`: the arms' model builders when not
    the registry's (tests inject faults through it)."""
    return command.main(argv, builders, command.EXPERIMENT)


if __name__ == "__main__":
    sys.exit(main())
