"""The machine's GPU setup, judged before anything runs: a GPU that PyTorch cannot use is named (never a
silent CPU preset), and flash-attn is imported once in preflight, refused with one line when asked for
and unusable, and named in the backend line when `auto` falls back. The GPU, its driver and flash-attn
are all monkeypatched here, so every branch runs on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import deepseek_modeling
import exp6_trainer
import models.attention_ops as attention_ops
from common import hardware
from common.errors import ConfigError
from config.settings import ExperimentConfig
from exp6_flash_attention_model import FlashAttentionModel
from tests.fake_cuda import install_fake_cuda
from training.preflight import check_flash_attn

CUDA = torch.device("cuda")
pytestmark = pytest.mark.filterwarnings("ignore:.*CUDA is not available.*:UserWarning",
                                        "ignore:.*autocast.*:UserWarning")

PROC_VERSION = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ExperimentConfig]:
    """run_experiment replaced by a recorder: what main() would have started, and with which config."""
    import training.experiment

    configs: list[ExperimentConfig] = []
    monkeypatch.setattr(training.experiment, "run_experiment", lambda config, builders=None, **options: configs.append(config))
    return configs


def _machine(monkeypatch: pytest.MonkeyPatch, driver: str | None, torch_sees_gpu: bool, torch_cuda: str | None = "13.0") -> None:
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: driver)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_sees_gpu)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)


def test_a_gpu_pytorch_cannot_use_stops_the_run_with_the_fix(monkeypatch, capsys, started, tmp_path):
    _machine(monkeypatch, driver="550.54.15", torch_sees_gpu=False)
    code = exp6_trainer.main(["--output-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and started == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "550.54.15" in lines[0] and "CUDA 13.0" in lines[0] and "R580" in lines[0]
    assert hardware.TORCH_CUDA12_INSTALL in lines[0] and "--device cpu" in lines[0]
    assert "No CUDA GPU" not in out + err  # nothing else first: not the CPU preset's notice


def test_the_install_command_in_the_error_is_the_readme_s():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert hardware.TORCH_CUDA12_INSTALL in readme


def test_the_cuda12_fix_names_an_index_torch_2_13_publishes():
    """torch 2.13 ships cu126, cu130 and cu132 builds, no cu128; Blackwell has no kernels in cu126."""
    assert hardware.TORCH_CUDA12_INSTALL.endswith("/whl/cu126") and "cu128" not in hardware.TORCH_CUDA12_INSTALL
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "whl/cu128" not in readme and "CUDA 12.8" not in readme


def test_the_cuda12_fix_says_blackwell_needs_the_driver(monkeypatch):
    _machine(monkeypatch, driver="550.54.15", torch_sees_gpu=False)
    message = hardware.unusable_gpu_error("auto")
    assert message is not None and "CUDA 12.6 build" in message and "Blackwell GPU needs the driver update" in message


@pytest.mark.parametrize("version", ["2.8.0+cu128", "2.5.1", "1.13.1"])
def test_a_torch_without_muon_is_refused_in_one_line_before_anything(monkeypatch, capsys, started, tmp_path, version):
    monkeypatch.setattr(torch, "__version__", version)
    code = exp6_trainer.main(["--output-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and started == [] and out == ""
    assert err.splitlines() == [f"error: {hardware.torch_too_old_error(version)}"]
    assert f"PyTorch {version} is too old" in err and "torch 2.9 or newer" in err
    with pytest.raises(ConfigError, match="too old"):  # the benchmarks and generation, through their device
        hardware.resolve_device("cpu")


def test_the_floor_is_the_one_requirements_and_ci_test():
    """requirements.txt admits torch from TORCH_FLOOR, constraints.txt pins what CI's main run used, and .ci/run
    tests the floor release: one number in three files."""
    repo = Path(__file__).resolve().parent.parent
    floor = ".".join(map(str, hardware.TORCH_FLOOR))
    requirements = (repo / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split()[0] for line in requirements if line.startswith("torch")] == [f"torch>={floor},<2.14"]
    assert "torch==2.13.0" in (repo / "constraints.txt").read_text(encoding="utf-8").splitlines()
    ci = (repo / ".ci" / "run").read_text(encoding="utf-8")
    assert f"FLOOR_TORCH={floor}." in ci and "-c constraints.txt" in ci


@pytest.mark.parametrize("version", ["2.9.0", "2.9.1+cu128", "2.10.0", "2.13.0+cpu", "2.9.0a0+git1234", "3.0.0"])
def test_torch_2_9_and_newer_pass(version):
    assert hardware.torch_too_old_error(version) is None


OLD_TORCH = ("import runpy, sys, torch\n"
             "sys.modules['torch.optim._muon'] = None  # as on torch 2.8: no Muon to import\n"
             "del torch.optim.Muon\n"
             "torch.__version__ = '2.8.0'\n"
             "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
             "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


@pytest.mark.parametrize("module,output", [("exp6_trainer", "--output-dir"), ("training.study", "--output-dir"),
                                           ("training.benchmark", "--output"), ("inference.decode_benchmark", "--output")])
def test_an_entry_point_on_a_torch_without_muon_says_so_in_one_line(module, output, tmp_path):
    """The whole entry point, imports included, on a torch that has no torch.optim.Muon: nothing imports it
    before the check, so the user reads one error line (the benchmarks: after their usage line), never an
    ImportError."""
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", OLD_TORCH, module, "--device", "cpu", output, str(tmp_path / "out")],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "PyTorch 2.8.0 is too old" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_cpu_only_torch_on_a_gpu_machine_is_named_too(monkeypatch):
    _machine(monkeypatch, driver="580.65.06", torch_sees_gpu=False, torch_cuda=None)
    message = hardware.unusable_gpu_error("auto")
    assert message is not None and "CPU-only build" in message and "580.65.06" in message


def test_device_cpu_still_runs_the_cpu_preset_on_such_a_machine(monkeypatch, started, tmp_path):
    _machine(monkeypatch, driver="550.54.15", torch_sees_gpu=False)
    assert exp6_trainer.main(["--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    assert [config.preset for config in started] == ["cpu"] and started[0].device == "cpu"
    assert hardware.resolve_device(started[0].device).type == "cpu"


def test_a_usable_gpu_runs_the_full_experiment(monkeypatch, started, tmp_path):
    install_fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: "580.65.06")
    assert exp6_trainer.main(["--output-dir", str(tmp_path)]) == 0
    assert [config.preset for config in started] == ["full"]
    assert hardware.resolve_device(started[0].device) == CUDA


def test_no_gpu_at_all_runs_the_cpu_preset_with_its_notice(monkeypatch, capsys, started, tmp_path):
    _machine(monkeypatch, driver=None, torch_sees_gpu=False)
    assert exp6_trainer.main(["--output-dir", str(tmp_path)]) == 0
    assert [config.preset for config in started] == ["cpu"]
    assert "No CUDA GPU" in capsys.readouterr().out


def test_resolve_device_refuses_such_a_gpu_for_every_command(monkeypatch):
    """The benchmarks and generation resolve their devices through the same function."""
    _machine(monkeypatch, driver="550.54.15", torch_sees_gpu=False)
    for device in ("auto", "cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="550.54.15"):
            hardware.resolve_device(device)
    assert hardware.resolve_device("cpu").type == "cpu"


def test_the_driver_version_is_read_from_proc_then_nvidia_smi(monkeypatch, tmp_path):
    proc = tmp_path / "version"
    proc.write_text(PROC_VERSION)
    monkeypatch.setattr(hardware, "NVIDIA_DRIVER_FILE", proc)
    assert hardware.nvidia_driver_version() == "550.54.15"

    monkeypatch.setattr(hardware, "NVIDIA_DRIVER_FILE", tmp_path / "absent")
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 570.86.15\necho 570.86.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(smi.parent))
    assert hardware.nvidia_driver_version() == "570.86.15"

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert hardware.nvidia_driver_version() is None  # no driver file, no nvidia-smi: no NVIDIA GPU here


# ---------------------------------------------------------------------------------------------- flash-attn


@pytest.fixture
def flash_attn_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Install a flash_attn package that imports, or one that fails to, as a wheel built for another torch does."""
    attention_ops.flash_attn_import_error.cache_clear()

    def install(works: bool) -> None:
        package = tmp_path / "site" / "flash_attn"
        package.mkdir(parents=True)
        failure = "" if works else "raise ImportError('undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
        (package / "__init__.py").write_text(failure + "def flash_attn_func(*args, **kwargs): ...\n")
        monkeypatch.syspath_prepend(str(package.parent))
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)

    yield install
    attention_ops.flash_attn_import_error.cache_clear()
    sys.modules.pop("flash_attn", None)


