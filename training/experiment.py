"""The whole experiment: check the setup, load data, train every arm (config.arms) per seed, write results.

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

from data.dataset import TokenData, exposure_line, exposure_report, prepare_data, validation_windows
from data.sources import check_local_path
from data.tokenizer import TOKENIZER_FILE, save_tokenizer
from experiment_config import ConfigError, ExperimentConfig
from hardware import device_name, precision_label, release_memory, resolve_device, resolve_precision
from inference.generate import cache_mode_for, generate_text
from models.attention_ops import FLASH_ATTN_INSTALL, flash_attn_installed
from models.checkpoint import ModelBuilder, arm_builders, run_checkpoint_dir, save_checkpoint
from models.costs import cost_report
from models.transformer import MoELanguageModel
from reporting import write_json_atomic
from training.lr_sweep import run_lr_sweep, untuned
from training.plots import plot_results
from arms import ordered_arms
from training.results import RESULTS_FILE, check_writable, comparison, format_table, summarise_model
from training.run_guard import output_dir_lock, sigterm_raises_run_terminated, stop_status
from training.trainer import NonFiniteLoss, new_run_record, train_model

MODEL_BUILDERS: dict[str, ModelBuilder] = arm_builders()
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
    n_val_windows = len(validation_windows(data.val, config.max_seq_len)[0])
    return {
        "question": "Does DeepSeek-V3 MLA (via FlashAttention-2) beat standard multi-head attention in the same MoE LM?",
        "config": config.to_dict(),
        "preset_note": ("CPU preset: a scaled-down model and run so that it finishes in minutes on a CPU; "
                        "not the full experiment") if config.preset == "cpu" else "full experiment",
        "seeds": list(config.run_seeds),
        "data": {**data.info, **exposure_report(len(data.train), config)},  # exact, recounted from every seed's windows
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


def save_run_checkpoint(model: MoELanguageModel, name: str, seed: int, record: dict[str, Any], data: TokenData,
                        config: ExperimentConfig, log: Callable[[str], None]) -> None:
    """Save a completed run's model, config and tokenizer to OUTPUT_DIR/checkpoints/<name>-seed<seed>/ and
    note it in `record["checkpoint"]`. A failure is recorded (`checkpoint_error`) and logged, never raised:
    the run's results matter more than its weights."""
    directory = run_checkpoint_dir(Path(config.output_dir), name, seed)
    try:
        # a Hub tokenizer that is not in the local cache is saved as its name alone
        tokenizer = save_tokenizer(data.tokenizer or config.tokenizer_name, directory)
        extra = {"seed": seed, "tokenizer": tokenizer, "data": data.info.get("corpus_description"),
                 **{key: record.get(key) for key in ("val_loss", "val_accuracy", "val_perplexity", "tokens_seen", "precision")}}
        saved = save_checkpoint(model, name, directory, extra)
        files = dict(saved["files"])
        if "file" in tokenizer:
            files[TOKENIZER_FILE] = (directory / TOKENIZER_FILE).stat().st_size
    except Exception as error:  # noqa: BLE001 - disk full, permissions, ...: keep the results, say so, go on
        record["checkpoint_error"] = f"{type(error).__name__}: {error}"
        log(f"{name} (seed {seed}): saving the model to {directory} FAILED ({record['checkpoint_error']}); "
            "its results are kept and the experiment goes on.")
        return
    record["checkpoint"] = {"directory": str(directory), "bytes": sum(files.values()), "files": files}
    log(f"{name} (seed {seed}): model saved to {directory} ({record['checkpoint']['bytes'] / 1e6:.1f} MB)")


def greedy_sample(model: MoELanguageModel, data: TokenData, config: ExperimentConfig,
                  device: torch.device) -> dict[str, Any]:
    """A short greedy continuation of config.sample_prompt with the model's own KV cache, for the JSON."""
    if data.tokenizer is None:
        return {"prompt": config.sample_prompt, "text": None, "note": "no tokenizer loaded on this machine"}
    text, ids = generate_text(model, data.tokenizer, config.sample_prompt, config.sample_tokens,
                              precision=resolve_precision(config, device))
    return {"prompt": config.sample_prompt, "text": text, "tokens": len(ids),
            "decoding": f"greedy, {cache_mode_for(model, 'auto')} cache"}


