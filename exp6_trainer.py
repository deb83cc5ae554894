"""Compare DeepSeek-V3 MLA (via FlashAttention-2) with standard multi-head attention in one MoE LM.

    python exp6_trainer.py            # the full experiment on a CUDA GPU; the CPU preset without one
    torchrun --nproc_per_node 2 exp6_trainer.py --seeds 42 43   # one seed per GPU (--parallel seeds)
    torchrun --nproc_per_node 2 exp6_trainer.py --parallel data # every batch split over both GPUs

Results: exp6_results/exp6_attention_comparison.json and two loss plots beside it, the curves as they
train in exp6_results/metrics.jsonl (and TensorBoard with --tensorboard), the trained models in
exp6_results/checkpoints/ (unless --no-save). Every setting is a flag (--help) or a key of a --config file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from arms.registry import ARM_NAMES, check_arm_names
from common.hardware import check_gpu_usable

if TYPE_CHECKING:
    from models.transformer import ModelBuilder

from common.errors import ConfigError
from config.cli import add_config_flags, config_from_args, config_toml
from config.settings import ExperimentConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line: what to do with the output folder and where the settings come from, then one flag
    per ExperimentConfig setting (config_cli.py generates them from the dataclass)."""
    parser = argparse.ArgumentParser(
        description="Train the same small MoE language model once per attention arm (standard multi-head attention, "
                    "DeepSeek-V3 Multi-head Latent Attention and, with --arms, grouped-query and multi-query attention) "
                    "and compare validation loss, speed and cost.",
        epilog="With no arguments: the full experiment on a CUDA GPU, or the labelled CPU preset when there is none. "
               "A setting that may be none takes the word none. Flags override --config, which overrides the preset.",
    )
    parser.add_argument("--config", metavar="FILE", help="start from the settings in this .toml or .json file: a plain "
                        "table of settings (those it lacks come from the preset), a results JSON (reruns its experiment) "
                        "or a saved model's config.json; flags override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit; "
                        "save it, edit it, and run it with --config FILE")
    parser.add_argument("--resume", action="store_true", help="continue the experiment in --output-dir with the "
                        "settings saved there: finished runs are kept, the run in progress continues from its last "
                        "training state, seeds or arms added on the command line train alone")
    parser.add_argument("--overwrite", action="store_true", help="move the results already in --output-dir aside, to "
                        "a folder named after it with the time (nothing is deleted), and start afresh")
    add_config_flags(parser)
    arms = next(action for action in parser._actions if action.dest == "arms")
    arms.help = f"{arms.help}; the arms: {', '.join(ARM_NAMES)}"
    return parser


def resolve_config(args: argparse.Namespace, cuda_available: bool) -> tuple[ExperimentConfig, str | None]:
    """The config to run and a notice for the user. --resume without --config continues with the settings saved
    in the output folder's results (flags still override them; resume_config refuses those that may not change)."""
    from training.results import RESULTS_FILE  # not at the top: --help stays instant

    config, notice = config_from_args(args, cuda_available)
    saved = Path(config.output_dir) / RESULTS_FILE
    if args.resume and args.config is None and saved.is_file():
        try:
            config, notice = config_from_args(argparse.Namespace(**{**vars(args), "config": str(saved)}), cuda_available)
        except ConfigError as error:
            raise ConfigError(f"--resume: {error}; choose a fresh --output-dir, or --overwrite to move it aside") from None
    check_arm_names(config.arms)
    return config, notice


def main(argv: list[str] | None = None, builders: dict[str, ModelBuilder] | None = None) -> int:
    """The command line: run the experiment, report errors in one line, return the exit status.
    `builders`: the arms' model classes, when not the registry's (tests inject faults through it)."""
    args = build_parser().parse_args(argv)
    if args.print_config:  # no torch, no process group: just the settings
        try:
            config, _ = resolve_config(args, torch.cuda.is_available())
            print(config_toml(config.validate()), end="")
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    from training.distributed import RankFailed, SharedConfigError, launch_from_env  # after argparse: --help is instant
    from training.experiment import run_experiment
    from training.run_guard import ExperimentFailed, RunTerminated, SaveFailed

    rank = 0
    try:
        rank = launch_from_env().rank  # under torchrun, rank 0 speaks for the job
        config, notice = resolve_config(args, torch.cuda.is_available())
        check_gpu_usable(config.device)  # a GPU that PyTorch cannot use is named before the CPU preset's notice
        if args.resume and args.overwrite:
            raise ConfigError("--resume and --overwrite together: continue the results in --output-dir, or move them "
                              "aside; pick one")
        if notice and rank == 0:
            print(notice)
        run_experiment(config, builders, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as error:  # every rank stops; one that alone hit its error says so itself
        if rank == 0 or not isinstance(error, SharedConfigError):
            print(f"error: {f'rank {rank}: ' if rank else ''}{error}", file=sys.stderr)
        return 2
    # a rank failed (it prints its own traceback), or the run went its course and its outcome cannot stand
    # as a result: rank 0 says what happened
    except (RankFailed, SaveFailed, ExperimentFailed) as failure:
        if rank == 0:
            print(f"error: {failure}", file=sys.stderr)
        return 1
    except RunTerminated:  # SIGTERM, turned into an exception by run_experiment: 128 + 15, as the shell reports it
        if rank == 0:
            print("Stopped by SIGTERM.", file=sys.stderr)  # the experiment has said what it saved
        return 143
    except KeyboardInterrupt:
        if rank == 0:
            print("Stopped by Ctrl-C.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