def test_a_broken_flash_attn_is_imported_once_and_named(flash_attn_package):
    flash_attn_package(works=False)
    reason = attention_ops.flash_attn_import_error()
    assert reason is not None and "fails to import" in reason and "undefined symbol" in reason
    assert attention_ops.flash_attn_import_error() is reason  # once per process: the second call is the first's answer


@pytest.mark.parametrize("capability,works,expected", [
    ((9, 0), True, None),
    ((8, 9), False, "fails to import"),
    ((10, 0), True, "sm100"),  # Blackwell: flash-attn 2 does not support it; SDPA is the safe path
    ((7, 5), True, "sm75"),
])
def test_flash_attn_backend_is_refused_in_preflight_when_it_cannot_run(monkeypatch, flash_attn_package,
                                                                      capability, works, expected):
    install_fake_cuda(monkeypatch, capability=capability)
    flash_attn_package(works=works)
    config = ExperimentConfig(attention_backend="flash-attn")
    if expected is None:
        check_flash_attn(config, CUDA)
        return
    with pytest.raises(ConfigError, match=expected):
        check_flash_attn(config, CUDA)


def test_flash_attn_backend_with_fp32_is_refused_in_preflight(monkeypatch, flash_attn_package):
    install_fake_cuda(monkeypatch, capability=(9, 0))
    flash_attn_package(works=True)
    with pytest.raises(ConfigError, match="fp16/bf16"):
        check_flash_attn(ExperimentConfig(attention_backend="flash-attn", precision="fp32"), CUDA)


