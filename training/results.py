"""Results: the JSON file (written atomically), per-model seed summaries, the paired comparisons and the
printed table. Which arms a results dict holds is read from it (its top-level keys that are arms of arms.ARMS)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from arms.registry import ARMS, arm_label, comparison_pairs, headline_arm, ordered_arms
from common.reporting import fmt, times_fewer
from config.settings import BASELINE
from training.stats import ALPHA, holm_verdicts, mean_std, paired_difference

RESULTS_FILE = "exp6_attention_comparison.json"
MEASURED_KV = "kv_cache_bytes_per_token_per_layer_bf16_measured"
METRICS = ("val_loss", "val_accuracy", "val_perplexity")
STOPPED_STATUSES = ("interrupted", "terminated")  # Ctrl-C / SIGTERM: stopped from outside, not failed


def short_name(arm: str) -> str:
    """An arm's short attention name ("MHA", "MLA"), or its name when the registry gives none."""
    return (ARMS[arm].short if arm in ARMS else "") or arm


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
        for key in ("parameter_count", "parameters_millions", "attention_backend", "moe_dispatch",
                    "muon_lr", "adamw_lr", "lr_multiplier"):  # the LRs this arm trained at (tuned with --lr-sweep)
            summary[key] = runs[-1].get(key)
    summary["costs"] = costs
    summary["runs"] = runs
    return summary


def result_arms(results: Mapping[str, Any]) -> list[str]:
    """The arms a results dict holds, in registry order."""
    return ordered_arms(results)


def exclusion_reason(arm: str, run: dict[str, Any] | None, key: str) -> str | None:
    """Why this arm's run of a seed cannot be paired on `key` (None: it can): 'deepseek failed at step 212
    (non-finite loss)', 'baseline was interrupted', 'gqa did not run', ..."""
    if run is None:
        return f"{arm} did not run"
    status = run.get("status")
    if status == "completed":
        return None if run.get(key) is not None else f"{arm} has no {key}"
    if status == "failed":
        if run.get("failed_at_step") is not None:
            return f"{arm} failed at step {run['failed_at_step']} (non-finite loss)"
        return f"{arm} failed ({run.get('failure', 'unknown error')})"
    if status in STOPPED_STATUSES:
        return f"{arm} was {status}"
    return f"{arm} is still {status}"


def paired_metrics(first_runs: list[dict[str, Any]], second_runs: list[dict[str, Any]],
                   names: tuple[str, str]) -> dict[str, Any]:
    """Paired per-seed differences first - second for each final metric, and the val-loss verdict with its n
    and every seed either arm ran that is not paired, with the reason."""
    by_seed = ({r["seed"]: r for r in first_runs}, {r["seed"]: r for r in second_runs})
    out = {key: paired_metric(by_seed, names, key) for key in METRICS}
    out.update(verdict=out["val_loss"]["verdict"], n=out["val_loss"]["n"],
               excluded_seeds=out["val_loss"]["excluded_seeds"], p_value=out["val_loss"]["p_value"])
    return out


def paired_metric(by_seed: tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]], names: tuple[str, str],
                  key: str) -> dict[str, Any]:
    """One metric's paired difference over the seeds both arms completed; every other seed either ran is
    excluded with its reason."""
    values: tuple[dict[int, float], dict[int, float]] = ({}, {})
    excluded = []
    for seed in sorted(set(by_seed[0]) | set(by_seed[1])):
        reasons = [exclusion_reason(name, runs.get(seed), key) for name, runs in zip(names, by_seed)]
        if any(reasons):
            excluded.append({"seed": seed, "reason": "; ".join(r for r in reasons if r)})
            continue
        values[0][seed], values[1][seed] = by_seed[0][seed][key], by_seed[1][seed][key]
    return paired_difference(*values, lower_is_better=key != "val_accuracy", names=names, excluded=excluded)


HEADLINE_BASIS = ("the headline is the headline arm (the first arm after the baseline in registry order: MLA when it "
                  "ran) against the baseline; with several pairs its Holm-adjusted verdict (over every pair reported), "
                  "with one pair its 95% CI verdict (the two then agree)")
UNADJUSTED = "unadjusted: only val_loss is Holm-adjusted across the pairs"


