"""scripts/gpu_check.py cannot pass while checking nothing: its verdicts, run here on recorded outputs
(real ones made on this CPU where possible), fail on a run without CUDA, a GPU test skipped for lack of
CUDA, a NaN run, a float32 or non-flash run, a slower auto MoE path and a failed decode row."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts import gpu_check
from training.experiment import run_experiment

REPO = Path(__file__).resolve().parent.parent


def test_the_stage_limits_fit_seven_minutes_and_every_stage_has_a_verdict():
    assert gpu_check.single_gpu_budget_s() <= gpu_check.TOTAL_LIMIT_S == 420
    names = [stage.name for stage in gpu_check.STAGES]
    assert len(set(names)) == len(names)
    assert {"gpu tests", "benchmark", "dispatch sorted", "decode benchmark", "experiment", "generate"} <= set(names)


def test_without_cuda_the_check_stops_at_stage_0_and_fails(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is False
    assert [stage["name"] for stage in summary["stages"]] == ["environment"]  # nothing else ran
    assert "CUDA is not available" in summary["stages"][0]["notes"][0]
    assert {"torch", "cuda", "driver", "card", "capability"} <= set(summary["stages"][0]["figures"])


def test_stage_0_names_each_missing_package_the_stages_import(monkeypatch):
    """A package a later stage imports, missing: stage 0 fails with one line per package, before minutes of GPU
    time end in an ImportError."""
    for name in ("scipy", "yaml"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec answers None
    info = gpu_check.probe_environment()
    assert info["missing_packages"] == ["scipy", "pyyaml"]
    verdict = gpu_check.environment_verdict({**info, "cuda_available": True})
    assert not verdict.ok and len(verdict.notes) == 2
    assert verdict.notes[0].startswith("scipy is not installed") and "pip install pyyaml" in verdict.notes[1]


STAGE_MODULES = ("exp6_trainer", "training.experiment", "training.benchmark", "inference.decode_benchmark",
                 "inference.generate", "tests.test_gpu", "scripts.gpu_check")


def test_stage_0_asks_for_every_package_the_stages_import():
    """Every import (module level or inside a function) in the project files the stages load names the standard
    library, the project, torch, a package stage 0 checks, or one it leaves out on purpose. The files are those a
    fresh interpreter loads for the stages' modules (this process holds every test module)."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import importlib, json, sys\n"
                               f"for name in {list(STAGE_MODULES)!r}: importlib.import_module(name)\n"
                               "print(json.dumps([str(getattr(m, '__file__', None)) for m in list(sys.modules.values())]))"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    files = {Path(name) for name in json.loads(loaded.splitlines()[-1])
             if name.startswith(str(REPO)) and ".venv" not in name}
    project = {path.relative_to(REPO).parts[0].removesuffix(".py") for path in files}
    imported: dict[str, str] = {}
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                imported.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    third_party = {name: path for name, path in imported.items()
                   if name not in sys.stdlib_module_names and name not in project and name != "torch"}
    assert {"numpy", "transformers", "pytest"} <= set(third_party)  # the scan sees them
    unchecked = {name: path for name, path in third_party.items()
                 if name not in gpu_check.STAGE_PACKAGES and name not in gpu_check.OPTIONAL_PACKAGES}
    assert not unchecked, f"imported by the stages but not checked in stage 0: {unchecked}"


def test_environment_verdict_names_the_card_when_cuda_works():
    verdict = gpu_check.environment_verdict({"cuda_available": True, "card": "NVIDIA H200", "capability": "sm90",
                                             "driver": "580.65.06", "torch": "2.11.0", "cuda": "13.0"})
    assert verdict.ok and verdict.figures["card"] == "NVIDIA H200" and verdict.figures["driver"] == "580.65.06"


# ------------------------------------------------------------------------------------------ GPU tests


