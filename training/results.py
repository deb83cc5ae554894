"""Results: the JSON file (written atomically), per-model seed summaries and the printed table."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from atomic_files import write_atomic
from training.stats import mean_std, paired_difference

RESULTS_FILE = "exp6_attention_comparison.json"
MODEL_NAMES = ("baseline", "deepseek")
METRICS = ("val_loss", "val_accuracy", "val_perplexity")
STOPPED_STATUSES = ("interrupted", "terminated")  # Ctrl-C / SIGTERM: stopped from outside, not failed


def _json_safe(value: Any) -> Any:
    """NaN/inf become None so the file is strict JSON any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Strict JSON (NaN/inf become null), written whole or not at all (atomic_files.write_atomic)."""
    write_atomic(path, lambda file: json.dump(_json_safe(payload), file, indent=2, allow_nan=False), binary=False)


def check_writable(directory: Path) -> None:
    """Raise OSError now, before training, if results could not be written there."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
        pass


def summarise_model(runs: list[dict[str, Any]], costs: dict[str, Any] | None) -> dict[str, Any]:
    """The public keys (means over the seeds that completed), their std, every run and the costs.

    Seeds are listed by outcome: completed, failed (a non-finite loss or a crash) and interrupted
    (stopped from outside by Ctrl-C or SIGTERM, which says nothing about the model).
    """
    done = [r for r in runs if r["status"] == "completed"]
    summary: dict[str, Any] = {"model_name": runs[0]["model_name"] if runs else None,
                               "seeds_completed": [r["seed"] for r in done],
                               "seeds_failed": [r["seed"] for r in runs if r["status"] == "failed"],
                               "seeds_interrupted": [r["seed"] for r in runs if r["status"] in STOPPED_STATUSES]}
    for key in METRICS + ("training_time_minutes", "tokens_per_second", "peak_gpu_memory_mb"):
        values = [r[key] for r in done if r.get(key) is not None]
        summary[key], summary[f"{key}_std"] = mean_std(values)
    if runs:
        for key in ("parameter_count", "parameters_millions", "attention_backend", "moe_dispatch"):
            summary[key] = runs[-1].get(key)
    summary["costs"] = costs
    summary["runs"] = runs
    return summary


def comparison(baseline_runs: list[dict[str, Any]], deepseek_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired per-seed differences deepseek - baseline for each final metric."""
    def by_seed(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in runs if r["status"] == "completed" and r.get(key) is not None}

    out = {key: paired_difference(by_seed(deepseek_runs, key), by_seed(baseline_runs, key),
                                  lower_is_better=key != "val_accuracy") for key in METRICS}
    out["verdict"] = out["val_loss"]["verdict"]
    return out


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cost_sentence(baseline: dict[str, Any], deepseek: dict[str, Any]) -> str:
    """One line on what MLA buys (decoding memory) and what it costs (training compute, parameters)."""
    kv = baseline["kv_cache_bytes_per_token_per_layer_bf16"] / deepseek["kv_cache_bytes_per_token_per_layer_bf16"]
    flops = deepseek["training_flops_per_token"] / baseline["training_flops_per_token"] - 1
    attn = deepseek["parameters_attention"] / baseline["parameters_attention"] - 1
    return (f"MLA buys a {kv:.1f}x smaller KV cache per token; it costs {flops:+.1%} training FLOPs per token "
            f"with {attn:+.1%} attention parameters.")


def format_table(results: dict[str, Any]) -> str:
    """The comparison table printed at the end: quality, speed and costs side by side."""
    models = [results[name] for name in MODEL_NAMES]
    costs = [m.get("costs") or {} for m in models]

    def pm(m: dict[str, Any], key: str, spec: str) -> str:
        std = m.get(f"{key}_std")
        return _fmt(m.get(key), spec) + ("" if std is None else f" ± {std:{spec}}")

    rows = [
        ("Validation loss", [pm(m, "val_loss", ".4f") for m in models]),
        ("Validation accuracy", [pm(m, "val_accuracy", ".4f") for m in models]),
        ("Validation perplexity", [pm(m, "val_perplexity", ".2f") for m in models]),
        ("Training time (min)", [pm(m, "training_time_minutes", ".2f") for m in models]),
        ("Tokens / s", [pm(m, "tokens_per_second", ",.0f") for m in models]),
        ("Peak GPU memory (MB)", [_fmt(m.get("peak_gpu_memory_mb"), ",.0f") for m in models]),
        ("Parameters, total", [_fmt(c.get("parameters_total"), ",") for c in costs]),
        ("Parameters, active/token", [_fmt(c.get("parameters_active_per_token"), ",") for c in costs]),
        ("Parameters, attention", [_fmt(c.get("parameters_attention"), ",") for c in costs]),
        ("Training FLOPs / token", [_fmt(c.get("training_flops_per_token"), ",") for c in costs]),
        ("KV cache B/token/layer (bf16)", [_fmt(c.get("kv_cache_bytes_per_token_per_layer_bf16"), ",") for c in costs]),
        ("Attention backend", [", ".join(m.get("attention_backend") or ["-"]) for m in models]),
        ("Seeds completed", [str(len(m.get("seeds_completed", []))) for m in models]),
    ]
    width = max(len(r[0]) for r in rows)
    col = max(24, *(len(v) for _, values in rows for v in values))
    lines = [f"{'':{width}}  {'Baseline (MHA)':>{col}}  {'DeepSeek MLA':>{col}}", "-" * (width + 2 * col + 4)]
    lines += [f"{label:{width}}  {a:>{col}}  {b:>{col}}" for label, (a, b) in rows]
    if all(costs):
        lines.append(_cost_sentence(*costs))
    verdict = results.get("comparison", {}).get("verdict")
    if verdict:
        lines.append(f"Val loss, deepseek - baseline: {verdict}")
    return "\n".join(lines)
