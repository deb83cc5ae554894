"""Decode benchmark: what each KV cache holds and how fast each attention decodes, measured.

    python -m inference.decode_benchmark [--small] [--contexts N ...] [--batch-sizes N ...] [--new-tokens N]

For each attention and cache of every arm in the registry (arms.ARMS): MHA "kv"; GQA and MQA "kv", K and V of
their fewer K/V heads; MLA "expanded", per-head K and V, as earlier transformers versions and naive
implementations cache MLA; MLA "latent", DeepSeek's absorbed decoding from a cache of the normalised latent and
the rotary key; and MLA "transformers", transformers' own DeepseekV3Attention with its own DynamicCache, loaded
strictly with the same weights (inference/transformers_mla.py): with the pinned transformers 5.24 it caches the
same latent and rotary key as "latent" but re-expands per-head K and V for every cached token at every step,
without absorption. And "generate": each arm's model driven through transformers' `generate` (models/hf_model.py,
the wrapper a saved folder's modeling file carries) with the arm's own cache behind transformers' Cache API, so
the row against the arm's own one is what transformers' generation loop adds per step. An arm whose attention has
no cached decode path (cache_modes ()) gets no rows: the JSON's list of models records it and one line of the
summary says so. For each context length and each batch size, it
builds the model at the default shapes with seeded random weights (or loads `--checkpoint`), prefills the context
in one forward pass (timed), then decodes `--new-tokens` tokens one at a time, greedily feeding each argmax back
(every step timed between device syncs). Everything runs under the experiment's autocast and `torch.inference_mode`.

Per row it reports the prefill time, the median per-token decode latency, decode tokens/s, the
cache bytes per token per layer measured from the cache tensors next to the analytic count, the
measured cache size, peak GPU memory on CUDA, and the largest batch whose cache fits a memory
budget (24 GiB, an RTX 4090, by default) at that context. Contexts beyond the model's max_seq_len
are fine: RoPE tables are computed on the fly past it.

The JSON is written atomically after every row (a run cut short keeps what it measured), a table
is printed at the end and a PNG (decode tokens/s and cache MB against context) is drawn beside
the JSON. A row that fails (e.g. out of memory) is recorded as an error row, the others still run,
and the exit code is 1. On CPU the shapes are small (the CPU preset, vocab 2048) so it runs in seconds.
Every argument, --output and the memory of the largest row are checked before the first row (or any
random weight) is made: a bad one exits 2 with one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from arms.registry import ARMS, arm_builders, arm_color
from common.atomic_files import write_atomic
from common.errors import ConfigError
from common.hardware import (
    BF16,
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
    times_fewer,
    write_json_atomic,
)
from config.settings import BASELINE, MAX_SEED, PRECISIONS, ExperimentConfig, cpu_preset
from config.values import check_parsed_values, parse_and_plan
from inference.transformers_mla import TRANSFORMERS_MODE, with_transformers_attention
from models.hf_model import ArmCache, Exp6MoEForCausalLM, as_transformers_model
from models.attention import KVCache
from models.attention_ops import CACHED_ATTENTION_BACKENDS
from models.checkpoint import load_checkpoint
from models.costs import parameter_count
from models.memory import MemoryNeed, check_fits, decode_cache_bytes, inference_activation_bytes, shape_only_model
from models.transformer import MoELanguageModel

DEFAULT_OUTPUT = "benchmark_results/decode_benchmark.json"
FULL_VOCAB_SIZE = 49152  # the SmolLM tokenizer the full experiment uses
SMALL_VOCAB_SIZE = 2048
CUDA_CONTEXTS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
CPU_CONTEXTS = (64, 128, 256)
CUDA_BATCH_SIZES = (1, 8)
CPU_BATCH_SIZES = (1, 4)
CUDA_NEW_TOKENS = 128
CPU_NEW_TOKENS = 32
DEFAULT_BUDGET_GB = 24.0  # an RTX 4090
MAX_BUDGET_GB = 1e6  # a petabyte: far above any machine, far below where GiB -> bytes overflows a float
WARMUP_CONTEXT, WARMUP_TOKENS = 8, 2  # the untimed warm-up decode before each row
# MHA; MLA with per-head K/V, with DeepSeek's absorbed latent cache, and through transformers' own module
MODE_ORDER = ("kv", "expanded", "latent", TRANSFORMERS_MODE)
GENERATE_MODE = "generate"  # the arm's own default cache, decoded by transformers' generate (models/hf_model.py)
NO_CACHE = "no cached decode path; not benchmarked"  # an arm whose attention declares no cache_modes
BUDGET_NOTE = ("largest batch whose KV cache alone fits the budget at this context: "
               "floor(budget bytes / (measured bytes per token per layer * layers * context)); "
               "weights, activations and the allocator's overhead are excluded")


@dataclass
class BenchModel:
    """One model to benchmark with every cache mode it has."""

    arm: str
    model: MoELanguageModel
    source: str  # "random weights (seed N)" or "checkpoint DIR"
    tag: str = ""  # tells apart several saved models of one arm in labels (their folder names)
    generate: Exp6MoEForCausalLM | None = None  # set: `model` decoded by transformers' generate (GENERATE_MODE)

    def label(self, mode: str) -> str:
        return attention_label(self.arm, mode) + (f" [{self.tag}]" if self.tag else "")

    def modes(self) -> list[str]:
        """The rows' cache modes: every cache of its attention, or GENERATE_MODE alone for a model driven by generate."""
        return [GENERATE_MODE] if self.generate is not None else ordered_modes(self.model)


