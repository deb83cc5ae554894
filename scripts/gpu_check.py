"""The one-GPU check: what a lent or new GPU runs once, and whose verdict must be trusted.

    python -m scripts.gpu_check OUTDIR        (scripts/gpu_check.sh OUTDIR does the same)

Stages, each under its own time limit (STAGE_LIMITS, at most 7 minutes in all, so one 10-minute call
has room to spare; nothing is downloaded, and it needs neither `datasets` nor `flash-attn`):
  0. environment: fails unless CUDA is usable and every package the stages import is installed (one line per
     missing package); card, compute capability, driver, PyTorch and CUDA versions
  1. GPU tests (tests/test_gpu.py): fails on any failure and on any test skipped for lack of CUDA
  2. training benchmark (python -m training.benchmark): per-arm step time and tokens/s
  2b. step modes (benchmark --step-modes eager cuda-graph): per arm, the step eager and replayed from one CUDA
     graph; fails unless both are timed where the fused grouped_mm path runs (sm90; elsewhere the benchmark
     skips the graph and says why). Compiling the blocks and the optimizer does not fit the 30 s left in the
     budget: `python -m training.benchmark --step-modes eager compile compile-all cuda-graph` times all four.
  3. MoE dispatch, grouped_mm against sorted (deepseek step): fails when the path `auto` chose on this
     card is more than 10% slower than the other
  4. decode benchmark (1k..32k contexts, batches 1 and 8)
  5. the full experiment (offline corpus): fails unless every run completed, in bf16, and every arm's
     attention ran a flash kernel (flash-attn or sdpa[FLASH_ATTENTION])
  6. generation from the experiment's saved models
  7. with more than one GPU only: torchrun on 2 GPUs, seed-parallel and data-parallel (extra time); on one GPU
     the summary lists them as skipped, with the reason
A stage passes when its command exits 0 and its verdict, which reads what the stage wrote, finds what a
working GPU run must show. OUTDIR gets every log and JSON, summary.txt and summary.json (per stage: exit
code, seconds, verdict and key figures), so two cards can be compared file to file. Exit status: 0 when
every stage passed, 1 otherwise.

The verdicts are plain functions of recorded outputs, so tests/test_gpu_check.py shows on the CPU that
each way a GPU run can go wrong fails the check.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.atomic_files import write_atomic

REPO = Path(__file__).resolve().parent.parent
TOTAL_LIMIT_S = 7 * 60
DISPATCH_TOLERANCE = 1.10  # auto's MoE path may be at most 10% slower than the other
FLASH_KERNELS = ("flash_attn.flash_attn_func", "sdpa[FLASH_ATTENTION]")
CUDA_SKIP = "needs a CUDA GPU"
FLASH_ATTN_SKIP = "flash-attn is not importable"
BF16 = "bf16 autocast"
EXPERIMENT_ARMS = ("baseline", "deepseek")
# What the stages import besides torch (import name -> pip name); tests/test_gpu_check.py scans the stages'
# code so that none is left out. Not needed, so not asked for: OPTIONAL_PACKAGES.
STAGE_PACKAGES = {"numpy": "numpy", "scipy": "scipy", "matplotlib": "matplotlib", "tokenizers": "tokenizers",
                  "transformers": "transformers", "safetensors": "safetensors", "tqdm": "tqdm", "yaml": "pyyaml",
                  "tomli_w": "tomli-w", "pytest": "pytest", "xdist": "pytest-xdist",  # pyproject's addopts has -n
                  **({"tomli": "tomli"} if sys.version_info < (3, 11) else {})}  # tomllib is 3.11's
OPTIONAL_PACKAGES = {
    "datasets": "the stages run offline (the offline corpus)",
    "huggingface_hub": "asked only whether the Hub answers, and the stages run with HF_HUB_OFFLINE=1",
    "pyarrow": "reads a --data .parquet file only",
    "flash_attn": "attention falls back to SDPA; stage 1 names the tests it skips",
    "tomli": "Python 3.10 only (3.11 has tomllib)",
}


@dataclass
class Verdict:
    """What a stage's outputs show: passed or not, why (or what was acceptable but worth naming), key figures."""

    ok: bool
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def failed(*notes: str, figures: dict[str, Any] | None = None) -> Verdict:
    return Verdict(False, list(notes), figures or {})