def comparison(runs: Mapping[str, list[dict[str, Any]]], summaries: Mapping[str, dict[str, Any]] | None = None,
               pairs: Sequence[tuple[str, str]] | None = None, headline: tuple[str, str] | None = None) -> dict[str, Any]:
    """Every pair (first, second) under `pairs` ("deepseek - baseline", "gqa - baseline", ..., "deepseek - gqa",
    ...; by default the registry's pairs of the arms in `runs`), each with its per-metric paired CI and unadjusted
    verdict, its n and excluded seeds, and its val-loss p-value Holm-adjusted across all the pairs (`p_holm`,
    `verdict_holm`). The top level keeps the published shape: the `headline` pair (by default the headline arm -
    baseline: deepseek - baseline in the default run) per metric and its `verdict` (None when there is none);
    `headline` is the verdict the printed headline uses (HEADLINE_BASIS). With the arms' summaries (costs and mean
    losses), `matched_kv_budget` says which arms cache no more than the headline arm."""
    if pairs is None:
        pairs = comparison_pairs(runs)
        main_arm = headline_arm(runs)
        headline = (main_arm, BASELINE) if main_arm else None
    table = {f"{a} - {b}": paired_metrics(runs[a], runs[b], (a, b)) for a, b in pairs}
    holm = holm_verdicts({pair: values["val_loss"] for pair, values in table.items()},
                         {f"{a} - {b}": (a, b) for a, b in pairs})
    for pair, values in table.items():
        values.update(holm[pair])
        for key in METRICS[1:]:
            values[key]["adjustment"] = UNADJUSTED
    main_pair = f"{headline[0]} - {headline[1]}" if headline else None
    main = table.get(main_pair) if main_pair else None
    out: dict[str, Any] = dict(main) if main is not None else {"verdict": None}
    out["pairs"] = table
    out["multiple_comparisons"] = {
        "method": "Holm step-down over the val-loss p-values of every pair reported; a pair without a p-value "
                  "(one seed, none, or identical differences) counts as p = 1; accuracy and perplexity are "
                  "not adjusted",
        "pairs": len(table), "alpha": ALPHA, "headline_basis": HEADLINE_BASIS}
    out["headline"] = None if main is None else {
        "pair": main_pair, "basis": "holm" if len(table) > 1 else "ci95",
        "verdict": main["verdict_holm"] if len(table) > 1 else main["verdict"]}
    if summaries is not None:
        out["matched_kv_budget"] = matched_kv_budget(summaries, headline[0]) if headline else None
    return out


def matched_kv_budget(summaries: Mapping[str, dict[str, Any]], budget_arm: str | None) -> dict[str, Any] | None:
    """Which arms hold at most `budget_arm`'s (the headline arm's) KV cache per token (measured, bf16, per layer),
    with their val losses; None until that arm's costs are known."""
    budget = ((summaries.get(budget_arm or "") or {}).get("costs") or {}).get(MEASURED_KV)
    if budget is None:
        return None
    arms: dict[str, dict[str, Any]] = {}
    for name in ordered_arms(summaries):
        cache = ((summaries[name] or {}).get("costs") or {}).get(MEASURED_KV)
        if cache is not None:
            arms[name] = {"kv_cache_bytes_per_token_per_layer_bf16_measured": cache,
                          "within_budget": cache <= budget, "val_loss": summaries[name].get("val_loss"),
                          "val_loss_std": summaries[name].get("val_loss_std")}
    return {"budget_arm": budget_arm, "budget_bytes_per_token_per_layer_bf16": budget, "arms": arms,
            "within_budget": [name for name, arm in arms.items() if arm["within_budget"]],
            "note": f"arms whose measured bf16 KV cache per token per layer is at most {budget_arm}'s"}


def mean_sd(summary: Mapping[str, Any], key: str, spec: str) -> str:
    """'5.5830 ± 0.0100': the mean over seeds and, with several, their standard deviation (SD), as the table shows
    them (its note says that ± is the seed SD, not an interval)."""
    std = summary.get(f"{key}_std")
    return fmt(summary.get(key), spec) + ("" if std is None else f" ± {std:{spec}}")


def _cost_sentence(baseline: dict[str, Any], other: dict[str, Any], names: tuple[str, str] = (BASELINE, "deepseek")
                   ) -> str:
    """One line on what an arm (the headline arm, MLA by default) buys at decode time against the baseline (cache
    memory, measured) and what it costs in training."""
    base_name, other_name = (short_name(name) for name in names)
    flops = other["training_flops_per_token"] / baseline["training_flops_per_token"] - 1
    attn = other["parameters_attention"] / baseline["parameters_attention"] - 1
    training = (f"in training it costs {flops:+.2%} FLOPs per token ({other['training_flops_per_token']:,} vs "
                f"{baseline['training_flops_per_token']:,}) with {attn:+.1%} attention parameters.")
    return f"{_cache_clause(baseline, other, base_name, other_name)}; {training}"


def _cache_clause(baseline: dict[str, Any], other: dict[str, Any], base_name: str, other_name: str) -> str:
    """What `other`'s KV cache holds against the baseline's, measured (and checked against the analytic count)."""
    measured_key, analytic_key = MEASURED_KV, "kv_cache_bytes_per_token_per_layer_bf16"
    if other.get(measured_key) is None:
        return f"At decode time {other_name} has no cached decode path (it recomputes the prefix at every token)"
    kv = baseline[measured_key] / other[measured_key]
    agree = all(c[measured_key] == c[analytic_key] for c in (baseline, other))
    check = "measured equals analytic" if agree else "MEASURED DIFFERS FROM ANALYTIC"
    return (f"At decode time {other_name}'s {other.get('kv_cache_mode', '')} cache holds "
            f"{times_fewer(kv, 'bytes per token')} {base_name}'s {baseline.get('kv_cache_mode', '')} cache "
            f"({other[measured_key]:.0f} vs {baseline[measured_key]:.0f} B/token/layer in bf16, {check})")


