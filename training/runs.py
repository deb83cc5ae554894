"""The comparison's runs: every arm once per seed, each a Job that this rank trains (or hears of from another
rank) and records in the ledger.

`run_jobs` (training/distributed.py) decides which rank trains which job; `Runs` says what training one means:
build the arm's model from the seed, train it at the arm's (tuned) LRs, put its record in the ledger the moment
training ends, then add its greedy sample and saved model. A non-finite loss fails that run only; a crash stops
the experiment, recorded first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from common.hardware import release_memory
from config.settings import ExperimentConfig
from data.dataset import TokenData
from models.transformer import ModelBuilder, MoELanguageModel
from training.distributed import Distributed, Job, Trained
from training.ledger import Ledger
from training.lr_sweep import run_lr_sweep, scaled_lrs
from training.metrics_log import MetricsLog
from training.provenance import seed_arm_order
from training.run_outputs import add_extras
from training.train_state import TrainingState, state_path
from training.trainer import NonFiniteLoss, new_run_record, train_model


class Runs:
    """The comparison's runs as this rank trains them: `train`, `absorb` and `fail` are run_jobs' three steps."""

    def __init__(self, config: ExperimentConfig, builders: Mapping[str, ModelBuilder], data: TokenData,
                 device: torch.device, ledger: Ledger, log: Callable[[str], None], resumed: bool) -> None:
        self.config = config
        self.builders = builders
        self.data = data
        self.device = device
        self.ledger = ledger
        self.dist: Distributed = ledger.dist
        self.log = log
        self.resumed = resumed  # training states found in the folder are continued
        self.arm_configs: dict[str, ExperimentConfig] = {}  # --lr-sweep: each arm's config at its tuned LRs
        self.metrics = MetricsLog(config, Path(config.output_dir)) if self.dist.is_main else None  # rank 0 logs

    def jobs(self) -> list[Job]:
        """Every (arm, seed) run not kept from earlier results, in the sequential order; under seed-parallel seed
        i belongs to rank i mod world size."""
        jobs = comparison_jobs(self.config, self.dist, self.ledger.lineup.run_order)
        jobs = [job for job in jobs if (job.name, job.seed) not in self.ledger.kept]
        return [dataclasses.replace(job, index=index) for index, job in enumerate(jobs)]

    def tune_learning_rates(self, previous: dict[str, Any] | None) -> None:
        """--lr-sweep: each arm's LRs, from the results being resumed when their sweep stands, else swept now."""
        if not self.config.lr_sweep:
            return
        reused = previous_sweep(previous, self.config)
        if reused is not None:
            self.ledger.results["lr_sweep"], self.arm_configs = reused
            self.log("LR sweep: every arm's tuned LR kept from the results being resumed.")
            return
        self.arm_configs = run_lr_sweep(self.config, self.data, self.device, self.builders,
                                        self.ledger.results["lr_sweep"], self.ledger.save, self.log, self.dist)

    # --- run_jobs' three steps ---------------------------------------------------------------------------
    def train(self, job: Job) -> Trained:
        """Train one run here; returns its record and the error that stopped it (a crash), or None."""
        entry = self.ledger.lineup.entry(job.name)
        self.ledger.starting(job)
        model = self.builders[entry.arm](entry.config, seed=job.seed)
        record = self.new_record(job, model)
        self.ledger.add(job, record, model)  # the run in progress is in the JSON too, so a stop keeps its curve
        run_log = self.metrics.run(job.name, job.seed) if self.metrics is not None else None
        try:
            train_model(model, self.data, self.config_of(job.name), job.seed, self.device, record, self.dist,
                        self.training_state(job), run_log)
        except NonFiniteLoss as failure:
            record.update(status="failed", failure=str(failure), failed_at_step=failure.step)
        except Exception as error:  # noqa: BLE001 - stops the experiment (run_jobs), but is recorded first
            record.update(status="failed", failure=f"{type(error).__name__}: {error}")
            return record, error
        finally:
            if run_log is not None:
                run_log.close()
        if record["status"] == "completed" and self.dist.saves_models:
            self.ledger.save("running")  # the run is on disk the moment its training ends, before the extras below
            add_extras(model, job.name, entry.arm, job.seed, record, self.data, self.config, self.device)
        del model
        release_memory(self.device)
        return record, None

    def absorb(self, job: Job, record: dict[str, Any]) -> None:
        """A run that ended, here or on another rank: into the ledger, said in the log, saved."""
        self.ledger.add(job, record)
        if record["status"] == "failed" and "failed_at_step" not in record:
            return  # a crash: fail() says it
        if self.metrics is not None and self.dist.trained_elsewhere(job):
            self.metrics.replay(job.name, job.seed, record["curve"])
        for line in run_lines(job, record, self.dist):
            self.log(line)
        self.ledger.save("running")
        if self.dist.owns(job) and not self.config.keep_training_state:  # its record is saved: its state is not needed
            self.training_state(job).delete()

    def fail(self, job: Job, message: str) -> None:
        self.ledger.crashed(job, message)

    # --- helpers --------------------------------------------------------------------------------------
    def new_record(self, job: Job, model: MoELanguageModel) -> dict[str, Any]:
        """A run's record as it starts: the trainer's fields, the LRs it trains at and where it trains."""
        record = new_run_record(job.name, model, job.seed)
        arm_config = self.config_of(job.name)
        tuned = self.ledger.results["lr_sweep"].get("arms", {}).get(job.name, {})
        record.update(muon_lr=arm_config.muon_lr, adamw_lr=arm_config.adamw_lr,
                      lr_multiplier=tuned["best_multiplier"] if job.name in self.arm_configs else 1.0,
                      **self.dist.placement())
        return record

    def config_of(self, name: str) -> ExperimentConfig:
        """The config an entry trains with: its own, at its arm's tuned LRs after --lr-sweep."""
        return self.arm_configs.get(name, self.ledger.lineup.entry(name).config)

    def training_state(self, job: Job) -> TrainingState:
        return TrainingState(state_path(Path(self.config.output_dir), job.name, job.seed), resume=self.resumed)