# ------------------------------------------------------------------------------------------ verdicts


def environment_verdict(info: dict[str, Any]) -> Verdict:
    """Stage 0: CUDA must be usable and no package the stages import missing (else a stage minutes later fails
    on an ImportError); the card and versions are the figures."""
    figures = {key: info.get(key) for key in ("card", "capability", "driver", "torch", "cuda", "python")}
    notes = [f"{package} is not installed: later stages import it (pip install {package}, or pip install -r "
             "requirements.txt)" for package in info.get("missing_packages", [])]
    if not info.get("cuda_available"):
        notes.insert(0, f"CUDA is not available to PyTorch {info.get('torch')} (CUDA {info.get('cuda')}, driver "
                        f"{info.get('driver')}): nothing below would test a GPU")
    return Verdict(not notes, notes, figures)


def runs_on_cuda(test_id: str) -> bool:
    """Whether a test ran on CUDA: its parameters name the device (test_x[cuda], test_y[cuda-deepseek]); a name
    that only mentions CUDA (test_cuda_graph_step_equals_the_eager_step[cpu-baseline], the CPU twin) does not."""
    return "cuda" in test_id.partition("[")[2].rstrip("]").split("-")


def gpu_tests_verdict(junit_xml: str) -> Verdict:
    """Stage 1, from pytest's JUnit XML: no failure or error, no test skipped for lack of CUDA, and at least
    one CUDA test run; skips for a missing flash-attn are fine and named."""
    try:
        root = ElementTree.fromstring(junit_xml)
    except ElementTree.ParseError as error:
        return failed(f"no readable test report ({error})")
    counts = {"passed": 0, "cuda passed": 0, "failed": 0, "skipped": 0}
    notes: list[str] = []
    flash_attn_skips = []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if problem is not None:
            counts["failed"] += 1
            notes.append(f"{name} failed: {(problem.get('message') or '').splitlines()[0][:200] if problem.get('message') else ''}")
        elif skip is not None:
            counts["skipped"] += 1
            reason = skip.get("message") or ""
            if FLASH_ATTN_SKIP in reason:
                flash_attn_skips.append(name)
            elif CUDA_SKIP in reason:
                notes.append(f"{name} skipped for lack of CUDA ({reason})")
            else:
                notes.append(f"{name} skipped ({reason})")
        else:
            counts["passed"] += 1
            counts["cuda passed"] += runs_on_cuda(name)
    ok = counts["failed"] == 0 and counts["cuda passed"] > 0 and not any(CUDA_SKIP in note for note in notes)
    if counts["cuda passed"] == 0:
        notes.append("no CUDA test ran")
    if flash_attn_skips:
        notes.append(f"skipped, flash-attn not importable (fine): {len(flash_attn_skips)} tests")
    return Verdict(ok, notes, counts)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def benchmark_verdict(results: dict[str, Any]) -> Verdict:
    """Stage 2: every row timed (no error row), the models' own steps in bf16; per-arm ms/step and tokens/s."""
    notes = [f"{name} failed" for name in results.get("failed", [])]
    figures: dict[str, Any] = {}
    rows = results.get("rows", [])
    for row in rows:
        if "error" in row:
            continue
        if not (_finite(row.get("median_step_s")) and row["median_step_s"] > 0):
            notes.append(f"{row.get('name')}: no finite step time")
            continue
        if row.get("variant") == "ours":
            if row.get("precision") != BF16:
                notes.append(f"{row.get('name')} ran in {row.get('precision')}, not {BF16}")
            figures[row["model"]] = {"ms_per_step": row["median_step_s"] * 1e3, "tokens_per_s": row.get("tokens_per_s"),
                                     "peak_memory_mb": row.get("peak_memory_mb"), "moe_dispatch": row.get("moe_dispatch")}
    if not figures:
        notes.append("no model was timed")
    if results.get("speedups"):
        figures["speedup_over_public_style"] = results["speedups"]
    return Verdict(not notes, notes, figures)


