"""Training-step and attention benchmark that anyone can rerun: `python -m training.benchmark`.

For each arm named by --models (default: the baseline and DeepSeek MLA) at the default config it
times the real training step of training/step.py (forward under autocast, loss + load-balancing
term, zero_grad, backward, gradient clipping, optimizer and scheduler steps) on random token ids,
and reports the median step time after warm-up, the aten operators one step dispatches (forward,
backward with clipping, optimizer: what costs host time at these sizes), tokens/s, achieved TFLOP/s
from the analytic FLOP count (models/costs.py), MFU against a stated peak and peak memory. The same models in the public
version's style (float32, the per-expert boolean-mask MoE loop, eager attention) are timed in the
same run, so the speedup of ours over the public style comes from one process on one machine;
`--before` adds each model with the optimizers as they were before batching (torch.optim.Muon block
by block), and `--step-modes` times ours in several step modes (eager, compiled blocks, compiled
blocks and optimizer, the whole step in a CUDA graph). Then the attention module of every arm in the
registry (arms/, layer 0's module), alone, forward plus backward, over a range of sequence lengths.

On CPU it runs small shapes (the CPU preset, batch 4, vocab 2048) so that it can be tested.
The table is printed and the JSON is written atomically (after every row, so a run cut short
keeps what it measured). Every argument, --output and the memory of the largest measurement are
checked before the first one: a bad one exits 2 with one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from arms.registry import ARMS, arm_builders
from common.errors import ConfigError
from common.hardware import (
    FP32,
    autocast,
    device_name,
    peak_memory_mb,
    precision_label,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
    synchronize,
)
from common.reporting import (
    check_output_file,
    fmt,
    guarded,
    older_objects_frozen,
    release,
    render_table,
    write_json_atomic,
)
from config.settings import DEFAULT_ARMS, MOE_DISPATCHES, PRECISIONS, ExperimentConfig, cpu_preset
from config.values import check_parsed_values, parse_and_plan
from models.attention import CausalSelfAttention
from models.costs import attention_score_macs, cost_report, parameter_count
from models.memory import (
    TRAINING_BYTES_PER_PARAMETER,
    MemoryNeed,
    attention_training_bytes,
    check_fits,
    shape_only,
    shape_only_model,
    training_activation_bytes,
)
from models.transformer import MoELanguageModel
from training.optim import build_optimizers, build_schedulers
from training.trainer import check_cuda_graph, make_step, prepare_model, step_mode_label, warm_up

DEFAULT_OUTPUT = "benchmark_results/benchmark.json"
FULL_VOCAB_SIZE = 49152  # the SmolLM tokenizer the full experiment uses
SMALL_VOCAB_SIZE = 2048
SMALL_BATCH_SIZE = 4
CUDA_SEQ_LENS = (256, 512, 1024, 2048, 4096)
CPU_SEQ_LENS = (64, 128, 256)
ATTENTION_TOKENS = {"cuda": 16384, "cpu": 1024}  # batch * seq per attention measurement
MAX_STEPS = 1_000_000  # timed (or warm-up) steps per measurement: hours on any machine
OURS, PUBLIC, BEFORE = "ours", "public style", "before batching"  # the variants of a model row
# --step-modes: the step settings each mode times ours with
STEP_MODES: dict[str, dict[str, bool]] = {
    "eager": {"compile": False, "compile_optimizer": False, "cuda_graph": False},
    "compile": {"compile": True, "compile_optimizer": False, "cuda_graph": False},
    "compile-all": {"compile": True, "compile_optimizer": True, "cuda_graph": False},
    "cuda-graph": {"compile": False, "compile_optimizer": False, "cuda_graph": True},
}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s. Matched by
# substring of torch.cuda.get_device_name, first match wins, so the more specific names come first.
DATASHEET_PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H100 PCIe", 756.5, "H100 PCIe, dense bf16"),
    ("H100 NVL", 835.5, "H100 NVL, dense bf16"),
    ("H200 NVL", 835.5, "H200 NVL, dense bf16"),
    ("H200", 989.4, "H200 / GH200 SXM, dense bf16"),
    ("H100", 989.4, "H100 SXM, dense bf16"),
    ("A100", 312.0, "A100, dense bf16"),
    ("RTX 4090", 165.2, "RTX 4090, dense bf16 with fp32 accumulate"),
)

MODELS: dict[str, Callable[..., MoELanguageModel]] = arm_builders()  # every arm of the registry (arms/)


# --------------------------------------------------------------------------------------------- setup

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.benchmark",
        description="Time the training step of each --models arm (ours and in the public version's style) and "
                    "the attention module of every arm alone; print a table and write JSON.",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, help="timed steps per model (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--seq-lens", type=int, nargs="+", metavar="N",
                        help="sequence lengths of the attention benchmark (default 256..4096 on CUDA, 64 128 256 on CPU)")
    parser.add_argument("--small", action="store_true",
                        help=f"small shapes: the CPU preset model, batch {SMALL_BATCH_SIZE}, vocab {SMALL_VOCAB_SIZE} "
                             "(always used on CPU)")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak TFLOP/s for MFU (default: the card's dense bf16 datasheet value, or a measured bf16 "
                             "matmul when the card is not in the table; no MFU on CPU)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"JSON file to write (default {DEFAULT_OUTPUT})")
    parser.add_argument("--skip-public-style", action="store_true", help="do not time the public-style reference models")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_ARMS),
                        help=f"which arms' training steps and attention modules to time (default: "
                             f"{' '.join(DEFAULT_ARMS)})")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="precision of the 'ours' models: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32; "
                             "the public style always runs fp32")
    parser.add_argument("--moe-dispatch", choices=MOE_DISPATCHES, default="auto",
                        help="MoE dispatch of the 'ours' models (default auto, as in training); compare grouped_mm and "
                             "sorted on a card without the fused grouped GEMM")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block of the 'ours' models, as training does with --compile "
                             "(needs bf16: the default on CUDA, --precision bf16 on CPU)")
    parser.add_argument("--compile-optimizer", action="store_true",
                        help="torch.compile Muon's update too, as training does with --compile-optimizer")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the whole step from a CUDA graph, as training does with --cuda-graph (bf16 on sm90, or "
                             "sm100 with --moe-dispatch grouped_mm)")
    parser.add_argument("--step-modes", nargs="+", choices=list(STEP_MODES), metavar="MODE",
                        help="time ours once per step mode instead: eager, compile (the blocks), compile-all (the blocks "
                             "and Muon's update), cuda-graph (the whole step in one CUDA graph); e.g. --step-modes eager "
                             "compile compile-all cuda-graph")
    parser.add_argument("--before", action="store_true",
                        help="also time each model with the optimizers as they were before batching (torch.optim.Muon "
                             "block by block, AdamW unfused on CPU), eager, in the same run")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help=f"sequences per training step (default 64; {SMALL_BATCH_SIZE} with --small; the CPU preset "
                             "trains with 16)")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help=f"vocabulary of the models (default {FULL_VOCAB_SIZE:,}; {SMALL_VOCAB_SIZE:,} with --small; "
                             "the CPU preset's offline tokenizer has 8,192)")
    return parser


def datasheet_peak_tflops(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, which entry) for a known card, else None."""
    for key, tflops, label in DATASHEET_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, label
    return None