def test_gpu_tests_skipped_for_lack_of_cuda_fail_the_stage(tmp_path):
    """A real report: the GPU tests run on this CPU, where every CUDA variant is skipped."""
    stage = gpu_check.STAGES[0]
    assert stage.name == "gpu tests"
    subprocess.run(stage.command(tmp_path, sys.executable) + ["-k", "pin_is_binding"], cwd=REPO, capture_output=True,
                   timeout=120)  # the stage's own command, on one test
    verdict = stage.verdict(tmp_path)
    assert not verdict.ok
    assert any("skipped for lack of CUDA" in note for note in verdict.notes)
    assert "no CUDA test ran" in verdict.notes
    assert verdict.figures["passed"] >= 1  # the CPU twin ran and passed: passing twins do not make the stage pass


def _junit(*cases: str) -> str:
    return f"<testsuites><testsuite name='pytest'>{''.join(cases)}</testsuite></testsuites>"


PASS_CUDA = "<testcase classname='tests.test_gpu' name='test_x[cuda]'/>"
PASS_CPU = "<testcase classname='tests.test_gpu' name='test_x[cpu]'/>"
GRAPH_CPU_TWIN = "<testcase classname='tests.test_gpu' name='test_cuda_graph_step_equals_the_eager_step[cpu-deepseek]'/>"
GRAPH_CUDA = "<testcase classname='tests.test_gpu' name='test_cuda_graph_step_equals_the_eager_step[cuda-deepseek]'/>"
FLASH_SKIP = ("<testcase name='test_y[cuda-flash-attn]'><skipped type='pytest.skip' "
              "message='flash-attn is not importable (pip install flash-attn --no-build-isolation)'/></testcase>")
CUDA_SKIP = "<testcase name='test_z[cuda]'><skipped type='pytest.skip' message='needs a CUDA GPU'/></testcase>"
FAILURE = "<testcase name='test_w[cuda]'><failure message='AssertionError: expected m1 and m2'>trace</failure></testcase>"


@pytest.mark.parametrize("cases,ok,note", [
    ((PASS_CUDA, PASS_CPU), True, None),
    ((PASS_CUDA, FLASH_SKIP), True, "flash-attn not importable (fine): 1 tests"),
    ((PASS_CUDA, CUDA_SKIP), False, "test_z[cuda] skipped for lack of CUDA"),
    ((PASS_CUDA, FAILURE), False, "test_w[cuda] failed: AssertionError"),
    ((PASS_CPU,), False, "no CUDA test ran"),
    ((GRAPH_CPU_TWIN,), False, "no CUDA test ran"),  # "cuda" in its name, but it ran on the CPU
    ((GRAPH_CUDA,), True, None),
])
def test_gpu_tests_verdict(cases, ok, note):
    verdict = gpu_check.gpu_tests_verdict(_junit(*cases))
    assert verdict.ok is ok
    assert note is None or any(note in line for line in verdict.notes), verdict.notes


def test_only_tests_that_ran_on_cuda_count_as_cuda_passed():
    verdict = gpu_check.gpu_tests_verdict(_junit(PASS_CUDA, PASS_CPU, GRAPH_CPU_TWIN, GRAPH_CUDA))
    assert verdict.figures["passed"] == 4 and verdict.figures["cuda passed"] == 2


def test_an_unreadable_test_report_fails():
    assert not gpu_check.gpu_tests_verdict("").ok