GRAPH_MODE, EAGER_MODE = "cuda-graph", "eager"
FUSED_GROUPED_MM = "grouped_mm (fused kernel, sm90+)"


def step_modes_verdict(results: dict[str, Any]) -> Verdict:
    """Stage 2b: every arm's eager step timed, and its CUDA-graph step too wherever the fused grouped_mm path
    ran (elsewhere the graph must be refused, before any step, for lack of static shapes); figures per arm and
    mode: ms/step, tokens/s and operators per step, and eager / graph step time."""
    notes: list[str] = []
    figures: dict[str, Any] = {}
    rows = [row for row in results.get("rows", []) if row.get("variant") == "ours"]
    for model in dict.fromkeys(row.get("model") for row in rows):
        modes = {str(row.get("name", "")).rsplit(", ", 1)[-1].rstrip(")"): row for row in rows if row.get("model") == model}
        eager, graph = modes.get(EAGER_MODE, {}), modes.get(GRAPH_MODE, {})
        figures[model] = {mode: {"ms_per_step": row["median_step_s"] * 1e3, "tokens_per_s": row.get("tokens_per_s"),
                                 "step_operators": row.get("step_operators")}
                          for mode, row in modes.items() if "error" not in row and _finite(row.get("median_step_s"))}
        if EAGER_MODE not in figures[model]:
            notes.append(f"{model}: the eager step was not timed ({eager.get('error', 'no row')})")
            continue
        if GRAPH_MODE in figures[model]:
            figures[model]["eager_over_graph"] = (figures[model][EAGER_MODE]["ms_per_step"]
                                                  / figures[model][GRAPH_MODE]["ms_per_step"])
        elif graph.get("skipped") and FUSED_GROUPED_MM not in (eager.get("moe_dispatch") or []):
            notes.append(f"{model}: no CUDA graph on this card (fine): {graph['skipped']}")
        else:
            notes.append(f"{model}: the CUDA-graph step was not timed ({graph.get('error') or graph.get('skipped') or 'no row'})")
    if not rows:
        notes.append("no step was timed")
    failing = [note for note in notes if "(fine)" not in note]
    return Verdict(not failing, notes, figures)


def dispatch_of(moe_dispatch: list[str] | str | None) -> str | None:
    """The --moe-dispatch value behind a recorded path name: grouped_mm, sorted or loop."""
    paths = [moe_dispatch] if isinstance(moe_dispatch, str) else list(moe_dispatch or [])
    kinds = {"grouped_mm" if p.startswith("grouped_mm") else "sorted" if p.startswith("sorted") else "loop" for p in paths}
    return kinds.pop() if len(kinds) == 1 else None