def test_flash_attn_backend_without_the_package_names_the_install(monkeypatch):
    install_fake_cuda(monkeypatch, capability=(8, 9))
    monkeypatch.setattr(attention_ops, "flash_attn_import_error", lambda: attention_ops.FLASH_ATTN_NOT_INSTALLED)
    with pytest.raises(ConfigError, match="pip install flash-attn"):
        check_flash_attn(ExperimentConfig(attention_backend="flash-attn"), CUDA)


def _bf16_cuda_forward(model: FlashAttentionModel, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run the model as on a CUDA card (tensors on the CPU, treated as CUDA half tensors) and return the
    backends it recorded."""
    monkeypatch.setattr(deepseek_modeling, "half_precision_cuda", lambda *tensors: True)
    monkeypatch.setattr(deepseek_modeling, "device_type", lambda tensor: "cuda")
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        model(ids)
    return model.attention_backends()


def test_auto_falls_back_to_sdpa_and_says_why_when_flash_attn_is_broken(monkeypatch, flash_attn_package, config):
    install_fake_cuda(monkeypatch, capability=(9, 0))
    flash_attn_package(works=False)
    model = FlashAttentionModel(config.replace(vocab_size=50))
    model.plan_attention(CUDA)
    (backend,) = _bf16_cuda_forward(model, monkeypatch)
    assert backend.startswith("sdpa[FLASH_ATTENTION] (flash-attn not used: flash-attn is installed but fails to import")


def test_auto_on_blackwell_takes_sdpa_and_says_why(monkeypatch, flash_attn_package, config):
    install_fake_cuda(monkeypatch, "NVIDIA B200", (10, 0))
    flash_attn_package(works=True)
    model = FlashAttentionModel(config.replace(vocab_size=50))
    model.plan_attention(CUDA)
    (backend,) = _bf16_cuda_forward(model, monkeypatch)
    assert backend == "sdpa[FLASH_ATTENTION] (flash-attn not used: flash-attn 2 supports sm80 to sm90 GPUs, not sm100)"


def test_auto_without_flash_attn_is_the_plain_documented_default(monkeypatch, config):
    install_fake_cuda(monkeypatch, capability=(8, 9))
    monkeypatch.setattr(deepseek_modeling, "flash_attn_unusable", lambda capability: attention_ops.FLASH_ATTN_NOT_INSTALLED)
    model = FlashAttentionModel(config.replace(vocab_size=50))
    assert _bf16_cuda_forward(model, monkeypatch) == ["sdpa[FLASH_ATTENTION]"]


def test_the_plan_is_made_before_forward_and_forward_asks_nothing(monkeypatch, config):
    """After plan_attention, a forward pass neither imports flash-attn nor queries the card (a compiled
    block must not trace either); an unplanned module plans itself on first use."""
    install_fake_cuda(monkeypatch, capability=(9, 0))
    asked: list[Any] = []

    def unusable(capability: tuple[int, int] | None) -> str:
        asked.append(capability)
        return attention_ops.FLASH_ATTN_NOT_INSTALLED

    monkeypatch.setattr(deepseek_modeling, "flash_attn_unusable", unusable)
    model = FlashAttentionModel(config.replace(vocab_size=50))
    model.plan_attention(CUDA)
    assert asked == [(9, 0)] * config.n_layers
    _bf16_cuda_forward(model, monkeypatch)
    assert len(asked) == config.n_layers

    unplanned = FlashAttentionModel(config.replace(vocab_size=50))
    _bf16_cuda_forward(unplanned, monkeypatch)
    assert len(asked) == 2 * config.n_layers