# ------------------------------------------------------------------------------------------ experiment


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real (tiny, CPU, float32) experiment's results, made as on the GPU check's image: with neither
    `datasets` nor `flash-attn` importable (an entry of None in sys.modules makes `import` raise)."""
    from models.attention_ops import flash_attn_import_error
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path_factory.mktemp("run"), max_steps=2, eval_every=2, save_checkpoints=False)
    with pytest.MonkeyPatch.context() as patch:
        for package in ("datasets", "flash_attn"):
            patch.setitem(sys.modules, package, None)
        flash_attn_import_error.cache_clear()
        run_experiment(config, log=lambda line: None)
    flash_attn_import_error.cache_clear()
    return json.loads((Path(config.output_dir) / "exp6_attention_comparison.json").read_text())


def _as_on_a_gpu(results: dict[str, Any]) -> dict[str, Any]:
    """The CPU run with what a healthy GPU run records instead: bf16, and the flash kernels."""
    gpu = copy.deepcopy(results)
    gpu["experiment"]["precision"] = "bf16 autocast"
    for arm in gpu["experiment"]["config"]["arms"]:
        for run in gpu[arm]["runs"]:
            run["precision"] = "bf16 autocast"
            run["attention_backend"] = ["flash_attn.flash_attn_func" if arm == "deepseek" else "sdpa[FLASH_ATTENTION]"]
    return gpu


def test_a_cpu_run_fails_the_experiment_stage(cpu_results):
    verdict = gpu_check.experiment_verdict(cpu_results)
    assert not verdict.ok
    assert any("precision 'float32'" in note for note in verdict.notes)
    assert any("not a flash kernel" in note and "sdpa[auto]" in note for note in verdict.notes)


def test_a_healthy_gpu_run_passes_with_per_arm_figures(cpu_results):
    verdict = gpu_check.experiment_verdict(_as_on_a_gpu(cpu_results))
    assert verdict.ok, verdict.notes
    for arm in ("baseline", "deepseek"):
        assert verdict.figures[arm]["ms_per_step"][0] > 0 and verdict.figures[arm]["tokens_per_s"][0] > 0



def test_the_two_gpu_stage_reports_milliseconds_per_step(cpu_results):
    """Both experiment stages give the same figure: a run's training seconds over its steps, in ms."""
    one = gpu_check.experiment_verdict(_as_on_a_gpu(cpu_results)).figures
    two = gpu_check.two_gpu_verdict(cpu_results)
    assert two.ok, two.notes
    for arm in ("baseline", "deepseek"):
        seed = cpu_results[arm]["runs"][0]["seed"]
        assert two.figures["ms_per_step"][f"{arm} seed {seed}"] == pytest.approx(one[arm]["ms_per_step"][0])

def test_a_nan_run_fails_the_experiment_stage_although_the_experiment_exits_0(cpu_results):
    results = _as_on_a_gpu(cpu_results)
    run = results["deepseek"]["runs"][0]
    run.update(status="failed", failure="non-finite training loss at step 1", failed_at_step=1)
    verdict = gpu_check.experiment_verdict(results)
    assert not verdict.ok and any("non-finite training loss" in note for note in verdict.notes)


@pytest.mark.parametrize("backend", [["sdpa[auto]"], ["eager"], [], ["sdpa[FLASH_ATTENTION]", "sdpa[auto]"]])
def test_a_non_flash_backend_fails_the_experiment_stage(cpu_results, backend):
    results = _as_on_a_gpu(cpu_results)
    results["baseline"]["runs"][0]["attention_backend"] = backend
    assert not gpu_check.experiment_verdict(results).ok


def test_an_sdpa_fallback_that_names_its_reason_is_still_a_flash_kernel(cpu_results):
    results = _as_on_a_gpu(cpu_results)
    results["deepseek"]["runs"][0]["attention_backend"] = [
        "sdpa[FLASH_ATTENTION] (flash-attn not used: flash-attn is installed but fails to import (ImportError: x))"]
    assert gpu_check.experiment_verdict(results).ok


def test_an_interrupted_experiment_fails(cpu_results):
    results = _as_on_a_gpu(cpu_results)
    results["experiment"]["status"] = "terminated"
    assert not gpu_check.experiment_verdict(results).ok
    assert not gpu_check.experiment_verdict({}).ok


# ------------------------------------------------------------------------------------------ benchmarks


def _benchmark(ms: float, dispatch: str, precision: str = "bf16 autocast") -> dict[str, Any]:
    return {"rows": [{"name": "deepseek (ours)", "model": "deepseek", "variant": "ours", "precision": precision,
                      "median_step_s": ms / 1e3, "tokens_per_s": 16384 / (ms / 1e3), "peak_memory_mb": 900.0,
                      "moe_dispatch": [dispatch]}], "failed": []}


