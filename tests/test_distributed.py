"""torchrun: seed-parallel and data-parallel runs on 2 CPU processes (gloo), against one process.

The multi-process tests start `python -m torch.distributed.run --standalone --nproc_per_node 2`, the
command torchrun is, on the real CLI (exp6_trainer.py) or on tests/distributed_worker.py, which injects a
fault on one rank. Each takes a few seconds; the whole file stays well within a minute.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import training.distributed as distributed
from arms.registry import arm_builders
from common.errors import ConfigError
from common.hardware import resolve_device
from config.settings import ExperimentConfig
from tests.conftest import tiny_config
from tests.fake_cuda import install_fake_cuda
from training.distributed import (
    DATA,
    NONE,
    SEEDS,
    Distributed,
    Launch,
    launch_from_env,
    resolve_parallel,
    shard_batch,
    shard_rows,
)
from training.experiment import run_experiment
from training.metrics_log import METRICS_FILE
from training.results import RESULTS_FILE
from training.runs import comparison_jobs

REPO = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"training_time_minutes", "training_seconds", "tokens_per_second", "started_at", "finished_at",
               "training_time_minutes_std", "tokens_per_second_std"}
PLACEMENT_KEYS = {"distributed", "rank", "world_size"}  # where a run trained: differs by design
PATH_KEYS = {"output_dir", "cache_dir", "directory", "cache_hit", "cache_file", "description", "corpus_description"}


# --- planning: pure functions, no processes -------------------------------------------------------------

def test_launch_is_read_from_torchruns_environment():
    assert launch_from_env({}) == Launch(rank=0, world_size=1, local_rank=0)
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    with pytest.raises(ConfigError, match="torchrun"):
        launch_from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})


def test_auto_picks_seeds_when_every_rank_gets_one_else_data():
    config = ExperimentConfig(seeds=(42, 43), batch_size=64)
    assert resolve_parallel(config, 1) == NONE
    assert resolve_parallel(config, 2) == SEEDS
    assert resolve_parallel(config, 4) == DATA
    assert resolve_parallel(config.replace(parallel="data"), 2) == DATA


def test_impossible_splits_fail_before_training_with_the_fix():
    with pytest.raises(ConfigError, match=r"--batch-size 30 does not split evenly over 4 ranks.*--batch-size 28 or 32"):
        resolve_parallel(ExperimentConfig(batch_size=30, parallel="data"), 4)
    with pytest.raises(ConfigError, match=r"2 seed\(s\) on 4 ranks would leave 2 rank\(s\) idle"):
        resolve_parallel(ExperimentConfig(seeds=(1, 2), parallel="seeds"), 4)


def test_data_parallel_slices_put_together_are_the_single_process_batches():
    starts = torch.arange(5 * 8).view(5, 8)  # 5 steps of a global batch of 8
    slices = [shard_batch(starts, rank, 4) for rank in range(4)]
    assert all(s.shape == (5, 2) for s in slices)
    assert torch.equal(torch.cat(slices, dim=1), starts)  # disjoint, complete, in order
    rows = torch.arange(13)
    assert torch.equal(torch.cat([shard_rows(rows, rank, 2) for rank in range(2)]), rows)
    with pytest.raises(ValueError):
        shard_batch(starts, 0, 3)


def test_seeds_go_round_robin_and_keep_the_sequential_arm_rotation(tmp_path):
    config = tiny_config(tmp_path, seeds=(42, 43, 44))
    jobs = comparison_jobs(config, Distributed(rank=0, world_size=2, mode=SEEDS))
    assert [(job.seed, job.name, job.owner) for job in jobs] == [
        (42, "baseline", 0), (42, "deepseek", 0), (43, "deepseek", 1), (43, "baseline", 1),
        (44, "baseline", 0), (44, "deepseek", 0)]


# --- CUDA branches, driven on the CPU -----------------------------------------------------------------

def test_each_rank_takes_its_own_gpu_and_nccl(monkeypatch):
    calls = install_fake_cuda(monkeypatch, name="NVIDIA H200", capability=(9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    config = ExperimentConfig(seeds=(1, 2))
    assert resolve_device(config.device, local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="--device cuda:0 under torchrun would put every rank on one GPU"):
        resolve_device("cuda:0", local_rank=1)
    with pytest.raises(ConfigError, match="local rank 2 needs GPU cuda:2 but this node shows 2"):
        resolve_device(config.device, local_rank=2)

    joined: dict[str, Any] = {}
    monkeypatch.setattr(distributed.dist, "rendezvous", lambda url, rank, world_size, timeout: iter([("store", rank, world_size)]))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kwargs: joined.update(backend=backend, **kwargs))
    monkeypatch.setattr(distributed.dist, "new_group", lambda backend, timeout: f"{backend} group")
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), [obj] * len(out)))
    context = distributed.init_distributed(config, Launch(rank=1, world_size=2, local_rank=1), SEEDS, "cuda")
    assert joined["backend"] == "nccl" and joined["rank"] == 1 and joined["world_size"] == 2
    assert joined["timeout"] == dt.timedelta(minutes=config.dist_timeout_minutes)  # no collective waits forever
    assert chosen == []  # the rank's GPU is set once every rank has agreed it has one
    context = distributed.on_device(context, resolve_device(config.device, local_rank=1))
    assert chosen == [torch.device("cuda", 1)]
    assert context.object_group == "gloo group"  # records travel on the CPU, not through NCCL
    assert context.devices[0]["device_name"] == "NVIDIA H200 (sm90)"
    assert context.record()["backend"] == "nccl" and context.record()["world_size"] == 2
    assert calls.name == "NVIDIA H200"


def test_data_parallel_wraps_the_model_in_ddp_on_its_gpu(monkeypatch, tmp_path):
    wrapped: dict[str, Any] = {}

    def fake_ddp(module: torch.nn.Module, device_ids: Any = None, find_unused_parameters: bool = False) -> torch.nn.Module:
        wrapped.update(device_ids=device_ids, find_unused_parameters=find_unused_parameters)
        return module

    monkeypatch.setattr(distributed, "DistributedDataParallel", fake_ddp)
    model = arm_builders()["deepseek"](tiny_config(tmp_path, vocab_size=64), seed=0)
    context = Distributed(rank=0, world_size=2, mode=DATA)
    context.wrap(model, torch.device("cuda", 1), find_unused_parameters=True)
    assert wrapped == {"device_ids": [torch.device("cuda", 1)], "find_unused_parameters": True}
    assert all(moe.expert_count_reducer is not None for moe in model.moe_layers())
    context.unwrap(model)
    assert all(moe.expert_count_reducer is None for moe in model.moe_layers())


# --- two real processes -------------------------------------------------------------------------------

def _torchrun(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _config_file(config: ExperimentConfig, path: Path) -> str:
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def _results(config: ExperimentConfig) -> dict[str, Any]:
    return json.loads((Path(config.output_dir) / RESULTS_FILE).read_text())


def _sequential(config: ExperimentConfig) -> dict[str, Any]:
    """One process, one thread, as each torchrun rank runs (CPU results then match bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(config, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return _results(config)


def _without(value: Any, keys: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """The paths at which two JSON values differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [difference for key in sorted(set(ours) | set(theirs))
                for difference in (_differences(ours.get(key), theirs.get(key), f"{path}/{key}")
                                   if key in ours and key in theirs else [f"{path}/{key} (on one side only)"])]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {str(ours)[:60]} != {str(theirs)[:60]}"]


def _evaluations(output_dir: str) -> list[dict[str, Any]]:
    """The evaluation lines of metrics.jsonl, without timings, in a fixed order."""
    lines = [json.loads(line) for line in (Path(output_dir) / METRICS_FILE).read_text().splitlines()]
    return sorted(({k: v for k, v in line.items() if k != "seconds"} for line in lines if line["kind"] == "eval"),
                  key=lambda line: (line["arm"], line["seed"], line["step"]))


def test_seed_parallel_writes_the_sequential_results(tmp_path):
    config = tiny_config(tmp_path, seeds=(42, 43), lr_sweep=True, lr_sweep_multipliers=(0.5, 2.0), lr_sweep_steps=3,
                         save_checkpoints=False, sample_tokens=4)
    sequential = _sequential(config.replace(output_dir=str(tmp_path / "sequential")))
    run = _torchrun(["exp6_trainer.py", "--config", _config_file(config, tmp_path / "config.json")])
    assert run.returncode == 0, run.stderr[-3000:]
    parallel = _results(config)
    assert parallel["experiment"]["distributed"]["world_size"] == 2
    assert parallel["experiment"]["distributed"]["parallel"] == "seeds"
    assert parallel["experiment"]["distributed"]["backend"] == "gloo"
    assert [run["rank"] for run in parallel["baseline"]["runs"]] == [0, 1]  # seed 43 was trained by rank 1
    assert parallel["lr_sweep"]["tuned"] and len(parallel["lr_sweep"]["arms"]["deepseek"]["runs"]) == 2
    ignored = TIMING_KEYS | PLACEMENT_KEYS | PATH_KEYS
    assert _differences(_without(parallel, ignored), _without(sequential, ignored)) == []  # every loss, sample, statistic
    assert "Parallel: seeds over 2 ranks" in run.stdout and run.stdout.count("Results:") == 1  # rank 0 alone speaks
    assert _evaluations(config.output_dir) == _evaluations(str(tmp_path / "sequential"))  # rank 1's runs too, once
    assert (Path(config.output_dir) / "exp6_loss_vs_step.png").is_file()


@pytest.mark.parametrize("optimizer, tolerance", [("adamw", 2e-5), ("muon", 1e-3)])
def test_data_parallel_matches_one_process(tmp_path, optimizer, tolerance):
    """Dropout and router noise off (each rank draws its own): the only differences left are the order of
    floating-point reductions, amplified under Muon by its bf16 Newton-Schulz iteration."""
    config = tiny_config(tmp_path, dropout=0.0, router_noise_std=0.0, optimizer=optimizer, max_steps=8, eval_every=4,
                         save_checkpoints=False, sample_tokens=0)
    sequential = _sequential(config.replace(output_dir=str(tmp_path / "sequential")))
    run = _torchrun(["exp6_trainer.py", "--config", _config_file(config, tmp_path / "config.json"),
                     "--parallel", "data"])
    assert run.returncode == 0, run.stderr[-3000:]
    parallel = _results(config)
    assert parallel["experiment"]["distributed"]["parallel"] == "data"
    for arm in ("baseline", "deepseek"):
        ours, one = parallel[arm]["runs"][0], sequential[arm]["runs"][0]
        assert ours["world_size"] == 2 and ours["tokens_seen"] == one["tokens_seen"]  # the global batch
        assert ours["replicas_identical"] is True  # both ranks stepped Muon/AdamW on the same averaged gradients
        assert ours["curve"]["step"] == one["curve"]["step"]
        assert ours["curve"]["val_loss"][0] == pytest.approx(one["curve"]["val_loss"][0], abs=1e-6)  # sharded eval
        for key in ("val_loss", "train_loss"):
            assert ours["curve"][key][1:] == pytest.approx(one["curve"][key][1:], abs=tolerance), (arm, key)
        assert [line["val_loss"] for line in _evaluations(config.output_dir) if line["arm"] == arm] == \
            ours["curve"]["val_loss"]  # logged by rank 0 alone: each evaluation once


def test_a_bad_batch_split_stops_before_training(tmp_path):
    config = tiny_config(tmp_path, batch_size=3)
    run = _torchrun(["exp6_trainer.py", "--config", _config_file(config, tmp_path / "config.json"), "--parallel", "data"])
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --parallel data: --batch-size 3 does not split evenly over 2 ranks; "
                      "use a multiple of 2 (e.g. --batch-size 2 or 4)"]  # said once, by rank 0
    assert not (Path(config.output_dir) / RESULTS_FILE).exists()


def _fault(tmp_path: Path, config: ExperimentConfig, rank: int, run: int, fault: str,
           *options: str) -> subprocess.CompletedProcess[str]:
    return _torchrun(["-m", "tests.distributed_worker", str(rank), str(run), fault,
                      "--config", _config_file(config, tmp_path / "config.json"), *options])


def test_a_failing_rank_stops_seed_parallel_and_finished_seeds_are_kept(tmp_path):
    config = tiny_config(tmp_path, seeds=(42, 43, 44, 45), save_checkpoints=False, sample_tokens=0)
    run = _fault(tmp_path, config, 1, 2, "raise")  # rank 1's second MLA run: deepseek on seed 45, in the third turn
    assert run.returncode != 0
    message = ("error: rank 1 failed during deepseek (seed 45): RuntimeError: injected fault; every rank stopped, "
               f"and 5 completed and 1 failed run(s) are saved in {Path(config.output_dir) / RESULTS_FILE}")
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [message]
    written = _results(config)
    assert written["experiment"]["status"] == "failed"
    assert written["experiment"]["failure"].startswith("rank 1 failed during deepseek (seed 45)")
    assert written["baseline"]["seeds_completed"] == [42, 43, 44] and written["deepseek"]["seeds_completed"] == [42, 43]
    failed = written["deepseek"]["runs"][-1]
    assert (failed["seed"], failed["status"], failed["rank"]) == (45, "failed", 1)


def test_a_failing_rank_stops_data_parallel_and_names_the_rank(tmp_path):
    config = tiny_config(tmp_path, save_checkpoints=False, sample_tokens=0)
    run = _fault(tmp_path, config, 1, 1, "raise", "--parallel", "data")  # rank 1 raises mid-way through the MLA run
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: rank 1 failed during deepseek (seed {config.seed}): RuntimeError: injected fault; every rank stopped")
    written = _results(config)
    assert written["experiment"]["status"] == "failed"
    assert written["baseline"]["runs"][0]["status"] == "completed"  # the finished run is kept
    assert written["deepseek"]["runs"][0]["failure"].startswith("rank 1 failed during deepseek")


def _rank_1_signalled_in_mla(tmp_path: Path, parallel: str, fault: str) -> tuple[ExperimentConfig, int, list[str], str]:
    """Rank 1 sent `fault` during its MLA run (under seed-parallel, a later turn's); the job must fail.
    Returns the config, that run's seed, the `error:` lines and the whole stderr."""
    seeds, run, seed = ((42, 43, 44, 45), 2, 45) if parallel == "seeds" else ((42,), 1, 42)
    config = tiny_config(tmp_path, seeds=seeds, save_checkpoints=False, sample_tokens=0)
    result = _fault(tmp_path, config, 1, run, fault, "--parallel", parallel)
    assert result.returncode != 0
    return config, seed, [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr


@pytest.mark.parametrize("parallel", ["seeds", "data"])
def test_a_rank_stopped_by_sigterm_stops_the_job_and_is_named(tmp_path, parallel):
    config, seed, errors, stderr = _rank_1_signalled_in_mla(tmp_path, parallel, "sigterm")
    assert len(errors) == 1 and errors[0].startswith(
        f"error: rank 1 was stopped by SIGTERM during deepseek (seed {seed}); every rank stopped"), stderr[-2000:]
    written = _results(config)
    assert written["experiment"]["failure"] == f"rank 1 was stopped by SIGTERM during deepseek (seed {seed})"
    assert written["experiment"]["status"] in ("failed", "terminated")  # rank 0 lost rank 1, or torchrun stopped it
    finished = [42, 43] if parallel == "seeds" else [42]
    assert written["baseline"]["seeds_completed"][:len(finished)] == finished  # runs of earlier turns are kept
    if parallel == "seeds":
        assert written["deepseek"]["seeds_completed"][:2] == [42, 43]
        # rank 1's run in progress never reached rank 0, and is listed all the same: stopped, not failed
        assert written["deepseek"]["seeds_interrupted"] == [45] and written["deepseek"]["seeds_failed"] == []
        stopped = written["deepseek"]["runs"][-1]
        assert (stopped["seed"], stopped["rank"]) == (45, 1) and stopped["status"] in ("interrupted", "terminated")


@pytest.mark.parametrize("parallel", ["seeds", "data"])
def test_a_rank_killed_without_a_word_is_named_as_lost(tmp_path, parallel):
    """SIGKILL (or the out-of-memory killer) leaves no note: torchrun then stops rank 0 with SIGTERM, and rank 0
    must say that rank 1 was lost, not that it was itself stopped by SIGTERM, and record it."""
    config, seed, errors, stderr = _rank_1_signalled_in_mla(tmp_path, parallel, "sigkill")
    assert len(errors) == 1 and errors[0].startswith(
        f"error: rank 1 was lost without a word during deepseek (seed {seed}) (its process is gone"), stderr[-2000:]
    assert "Stopped by SIGTERM" not in stderr
    written = _results(config)
    assert written["experiment"]["status"] == "failed"
    assert written["experiment"]["failure"].startswith(f"rank 1 was lost without a word during deepseek (seed {seed})")
    lost = next(r for r in written["deepseek"]["runs"] if r["seed"] == seed)
    assert lost["status"] == "failed" and seed in written["deepseek"]["seeds_failed"]


def test_ranks_started_with_different_flags_stop_before_any_data(tmp_path):
    """Rank 1 started with two settings changed (a list and a number): both named with each rank's value. The
    ranks compare settings before the parallel mode is chosen, so one job covers both modes."""
    config = tiny_config(tmp_path, save_checkpoints=False, sample_tokens=0)
    run = _fault(tmp_path, config, 1, 0, "flags:--seeds 42 44 --steps 6", "--seeds", "42", "43", "--steps", "4")
    assert run.returncode != 0  # torchrun's own code (each rank exited 2)
    assert "exitcode: 2" in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    differing = "max_steps (rank 0: 4, rank 1: 6); seeds (rank 0: [42, 43], rank 1: [42, 44])"
    assert errors == [f"error: the ranks were started with different settings: {differing}; start every rank "
                      "with the same command line"], run.stderr[-2000:]  # said once, by rank 0, naming the settings
    assert not (Path(config.output_dir) / RESULTS_FILE).exists()
    assert not Path(config.cache_dir).exists()  # stopped before any data was loaded


def test_config_differences_name_each_setting_with_every_ranks_value():
    ours = ExperimentConfig(seeds=(42, 43)).to_dict()
    theirs = {**ours, "max_steps": 6, "seeds": [42, 44]}
    assert distributed.config_differences([ours, ours]) == []
    assert distributed.config_differences([ours, theirs, ours]) == [
        "max_steps (rank 0: 1000, rank 1: 6, rank 2: 1000)", "seeds (rank 0: [42, 43], rank 1: [42, 44], rank 2: [42, 43])"]


def _two_ranks_where_rank_1_reports(monkeypatch: pytest.MonkeyPatch, rank_1_failure: Any) -> Distributed:
    """Rank 0 of a fake 2-rank job whose gathers hand back rank 1's `rank_1_failure`."""
    monkeypatch.setattr(distributed.dist, "all_gather_object",
                        lambda out, obj, group=None: out.__setitem__(slice(None), [obj, rank_1_failure]))
    return Distributed(rank=0, world_size=2, mode=SEEDS)


def test_an_error_on_one_rank_stops_every_rank_and_rank_0_names_it(monkeypatch):
    context = _two_ranks_where_rank_1_reports(monkeypatch, ("config", "cannot write results to '/x'"))
    with pytest.raises(distributed.SharedConfigError, match=r"^rank 1: cannot write results to '/x'$"):
        context.agree(lambda: "fine here")
    context = _two_ranks_where_rank_1_reports(monkeypatch, ("error", "OSError: disk on fire"))
    with pytest.raises(distributed.RankFailed, match="rank 1 failed: OSError: disk on fire"):
        context.agree(lambda: "fine here")
    context = _two_ranks_where_rank_1_reports(monkeypatch, None)
    assert context.agree(lambda: "fine here") == "fine here"


def _rank_0_with_a_peer(monkeypatch: pytest.MonkeyPatch, gone_after: int | None) -> tuple[Distributed, Any]:
    """Rank 0 of a 2-rank job on one machine (a real c10d store) whose rank 1 process is gone from the
    `gone_after`-th look on (None: never)."""
    looks = iter(range(1, 10**6))
    monkeypatch.setattr(distributed, "_process_gone",
                        lambda pid: gone_after is not None and next(looks) >= gone_after)
    store = torch.distributed.HashStore()
    host = socket.gethostname()
    context = Distributed(rank=0, world_size=2, mode=SEEDS, store=store,
                          devices=[{"rank": 0, "host": host, "pid": os.getpid()}, {"rank": 1, "host": host, "pid": 123}])
    return context, store


def test_a_peer_still_exiting_when_the_collective_broke_is_named_as_lost(monkeypatch):
    """SIGKILL closes a process's sockets before the process is gone: the rank whose collective broke looks again
    until it is (it failed under load once, when the first look came too early)."""
    context, _ = _rank_0_with_a_peer(monkeypatch, gone_after=4)
    started = time.monotonic()
    cause = context.failure_cause({1: "deepseek (seed 45)"}, wait_s=5)
    assert cause is not None and cause.lost_rank == 1
    assert str(cause).startswith("rank 1 was lost without a word during deepseek (seed 45)")
    assert time.monotonic() - started < 1  # as soon as it is gone, not after the whole wait


def test_a_note_posted_while_this_rank_looks_is_the_cause_and_none_after_the_wait(monkeypatch):
    context, store = _rank_0_with_a_peer(monkeypatch, gone_after=None)
    assert context.failure_cause(wait_s=0.3) is None  # nothing said, nobody gone: the caller says it lost contact
    threading.Timer(0.2, lambda: store.set(distributed.FAILURE_KEY, "rank 1 failed during x: OSError: y")).start()
    cause = context.failure_cause(wait_s=5)
    assert cause is not None and str(cause) == "rank 1 failed during x: OSError: y" and cause.lost_rank is None


@pytest.mark.parametrize("rank, shared, printed", [
    ("0", True, "error: every rank hit this"), ("1", True, None),  # rank 0 speaks for an error all ranks share
    ("1", False, "error: rank 1: only rank 1 hit this"),  # an error of one rank alone: it says so itself
])
def test_the_cli_prints_an_error_once(monkeypatch, capsys, tmp_path, rank, shared, printed):
    import training.experiment
    from exp6_trainer import main

    def failing(config: ExperimentConfig, builders: Any = None, **options: Any) -> None:
        raise distributed.SharedConfigError("every rank hit this") if shared else ConfigError("only rank 1 hit this")

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setattr(training.experiment, "run_experiment", failing)
    assert main(["--output-dir", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ([printed] if printed else [])


def test_a_nan_on_one_rank_fails_that_run_on_every_rank_at_the_same_step(tmp_path):
    """Under data-parallel a non-finite loss on one rank's slice fails the run (not the job) everywhere at once,
    so the ranks go on to the next run together."""
    config = tiny_config(tmp_path, seeds=(42, 43), save_checkpoints=False, sample_tokens=0)
    run = _fault(tmp_path, config, 1, 1, "nan", "--parallel", "data")  # MLA on seed 42, rank 1's slice only
    assert run.returncode == 0, run.stderr[-2000:]
    written = _results(config)
    assert written["experiment"]["status"] == "completed"
    failed = written["deepseek"]["runs"][0]
    assert (failed["seed"], failed["status"], failed["failed_at_step"]) == (42, "failed", 3)  # rank 1's step, not later
    assert written["deepseek"]["seeds_completed"] == [43] and written["baseline"]["seeds_completed"] == [42, 43]
