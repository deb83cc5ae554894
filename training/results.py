"""Results: the JSON file (written atomically), per-model seed summaries, the paired comparisons and the
printed table. Which arms a results dict holds is read from it (its top-level keys that are arms of arms.ARMS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from arms import BASELINE, MLA, arm_label, ordered_arms
from reporting import fmt
from training.stats import ALPHA, holm_verdicts, mean_std, paired_difference

RESULTS_FILE = "exp6_attention_comparison.json"
MEASURED_KV = "kv_cache_bytes_per_token_per_layer_bf16_measured"
METRICS = ("val_loss", "val_accuracy", "val_perplexity")
STOPPED_STATUSES = ("interrupted", "terminated")  # Ctrl-C / SIGTERM: stopped from outside, not failed


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


def comparison_pairs(arms: Iterable[str]) -> list[tuple[str, str]]:
    """(first, second) for every difference first - second to report: every arm against the baseline, then
    MLA against each other arm that is not the baseline (MLA vs GQA and MQA: the matched-cache question)."""
    present = ordered_arms(arms)
    pairs = [(arm, BASELINE) for arm in present if arm != BASELINE and BASELINE in present]
    if MLA in present:
        pairs += [(MLA, arm) for arm in present if arm not in (BASELINE, MLA)]
    return pairs


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
    first_by_seed = {r["seed"]: r for r in first_runs}
    second_by_seed = {r["seed"]: r for r in second_runs}
    seeds = sorted(set(first_by_seed) | set(second_by_seed))

    def metric(key: str) -> dict[str, Any]:
        values: tuple[dict[int, float], dict[int, float]] = ({}, {})
        excluded = []
        for seed in seeds:
            reasons = [exclusion_reason(name, by_seed.get(seed), key)
                       for name, by_seed in zip(names, (first_by_seed, second_by_seed))]
            if any(reasons):
                excluded.append({"seed": seed, "reason": "; ".join(r for r in reasons if r)})
                continue
            values[0][seed], values[1][seed] = first_by_seed[seed][key], second_by_seed[seed][key]
        return paired_difference(*values, lower_is_better=key != "val_accuracy", names=names, excluded=excluded)

    out = {key: metric(key) for key in METRICS}
    out.update(verdict=out["val_loss"]["verdict"], n=out["val_loss"]["n"],
               excluded_seeds=out["val_loss"]["excluded_seeds"], p_value=out["val_loss"]["p_value"])
    return out


HEADLINE_BASIS = ("with several pairs the headline is deepseek - baseline's Holm-adjusted verdict (over every pair "
                  "reported); with one pair, its 95% CI verdict (the two then agree)")


def comparison(runs: Mapping[str, list[dict[str, Any]]],
               summaries: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every pair of comparison_pairs under `pairs` ("deepseek - baseline", "gqa - baseline", ...,
    "deepseek - gqa", ...), each with its per-metric paired CI and unadjusted verdict, its n and excluded
    seeds, and its val-loss p-value Holm-adjusted across all the pairs (`p_holm`, `verdict_holm`). The top
    level keeps the published shape: deepseek - baseline per metric and its `verdict` (None when deepseek did
    not run); `headline` is the verdict the printed headline uses (HEADLINE_BASIS).
    With the arms' summaries (costs and mean losses), `matched_kv_budget` says which arms cache no
    more than MLA."""
    arm_pairs = comparison_pairs(runs)
    pairs = {f"{a} - {b}": paired_metrics(runs[a], runs[b], (a, b)) for a, b in arm_pairs}
    holm = holm_verdicts({pair: values["val_loss"] for pair, values in pairs.items()},
                         {f"{a} - {b}": (a, b) for a, b in arm_pairs})
    for pair, values in pairs.items():
        values.update(holm[pair])
    main_pair = f"{MLA} - {BASELINE}"
    main = pairs.get(main_pair)
    out: dict[str, Any] = dict(main) if main is not None else {"verdict": None}
    out["pairs"] = pairs
    out["multiple_comparisons"] = {
        "method": "Holm step-down over the val-loss p-values of every pair reported; a pair without a p-value "
                  "(one seed, none, or identical differences) counts as p = 1",
        "pairs": len(pairs), "alpha": ALPHA, "headline_basis": HEADLINE_BASIS}
    out["headline"] = None if main is None else {
        "pair": main_pair, "basis": "holm" if len(pairs) > 1 else "ci95",
        "verdict": main["verdict_holm"] if len(pairs) > 1 else main["verdict"]}
    if summaries is not None:
        out["matched_kv_budget"] = matched_kv_budget(summaries)
    return out


