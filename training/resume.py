"""What a run does with an output folder that already holds results: refuse it, continue it (--resume) or
move the old results aside (--overwrite). Nothing finished is ever replaced silently.

--resume keeps every finished run of the folder's results JSON (completed, or failed by a non-finite
loss, which would fail again), continues a run that was stopped from its training state
(training/train_state.py) and trains the seeds and arms not yet there. The settings must be those the
results were made with, except RESUMABLE_CHANGES (which runs there are, and where and how often things
are written); anything else is refused, naming the keys, because runs trained under other settings
would not be comparable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from common.errors import ConfigError
from common.safe_json import read_json_file
from config.settings import RESUMABLE_CHANGES, ExperimentConfig
from models.checkpoint import CHECKPOINTS_DIR
from training.distributed import Distributed
from training.metrics_log import METRICS_FILE, TENSORBOARD_DIR
from training.plots import LOSS_STEP_PLOT, LR_SWEEP_PLOT, VAL_TIME_PLOT
from training.results import RESULTS_FILE
from training.run_guard import output_dir_lock, sigterm_raises_run_terminated
from training.train_state import STATE_DIR

OUTPUTS = (RESULTS_FILE, CHECKPOINTS_DIR, STATE_DIR, METRICS_FILE, TENSORBOARD_DIR, VAL_TIME_PLOT, LOSS_STEP_PLOT,
           LR_SWEEP_PLOT)  # what an experiment writes into its output folder


def existing_outputs(directory: Path) -> list[str]:
    """The experiment outputs `directory` already holds (an empty folder counts as none)."""
    found = []
    for name in OUTPUTS:
        path = directory / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def move_aside(directory: Path) -> Path:
    """Move the experiment's outputs in `directory` (OUTPUTS) into a new sibling folder named after it and the
    time; returns that folder. Nothing is deleted; the lock this run holds, other files and another process's
    passing temporary files (e.g. a write check) stay where they are."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = directory.with_name(f"{directory.name}-old-{stamp}")
    suffix = 1
    while aside.exists():
        aside = directory.with_name(f"{directory.name}-old-{stamp}-{suffix}")
        suffix += 1
    aside.mkdir()
    for name in OUTPUTS:
        if (directory / name).exists():
            os.replace(directory / name, aside / name)
    return aside


@contextlib.contextmanager
def output_folder(config: ExperimentConfig, dist: Distributed, resume: bool, overwrite: bool,
                  log: Callable[[str], None]) -> Iterator[dict[str, Any] | None]:
    """While inside, the output folder belongs to this run (rank 0 holds its lock: a second run stops at once,
    before any data is loaded, naming this one's pid) and SIGTERM raises RunTerminated, which is recorded like
    Ctrl-C. Yields the results to continue (--resume), or None for a fresh start (a folder holding results is
    refused, or with --overwrite moved aside first); rank 0 decides, every rank hears."""
    output_dir = Path(config.output_dir)
    with contextlib.ExitStack() as lock, sigterm_raises_run_terminated():
        dist.on_main(lambda: lock.enter_context(output_dir_lock(output_dir)))
        yield dist.from_main(lambda: prepare_output_dir(output_dir, resume, overwrite, log))


def prepare_output_dir(directory: Path, resume: bool, overwrite: bool,
                       log: Callable[[str], None]) -> dict[str, Any] | None:
    """Make `directory` ready for this run (it is locked by it): the previous results to continue (--resume),
    or None for a fresh start. A folder holding results is refused without --resume or --overwrite."""
    found = existing_outputs(directory)
    if not found:
        if resume:
            log(f"Resume: {directory} holds no results yet; starting the experiment there.")
        return None
    if overwrite:
        aside = move_aside(directory)
        log(f"Overwrite: the previous results ({', '.join(found)}) were moved to {aside}; starting afresh in {directory}.")
        return None
    if not resume:
        raise ConfigError(f"{directory} already holds results ({', '.join(found)}); continue them with --resume, "
                          f"choose a fresh --output-dir, or add --overwrite to move them aside (nothing is deleted)")
    results_path = directory / RESULTS_FILE
    if not results_path.is_file():
        raise ConfigError(f"--resume: {directory} holds {', '.join(found)} but no {RESULTS_FILE} to continue; "
                          "choose a fresh --output-dir, or add --overwrite instead of --resume to move them aside")
    try:
        previous = read_json_file(results_path)  # within size and depth limits; JSONInputError is a ValueError
        previous["experiment"]["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--resume: cannot read {results_path} ({type(error).__name__}: {str(error)[:120]}); "
                          "choose a fresh --output-dir, or --overwrite to move it aside") from None
    return dict(previous)


def resume_config(config: ExperimentConfig, previous: dict[str, Any]) -> ExperimentConfig:
    """`config` with the previous run's seeds and arms kept (new ones added after them), after checking that
    nothing else that changes a run differs; raises ConfigError naming every differing setting."""
    try:
        saved = ExperimentConfig.from_dict(previous["experiment"]["config"], base=config)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"--resume: the saved settings in {RESULTS_FILE} cannot be read ({error})") from None
    differing = [field.name for field in dataclasses.fields(config)
                 if field.name not in RESUMABLE_CHANGES and getattr(config, field.name) != getattr(saved, field.name)
                 and not (field.name == "vocab_size" and config.vocab_size is None)]  # None: the tokenizer's, as saved
    if differing:
        details = "; ".join(f"{name}: {_show(getattr(saved, name))} saved, {_show(getattr(config, name))} now"
                            for name in differing)
        raise ConfigError(f"--resume: these settings differ from the results in {config.output_dir}: {details}. "
                          "Resume with the saved settings (drop those flags), or start a fresh --output-dir")
    seeds = tuple(dict.fromkeys(saved.run_seeds + config.run_seeds))
    arms = tuple(dict.fromkeys(saved.arms + config.arms))
    return config.replace(seeds=seeds, arms=arms)


def finished_runs(previous: dict[str, Any], names: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """The previous results' runs of the entries `names` (the arms, or a study's points) that need no training
    again: completed, or failed by a non-finite loss (deterministic, so it would fail again). Crashed, interrupted
    and running runs are trained again."""
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    for arm in names:
        for record in (previous.get(arm) or {}).get("runs", []):
            if record.get("status") == "completed" or (record.get("status") == "failed" and "failed_at_step" in record):
                kept[(arm, record["seed"])] = record
    return kept


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