@dataclass
class DecodeRun:
    """One prefill + greedy decode: its timings, the tokens fed back and the caches it filled."""

    prefill_s: float
    step_s: list[float]
    tokens: torch.Tensor  # (batch, new_tokens): each decode step's input; the first comes from the prefill's logits
    caches: list[KVCache]


# --------------------------------------------------------------------------------------------- setup

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference.decode_benchmark",
        description="Prefill a context, then time greedy decoding with each KV cache of every arm in arms/ (MHA kv, "
                    "MLA expanded, MLA latent, MLA transformers (transformers' own DeepseekV3Attention and cache, same "
                    "weights), GQA kv, MQA kv, and each arm through transformers' generate with its own cache (MHA "
                    "generate, ...); an arm with no cached decode path is listed, not timed); report "
                    "measured cache bytes, decode speed and the largest batch a memory budget holds. Prints a table, "
                    "writes JSON and a PNG beside it.",
    )
    parser.add_argument("--small", action="store_true",
                        help=f"small shapes: the CPU preset model, vocab {SMALL_VOCAB_SIZE} (always used on CPU)")
    parser.add_argument("--contexts", type=int, nargs="+", metavar="N",
                        help="context lengths to prefill (default "
                             f"{' '.join(map(str, CUDA_CONTEXTS))} on CUDA, {' '.join(map(str, CPU_CONTEXTS))} on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", metavar="N",
                        help=f"sequences decoded together (default {' '.join(map(str, CUDA_BATCH_SIZES))} on CUDA, "
                             f"{' '.join(map(str, CPU_BATCH_SIZES))} on CPU)")
    parser.add_argument("--new-tokens", type=int, metavar="N",
                        help=f"tokens decoded per row, each timed (default {CUDA_NEW_TOKENS} on CUDA, "
                             f"{CPU_NEW_TOKENS} on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")
    parser.add_argument("--memory-budget-gb", type=float, default=DEFAULT_BUDGET_GB, metavar="GB",
                        help=f"memory for the KV cache, in GiB, for the largest-batch column (default "
                             f"{DEFAULT_BUDGET_GB:g}: an RTX 4090)")
    parser.add_argument("--checkpoint", nargs="+", metavar="DIR",
                        help="saved model(s) instead of random weights: a model folder (config.json beside the "
                             "weights) or a folder holding such folders, e.g. a results folder; each is benchmarked "
                             "with every cache its attention has")
    parser.add_argument("--seed", type=int, default=42, help="seed of the random weights and prompts (default 42)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"JSON file to write; the PNG goes beside it (default {DEFAULT_OUTPUT})")
    return parser


def attention_label(arm: str, mode: str) -> str:
    """'MHA kv', 'MLA expanded', 'MLA latent', 'MLA transformers', 'GQA kv', 'MQA kv', 'MHA generate': the arm's
    attention (arms.ARMS) and the cache (or, for generate, how it is driven)."""
    return f"{(ARMS[arm].short if arm in ARMS else '') or arm} {mode}"


def ordered_modes(model: MoELanguageModel) -> list[str]:
    modes = model.cache_modes()
    return [m for m in MODE_ORDER if m in modes] + [m for m in modes if m not in MODE_ORDER]


def checkpoint_dirs(path: Path) -> list[Path]:
    """The saved-model folders at or under `path` (each holds a config.json)."""
    if (path / "config.json").is_file():
        return [path]
    return sorted(p.parent for p in path.rglob("config.json"))


def load_checkpoints(paths: list[str], device: torch.device) -> list[BenchModel]:
    """Each saved model under the given folders, through models.checkpoint.load_checkpoint (strict: a
    missing, extra or mis-shaped tensor raises CheckpointError naming it)."""
    models = []
    for given in paths:
        found = checkpoint_dirs(Path(given))
        if not found:
            raise FileNotFoundError(f"{given}: no saved model (a folder with config.json) there")
        for directory in found:
            loaded = load_checkpoint(directory, arm_builders(), device)
            models.append(BenchModel(loaded.arm, loaded.model, f"checkpoint {directory}", directory.name))
    arms = [m.arm for m in models]
    if len(set(arms)) == len(arms):  # one model per arm: labels need no folder name
        for m in models:
            m.tag = ""
    return models


def random_models(config: ExperimentConfig, seed: int) -> list[BenchModel]:
    return [BenchModel(arm, cls(config, seed=seed), f"random weights (seed {seed})") for arm, cls in arm_builders().items()]


def with_transformers_twins(models: list[BenchModel], precision: str) -> list[BenchModel]:
    """`models`, each MLA model followed by its twin running transformers' own DeepseekV3Attention (loaded
    strictly with its weights; bf16 weights under bf16, as a transformers model loaded in bf16 runs)."""
    out = []
    for bench in models:
        out.append(bench)
        if "latent" in bench.model.cache_modes():  # MLA: the one attention transformers has a module of
            dtype = torch.bfloat16 if precision == BF16 else next(bench.model.parameters()).dtype
            twin = with_transformers_attention(bench.model, dtype)
            out.append(BenchModel(bench.arm, twin, f"{bench.source}, attention through transformers' "
                                                   "DeepseekV3Attention", bench.tag))
    return out


def with_generate_twins(models: list[BenchModel]) -> list[BenchModel]:
    """`models`, each one with a cached decode path followed by the same model (the same weights and modules) under
    the transformers wrapper, to be decoded by generate with its own default cache."""
    out = []
    for bench in models:
        out.append(bench)
        if bench.model.cache_modes() and TRANSFORMERS_MODE not in bench.model.cache_modes():
            out.append(BenchModel(bench.arm, bench.model, f"{bench.source}, driven through transformers' generate",
                                  bench.tag, generate=as_transformers_model(bench.model)))
    return out


# ---------------------------------------------------------------------------------------------- decode

def greedy_decode(model: MoELanguageModel, prompt: torch.Tensor, new_tokens: int, mode: str, device: torch.device,
                  precision: str, after_prefill: Callable[[], None] | None = None) -> DecodeRun:
    """Prefill `prompt` (batch, context) in one forward pass into fresh caches, then decode `new_tokens`
    steps of one token each, feeding back the argmax of the last logits; each phase is timed between syncs."""
    batch, context = prompt.shape
    caches = model.new_caches(mode, capacity=context + new_tokens)  # preallocated: decoding never regrows them
    fed: list[torch.Tensor] = []
    steps: list[float] = []
    with torch.inference_mode(), autocast(device, precision):
        synchronize(device)
        start = time.perf_counter()
        logits, _ = model(prompt, caches, last_only=True)  # as servers prefill: no (batch, context, vocab) logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        if after_prefill is not None:
            after_prefill()
        for _ in range(new_tokens):
            fed.append(token)
            synchronize(device)
            start = time.perf_counter()
            logits, _ = model(token, caches)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            synchronize(device)
            steps.append(time.perf_counter() - start)
    return DecodeRun(prefill_s, steps, torch.cat(fed, dim=1), caches)


class StepClock(LogitsProcessor):
    """Times generate's steps from inside it: called once per step with that step's logits, after the forward pass
    (here after a device sync), so the gaps between calls are whole decode steps, generate's own work included."""

    def __init__(self, device: torch.device, after_prefill: Callable[[], None] | None) -> None:
        self.device, self.after_prefill = device, after_prefill
        self.prefill_end = 0.0
        self.marks: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        if not self.marks:
            self.prefill_end = time.perf_counter()
            if self.after_prefill is not None:
                self.after_prefill()
        self.marks.append(time.perf_counter())
        return scores


def generate_decode(model: Exp6MoEForCausalLM, prompt: torch.Tensor, new_tokens: int, mode: str, device: torch.device,
                    precision: str, after_prefill: Callable[[], None] | None = None) -> DecodeRun:
    """greedy_decode through transformers' generate: the prompt prefilled, then `new_tokens` decode steps each fed
    the previous argmax, with the arm's own cache in `mode`, preallocated as greedy_decode's (an ArmCache behind
    transformers' Cache API). Timed by StepClock; the prefill time includes generate's setup."""
    context = prompt.shape[1]
    cache = ArmCache(model.lm.new_caches(mode, capacity=context + new_tokens))
    clock = StepClock(device, after_prefill)
    with torch.inference_mode(), autocast(device, precision):
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens + 1,
                             do_sample=False, use_cache=True, cache=cache, logits_processor=LogitsProcessorList([clock]),
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    steps = [after - before for before, after in zip(clock.marks, clock.marks[1:])]
    return DecodeRun(clock.prefill_end - start, steps, out.sequences[:, context : context + new_tokens], cache.caches)


def kv_cache_mode(bench: BenchModel, mode: str) -> str:
    """The KVCache mode a row decodes with: its own, or for a generate row the arm's default (MLA: latent)."""
    return bench.model.cache_modes()[0] if mode == GENERATE_MODE else mode


def decode_run(bench: BenchModel, prompt: torch.Tensor, new_tokens: int, mode: str, device: torch.device,
               precision: str, after_prefill: Callable[[], None] | None = None) -> DecodeRun:
    """One prefill and greedy decode of a row: our own loop, or transformers' generate for a generate row."""
    if bench.generate is not None:
        return generate_decode(bench.generate, prompt, new_tokens, kv_cache_mode(bench, mode), device, precision,
                               after_prefill)
    return greedy_decode(bench.model, prompt, new_tokens, mode, device, precision, after_prefill)


def element_bytes(precision: str, model: MoELanguageModel) -> int:
    """Bytes per cached value the analytic count assumes: bf16 under bf16 autocast, else the weights' dtype."""
    return 2 if precision == BF16 else next(model.parameters()).element_size()


def max_batch_in_budget(budget_bytes: float, bytes_per_token_per_layer: float, n_layers: int, context: int) -> int:
    """Largest batch whose KV cache alone (weights and activations excluded) fits `budget_bytes` at `context`."""
    return math.floor(budget_bytes / (bytes_per_token_per_layer * n_layers * context))


def benchmark_row(bench: BenchModel, mode: str, context: int, batch: int, new_tokens: int, device: torch.device,
                  precision: str, budget_bytes: float, seed: int) -> dict[str, Any]:
    """Prefill + timed greedy decode of one (attention, cache, context, batch), after an untimed warm-up."""
    model = bench.model
    vocab = model.config.vocab_size
    assert vocab is not None  # a built model always has one
    generator = torch.Generator().manual_seed((seed * 1_000_003 + context * 1_009 + batch) % 2**64)
    prompt = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
    cache_mode = kv_cache_mode(bench, mode)
    decode_run(bench, prompt[:, : min(context, WARMUP_CONTEXT)], WARMUP_TOKENS, mode, device, precision)

    peaks: dict[str, float | None] = {}

    def after_prefill() -> None:
        peaks["prefill"] = peak_memory_mb(device)
        reset_peak_memory(device)  # the decode peak: weights + caches + one step's activations

    release(device)
    reset_peak_memory(device)
    run = decode_run(bench, prompt, new_tokens, mode, device, precision, after_prefill)
    peaks["decode"] = peak_memory_mb(device)

    per_layer = [cache.bytes_per_token() for cache in run.caches]
    measured = per_layer[0]
    n_layers = len(run.caches)
    values = model.attention_modules()[0].kv_cache_values_per_token(cache_mode)
    analytic = values * element_bytes(precision, model)
    cache_bytes = sum(b * batch * cache.length for b, cache in zip(per_layer, run.caches))
    decode_s = sum(run.step_s)
    known_peaks = [p for p in peaks.values() if p is not None]
    return {
        "name": f"{bench.label(mode)} ctx {context} batch {batch}",
        "attention": bench.label(mode),
        "arm": bench.arm,
        "cache_mode": mode,
        "kv_cache_mode": cache_mode,  # what the cache holds: the mode itself, or for generate the arm's own default
        "source": bench.source,
        "context": context,
        "batch_size": batch,
        "new_tokens": new_tokens,
        "precision": precision_label(precision),
        "prefill_s": run.prefill_s,
        "prefill_tokens_per_s": batch * context / run.prefill_s,
        "decode_step_ms": [s * 1e3 for s in run.step_s],
        "decode_ms_per_token_median": statistics.median(run.step_s) * 1e3,
        "decode_ms_per_token_min": min(run.step_s) * 1e3,
        "decode_s": decode_s,
        "decode_tokens_per_s": batch * new_tokens / decode_s,
        "cache_bytes_per_token_per_layer": measured,
        "cache_bytes_per_token_by_layer": per_layer,
        "cache_layers_agree": all(b == measured for b in per_layer),
        "analytic_values_per_token_per_layer": values,
        "analytic_bytes_per_token_per_layer": analytic,
        "measured_equals_analytic": measured == analytic,
        "cache_shapes_layer0": {name: list(shape) for name, shape in run.caches[0].shapes().items()},
        "cache_length": run.caches[0].length,
        "cache_lengths_by_layer": [cache.length for cache in run.caches],
        "n_layers": n_layers,
        "cache_mb": cache_bytes / 2**20,
        "max_batch_in_budget": max_batch_in_budget(budget_bytes, measured, n_layers, context),
        "prefill_peak_memory_mb": peaks["prefill"],
        "decode_peak_memory_mb": peaks["decode"],
        "peak_memory_mb": max(known_peaks) if known_peaks else None,
        "attention_backend": model.attention_backends(),
        # the explicit SDPA backend choice prefill and decode ran under (no cuDNN: per-shape plans)
        "sdpa_backends": [backend.name for backend in CACHED_ATTENTION_BACKENDS],
        "moe_dispatch": model.moe_dispatch_used(),
    }


# ------------------------------------------------------------------------------------- table and plot

def _ok_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["rows"] if "error" not in r]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Each arm's cache per token against MHA's, in whichever direction it goes (one line for an arm with no
    cached decode path), what absorption saves over transformers' MLA, and whether the measured sizes are the
    analytic ones."""
    sizes: dict[str, float] = {}
    for r in _ok_rows(results):
        sizes.setdefault(r["attention"], r["cache_bytes_per_token_per_layer"])
    lines = [f"{arm}: {NO_CACHE}" for arm in arms_without_cache(results)]
    mha, latent, expanded = sizes.get("MHA kv"), sizes.get("MLA latent"), sizes.get("MLA expanded")
    hf = sizes.get(attention_label("deepseek", TRANSFORMERS_MODE))
    if mha and latent:
        lines.append(f"MLA's latent cache holds {latent:g} B per token per layer, {times_fewer(mha / latent, 'bytes')} "
                     f"MHA's {mha:g} B: {mha / latent:.1f}x the sequences or context in the same memory.")
    if mha and expanded:
        lines.append(f"MLA cached as per-head K and V (expanded: earlier transformers versions and naive "
                     f"implementations) holds {expanded:g} B: {expanded / mha:.2f}x MHA's.")
    if latent and hf:
        lines.append(f"transformers' DeepseekV3Attention caches the same latent and rotary key ({hf:g} B) but "
                     "re-expands per-head K and V for every cached token at every step; absorbed latent decoding "
                     "forms no per-head K or V. Median decode ms/token, latent vs transformers:")
        lines += absorption_lines(results)
    for arm in ARMS.values():  # every other arm's own cache (GQA, MQA: the same K/V cache with fewer heads)
        modes = arm_cache_modes(results, arm.name)
        own = sizes.get(attention_label(arm.name, modes[0])) if modes else None
        if mha and own and arm.name not in (BASELINE, "deepseek"):
            vs_latent = f"; MLA's latent cache holds {latent:g} B" if latent else ""
            lines.append(f"{attention_label(arm.name, modes[0])} holds {own:g} B per token per layer: "
                         f"{times_fewer(mha / own, 'bytes')} MHA's K/V{vs_latent}.")
    lines += generate_lines(results)
    ok = _ok_rows(results)
    if ok:
        agree = all(r["measured_equals_analytic"] and r["cache_layers_agree"] for r in ok)
        lines.append("Measured cache bytes equal the analytic counts in every row and layer." if agree else
                     "Measured cache bytes DIFFER from the analytic counts (or between layers) in some rows: see the JSON.")
    return lines


def arms_without_cache(results: dict[str, Any]) -> list[str]:
    """The arms in the JSON's list of models whose attention has no cached decode path (no rows), each once."""
    return list(dict.fromkeys(m["arm"] for m in results.get("models", []) if not m["cache_modes"]))


