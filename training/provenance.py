"""What the results JSON says about where, on what and how the experiment ran: the question, the whole config,
the data and its exposure, the validation set, the device and precision, the processes, the library versions
and the git commit (the `experiment` header)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from common.hardware import device_name, precision_label, resolve_precision
from config.settings import PRESET_NOTES, ExperimentConfig
from data.dataset import TokenData, exposure_report, validation_windows
from training.distributed import Distributed
from training.trainer import step_mode_label

REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Does DeepSeek-V3 MLA (via FlashAttention-2) beat standard multi-head attention in the same MoE LM?"
LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "numpy", "scipy", "matplotlib", "flash-attn")


def now() -> str:
    """The time in UTC, to the second, as the JSON records times."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in LIBRARIES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def experiment_header(config: ExperimentConfig, data: TokenData, device: torch.device, dist: Distributed,
                      fingerprint: str, run_order: tuple[str, ...] = ()) -> dict[str, Any]:
    """The results' `experiment` entry of a run starting now; `fingerprint`: the data's SHA-256; `run_order`: the
    order the runs start in on the first seed (config.arms unless a study says otherwise)."""
    n_val_windows = len(validation_windows(data.val, config.max_seq_len)[0])
    return {
        "question": QUESTION,
        "config": config.to_dict(),
        "preset_note": PRESET_NOTES[config.preset],
        "seeds": list(config.run_seeds),
        "data": {**data.info, **exposure_report(len(data.train), config)},  # exact, recounted from every seed's windows
        "validation": validation_line(config, data, n_val_windows),
        "lr_schedule": f"linear warmup over {config.warmup_steps} steps, cosine to {config.min_lr_ratio} x base LR at step {config.max_steps}",
        "device": str(device),
        "device_name": device_name(device),
        "precision": precision_label(resolve_precision(config.precision, device)),
        "compile": config.compile,
        "step_mode": step_mode_label(config),
        "distributed": dist.record(),
        "library_versions": library_versions(),
        "git_commit": git_commit(),
        "started_at": now(),
        "finished_at": None,
        "status": "running",
        "data_sha256": fingerprint,
        "arm_order": {str(seed): seed_arm_order(run_order or config.arms, index)
                      for index, seed in enumerate(config.run_seeds)},
    }


def validation_line(config: ExperimentConfig, data: TokenData, n_val_windows: int) -> str:
    """What the reported validation set is, and how small: windows, tokens, documents, and what the seed CI
    does not cover."""
    documents = data.info.get("val_documents")
    of_documents = f", from {documents} document{'s' if documents != 1 else ''}" if documents is not None else ""
    return (f"fixed set: all {n_val_windows} non-overlapping {config.max_seq_len}-token windows "
            f"({n_val_windows * config.max_seq_len:,} predicted tokens{of_documents}) of the held-out last "
            f"{config.val_fraction:.0%} of tokens, evaluated every {config.eval_every} steps and at the end; the "
            "seed CI covers seed-to-seed variation only, not which text fell into this set")


def seed_arm_order(arms: tuple[str, ...], seed_index: int) -> list[str]:
    """The order the arms train in on the seed_index-th seed: starting with arm seed_index mod k, so that no
    arm always trains first (a warm cache, a cooler GPU)."""
    shift = seed_index % len(arms)
    return list(arms[shift:] + arms[:shift])
