"""The whole experiment on one page: check the setup, load the data, tune the LRs if asked, train every arm
(config.arms) once per seed, compare them, report.

Each step is a named piece with one job: `joined` (training/distributed.py) makes this process one rank of a
torchrun job or the only one; `preflight` refuses what cannot work before anything is loaded, the memory
estimate included; `output_folder` (training/resume.py) locks the folder and refuses, continues (--resume) or
moves aside the results already there; the `Ledger` owns the run records and writes the results JSON after
every change, and `stops_recorded` turns Ctrl-C, SIGTERM or a rank's failure into statuses and one last save;
`Runs` trains one (arm, seed) job and `run_jobs` shares the jobs out over the ranks.

Nothing finished is lost: each run's record is on disk the moment its training ends (its sample and saved
model follow and may fail without dropping it), a non-finite loss fails that run only, and an arm left with no
completed run makes the experiment "failed".
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Callable

import torch

from arms.registry import arm_builders
from common.errors import ConfigError
from config.settings import ExperimentConfig
from data.dataset import TokenData, exposure_line, prepare_data
from models.transformer import ModelBuilder
from training.distributed import Distributed, joined, on_device, run_jobs
from training.ledger import Ledger, stops_recorded
from training.lineup import lineup_of
from training.lr_sweep import untuned
from training.memory_plan import planned_vocab_size
from training.plots import plot_results
from training.preflight import check_memory, check_parallel, check_vocab_size, preflight
from training.provenance import experiment_header
from training.results import format_table
from training.resume import output_folder, resume_config
from training.run_guard import ExperimentFailed
from training.runs import Runs
from training.study_report import report_study


def run_experiment(config: ExperimentConfig, builders: Mapping[str, ModelBuilder] | None = None,
                   log: Callable[[str], None] = print, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train every arm of config.arms once per seed and write the JSON, plots and table; returns the results.

    `builders`: each arm's model builder (default: the registry's; tests inject faults through it). An output
    folder that already holds results is refused unless `resume` (continue it) or `overwrite` (move its
    results aside first). Started by torchrun, this process is one rank of several: rank 0 logs and writes,
    and the others train their share of the runs (--parallel seeds) or of every batch (--parallel data).
    """
    builders = builders or arm_builders()
    with joined(config, lambda mode: check_parallel(config, builders, mode)) as dist:
        device = dist.agree(lambda: preflight(config, builders, dist))
        dist = on_device(dist, device)
        log = dist.speaker(log)  # rank 0 alone speaks for the job
        with output_folder(config, dist, resume, overwrite, log) as previous:
            planned = config  # what preflight's memory estimate was made for
            if previous is not None:
                config = dist.agree(lambda: resume_config(planned, previous))
            data, config, fingerprint = load_data(config, planned, builders, device, dist, log)
            lineup = lineup_of(config)  # the arms, or a study's points
            header = experiment_header(config, data, device, dist, fingerprint, lineup.run_order)
            ledger = Ledger(config, header, dist, log, lineup)
            if previous is not None:
                dist.agree(lambda: ledger.continue_from(previous))
            announce(config, data, ledger, log)
            runs = Runs(config, builders, data, device, ledger, log, resumed=previous is not None)
            with stops_recorded(ledger):
                ledger.save("running")  # the settings are on disk from the start: a run killed early can resume
                runs.tune_learning_rates(previous)
                run_jobs(dist, runs.jobs(), runs.train, runs.absorb, runs.fail, ledger.unreported)
            failure = ledger.finish()
            if dist.is_main:
                report(ledger, config, log)
            if failure:
                raise ExperimentFailed(failure)
            return ledger.results