GROUPED = "grouped_mm (fused kernel, sm90+)"
SORTED = "sorted split (one host sync per layer)"


@pytest.mark.parametrize("grouped_ms,sorted_ms,auto,ok", [
    (10.0, 12.0, GROUPED, True),
    (10.0, 10.5, SORTED, True),  # 5% slower: within tolerance
    (10.0, 11.5, SORTED, False),  # auto took the sorted split, 15% slower than grouped_mm
    (12.0, 10.0, GROUPED, False),
    (10.0, 12.0, None, False),  # cannot tell what auto chose
])
def test_dispatch_verdict_fails_when_auto_s_choice_is_over_10_percent_slower(grouped_ms, sorted_ms, auto, ok):
    verdict = gpu_check.dispatch_verdict(_benchmark(grouped_ms, GROUPED), _benchmark(sorted_ms, SORTED),
                                         [auto] if auto else None)
    assert verdict.ok is ok
    assert f"grouped_mm {grouped_ms:.2f} ms, sorted {sorted_ms:.2f} ms" in verdict.notes[0]
    assert verdict.figures["sorted_over_grouped"] == pytest.approx(sorted_ms / grouped_ms)


def test_benchmark_verdict_wants_bf16_and_finite_times():
    assert gpu_check.benchmark_verdict(_benchmark(10.0, GROUPED)).ok
    assert gpu_check.benchmark_verdict(_benchmark(10.0, GROUPED)).figures["deepseek"]["ms_per_step"] == pytest.approx(10.0)
    assert not gpu_check.benchmark_verdict(_benchmark(10.0, GROUPED, precision="float32")).ok
    assert not gpu_check.benchmark_verdict(_benchmark(float("nan"), GROUPED)).ok
    assert not gpu_check.benchmark_verdict({"rows": [], "failed": []}).ok
    assert not gpu_check.benchmark_verdict({"rows": [], "failed": ["deepseek (ours)"]}).ok


def _decode_row(attention: str, context: int, batch: int, speed: float) -> dict[str, Any]:
    return {"name": f"{attention} ctx {context} batch {batch}", "attention": attention, "context": context,
            "batch_size": batch, "decode_tokens_per_s": speed, "peak_memory_mb": 1000.0}


def test_decode_verdict_reports_the_longest_context_and_fails_on_an_error_row():
    rows = [_decode_row(a, c, b, 100.0 * b) for a in ("MHA kv", "MLA latent") for c in (1024, 32768) for b in (1, 8)]
    verdict = gpu_check.decode_verdict({"rows": rows})
    assert verdict.ok and verdict.figures["context"] == 32768
    assert verdict.figures["decode_tokens_per_s"] == {"MHA kv, batch 1": 100.0, "MHA kv, batch 8": 800.0,
                                                      "MLA latent, batch 1": 100.0, "MLA latent, batch 8": 800.0}
    failing = {"rows": rows + [{"name": "MLA expanded ctx 32768 batch 8", "error": "CUDA out of memory"}]}
    assert not gpu_check.decode_verdict(failing).ok
    assert not gpu_check.decode_verdict({"rows": []}).ok


def _step_modes(graph: dict[str, Any], dispatch: str = gpu_check.FUSED_GROUPED_MM) -> dict[str, Any]:
    rows = []
    for model in ("baseline", "deepseek"):
        rows.append({"name": f"{model} (ours, eager)", "model": model, "variant": "ours", "median_step_s": 0.012,
                     "tokens_per_s": 1.4e6, "step_operators": {"total": 1200}, "moe_dispatch": [dispatch]})
        rows.append({"name": f"{model} (ours, cuda-graph)", "model": model, "variant": "ours", **graph})
    return {"rows": rows}


