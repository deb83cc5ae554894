"""The whole experiment: check the setup, load data, train both models per seed, write results.

Results are written atomically after every model run, so a failure or Ctrl-C later on keeps what
finished; a non-finite loss fails that run only and the experiment goes on.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

from data.dataset import TokenData, prepare_data, validation_windows
from data.sources import check_local_path
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_flash_attention_model import FlashAttentionModel
from hardware import device_name, precision_label, release_memory, resolve_device, resolve_precision
from models.attention_ops import FLASH_ATTN_INSTALL, flash_attn_installed
from models.costs import cost_report
from models.transformer import MoELanguageModel
from experiment_config import ConfigError, ExperimentConfig
from training.plots import plot_results
from training.results import (MODEL_NAMES, RESULTS_FILE, check_writable, comparison, format_table, summarise_model,
                              write_json_atomic)
from training.run_guard import output_dir_lock, sigterm_raises_run_terminated, stop_status
from training.trainer import NonFiniteLoss, new_run_record, train_model

ModelBuilder = Callable[..., MoELanguageModel]
MODEL_BUILDERS: dict[str, ModelBuilder] = {"baseline": BaselineAttentionModel, "deepseek": FlashAttentionModel}
REPO_ROOT = Path(__file__).resolve().parent.parent


def preflight(config: ExperimentConfig) -> torch.device:
    """Every check that can fail before any data is loaded or any step is trained."""
    config.validate()
    device = resolve_device(config)
    if config.attention_backend == "flash-attn":
        if not flash_attn_installed():
            raise ConfigError(f"--attention-backend flash-attn: flash-attn is not installed; run `{FLASH_ATTN_INSTALL}` or use --attention-backend auto")
        if device.type != "cuda":
            raise ConfigError("--attention-backend flash-attn needs a CUDA GPU; use --attention-backend sdpa on CPU")
    if config.compile and resolve_precision(config, device) != "bf16":
        raise ConfigError("--compile needs bf16 (the grouped-GEMM MoE compiles only in bf16): add --precision bf16, "
                          "or drop --compile")
    if config.data_path:
        check_local_path(config.data_path)
    try:
        check_writable(Path(config.output_dir))
    except OSError as error:
        raise ConfigError(f"cannot write results to {config.output_dir!r} ({error.strerror or error}); choose another --output-dir") from error
    try:
        check_writable(Path(config.cache_dir))
    except OSError as error:
        raise ConfigError(f"cannot write the token cache to {config.cache_dir!r} ({error.strerror or error}); "
                          "choose another --cache-dir") from error
    return device


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "tokenizers", "datasets", "numpy", "matplotlib", "flash-attn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _experiment_header(config: ExperimentConfig, data: TokenData, device: torch.device) -> dict[str, Any]:
    tokens_trained = config.max_steps * config.batch_size * config.max_seq_len
    n_val_windows = len(validation_windows(data.val, config.max_seq_len)[0])
    return {
        "question": "Does DeepSeek-V3 MLA (via FlashAttention-2) beat standard multi-head attention in the same MoE LM?",
        "config": config.to_dict(),
        "preset_note": ("CPU preset: a scaled-down model and run so that it finishes in minutes on a CPU; "
                        "not the full experiment") if config.preset == "cpu" else "full experiment",
        "seeds": list(config.run_seeds),
        "data": {**data.info, "tokens_trained_per_model": tokens_trained,
                 "epochs_over_training_tokens": tokens_trained / len(data.train)},
        "validation": f"fixed set: all {n_val_windows} non-overlapping {config.max_seq_len}-token windows of the "
                      f"held-out last {config.val_fraction:.0%} of tokens, evaluated every {config.eval_every} steps and at the end",
        "lr_schedule": f"linear warmup over {config.warmup_steps} steps, cosine to {config.min_lr_ratio} x base LR at step {config.max_steps}",
        "device": str(device),
        "device_name": device_name(device),
        "precision": precision_label(resolve_precision(config, device)),
        "compile": config.compile,
        "library_versions": _library_versions(),
        "git_commit": _git_commit(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "finished_at": None,
        "status": "running",
    }


def run_experiment(config: ExperimentConfig, builders: dict[str, ModelBuilder] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train both models once per seed and write JSON, plots and the table; returns the results."""
    builders = builders or MODEL_BUILDERS
    device = preflight(config)
    # One run per output folder: a second one stops here, before any data is loaded, naming this one's pid.
    # SIGTERM (timeout, a scheduler) raises RunTerminated, which the Ctrl-C branch below records.
    with output_dir_lock(Path(config.output_dir)), sigterm_raises_run_terminated():
        data = prepare_data(config, log)
        if config.vocab_size is not None and config.vocab_size < data.vocab_size:
            raise ConfigError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {data.vocab_size}; leave it unset")
        config = config.replace(vocab_size=config.vocab_size or data.vocab_size)
        output_dir = Path(config.output_dir)
        results_path = output_dir / RESULTS_FILE

        header = _experiment_header(config, data, device)
        log(f"Device: {header['device_name']}; preset: {config.preset}; seeds: {list(config.run_seeds)}; results: {results_path}")
        epochs = header["data"]["epochs_over_training_tokens"]
        if epochs > 1:
            log(f"Each training token is seen {epochs:.1f} times: validation loss then measures generalisation "
                f"from a small repeated set (raise --max-tokens to train without repetition).")
        if len(config.run_seeds) == 1:
            log("One seed: differences smaller than the seed-to-seed spread cannot be separated (use --seeds 42 43 44).")

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in MODEL_NAMES}
        costs: dict[str, dict[str, Any]] = {}
        results: dict[str, Any] = {"experiment": header}

        def save(status: str) -> None:
            for name in MODEL_NAMES:
                results[name] = summarise_model(runs[name], costs.get(name))
            results["comparison"] = comparison(runs["baseline"], runs["deepseek"])
            header["status"] = status
            header["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds") if status != "running" else None
            write_json_atomic(results_path, results)

        try:
            for seed in config.run_seeds:
                for name in MODEL_NAMES:
                    model = builders[name](config, seed=seed)
                    costs.setdefault(name, cost_report(model))
                    record = new_run_record(name, model, seed)
                    runs[name].append(record)
                    try:
                        train_model(model, data, config, seed, device, record)
                        log(f"{name} (seed {seed}): val loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.4f}, "
                            f"{record['training_time_minutes'] * 60:.1f} s training, attention {', '.join(record['attention_backend'])}")
                    except NonFiniteLoss as failure:
                        record.update(status="failed", failure=str(failure), failed_at_step=failure.step)
                        log(f"{name} (seed {seed}) FAILED: {failure}; its run is marked failed and the experiment goes on.")
                    except Exception as error:  # anything else stops the experiment, but is recorded first
                        record.update(status="failed", failure=f"{type(error).__name__}: {error}")
                        save("failed")
                        log(f"{name} (seed {seed}) crashed; the runs finished so far are saved in {results_path}")
                        raise
                    del model
                    release_memory(device)
                    save("running")
        except KeyboardInterrupt as stop:  # Ctrl-C, or RunTerminated from SIGTERM
            status = stop_status(stop)  # "interrupted" or "terminated"; the run in progress is that, not failed
            for name in MODEL_NAMES:
                for record in runs[name]:
                    if record["status"] == "running":
                        record["status"] = status
            save(status)
            what = "Terminated by SIGTERM" if status == "terminated" else "Interrupted"
            log(f"{what}: the runs finished so far are saved in {results_path}")
            raise

        save("completed")
        plots = plot_results(results, output_dir)
        log("\n" + format_table(results))
        log(f"Results: {results_path}; plots: {', '.join(str(p) for p in plots)}")
        return results