def load_data(config: ExperimentConfig, planned: ExperimentConfig, builders: Mapping[str, ModelBuilder],
              device: torch.device, dist: Distributed, log: Callable[[str], None]
              ) -> tuple[TokenData, ExperimentConfig, str]:
    """The tokens (each node's first rank fills the cache; every rank must hold the same ones), the config with the
    tokenizer's vocabulary, and the data's fingerprint. Preflight planned the memory for the largest vocabulary the
    tokenizer could have and for `planned`, the config before --resume (which may add arms): it is estimated
    again only when either falls short, since the data it counted is loaded now."""
    data = dist.in_turn(lambda: prepare_data(config, log))
    fingerprint = dist.agree(lambda: same_data_everywhere(data, dist))
    dist.agree(lambda: check_vocab_size(config, data))
    vocab_size = config.vocab_size or data.vocab_size
    plan_again = vocab_size > planned_vocab_size(planned) or config != planned
    config = config.replace(vocab_size=vocab_size)
    if plan_again:
        dist.agree(lambda: check_memory(config, builders, device, dist))
    return data, config, fingerprint


def data_fingerprint(data: TokenData) -> str:
    """SHA-256 of the train, tuning and validation tokens and the vocabulary size: equal on ranks that loaded
    the same data."""
    digest = hashlib.sha256(f"{data.vocab_size}:{len(data.train)}:{len(data.tune)}:{len(data.val)}".encode())
    for part in (data.train, data.tune, data.val):
        digest.update(part.cpu().numpy().tobytes())
    return digest.hexdigest()


def same_data_everywhere(data: TokenData, dist: Distributed) -> str:
    """The data's fingerprint (hashed once here), after checking that every rank's is rank 0's."""
    fingerprint = data_fingerprint(data)
    for rank, other in enumerate(dist.gather(fingerprint)):
        if other != fingerprint:
            raise ConfigError(f"rank {rank} loaded other tokens than rank 0 (one reached the Hub, the other did not, or "
                              "their --data files differ); give every node the same --data or --offline")
    return fingerprint


def announce(config: ExperimentConfig, data: TokenData, ledger: Ledger, log: Callable[[str], None]) -> None:
    """What the researcher is told before the first step: device, preset, seeds, where the results go, how the
    ranks share the work, how much data each run sees, and what one seed cannot tell."""
    header = ledger.header
    log(f"Device: {header['device_name']}; preset: {config.preset}; seeds: {list(config.run_seeds)}; "
        f"results: {ledger.path}")
    if ledger.dist.several:
        log(ledger.dist.describe(config.batch_size))
    log(exposure_line(header["data"], config.max_seq_len))
    if config.lr_sweep:
        log(f"Tuning set (--lr-sweep): {len(data.tune):,} tokens between the {len(data.train):,} training and "
            f"{len(data.val):,} validation tokens; the sweep selects on it alone, with seed {config.sweep_seed} "
            "(not a reported seed), and nothing trains on it.")
    if len(config.run_seeds) == 1:
        log("One seed: differences smaller than the seed-to-seed spread cannot be separated (use --seeds 42 43 44).")


def report(ledger: Ledger, config: ExperimentConfig, log: Callable[[str], None]) -> None:
    """Rank 0's last word: the plots, the table, the LRs each arm trained at, and where everything is (a study's
    own analysis, plots and verdicts: training/study_report.py)."""
    if config.studies:
        report_study(ledger, log)
        return
    results = ledger.results
    try:
        plots = plot_results(results, ledger.path.parent)
    except Exception as error:  # noqa: BLE001 - the results are saved; a plot that fails is said, not fatal
        plots = []
        log(f"Plots not drawn ({type(error).__name__}: {error}); the results are in {ledger.path}")
    log("\n" + format_table(results))
    tuned = results["lr_sweep"].get("arms", {})
    if config.lr_sweep:
        log("LR tuned per arm (--lr-sweep): " + "; ".join(
            f"{name} x{tuned[name]['best_multiplier']:g} (muon_lr {tuned[name]['muon_lr']:.3g}, "
            f"adamw_lr {tuned[name]['adamw_lr']:.3g}{', ' + tuned[name]['warning'] if tuned[name].get('at_grid_edge') else ''})"
            for name in config.arms if name in tuned))
    else:
        log(f"LR: {untuned()['note']}.")
    log(f"Results: {ledger.path}; plots: {', '.join(str(p) for p in plots) or 'none'}")
    saved = [record["checkpoint"]["directory"] for name in ledger.arms for record in ledger.runs_of(name)
             if record.get("checkpoint")]
    if saved:
        log(f"Models saved: {', '.join(saved)}")
    elif not config.save_checkpoints:
        log("Models not saved (--no-save).")