def _matched_budget_line(results: dict[str, Any], names: list[str]) -> str | None:
    matched = matched_kv_budget({name: results[name] for name in names}, headline_arm(names))
    if matched is None:
        return None
    config = results.get("experiment", {}).get("config")
    within = [f"{arm_label(name, config)} {arm[MEASURED_KV]:,.0f} B, val loss {mean_sd(arm, 'val_loss', '.4f')}"
              for name, arm in matched["arms"].items() if arm["within_budget"]]
    above = [f"{arm_label(name, config)} {arm[MEASURED_KV]:,.0f} B"
             for name, arm in matched["arms"].items() if not arm["within_budget"]]
    line = (f"Matched KV budget (<= {short_name(matched['budget_arm'])}'s "
            f"{matched['budget_bytes_per_token_per_layer_bf16']:,.0f} B/token/layer, bf16, measured): {'; '.join(within)}")
    return line + (f". Above it: {', '.join(above)}." if above else ".")


def format_table(results: dict[str, Any]) -> str:
    """The comparison table printed at the end: quality, speed and costs of every arm side by side."""
    names = result_arms(results)
    config = results.get("experiment", {}).get("config")
    models = [results[name] for name in names]
    costs = [m.get("costs") or {} for m in models]
    rows = [
        ("Validation loss", [mean_sd(m, "val_loss", ".4f") for m in models]),
        ("Validation accuracy", [mean_sd(m, "val_accuracy", ".4f") for m in models]),
        ("Validation perplexity", [mean_sd(m, "val_perplexity", ".2f") for m in models]),
        ("Training time (min)", [mean_sd(m, "training_time_minutes", ".2f") for m in models]),
        ("Tokens / s", [mean_sd(m, "tokens_per_second", ",.0f") for m in models]),
        ("Peak GPU memory (MB)", [fmt(m.get("peak_gpu_memory_mb"), ",.0f") for m in models]),
        ("Parameters, total", [fmt(c.get("parameters_total"), ",") for c in costs]),
        ("Parameters, active/token", [fmt(c.get("parameters_active_per_token"), ",") for c in costs]),
        ("Parameters, attention", [fmt(c.get("parameters_attention"), ",") for c in costs]),
        ("Training FLOPs / token", [fmt(c.get("training_flops_per_token"), ",") for c in costs]),
        ("KV cache B/token/layer (bf16)", [fmt(c.get("kv_cache_bytes_per_token_per_layer_bf16"), ",") for c in costs]),
        ("  measured from the cache", [fmt(c.get("kv_cache_bytes_per_token_per_layer_bf16_measured"), ",.0f")
                                       + f" ({c.get('kv_cache_mode') or 'no cache'})" for c in costs]),
        ("Attention backend", [", ".join(m.get("attention_backend") or ["-"]) for m in models]),
        ("LR Muon / AdamW", [f"{fmt(m.get('muon_lr'), '.3g')} / {fmt(m.get('adamw_lr'), '.3g')}" for m in models]),
        ("Seeds completed", [str(len(m.get("seeds_completed", []))) for m in models]),
    ]
    headers = [arm_label(name, config) for name in names]
    width = max(len(r[0]) for r in rows)
    col = max(16, *(len(v) for v in headers), *(len(v) for _, values in rows for v in values))
    lines = [f"{'':{width}}" + "".join(f"  {h:>{col}}" for h in headers), "-" * (width + (col + 2) * len(names))]
    lines += [f"{label:{width}}" + "".join(f"  {v:>{col}}" for v in values) for label, values in rows]
    lines.append("Values are means over the completed seeds; ± is their standard deviation (seed SD), not a CI.")
    by_name = dict(zip(names, costs))
    headline = headline_arm(names)
    if headline is not None and by_name.get(BASELINE) and by_name.get(headline):
        lines.append(_cost_sentence(by_name[BASELINE], by_name[headline], (BASELINE, headline)))
    matched = _matched_budget_line(results, names)
    if matched:
        lines.append(matched)
    pairs = results.get("comparison", {}).get("pairs")
    if pairs is None:  # results written before the pairs existed: deepseek - baseline only
        pairs = {f"deepseek - {BASELINE}": results.get("comparison", {})}
    for pair, values in pairs.items():
        if values.get("verdict"):
            lines.append(f"Val loss, {pair}: {values['verdict']}")
            if values.get("verdict_holm") and len(pairs) > 1:
                lines.append(f"  Holm-adjusted: {values['verdict_holm']}")
    verdict = results.get("comparison", {}).get("headline")
    if verdict and verdict.get("verdict") and len(pairs) > 1:
        basis = f"Holm-adjusted over the {len(pairs)} pairs; the unadjusted CIs are above"
        lines.append(f"Headline, val loss {verdict['pair']} ({basis}): {verdict['verdict']}")
    return "\n".join(lines)