def measure_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float | None:
    """Achieved TFLOP/s of a large dense bf16 matmul on CUDA (None elsewhere)."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    seconds = time.perf_counter() - start
    del a, b
    return 2 * size**3 * repeats / seconds / 1e12


def resolve_peak(args: argparse.Namespace, device: torch.device, device_name: str,
                 measure: Callable[[], float | None]) -> tuple[float | None, str]:
    """The peak MFU is computed against, and where it comes from (a matmul is measured only for an unknown card)."""
    if args.peak_tflops is not None:  # plan_benchmark checked it: positive and finite
        return args.peak_tflops, "user (--peak-tflops)"
    if device.type != "cuda":
        return None, "none on CPU: MFU not reported (pass --peak-tflops to set one)"
    entry = datasheet_peak_tflops(device_name)
    if entry is not None:
        return entry[0], f"datasheet (dense bf16): {entry[1]}"
    measured = measure()
    if measured is not None:
        return measured, "measured (bf16 8192x8192 matmul on this card; not in the datasheet table)"
    return None, "unknown card: MFU not reported (pass --peak-tflops)"


def timed_runs(run: Callable[[int], None], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of run(i) for the `steps` calls after `warmup` untimed ones, GPU work included."""
    times: list[float] = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        run(i)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------------------- model rows

