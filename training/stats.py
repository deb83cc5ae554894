"""Seed statistics: mean, standard deviation and the paired 95% confidence interval of a difference."""

from __future__ import annotations

import math
from typing import Any

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; beyond 30 the normal 1.96 is used.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for the std of a single value)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(first: dict[int, float], second: dict[int, float], lower_is_better: bool = True,
                      names: tuple[str, str] = ("deepseek", "baseline")) -> dict[str, Any]:
    """Per-seed first - second (values by seed) over seeds both finished, with a 95% t interval of the mean
    difference; the verdict names the better arm by `names` (first's, second's)."""
    seeds = sorted(set(first) & set(second))
    diffs = [first[s] - second[s] for s in seeds]
    mean, std = mean_std(diffs)
    out: dict[str, Any] = {"seeds": seeds, "differences": diffs, "mean": mean, "std": std, "ci95": None}
    if mean is None:
        out["verdict"] = "no seed finished for both models"
    elif std is None:
        out["verdict"] = "single seed: a single seed cannot separate small differences; run --seeds 42 43 44"
    else:
        half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
        out["ci95"] = [low, high]
        if low <= 0 <= high:
            out["verdict"] = f"no significant difference (95% CI [{low:+.4f}, {high:+.4f}] contains 0, {len(diffs)} seeds)"
        else:
            better = names[0] if (mean < 0) == lower_is_better else names[1]
            out["verdict"] = f"{better} is better (95% CI [{low:+.4f}, {high:+.4f}] excludes 0, {len(diffs)} seeds)"
    return out