def arm_cache_modes(results: dict[str, Any], arm: str) -> list[str]:
    """The cache modes measured for `arm` (its own first), from the JSON's list of models."""
    return next((list(m["cache_modes"]) for m in results.get("models", []) if m.get("arm") == arm), [])


def absorption_lines(results: dict[str, Any]) -> list[str]:
    """Per context and batch: our absorbed latent decode step against transformers' re-expanding one (median ms)."""
    steps: dict[tuple[str, int, int], float] = {}
    for r in _ok_rows(results):
        if r["arm"] == "deepseek" and r["cache_mode"] in ("latent", TRANSFORMERS_MODE):
            steps.setdefault((r["cache_mode"], r["context"], r["batch_size"]), r["decode_ms_per_token_median"])
    lines = []
    for (mode, context, batch), hf_ms in steps.items():
        ours = steps.get(("latent", context, batch))
        if mode == TRANSFORMERS_MODE and ours:
            lines.append(f"  context {context:,}, batch {batch}: {ours:.2f} vs {hf_ms:.2f} ms "
                         f"(absorption saves {hf_ms - ours:+.2f} ms, {1 - ours / hf_ms:+.0%} of a step)")
    return lines


def generate_lines(results: dict[str, Any]) -> list[str]:
    """Per model driven through transformers' generate: its median decode step against our own loop's with the same
    cache, over the (context, batch) rows both have; the difference is what generate adds per step."""
    generated = [r for r in _ok_rows(results) if r["cache_mode"] == GENERATE_MODE]
    steps = {(r["attention"], r["context"], r["batch_size"]): r["decode_ms_per_token_median"]
             for r in _ok_rows(results) if generated}
    pairs: dict[str, list[tuple[float, float]]] = {}
    for r in generated:
        own = steps.get((r["attention"].replace(f" {GENERATE_MODE}", f" {r['kv_cache_mode']}", 1), r["context"],
                         r["batch_size"]))
        if own is not None:
            pairs.setdefault(r["attention"], []).append((r["decode_ms_per_token_median"], own))
    lines = []
    for label, measured in pairs.items():
        through, own = (statistics.median(times) for times in zip(*measured))
        lines.append(f"{label}: the arm's own cache through transformers' generate, median decode step {through:.2f} "
                     f"vs {own:.2f} ms in our own loop ({through - own:+.2f} ms per step, {len(measured)} rows)")
    return lines


