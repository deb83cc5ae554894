"""A run's training state, so that a stopped run continues exactly where it was (--resume).

Saved atomically every config.save_every steps (0: at each evaluation) to
OUTPUT_DIR/training_state/<arm>-seed<seed>.pt: the model's weights, every optimizer's state (Muon's
momentum buffers, AdamW's moments and step counts), every LR scheduler's position, the step, the
training loss summed since the last evaluation, the training seconds so far, the run's record (its
curve) and every random stream the run draws from (the CPU generator and, on CUDA, the device's; under
data-parallel, each rank's own). The batches need no saving: batch_starts(seed) draws the same epoch
order again, and a checksum of it in the state proves that. A run that resumes from it ends with the
same weights and the same curve as one that was never stopped (tests/test_resume.py).

The file is read with torch.load(weights_only=True), which accepts tensors and plain containers only.
It is deleted when the run completes, unless config.keep_training_state.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic_files import write_atomic
from common.errors import ConfigError
from common.hardware import rng_states, set_rng_states
from training.distributed import SINGLE, Distributed

STATE_DIR = "training_state"  # in the output folder
FORMAT = 1


def state_path(output_dir: Path, name: str, seed: int) -> Path:
    """Where the training state of arm `name` on `seed` is kept."""
    return output_dir / STATE_DIR / f"{name}-seed{seed}.pt"


def starts_digest(starts: torch.Tensor) -> str:
    """SHA-256 of a run's batch order (every global batch's window starts)."""
    return hashlib.sha256(starts.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()


@torch.no_grad()
def load_in_place(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """optimizer.load_state_dict(saved), writing into the state tensors the optimizer already holds (its warm-up
    step made them): a captured CUDA graph or a compiled step keeps their addresses. Falls back to
    load_state_dict when the shapes of what exists and what was saved differ."""
    live = optimizer.state_dict()  # holds the optimizer's own state tensors, not copies
    targets = [(live["state"].get(index, {}).get(key), value)
               for index, values in saved["state"].items() for key, value in values.items()]
    if any(not (isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor) and target.shape == value.shape)
           for target, value in targets) or len(live["param_groups"]) != len(saved["param_groups"]):
        optimizer.load_state_dict(saved)
        return
    for target, value in targets:
        target.copy_(value)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for key, value in saved_group.items():
            if key == "params":
                continue
            if isinstance(group.get(key), torch.Tensor) and isinstance(value, torch.Tensor):
                group[key].copy_(value)
            else:
                group[key] = value


@dataclass
class ResumePoint:
    """Where a restored run stands: the loop continues with step `step` (0-based, the next to train)."""

    step: int
    training_seconds: float
    loss_sum: torch.Tensor  # the training loss summed over the steps since the last evaluation
    steps_in_window: int


@dataclass
class TrainingState:
    """One run's state file: saved by `save` as the run trains, restored by `restore` when `resume` is set."""

    path: Path
    resume: bool = False

    def save(self, point: ResumePoint, model: nn.Module, optimizers: list[torch.optim.Optimizer],
             schedulers: list[Any], record: dict[str, Any], batches: str, device: torch.device,
             dist: Distributed = SINGLE) -> None:
        """Write the state after `point.step` steps (every rank calls it: each rank's random streams are
        gathered, and rank 0 writes the one file; under seed-parallel each rank writes its own runs)."""
        streams = dist.gather(rng_states(device)) if dist.data_parallel else [rng_states(device)]
        if dist.data_parallel and not dist.is_main:
            return
        state = {
            "format": FORMAT, "step": point.step, "training_seconds": point.training_seconds,
            "loss_sum": point.loss_sum.detach().cpu(), "steps_in_window": point.steps_in_window,
            "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
            "optimizers": [optimizer.state_dict() for optimizer in optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in schedulers],
            "rng": streams, "batches": batches, "record": record,
        }
        write_atomic(self.path, lambda file: torch.save(state, file))

    def restore(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                record: dict[str, Any], batches: str, device: torch.device,
                dist: Distributed = SINGLE) -> ResumePoint | None:
        """Load the saved state into the model, optimizers, schedulers, record and random streams, and say
        where the run stands; None (nothing changed) when there is nothing to resume from."""
        if not self.resume or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a truncated or foreign file: say which, and how to go on
            raise ConfigError(f"cannot read the training state {self.path} ({type(error).__name__}: {str(error)[:120]}); "
                              "delete it to train this run from the start") from None
        if state.get("format") != FORMAT or state.get("batches") != batches:
            raise ConfigError(f"the training state {self.path} was written for other batches or by another version; "
                              "delete it to train this run from the start")
        streams = state["rng"]
        if len(streams) != (dist.world_size if dist.data_parallel else 1):
            raise ConfigError(f"the training state {self.path} was written by {len(streams)} data-parallel rank(s); "
                              f"resume it with as many (now {dist.world_size if dist.data_parallel else 1})")
        model.load_state_dict(state["model"])
        for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
            load_in_place(optimizer, saved)
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        set_rng_states(streams[dist.rank if dist.data_parallel else 0], device)
        placement = {key: record[key] for key in ("rank", "world_size") if key in record}
        record.clear()
        record.update(state["record"], **placement)
        record.setdefault("resumed_at_steps", []).append(state["step"])
        return ResumePoint(step=state["step"], training_seconds=state["training_seconds"],
                           loss_sum=state["loss_sum"].to(device), steps_in_window=state["steps_in_window"])

    def delete(self) -> None:
        """Remove the state file (the run completed and its record is saved), and its folder once empty."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: other runs' states are still there
            self.path.parent.rmdir()