def test_step_modes_verdict_wants_the_graph_timed_where_the_fused_path_runs():
    timed = gpu_check.step_modes_verdict(_step_modes({"median_step_s": 0.004, "tokens_per_s": 4e6}))
    assert timed.ok and timed.figures["deepseek"]["eager_over_graph"] == pytest.approx(3.0)
    assert timed.figures["baseline"]["eager"]["step_operators"] == {"total": 1200}
    crashed = gpu_check.step_modes_verdict(_step_modes({"error": "RuntimeError: operation not permitted when capturing"}))
    assert not crashed.ok and "not timed" in crashed.notes[0]
    refused = {"skipped": "--cuda-graph needs static shapes, i.e. the fused grouped_mm MoE (sm90 in bf16, or sm100 "
                          "with --moe-dispatch grouped_mm)"}
    on_a_4090 = gpu_check.step_modes_verdict(_step_modes(refused, dispatch="sorted split (one host sync per layer)"))
    assert on_a_4090.ok and "(fine)" in on_a_4090.notes[0]
    assert not gpu_check.step_modes_verdict(_step_modes(refused)).ok  # skipped where the fused path ran: wrong
    no_eager = _step_modes({"median_step_s": 0.004})
    no_eager["rows"][0] = {**no_eager["rows"][0], "error": "CUDA out of memory", "median_step_s": None}
    assert not gpu_check.step_modes_verdict(no_eager).ok
    assert not gpu_check.step_modes_verdict({"rows": []}).ok


def test_generate_verdict_wants_text_from_both_arms():
    log = "== baseline (x; greedy, cache kv, seed 0) ==\nThe\n== deepseek (y; greedy, cache latent, seed 0) ==\nThe\n"
    assert gpu_check.generate_verdict(log).ok
    assert not gpu_check.generate_verdict(log.split("== deepseek")[0]).ok


def test_on_one_gpu_the_two_gpu_stages_are_listed_as_skipped_with_the_reason(monkeypatch, tmp_path):
    """Stage 7 is not dropped from the summary on a one-GPU machine: it says it did not run, and why."""
    monkeypatch.setattr(gpu_check, "probe_environment", lambda: {"cuda_available": True, "card": "NVIDIA H100",
                                                                 "capability": "sm90", "gpus": 1, "missing_packages": []})
    quick = gpu_check.Stage("quick", 30, lambda out, py: [py, "-c", "pass"], lambda out: gpu_check.Verdict(True))
    monkeypatch.setattr(gpu_check, "STAGES", [quick, *[stage for stage in gpu_check.STAGES if stage.multi_gpu]])
    assert gpu_check.main([str(tmp_path)]) == 0  # a skipped stage fails nothing
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [stage["name"] for stage in stages] == ["environment", "quick", "2-GPU seeds", "2-GPU data"]
    for stage in stages[2:]:
        assert stage["skipped"] == "needs 2 GPUs; this machine has 1" and stage["exit_code"] is None
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("SKIPPED") == 2 and "skipped: needs 2 GPUs; this machine has 1" in summary


def test_a_timed_out_stage_is_exit_124_and_its_process_group_is_killed(tmp_path):
    log = tmp_path / "slow.log"
    code, seconds = gpu_check.run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"],
                                          1, log)
    assert code == 124 and seconds < 10
    assert "started" in log.read_text() and "TIMED OUT" in log.read_text()


def test_stage_0_probe_on_a_card(monkeypatch):
    """The probe's CUDA branch, with the CUDA runtime answering like an H200 (tests/fake_cuda.py)."""
    from common import hardware
    from tests.fake_cuda import install_fake_cuda

    install_fake_cuda(monkeypatch, "NVIDIA H200", (9, 0))
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: "580.65.06")
    info = gpu_check.probe_environment()
    assert info["cuda_available"] and info["card"] == "NVIDIA H200" and info["capability"] == "sm90"
    assert info["gpus"] == 1 and info["driver"] == "580.65.06"
    assert gpu_check.environment_verdict(info).ok
