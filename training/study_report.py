"""A study's answer, from the runs its ledger holds: the cache frontier and the size ladder, in the results JSON
(its `study` key), two plots and a few printed lines.

- Frontier: each point's validation loss (mean and 95% t interval over seeds) against its measured KV cache per
  token per layer (bf16, the cost table's own figure), the Pareto frontier, and each point's paired difference
  from MHA with the Holm-adjusted verdict over the frontier's pairs (the ledger's comparison).
- Ladder: per size, each arm's non-embedding parameters N, training tokens and FLOPs and mean loss; per arm the
  law L(N) = E + A * N^-alpha with bootstrap intervals over seeds (training/scaling.py); per size the paired gap of
  each arm against MHA with its 95% CI; and the trend of that gap in log N, stated as a verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from arms.registry import arm_color
from common.atomic_files import write_atomic
from common.reporting import fmt
from config.settings import BASELINE
from training.ledger import Ledger
from training.lineup import FRONTIER, LADDER, Entry, Lineup
from training.results import MEASURED_KV
from training.scaling import gap_trend, pareto_front, scaling_law
from training.stats import mean_interval, paired_difference

if TYPE_CHECKING:
    from matplotlib.axes import Axes

FRONTIER_PLOT = "exp6_study_frontier.png"
LADDER_PLOT = "exp6_study_ladder.png"


def completed_losses(summary: dict[str, Any]) -> dict[int, float]:
    """seed -> final validation loss of every completed run of one entry."""
    return {run["seed"]: run["val_loss"] for run in summary.get("runs", []) if run["status"] == "completed"}


# --- the frontier ---------------------------------------------------------------------------------------

def frontier(results: dict[str, Any], entries: list[Entry]) -> dict[str, Any]:
    """Every frontier point with its measured cache, loss and interval, its pair against MHA, and the front."""
    pairs = results.get("comparison", {}).get("pairs", {})
    points: dict[str, dict[str, Any]] = {}
    for entry in entries:
        summary = results.get(entry.name) or {}
        losses = list(completed_losses(summary).values())
        interval = mean_interval(losses)
        pair = pairs.get(f"{entry.name} - {BASELINE}") or {}
        points[entry.name] = {
            "label": entry.label, "arm": entry.arm,
            "kv_cache_bytes_per_token_per_layer_bf16_measured": (summary.get("costs") or {}).get(MEASURED_KV),
            "val_loss": float(np.mean(losses)) if losses else None, "val_loss_ci95": list(interval) if interval else None,
            "seeds": len(losses), "vs_mha": _pair_line(pair)}
    measured = [(name, p["kv_cache_bytes_per_token_per_layer_bf16_measured"], p["val_loss"]) for name, p in points.items()
                if p["val_loss"] is not None and p["kv_cache_bytes_per_token_per_layer_bf16_measured"] is not None]
    return {"points": points, "pareto_front": pareto_front(measured),
            "family": f"Holm over the frontier's {len(pairs)} pairs (each point - MHA), on validation loss",
            "note": "cache: bytes per token per layer in bf16, measured from the cache tensors of a decode"}


def _pair_line(pair: dict[str, Any]) -> dict[str, Any] | None:
    """A point's paired difference from MHA: mean, 95% CI, n, and the Holm-adjusted verdict."""
    if not pair:
        return None
    loss = pair.get("val_loss") or {}
    return {"mean": loss.get("mean"), "ci95": loss.get("ci95"), "n": pair.get("n"),
            "p_holm": pair.get("p_holm"), "verdict_holm": pair.get("verdict_holm")}


# --- the ladder -----------------------------------------------------------------------------------------

def ladder(results: dict[str, Any], entries: list[Entry]) -> dict[str, Any]:
    """Per size and arm: N, tokens, FLOPs and loss; per arm its law; per arm against MHA the gaps and their trend."""
    arms = list(dict.fromkeys(entry.arm for entry in entries))
    sizes = sorted({entry.size for entry in entries if entry.size is not None})
    by_key = {(entry.arm, entry.size): entry for entry in entries}
    seeds = _common_seeds(results, entries)
    table = {arm: [_size_row(results, by_key[(arm, size)]) for size in sizes] for arm in arms}
    out: dict[str, Any] = {"sizes": sizes, "arms": table, "seeds_used_for_fits": seeds,
                           "rule": "size k: 2k heads of ladder_head_dim, k layers; tokens = tokens_per_parameter x the "
                                   "MHA model's non-embedding parameters, the same steps for every arm of a size"}
    out["laws"] = {arm: _law(results, [by_key[(arm, size)] for size in sizes], table[arm], seeds) for arm in arms}
    out["gaps"] = {arm: _gaps(results, by_key, arm, sizes, seeds, table[BASELINE]) for arm in arms if arm != BASELINE}
    return out


