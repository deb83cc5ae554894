"""Where the experiment runs: device choice, the card's name, precision, timing syncs, memory stats and size.

Every call into the CUDA runtime (`torch.cuda.*`) that training, the benchmark and inference make
lives here, so a CPU test can drive each CUDA branch with those calls monkeypatched, and mypy
checks every name. Models and data never need this module; it needs nothing of the project but its error type.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, TypeVar

import torch

from common.errors import ConfigError

BF16, FP32 = "bf16", "fp32"
T = TypeVar("T")

NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")  # present whenever the NVIDIA kernel driver is loaded
# What to install when PyPI's wheel (torch 2.13.0 there is the CUDA 13.0 build, which needs an R580+ driver)
# cannot use the card: PyTorch's own CUDA 12.6 build, which older drivers run (2.13 publishes cu126, cu130 and
# cu132; no cu128). It has no kernels for Blackwell GPUs (compute capability 10.x and 12.x): those need the
# driver update instead.
TORCH_CUDA12_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_FLOOR = (2, 9)  # the first release with torch.optim.Muon, which training's optimiser is built on


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string (default: the one imported); "2.9.1+cu128" -> (2, 9)."""
    version = str(torch.__version__) if version is None else version
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def torch_too_old_error(version: str | None = None) -> str | None:
    """The one-line error for a torch older than TORCH_FLOOR (default: the one imported), else None.

    Asked before anything else runs, so an old torch is one line, not an ImportError deep in training."""
    version = str(torch.__version__) if version is None else version
    if torch_release(version) >= TORCH_FLOOR:
        return None
    floor = ".".join(map(str, TORCH_FLOOR))
    return (f"PyTorch {version} is too old: this experiment needs torch {floor} or newer (its optimiser is built on "
            f"torch.optim.Muon, new in {floor}); `pip install -r requirements.txt` installs a supported one")


def check_torch_version() -> None:
    """Raise ConfigError when the installed torch is older than TORCH_FLOOR."""
    error = torch_too_old_error()
    if error:
        raise ConfigError(error)


def exit_if_torch_too_old() -> None:
    """The error line and exit 2, as argparse stops, for a module that an older torch cannot even import
    (training/optim.py); entry points whose imports succeed raise check_torch_version's ConfigError instead."""
    error = torch_too_old_error()
    if error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA driver's version (e.g. "570.86.15"), or None when this machine has no NVIDIA driver.

    Read from /proc/driver/nvidia/version, else asked of nvidia-smi; neither needs PyTorch to see the GPU."""
    try:
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", NVIDIA_DRIVER_FILE.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    versions = answer.stdout.split()
    return versions[0] if answer.returncode == 0 and versions else None


def unusable_gpu_error(device_setting: str) -> str | None:
    """The one-line error for a machine whose NVIDIA GPU PyTorch cannot use (e.g. the CUDA 13 wheel on a driver
    older than R580), unless the CPU was asked for on purpose; None when the GPU works or there is none.

    Without it a user with a GPU would silently get the CPU preset."""
    if device_setting == "cpu" or torch.cuda.is_available():
        return None
    driver = nvidia_driver_version()
    if driver is None:
        return None
    built_for = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    needs = " (CUDA 13 builds need an R580 or newer driver)" if (torch.version.cuda or "").startswith("13") else ""
    return (f"this machine has an NVIDIA GPU (driver {driver}) but PyTorch {torch.__version__}, built for {built_for}, "
            f"cannot use it{needs}; install PyTorch's CUDA 12.6 build: `{TORCH_CUDA12_INSTALL}` "
            "(README: Install; a Blackwell GPU needs the driver update instead), update the driver, or run on the CPU "
            "on purpose with --device cpu")


def check_gpu_usable(device_setting: str) -> None:
    """Raise ConfigError (before anything else runs) when a GPU is present that PyTorch cannot use."""
    error = unusable_gpu_error(device_setting)
    if error:
        raise ConfigError(error)


def resolve_device(setting: str, local_rank: int | None = None) -> torch.device:
    """The --device setting (auto, cpu, cuda or cuda:N) as a torch.device; auto means the CUDA GPU when one is
    visible, else the CPU.

    `local_rank` (a process started by torchrun): auto and cuda mean this rank's own GPU,
    cuda:LOCAL_RANK, and a fixed cuda:N is refused, since it would put every rank on one card.
    """
    check_torch_version()
    check_gpu_usable(setting)
    wants_cuda = setting.startswith("cuda") or setting == "auto" and torch.cuda.is_available()
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {setting} was asked for but no CUDA GPU is visible; use --device cpu")
    if not wants_cuda:
        return torch.device("cpu")
    if local_rank is None:
        return torch.device("cuda" if setting == "auto" else setting)
    if setting not in ("auto", "cuda"):
        raise ConfigError(f"--device {setting} under torchrun would put every rank on one GPU; "
                          "use --device cuda (each rank takes cuda:LOCAL_RANK)")
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ConfigError(f"local rank {local_rank} needs GPU cuda:{local_rank} but this node shows {visible}; "
                          f"start at most {visible} processes per node (torchrun --nproc_per_node {visible})")
    return torch.device("cuda", local_rank)


def use_cuda_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (NCCL and the caching allocator use it); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def resolve_precision(setting: str, device: torch.device) -> str:
    """The --precision setting as bf16 or fp32; auto means bf16 autocast on CUDA and full fp32 on CPU."""
    if setting == "auto":
        return BF16 if device.type == "cuda" else FP32
    return setting


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on the device's own autocast (CUDA or CPU) for bf16; nothing for fp32."""
    if precision == BF16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_label(precision: str) -> str:
    return "bf16 autocast" if precision == BF16 else "float32"


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def device_name(device: torch.device) -> str:
    """The card with its compute capability, or the CPU with its core and thread counts."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so host timers measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset, in MiB; None on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def release_memory(device: torch.device) -> None:
    """Return cached GPU blocks to the driver between runs, so one model's cache does not crowd the next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def capture_cuda_graph(device: torch.device, run: Callable[[], T], warmup_runs: int) -> tuple[Callable[[], None], T]:
    """Capture the CUDA work of one call of `run` in a CUDA graph, after `warmup_runs` calls on a side
    stream (PyTorch's recipe: lazy initialisations must not happen during capture). Returns (replay, what
    the captured call returned): replay() reruns that work on the same tensors, with one launch."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_runs):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph.replay, outputs


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The random streams a run on `device` draws from (dropout, router noise): the CPU generator's state
    and, on CUDA, the device's, for a training state to restore (training/train_state.py)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back what rng_states returned."""
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def available_ram() -> int:
    """Bytes of RAM a new allocation can get now: the kernel's MemAvailable, capped by this process's cgroup
    limit when it has one (a container), else the free physical pages."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            available = min(available, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return available


def memory_capacity(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) a run on `device` can use: the card's whole memory on CUDA, the available RAM on the CPU."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return int(properties.total_memory), f"{properties.name}'s memory"
    return available_ram(), "available RAM"
