"""What the studies compute from their runs: the Pareto frontier of loss against KV cache, a scaling law
L(N) = E + A * N^-alpha per arm with bootstrap intervals over seeds, and the trend of a gap with model size.

Every interval is over seeds, so it says how much the answer moves with the seeds, not with the text or the sizes
chosen: the law's parameters by a bootstrap that resamples the seeds together (scipy.stats.bootstrap, paired: seed
s is one unit at every size, since it fixes the same initial draws and batches there; with few seeds it has few
distinct resamples and understates the spread), the gap's trend by a t interval over the seeds' own slopes. With fewer than MIN_SIZES sizes no law is fitted, and a fit or a
trend whose interval is wider than its own estimate is reported as undetermined rather than drawn.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from training.stats import mean_interval

MIN_SIZES = 4  # a three-parameter law through fewer points is not a fit
ALPHA_BOUNDS = (1e-3, 3.0)  # the exponents the fit may take; one at a bound is no power law (a flat line, a cliff)
CONFIDENCE = 0.95
RESAMPLES = 999


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """The names of the points (name, cache bytes, loss) that no other point beats on both: no other has a smaller
    or equal cache and a strictly lower loss, or a strictly smaller cache and an equal loss. In cache order."""
    front = []
    for name, cache, loss in points:
        dominated = any((c <= cache and l < loss) or (c < cache and l <= loss) for n, c, l in points if n != name)
        if not dominated:
            front.append((cache, loss, name))
    return [name for _, _, name in sorted(front)]


def power_law(n: np.ndarray, e: float, a: float, alpha: float) -> np.ndarray:
    """L(N) = E + A * N^-alpha."""
    return e + a * np.power(n, -alpha)


def fit_power_law(sizes: Sequence[float], losses: Sequence[float]) -> tuple[float, float, float] | None:
    """(E, A, alpha) of the least-squares fit of L(N) = E + A * N^-alpha, with E >= 0, A > 0, 0 < alpha < 3;
    None when there are fewer than MIN_SIZES sizes or the fit does not converge."""
    from scipy.optimize import curve_fit  # here: scipy's import costs every command half a second

    n, y = np.asarray(sizes, dtype=float), np.asarray(losses, dtype=float)
    if len(n) < MIN_SIZES or not np.all(np.isfinite(y)):
        return None
    scale = float(np.exp(np.mean(np.log(n))))  # N / its geometric mean keeps A near the losses' size
    guess = (max(0.0, 0.9 * float(y.min())), max(1e-3, float(y.max() - 0.9 * y.min())), 0.3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an ill-conditioned resample: its parameters are still a sample
            params, _ = curve_fit(power_law, n / scale, y, p0=guess, maxfev=20_000,
                                  bounds=([0.0, 1e-12, ALPHA_BOUNDS[0]], [np.inf, np.inf, ALPHA_BOUNDS[1]]))
    except (RuntimeError, ValueError):
        return None
    e, a, alpha = (float(p) for p in params)
    return e, a * scale ** alpha, alpha  # A back in units of N


def seed_bootstrap(per_size: Sequence[Sequence[float]], statistic: Callable[..., Any], seed: int = 0,
                   resamples: int = RESAMPLES) -> list[tuple[float, float] | None] | None:
    """The 95% percentile interval of each value `statistic(*per_size)` returns (a number or a sequence of them)
    when the seeds are resampled together (the same resampled seeds at every size); None with fewer than two seeds,
    and None for a value whose interval cannot be computed (e.g. a fit that fails on some resamples)."""
    from scipy.stats import bootstrap

    samples = [np.asarray(values, dtype=float) for values in per_size]
    if len(samples[0]) < 2 or any(len(s) != len(samples[0]) for s in samples):
        return None
    try:
        result = bootstrap(samples, statistic, paired=True, vectorized=False, n_resamples=resamples,
                           confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(seed))
    except ValueError:
        return None
    lows, highs = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    return [(float(low), float(high)) if math.isfinite(low) and math.isfinite(high) else None
            for low, high in zip(lows, highs)]


def scaling_law(sizes: Sequence[float], per_size: Sequence[Sequence[float]], resamples: int = RESAMPLES) -> dict[str, Any]:
    """L(N) = E + A * N^-alpha fitted to the mean loss over seeds at each size (`per_size[i]`: every seed's loss at
    sizes[i], seeds in the same order at every size), with a bootstrap interval over seeds for each parameter; a
    law that cannot be fitted, or whose alpha interval is wider than alpha itself, says so and is not drawn."""
    means = [float(np.mean(values)) for values in per_size]
    out: dict[str, Any] = {"sizes": list(sizes), "mean_losses": means, "fitted": False}
    if len(sizes) < MIN_SIZES:
        out["note"] = f"{len(sizes)} size(s): a law of three parameters needs at least {MIN_SIZES}; not fitted"
        return out
    fit = fit_power_law(sizes, means)
    if fit is None:
        out["note"] = "the least-squares fit did not converge; not fitted"
        return out
    out.update(E=fit[0], A=fit[1], alpha=fit[2])
    intervals = seed_bootstrap(per_size, lambda *samples: _fitted(sizes, samples), resamples=resamples) or [None] * 3
    out["ci95"] = {name: list(interval) if interval else None for name, interval in zip(("E", "A", "alpha"), intervals)}
    if fit[0] <= 1e-9:
        out["E_note"] = "E fell on its bound 0: no irreducible loss shows at these sizes; the law is a pure power of N"
    problem = undetermined(fit[2], intervals[2], len(per_size[0]))
    out["fitted"] = problem is None or problem.startswith("one seed")
    if problem:
        out["note"] = problem
    return out


def undetermined(alpha: float, interval: tuple[float, float] | None, seeds: int) -> str | None:
    """Why a fitted exponent says nothing (None: it says something): at a bound of the fit (the losses do not
    fall as a power of N), or an interval over seeds that reaches a bound or is wider than alpha itself."""
    near = [bound for bound in ALPHA_BOUNDS if math.isclose(alpha, bound, rel_tol=0.01)]
    if near:
        return (f"alpha fell on the fit's bound {near[0]:g}: these losses do not fall as a power of N over these "
                "sizes; not drawn")
    if interval is None:
        return "one seed: no interval; the law is drawn as a point estimate only" if seeds < 2 else (
            "no interval over seeds could be computed; not drawn")
    low, high = interval
    if high - low > alpha or any(math.isclose(end, bound, rel_tol=0.01) for end in interval for bound in ALPHA_BOUNDS):
        return (f"alpha's 95% interval over seeds [{low:.3g}, {high:.3g}] is wider than alpha ({alpha:.3g}) itself or "
                "reaches the fit's bounds: the exponent is not determined by these runs; not drawn")
    return None


def _fitted(sizes: Sequence[float], samples: Sequence[np.ndarray]) -> list[float]:
    """(E, A, alpha) fitted to the per-size means of one resample of seeds; NaN where the fit fails."""
    fit = fit_power_law(sizes, [float(np.mean(s)) for s in samples])
    return list(fit) if fit is not None else [math.nan] * 3


def gap_trend(sizes: Sequence[float], gaps: Sequence[Sequence[float]], names: tuple[str, str]) -> dict[str, Any]:
    """How the paired gap first - second (per seed, at each size) moves with log10 N: each seed's least-squares
    slope of its gap against log10 N (change per tenfold N), their mean with the 95% Student-t interval over seeds
    (the experiment's paired rule; a bootstrap over three seeds has ten distinct resamples and would look far
    surer than it is), and the verdict: the gap grows (the slope has the gap's sign), shrinks (the opposite
    sign), or there is no evidence (0 in the interval)."""
    x = np.log10(np.asarray(sizes, dtype=float))
    means = [float(np.mean(values)) for values in gaps]
    out: dict[str, Any] = {"per_tenfold_N": None, "ci95": None, "mean_gaps": means,
                           "method": "each seed's slope of its gap on log10 N; mean and 95% t interval over seeds"}
    if len(sizes) < 2:
        out["verdict"] = "one size: no trend can be measured"
        return out
    per_seed = [_slope(x, [float(gaps[size][seed]) for size in range(len(sizes))]) for seed in range(len(gaps[0]))]
    slope = float(np.mean(per_seed))
    interval = mean_interval(per_seed)
    out.update(per_tenfold_N=slope, ci95=list(interval) if interval else None, per_seed_slopes=per_seed)
    first, second = names
    overall = float(np.mean(means))
    if interval is None:
        out["verdict"] = f"{'one seed' if len(per_seed) < 2 else 'no spread between seeds'}: no verdict on the trend"
    elif interval[0] <= 0 <= interval[1]:
        out["verdict"] = (f"no evidence that the gap {first} - {second} changes with size (slope {slope:+.4f} per "
                          f"tenfold N, 95% CI [{interval[0]:+.4f}, {interval[1]:+.4f}] contains 0, {len(per_seed)} seeds)")
    else:
        grows = (slope < 0) == (overall < 0)
        out["verdict"] = (f"the gap {first} - {second} {'grows' if grows else 'shrinks'} with size (slope "
                          f"{slope:+.4f} per tenfold N, 95% CI [{interval[0]:+.4f}, {interval[1]:+.4f}] excludes 0, "
                          f"{len(per_seed)} seeds; mean gap {overall:+.4f})")
    return out


def _slope(x: np.ndarray, y: Sequence[float]) -> float:
    return float(np.polyfit(x, np.asarray(y, dtype=float), 1)[0])
