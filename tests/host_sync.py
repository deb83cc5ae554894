"""A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): fail on anything that would make the
host wait for the GPU.

On a CPU nothing waits, so the check looks at what the code asks for instead:
- aten operators whose result the host must read, or whose output shape depends on tensor values
  (`_local_scalar_dense` behind .item()/bool()/int(), nonzero, bincount, unique, masked_select,
  boolean-mask indexing, ...), seen through a TorchDispatchMode;
- Python-level read-backs (.tolist(), .numpy(), .cpu(), .item(), bool(tensor)) from this project's
  own files, which on a CPU tensor never reach the dispatcher.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent

SYNCING_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose",
    "aten::nonzero", "aten::nonzero_static", "aten::argwhere", "aten::bincount", "aten::histc",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
    "aten::masked_select", "aten::repeat_interleave", "aten::_assert_async",
}
PYTHON_READ_BACKS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class HostSyncError(AssertionError):
    """Raised at the first operation that would synchronise the host with the GPU."""


class HostSyncDetector(TorchDispatchMode):
    """Use as `with HostSyncDetector():`; raises HostSyncError on the first host sync."""

    def __init__(self) -> None:
        super().__init__()
        self.monkeypatch = pytest.MonkeyPatch()  # its own, so leaving undoes only these patches

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNCING_OPS:
            raise HostSyncError(f"{name} needs a host sync (called from {_project_caller()})")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "aten::_to_copy" and source is not None and source.device.type != "cpu" \
                and str(kwargs.get("device", "")) == "cpu":
            raise HostSyncError(f"{name} to the CPU needs a host sync (called from {_project_caller()})")
        if name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            raise HostSyncError(f"boolean-mask indexing needs a host sync (called from {_project_caller()})")
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncDetector:
        for name in PYTHON_READ_BACKS:
            self.monkeypatch.setattr(torch.Tensor, name, _guarded(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        super().__exit__(exc_type, exc, traceback)
        self.monkeypatch.undo()


def _project_caller() -> str:
    """The innermost frame in this project's own code (not tests, not libraries)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if REPO in path.parents and ".venv" not in path.parts and "tests" not in path.parts:
            return f"{path.relative_to(REPO)}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside the project"


def _guarded(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        caller = Path(sys._getframe(1).f_code.co_filename).resolve()
        if REPO in caller.parents and ".venv" not in caller.parts and "tests" not in caller.parts:
            raise HostSyncError(f"Tensor.{name}() reads a value back to the host in "
                                f"{caller.relative_to(REPO)}:{sys._getframe(1).f_lineno}")
        return original(self, *args, **kwargs)

    return guarded