def dispatch_verdict(grouped: dict[str, Any], sorted_split: dict[str, Any], auto_path: list[str] | str | None) -> Verdict:
    """Stage 3: both paths timed; the one `auto` chose on this card (as stage 2's rows recorded it) must be
    within 10% of the other."""
    times = {}
    for name, results in (("grouped_mm", grouped), ("sorted", sorted_split)):
        rows = [r for r in results.get("rows", []) if r.get("variant") == "ours" and "error" not in r]
        if not rows or not _finite(rows[0].get("median_step_s")):
            return failed(f"the {name} dispatch was not timed")
        times[name] = rows[0]["median_step_s"] * 1e3
    chosen = dispatch_of(auto_path)
    figures: dict[str, Any] = {"grouped_mm_ms": times["grouped_mm"], "sorted_ms": times["sorted"],
                               "sorted_over_grouped": times["sorted"] / times["grouped_mm"], "auto_chose": chosen}
    line = (f"grouped_mm {times['grouped_mm']:.2f} ms, sorted {times['sorted']:.2f} ms per step "
            f"(sorted / grouped_mm = {figures['sorted_over_grouped']:.2f}); auto chose {chosen}")
    if chosen not in times:
        return failed(line, f"cannot tell which path auto chose (the benchmark recorded {auto_path!r})", figures=figures)
    other = "sorted" if chosen == "grouped_mm" else "grouped_mm"
    if times[chosen] > DISPATCH_TOLERANCE * times[other]:
        return failed(line, f"auto's choice, {chosen}, is {times[chosen] / times[other] - 1:.0%} slower than {other}: "
                            "change plan_dispatch for this card", figures=figures)
    return Verdict(True, [line], figures)


def decode_verdict(results: dict[str, Any]) -> Verdict:
    """Stage 4: no failed row; decode tokens/s at the longest context, per cache and batch, and peak memory."""
    rows = results.get("rows", [])
    notes = [f"{r.get('name')}: {r['error']}" for r in rows if "error" in r]
    done = [r for r in rows if "error" not in r]
    if not done:
        return failed("no decode row ran", *notes)
    longest = max(r["context"] for r in done)
    figures = {"context": longest, "decode_tokens_per_s": {}, "peak_memory_mb": {}}
    for r in done:
        if r["context"] == longest:
            key = f"{r['attention']}, batch {r['batch_size']}"
            figures["decode_tokens_per_s"][key] = r.get("decode_tokens_per_s")
            figures["peak_memory_mb"][key] = r.get("peak_memory_mb")
            if not (_finite(r.get("decode_tokens_per_s")) and r["decode_tokens_per_s"] > 0):
                notes.append(f"{r.get('name')}: no finite decode speed")
    return Verdict(not notes, notes, figures)


def experiment_verdict(results: dict[str, Any]) -> Verdict:
    """Stage 5: the experiment completed, every run of every arm completed, in bf16, and every arm's
    attention ran a flash kernel; per-arm training ms/step, tokens/s, peak memory and validation loss."""
    experiment = results.get("experiment", {})
    notes: list[str] = []
    if experiment.get("status") != "completed":
        notes.append(f"experiment status {experiment.get('status')!r}, not 'completed'")
    if experiment.get("precision") != BF16:
        notes.append(f"precision {experiment.get('precision')!r}, not {BF16!r}")
    config = experiment.get("config", {})
    arms = config.get("arms") or list(EXPERIMENT_ARMS)
    figures: dict[str, Any] = {}
    for arm in arms:
        summary = results.get(arm)
        runs = summary.get("runs", []) if isinstance(summary, dict) else []
        if not runs:
            notes.append(f"{arm}: no run recorded")
            continue
        for run in runs:
            label = f"{arm} seed {run.get('seed')}"
            if run.get("status") != "completed":
                notes.append(f"{label}: {run.get('status')}" + (f" ({run['failure']})" if run.get("failure") else ""))
            if run.get("precision") != BF16:
                notes.append(f"{label}: precision {run.get('precision')!r}")
            backends = run.get("attention_backend") or []
            if not backends or not all(str(b).startswith(FLASH_KERNELS) for b in backends):
                notes.append(f"{label}: attention ran {backends}, not a flash kernel ({' or '.join(FLASH_KERNELS)})")
        done = [r for r in runs if r.get("status") == "completed" and _finite(r.get("training_seconds"))]
        if done:
            steps = config.get("max_steps") or 1
            figures[arm] = {"ms_per_step": [r["training_seconds"] * 1e3 / steps for r in done],
                            "tokens_per_s": [r.get("tokens_per_second") for r in done],
                            "peak_memory_mb": [r.get("peak_gpu_memory_mb") for r in done],
                            "val_loss": [r.get("val_loss") for r in done],
                            "attention_backend": done[0].get("attention_backend"),
                            "moe_dispatch": done[0].get("moe_dispatch")}
    return Verdict(not notes, notes, figures)


