"""The seed statistics behind every verdict: exact t quantiles, the paired interval and its p-value, seeds
left out of a pair and why, identical differences, and Holm's correction across the pairs a run reports."""

from __future__ import annotations

import math
import statistics

import pytest

from training.results import comparison, format_table, summarise_model
from training.stats import holm_adjust, holm_verdicts, paired_difference

# Two-sided 95% Student-t quantiles t_{0.975, df} as printed in standard tables (e.g. NIST/SEMATECH
# e-Handbook of Statistical Methods, table 1.3.6.7.2), to 3 decimals.
PUBLISHED_T_975 = {1: 12.706, 2: 4.303, 5: 2.571, 10: 2.228, 30: 2.042, 31: 2.040, 40: 2.021, 60: 2.000,
                   100: 1.984}


@pytest.mark.parametrize("df", sorted(PUBLISHED_T_975))
def test_the_interval_uses_the_published_t_quantile(df):
    """With df + 1 seeds, the paired 95% interval's half-width is t_{0.975, df} standard errors."""
    diffs = [0.01 * math.sin(seed) - 0.002 for seed in range(df + 1)]
    result = paired_difference(dict(enumerate(diffs)), {s: 0.0 for s in range(df + 1)})
    half = (result["ci95"][1] - result["ci95"][0]) / 2
    assert half / (statistics.stdev(diffs) / math.sqrt(df + 1)) == pytest.approx(PUBLISHED_T_975[df], abs=5e-4)


def test_interval_beyond_30_seeds_uses_the_t_quantile_not_1_96():
    """32 seeds (df 31): the half-width is 2.040 sd / sqrt(n), 4% wider than the normal 1.96 would give."""
    diffs = [0.01 * math.sin(seed) - 0.002 for seed in range(32)]
    result = paired_difference({s: d for s, d in enumerate(diffs)}, {s: 0.0 for s in range(32)})
    half = (result["ci95"][1] - result["ci95"][0]) / 2
    assert half == pytest.approx(2.0395 * statistics.stdev(diffs) / math.sqrt(32), rel=1e-4)
    assert half > 1.96 * statistics.stdev(diffs) / math.sqrt(32) * 1.03


def test_p_value_and_interval_agree():
    """The two-sided p-value is below 0.05 exactly when the 95% interval excludes 0."""
    for shift in (0.0, 0.004, 0.008, 0.012, 0.02):
        result = paired_difference({1: 1.0 + shift, 2: 1.01 + shift, 3: 0.995 + shift}, {1: 1.0, 2: 1.0, 3: 1.0})
        low, high = result["ci95"]
        assert (result["p_value"] < 0.05) == (not low <= 0 <= high), shift
        assert result["verdict"].startswith("no significant" if low <= 0 <= high else "deepseek is better"
                                            if result["mean"] < 0 else "baseline is better")


def test_identical_differences_say_nothing_about_spread():
    exact = paired_difference({1: 1.5, 2: 2.5, 3: 3.5}, {1: 1.0, 2: 2.0, 3: 3.0})
    rounded = paired_difference({1: 1.1, 2: 1.2, 3: 1.3}, {1: 1.0, 2: 1.1, 3: 1.2})  # 0.1 up to float rounding
    for result in (exact, rounded):
        assert result["ci95"] is None and result["p_value"] is None and result["n"] == 3
        assert result["verdict"].startswith("the seeds gave identical differences (")
        assert "n = 3 seeds): nothing can be inferred about the spread" in result["verdict"]
        assert "better" not in result["verdict"]
    assert exact["verdict"].startswith("the seeds gave identical differences (+0.5000 each")
    spread = paired_difference({1: 1.1, 2: 1.2, 3: 1.3001}, {1: 1.0, 2: 1.1, 3: 1.2})
    assert spread["ci95"] is not None


def _run(seed, loss, status="completed", **extra):
    return {"seed": seed, "status": status, "val_loss": loss if status == "completed" else None,
            "val_accuracy": None if loss is None else 0.5, "val_perplexity": None if loss is None else math.exp(loss),
            "model_name": "x", **extra}


def test_a_dropped_seed_is_named_with_its_reason_and_n():
    runs = {
        "baseline": [_run(42, 5.00), _run(43, 5.01), _run(44, 5.02), _run(45, 5.00)],
        "deepseek": [_run(42, 4.90), _run(43, 4.92), _run(44, None, "failed", failed_at_step=212,
                                                           failure="non-finite training loss at step 212"),
                     _run(45, 4.91, "interrupted")],
    }
    pair = comparison(runs)["pairs"]["deepseek - baseline"]
    assert pair["n"] == 2 and pair["val_loss"]["seeds"] == [42, 43]
    assert pair["excluded_seeds"] == [{"seed": 44, "reason": "deepseek failed at step 212 (non-finite loss)"},
                                      {"seed": 45, "reason": "deepseek was interrupted"}]
    assert pair["verdict"].endswith("n = 2 seeds; seed 44 excluded: deepseek failed at step 212 (non-finite loss); "
                                    "seed 45 excluded: deepseek was interrupted)")
    assert "seed 44 excluded" in pair["verdict_holm"] or pair["verdict_holm"].startswith("not tested")


def test_holm_adjust_matches_published_example():
    """R's p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02."""
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []


