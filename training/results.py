"""Results: the JSON file (written atomically), per-model seed summaries and the printed table."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from reporting import fmt
from training.stats import mean_std, paired_difference

RESULTS_FILE = "exp6_attention_comparison.json"
MODEL_NAMES = ("baseline", "deepseek")
METRICS = ("val_loss", "val_accuracy", "val_perplexity")
STOPPED_STATUSES = ("interrupted", "terminated")  # Ctrl-C / SIGTERM: stopped from outside, not failed


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


def _cost_sentence(baseline: dict[str, Any], deepseek: dict[str, Any]) -> str:
    """One line on what MLA buys at decode time (cache memory, measured) and what it costs in training."""
    measured_key, analytic_key = "kv_cache_bytes_per_token_per_layer_bf16_measured", "kv_cache_bytes_per_token_per_layer_bf16"
    kv = baseline[measured_key] / deepseek[measured_key]
    agree = all(c[measured_key] == c[analytic_key] for c in (baseline, deepseek))
    flops = deepseek["training_flops_per_token"] / baseline["training_flops_per_token"] - 1
    attn = deepseek["parameters_attention"] / baseline["parameters_attention"] - 1
    check = "measured equals analytic" if agree else "MEASURED DIFFERS FROM ANALYTIC"
    return (f"At decode time MLA's latent cache holds {kv:.1f}x fewer bytes per token than MHA's K/V "
            f"({deepseek[measured_key]:.0f} vs {baseline[measured_key]:.0f} B/token/layer in bf16, {check}); "
            f"in training it costs {flops:+.1%} FLOPs per token with {attn:+.1%} attention parameters.")


def format_table(results: dict[str, Any]) -> str:
    """The comparison table printed at the end: quality, speed and costs side by side."""
    models = [results[name] for name in MODEL_NAMES]
    costs = [m.get("costs") or {} for m in models]

    def pm(m: dict[str, Any], key: str, spec: str) -> str:
        std = m.get(f"{key}_std")
        return fmt(m.get(key), spec) + ("" if std is None else f" ± {std:{spec}}")

    rows = [
        ("Validation loss", [pm(m, "val_loss", ".4f") for m in models]),
        ("Validation accuracy", [pm(m, "val_accuracy", ".4f") for m in models]),
        ("Validation perplexity", [pm(m, "val_perplexity", ".2f") for m in models]),
        ("Training time (min)", [pm(m, "training_time_minutes", ".2f") for m in models]),
        ("Tokens / s", [pm(m, "tokens_per_second", ",.0f") for m in models]),
        ("Peak GPU memory (MB)", [fmt(m.get("peak_gpu_memory_mb"), ",.0f") for m in models]),
        ("Parameters, total", [fmt(c.get("parameters_total"), ",") for c in costs]),
        ("Parameters, active/token", [fmt(c.get("parameters_active_per_token"), ",") for c in costs]),
        ("Parameters, attention", [fmt(c.get("parameters_attention"), ",") for c in costs]),
        ("Training FLOPs / token", [fmt(c.get("training_flops_per_token"), ",") for c in costs]),
        ("KV cache B/token/layer (bf16)", [fmt(c.get("kv_cache_bytes_per_token_per_layer_bf16"), ",") for c in costs]),
        ("  measured from the cache", [fmt(c.get("kv_cache_bytes_per_token_per_layer_bf16_measured"), ",.0f")
                                       + f" ({c.get('kv_cache_mode', '-')})" for c in costs]),
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