def generate_verdict(log: str) -> Verdict:
    """Stage 6: text came out of both arms' saved models."""
    headers = [line for line in log.splitlines() if line.startswith("== ")]
    found = [arm for arm in EXPERIMENT_ARMS if any(line.startswith(f"== {arm} ") for line in headers)]
    missing = [arm for arm in EXPERIMENT_ARMS if arm not in found]
    return Verdict(not missing, [f"no text from {arm}" for arm in missing], {"models": len(headers)})


def two_gpu_verdict(results: dict[str, Any]) -> Verdict:
    """Stage 7: the torchrun experiment completed with every run completed."""
    experiment = results.get("experiment", {})
    runs = [run for arm in experiment.get("config", {}).get("arms", EXPERIMENT_ARMS)
            for run in (results.get(arm) or {}).get("runs", [])]
    notes = [] if experiment.get("status") == "completed" else [f"status {experiment.get('status')!r}"]
    notes += [f"{r.get('model_name')} seed {r.get('seed')}: {r.get('status')}" for r in runs if r.get("status") != "completed"]
    steps = experiment.get("config", {}).get("max_steps") or 1
    return Verdict(bool(runs) and not notes, notes or ([] if runs else ["no run recorded"]),
                   {"ms_per_step": {f"{r.get('model_name')} seed {r.get('seed')}": r["training_seconds"] * 1e3 / steps
                                    for r in runs if _finite(r.get("training_seconds"))}})


# ------------------------------------------------------------------------------------------ stages


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class Stage:
    """One command, its time limit, and the verdict on what it wrote to OUTDIR."""

    name: str
    limit_s: int
    command: Callable[[Path, str], list[str]]  # (OUTDIR, python) -> argv
    verdict: Callable[[Path], Verdict]  # OUTDIR -> verdict
    multi_gpu: bool = False  # only with more than one GPU, on top of the 7-minute budget


def _experiment_dir(out: Path) -> Path:
    return out / "exp6_results"


def _two_gpu_stage(mode: str) -> Stage:
    seeds = ["42", "43"] if mode == "seeds" else ["42"]
    return Stage(
        f"2-GPU {mode}", 120,
        lambda out, py: [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "exp6_trainer.py",
                         "--offline", "--overwrite", "--parallel", mode, "--seeds", *seeds, "--steps", "200", "--no-save",
                         "--output-dir", str(out / f"two_gpu_{mode}"), "--cache-dir", str(out / "data_cache")],
        lambda out: two_gpu_verdict(read_json(out / f"two_gpu_{mode}" / "exp6_attention_comparison.json")),
        multi_gpu=True)


