"""Tuned learning rate per arm (--lr-sweep): a short sweep of LR multipliers before the main comparison.

Architectures differ in their best learning rate, so a comparison at one untuned LR measures how well
that LR fits each arm as much as the arms themselves. With --lr-sweep, every arm of config.arms is first
trained for `sweep_steps(config)` steps (the usual warmup + cosine schedule over that short horizon) once
per multiplier m of config.lr_sweep_multipliers, with muon_lr * m and adamw_lr * m, on one seed that is not
a reported one (config.sweep_seed), from the same initial weights and on the same batches. Each arm keeps
the multiplier with the lowest final loss on the **tuning set** (ties go to the smaller multiplier): the
tokens between the training part and the validation set (data/dataset.py), so selection never sees the
validation set the comparison reports, nor a reported seed's weights or batches. A diverged run is recorded
as failed and counts as +inf: its training loss went non-finite, or its final tuning loss is not below the
untrained model's (the step-0 evaluation), e.g. 700 against ln(vocab) after a far too large LR; the main
comparison then trains each arm at its tuned LRs. A choice at the smallest or largest multiplier may not be
the best LR at all: it is flagged (log, JSON, plot) with EDGE_NOTE.
When every multiplier of an arm diverged there is nothing to choose: the sweep is saved, the experiment
ends "failed" and the error says so (ConfigError, exit 2), rather than train at a diverged LR.

Sweep runs save no model and no greedy sample. The sweep is recorded under the results' `lr_sweep` key as
it goes, so an interrupted sweep keeps the runs that finished.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch

from common.errors import ConfigError
from common.hardware import release_memory
from common.reporting import fmt
from config.settings import ExperimentConfig
from data.dataset import TokenData
from models.transformer import ModelBuilder
from training.distributed import SINGLE, Distributed, Job, SharedConfigError, Trained, run_jobs
from training.run_guard import stop_status
from training.trainer import NonFiniteLoss, new_run_record, train_model

UNTUNED_NOTE = "LRs were not tuned: every arm used the configured muon_lr/adamw_lr; use --lr-sweep"
FAILED, COMPLETED = "failed", "completed"
EDGE_NOTE = "best at the grid's edge: widen `--lr-sweep`"


def sweep_steps(config: ExperimentConfig) -> int:
    """Optimizer steps of each sweep run: config.lr_sweep_steps, or max_steps // 4 (at least 1) when it is 0."""
    return config.lr_sweep_steps or max(1, config.max_steps // 4)


def sweep_config(config: ExperimentConfig) -> ExperimentConfig:
    """The config of a sweep run: the short horizon (its own warmup and cosine) with evaluations inside it."""
    steps = sweep_steps(config)
    return config.replace(max_steps=steps, eval_every=min(config.eval_every, steps))


def scaled_lrs(config: ExperimentConfig, multiplier: float) -> ExperimentConfig:
    """config with both base LRs scaled by `multiplier`."""
    return config.replace(muon_lr=config.muon_lr * multiplier, adamw_lr=config.adamw_lr * multiplier)


def untuned() -> dict[str, Any]:
    """The results' `lr_sweep` entry of a run without --lr-sweep."""
    return {"tuned": False, "note": UNTUNED_NOTE}


def best_multiplier(runs: list[dict[str, Any]]) -> float | None:
    """The multiplier of the lowest tuning-set loss among the completed `runs` (ties: the smaller multiplier);
    None when none completed with a finite loss: a diverged run is never chosen."""
    usable = [run for run in runs if math.isfinite(sweep_loss(run))]
    return min(usable, key=lambda run: (sweep_loss(run), float(run["multiplier"])))["multiplier"] if usable else None


def sweep_loss(run: dict[str, Any]) -> float:
    """A sweep run's final tuning-set loss; +inf for a run that did not complete with a finite one."""
    value = run.get("tuning_loss")
    if run.get("status") != COMPLETED or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.inf
    return float(value)


def at_grid_edge(best: float, multipliers: tuple[float, ...]) -> bool:
    """Whether the chosen multiplier is the grid's smallest or largest: the best LR may then lie beyond it."""
    return best in (min(multipliers), max(multipliers))


def sweep_jobs(config: ExperimentConfig, world_size: int) -> list[Job]:
    """Every (arm, multiplier) sweep run on the sweep's own seed, arm by arm; under seed-parallel, run k trains
    on rank k mod world size."""
    seed = config.sweep_seed
    pairs = [(name, multiplier) for name in config.arms for multiplier in config.lr_sweep_multipliers]
    return [Job(index=k, name=name, seed=seed, owner=k % world_size, label=f"LR sweep {name} x{multiplier:g}",
                multiplier=multiplier) for k, (name, multiplier) in enumerate(pairs)]


def run_lr_sweep(config: ExperimentConfig, data: TokenData, device: torch.device, builders: Mapping[str, ModelBuilder],
                 sweep: dict[str, Any], save: Callable[[str], None],
                 log: Callable[[str], None] = print, dist: Distributed = SINGLE) -> dict[str, ExperimentConfig]:
    """Run the sweep for every arm of config.arms, filling `sweep` (the results' `lr_sweep` entry) and calling
    save("running") after every run; returns each arm's config at its tuned LRs (the same on every rank).

    Under seed-parallel the sweep runs are shared out over the ranks; under data-parallel each is trained by
    all of them. Ctrl-C / SIGTERM mark the run in progress `interrupted` / `terminated` and propagate; any
    other error marks it failed, calls save("failed") and stops the experiment (run_jobs).
    """
    runs = SweepRuns(config, data, device, builders, sweep, save, log, dist)
    run_jobs(dist, sweep_jobs(config, dist.world_size), runs.train, runs.absorb, runs.fail)
    return runs.choose()


class SweepRuns:
    """The sweep's runs as this rank trains them (run_jobs' three steps), recorded in the results' `lr_sweep`."""

    def __init__(self, config: ExperimentConfig, data: TokenData, device: torch.device,
                 builders: Mapping[str, ModelBuilder], sweep: dict[str, Any], save: Callable[[str], None],
                 log: Callable[[str], None], dist: Distributed) -> None:
        self.config, self.device, self.builders, self.dist = config, device, builders, dist
        self.sweep, self.save, self.log = sweep, save, log
        self.seed = config.sweep_seed
        self.short = sweep_config(config)
        self.tuning = data.for_tuning()  # every evaluation of a sweep run is on the tuning set
        sweep.clear()  # drops the untuned note
        sweep.update(tuned=True, multipliers=list(config.lr_sweep_multipliers), steps=self.short.max_steps,
                     seed=self.seed, seed_note=f"not among the reported seeds {list(config.run_seeds)}",
                     evaluated_on=f"the tuning set: {len(data.tune):,} tokens between the training part and the "
                                  "validation set; no sweep run evaluates a validation token",
                     selection="lowest final tuning-set loss; a diverged run counts as +inf; ties: the smaller multiplier",
                     arms={name: {"runs": [], "best_multiplier": None, "muon_lr": None, "adamw_lr": None}
                           for name in config.arms})

    def place(self, job: Job, run: dict[str, Any]) -> None:
        """Put `run` into its arm's list, in multiplier order, replacing the same run in progress."""
        order = list(self.config.lr_sweep_multipliers)
        runs = [r for r in self.sweep["arms"][job.name]["runs"] if r["multiplier"] != job.multiplier] + [run]
        self.sweep["arms"][job.name]["runs"] = sorted(runs, key=lambda r: order.index(r["multiplier"]))

    def train(self, job: Job) -> Trained:
        run_config = scaled_lrs(self.short, job.multiplier)
        run: dict[str, Any] = {"multiplier": job.multiplier, "muon_lr": run_config.muon_lr,
                               "adamw_lr": run_config.adamw_lr, "tuning_loss": None, "status": "running"}
        self.place(job, run)
        model = self.builders[job.name](self.config, seed=self.seed)  # the same initial weights for every multiplier
        record = new_run_record(job.name, model, self.seed)
        try:
            train_model(model, self.tuning, run_config, self.seed, self.device, record, self.dist)
            judge(run, record)
        except NonFiniteLoss as failure:
            run.update(tuning_loss=math.inf, status=FAILED, failure=str(failure), failed_at_step=failure.step)
        except KeyboardInterrupt as stop:
            run["status"] = stop_status(stop)
            raise
        except Exception as error:  # noqa: BLE001 - stops the experiment (run_jobs), but is recorded first
            run.update(status=FAILED, failure=f"{type(error).__name__}: {error}")
            return run, error
        finally:
            del model
            release_memory(self.device)
        return run, None

    def absorb(self, job: Job, run: dict[str, Any]) -> None:
        self.place(job, run)
        rate = f"muon_lr {run['muon_lr']:.3g}, adamw_lr {run['adamw_lr']:.3g}"
        if run["status"] == COMPLETED:
            self.log(f"{job.label} ({rate}, {self.short.max_steps} steps, seed {self.seed}): "
                     f"tuning loss {run['tuning_loss']:.4f}")
        elif "failed_at_step" in run or str(run.get("failure", "")).startswith("diverged"):
            self.log(f"{job.label}: FAILED ({run['failure']}); counted as +inf")
        self.save("running")

    def fail(self, job: Job, message: str) -> None:
        self.save("failed")

    def choose(self) -> dict[str, ExperimentConfig]:
        """Each arm's config at its best multiplier, recorded and said; SharedConfigError / ConfigError (after
        saving) when every multiplier of some arm diverged: there is nothing to choose from."""
        config, sweep = self.config, self.sweep
        bests = {name: best_multiplier(sweep["arms"][name]["runs"]) for name in config.arms}
        diverged = [name for name, best in bests.items() if best is None]
        if diverged:  # the README promises a diverged multiplier is never chosen
            for name in diverged:
                sweep["arms"][name]["note"] = "every sweep run diverged: no multiplier chosen"
            self.save("failed")
            message = (f"--lr-sweep: every multiplier ({' '.join(f'{m:g}' for m in config.lr_sweep_multipliers)}) "
                       f"diverged for {', '.join(diverged)}, so no learning rate can be chosen; try smaller multipliers "
                       "(e.g. --lr-sweep 0.25 0.5 1) or a lower muon_lr/adamw_lr")
            raise SharedConfigError(message) if self.dist.several else ConfigError(message)
        tuned = {name: self.tuned(name, bests[name]) for name in config.arms}
        self.save("running")
        return tuned

    def tuned(self, name: str, best: float | None) -> ExperimentConfig:
        """Record `name`'s chosen multiplier (flagged when at the grid's edge), say it, and return its config."""
        assert best is not None  # every arm has a completed run (choose checked)
        entry = self.sweep["arms"][name]
        arm_config = scaled_lrs(self.config, best)
        entry.update(best_multiplier=best, muon_lr=arm_config.muon_lr, adamw_lr=arm_config.adamw_lr,
                     at_grid_edge=at_grid_edge(best, self.config.lr_sweep_multipliers))
        if entry["at_grid_edge"]:
            entry["warning"] = EDGE_NOTE
        best_loss = next(run["tuning_loss"] for run in entry["runs"] if run["multiplier"] == best)
        self.log(f"LR sweep {name}: best multiplier x{best:g} (tuning loss {fmt(best_loss, '.4f')}): "
                 f"muon_lr {arm_config.muon_lr:.3g}, adamw_lr {arm_config.adamw_lr:.3g} for the comparison"
                 + (f"; WARNING: {EDGE_NOTE}" if entry["at_grid_edge"] else ""))
        return arm_config


def judge(run: dict[str, Any], record: dict[str, Any]) -> None:
    """A finished sweep run's verdict: completed when its final tuning loss is finite and below the untrained
    model's (the trainer evaluated on the tuning set, so its "val_loss" here is the tuning loss), else diverged."""
    loss, untrained = record["val_loss"], record["curve"]["val_loss"][0]
    run["tuning_loss"] = loss
    if math.isfinite(loss) and loss < untrained:
        run["status"] = COMPLETED
    else:
        run.update(status=FAILED, failure=f"diverged: final tuning loss {loss:.4g} is not below the untrained "
                                          f"model's {untrained:.4g}")