def format_tables(results: dict[str, Any]) -> str:
    budget = results["memory_budget"]
    lines = [
        f"Device: {results['device_name']}   torch {results['torch_version']}   date {results['date_utc']}",
        f"Shapes: {results['shapes']}; precision {results['precision']}; {results['new_tokens']} new tokens per row "
        f"(median step latency; tokens/s = batch x new tokens / decode time)",
        "",
    ]
    rows = []
    for r in results["rows"]:
        if "error" in r:
            rows.append([r["attention"], str(r["context"]), str(r["batch_size"]),
                         "FAILED: " + r["error"].splitlines()[0][:70]] + [""] * 7)
            continue
        rows.append([
            r["attention"], str(r["context"]), str(r["batch_size"]), fmt(r["prefill_s"] * 1e3, ",.1f"),
            fmt(r["decode_ms_per_token_median"], ".2f"), fmt(r["decode_tokens_per_s"], ",.0f"),
            fmt(r["cache_bytes_per_token_per_layer"], ",.0f"), fmt(r["analytic_bytes_per_token_per_layer"], ",.0f"),
            fmt(r["cache_mb"], ",.2f"), fmt(r["peak_memory_mb"], ",.0f"), fmt(r["max_batch_in_budget"], ",d"),
        ])
    lines += render_table(["Attention", "Context", "Batch", "Prefill ms", "Decode ms/tok", "Tokens/s", "B/tok/layer",
                      "Analytic B", "Cache MB", "Peak MB", f"Max batch {budget['gb']:g} GiB"], rows)
    lines.append("")
    table = results["max_batch_in_budget"]
    if table:
        labels = list(table)
        contexts = sorted({int(c) for per in table.values() for c in per})
        lines.append(f"Largest batch whose KV cache fits {budget['gb']:g} GiB (cache alone: weights and activations "
                     "excluded), from the measured bytes:")
        lines += render_table(["Context", *labels],
                         [[str(c), *(fmt(table[label].get(str(c)), ",d") for label in labels)] for c in contexts])
        lines.append("")
    lines += summary_lines(results)
    return "\n".join(lines)