STAGES: list[Stage] = [
    Stage("gpu tests", 75,
          # -n 0: one process on the one GPU (pyproject's -n auto would start a worker per CPU core, each with its
          # own CUDA context, timing the GPU while the others use it)
          lambda out, py: [py, "-m", "pytest", "tests/test_gpu.py", "-n", "0", "-v", "-rA", "-p", "no:cacheprovider",
                           "--junitxml", str(out / "gpu_tests.xml")],
          lambda out: gpu_tests_verdict(read_text(out / "gpu_tests.xml"))),
    Stage("benchmark", 55,
          lambda out, py: [py, "-m", "training.benchmark", "--steps", "15", "--warmup", "5",
                           "--output", str(out / "benchmark.json")],
          lambda out: benchmark_verdict(read_json(out / "benchmark.json"))),
    Stage("step modes", 30,
          lambda out, py: [py, "-m", "training.benchmark", "--skip-public-style", "--step-modes", EAGER_MODE, GRAPH_MODE,
                           "--steps", "10", "--warmup", "3", "--seq-lens", "256", "--output", str(out / "step_modes.json")],
          lambda out: step_modes_verdict(read_json(out / "step_modes.json"))),
    Stage("dispatch grouped_mm", 20,
          lambda out, py: [py, "-m", "training.benchmark", "--models", "deepseek", "--skip-public-style",
                           "--moe-dispatch", "grouped_mm", "--steps", "10", "--warmup", "3", "--seq-lens", "256",
                           "--output", str(out / "dispatch_grouped_mm.json")],
          lambda out: Verdict(bool(read_json(out / "dispatch_grouped_mm.json").get("rows")))),
    Stage("dispatch sorted", 20,
          lambda out, py: [py, "-m", "training.benchmark", "--models", "deepseek", "--skip-public-style",
                           "--moe-dispatch", "sorted", "--steps", "10", "--warmup", "3", "--seq-lens", "256",
                           "--output", str(out / "dispatch_sorted.json")],
          lambda out: dispatch_verdict(read_json(out / "dispatch_grouped_mm.json"), read_json(out / "dispatch_sorted.json"),
                                       next((r.get("moe_dispatch") for r in read_json(out / "benchmark.json").get("rows", [])
                                             if r.get("model") == "deepseek" and r.get("variant") == "ours"), None))),
    Stage("decode benchmark", 50,
          lambda out, py: [py, "-m", "inference.decode_benchmark", "--contexts", "1024", "4096", "16384", "32768",
                           "--batch-sizes", "1", "8", "--new-tokens", "64", "--output", str(out / "decode.json")],
          lambda out: decode_verdict(read_json(out / "decode.json"))),
    Stage("experiment", 140,
          lambda out, py: [py, "exp6_trainer.py", "--offline", "--overwrite", "--output-dir", str(_experiment_dir(out)),
                           "--cache-dir", str(out / "data_cache")],
          lambda out: experiment_verdict(read_json(_experiment_dir(out) / "exp6_attention_comparison.json"))),
    Stage("generate", 15,
          lambda out, py: [py, "-m", "inference.generate", "--checkpoint", str(_experiment_dir(out)), "--prompt", "The",
                           "--greedy", "--max-new-tokens", "32", "--device", "cuda"],
          lambda out: generate_verdict(read_text(out / "generate.log"))),
    _two_gpu_stage("seeds"),
    _two_gpu_stage("data"),
]
ENVIRONMENT_LIMIT_S = 15  # stage 0 runs in this process; its probe of nvidia-smi is bounded by this


def single_gpu_budget_s(stages: list[Stage] = STAGES) -> int:
    """What the stages every machine runs may take in all: at most TOTAL_LIMIT_S."""
    return ENVIRONMENT_LIMIT_S + sum(stage.limit_s for stage in stages if not stage.multi_gpu)


def log_name(stage: Stage) -> str:
    return stage.name.replace(" ", "_").replace("-", "") + ".log"


