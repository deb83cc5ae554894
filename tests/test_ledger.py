"""The experiment's named pieces on their own: the rank decisions Distributed answers for the loop, the LR sweep a
resume may keep, and the ledger's record of a stop."""

from __future__ import annotations

from typing import Any

import pytest

from training.distributed import DATA, NONE, SEEDS, Distributed, Job, run_jobs
from training.ledger import Ledger
from training.runs import comparison_jobs, previous_sweep

SWEPT = {"tuned": True, "seed": 43, "seed_note": "not among the reported seeds [42]",
         "arms": {"baseline": {"best_multiplier": 0.5}, "deepseek": {"best_multiplier": 2.0}}}


def _job(owner: int) -> Job:
    return Job(index=0, name="baseline", seed=42, owner=owner, label="baseline (seed 42)")


@pytest.mark.parametrize("mode, rank, owns, elsewhere, saves, training, placement", [
    (NONE, 0, True, False, True, [0], {"rank": 0, "world_size": 1}),
    (SEEDS, 0, False, True, True, [0], {"rank": 0, "world_size": 1}),  # the job is rank 1's
    (SEEDS, 1, True, False, True, [1], {"rank": 1, "world_size": 1}),
    (DATA, 0, True, False, True, [0, 1], {"rank": None, "world_size": 2}),
    (DATA, 1, False, False, False, [0, 1], {"rank": None, "world_size": 2}),
])
def test_distributed_answers_who_does_what(mode, rank, owns, elsewhere, saves, training, placement):
    """The loop asks, never computes ranks: who looks after a job's files, whose curve arrives as a record, who
    writes the saved model, which ranks a started run occupies, and what a record says of where it ran."""
    dist = Distributed(rank=rank, world_size=1 if mode == NONE else 2, mode=mode)
    job = _job(owner=0 if mode == NONE else 1)
    assert (dist.owns(job), dist.trained_elsewhere(job), dist.saves_models) == (owns, elsewhere, saves)
    assert dist.ranks_training() == training and dist.placement() == placement
    assert dist.batch_shards == (2 if mode == DATA else 1)
    lines: list[str] = []
    dist.speaker(lines.append)("said")
    assert lines == (["said"] if rank == 0 else [])


def test_seed_parallel_jobs_go_round_robin_and_no_arm_always_trains_first(config):
    jobs = comparison_jobs(config.replace(seeds=(1, 2, 3)), Distributed(rank=0, world_size=2, mode=SEEDS))
    assert [(job.seed, job.name, job.owner) for job in jobs] == [
        (1, "baseline", 0), (1, "deepseek", 0), (2, "deepseek", 1), (2, "baseline", 1),
        (3, "baseline", 0), (3, "deepseek", 0)]


def test_a_resume_keeps_the_sweep_only_while_its_seed_is_not_reported(config):
    tuned = config.replace(lr_sweep=True, seeds=(42,))
    kept = previous_sweep({"lr_sweep": SWEPT}, tuned.replace(seeds=(42, 50)))
    assert kept is not None
    sweep, configs = kept
    assert sweep["seed"] == 43 and sweep["seed_note"] == "not among the reported seeds [42, 50]"
    assert configs["deepseek"].muon_lr == pytest.approx(2 * config.muon_lr)
    # seed 43 was the sweep's: reported now, so the sweep tuned on a reported seed's weights and batches
    assert previous_sweep({"lr_sweep": SWEPT}, tuned.replace(seeds=(42, 43))) is None
    assert previous_sweep({"lr_sweep": {**SWEPT, "tuned": False}}, tuned) is None


def test_a_stop_gives_the_runs_in_progress_their_status_and_saves(config, monkeypatch):
    ledger = Ledger(config, {"status": "running"}, Distributed(), lambda line: None)
    saved: list[str] = []
    monkeypatch.setattr(ledger, "save", saved.append)  # the file itself is tested in test_reliability
    running: dict[str, Any] = {"model_name": "baseline", "seed": 42, "status": "running", "rank": 0}
    done: dict[str, Any] = {"model_name": "deepseek", "seed": 42, "status": "completed", "rank": 0}
    ledger.add(_job(0), running)
    ledger.add(Job(index=1, name="deepseek", seed=42, owner=0, label="deepseek (seed 42)"), done)
    ledger.record_stop(KeyboardInterrupt())
    assert (running["status"], done["status"], saved) == ("interrupted", "completed", ["interrupted"])
    assert ledger.unfinished_arms() == ["baseline"]


def test_a_stop_while_records_are_absorbed_lists_the_other_ranks_next_runs(monkeypatch):
    """Under seed-parallel the other ranks start their next runs as soon as the records are shared; a Ctrl-C or
    SIGTERM on rank 0 while it writes those records must still name those runs (they were left out, and a rank lost
    then was reported without what it was training)."""
    jobs = [Job(index=i, name="baseline", seed=40 + i, owner=i % 2, label=f"baseline (seed {40 + i})") for i in range(4)]
    monkeypatch.setattr(Distributed, "gather", lambda self, obj: [obj, (1, {"seed": 41}, None)])
    unreported: list[list[Job]] = []

    def absorb(job: Job, record: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # arrives during the save of the first record

    dist = Distributed(rank=0, world_size=2, mode=SEEDS)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(dist, jobs, lambda job: ({"seed": job.seed}, None), absorb, lambda job, message: None, unreported.append)
    assert unreported == [[jobs[3]]]  # rank 1's run of the next turn, not the one whose record just arrived
