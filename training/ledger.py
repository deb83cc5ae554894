"""The results ledger: every run's record and status, and the results JSON saved whole after every change.

Every rank keeps one; rank 0's is the one written, atomically, with a Ctrl-C or SIGTERM waiting for the write,
so the file always holds every run that finished and the curve so far of a run in progress. A run's record is
saved the moment its training ends. When the experiment stops early, `stops_recorded` turns whatever stopped
it (Ctrl-C, SIGTERM, another rank's failure, a rank lost without a word) into the runs' final statuses and
one last save, in one place.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from common.errors import ConfigError
from common.reporting import json_safe, write_json_atomic
from config.settings import ExperimentConfig
from models.costs import cost_report
from models.transformer import MoELanguageModel
from training.distributed import Distributed, Job, RankFailed
from training.lineup import Lineup, arms_lineup
from training.lr_sweep import untuned
from training.provenance import now
from training.results import RESULTS_FILE, STOPPED_STATUSES, comparison, summarise_model
from training.resume import finished_runs
from training.run_guard import SaveFailed, signals_deferred, stop_status
from training.train_state import state_path
from training.trainer import CURVE_KEYS

RunKey = tuple[str, int]  # (arm, seed)


class Ledger:
    """The runs of one experiment as this rank knows them, and the results JSON that rank 0 writes from them."""

    def __init__(self, config: ExperimentConfig, header: dict[str, Any], dist: Distributed,
                 log: Callable[[str], None], lineup: Lineup | None = None) -> None:
        self.config = config
        self.dist = dist
        self.log = log
        self.path = Path(config.output_dir) / RESULTS_FILE
        self.header = header
        self.lineup = lineup or arms_lineup(config)
        self.arms = self.lineup.names  # the entries (the arms, in registry order, in the experiment), as the JSON lists them
        self.records: dict[RunKey, dict[str, Any]] = {}  # every run so far, listed in seed order by runs_of
        self.kept: set[RunKey] = set()  # --resume: the runs that finished before
        self.costs: dict[str, dict[str, Any]] = {}  # arm -> its cost report, measured once per arm
        self.started: dict[int, str] = {}  # rank -> the run it started last (this rank's; all ranks under data-parallel)
        self.results: dict[str, Any] = {"experiment": header, "lr_sweep": untuned()}

    # --- continuing earlier results (--resume) ------------------------------------------------------------
    def continue_from(self, previous: dict[str, Any]) -> None:
        """Keep the finished runs and the costs of the results being resumed, once the data is known to be the
        same as theirs (ConfigError otherwise)."""
        before = previous["experiment"].get("data_sha256")
        if before is not None and before != self.header["data_sha256"]:
            was = previous["experiment"].get("data", {}).get("corpus_description", "?")
            raise ConfigError(f"--resume: the data differs from the results in {self.config.output_dir} (they trained "
                              f"on {was}; this run loaded {self.header['data'].get('corpus_description', '?')}); give the "
                              "same data (--data, --offline, the same cache) or start a fresh --output-dir")
        kept = finished_runs(previous, self.arms)
        self.records.update(kept)
        self.kept = set(kept)
        self.costs.update({name: previous[name]["costs"] for name in self.arms if (previous.get(name) or {}).get("costs")})
        self.header["started_at"] = previous["experiment"].get("started_at")
        self.header["resumed_at"] = previous["experiment"].get("resumed_at", []) + [now()]
        self.log(f"Resume: {len(kept)} finished run(s) kept from {self.path}; "
                 f"{len(self.config.run_seeds) * len(self.arms) - len(kept)} to train.")

    # --- the runs ---------------------------------------------------------------------------------------
    def runs_of(self, name: str) -> list[dict[str, Any]]:
        return [self.records[(name, seed)] for seed in self.config.run_seeds if (name, seed) in self.records]

    def starting(self, job: Job) -> None:
        """This rank starts `job` (with every other rank, under data-parallel): a stop names it."""
        self.started.update(dict.fromkeys(self.dist.ranks_training(), job.label))

    def add(self, job: Job, record: dict[str, Any], model: MoELanguageModel | None = None) -> None:
        """A run's record: one starting here (with its `model`, whose arm's costs are measured once), or one that
        ended, here or on another rank."""
        self.records[(job.name, job.seed)] = record
        if model is not None and self.dist.is_main and job.name not in self.costs:  # builds and measures a cache
            self.costs[job.name] = cost_report(model)

    def unreported(self, jobs: list[Job]) -> None:
        """Other ranks' runs in progress when this rank stopped: listed, so that a stop names them."""
        for job in jobs:
            self.records.setdefault((job.name, job.seed), unreported_run(job))

    def unfinished_arms(self) -> list[str]:
        """The arms with no completed run: nothing to compare them by."""
        return [name for name in self.arms if not any(r["status"] == "completed" for r in self.runs_of(name))]

    # --- the file ---------------------------------------------------------------------------------------
    def save(self, status: str) -> None:
        """Summaries, comparison and status from the records, written whole by rank 0 (a Ctrl-C waits for it);
        a disk that refuses the file gets the results printed as JSON instead, and SaveFailed stops the run."""
        if not self.dist.is_main:
            return
        runs = {name: self.runs_of(name) for name in self.arms}
        for name in self.arms:
            self.results[name] = summarise_model(runs[name], self.costs.get(name))
        self.results["comparison"] = comparison(runs, {name: self.results[name] for name in self.arms},
                                                self.lineup.pairs, self.lineup.headline)
        self.header["status"] = status
        self.header["finished_at"] = now() if status != "running" else None
        try:
            with signals_deferred(redeliver=status == "running"):  # a save is never cut short
                write_json_atomic(self.path, self.results)
        except OSError as error:  # disk full, folder gone: the results go to the terminal instead
            self.log(json.dumps(json_safe(self.results), indent=2))
            message = (f"cannot write the results to {self.path} ({error.strerror or error}); the results so far "
                       "are printed above as JSON: free some space or choose another --output-dir")
            self.dist.post_failure(f"rank {self.dist.rank} failed: {message}")
            raise SaveFailed(message) from None

    def finish(self) -> str | None:
        """Save the final status: completed, or failed when some arm has no completed run (returned, in words)."""
        unfinished = self.unfinished_arms()
        if unfinished:
            self.header["failure"] = f"no run of {', '.join(unfinished)} completed: nothing to compare"
        self.save("failed" if unfinished else "completed")
        return f"{self.header['failure']} (see seeds_failed in {self.path})" if unfinished else None

    def saved_so_far(self) -> str:
        """What a stopped or failed experiment leaves, in words that are true of it."""
        records = self.records.values()
        completed = sum(r["status"] == "completed" for r in records)
        failed = sum(r["status"] == "failed" for r in records)
        stopped = [key for key, r in self.records.items() if r["status"] in STOPPED_STATUSES + ("running",)]
        words = (f"{completed} completed{f' and {failed} failed' if failed else ''} run(s) are saved in {self.path}"
                 if completed or failed else f"no run had finished (the settings are saved in {self.path})")
        if stopped:
            saved = any(state_path(Path(self.config.output_dir), *key).exists() for key in stopped)
            words += f"; rerun with --resume to continue{' from the last training state' if saved else ''}"
        return words

    # --- stops ------------------------------------------------------------------------------------------
    def crashed(self, job: Job, message: str) -> None:
        """A run crashed (this rank's or another's, `message` naming it): every rank stops; the results say so."""
        if self.dist.several:
            self.header["failure"] = message
        self.save("failed")
        if not self.dist.several:  # the traceback follows
            self.log(f"{job.label} crashed; {self.saved_so_far()}")
        elif message.startswith(f"rank {self.dist.rank} "):  # rank 0's own run: its traceback follows
            self.log(f"{message}; every rank stops, and {self.saved_so_far()}")

    def record_stop(self, stop: KeyboardInterrupt) -> None:
        """Ctrl-C or SIGTERM: give the runs in progress their status and save; RankFailed when the stop came
        from another rank's failure (its note), or from a rank lost without a word."""
        status = stop_status(stop)  # "interrupted" or "terminated"; the run in progress is that, not failed
        # another rank failed or was stopped first; torchrun stops every rank when one died, and one that left
        # no note was lost without a word (no wait for a late note: this stop was asked for)
        doing = {**self.started, **runs_in_progress(self.records.values(), self.dist.world_size)}
        stopped_by = self.dist.failure_cause(doing, wait_s=0) if self.dist.several else None
        cause = str(stopped_by) if stopped_by else None
        lost = set() if stopped_by is None or stopped_by.lost_rank is None else {stopped_by.lost_rank}
        self.mark_unfinished(status, lost, cause)
        if cause and not cause.startswith(f"rank {self.dist.rank} "):
            self.header["failure"] = cause
            self.save("failed" if lost else status)
            raise RankFailed(f"{cause}; every rank stopped, and {self.saved_so_far()}")
        self.save(status)
        what = "Terminated by SIGTERM" if status == "terminated" else "Interrupted"
        self.log(f"{what}: {self.saved_so_far()}")

    def record_rank_failure(self, failure: RankFailed) -> None:
        """Another rank crashed, was stopped or vanished: runs it cut short are interrupted, those of a rank
        lost without a word failed; the experiment failed."""
        self.mark_unfinished("interrupted", set() if failure.lost_rank is None else {failure.lost_rank}, str(failure))
        self.header["failure"] = str(failure)
        self.save("failed")

    def mark_unfinished(self, status: str, lost: set[int], lost_message: str | None = None) -> None:
        """Give every run still running its final status; one on a lost rank failed with it."""
        for record in self.records.values():
            if record["status"] != "running":
                continue
            if lost_message and (record.get("rank") in lost or lost and record.get("rank") is None):
                record.update(status="failed", failure=lost_message)
            else:
                record["status"] = status


@contextlib.contextmanager
def stops_recorded(ledger: Ledger) -> Iterator[None]:
    """Whatever stops the experiment inside (Ctrl-C, SIGTERM, another rank's failure or loss), the runs in
    progress get their final status and the results are saved before the stop goes on; a second Ctrl-C waits
    until they are."""
    try:
        yield
    except KeyboardInterrupt as stop:  # Ctrl-C, or RunTerminated from SIGTERM
        with signals_deferred(redeliver=False):  # stopping already: a second Ctrl-C waits until it is recorded
            ledger.record_stop(stop)
        raise
    except RankFailed as failure:
        with signals_deferred(redeliver=False):
            ledger.record_rank_failure(failure)
        raise RankFailed(f"{failure}; every rank stopped, and {ledger.saved_so_far()}") from None


def runs_in_progress(records: Any, world_size: int) -> dict[int, str]:
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