def test_holm_counts_every_reported_pair_and_untested_ones_as_p_1():
    tested = paired_difference({1: 0.90, 2: 0.91, 3: 0.92}, {1: 1.00, 2: 1.00, 3: 1.01})
    single = paired_difference({1: 0.9}, {1: 1.0}, names=("gqa", "baseline"))
    verdicts = holm_verdicts({"deepseek - baseline": tested, "gqa - baseline": single},
                             {"deepseek - baseline": ("deepseek", "baseline"), "gqa - baseline": ("gqa", "baseline")})
    assert verdicts["deepseek - baseline"]["p_holm"] == pytest.approx(min(1.0, 2 * tested["p_value"]))
    assert verdicts["gqa - baseline"] == {"p_holm": None, "verdict_holm": "not tested: a single seed"}


def test_four_arms_a_pair_significant_alone_but_not_after_holm():
    """Five pairs: deepseek - baseline's CI excludes 0 (p between 0.01 and 0.05), but times 5 it does not, so
    the headline (Holm) says no significant difference while the unadjusted verdict says better."""
    seeds = (1, 2, 3, 4)
    base = [5.00, 5.01, 4.99, 5.00]
    noise = [0.004, -0.006, 0.001, 0.0]
    losses = {"baseline": base, "deepseek": [b - 0.008 + e for b, e in zip(base, noise)],
              "gqa": [b + 0.001 + e for b, e in zip(base, reversed(noise))],
              "mqa": [b + 0.002 - e for b, e in zip(base, noise)]}
    runs = {name: [_run(s, loss) for s, loss in zip(seeds, values)] for name, values in losses.items()}
    result = comparison(runs)
    main = result["pairs"]["deepseek - baseline"]
    assert 0.01 < main["p_value"] < 0.05 and main["verdict"].startswith("deepseek is better")
    assert len(result["pairs"]) == 5 and result["multiple_comparisons"]["pairs"] == 5
    ranked = sorted(p["p_value"] for p in result["pairs"].values())
    assert main["p_holm"] >= 5 * ranked[0] and main["p_holm"] >= 0.05
    assert main["verdict_holm"].startswith("no significant difference (Holm-adjusted p = ")
    assert result["headline"] == {"pair": "deepseek - baseline", "basis": "holm", "verdict": main["verdict_holm"]}
    assert result["verdict"] == main["verdict"]  # the published top-level key stays the unadjusted verdict
    table = format_table({**{name: summarise_model(r, None) for name, r in runs.items()}, "comparison": result})
    lines = table.splitlines()
    assert f"Val loss, deepseek - baseline: {main['verdict']}" in lines
    assert f"  Holm-adjusted: {main['verdict_holm']}" in lines
    assert lines[-1] == ("Headline, val loss deepseek - baseline (Holm-adjusted over the 5 pairs; the unadjusted CIs "
                         f"are above): {main['verdict_holm']}")


def test_one_pair_headline_is_its_interval_verdict():
    runs = {"baseline": [_run(1, 5.0), _run(2, 5.01), _run(3, 5.02)],
            "deepseek": [_run(1, 4.9), _run(2, 4.92), _run(3, 4.91)]}
    result = comparison(runs)
    main = result["pairs"]["deepseek - baseline"]
    assert main["p_holm"] == pytest.approx(main["p_value"])
    assert result["headline"] == {"pair": "deepseek - baseline", "basis": "ci95", "verdict": main["verdict"]}


def test_holm_and_the_interval_agree_at_exactly_p_equal_alpha():
    """p = 0.05 is not below alpha: Holm calls it not significant, as the 95% CI rule does (its interval then just
    touches 0). With alpha computed as 1 - 0.95 (0.050000000000000044) Holm called it better."""
    result = {"p_value": 0.05, "mean": -0.1, "n": 3, "excluded_seeds": [], "untested": None}
    verdict = holm_verdicts({"deepseek - baseline": result}, {"deepseek - baseline": ("deepseek", "baseline")})
    assert verdict["deepseek - baseline"]["verdict_holm"].startswith("no significant difference (Holm-adjusted p = 0.05 ")
    below = holm_verdicts({"a - b": {**result, "p_value": 0.0499}}, {"a - b": ("a", "b")})
    assert below["a - b"]["verdict_holm"].startswith("a is better")


def test_accuracy_and_perplexity_verdicts_say_they_are_unadjusted():
    runs = {"baseline": [_run(1, 5.0), _run(2, 5.01), _run(3, 5.02)],
            "deepseek": [_run(1, 4.9), _run(2, 4.92), _run(3, 4.91)],
            "gqa": [_run(1, 5.0), _run(2, 5.02), _run(3, 5.0)]}
    for values in comparison(runs)["pairs"].values():
        assert "adjustment" not in values["val_loss"]  # val_loss is Holm-adjusted (p_holm, verdict_holm)
        assert values["val_accuracy"]["adjustment"] == values["val_perplexity"]["adjustment"] == (
            "unadjusted: only val_loss is Holm-adjusted across the pairs")
    table = format_table({**{name: summarise_model(r, None) for name, r in runs.items()}, "comparison": comparison(runs)})
    assert "± is their standard deviation (seed SD), not a CI" in table