def matched_kv_budget(summaries: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Which arms hold at most MLA's KV cache per token (measured, bf16, per layer), with their val losses;
    None until MLA's costs are known."""
    mla_costs = (summaries.get(MLA) or {}).get("costs") or {}
    budget = mla_costs.get(MEASURED_KV)
    if budget is None:
        return None
    arms: dict[str, dict[str, Any]] = {}
    for name in ordered_arms(summaries):
        cache = ((summaries[name] or {}).get("costs") or {}).get(MEASURED_KV)
        if cache is not None:
            arms[name] = {"kv_cache_bytes_per_token_per_layer_bf16_measured": cache,
                          "within_budget": cache <= budget, "val_loss": summaries[name].get("val_loss"),
                          "val_loss_std": summaries[name].get("val_loss_std")}
    return {"budget_bytes_per_token_per_layer_bf16": budget, "arms": arms,
            "within_budget": [name for name, arm in arms.items() if arm["within_budget"]],
            "note": "arms whose measured bf16 KV cache per token per layer is at most MLA's (latent) cache"}


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
            f"in training it costs {flops:+.2%} FLOPs per token ({deepseek['training_flops_per_token']:,} vs "
            f"{baseline['training_flops_per_token']:,}) with {attn:+.1%} attention parameters.")


def _matched_budget_line(results: dict[str, Any], names: list[str]) -> str | None:
    matched = matched_kv_budget({name: results[name] for name in names})
    if matched is None:
        return None
    config = results.get("experiment", {}).get("config")

    def loss(arm: dict[str, Any]) -> str:
        std = arm.get("val_loss_std")
        return fmt(arm.get("val_loss"), ".4f") + ("" if std is None else f" ± {std:.4f}")

    within = [f"{arm_label(name, config)} {arm[MEASURED_KV]:,.0f} B, val loss {loss(arm)}"
              for name, arm in matched["arms"].items() if arm["within_budget"]]
    above = [f"{arm_label(name, config)} {arm[MEASURED_KV]:,.0f} B"
             for name, arm in matched["arms"].items() if not arm["within_budget"]]
    line = (f"Matched KV budget (<= MLA's {matched['budget_bytes_per_token_per_layer_bf16']:,.0f} B/token/layer, "
            f"bf16, measured): {'; '.join(within)}")
    return line + (f". Above it: {', '.join(above)}." if above else ".")


def format_table(results: dict[str, Any]) -> str:
    """The comparison table printed at the end: quality, speed and costs of every arm side by side."""
    names = result_arms(results)
    config = results.get("experiment", {}).get("config")
    models = [results[name] for name in names]
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
        ("LR Muon / AdamW", [f"{fmt(m.get('muon_lr'), '.3g')} / {fmt(m.get('adamw_lr'), '.3g')}" for m in models]),
        ("Seeds completed", [str(len(m.get("seeds_completed", []))) for m in models]),
    ]
    headers = [arm_label(name, config) for name in names]
    width = max(len(r[0]) for r in rows)
    col = max(16, *(len(v) for v in headers), *(len(v) for _, values in rows for v in values))
    lines = [f"{'':{width}}" + "".join(f"  {h:>{col}}" for h in headers), "-" * (width + (col + 2) * len(names))]
    lines += [f"{label:{width}}" + "".join(f"  {v:>{col}}" for v in values) for label, values in rows]
    by_name = dict(zip(names, costs))
    if by_name.get(BASELINE) and by_name.get(MLA):
        lines.append(_cost_sentence(by_name[BASELINE], by_name[MLA]))
    matched = _matched_budget_line(results, names)
    if matched:
        lines.append(matched)
    pairs = results.get("comparison", {}).get("pairs")
    if pairs is None:  # results written before the pairs existed: deepseek - baseline only
        pairs = {f"{MLA} - {BASELINE}": results.get("comparison", {})}
    for pair, values in pairs.items():
        if values.get("verdict"):
            lines.append(f"Val loss, {pair}: {values['verdict']}")
            if values.get("verdict_holm") and len(pairs) > 1:
                lines.append(f"  Holm-adjusted: {values['verdict_holm']}")
    headline = results.get("comparison", {}).get("headline")
    if headline and headline.get("verdict") and len(pairs) > 1:
        basis = f"Holm-adjusted over the {len(pairs)} pairs; the unadjusted CIs are above"
        lines.append(f"Headline, val loss {headline['pair']} ({basis}): {headline['verdict']}")
    return "\n".join(lines)
