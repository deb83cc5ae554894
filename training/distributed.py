"""The experiment on several processes started by torchrun: seed-parallel or data-parallel.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts
one process per GPU. Each one joins a torch.distributed process group: NCCL on CUDA, one GPU per local
rank; gloo on CPU. Records and errors travel through object collectives on a gloo group, so no file
system has to be shared. Plain `python exp6_trainer.py` is one process and starts no process group.

- `--parallel seeds`: ranks take the seeds round-robin and train every arm of their seeds, each on its
  own device, exactly as one process would; after every run the ranks exchange their records
  (all_gather_object) and rank 0 writes the one JSON.
- `--parallel data`: every run is trained by all ranks together under DistributedDataParallel; each
  rank takes its slice of the global batch (shard_batch) and of the validation windows, and the
  gradients and the metrics are averaged over ranks.

Before anything else the ranks compare their resolved configs through torchrun's rendezvous store, so
ranks started with different flags stop at once with one error naming the settings that differ.
A rank that fails tells the others (in the seed-parallel exchange, or through the rendezvous store
under data-parallel, where the others are waiting inside a collective) and the job stops on every rank
with one message naming it; a rank killed without a word (SIGKILL, the out-of-memory killer) is named
as lost. Every collective has a timeout (--dist-timeout), so no rank waits forever.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.errors import ConfigError
from common.hardware import device_name, resolve_device, use_cuda_device
from config.settings import MAX_DIST_TIMEOUT_MINUTES, ExperimentConfig
from models.moe import MixtureOfExperts
from training.run_guard import signals_deferred, stop_status

NONE, SEEDS, DATA = "none", "seeds", "data"  # the parallel modes that run (config.parallel "auto" resolves to one)
FAILURE_KEY = "exp6/failure"  # in the rendezvous store: the first failure, "rank R failed during ...: error"
FAILURE_NOTE_WAIT_S = 5.0  # how long a rank that lost a peer waits for that peer's failure note (or its exit)
FAILURE_POLL_S = 0.1  # meanwhile, how often it looks
RANK_SEED_STRIDE = 1_000_003  # data-parallel: rank r draws dropout and router noise from seed + r * this

T = TypeVar("T")


class RankFailed(RuntimeError):
    """A rank failed, so every rank stops; the message names the rank and what it was doing. `lost_rank`:
    the rank whose process vanished without a word, when that is the failure."""

    def __init__(self, message: str, lost_rank: int | None = None) -> None:
        super().__init__(message)
        self.lost_rank = lost_rank


class SharedConfigError(ConfigError):
    """A configuration error every rank raised alike (it follows from the config and the world size, or
    agree() shared it), so rank 0 alone reports it."""


@dataclass(frozen=True)
class Launch:
    """Where this process stands, read from the launcher's environment before any process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes of this job on this machine (they share its RAM)

    @property
    def several(self) -> bool:
        return self.world_size > 1


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; a plain process is rank 0 of 1."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return Launch()
    try:
        world_size = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun sets it; other launchers may not
    except ValueError as error:
        raise ConfigError(f"the launcher's RANK/WORLD_SIZE/LOCAL_RANK are not integers ({error}); start with torchrun") from error
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0 or not 1 <= local_world_size <= world_size:
        raise ConfigError(f"the launcher gave RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}, "
                          f"LOCAL_WORLD_SIZE={local_world_size}; start with torchrun")
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size)