def make_public_style(model: MoELanguageModel) -> None:
    """The public version's style: per-expert boolean-mask MoE loop and eager attention (float32 is the caller's)."""
    for moe in model.moe_layers():
        moe.dispatch = "loop"
    for attention in model.attention_modules():
        attention.backend = "eager"


def benchmark_model(name: str, model_name: str, variant: str, config: ExperimentConfig, device: torch.device,
                    steps: int, warmup: int, peak_tflops: float | None) -> dict[str, Any]:
    """Median training-step time of one model variant and the numbers derived from it.

    Each variant is prepared, warmed up and stepped exactly as training does (trainer.prepare_model, warm_up,
    which counts the step's operators, and make_step, in config's step mode), with its own config from
    rows_of_model; "before batching" builds the optimizers as they were before, and the public style also
    takes the reference MoE loop and eager attention.
    """
    torch.manual_seed(config.seed)
    model = MODELS[model_name](config, seed=config.seed)
    if variant == PUBLIC:
        make_public_style(model)
    precision = resolve_precision(config.precision, device)
    prepare_model(model, config, device, precision)
    costs = cost_report(model, seq_len=config.max_seq_len)
    batch, seq = config.batch_size, config.max_seq_len
    tokens_per_step = batch * seq

    assert config.vocab_size is not None  # run_benchmark always sets it
    generator = torch.Generator().manual_seed(config.seed)
    windows = [torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)
               for _ in range(min(4, steps + warmup))]
    pool = [(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)) for w in windows]

    reset_peak_memory(device)
    optimizers = build_optimizers(model, config, device, reference=variant == BEFORE)
    schedulers = build_schedulers(optimizers, config)
    operators = warm_up(model, optimizers, *pool[0], config, device, precision)
    step = make_step(model, optimizers, schedulers, *pool[0], config, device, precision)
    losses: list[torch.Tensor] = []

    def one_step(i: int) -> None:
        x, y = pool[i % len(pool)]
        losses.append(step(x, y))

    times = timed_runs(one_step, steps, warmup, device)
    loss = losses[-1]

    median = statistics.median(times)
    flops_per_token = costs["training_flops_per_token"]
    achieved = flops_per_token * tokens_per_step / median / 1e12
    row = {
        "name": name,
        "model": model_name,
        "variant": variant,
        "precision": precision_label(precision),
        "compiled": config.compile,
        "step_mode": step_mode_label(config),
        "step_operators": operators,
        "moe_dispatch": model.moe_dispatch_used(),
        "attention_backend": model.attention_backends(),
        "batch_size": batch,
        "seq_len": seq,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_times_s": times,
        "median_step_s": median,
        "min_step_s": min(times),
        "tokens_per_s": tokens_per_step / median,
        "training_flops_per_token": flops_per_token,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "peak_memory_mb": peak_memory_mb(device),
        "parameters_total": costs["parameters_total"],
        "last_loss": float(loss) if loss is not None else None,
    }
    return row


def rows_of_model(model_name: str, config: ExperimentConfig, args: argparse.Namespace) -> list[tuple[str, str, ExperimentConfig]]:
    """(row name, variant, config) of every row timed for one model: ours (once per --step-modes mode), then
    --before's row (eager), then the public style's (eager, float32, the boolean-mask MoE loop)."""
    if args.step_modes:
        rows = [(f"{model_name} ({OURS}, {mode})", OURS, config.replace(**STEP_MODES[mode])) for mode in args.step_modes]
    else:
        rows = [(f"{model_name} ({OURS})", OURS, config)]
    eager = config.replace(**STEP_MODES["eager"])
    if args.before:
        rows.append((f"{model_name} ({BEFORE})", BEFORE, eager))
    if not args.skip_public_style:
        rows.append((f"{model_name} ({PUBLIC})", PUBLIC, eager.replace(precision=FP32, moe_dispatch="loop")))
    return rows


# ------------------------------------------------------------------------------------- attention rows

