"""The whole experiment: check the setup, load data, train every arm (config.arms) per seed, write results.

Results are written atomically the moment each model's training ends (its greedy sample and saved
model come after, and their failure is recorded, never fatal), so a failure or Ctrl-C later on keeps
what finished; a second Ctrl-C cannot cut a save short, and a save that fails (disk full) prints the
results instead. A non-finite loss fails that run only and the experiment goes on; an arm left with no
completed run makes the experiment "failed". Before anything is allocated the run's memory is
estimated and refused when the machine cannot hold it. Under torchrun the runs are shared out over
the ranks (training/distributed.py) and rank 0 writes the same results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from data.dataset import TokenData, exposure_line, exposure_report, prepare_data, validation_windows
from data.sources import check_local_path
from data.tokenizer import TOKENIZER_FILE, save_tokenizer
from atomic_files import atomic_directory
from experiment_config import MAX_DIST_TIMEOUT_MINUTES, ConfigError, ExperimentConfig
from hardware import BF16, cuda_capability, device_name, precision_label, release_memory, resolve_device, resolve_precision
from inference.generate import cache_mode_for, generate_text
from models.attention_ops import FLASH_ATTN_INSTALL, flash_attn_import_error, flash_attn_unusable
from models.checkpoint import ModelBuilder, arm_builders, run_checkpoint_dir, save_checkpoint
from models.costs import cost_report
from models.memory import check_fits
from models.transformer import MoELanguageModel
from reporting import check_writable, json_safe, write_json_atomic
from training.lr_sweep import run_lr_sweep, scaled_lrs, untuned
from training.plots import plot_results
from arms import ordered_arms
from training.memory_plan import ADVICE, experiment_memory, planned_vocab_size
from training.metrics_log import MetricsLog, check_loggers
from training.results import RESULTS_FILE, STOPPED_STATUSES, comparison, format_table, summarise_model
from training.resume import finished_runs, prepare_output_dir, resume_config
from training.distributed import (NONE, Distributed, Job, RankFailed, Trained, agree_before_joining, check_same_config,
                                  init_distributed, launch_from_env, on_device, rendezvous, resolve_parallel, run_jobs,
                                  shutdown)
from training.run_guard import (ExperimentFailed, SaveFailed, output_dir_lock, sigterm_raises_run_terminated,
                                signals_deferred, stop_status)
from training.train_state import TrainingState, state_path
from training.trainer import CURVE_KEYS, NonFiniteLoss, check_cuda_graph, new_run_record, step_mode_label, train_model

MODEL_BUILDERS: dict[str, ModelBuilder] = arm_builders()
REPO_ROOT = Path(__file__).resolve().parent.parent


def preflight(config: ExperimentConfig, local_rank: int | None = None,
              builders: dict[str, ModelBuilder] | None = None, batch_shards: int = 1, processes: int = 1) -> torch.device:
    """Every check that can fail before any data is loaded or any step is trained (`local_rank`: this
    process's rank on its node, under torchrun), the memory estimate included: `batch_shards` ranks share
    each batch (data-parallel), `processes` ranks share this machine's RAM."""
    config.validate()
    device = resolve_device(config, local_rank)
    check_flash_attn(config, device)
    if config.compile and resolve_precision(config, device) != "bf16":
        raise ConfigError("--compile needs bf16 (the grouped-GEMM MoE compiles only in bf16): add --precision bf16, "
                          "or drop --compile")
    if config.cuda_graph:
        check_cuda_graph(config, device)
    if config.data_path:
        check_local_path(config.data_path)
    check_loggers(config)
    check_memory(config, builders or MODEL_BUILDERS, device, batch_shards, processes)
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


def check_memory(config: ExperimentConfig, builders: dict[str, ModelBuilder], device: torch.device,
                 batch_shards: int = 1, processes: int = 1) -> None:
    """ConfigError unless this machine holds the run's estimated memory (training/memory_plan.py): `batch_shards`
    ranks share each batch (data-parallel), `processes` ranks share this machine's RAM."""
    check_fits(experiment_memory(config, builders, batch_shards), device, ADVICE, processes)


def check_flash_attn(config: ExperimentConfig, device: torch.device) -> None:
    """Import flash-attn once, before any data is loaded: `--attention-backend flash-attn` stops here when
    it cannot run (not installed, a wheel built for another torch, fp32, no or an unsupported GPU); `auto`
    falls back to SDPA and its run's backend line says why (deepseek_modeling)."""
    if config.attention_backend == "auto" and device.type == "cuda":
        flash_attn_import_error()
    if config.attention_backend != "flash-attn":
        return
    if device.type != "cuda":
        raise ConfigError("--attention-backend flash-attn needs a CUDA GPU; use --attention-backend sdpa on CPU")
    if resolve_precision(config, device) != BF16:
        raise ConfigError("--attention-backend flash-attn with --precision fp32: flash-attn runs only in fp16/bf16; "
                          "use --precision bf16 (or auto), or --attention-backend sdpa")
    reason = flash_attn_unusable(cuda_capability(device))
    if reason is None:
        return
    fix = "use --attention-backend auto (SDPA's FlashAttention kernel)"
    if reason == flash_attn_import_error():  # the package is missing or broken, not the card unsupported
        fix = f"run `{FLASH_ATTN_INSTALL}` (it builds against the installed torch), or {fix}"
    raise ConfigError(f"--attention-backend flash-attn: {reason}; {fix}")


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "tokenizers", "datasets", "numpy", "scipy", "matplotlib", "flash-attn"):
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


