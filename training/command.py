"""The command line the experiment (`python exp6_trainer.py`) and the studies (`python -m training.study`) share:
where the settings come from, what to do with an output folder that holds results, and one line per error.

Every ExperimentConfig setting is a flag (config/cli.py generates them); flags override --config, which
overrides the preset and then the command's own defaults. Errors in the settings or the input exit 2 with one
`error:` line, a run whose outcome cannot stand exits 1, SIGTERM 143 and Ctrl-C 130, as a shell reports them.
Under torchrun, rank 0 speaks for the job.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arms.registry import ARM_NAMES, check_arm_names
from common.errors import ConfigError
from common.hardware import check_gpu_usable, check_torch_version
from config.cli import add_config_flags, config_from_args, config_toml
from config.settings import ExperimentConfig
from models.transformer import ModelBuilder
from training.results import RESULTS_FILE


@dataclass(frozen=True)
class Command:
    """One command line: its name and words for --help, the defaults it puts over the preset's, and, for a study,
    the plan it prints before training (--dry-run stops there)."""

    prog: str
    description: str
    epilog: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    plan: Callable[[ExperimentConfig], list[str]] | None = None


EXPERIMENT = Command(
    prog="exp6_trainer.py",
    description="Train the same small MoE language model once per attention arm (standard multi-head attention, "
                "DeepSeek-V3 Multi-head Latent Attention and, with --arms, grouped-query and multi-query attention "
                "or an arm of your own) and compare validation loss, speed and cost.",
    epilog="With no arguments: the full experiment on a CUDA GPU, or the labelled CPU preset when there is none. "
           "A setting that may be none takes the word none. Flags override --config, which overrides the preset.")


def build_parser(command: Command = EXPERIMENT) -> argparse.ArgumentParser:
    """What to do with the output folder and where the settings come from, then one flag per setting."""
    parser = argparse.ArgumentParser(prog=command.prog, description=command.description, epilog=command.epilog)
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
    if command.plan is not None:
        parser.add_argument("--dry-run", action="store_true", help="print the plan (every run, its tokens and the time "
                            "it should take, from a measured step time of each model) and stop before training")
    add_config_flags(parser)
    arms = next(action for action in parser._actions if action.dest == "arms")
    arms.help = f"{arms.help}; the arms: {', '.join(ARM_NAMES)}"
    return parser


def resolve_config(args: argparse.Namespace, cuda_available: bool,
                   command: Command = EXPERIMENT) -> tuple[ExperimentConfig, str | None]:
    """The config to run and a notice for the user. --resume without --config continues with the settings saved
    in the output folder's results (flags still override them; resume_config refuses those that may not change)."""
    config, notice = config_from_args(args, cuda_available, command.defaults)
    saved = Path(config.output_dir) / RESULTS_FILE
    if args.resume and args.config is None and saved.is_file():
        try:
            resumed = argparse.Namespace(**{**vars(args), "config": str(saved)})
            config, notice = config_from_args(resumed, cuda_available, command.defaults)
        except ConfigError as error:
            raise ConfigError(f"--resume: {error}; choose a fresh --output-dir, or --overwrite to move it aside") from None
    check_arm_names(config.arms)
    check_arm_names(config.ladder_arms, flag="--ladder-arms")
    return config, notice


def print_config(args: argparse.Namespace, command: Command) -> int:
    """--print-config: the resolved settings as TOML (no torch work, no process group)."""
    try:
        config, _ = resolve_config(args, torch.cuda.is_available(), command)
        print(config_toml(config.validate()), end="")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None, builders: Mapping[str, ModelBuilder] | None = None,
         command: Command = EXPERIMENT) -> int:
    """Run the command, report errors in one line, return the exit status. `builders`: the arms' model builders,
    when not the registry's (tests inject faults through it)."""
    args = build_parser(command).parse_args(argv)
    if args.print_config:
        return print_config(args, command)
    from training.distributed import RankFailed, SharedConfigError, launch_from_env  # after argparse: --help is instant
    from training.run_guard import ExperimentFailed, RunTerminated, SaveFailed

    rank = 0
    try:
        check_torch_version()  # before the process group and any training: an old torch is one line
        rank = launch_from_env().rank  # under torchrun, rank 0 speaks for the job
        run(args, builders, command, rank)
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


def run(args: argparse.Namespace, builders: Mapping[str, ModelBuilder] | None, command: Command, rank: int) -> None:
    """Resolve the settings, say what the user should know first (and, for a study, the plan), then run."""
    from training import experiment  # looked up at the call: tests replace run_experiment

    config, notice = resolve_config(args, torch.cuda.is_available(), command)
    check_gpu_usable(config.device)  # a GPU that PyTorch cannot use is named before the CPU preset's notice
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite together: continue the results in --output-dir, or move them "
                          "aside; pick one")
    if notice and rank == 0:
        print(notice)
    if command.plan is not None and rank == 0:
        for line in command.plan(config.validate()):
            print(line)
    if getattr(args, "dry_run", False):
        return
    experiment.run_experiment(config, builders, resume=args.resume, overwrite=args.overwrite)