def run_experiment(config: ExperimentConfig, builders: dict[str, ModelBuilder] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every arm of config.arms once per seed and write JSON, plots and the table; returns the results."""
    builders = builders or MODEL_BUILDERS
    device = preflight(config)
    missing = [arm for arm in config.arms if arm not in builders]
    if missing:
        raise ConfigError(f"--arms {' '.join(config.arms)}: no model class for {', '.join(missing)}")
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
        log(exposure_line(header["data"], config.max_seq_len))
        if len(config.run_seeds) == 1:
            log("One seed: differences smaller than the seed-to-seed spread cannot be separated (use --seeds 42 43 44).")

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ordered_arms(config.arms)}  # JSON: registry order
        costs: dict[str, dict[str, Any]] = {}
        results: dict[str, Any] = {"experiment": header, "lr_sweep": untuned()}
        arm_configs: dict[str, ExperimentConfig] = {}  # --lr-sweep: each arm's config at its tuned LRs

        def save(status: str) -> None:
            for name in runs:
                results[name] = summarise_model(runs[name], costs.get(name))
            results["comparison"] = comparison(runs, {name: results[name] for name in runs})
            header["status"] = status
            header["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds") if status != "running" else None
            write_json_atomic(results_path, results)

        try:
            if config.lr_sweep:
                arm_configs = run_lr_sweep(config, data, device, builders, results["lr_sweep"], save, log)
            for index, seed in enumerate(config.run_seeds):
                arms = list(config.arms)  # seed index i starts with arm i mod k: no arm always trains first
                order = arms[index % len(arms):] + arms[:index % len(arms)]
                header.setdefault("arm_order", {})[str(seed)] = order
                for name in order:
                    model = builders[name](config, seed=seed)
                    if name not in costs:  # once per arm, not per seed: the report builds and measures a cache
                        costs[name] = cost_report(model)
                    record = new_run_record(name, model, seed)
                    arm_config = arm_configs.get(name, config)
                    record.update(muon_lr=arm_config.muon_lr, adamw_lr=arm_config.adamw_lr,
                                  lr_multiplier=results["lr_sweep"]["arms"][name]["best_multiplier"] if name in arm_configs else 1.0)
                    runs[name].append(record)
                    try:
                        train_model(model, data, arm_config, seed, device, record)
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
                    if record["status"] == "completed" and config.sample_tokens > 0:
                        record["sample"] = greedy_sample(model, data, config, device)
                        log(f"{name} (seed {seed}) greedy sample: {config.sample_prompt}{record['sample']['text']!r}")
                    if config.save_checkpoints and record["status"] == "completed":
                        save_run_checkpoint(model, name, seed, record, data, config, log)
                    del model
                    release_memory(device)
                    save("running")
        except KeyboardInterrupt as stop:  # Ctrl-C, or RunTerminated from SIGTERM
            status = stop_status(stop)  # "interrupted" or "terminated"; the run in progress is that, not failed
            for name in runs:
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
        if config.lr_sweep:
            tuned = results["lr_sweep"]["arms"]
            log("LR tuned per arm (--lr-sweep): " + "; ".join(
                f"{name} x{tuned[name]['best_multiplier']:g} (muon_lr {tuned[name]['muon_lr']:.3g}, "
                f"adamw_lr {tuned[name]['adamw_lr']:.3g})" for name in config.arms if name in tuned))
        else:
            log(f"LR: {untuned()['note']}.")
        log(f"Results: {results_path}; plots: {', '.join(str(p) for p in plots)}")
        saved = [record["checkpoint"]["directory"] for name in runs for record in runs[name] if record["checkpoint"]]
        if saved:
            log(f"Models saved: {', '.join(saved)}")
        elif not config.save_checkpoints:
            log("Models not saved (--no-save).")
        return results