def _law(results: dict[str, Any], entries: list[Entry], rows: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One arm's L(N) over its sizes, each size's losses listed in the same seed order."""
    if not seeds:
        return {"fitted": False, "note": "no seed completed every size: no law"}
    losses = [[completed_losses(results[entry.name])[seed] for seed in seeds] for entry in entries]
    return scaling_law([row["parameters_non_embedding"] for row in rows], losses)


def _common_seeds(results: dict[str, Any], entries: list[Entry]) -> list[int]:
    """The seeds that completed at every size for every arm: the fits and trends pair them."""
    sets = [set(completed_losses(results.get(entry.name) or {})) for entry in entries]
    return sorted(set.intersection(*sets)) if sets else []


def _size_row(results: dict[str, Any], entry: Entry) -> dict[str, Any]:
    summary = results.get(entry.name) or {}
    costs = summary.get("costs") or {}
    tokens = entry.config.max_steps * entry.config.batch_size * entry.config.max_seq_len
    losses = list(completed_losses(summary).values())
    interval = mean_interval(losses)
    flops = costs.get("training_flops_per_token")
    return {"entry": entry.name, "size": entry.size, "d_model": entry.config.d_model, "n_layers": entry.config.n_layers,
            "n_heads": entry.config.n_heads, "parameters_non_embedding": costs.get("parameters_non_embedding"),
            "training_tokens": tokens, "training_flops": flops * tokens if flops else None,
            "val_loss": float(np.mean(losses)) if losses else None, "val_loss_ci95": list(interval) if interval else None}


def _gaps(results: dict[str, Any], by_key: dict[tuple[str, int | None], Entry], arm: str, sizes: list[int],
          seeds: list[int], mha_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """arm - MHA per size (paired over seeds, 95% CI) and its trend in log N (N: the MHA model's)."""
    per_size, gaps = [], []
    for size in sizes:
        mine = completed_losses(results[by_key[(arm, size)].name])
        theirs = completed_losses(results[by_key[(BASELINE, size)].name])
        pair = paired_difference(mine, theirs, names=(arm, BASELINE))
        per_size.append({"size": size, "mean": pair["mean"], "ci95": pair["ci95"], "n": pair["n"],
                         "verdict": pair["verdict"]})
        gaps.append([mine[seed] - theirs[seed] for seed in seeds])
    sizes_n = [row["parameters_non_embedding"] for row in mha_rows]
    trend = gap_trend(sizes_n, gaps, (arm, BASELINE)) if seeds else {"verdict": "no seed completed every size"}
    return {"per_size": per_size, "trend": trend}


# --- the report -----------------------------------------------------------------------------------------

def study_results(results: dict[str, Any], lineup: Lineup) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if lineup.of_study(FRONTIER):
        out[FRONTIER] = frontier(results, lineup.of_study(FRONTIER))
    if lineup.of_study(LADDER):
        out[LADDER] = ladder(results, lineup.of_study(LADDER))
    return out


def report_study(ledger: Ledger, log: Callable[[str], None]) -> None:
    """The study's analysis into the JSON (saved again, with the status the run ended with), its plots, and what
    it found, in a few lines."""
    study = study_results(ledger.results, ledger.lineup)
    ledger.results["study"] = study
    ledger.save(ledger.header["status"])
    folder = ledger.path.parent
    plots = []
    try:
        plots = draw_study(study, folder)
    except Exception as error:  # noqa: BLE001 - the results are saved; a plot that fails is said, not fatal
        log(f"Plots not drawn ({type(error).__name__}: {error}); the results are in {ledger.path}")
    for line in study_lines(study):
        log(line)
    log(f"Results: {ledger.path}; plots: {', '.join(str(p) for p in plots) or 'none'}")


def study_lines(study: dict[str, Any]) -> list[str]:
    lines = []
    if FRONTIER in study:
        lines.append("Cache frontier (val loss, mean [95% CI over seeds]; KV cache B/token/layer bf16, measured):")
        front = set(study[FRONTIER]["pareto_front"])
        for name, point in study[FRONTIER]["points"].items():
            ci = point["val_loss_ci95"]
            spread = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            versus = (point["vs_mha"] or {}).get("verdict_holm") or "-"
            lines.append(f"  {point['label']:>14}: {fmt(point['kv_cache_bytes_per_token_per_layer_bf16_measured'], ',.0f'):>6} B, "
                         f"loss {fmt(point['val_loss'], '.4f')}{spread}{' (Pareto front)' if name in front else ''}; "
                         f"vs MHA: {versus}")
    if LADDER in study:
        for arm, law in study[LADDER]["laws"].items():
            fitted = (f"L(N) = {law['E']:.3f} + {law['A']:.3g} N^-{law['alpha']:.3f}" if "alpha" in law else "no law")
            notes = "".join(f"; {law[key]}" for key in ("note", "E_note") if law.get(key))
            lines.append(f"Ladder, {arm}: {fitted}{'' if law['fitted'] else ' (not drawn)'}{notes}")
        for arm, gaps in study[LADDER]["gaps"].items():
            lines.append(f"Ladder, {arm} - {BASELINE}: {gaps['trend']['verdict']}")
    return lines


def draw_study(study: dict[str, Any], folder: Path) -> list[Path]:
    """The frontier's and the ladder's plots, each written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    if FRONTIER in study:
        figure, axis = plt.subplots(figsize=(7, 5))
        _draw_frontier(axis, study[FRONTIER])
        drawn.append(_save(figure, folder / FRONTIER_PLOT))
    if LADDER in study:
        figure, axes = plt.subplots(1, 3, figsize=(16, 5))
        _draw_ladder(axes, study[LADDER])
        drawn.append(_save(figure, folder / LADDER_PLOT))
    return drawn


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=120))
    plt.close(figure)
    return path


def _draw_frontier(axis: Axes, front: dict[str, Any]) -> None:
    points = {name: p for name, p in front["points"].items() if p["val_loss"] is not None
              and p["kv_cache_bytes_per_token_per_layer_bf16_measured"] is not None}
    for name, p in points.items():
        x, y, ci = p["kv_cache_bytes_per_token_per_layer_bf16_measured"], p["val_loss"], p["val_loss_ci95"]
        error = [[y - ci[0]], [ci[1] - y]] if ci else None
        axis.errorbar([x], [y], yerr=error, fmt="o", capsize=3, color=arm_color(p["arm"]) or "black")
        axis.annotate(p["label"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front_points = sorted((points[name]["kv_cache_bytes_per_token_per_layer_bf16_measured"], points[name]["val_loss"])
                          for name in front["pareto_front"] if name in points)
    if front_points:
        axis.step([x for x, _ in front_points], [y for _, y in front_points], where="post", color="gray",
                  linestyle="--", label="Pareto frontier")
        axis.legend()
    axis.set_xlabel("KV cache, bytes per token per layer (bf16, measured)")
    axis.set_ylabel("validation loss (mean, 95% CI over seeds)")
    axis.set_title("Equal-cache frontier")
    axis.grid(alpha=0.3)


def _draw_ladder(axes: Any, ladder_result: dict[str, Any]) -> None:
    """Each arm in its registry colour in every panel: its losses and law, and its gap against MHA per size."""
    for arm, rows in ladder_result["arms"].items():
        color = arm_color(arm) or "black"
        law = ladder_result["laws"][arm]
        for axis, key in ((axes[0], "parameters_non_embedding"), (axes[1], "training_flops")):
            xs = [row[key] for row in rows if row["val_loss"] is not None]
            ys = [row["val_loss"] for row in rows if row["val_loss"] is not None]
            axis.plot(xs, ys, "o", color=color, label=arm)
        if law.get("fitted"):
            n = np.geomspace(min(r["parameters_non_embedding"] for r in rows), max(r["parameters_non_embedding"] for r in rows), 50)
            axes[0].plot(n, law["E"] + law["A"] * n ** -law["alpha"], "-", color=color, alpha=0.6)
    for arm, gaps in ladder_result["gaps"].items():
        color, rows = arm_color(arm) or "black", ladder_result["arms"][BASELINE]
        for row, gap in zip(rows, gaps["per_size"]):
            if gap["mean"] is None:
                continue
            ci = gap["ci95"]
            error = [[gap["mean"] - ci[0]], [ci[1] - gap["mean"]]] if ci else None
            axes[2].errorbar([row["parameters_non_embedding"]], [gap["mean"]], yerr=error, fmt="o", capsize=3,
                             color=color)
        axes[2].plot([], [], "o", color=color, label=f"{arm} - {BASELINE}")
    axes[2].axhline(0, color="gray", linewidth=0.8)
    for axis, title in zip(axes, ("loss vs non-embedding parameters", "loss vs training FLOPs", "gap vs MHA per size")):
        axis.set_xscale("log")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].set_xlabel("non-embedding parameters N")
    axes[1].set_xlabel("training FLOPs")
    axes[2].set_xlabel("non-embedding parameters N (MHA)")