def attention_flops_per_token(module: CausalSelfAttention, seq_len: int) -> float:
    """Forward + backward FLOPs per token of one attention module, counted as models/costs.py does."""
    linear_macs = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    return 3 * 2 * (linear_macs + attention_score_macs(module, seq_len))


def attention_module(arm: str, config: ExperimentConfig) -> CausalSelfAttention:
    """Layer 0's attention module of an arm of the registry, so that a new arm is timed with no edit here; on the
    "auto" attention backend, as training runs it (MLA: flash-attn when installed, else SDPA; MHA's is SDPA)."""
    return ARMS[arm].attention(config.replace(attention_backend="auto"), 0)


def attention_row_label(row: dict[str, Any]) -> str:
    """'baseline (MultiHeadAttention)': the arm and the module it timed; the arm alone when the row failed before
    its module was built."""
    return f"{row['arm']} ({row['module']})" if "module" in row else row["arm"]


def forward_backward(module: CausalSelfAttention, x: torch.Tensor, device: torch.device, precision: str,
                     _: int) -> None:
    """One timed forward + backward of an attention module alone, its gradients cleared first as a step does."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    with autocast(device, precision):
        out = module(x)
    out.float().sum().backward()


def benchmark_attention(arm: str, config: ExperimentConfig, seq_len: int, device: torch.device,
                        steps: int, warmup: int, peak_tflops: float | None) -> dict[str, Any]:
    """Median forward + backward time of one arm's attention module on a (batch, seq, d_model) input."""
    torch.manual_seed(config.seed)
    module = attention_module(arm, config).to(device).train()
    batch = max(1, ATTENTION_TOKENS["cuda" if device.type == "cuda" else "cpu"] // seq_len)
    x = torch.randn(batch, seq_len, config.d_model, device=device, requires_grad=True)
    precision = resolve_precision(config.precision, device)
    reset_peak_memory(device)
    times = timed_runs(partial(forward_backward, module, x, device, precision), steps, warmup, device)
    median = statistics.median(times)
    tokens = batch * seq_len
    flops = attention_flops_per_token(module, seq_len)
    achieved = flops * tokens / median / 1e12
    row = {
        "name": f"{arm} @ {seq_len}",
        "arm": arm,
        "module": type(module).__name__,
        "seq_len": seq_len,
        "batch_size": batch,
        "tokens": tokens,
        "precision": precision_label(precision),
        "backend_used": module.backend_used,
        "step_times_s": times,
        "median_fwd_bwd_s": median,
        "tokens_per_s": tokens / median,
        "flops_per_token": flops,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "peak_memory_mb": peak_memory_mb(device),
    }
    return row


# ---------------------------------------------------------------------------------------------- table

def format_tables(results: dict[str, Any]) -> str:
    peak = results["peak_tflops"]
    lines = [
        f"Device: {results['device_name']}   torch {results['torch_version']}   shapes: {results['shapes']}",
        f"Training step: batch {results['batch_size']} x seq {results['seq_len']} = "
        f"{results['batch_size'] * results['seq_len']:,} tokens, vocab {results['config']['vocab_size']:,}; "
        f"median of {results['steps']} timed steps after {results['warmup']} warm-up",
        f"MFU peak: {fmt(peak['value'], '.1f')} TFLOP/s ({peak['source']})",
        "",
    ]
    model_rows = []
    for r in results["rows"]:
        if "skipped" in r:
            model_rows.append([r["name"], "skipped: " + r["skipped"][:60]] + [""] * 8)
            continue
        if "error" in r:
            model_rows.append([r["name"], "FAILED: " + r["error"].splitlines()[0][:60]] + [""] * 8)
            continue
        ops = r["step_operators"]
        model_rows.append([
            r["name"], r["precision"], ", ".join(r["moe_dispatch"]), ", ".join(r["attention_backend"]),
            fmt(r["median_step_s"] * 1e3, ".1f"), f"{ops['forward']}/{ops['backward_and_clip']}/{ops['optimizer']}",
            fmt(r["tokens_per_s"], ",.0f"), fmt(r["achieved_tflops"], ".3f"),
            fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f"), fmt(r["peak_memory_mb"], ",.0f"),
        ])
    lines += render_table(["Model", "Precision", "MoE dispatch", "Attention", "Step ms", "Ops fwd/bwd/opt", "Tokens/s",
                           "TFLOP/s", "MFU %", "Peak MB"], model_rows)
    for model_name, speedup in results["speedups"].items():
        lines.append(f"Speedup, {model_name}: public style / ours median step time = {fmt(speedup, '.2f')}x")
    for model_name, speedup in results.get("speedups_over_before", {}).items():
        lines.append(f"Speedup, {model_name}: before batching / ours median step time = {fmt(speedup, '.2f')}x")
    lines.append("")
    attention_rows = []
    for r in results["attention_rows"]:
        if "error" in r:
            attention_rows.append([attention_row_label(r), str(r["seq_len"]),
                                   "FAILED: " + r["error"].splitlines()[0][:60]] + [""] * 5)
            continue
        attention_rows.append([
            attention_row_label(r), str(r["seq_len"]), str(r["batch_size"]), str(r["backend_used"]),
            fmt(r["median_fwd_bwd_s"] * 1e3, ".2f"), fmt(r["tokens_per_s"], ",.0f"), fmt(r["achieved_tflops"], ".3f"),
            fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f"),
        ])
    lines += render_table(["Attention (fwd+bwd)", "Seq", "Batch", "Backend", "ms", "Tokens/s", "TFLOP/s", "MFU %"],
                     attention_rows)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ run

@dataclass
class BenchmarkPlan:
    """Everything the benchmark will time, checked before the first measurement."""

    args: argparse.Namespace
    device: torch.device
    steps: int
    warmup: int
    seq_lens: list[int]
    small: bool
    config: ExperimentConfig
    precision: str
    output: Path


def benchmark_memory(args: argparse.Namespace, config: ExperimentConfig, seq_lens: list[int], steps: int,
                     warmup: int, device: torch.device) -> MemoryNeed:
    """The largest measurement: a model's training step (each row of rows_of_model; the public style with
    eager attention), or one attention module at the longest sequence; one is held at a time."""
    steps_needed = []
    for name in args.models:
        for _, variant, row_config in rows_of_model(name, config, args):
            model = shape_only_model(MODELS[name], row_config)
            if variant == PUBLIC:
                make_public_style(model)
            steps_needed.append(parameter_count(model) * TRAINING_BYTES_PER_PARAMETER
                                + training_activation_bytes(model, row_config.batch_size, row_config.max_seq_len))
    tokens = ATTENTION_TOKENS["cuda" if device.type == "cuda" else "cpu"]
    attention_config = config.replace(max_seq_len=max(seq_lens))
    modules = [shape_only(partial(attention_module, arm, attention_config)) for arm in args.models]
    attention = max(attention_training_bytes(module, max(1, tokens // seq), seq, config.d_model)
                    for module in modules for seq in seq_lens)
    return MemoryNeed(device={"largest measurement": max(max(steps_needed), attention)},
                      host={"step timings": (steps + warmup) * 64 * (len(steps_needed) + len(modules) * len(seq_lens))})


def plan_benchmark(args: argparse.Namespace) -> BenchmarkPlan:
    """Check every argument, --output and the memory of the largest measurement; ConfigError naming the flag otherwise."""
    check_parsed_values(args)  # integers in int64, floats finite, text non-empty: every flag
    device = resolve_device(ExperimentConfig(device=args.device).validate().device)
    on_cuda = device.type == "cuda"
    steps = args.steps if args.steps is not None else (20 if on_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    seq_lens = list(args.seq_lens or (CUDA_SEQ_LENS if on_cuda else CPU_SEQ_LENS))
    if not (1 <= steps <= MAX_STEPS and 0 <= warmup <= MAX_STEPS):
        raise ConfigError(f"--steps must be between 1 and {MAX_STEPS:,} and --warmup between 0 and {MAX_STEPS:,}")
    if any(s < 2 for s in seq_lens):
        raise ConfigError("--seq-lens must all be >= 2")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops {args.peak_tflops}: must be a positive finite number")
    output = check_output_file(args.output)
    small = args.small or not on_cuda
    if small:
        config = cpu_preset(ExperimentConfig(vocab_size=SMALL_VOCAB_SIZE)).replace(batch_size=SMALL_BATCH_SIZE)
    else:
        config = ExperimentConfig(vocab_size=FULL_VOCAB_SIZE)
    config = config.replace(device=str(device), compile=bool(args.compile), compile_optimizer=bool(args.compile_optimizer),
                            cuda_graph=bool(args.cuda_graph), precision=args.precision, moe_dispatch=args.moe_dispatch,
                            batch_size=args.batch_size or config.batch_size, vocab_size=args.vocab_size or config.vocab_size)
    config.validate()
    precision = resolve_precision(config.precision, device)
    compiles = args.compile or any(STEP_MODES[mode]["compile"] for mode in args.step_modes or [])
    if compiles and precision != "bf16":
        raise ConfigError("--compile needs bf16 (the grouped-GEMM MoE compiles only in bf16), as in training: "
                          "add --precision bf16")
    check_fits(benchmark_memory(args, config, seq_lens, steps, warmup, device), device,
               "lower the largest --seq-lens, --batch-size or --vocab-size (or use --small)")
    return BenchmarkPlan(args, device, steps, warmup, seq_lens, small, config, precision, output)


def run_benchmark(args_list: list[str] | None = None) -> dict[str, Any]:
    """Parse and check the arguments, run every measurement, print the table, write the JSON; return the results."""
    plan = parse_and_plan(build_parser(), args_list, plan_benchmark)
    with older_objects_frozen():  # the collection between measurements scans only what they made
        return measure(plan)


def measure(plan: BenchmarkPlan) -> dict[str, Any]:
    """Every measurement of the plan, in order; the JSON is rewritten after each."""
    card = device_name(plan.device)
    peak, peak_source, measured = card_peak(plan.args, plan.device, card)
    results = results_header(plan, card, peak, peak_source, measured)
    print(f"Benchmark on {card}; shapes: {results['shapes']}; results: {plan.output}", flush=True)
    time_model_rows(plan, results, peak)
    record_speedups(results, plan.args)
    time_attention_rows(plan, results, peak)
    return finish(results, plan.output)


def card_peak(args: argparse.Namespace, device: torch.device, card: str) -> tuple[float | None, str, float | None]:
    """(peak, its source, the bf16 matmul measured for it): the matmul runs, and is reported, only for a card the
    datasheet table does not know."""
    measured: list[float | None] = []

    def measure_peak() -> float | None:
        measured.append(measure_matmul_tflops(device))
        return measured[-1]

    peak, source = resolve_peak(args, device, card, measure_peak)
    return peak, source, measured[0] if measured else None


def results_header(plan: BenchmarkPlan, card: str, peak: float | None, peak_source: str,
                   measured: float | None) -> dict[str, Any]:
    """The JSON before the first measurement: the machine, the settings, what each number means, empty rows."""
    config = plan.config
    shapes = (f"small (CPU preset, batch {config.batch_size}, vocab {config.vocab_size})" if plan.small
              else f"full (default config, batch {config.batch_size}, vocab {config.vocab_size})")
    return {
        "benchmark": "training step and attention fwd+bwd timings (python -m training.benchmark)",
        "status": "running",
        "device": str(plan.device),
        "device_name": card,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shapes": shapes,
        "config": config.to_dict(),
        "batch_size": config.batch_size,
        "seq_len": config.max_seq_len,
        "steps": plan.steps,
        "warmup": plan.warmup,
        "compile": bool(plan.args.compile),
        "precision": precision_label(plan.precision),
        "moe_dispatch_requested": config.moe_dispatch,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "peak_tflops": {"value": peak, "source": peak_source},
        "measured_bf16_matmul_tflops": measured,
        "flops_note": "analytic matmul FLOPs of models/costs.py (forward + backward = 3x forward); MFU = achieved / peak",
        "public_style": "same model classes in float32 (no autocast), MoE dispatch 'loop' (per-expert boolean mask), "
                        "eager attention; speedup = public-style median step time / ours",
        "before_batching": "ours with the optimizers as they were before batching: torch.optim.Muon block by block "
                           "(one Newton-Schulz chain each) and AdamW fused only on CUDA; eager",
        "step_operators_note": "aten operators one eager training step dispatches (a TorchDispatchMode, counted in the "
                               "warm-up): forward, backward_and_clip (zero_grad, backward, clip_grad_norm_), optimizer",
        "rows": [],
        "speedups": {},
        "attention_rows": [],
        "attention_rows_note": "one per arm of the registry (arms/) and sequence length: the arm's attention module "
                               "of layer 0, attention backend auto",
        "attention_batch_note": f"batch = max(1, {ATTENTION_TOKENS['cuda' if plan.device.type == 'cuda' else 'cpu']} "
                                "// seq); input (batch, seq, d_model); loss = sum of outputs",
    }


def cuda_graph_refusal(config: ExperimentConfig, device: torch.device) -> str | None:
    """Why this card cannot replay the row's step from a CUDA graph; None when it can or the row does not graph.
    Such a row is said and skipped, not timed and not a failure."""
    if not config.cuda_graph:
        return None
    try:
        check_cuda_graph(config, device)
    except ConfigError as error:
        return str(error)
    return None


def time_model_rows(plan: BenchmarkPlan, results: dict[str, Any], peak: float | None) -> None:
    """Every row of every --models arm (rows_of_model), in order, each one in results["rows"]."""
    for model_name in plan.args.models:
        for name, variant, row_config in rows_of_model(model_name, plan.config, plan.args):
            stub = {"name": name, "model": model_name, "variant": variant}
            refusal = cuda_graph_refusal(row_config, plan.device)
            if refusal is not None:
                print(f"  skipping {name}: {refusal}", flush=True)
                results["rows"].append({**stub, "skipped": refusal})
                continue
            print(f"  timing {name} ...", flush=True)
            results["rows"].append(guarded(
                lambda: benchmark_model(name, model_name, variant, row_config, plan.device, plan.steps, plan.warmup,
                                        peak), stub))
            release(plan.device)  # after the measurement's locals are gone, failed or not
            write_json_atomic(plan.output, results)


def slower_over_ours(slower: float | None, ours: float | None) -> float | None:
    """A speedup of ours: the other variant's median step time over ours; None when either is missing."""
    return slower / ours if ours and slower else None


def record_speedups(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Each model's speedup over the public style (unless skipped) and over before batching (with --before), from
    the medians of its rows; the first "ours" row of a model is its reference (the first --step-modes mode)."""
    medians: dict[tuple[str, str], float | None] = {}
    for row in results["rows"]:
        if "skipped" not in row:
            medians.setdefault((row["model"], row["variant"]), row.get("median_step_s"))
    for model_name in args.models:
        ours = medians.get((model_name, OURS))
        if not args.skip_public_style:
            results["speedups"][model_name] = slower_over_ours(medians.get((model_name, PUBLIC)), ours)
        if args.before:
            results.setdefault("speedups_over_before", {})[model_name] = slower_over_ours(
                medians.get((model_name, BEFORE)), ours)


def time_attention_rows(plan: BenchmarkPlan, results: dict[str, Any], peak: float | None) -> None:
    """Each --models arm's attention module alone at every --seq-lens length, each one in results["attention_rows"]."""
    config = plan.config.replace(max_seq_len=max(plan.seq_lens))
    for arm in plan.args.models:
        for seq_len in plan.seq_lens:
            print(f"  timing {arm}'s attention at seq {seq_len} ...", flush=True)
            results["attention_rows"].append(guarded(
                lambda: benchmark_attention(arm, config, seq_len, plan.device, plan.steps, plan.warmup, peak),
                {"name": f"{arm} @ {seq_len}", "arm": arm, "seq_len": seq_len}))
            release(plan.device)  # after the measurement's locals are gone, failed or not
            write_json_atomic(plan.output, results)


def finish(results: dict[str, Any], output: Path) -> dict[str, Any]:
    """The final status and failed rows, written a last time; the tables printed. A run with a failed row is
    'completed with failures' (and exits 1)."""
    failed = [r["name"] for r in results["rows"] + results["attention_rows"] if "error" in r]
    results["status"] = "completed with failures" if failed else "completed"
    results["failed"] = failed
    write_json_atomic(output, results)
    print()
    print(format_tables(results))
    print(f"\nResults: {output}")
    return results


def main(argv: list[str] | None = None) -> int:
    results = run_benchmark(argv)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