def probe_environment() -> dict[str, Any]:
    """The card and the software stack, as stage 0 reports them."""
    import torch

    from common.hardware import nvidia_driver_version

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version(), "driver": nvidia_driver_version(),
                            "cuda_available": torch.cuda.is_available(), "gpus": 0}
    if info["cuda_available"]:
        major, minor = torch.cuda.get_device_capability(0)
        info.update(card=torch.cuda.get_device_name(0), capability=f"sm{major}{minor}", gpus=torch.cuda.device_count())
    for package in ("transformers", "tokenizers", "datasets", "flash-attn", "pytest"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001 - not installed
            info[package] = "not installed"
    info["missing_packages"] = [pip_name for name, pip_name in STAGE_PACKAGES.items()
                                if importlib.util.find_spec(name) is None]
    return info


def run_command(argv: list[str], limit_s: int, log: Path) -> tuple[int, float]:
    """Run argv in the repo root with its output in `log`; kill its whole process group at the limit.
    Returns (exit code, seconds); a timeout is exit code 124, as `timeout` reports it."""
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                                        "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            out.write(f"\nTIMED OUT after {limit_s} s\n")
            code = 124
    return code, time.monotonic() - start


@dataclass
class StageResult:
    name: str
    exit_code: int | None
    seconds: float
    limit_s: int
    ok: bool
    notes: list[str]
    figures: dict[str, Any]
    log: str | None
    skipped: str | None = None  # why the stage did not run (it then neither passes nor fails the check)


def skipped_stage(stage: Stage, reason: str) -> StageResult:
    """A stage this machine does not run, listed with the reason so that the summary shows what was not tested."""
    return StageResult(stage.name, None, 0.0, stage.limit_s, True, [f"skipped: {reason}"], {}, None, skipped=reason)


def write_summary(out: Path, environment: dict[str, Any], results: list[StageResult], started: float) -> bool:
    """summary.json and summary.txt, rewritten after every stage (so a cut-off run keeps what it did)."""
    passed = bool(results) and all(r.ok for r in results)
    summary = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "passed": passed,
               "environment": environment, "seconds": round(time.monotonic() - started, 1),
               "budget_s": single_gpu_budget_s(), "stages": [asdict(r) for r in results]}
    write_atomic(out / "summary.json", lambda file: file.write(json.dumps(summary, indent=2, default=str) + "\n"),
                 binary=False)
    lines = [f"== summary ({summary['seconds']} s; card {environment.get('card')}, {environment.get('capability')}) =="]
    for r in results:
        status = "SKIPPED" if r.skipped else "ok" if r.ok else ("TIMED OUT" if r.exit_code == 124 else "FAILED")
        lines.append(f"{r.name:<20} exit {str(r.exit_code):<4} {r.seconds:6.1f}s  {status}"
                     + "".join(f"\n    {note}" for note in r.notes))
    (out / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return passed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scripts.gpu_check OUTDIR", file=sys.stderr)
        return 2
    out = Path(args[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = os.environ.get("PYTHON", sys.executable)
    started = time.monotonic()
    assert single_gpu_budget_s() <= TOTAL_LIMIT_S, "the stage limits exceed the check's 7-minute budget"

    environment = probe_environment()
    (out / "env.json").write_text(json.dumps(environment, indent=2) + "\n", encoding="utf-8")
    verdict = environment_verdict(environment)
    results = [StageResult("environment", 0 if verdict.ok else 1, time.monotonic() - started, ENVIRONMENT_LIMIT_S,
                           verdict.ok, verdict.notes, verdict.figures, "env.json")]
    print(f"== environment: {json.dumps(environment)}", flush=True)
    write_summary(out, environment, results, started)
    if verdict.ok:
        for stage in STAGES:
            if stage.multi_gpu and environment.get("gpus", 0) < 2:
                results.append(skipped_stage(stage, f"needs 2 GPUs; this machine has {environment.get('gpus', 0)}"))
                print(f"-- {stage.name}: skipped ({results[-1].skipped})", flush=True)
                continue
            log = out / log_name(stage)
            command = stage.command(out, python)
            print(f"== {stage.name} (limit {stage.limit_s} s): {' '.join(command)}", flush=True)
            code, seconds = run_command(command, stage.limit_s, log)
            verdict = stage.verdict(out) if code == 0 else failed(f"exit code {code}" + (" (timed out)" if code == 124 else ""))
            results.append(StageResult(stage.name, code, seconds, stage.limit_s, verdict.ok, verdict.notes,
                                       verdict.figures, log.name))
            print("\n".join(read_text(log).splitlines()[-15:]), flush=True)
            print(f"-- {stage.name}: {'ok' if verdict.ok else 'FAILED'} in {seconds:.0f} s"
                  + "".join(f"\n   {note}" for note in verdict.notes), flush=True)
            write_summary(out, environment, results, started)
    passed = write_summary(out, environment, results, started)
    print(read_text(out / "summary.txt"), end="")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