def _experiment_header(config: ExperimentConfig, data: TokenData, device: torch.device,
                       dist: Distributed) -> dict[str, Any]:
    n_val_windows = len(validation_windows(data.val, config.max_seq_len)[0])
    return {
        "question": "Does DeepSeek-V3 MLA (via FlashAttention-2) beat standard multi-head attention in the same MoE LM?",
        "config": config.to_dict(),
        "preset_note": ("CPU preset: a scaled-down model and run so that it finishes in minutes on a CPU; "
                        "not the full experiment") if config.preset == "cpu" else "full experiment",
        "seeds": list(config.run_seeds),
        "data": {**data.info, **exposure_report(len(data.train), config)},  # exact, recounted from every seed's windows
        "validation": validation_line(config, data, n_val_windows),
        "lr_schedule": f"linear warmup over {config.warmup_steps} steps, cosine to {config.min_lr_ratio} x base LR at step {config.max_steps}",
        "device": str(device),
        "device_name": device_name(device),
        "precision": precision_label(resolve_precision(config, device)),
        "compile": config.compile,
        "step_mode": step_mode_label(config),
        "distributed": dist.record(),
        "library_versions": _library_versions(),
        "git_commit": _git_commit(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "finished_at": None,
        "status": "running",
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


def save_run_checkpoint(model: MoELanguageModel, name: str, seed: int, record: dict[str, Any], data: TokenData,
                        config: ExperimentConfig) -> None:
    """Save a completed run's model, config and tokenizer to OUTPUT_DIR/checkpoints/<name>-seed<seed>/ and
    note it in `record["checkpoint"]`. The folder appears whole or not at all (built beside it, then renamed).
    A failure is recorded (`checkpoint_error`, with `checkpoint_directory`), never raised: the run's results
    matter more than its weights."""
    directory = run_checkpoint_dir(Path(config.output_dir), name, seed)
    try:
        with atomic_directory(directory) as staging:  # a save cut short leaves no half folder
            # a Hub tokenizer that is not in the local cache is saved as its name alone
            tokenizer = save_tokenizer(data.tokenizer or config.tokenizer_name, staging)
            extra = {"seed": seed, "tokenizer": tokenizer, "data": data.info.get("corpus_description"),
                     **{key: record.get(key) for key in ("val_loss", "val_accuracy", "val_perplexity", "tokens_seen", "precision")}}
            saved = save_checkpoint(model, name, staging, extra)
            files = dict(saved["files"])
            if "file" in tokenizer:
                files[TOKENIZER_FILE] = (staging / TOKENIZER_FILE).stat().st_size
    except Exception as error:  # noqa: BLE001 - disk full, permissions, ...: keep the results, say so, go on
        record.update(checkpoint_error=f"{type(error).__name__}: {error}", checkpoint_directory=str(directory))
        return
    record["checkpoint"] = {"directory": str(directory), "bytes": sum(files.values()), "files": files}


def add_extras(model: MoELanguageModel, name: str, seed: int, record: dict[str, Any], data: TokenData,
               config: ExperimentConfig, device: torch.device) -> None:
    """The greedy sample and the saved model of a completed run, after its record is saved: a failure in
    either is recorded in the run (`sample_error`, `checkpoint_error`) and never drops the run or stops
    the experiment."""
    if config.sample_tokens > 0:
        try:
            record["sample"] = greedy_sample(model, data, config, device)
        except Exception as error:  # noqa: BLE001 - out of memory, a tokenizer problem, ...: the run stands
            record["sample_error"] = f"{type(error).__name__}: {error}"
    if config.save_checkpoints:
        save_run_checkpoint(model, name, seed, record, data, config)


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
                   log: Callable[[str], None] = print, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train every arm of config.arms once per seed and write JSON, plots and the table; returns the results.

    An output folder that already holds results is refused, unless `resume` (continue it: training/resume.py)
    or `overwrite` (move its results aside first). Started by torchrun, this process is one rank of several
    (training/distributed.py): rank 0 logs and writes, and the others train their share of the runs
    (--parallel seeds) or of every batch (--parallel data).
    """
    builders = builders or MODEL_BUILDERS
    launch = launch_from_env()
    store = None
    if launch.several:  # the ranks meet in torchrun's store first: same settings everywhere, or every rank stops
        store = rendezvous(launch, join_minutes(config))
        check_same_config(store, launch, config.to_dict())
    problem, mode, device_type = None, NONE, "cpu"
    try:  # follows from the config and the machine: shared through the store, so rank 0 can say it
        config.validate()
        mode = resolve_parallel(config, launch.world_size)
        if config.cuda_graph and mode == "data":
            raise ConfigError("--cuda-graph captures one process's step; with --parallel data the gradient all-reduce "
                              "would be inside it: use --parallel seeds, or drop --cuda-graph")
        missing = [arm for arm in config.arms if arm not in builders]
        if missing:
            raise ConfigError(f"--arms {' '.join(config.arms)}: no model class for {', '.join(missing)}")
        device_type = resolve_device(config).type  # cuda or cpu; each rank's own GPU is chosen after joining
    except ConfigError as error:
        if not launch.several:
            raise
        problem = str(error)
    if launch.several:
        agree_before_joining(store, launch, problem)
    dist = init_distributed(config, launch, mode, device_type, store)
    try:
        # every check that can fail on one rank alone (its GPU, its folders) is agreed, so rank 0 can say it
        shards = dist.world_size if dist.data_parallel else 1
        device = dist.agree(lambda: preflight(config, dist.local_rank if dist.several else None, builders, shards,
                                              dist.local_world_size))
        dist = on_device(dist, device)
        return _run(config, builders, log if dist.is_main else _quiet, dist, device, resume, overwrite)
    finally:
        # already stopping (an error on its way to the CLI's one line): a late SIGTERM, e.g. torchrun stopping
        # every rank once one has died, must not kill the process before that line is printed
        with signals_deferred(redeliver=sys.exc_info()[1] is None):
            shutdown(dist)


def join_minutes(config: ExperimentConfig) -> float:
    """How long the ranks wait for each other at the rendezvous: --dist-timeout when it is valid (else the
    default; the error is reported once the ranks have met)."""
    minutes = config.dist_timeout_minutes
    valid = isinstance(minutes, (int, float)) and 0 < minutes <= MAX_DIST_TIMEOUT_MINUTES
    return float(minutes) if valid else ExperimentConfig.dist_timeout_minutes


def check_vocab_size(config: ExperimentConfig, data: TokenData) -> None:
    if config.vocab_size is not None and config.vocab_size < data.vocab_size:
        raise ConfigError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {data.vocab_size}; leave it unset")


def _quiet(line: str) -> None:
    """The log of ranks other than 0: rank 0 alone speaks for the job."""


def data_fingerprint(data: TokenData) -> str:
    """SHA-256 of the train, tuning and validation tokens and the vocabulary size: equal on ranks that loaded
    the same data."""
    digest = hashlib.sha256(f"{data.vocab_size}:{len(data.train)}:{len(data.tune)}:{len(data.val)}".encode())
    for part in (data.train, data.tune, data.val):
        digest.update(part.cpu().numpy().tobytes())
    return digest.hexdigest()


def _same_data_everywhere(data: TokenData, dist: Distributed) -> str:
    """The data's fingerprint (data_fingerprint, hashed once here), after checking that every rank's is rank 0's."""
    fingerprint = data_fingerprint(data)
    prints = dist.gather(fingerprint) if dist.several else [fingerprint]
    for rank, other in enumerate(prints):
        if other != prints[0]:
            raise ConfigError(f"rank {rank} loaded other tokens than rank 0 (one reached the Hub, the other did not, or "
                              "their --data files differ); give every node the same --data or --offline")
    return fingerprint


def _run(config: ExperimentConfig, builders: dict[str, ModelBuilder], log: Callable[[str], None],
         dist: Distributed, device: torch.device, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The experiment as this rank runs it, once it has joined the job and has its device: every step
    that could fail on one rank alone goes through dist.agree, so that all ranks stop together."""
    lock = contextlib.ExitStack()
    output_dir = Path(config.output_dir)
    planned = config  # what preflight's memory estimate was made for
    # One run per output folder: a second one stops here, before any data is loaded, naming this one's pid.
    # SIGTERM (timeout, a scheduler) raises RunTerminated, which the Ctrl-C branch below records.
    with lock, sigterm_raises_run_terminated():
        dist.agree(lambda: lock.enter_context(output_dir_lock(output_dir)) if dist.is_main else None)
        # a folder that holds results: refused, continued (--resume) or moved aside (--overwrite); rank 0 decides
        previous = dist.gather(dist.agree(lambda: prepare_output_dir(output_dir, resume, overwrite, log)
                                          if dist.is_main else None))[0]
        if previous is not None:
            config = dist.agree(lambda: resume_config(config, previous))
        data = dist.in_turn(lambda: prepare_data(config, log))  # each node's first rank fills the cache
        fingerprint = dist.agree(lambda: _same_data_everywhere(data, dist))
        dist.agree(lambda: check_vocab_size(config, data))
        vocab_size = config.vocab_size or data.vocab_size
        # preflight planned for the largest vocabulary the tokenizer could have, and for the config before --resume
        # (which may add arms): estimated again only when either falls short (the data it counted is loaded now)
        plan_again = vocab_size > planned_vocab_size(planned) or config != planned
        config = config.replace(vocab_size=vocab_size)
        if plan_again:
            dist.agree(lambda: check_memory(config, builders, device, dist.world_size if dist.data_parallel else 1,
                                            dist.local_world_size))
        results_path = output_dir / RESULTS_FILE

        header = _experiment_header(config, data, device, dist)
        header["data_sha256"] = fingerprint
        kept: dict[tuple[str, int], dict[str, Any]] = {}  # --resume: the runs already finished
        if previous is not None:
            dist.agree(lambda: _same_data_as_before(header, previous, output_dir))
            kept = finished_runs(previous)
            header["started_at"] = previous["experiment"].get("started_at")
            header["resumed_at"] = previous["experiment"].get("resumed_at", []) + [
                dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")]
            log(f"Resume: {len(kept)} finished run(s) kept from {results_path}; "
                f"{len(config.run_seeds) * len(config.arms) - len(kept)} to train.")
        log(f"Device: {header['device_name']}; preset: {config.preset}; seeds: {list(config.run_seeds)}; results: {results_path}")
        if dist.several:
            log(parallel_line(dist, config))
        log(exposure_line(header["data"], config.max_seq_len))
        if config.lr_sweep:
            log(f"Tuning set (--lr-sweep): {len(data.tune):,} tokens between the {len(data.train):,} training and "
                f"{len(data.val):,} validation tokens; the sweep selects on it alone, with seed {config.sweep_seed} "
                "(not a reported seed), and nothing trains on it.")
        if len(config.run_seeds) == 1:
            log("One seed: differences smaller than the seed-to-seed spread cannot be separated (use --seeds 42 43 44).")

        arms = ordered_arms(config.arms)  # JSON: registry order
        records: dict[tuple[str, int], dict[str, Any]] = dict(kept)  # (arm, seed) -> its run, listed in seed order
        costs: dict[str, dict[str, Any]] = {name: previous[name]["costs"] for name in arms
                                            if previous and (previous.get(name) or {}).get("costs")}
        results: dict[str, Any] = {"experiment": header, "lr_sweep": untuned()}
        arm_configs: dict[str, ExperimentConfig] = {}  # --lr-sweep: each arm's config at its tuned LRs
        started: dict[int, str] = {}  # rank -> the run it started last (this rank's; every rank's under data-parallel)
        metrics = MetricsLog(config, output_dir) if dist.is_main else None  # only rank 0 logs

        def runs_of(name: str) -> list[dict[str, Any]]:
            return [records[(name, seed)] for seed in config.run_seeds if (name, seed) in records]

        def save(status: str) -> None:
            if not dist.is_main:
                return
            runs = {name: runs_of(name) for name in arms}
            for name in arms:
                results[name] = summarise_model(runs[name], costs.get(name))
            results["comparison"] = comparison(runs, {name: results[name] for name in arms})
            header["status"] = status
            header["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds") if status != "running" else None
            try:
                # a Ctrl-C (or SIGTERM) now waits for the file: a save is never cut short
                with signals_deferred(redeliver=status == "running"):
                    write_json_atomic(results_path, results)
            except OSError as error:  # disk full, folder gone: the results go to the terminal instead
                log(json.dumps(json_safe(results), indent=2))
                message = (f"cannot write the results to {results_path} ({error.strerror or error}); the results so far "
                           "are printed above as JSON: free some space or choose another --output-dir")
                dist.post_failure(f"rank {dist.rank} failed: {message}")
                raise SaveFailed(message) from None

        def unreported(jobs: list[Job]) -> None:
            """Other ranks' runs in progress when this rank stopped: listed, so that a stop names them."""
            for job in jobs:
                records.setdefault((job.name, job.seed), unreported_run(job))

        def mark_unfinished(status: str, lost: set[int], lost_message: str | None = None) -> None:
            """Give every run still running its final status; one on a lost rank failed with it."""
            for record in records.values():
                if record["status"] != "running":
                    continue
                if lost_message and (record.get("rank") in lost or lost and record.get("rank") is None):
                    record.update(status="failed", failure=lost_message)
                else:
                    record["status"] = status

        def training_state(job: Job) -> TrainingState:
            return TrainingState(state_path(output_dir, job.name, job.seed), resume=previous is not None)

        def saved_so_far() -> str:
            """What a stopped or failed experiment leaves, in words that are true of it."""
            completed = sum(r["status"] == "completed" for r in records.values())
            failed = sum(r["status"] == "failed" for r in records.values())
            stopped = [key for key, r in records.items() if r["status"] in STOPPED_STATUSES + ("running",)]
            words = (f"{completed} completed{f' and {failed} failed' if failed else ''} run(s) are saved in {results_path}"
                     if completed or failed else f"no run had finished (the settings are saved in {results_path})")
            if stopped:
                saved = any(state_path(output_dir, *key).exists() for key in stopped)
                words += f"; rerun with --resume to continue{' from the last training state' if saved else ''}"
            return words

        def train(job: Job) -> Trained:
            name, seed = job.name, job.seed
            started.update(dict.fromkeys(range(dist.world_size) if dist.data_parallel else [dist.rank], job.label))
            model = builders[name](config, seed=seed)
            if dist.is_main and name not in costs:  # once per arm, not per seed: the report builds and measures a cache
                costs[name] = cost_report(model)
            record = new_run_record(name, model, seed)
            arm_config = arm_configs.get(name, config)
            record.update(muon_lr=arm_config.muon_lr, adamw_lr=arm_config.adamw_lr,
                          lr_multiplier=results["lr_sweep"]["arms"][name]["best_multiplier"] if name in arm_configs else 1.0,
                          **run_placement(dist))
            records[(name, seed)] = record  # the run in progress is in the JSON too, so a stop keeps its curve
            run_log = metrics.run(name, seed) if metrics is not None else None
            try:
                train_model(model, data, arm_config, seed, device, record, dist, training_state(job), run_log)
            except NonFiniteLoss as failure:
                record.update(status="failed", failure=str(failure), failed_at_step=failure.step)
            except Exception as error:  # noqa: BLE001 - stops the experiment (run_jobs), but is recorded first
                record.update(status="failed", failure=f"{type(error).__name__}: {error}")
                return record, error
            finally:
                if run_log is not None:
                    run_log.close()
            writes = dist.is_main or not dist.data_parallel  # under data-parallel every rank holds the same model
            if record["status"] == "completed" and writes:
                save("running")  # the run is on disk the moment its training ends, before the extras below
                add_extras(model, name, seed, record, data, config, device)
            del model
            release_memory(device)
            return record, None

        def absorb(job: Job, record: dict[str, Any]) -> None:
            records[(job.name, job.seed)] = record
            if record["status"] == "failed" and "failed_at_step" not in record:
                return  # a crash: fail() below says it
            if metrics is not None and dist.seed_parallel and job.owner != dist.rank:  # trained on another rank
                metrics.replay(job.name, job.seed, record["curve"])
            for line in run_lines(job, record, dist):
                log(line)
            save("running")
            trained_here = job.owner == dist.rank if dist.seed_parallel else dist.is_main
            if trained_here and not config.keep_training_state:  # its record is saved: its state is not needed
                training_state(job).delete()

        def fail(job: Job, message: str) -> None:
            if dist.several:
                header["failure"] = message
            save("failed")
            if not dist.several:  # the traceback follows
                log(f"{job.label} crashed; {saved_so_far()}")
            elif message.startswith(f"rank {dist.rank} "):  # rank 0's own run: its traceback follows
                log(f"{message}; every rank stops, and {saved_so_far()}")

        def record_stop(stop: KeyboardInterrupt) -> None:
            """Ctrl-C or SIGTERM: give the runs in progress their status and save; RankFailed when the stop
            came from another rank's failure (its note), or from a rank lost without a word."""
            status = stop_status(stop)  # "interrupted" or "terminated"; the run in progress is that, not failed
            # another rank failed or was stopped first; torchrun stops every rank when one died, and one that left
            # no note was lost without a word (no wait for a late note: this stop was asked for)
            stopped_by = (dist.failure_cause({**started, **runs_in_progress(records.values(), dist.world_size)}, wait_s=0)
                          if dist.several else None)
            cause = str(stopped_by) if stopped_by else None
            lost = set() if stopped_by is None or stopped_by.lost_rank is None else {stopped_by.lost_rank}
            mark_unfinished(status, lost, cause)
            if cause and not cause.startswith(f"rank {dist.rank} "):
                header["failure"] = cause
                save("failed" if lost else status)
                raise RankFailed(f"{cause}; every rank stopped, and {saved_so_far()}")
            save(status)
            what = "Terminated by SIGTERM" if status == "terminated" else "Interrupted"
            log(f"{what}: {saved_so_far()}")

        def record_rank_failure(failure: RankFailed) -> None:
            """Another rank crashed, was stopped or vanished: runs it cut short are interrupted, those of a rank
            lost without a word failed; the experiment failed."""
            mark_unfinished("interrupted", set() if failure.lost_rank is None else {failure.lost_rank}, str(failure))
            header["failure"] = str(failure)
            save("failed")

        try:
            save("running")  # the settings are on disk from the start: a run killed before its first result can resume
            if config.lr_sweep:
                reused = previous_sweep(previous, config)
                if reused is not None:
                    results["lr_sweep"], arm_configs = reused
                    log("LR sweep: every arm's tuned LR kept from the results being resumed.")
                else:
                    arm_configs = run_lr_sweep(config, data, device, builders, results["lr_sweep"], save, log, dist)
            header["arm_order"] = {str(seed): seed_arm_order(config.arms, index) for index, seed in enumerate(config.run_seeds)}
            jobs = [job for job in comparison_jobs(config, dist) if (job.name, job.seed) not in kept]
            run_jobs(dist, [dataclasses.replace(job, index=index) for index, job in enumerate(jobs)], train, absorb, fail,
                     unreported)
        except KeyboardInterrupt as stop:  # Ctrl-C, or RunTerminated from SIGTERM
            with signals_deferred(redeliver=False):  # stopping already: a second Ctrl-C waits until it is recorded
                record_stop(stop)
            raise
        except RankFailed as failure:
            with signals_deferred(redeliver=False):
                record_rank_failure(failure)
            raise RankFailed(f"{failure}; every rank stopped, and {saved_so_far()}") from None

        unfinished = [name for name in arms if not any(record["status"] == "completed" for record in runs_of(name))]
        if unfinished:
            header["failure"] = f"no run of {', '.join(unfinished)} completed: nothing to compare"
        save("failed" if unfinished else "completed")
        if not dist.is_main:
            if unfinished:
                raise ExperimentFailed(header["failure"])
            return results
        try:
            plots = plot_results(results, output_dir)
        except Exception as error:  # noqa: BLE001 - the results are saved; a plot that fails is said, not fatal
            plots = []
            log(f"Plots not drawn ({type(error).__name__}: {error}); the results are in {results_path}")
        log("\n" + format_table(results))
        if config.lr_sweep:
            tuned = results["lr_sweep"]["arms"]
            log("LR tuned per arm (--lr-sweep): " + "; ".join(
                f"{name} x{tuned[name]['best_multiplier']:g} (muon_lr {tuned[name]['muon_lr']:.3g}, "
                f"adamw_lr {tuned[name]['adamw_lr']:.3g}{', ' + tuned[name]['warning'] if tuned[name].get('at_grid_edge') else ''})"
                for name in config.arms if name in tuned))
        else:
            log(f"LR: {untuned()['note']}.")
        log(f"Results: {results_path}; plots: {', '.join(str(p) for p in plots) or 'none'}")
        saved = [record["checkpoint"]["directory"] for name in arms for record in runs_of(name) if record.get("checkpoint")]
        if saved:
            log(f"Models saved: {', '.join(saved)}")
        elif not config.save_checkpoints:
            log("Models not saved (--no-save).")
        if unfinished:
            raise ExperimentFailed(f"{header['failure']} (see seeds_failed in {results_path})")
        return results


def previous_sweep(previous: dict[str, Any] | None, config: ExperimentConfig
                   ) -> tuple[dict[str, Any], dict[str, ExperimentConfig]] | None:
    """The LR sweep of the results being resumed and each arm's config at its tuned LRs, when that sweep
    finished for every arm of `config`; None when it must run (again: its runs are short and have no state)."""
    sweep = (previous or {}).get("lr_sweep") or {}
    tuned = sweep.get("arms") or {}
    if not sweep.get("tuned") or any((tuned.get(name) or {}).get("best_multiplier") is None for name in config.arms):
        return None
    return sweep, {name: scaled_lrs(config, tuned[name]["best_multiplier"]) for name in config.arms}


def _same_data_as_before(header: dict[str, Any], previous: dict[str, Any], output_dir: Path) -> None:
    """--resume: the tokens must be those the kept runs trained on (e.g. not the offline corpus after the Hub)."""
    before = previous["experiment"].get("data_sha256")
    if before is not None and before != header["data_sha256"]:
        was = previous["experiment"].get("data", {}).get("corpus_description", "?")
        raise ConfigError(f"--resume: the data differs from the results in {output_dir} (they trained on {was}; "
                          f"this run loaded {header['data'].get('corpus_description', '?')}); give the same data "
                          "(--data, --offline, the same cache) or start a fresh --output-dir")


def seed_arm_order(arms: tuple[str, ...], seed_index: int) -> list[str]:
    """The order the arms train in on the seed_index-th seed: starting with arm seed_index mod k, so that no
    arm always trains first (a warm cache, a cooler GPU)."""
    shift = seed_index % len(arms)
    return list(arms[shift:] + arms[:shift])


def comparison_jobs(config: ExperimentConfig, dist: Distributed) -> list[Job]:
    """Every (arm, seed) run in the sequential order; under seed-parallel, seed i belongs to rank i mod world size."""
    jobs: list[Job] = []
    for index, seed in enumerate(config.run_seeds):
        for name in seed_arm_order(config.arms, index):
            jobs.append(Job(index=len(jobs), name=name, seed=seed, owner=index % dist.world_size,
                            label=f"{name} (seed {seed})"))
    return jobs


def runs_in_progress(records: Iterable[dict[str, Any]], world_size: int) -> dict[int, str]:
    """rank -> the run it was training, from the records still running (a data-parallel run, rank None, is every rank's)."""
    doing: dict[int, str] = {}
    for record in records:
        if record["status"] == "running":
            label = f"{record['model_name']} (seed {record['seed']})"
            ranks = range(world_size) if record.get("rank") is None else [record["rank"]]
            doing.update(dict.fromkeys(ranks, label))
    return doing


def unreported_run(job: Job) -> dict[str, Any]:
    """The record rank 0 keeps of another rank's run whose own record never arrived (the job stopped first)."""
    return {"model_name": job.name, "seed": job.seed, "status": "running", "rank": job.owner, "world_size": 1,
            "val_loss": None, "val_accuracy": None, "val_perplexity": None, "checkpoint": None,
            "note": f"trained on rank {job.owner}; the job stopped before its record reached rank 0",
            "curve": {key: [] for key in CURVE_KEYS}}


def run_placement(dist: Distributed) -> dict[str, Any]:
    """Where a run was trained, for its record: the rank (None: all ranks, under data-parallel) and how many ranks."""
    if dist.data_parallel:
        return {"rank": None, "world_size": dist.world_size}
    return {"rank": dist.rank, "world_size": 1}


def run_lines(job: Job, record: dict[str, Any], dist: Distributed) -> list[str]:
    """What rank 0 says about a run that ended: its result (or failure), its greedy sample, its saved model."""
    where = f"{job.label} [rank {record['rank']}]" if dist.seed_parallel else job.label
    if record["status"] == "failed":
        return [f"{where} FAILED: {record['failure']}; its run is marked failed and the experiment goes on."]
    lines = [f"{where}: val loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.4f}, "
             f"{record['training_time_minutes'] * 60:.1f} s training, attention {', '.join(record['attention_backend'])}"]
    if record.get("replicas_identical") is False:
        lines.append(f"{job.label}: WARNING: the data-parallel replicas ended with different weights "
                     "(a nondeterministic kernel?); rank 0's model is the one evaluated and saved.")
    if record.get("sample"):
        lines.append(f"{job.label} greedy sample: {record['sample']['prompt']}{record['sample']['text']!r}")
    if record.get("sample_error"):
        lines.append(f"{job.label}: its greedy sample FAILED ({record['sample_error']}); its results are kept and the "
                     "experiment goes on.")
    if record.get("checkpoint"):
        lines.append(f"{job.label}: model saved to {record['checkpoint']['directory']} "
                     f"({record['checkpoint']['bytes'] / 1e6:.1f} MB)")
    if record.get("checkpoint_error"):
        lines.append(f"{job.label}: saving the model to {record['checkpoint_directory']} FAILED "
                     f"({record['checkpoint_error']}); its results are kept and the experiment goes on.")
    return lines


def parallel_line(dist: Distributed, config: ExperimentConfig) -> str:
    """The one log line that says how the ranks share the work."""
    devices = sorted({rank["device_name"] for rank in dist.devices})
    hosts = len({rank["host"] for rank in dist.devices})
    where = f"{dist.world_size} ranks on {hosts} node{'s' if hosts > 1 else ''} ({dist.backend}; {', '.join(devices)})"
    if dist.seed_parallel:
        return (f"Parallel: seeds over {where}: seed i trains on rank i mod {dist.world_size}, every arm of it, "
                "exactly as one process would")
    local = config.batch_size // dist.world_size
    return (f"Parallel: data over {where}: each global batch of {config.batch_size} is split into "
            f"{dist.world_size} x {local} sequences, gradients averaged by DistributedDataParallel")