def resolve_parallel(config: ExperimentConfig, world_size: int) -> str:
    """The parallel mode that runs: none for one process; for several, config.parallel with auto meaning
    seeds when there are at least as many seeds as ranks, else data. Raises ConfigError, on every rank
    alike, for a split that cannot work."""
    if world_size <= 1:
        return NONE
    seeds = len(config.run_seeds)
    mode = config.parallel if config.parallel != "auto" else (SEEDS if seeds >= world_size else DATA)
    if mode == SEEDS and seeds < world_size:
        raise ConfigError(f"--parallel seeds: {seeds} seed(s) on {world_size} ranks would leave {world_size - seeds} "
                          f"rank(s) idle; give at least {world_size} seeds (--seeds) or use --parallel data")
    if mode == DATA and config.batch_size % world_size:
        smaller = config.batch_size // world_size * world_size
        options = " or ".join(str(b) for b in (smaller, smaller + world_size) if b > 0)
        raise ConfigError(f"--parallel data: --batch-size {config.batch_size} does not split evenly over {world_size} ranks; "
                          f"use a multiple of {world_size} (e.g. --batch-size {options})")
    return mode


def shard_batch(starts: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous slice of every global batch (the last dimension of `starts`): rank r takes
    sequences r*b .. (r+1)*b - 1 with b = batch / world_size, so the ranks' slices put together, in rank
    order, are exactly the batches one process would train on."""
    batch = starts.shape[-1]
    if batch % world_size:
        raise ValueError(f"a batch of {batch} does not split over {world_size} ranks")
    local = batch // world_size
    return starts[..., rank * local:(rank + 1) * local]


def shard_rows(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of the rows of `tensor` (the shares differ by at most one row)."""
    return tensor.tensor_split(world_size)[rank]


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job and the collectives the experiment uses; rank 0 of 1 runs none."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this machine
    mode: str = NONE
    backend: str | None = None
    timeout: dt.timedelta | None = None
    store: Any = None  # the rendezvous store (a c10d Store) when several ranks run
    object_group: Any = None  # gloo group for object collectives (the default group when it is gloo)
    devices: list[dict[str, Any]] = field(default_factory=list)  # every rank's host and device, filled by on_device()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def seed_parallel(self) -> bool:
        return self.several and self.mode == SEEDS

    @property
    def data_parallel(self) -> bool:
        return self.several and self.mode == DATA

    # --- what this rank does in the experiment: the experiment asks, it never checks ranks itself -------
    @property
    def device_rank(self) -> int | None:
        """The local rank whose GPU this process takes under torchrun (cuda:LOCAL_RANK); None for one process."""
        return self.local_rank if self.several else None

    @property
    def batch_shards(self) -> int:
        """How many ranks share each batch: every rank under data-parallel, else one."""
        return self.world_size if self.data_parallel else 1

    @property
    def saves_models(self) -> bool:
        """Whether this rank writes the greedy sample and saved model of the runs it trains: every rank its own
        runs, except under data-parallel, where every rank holds the same model and rank 0 alone writes it."""
        return self.is_main or not self.data_parallel

    def ranks_training(self) -> list[int]:
        """The ranks that train the run this rank starts: all of them under data-parallel, else this one."""
        return list(range(self.world_size)) if self.data_parallel else [self.rank]

    def owns(self, job: "Job") -> bool:
        """Whether this rank looks after `job`'s files (its training state): the rank that trained it under
        seed-parallel, else rank 0."""
        return job.owner == self.rank if self.seed_parallel else self.is_main

    def trained_elsewhere(self, job: "Job") -> bool:
        """Whether `job` was trained on another rank, so that its curve reaches this one only in its record."""
        return self.seed_parallel and job.owner != self.rank

    def placement(self) -> dict[str, Any]:
        """Where a run is trained, for its record: the rank (None: all ranks, under data-parallel) and how many."""
        if self.data_parallel:
            return {"rank": None, "world_size": self.world_size}
        return {"rank": self.rank, "world_size": 1}

    def where(self, job: "Job", rank: int | None) -> str:
        """How a run is named in the log: with the rank that trained it under seed-parallel."""
        return f"{job.label} [rank {rank}]" if self.seed_parallel else job.label

    def speaker(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` on rank 0, which alone speaks for the job; a log that says nothing on the other ranks."""
        return log if self.is_main else _quiet

    def describe(self, batch_size: int) -> str:
        """The one log line that says how the ranks share the work."""
        devices = sorted({rank["device_name"] for rank in self.devices})
        hosts = len({rank["host"] for rank in self.devices})
        where = f"{self.world_size} ranks on {hosts} node{'s' if hosts > 1 else ''} ({self.backend}; {', '.join(devices)})"
        if self.seed_parallel:
            return (f"Parallel: seeds over {where}: seed i trains on rank i mod {self.world_size}, every arm of it, "
                    "exactly as one process would")
        return (f"Parallel: data over {where}: each global batch of {batch_size} is split into "
                f"{self.world_size} x {batch_size // self.world_size} sequences, gradients averaged by "
                "DistributedDataParallel")

    def record(self) -> dict[str, Any]:
        """What the results header says about the processes that ran."""
        return {"world_size": self.world_size, "parallel": self.mode, "backend": self.backend,
                "timeout_minutes": self.timeout.total_seconds() / 60 if self.timeout else None,
                "ranks": self.devices}

    # --- collectives -----------------------------------------------------------------------------
    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (all_gather_object); [obj] for one process."""
        if not self.several:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.object_group)
        return gathered

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (sum, min or max); unchanged for one process."""
        if self.several:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def agree(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank and stop every rank if it failed on any: a ConfigError on rank r is raised
        on all ranks (naming r when r is not 0), so rank 0 can say it; any other error raises RankFailed.
        One process just runs it."""
        if not self.several:
            return step()
        try:
            result, failure = step(), None
        except ConfigError as error:
            result, failure = None, ("config", str(error))
        except Exception as error:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            result, failure = None, ("error", f"{type(error).__name__}: {error}")
        failures = self.gather(failure)
        for rank, bad in enumerate(failures):
            if bad is not None:
                kind, message = bad
                where = f"rank {rank}: " if rank != 0 else ""
                if kind == "config":
                    raise SharedConfigError(where + message)
                raise RankFailed(f"rank {rank} failed: {message}")
        return result  # type: ignore[return-value]  # set whenever no rank failed

    def on_main(self, step: Callable[[], T]) -> T | None:
        """Run `step` on rank 0 alone; every rank stops if it failed there (agree). Its result on rank 0, None on
        the others."""
        return self.agree(lambda: step() if self.is_main else None)

    def from_main(self, step: Callable[[], T]) -> T | None:
        """Run `step` on rank 0 alone and give every rank its result (on_main, then gather)."""
        return self.gather(self.on_main(step))[0]

    def in_turn(self, step: Callable[[], T]) -> T:
        """Run `step` first on each node's local rank 0, then on the other ranks (e.g. fill a cache once
        per node, then read it); failures stop every rank as in agree."""
        first = self.local_rank == 0
        early = self.agree(lambda: step() if first else None)
        late = self.agree(lambda: None if first else step())
        return early if first else late  # type: ignore[return-value]

    # --- failures --------------------------------------------------------------------------------
    def post_failure(self, message: str) -> str:
        """Leave `message` for the other ranks (the first failure posted wins) and return the one that stands."""
        if self.store is None:
            return message
        try:
            return bytes(self.store.compare_set(FAILURE_KEY, "", message)).decode()
        except Exception:  # noqa: BLE001 - the store itself may be gone; our own message is still true
            return message

    def failure_note(self) -> str | None:
        """The failure a rank posted (the first one); None when there is none."""
        if self.store is None:
            return None
        try:
            return bytes(self.store.get(FAILURE_KEY)).decode() if self.store.check([FAILURE_KEY]) else None
        except Exception:  # noqa: BLE001 - the store itself may be gone
            return None

    def lost_peers(self) -> list[int]:
        """The other ranks on this machine whose process is gone without leaving a note: killed by SIGKILL or
        the out-of-memory killer, or crashed in native code. (Ranks on other machines cannot be seen from here.)"""
        host = socket.gethostname()
        return [peer["rank"] for peer in self.devices
                if peer["rank"] != self.rank and peer.get("host") == host and _process_gone(peer.get("pid"))]

    def lost_peer(self, doing: Mapping[int, str] | None = None) -> tuple[int, str] | None:
        """(N, 'rank N was lost without a word during X (...)') for the first lost peer (`doing`: rank -> what
        it was training, when known); None when no peer is lost."""
        lost = self.lost_peers()
        if not lost:
            return None
        during = f" during {(doing or {})[lost[0]]}" if lost[0] in (doing or {}) else ""
        return lost[0], (f"rank {lost[0]} was lost without a word{during} (its process is gone: killed by SIGKILL or "
                         "the out-of-memory killer, or crashed)")

    def failure_cause(self, doing: Mapping[int, str] | None = None,
                      wait_s: float = FAILURE_NOTE_WAIT_S) -> RankFailed | None:
        """Why the job is stopping, as far as this rank can tell, as the RankFailed to raise: the failure note another
        rank posted; else a peer lost without a word (lost_peer; `doing`: rank -> what it was training); else this
        rank's own note. With none of these, it looks again for up to `wait_s`: a peer that failed first may still be
        writing its note, and one that was killed may still be exiting (its sockets close before its process is
        gone). None when nothing says."""
        deadline = time.monotonic() + wait_s
        while True:
            note = self.failure_note()
            if note and not note.startswith(f"rank {self.rank} "):
                return RankFailed(note)
            if vanished := self.lost_peer(doing):
                return RankFailed(vanished[1], vanished[0])
            if note or time.monotonic() >= deadline:
                return RankFailed(note) if note else None
            time.sleep(FAILURE_POLL_S)

    # --- data-parallel training -------------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
        """The model as this rank trains it: DistributedDataParallel under --parallel data, else itself.

        Its MoE layers then take the load-balancing loss's routed fractions over the global batch (expert
        counts summed over ranks in training mode), as one process would; unwrap() undoes that.
        `find_unused_parameters` for a model that may leave parameters out of a step (the mask-loop MoE
        skips experts that get no tokens)."""
        if not self.data_parallel:
            return model
        for module in model.modules():
            if isinstance(module, MixtureOfExperts):
                module.expert_count_reducer = self.summed_over_ranks
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)

    def unwrap(self, model: nn.Module) -> None:
        """Make `model` a one-process model again (no collective in its forward), e.g. before rank 0 samples from it."""
        for module in model.modules():
            if isinstance(module, MixtureOfExperts):
                module.expert_count_reducer = None

    def replicas_identical(self, model: nn.Module) -> bool:
        """Whether every rank holds the same weights, compared through each tensor's float64 sum: DDP
        synchronises gradients, not weights, so replicas that drifted apart would train different models."""
        sums = torch.stack([param.detach().double().sum() for param in model.parameters()])
        low, high = self.all_reduce(sums.clone(), "min"), self.all_reduce(sums.clone(), "max")
        return bool(torch.equal(low, high))

    def summed_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` summed over every rank (all ranks must call it alike)."""
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def training_seed(self, seed: int) -> int:
        """The seed of this rank's dropout and router noise: the run's seed on rank 0 (and in one process);
        under data-parallel each other rank draws its own stream for its own slice of the batch."""
        return seed + RANK_SEED_STRIDE * self.rank if self.data_parallel else seed


SINGLE = Distributed()


def _quiet(line: str) -> None:
    """The log of ranks other than 0: rank 0 alone speaks for the job."""


def _process_gone(pid: Any) -> bool:
    """Whether process `pid` has exited (a zombie counts: dead, not yet reaped by torchrun)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _object_group(backend: str, timeout: dt.timedelta) -> Any:
    """A gloo group for object collectives: records stay on the CPU even when the training group is NCCL."""
    return None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)


def rendezvous(launch: Launch, minutes: float) -> Any:
    """The store every rank of the job shares (torchrun's rendezvous), reached before any process group exists."""
    store, _, _ = next(dist.rendezvous("env://", rank=launch.rank, world_size=launch.world_size,
                                       timeout=dt.timedelta(minutes=minutes)))
    return store


def exchange(store: Any, launch: Launch, topic: str, value: str) -> list[str]:
    """Every rank's `value` for `topic`, in rank order, through the store (no process group needed)."""
    store.set(f"exp6/{topic}/{launch.rank}", value)
    return [bytes(store.get(f"exp6/{topic}/{rank}")).decode() for rank in range(launch.world_size)]


def config_differences(settings: list[dict[str, Any]]) -> list[str]:
    """The settings on which some rank differs from rank 0, each with every rank's value, e.g.
    "max_steps (rank 0: 4, rank 1: 6)"; empty when all ranks agree."""
    keys = sorted({key for values in settings for key in values})
    differing = [key for key in keys if any(values.get(key) != settings[0].get(key) for values in settings[1:])]
    return [f"{key} ({', '.join(f'rank {rank}: {values.get(key)!r:.40}' for rank, values in enumerate(settings))})"
            for key in differing]


def check_same_config(store: Any, launch: Launch, settings: dict[str, Any]) -> None:
    """Stop every rank, with SharedConfigError naming the settings that differ, unless every rank resolved
    the same config (its canonical JSON is the fingerprint compared)."""
    fingerprints = exchange(store, launch, "config", json.dumps(settings, sort_keys=True, default=str))
    if len(set(fingerprints)) > 1:
        differences = config_differences([json.loads(text) for text in fingerprints])
        raise SharedConfigError(f"the ranks were started with different settings: {'; '.join(differences)}; "
                                "start every rank with the same command line")


def agree_before_joining(store: Any, launch: Launch, problem: str | None) -> None:
    """Share each rank's setup error (None: none) through the store, so that one rank's error stops every
    rank, named, before any of them waits for the others in the process group."""
    problems = exchange(store, launch, "setup", json.dumps(problem))
    for rank, text in enumerate(problems):
        message = json.loads(text)
        if message is not None:
            raise SharedConfigError(f"rank {rank}: {message}" if rank else message)


def init_distributed(config: ExperimentConfig, launch: Launch, mode: str, device_type: str,
                     store: Any = None) -> Distributed:
    """Join the process group when several ranks run (NCCL when they train on CUDA, gloo on the CPU);
    SINGLE otherwise. Each rank's own device is chosen afterwards (on_device), so that a rank without
    its GPU can say so through agree() rather than leave the others waiting at the rendezvous.
    `store`: the rendezvous store, when the ranks already met there (rendezvous())."""
    if not launch.several:
        return SINGLE
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = dt.timedelta(minutes=config.dist_timeout_minutes)
    rank, world_size = launch.rank, launch.world_size
    if store is None:
        store = rendezvous(launch, config.dist_timeout_minutes)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return Distributed(rank=rank, world_size=world_size, local_rank=launch.local_rank,
                       local_world_size=launch.local_world_size, mode=mode, backend=backend,
                       timeout=timeout, store=store, object_group=_object_group(backend, timeout))


def join_minutes(config: ExperimentConfig) -> float:
    """How long the ranks wait for each other at the rendezvous: --dist-timeout when it is valid (else the
    default; the error is reported once the ranks have met)."""
    minutes = config.dist_timeout_minutes
    valid = isinstance(minutes, (int, float)) and 0 < minutes <= MAX_DIST_TIMEOUT_MINUTES
    return float(minutes) if valid else ExperimentConfig.dist_timeout_minutes


@contextlib.contextmanager
def joined(config: ExperimentConfig, check: Callable[[str], None]) -> Iterator[Distributed]:
    """This process's place in the job while inside: SINGLE for one process; under torchrun the ranks first meet
    in torchrun's store (the same settings everywhere, or every rank stops, naming them), share every setup error
    (the config's, the parallel mode's, and `check(mode)`'s ConfigError for what cannot work in that mode) so that
    rank 0 can say it, then join the process group, which they leave on the way out."""
    launch = launch_from_env()
    store = None
    if launch.several:
        store = rendezvous(launch, join_minutes(config))
        check_same_config(store, launch, config.to_dict())
    problem, mode, device_type = None, NONE, "cpu"
    try:  # follows from the config and the machine: shared through the store, so rank 0 can say it
        config.validate()
        mode = resolve_parallel(config, launch.world_size)
        check(mode)
        device_type = resolve_device(config.device).type  # cuda or cpu; each rank's own GPU is chosen after joining
    except ConfigError as error:
        if not launch.several:
            raise
        problem = str(error)
    if launch.several:
        agree_before_joining(store, launch, problem)
    context = init_distributed(config, launch, mode, device_type, store)
    try:
        yield context
    finally:
        # already stopping (an error on its way to the CLI's one line): a late SIGTERM, e.g. torchrun stopping
        # every rank once one has died, must not kill the process before that line is printed
        with signals_deferred(redeliver=sys.exc_info()[1] is None):
            shutdown(context)


def on_device(context: Distributed, device: torch.device) -> Distributed:
    """Under torchrun, make `device` (cuda:LOCAL_RANK) this rank's CUDA device, as NCCL and the allocator
    need, and record every rank's device; one process is left as it is."""
    if not context.several:
        return context
    use_cuda_device(device)
    devices = context.gather({"rank": context.rank, "host": socket.gethostname(), "pid": os.getpid(), "device": str(device),
                              "device_name": device_name(device)})
    return replace(context, devices=devices)


def shutdown(context: Distributed) -> None:
    """Leave the process group (no collective: safe after a failure). Unreachable DDP wrappers (e.g. of a
    run stopped by a non-finite loss, kept alive by a reference cycle through its traceback) are freed
    first: destroyed after their process group, they abort the process ("terminate called ...")."""
    if context.several and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Job:
    """One training run of the experiment: an arm on a seed (or, in the LR sweep, at an LR multiplier)."""

    index: int  # its place in the sequential order; results are listed in that order whoever trained it
    name: str  # the arm
    seed: int
    owner: int  # the rank that trains it under seed-parallel
    label: str  # for messages, e.g. "deepseek (seed 43)"
    multiplier: float = 1.0  # LR sweep only


Trained = tuple[dict[str, Any], BaseException | None]  # a job's record, and the error that stopped it (None: it ended)


def run_jobs(dist: Distributed, jobs: list[Job], train: Callable[[Job], Trained],
             absorb: Callable[[Job, dict[str, Any]], None], fail: Callable[[Job, str], None],
             unreported: Callable[[list[Job]], None] | None = None) -> None:
    """Train every job once; `absorb(job, record)` runs on every rank for every record, in job order per turn.

    One process or data-parallel: every rank trains every job in order (under data-parallel, together).
    Seed-parallel: each rank trains the jobs it owns, in order; after every turn the ranks exchange the
    records (all_gather_object), so rank 0 sees each run as soon as it ends.

    `train` returns a record and the error that stopped the run (a crash; a non-finite loss is a failed
    record, not an error). An error stops every rank: `fail(job, message)` runs (rank 0 saves), then the
    failing rank re-raises its error and the others raise RankFailed(message). Under data-parallel the
    others learn of it through the rendezvous store, since they are waiting in a collective; a rank
    stopped by Ctrl-C or SIGTERM leaves its note there too, and one that loses contact with the others
    raises RankFailed with the note it finds (or, when a peer vanished without one, says so: a peer on
    this machine whose process is gone was lost without a word).

    Seed-parallel: when this rank stops (Ctrl-C, SIGTERM, a lost peer) in the middle of a turn,
    `unreported(jobs)` first receives the other ranks' jobs of that turn, whose records never arrived, so
    that rank 0 can list them as interrupted rather than leave them out.
    """
    if not dist.seed_parallel:
        for job in jobs:
            record, error = _train_noting_stops(dist, train, job)
            if error is not None:
                own = _failure_message(dist, job, error)
                # a peer that failed first has left its note (give it a moment), or vanished without one:
                # this rank's error (a collective that lost its peer) is its consequence
                cause = dist.failure_cause(dict.fromkeys(range(dist.world_size), job.label)) if dist.several else None
                standing = str(cause) if cause else dist.post_failure(own)
                if standing != own:  # a peer failed first: this rank's error is its consequence
                    record["failure"] = standing
                absorb(job, record)
                fail(job, standing)
                if standing == own:
                    raise error
                raise cause or RankFailed(standing)
            absorb(job, record)
        return
    _run_seed_parallel(dist, jobs, train, absorb, fail, unreported or _ignore)


def _ignore(jobs: list[Job]) -> None:
    """No record of other ranks' runs in progress is kept."""


def _run_seed_parallel(dist: Distributed, jobs: list[Job], train: Callable[[Job], Trained],
                       absorb: Callable[[Job, dict[str, Any]], None], fail: Callable[[Job, str], None],
                       unreported: Callable[[list[Job]], None]) -> None:
    """run_jobs under seed-parallel: a turn at a time, this rank's job of the turn, then every rank's records.
    A stop on this rank hands `unreported` the other ranks' jobs then in progress: those of this turn while it
    trains or waits for them, those of the next turn once their records arrived (they went on at once)."""
    owned = [[job for job in jobs if job.owner == rank] for rank in range(dist.world_size)]

    def others(turn: int) -> list[Job]:
        return [their[turn] for rank, their in enumerate(owned) if rank != dist.rank and turn < len(their)]

    for turn in range(max(len(their) for their in owned)):
        current = owned[dist.rank][turn] if turn < len(owned[dist.rank]) else None
        try:
            record, error = _train_noting_stops(dist, train, current) if current is not None else ({}, None)
        except KeyboardInterrupt:
            unreported(others(turn))
            raise
        message = None if current is None or error is None else _failure_message(dist, current, error)
        try:
            shared = dist.gather((current.index if current is not None else None, record, message))
        except Exception as lost:  # noqa: BLE001 - a peer died or was stopped: say which, if it left word
            unreported(others(turn))
            cause = dist.failure_cause({job.owner: job.label for job in others(turn)})
            raise cause or RankFailed(f"rank {dist.rank} lost contact with the other ranks after turn {turn + 1} "
                                      f"({type(lost).__name__}: {str(lost)[:200]})") from lost
        failures = [(index, failure) for index, _, failure in shared if failure and index is not None]
        try:
            for index, their_record, _ in shared:
                if index is not None:
                    absorb(jobs[index], their_record)
        except KeyboardInterrupt:  # unless one failed, the others started their next runs as the records went out
            unreported([] if failures else others(turn + 1))
            raise
        if failures:
            failed_index, first = failures[0]
            fail(jobs[failed_index], first)
            if error is not None and first == message:
                raise error
            raise RankFailed(first)


def _failure_message(dist: Distributed, job: Job, error: BaseException) -> str:
    return f"rank {dist.rank} failed during {job.label}: {type(error).__name__}: {error}"


def _train_noting_stops(dist: Distributed, train: Callable[[Job], Trained], job: Job) -> Trained:
    """train(job); a Ctrl-C or SIGTERM on this rank is first noted for the other ranks, then propagates."""
    try:
        return train(job)
    except KeyboardInterrupt as stop:
        if dist.several:
            how = "stopped by SIGTERM" if stop_status(stop) == "terminated" else "interrupted (Ctrl-C)"
            dist.post_failure(f"rank {dist.rank} was {how} during {job.label}")
        raise