def comparison_jobs(config: ExperimentConfig, dist: Distributed, names: tuple[str, ...] | None = None) -> list[Job]:
    """Every (entry, seed) run in the sequential order (entries: config.arms unless `names` gives a study's points);
    under seed-parallel, seed i belongs to rank i mod world size."""
    jobs: list[Job] = []
    for index, seed in enumerate(config.run_seeds):
        for name in seed_arm_order(names or config.arms, index):
            jobs.append(Job(index=len(jobs), name=name, seed=seed, owner=index % dist.world_size,
                            label=f"{name} (seed {seed})"))
    return jobs


def previous_sweep(previous: dict[str, Any] | None, config: ExperimentConfig
                   ) -> tuple[dict[str, Any], dict[str, ExperimentConfig]] | None:
    """The LR sweep of the results being resumed and each arm's config at its tuned LRs, when that sweep finished
    for every arm of `config` on a seed that is still not a reported one; None when it must run (again: its runs
    are short and have no state). A seed added on resume may be the old sweep's own seed: that sweep tuned on a
    reported seed's weights and batches, so it runs again on the new sweep seed."""
    sweep = (previous or {}).get("lr_sweep") or {}
    tuned = sweep.get("arms") or {}
    if not sweep.get("tuned") or any((tuned.get(name) or {}).get("best_multiplier") is None for name in config.arms):
        return None
    if sweep.get("seed") in config.run_seeds:
        return None
    kept = {**sweep, "seed_note": f"not among the reported seeds {list(config.run_seeds)}"}
    return kept, {name: scaled_lrs(config, tuned[name]["best_multiplier"]) for name in config.arms}


def run_lines(job: Job, record: dict[str, Any], dist: Distributed) -> list[str]:
    """What rank 0 says about a run that ended: its result (or failure), its greedy sample, its saved model."""
    where = dist.where(job, record.get("rank"))
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

