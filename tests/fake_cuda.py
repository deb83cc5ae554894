"""Run code written for a CUDA GPU on the CPU, so every `device.type == "cuda"` branch executes here.

Two parts:
- the CUDA runtime calls the project makes (`torch.cuda.is_available`, `get_device_name`,
  `get_device_capability`, `get_device_properties`, `synchronize`, peak-memory stats, `empty_cache`,
  the RNG state) are replaced by recorders that answer like a chosen card; a call to a name torch.cuda
  does not have fails, as it would on a GPU;
- a TorchFunctionMode rewrites every device argument that names CUDA to the CPU, so tensors and
  modules "moved to cuda" stay on the CPU and the arithmetic really runs.
A third part stands in for CUDA graphs (install_fake_cuda_graphs, FakeCUDAGraph): capture records the
operators, replay reruns exactly them, so what a graph freezes stays frozen here too.
What it cannot rehearse: CUDA kernels themselves (autocast("cuda") is entered, but CPU tensors do
not pass through CUDA autocast, so the arithmetic stays fp32); CPU bf16 tests cover the mixed
precision math and tests/test_gpu.py the kernels on a real GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.host_sync import HostSyncDetector

FAKE_PEAK_MEMORY_BYTES = 512 * 2**20
FAKE_TOTAL_MEMORY_BYTES = 24 * 2**30  # an RTX 4090's 24 GiB


@dataclass
class FakeCudaCalls:
    """What the code asked of the CUDA runtime."""

    name: str
    capability: tuple[int, int]
    synchronize: list[Any] = field(default_factory=list)
    reset_peak: list[Any] = field(default_factory=list)
    peak_reads: list[Any] = field(default_factory=list)
    empty_cache: int = 0
    rng_reads: list[Any] = field(default_factory=list)  # devices whose RNG state was read (a training state save)
    rng_writes: list[Any] = field(default_factory=list)  # (state, device) put back (a resume)


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


class CudaOnCpu(TorchFunctionMode):
    """Every torch function called with a CUDA device argument gets the CPU instead (but torch.device
    itself still makes a CUDA device object, so `device.type == "cuda"` branches are taken)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is torch.device:
            return func(*args, **(kwargs or {}))
        return func(*_on_cpu(args), **{k: _on_cpu(v) for k, v in (kwargs or {}).items()})


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch, name: str = "NVIDIA GeForce RTX 4090",
                      capability: tuple[int, int] = (8, 9)) -> FakeCudaCalls:
    """Patch torch.cuda to answer like `name`; returns the record of the calls made."""
    calls = FakeCudaCalls(name=name, capability=capability)

    def max_memory_allocated(device: Any = None) -> int:
        calls.peak_reads.append(device)
        return FAKE_PEAK_MEMORY_BYTES

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        calls.rng_reads.append(device)
        return torch.arange(16, dtype=torch.uint8)  # a CUDA generator's state is a byte tensor too

    replacements: dict[str, Any] = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "is_bf16_supported": lambda including_emulation=True: True,  # asked by torch.autocast("cuda", bfloat16)
        "get_device_name": lambda device=None: name,
        "get_device_capability": lambda device=None: capability,
        "get_device_properties": lambda device=None: SimpleNamespace(name=name, total_memory=FAKE_TOTAL_MEMORY_BYTES),
        "synchronize": lambda device=None: calls.synchronize.append(device),
        "reset_peak_memory_stats": lambda device=None: calls.reset_peak.append(device),
        "max_memory_allocated": max_memory_allocated,
        "empty_cache": lambda: setattr(calls, "empty_cache", calls.empty_cache + 1),
        "get_rng_state": get_rng_state,
        "set_rng_state": lambda state, device="cuda": calls.rng_writes.append((state, device)),
        # Adam/AdamW's graph-capture health check asks this on a CUDA build of torch <= 2.12 (2.13 asks
        # torch.accelerator); unpatched it reaches the CUDA runtime, which a machine without a GPU lacks
        "is_current_stream_capturing": lambda: False,
    }
    for attribute, replacement in replacements.items():
        assert hasattr(torch.cuda, attribute), f"torch.cuda.{attribute} does not exist"
        monkeypatch.setattr(torch.cuda, attribute, replacement)
    return calls


class FakeCUDAGraph(TorchDispatchMode):
    """torch.cuda.CUDAGraph on the CPU: capture records every aten operator the captured code dispatches, with
    its arguments as they were; replay() runs exactly those operators again on the same tensors (an in-place
    one in place, another one writing its result into the tensor the capture made), as a GPU replays kernels.

    What a real graph does and this one does too: Python code is not rerun, so a Python number read during
    capture (an LR, a shape) is frozen; a value read back to the host during capture fails; tensors made
    during capture stay the graph's, at fixed addresses. What differs: capture here runs the work (a GPU only
    records it), so captured code must leave the state as it found it (GraphedStep restores it), and random
    operators draw from the CPU generator, in the same order as the eager step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recorded: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]] = []
        self.replays = 0
        self.capturing = False
        self._no_sync = HostSyncDetector()  # a read-back during capture fails, as CUDA fails it

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.recorded.append((func, args, kwargs, out))
        return out

    def __enter__(self) -> FakeCUDAGraph:
        self._no_sync.__enter__()
        self.capturing = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.capturing = False
        self._no_sync.__exit__(*exc)

    def replay(self) -> None:
        with torch._C._AutoDispatchBelowADInplaceOrView():  # the recorded operators ran below autograd too
            for func, args, kwargs, out in self.recorded:
                self._rerun(func, args, kwargs, out)
        self.replays += 1

    @staticmethod
    def _rerun(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if func.is_view:  # the view made during capture still aliases the same storage
            return
        result = func(*args, **kwargs)
        if func._schema.is_mutable:
            return
        outputs, results = (out, result) if isinstance(out, (list, tuple)) else ((out,), (result,))
        for kept, new in zip(outputs, results, strict=True):
            if isinstance(kept, torch.Tensor) and kept is not new:
                kept.copy_(new)


class _FakeStream:
    def wait_stream(self, other: Any) -> None:
        pass


def install_fake_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> list[FakeCUDAGraph]:
    """Patch torch.cuda's graph and stream calls with CPU stand-ins; returns the graphs made, in order."""
    graphs: list[FakeCUDAGraph] = []

    def new_graph() -> FakeCUDAGraph:
        graphs.append(FakeCUDAGraph())
        return graphs[-1]

    replacements: dict[str, Any] = {
        "CUDAGraph": new_graph,
        "graph": lambda graph, *args, **kwargs: graph,  # entering the graph starts its recording
        "Stream": lambda device=None, **kwargs: _FakeStream(),
        "stream": lambda stream: contextlib.nullcontext(),
        "current_stream": lambda device=None: _FakeStream(),
        "is_current_stream_capturing": lambda: any(graph.capturing for graph in graphs),  # as a real capture answers
    }
    for attribute, replacement in replacements.items():
        assert hasattr(torch.cuda, attribute), f"torch.cuda.{attribute} does not exist"
        monkeypatch.setattr(torch.cuda, attribute, replacement)
    return graphs