def budget_table(results: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{attention: {context: largest batch}} from the first row measured at each (the bytes do not depend on batch)."""
    table: dict[str, dict[str, int]] = {}
    for r in _ok_rows(results):
        table.setdefault(r["attention"], {}).setdefault(str(r["context"]), r["max_batch_in_budget"])
    return table


LINE_STYLES = ("-", "--", ":", "-.")
EXPANDED_COLOR = "tab:red"  # MLA's expanded cache; every other cache takes its arm's colour
TRANSFORMERS_COLOR = "tab:brown"  # MLA through transformers' own DeepseekV3Attention


def row_color(row: dict[str, Any]) -> str | None:
    """The arm's registry colour (MHA blue, MLA latent orange, GQA green, MQA purple); MLA expanded red,
    MLA transformers brown."""
    special = {"expanded": EXPANDED_COLOR, TRANSFORMERS_MODE: TRANSFORMERS_COLOR}
    return special.get(str(row.get("cache_mode"))) or arm_color(str(row.get("arm")))


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Two panels, decode tokens/s and cache MB against context (log-log): one colour per attention and
    cache, one line style per batch size. Written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    rows = _ok_rows(results)
    batches = sorted({r["batch_size"] for r in rows})
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5))
    try:
        for label in dict.fromkeys(r["attention"] for r in rows):
            for i, batch in enumerate(batches):
                points = sorted((r["context"], r["decode_tokens_per_s"], r["cache_mb"]) for r in rows
                                if r["attention"] == label and r["batch_size"] == batch)
                if not points:
                    continue
                x = [p[0] for p in points]
                first = next(r for r in rows if r["attention"] == label)
                style = dict(color=row_color(first), linestyle=LINE_STYLES[i % len(LINE_STYLES)], marker="o",
                             markersize=3, label=f"{label}, batch {batch}")
                speed.plot(x, [p[1] for p in points], **style)
                memory.plot(x, [p[2] for p in points], **style)
        where = f"{results['device_name']}, {results['precision']}, {results['shapes'].split(' (')[0]} shapes"
        speed.set(xlabel="context (tokens)", ylabel="decode tokens/s", title=f"Decode throughput — {where}")
        memory.set(xlabel="context (tokens)", ylabel="KV cache MB (measured, all layers)",
                   title="KV cache size (context + new tokens)")
        contexts = sorted({r["context"] for r in rows})
        for ax in (speed, memory):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(contexts))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(alpha=0.3, which="both")
            if rows:
                ax.legend(fontsize=8)
        fig.tight_layout()
        write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=120))
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ run

@dataclass
class DecodePlan:
    """Everything the benchmark will do, checked before the first row (and before random weights are drawn)."""

    args: argparse.Namespace
    device: torch.device
    contexts: list[int]
    batch_sizes: list[int]
    new_tokens: int
    small: bool
    config: ExperimentConfig
    precision: str
    output: Path
    checkpoints: list[BenchModel]  # the --checkpoint models, loaded; empty: random weights at `config`

    @property
    def budget_bytes(self) -> float:
        """--memory-budget-gb in bytes (GiB: 2**30)."""
        return float(self.args.memory_budget_gb * 2**30)

    @property
    def plot_path(self) -> Path:
        """The PNG, beside the JSON."""
        return self.output.with_suffix(".png")


def decode_memory(models: list[MoELanguageModel], contexts: list[int], batch_sizes: list[int],
                  new_tokens: int) -> MemoryNeed:
    """Every model's weights (all are held at once; an MLA model twice, for its transformers twin) and the
    largest row: its prompt, the prefill's activations, the caches for context + new tokens (transformers'
    MLA cache is the expanded one), and the tokens fed back."""
    context, batch = max(contexts), max(batch_sizes)
    weights = sum(parameter_count(model) * next(model.parameters()).element_size()
                  * (2 if "latent" in model.cache_modes() else 1) for model in models)
    row = max((batch * context * 8 + inference_activation_bytes(model, batch, context) + 2 * batch * new_tokens * 8
               + decode_cache_bytes(model, mode, context + new_tokens, batch)
               for model in models for mode in model.cache_modes()), default=0)  # 0: no model has a cache
    rows = sum(len(model.cache_modes()) for model in models) * len(contexts) * len(batch_sizes)
    return MemoryNeed(device={"weights": weights, "largest row (prompt, prefill, KV cache)": row},
                      host={"step timings": rows * new_tokens * 64})


def plan_benchmark(args: argparse.Namespace) -> DecodePlan:
    """Check every argument and the memory the largest row needs; ConfigError naming the flag otherwise."""
    check_parsed_values(args)  # integers in int64, floats finite, text non-empty: every flag
    device = resolve_device(ExperimentConfig(device=args.device).validate().device)
    on_cuda = device.type == "cuda"
    contexts = list(args.contexts or (CUDA_CONTEXTS if on_cuda else CPU_CONTEXTS))
    batch_sizes = list(args.batch_sizes or (CUDA_BATCH_SIZES if on_cuda else CPU_BATCH_SIZES))
    new_tokens = args.new_tokens if args.new_tokens is not None else (CUDA_NEW_TOKENS if on_cuda else CPU_NEW_TOKENS)
    if min(contexts) < 1 or min(batch_sizes) < 1 or new_tokens < 1:
        raise ConfigError("--contexts, --batch-sizes and --new-tokens must all be at least 1")
    if not 0 < args.memory_budget_gb <= MAX_BUDGET_GB:
        raise ConfigError(f"--memory-budget-gb {args.memory_budget_gb}: must be positive and at most {MAX_BUDGET_GB:,}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed {args.seed}: must be between 0 and 2**63 - 1")
    output = check_output_file(args.output)
    small = args.small or not on_cuda
    base = cpu_preset(ExperimentConfig(vocab_size=SMALL_VOCAB_SIZE)) if small else ExperimentConfig(vocab_size=FULL_VOCAB_SIZE)
    config = base.replace(device=str(device), precision=args.precision, seed=args.seed).validate()
    checkpoints: list[BenchModel] = []
    if args.checkpoint:
        try:
            checkpoints = load_checkpoints(args.checkpoint, device)
        except (ImportError, OSError, ValueError, KeyError, RuntimeError) as error:
            raise ConfigError(f"--checkpoint: {type(error).__name__}: {error}") from None
    models = [b.model for b in checkpoints] or [shape_only_model(builder, config) for builder in arm_builders().values()]
    check_fits(decode_memory(models, contexts, batch_sizes, new_tokens), device,
               "lower the largest --contexts, --batch-sizes or --new-tokens")
    return DecodePlan(args, device, contexts, batch_sizes, new_tokens, small, config,
                      resolve_precision(config.precision, device), output, checkpoints)


def run_benchmark(args_list: list[str] | None = None) -> dict[str, Any]:
    """Parse and check the arguments, run every row, print the table, write the JSON and the PNG; return the results."""
    plan = parse_and_plan(build_parser(), args_list, plan_benchmark)
    with older_objects_frozen():  # the collection between measurements scans only what they made
        return measure(plan)


def measure(plan: DecodePlan) -> dict[str, Any]:
    """Every row of the plan: build or take the models, decode, and report."""
    models, shapes = prepared_models(plan)
    results = results_header(plan, models, shapes)
    print(f"Decode benchmark on {results['device_name']}; shapes: {shapes}; {precision_label(plan.precision)}; "
          f"results: {plan.output}", flush=True)
    for bench in models:
        run_rows(plan, bench, results)
    return finish(results, plan)


def prepared_models(plan: DecodePlan) -> tuple[list[BenchModel], str]:
    """(the models, on the device and in eval mode, MLA's followed by its transformers twin and each with a cache by
    itself driven through generate; their shapes in words): the --checkpoint models, else every arm's with seeded
    random weights."""
    if plan.checkpoints:
        models, shapes = plan.checkpoints, "checkpoint (as saved)"
    else:
        models = random_models(plan.config, plan.args.seed)
        shapes = (f"small (CPU preset, vocab {SMALL_VOCAB_SIZE})" if plan.small
                  else f"full (default config, vocab {FULL_VOCAB_SIZE})")
    compute_dtype = torch.bfloat16 if plan.precision == BF16 else torch.float32
    for bench in models:
        bench.model.to(plan.device).eval()
        bench.model.plan_moe_dispatch(plan.device, compute_dtype)
    return with_generate_twins(with_transformers_twins(models, plan.precision)), shapes


def model_entry(bench: BenchModel) -> dict[str, Any]:
    """One model in the JSON's list: its arm, weights and caches; one with no cached decode path gets no rows,
    and its entry says so."""
    entry = {"arm": bench.arm, "source": bench.source, "cache_modes": bench.modes(),
             "config": bench.model.config.to_dict(), "parameters": parameter_count(bench.model)}
    if not entry["cache_modes"]:
        entry["note"] = NO_CACHE
    return entry


def results_header(plan: DecodePlan, models: list[BenchModel], shapes: str) -> dict[str, Any]:
    """The JSON before the first row: the machine, the settings, the models, what each number means."""
    return {
        "benchmark": "KV-cached greedy decoding per attention and cache (python -m inference.decode_benchmark)",
        "status": "running",
        "device": str(plan.device),
        "device_name": device_name(plan.device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shapes": shapes,
        "config": models[0].model.config.to_dict() if models else plan.config.to_dict(),
        "models": [model_entry(bench) for bench in models],
        "precision": precision_label(plan.precision),
        "contexts": plan.contexts,
        "batch_sizes": plan.batch_sizes,
        "new_tokens": plan.new_tokens,
        "memory_budget": {"gb": plan.args.memory_budget_gb, "bytes": plan.budget_bytes, "unit": "GiB (2**30 bytes)",
                          "note": BUDGET_NOTE},
        "method": "per row: an untimed warm-up decode, then the context prefilled in one forward pass (logits of "
                  "the last position only) and new tokens decoded one at a time, greedy argmax fed back; "
                  "each phase timed between device syncs; autocast per precision, torch.inference_mode; caches "
                  "preallocated for context + new tokens; RoPE extends past max_seq_len on the fly",
        "cache_bytes_note": "measured = KVCache.bytes_per_token() of layer 0 (bytes of the cache tensors per cached "
                            "token of one sequence), checked against every layer; analytic = "
                            "kv_cache_values_per_token(mode) x bytes per value (2 under bf16 autocast, else the "
                            "weights' element size)",
        "peak_memory_note": "CUDA only: peak allocated during prefill, and during decoding after a reset at its start",
        "plot": str(plan.plot_path),
        "rows": [],
        "failures": [],
    }


def run_rows(plan: DecodePlan, bench: BenchModel, results: dict[str, Any]) -> None:
    """Every (cache, context, batch) row of one model, in order (none for a model with no cached decode path);
    the JSON is rewritten after each, so a run cut short keeps what it measured."""
    for mode in bench.modes():
        for context in plan.contexts:
            for batch in plan.batch_sizes:
                row = run_row(plan, bench, mode, context, batch)
                results["rows"].append(row)
                if "error" in row:
                    results["failures"].append(row["name"])
                release(plan.device)  # after the row's caches are gone, failed or not
                results["max_batch_in_budget"] = budget_table(results)
                write_json_atomic(plan.output, results)


def run_row(plan: DecodePlan, bench: BenchModel, mode: str, context: int, batch: int) -> dict[str, Any]:
    """One row, announced as it starts; a failure (e.g. out of memory) becomes an error row and the others run."""
    label = bench.label(mode)
    name = f"{label} ctx {context} batch {batch}"
    print(f"  {name} ...", flush=True)
    stub = {"name": name, "attention": label, "arm": bench.arm, "cache_mode": mode, "source": bench.source,
            "context": context, "batch_size": batch}
    return guarded(lambda: benchmark_row(bench, mode, context, batch, plan.new_tokens, plan.device, plan.precision,
                                         plan.budget_bytes, plan.args.seed), stub)


def draw_plot(results: dict[str, Any], path: Path) -> None:
    """The PNG beside the JSON; a plot that fails is reported and counted, and the measurements stand."""
    try:
        plot_results(results, path)
    except Exception as error:  # noqa: BLE001 - the measurements stand; the failure is reported and counted
        traceback.print_exc(file=sys.stderr)
        results["plot"] = None
        results["failures"].append(f"plot: {type(error).__name__}: {error}")


def finish(results: dict[str, Any], plan: DecodePlan) -> dict[str, Any]:
    """The budget table, the summary, the plot and the final status, written a last time; the tables printed."""
    results["max_batch_in_budget"] = budget_table(results)
    results["summary"] = summary_lines(results)
    draw_plot(results, plan.plot_path)
    results["status"] = "completed with failures" if results["failures"] else "completed"
    write_json_atomic(plan.output, results)
    print()
    print(format_tables(results))
    print(f"\nResults: {plan.output}\nPlot: {plan.plot_path if results['plot'] else 'not drawn (see failures)'}")
    return results


def main(argv: list[str] | None = None) -> int:
    results = run_benchmark(argv)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
