"""Seed statistics: mean and standard deviation, the paired 95% t interval of a difference with its p-value,
and Holm's adjustment of those p-values across the pairs a run reports.

The interval and the test are scipy.stats' one-sample t-test of the per-seed differences against 0 (exact
Student-t quantiles for every number of seeds), so "the 95% CI excludes 0" and "p < 0.05" always agree.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

ALPHA = 0.05  # exactly: 1 - 0.95 is 0.050000000000000044 in floating point, which would call p = 0.05 significant
CONFIDENCE = 1 - ALPHA  # the interval's level; "CI excludes 0" and "p < ALPHA" agree
SAME_DIFFERENCE = 1e-12  # relative spread below which the seeds' differences are equal up to float rounding


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for the std of a single value)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95% Student-t interval of the mean of `values` (seeds); None for fewer than two or no spread."""
    mean, std = mean_std(list(values))
    if mean is None or std is None or std == 0:
        return None
    import scipy.stats

    half = float(scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def _seeds_word(n: int) -> str:
    return f"n = {n} seed{'s' if n != 1 else ''}"


def exclusion_note(excluded: Sequence[dict[str, Any]]) -> str:
    """'; seed 44 excluded: deepseek failed at step 212 (non-finite loss)', one clause per excluded seed; '' for none."""
    return "".join(f"; seed {e['seed']} excluded: {e['reason']}" for e in excluded)


def paired_difference(first: dict[int, float], second: dict[int, float], lower_is_better: bool = True,
                      names: tuple[str, str] = ("deepseek", "baseline"),
                      excluded: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Per-seed first - second (values by seed) over the seeds both have, with the 95% t interval of the mean
    difference and the two-sided p-value of "no difference"; the verdict names the better arm by `names`
    (first's, second's), gives n and names every seed in `excluded` ({"seed", "reason"}: why it is not paired).

    When every seed gives the same difference (up to float rounding) there is no spread to build an interval
    from: the verdict says so instead of reporting a zero-width interval."""
    seeds = sorted(set(first) & set(second))
    diffs = [first[s] - second[s] for s in seeds]
    mean, std = mean_std(diffs)
    n = len(diffs)
    out: dict[str, Any] = {"seeds": seeds, "n": n, "excluded_seeds": list(excluded), "differences": diffs,
                           "mean": mean, "std": std, "ci95": None, "p_value": None}
    dropped = exclusion_note(excluded)
    if mean is None:
        out["untested"] = "no seed finished for both models"
        out["verdict"] = f"no seed finished for both models{dropped}"
    elif std is None:
        out["untested"] = "a single seed"
        out["verdict"] = (f"single seed: a single seed cannot separate small differences; run --seeds 42 43 44 "
                          f"({_seeds_word(n)}{dropped})")
    elif max(diffs) - min(diffs) <= SAME_DIFFERENCE * max(abs(d) for d in diffs):
        out["untested"] = "the seeds gave identical differences"
        out["verdict"] = (f"the seeds gave identical differences ({diffs[0]:+.4f} each, {_seeds_word(n)}{dropped}): "
                          "nothing can be inferred about the spread, so there is no interval and no test")
    else:
        import scipy.stats  # here, not at the top: half a second of every command's start, for the last step

        test = scipy.stats.ttest_1samp(diffs, 0.0)
        interval = test.confidence_interval(CONFIDENCE)
        low, high = float(interval.low), float(interval.high)
        out.update(ci95=[low, high], p_value=float(test.pvalue), df=n - 1)
        where = f"95% CI [{low:+.4f}, {high:+.4f}]"
        if low <= 0 <= high:
            out["verdict"] = f"no significant difference ({where} contains 0, {_seeds_word(n)}{dropped})"
        else:
            better = names[0] if (mean < 0) == lower_is_better else names[1]
            out["verdict"] = f"{better} is better ({where} excludes 0, {_seeds_word(n)}{dropped})"
    return out


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the k-th smallest p is multiplied by (m - k + 1)
    (k from 1), capped at 1, and made non-decreasing in that order. Rejecting where the adjusted p < alpha
    keeps the chance of any false "better" among the m tests at most alpha."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def holm_verdicts(tests: dict[str, dict[str, Any]], names: dict[str, tuple[str, str]],
                  lower_is_better: bool = True) -> dict[str, dict[str, Any]]:
    """Holm-adjusted p-value and verdict of each pair's paired_difference in `tests` (pair name -> its result),
    the family being every pair reported: a pair without a p-value (one seed, none, or no spread) counts as
    p = 1, so the correction never assumes fewer tests than the run reports. `names`: each pair's two arms."""
    pairs = list(tests)
    raw = [tests[pair]["p_value"] for pair in pairs]
    adjusted = holm_adjust([1.0 if p is None else p for p in raw])
    m = len(pairs)
    out: dict[str, dict[str, Any]] = {}
    for pair, p, p_holm in zip(pairs, raw, adjusted):
        result = tests[pair]
        if p is None:
            verdict = f"not tested: {result['untested']}{exclusion_note(result['excluded_seeds'])}"
            out[pair] = {"p_holm": None, "verdict_holm": verdict}
            continue
        where = f"Holm-adjusted p = {p_holm:.3g} across {m} pair{'s' if m != 1 else ''}, {_seeds_word(result['n'])}"
        if p_holm < ALPHA:
            first, second = names[pair]
            better = first if (result["mean"] < 0) == lower_is_better else second
            verdict = f"{better} is better ({where}{exclusion_note(result['excluded_seeds'])})"
        else:
            verdict = f"no significant difference ({where}{exclusion_note(result['excluded_seeds'])})"
        out[pair] = {"p_holm": p_holm, "verdict_holm": verdict}
    return out
