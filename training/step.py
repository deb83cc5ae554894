"""One training step: its three parts, their dispatched-operator counts, and its CUDA-graph form.

A step is forward (under autocast) -> zero_grad, backward, gradient clipping -> both optimizer steps and
the schedulers. At the experiment's sizes (64 x 256 tokens, d=256, 3 layers) the GPU work of a step takes a
few milliseconds, so the host time spent launching operators decides the step time: every operator costs
5-10 us to dispatch and launch whatever its size. `count_step_operators` counts the aten operators each part
dispatches (a TorchDispatchMode; exact, and the same on every run), which `python -m training.benchmark` and
every run's JSON report and tests/test_step_ops.py holds below fixed bounds for every arm.

`GraphedStep` removes the launches altogether where shapes are static (the fused grouped_mm MoE: sm90 in bf16,
or sm100 with --moe-dispatch grouped_mm): the whole step is captured once in a CUDA graph and each step
replays it with one launch.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from common.hardware import autocast, capture_cuda_graph
from config.settings import ExperimentConfig

STEP_PARTS = ("forward", "backward_and_clip", "optimizer")


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; works on the logits in place (a view, no extra vocab-sized copy)."""
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def forward_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: ExperimentConfig,
                 device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, cross-entropy + weighted load-balancing loss) of one batch."""
    with autocast(device, precision):
        logits, aux_loss = model(inputs)
        ce_loss = language_model_loss(logits, targets)
        return ce_loss, ce_loss + config.load_balancing_weight * aux_loss


def backward_and_clip(model: nn.Module, optimizers: list[torch.optim.Optimizer], loss: torch.Tensor,
                      config: ExperimentConfig) -> None:
    """Fresh gradients of `loss`, clipped to config.grad_clip in total norm (foreach: a few operators in all)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)


def optimizer_step(optimizers: list[torch.optim.Optimizer], schedulers: list[Any]) -> None:
    for optimizer in optimizers:
        optimizer.step()
    for scheduler in schedulers:
        scheduler.step()


def training_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                  inputs: torch.Tensor, targets: torch.Tensor, config: ExperimentConfig,
                  device: torch.device, precision: str) -> torch.Tensor:
    """One optimizer step in `precision` (bf16 autocast or fp32); returns the detached cross-entropy
    on the device (no host sync)."""
    ce_loss, loss = forward_loss(model, inputs, targets, config, device, precision)
    backward_and_clip(model, optimizers, loss, config)
    optimizer_step(optimizers, schedulers)
    return ce_loss.detach().float()


# ------------------------------------------------------------------------------------- operator counts

class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active, into the part named by `part`.

    Every aten operator counts once, views included (each costs host time); a foreach or fused operator
    counts once however many tensors it takes. Profiler markers and collectives (DDP) are not aten
    operators and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._part = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func.namespace == "aten":
            self.counts[self._part] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self._part = name
        with self:
            yield


def count_step_operators(model: nn.Module, optimizers: list[torch.optim.Optimizer], inputs: torch.Tensor,
                         targets: torch.Tensor, config: ExperimentConfig, device: torch.device,
                         precision: str) -> dict[str, int]:
    """Aten operators one eager training step dispatches, per part (STEP_PARTS) and in total.

    The step really runs (weights, gradients and optimizer state change: see unchanged_training_state);
    compiled code runs eagerly here (set_stance force_eager), so the count is the eager step's whatever the
    mode, without touching the compiled code's caches. Schedulers are not stepped. Count a step after the
    first: the first also creates the optimizers' state.
    """
    counter = OperatorCounter()
    with torch.compiler.set_stance("force_eager"):
        with counter.part("forward"):
            _, loss = forward_loss(model, inputs, targets, config, device, precision)
        with counter.part("backward_and_clip"):
            backward_and_clip(model, optimizers, loss, config)
        with counter.part("optimizer"):
            optimizer_step(optimizers, [])
    counts = {part: counter.counts[part] for part in STEP_PARTS}
    return {**counts, "total": sum(counts.values())}


# ------------------------------------------------------------------------------ state kept across warm-up

@contextlib.contextmanager
def unchanged_training_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Iterator[None]:
    """Run untimed warm-up steps inside: on leaving, every parameter and every optimizer state tensor holds
    its value from before (written in place, so a captured CUDA graph's addresses stay valid), state the
    steps created is zeroed (a fresh AdamW/Muon state is all zeros), and gradients are cleared."""
    params = list(model.parameters())
    saved_params = [p.detach().clone() for p in params]
    saved_state = {id(t): t.clone() for optimizer in optimizers for state in optimizer.state.values()
                   for t in state.values() if isinstance(t, torch.Tensor)}
    try:
        yield
    finally:
        with torch.no_grad():
            for param, saved in zip(params, saved_params, strict=True):
                param.copy_(saved)
            for optimizer in optimizers:
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.copy_(saved_state[id(value)]) if id(value) in saved_state else value.zero_()
        for param in params:
            param.grad = None


# ------------------------------------------------------------------------------------------ CUDA graph

class GraphedStep:
    """The whole training step (forward, backward, clipping, both optimizer steps) captured once in a CUDA
    graph; each call copies the batch into the graph's input buffers and replays it: one launch per step.

    Needs static shapes and no host sync anywhere in the step: the fused grouped_mm MoE (bf16 on sm90, or sm100
    with --moe-dispatch grouped_mm), the optimizers' LRs as device tensors (build_optimizers does this for
    config.cuda_graph; the schedulers, stepped after each replay outside the graph, update them in place) and a
    capturable AdamW. Autocast's weight cache is off inside the capture. Capturing runs warm-up steps (on a side
    stream, as PyTorch requires) inside unchanged_training_state, so it leaves weights and optimizer state as it
    found them. Dropout and router noise draw fresh numbers at every replay (the graph advances the CUDA generator).
    """

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                 inputs: torch.Tensor, targets: torch.Tensor, config: ExperimentConfig, device: torch.device,
                 precision: str, warmup_steps: int = 3) -> None:
        self.inputs, self.targets = inputs.clone(), targets.clone()
        self.schedulers = schedulers
        self._step = (model, optimizers, config, device, precision)
        with unchanged_training_state(model, optimizers):
            self._replay, self.loss = capture_cuda_graph(device, self._captured_step, warmup_steps)

    def _captured_step(self) -> torch.Tensor:
        """The step as the graph captures it, on the graph's own input buffers."""
        model, optimizers, config, device, precision = self._step
        # enabled=False sets nothing but the weight-cache flag, which the forward's autocast inherits (backward
        # and optimizer run outside any autocast, where the flag does nothing)
        with torch.autocast(device.type, enabled=False, cache_enabled=False):
            return training_step(model, optimizers, [], self.inputs, self.targets, config, device, precision)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self._replay()
        for scheduler in self.schedulers:
            scheduler.step()
        return self.loss.clone()  # the graph overwrites its output at the next replay
