"""Loss plots: validation loss against training time, and train/validation loss against step.

With several seeds each model is drawn as its mean curve with a min-max band. Every arm in the results is
drawn, in its own colour from the registry (arms.ARMS).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from arms.registry import ARMS, arm_color, arm_label
from common.atomic_files import write_atomic
from training.results import result_arms

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LABELS = {name: arm.label_for() for name, arm in ARMS.items()}  # at the default --gqa-kv-heads; plots use arm_label
COLORS = {name: arm.color for name, arm in ARMS.items()}
VAL_TIME_PLOT = "exp6_val_loss_vs_time.png"
LOSS_STEP_PLOT = "exp6_loss_vs_step.png"
LR_SWEEP_PLOT = "exp6_lr_sweep.png"  # only when --lr-sweep ran


def _stack(runs: list[dict[str, Any]], key: str) -> np.ndarray | None:
    """(runs, points) array of one curve field, over the points every run reached."""
    curves = [r["curve"][key] for r in runs if r["curve"]["step"]]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    return np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=float)


def _runs_to_draw(summary: dict[str, Any]) -> list[dict[str, Any]]:
    runs = summary.get("runs", [])
    completed = [r for r in runs if r["status"] == "completed"]
    return completed or runs


def _label(name: str, results: dict[str, Any]) -> str:
    return arm_label(name, results.get("experiment", {}).get("config"))


def _final_label(name: str, results: dict[str, Any]) -> str:
    summary = results[name]
    loss, std = summary.get("val_loss"), summary.get("val_loss_std")
    if loss is None:
        return f"{_label(name, results)} (no completed run)"
    spread = "" if std is None else f" ± {std:.3f}"
    seeds = len(summary.get("seeds_completed", []))
    return f"{_label(name, results)}: final val loss {loss:.3f}{spread} ({seeds} seed{'s' if seeds != 1 else ''})"


def _band(ax: Axes, x: np.ndarray, values: np.ndarray, color: str, label: str, style: str = "-") -> None:
    ax.plot(x, np.nanmean(values, axis=0), style, color=color, label=label, marker="o", markersize=3)
    if len(values) > 1:
        ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color, alpha=0.2)


def _finish(fig: Figure, ax: Axes, path: Path) -> None:
    """Grid, legend, then save whole or not at all (atomic_files.write_atomic): an old plot is never
    left half-overwritten, and two runs saving into one folder never share a temporary file."""
    import matplotlib.pyplot as plt

    try:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        write_atomic(path, lambda file: fig.savefig(file, dpi=120, format="png"))
    finally:
        plt.close(fig)


def _title_suffix(results: dict[str, Any]) -> str:
    """The title's ending, e.g. ' — cpu preset, your file corpus.txt': the preset and the data really used."""
    experiment = results["experiment"]
    data = experiment.get("data", {})
    source = data.get("source_label") or ("offline corpus" if data.get("offline") else None)
    return f" — {experiment['config']['preset']} preset" + (f", {source}" if source else "")


def plot_results(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """Write both PNGs and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title_suffix = _title_suffix(results)
    paths = [output_dir / VAL_TIME_PLOT, output_dir / LOSS_STEP_PLOT]

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in result_arms(results):
        runs = _runs_to_draw(results[name])
        seconds, val = _stack(runs, "training_seconds"), _stack(runs, "val_loss")
        if seconds is not None and val is not None:
            _band(ax, np.nanmean(seconds, axis=0), val, COLORS[name], _final_label(name, results))
    ax.set(xlabel="training time (s, evaluation excluded)", ylabel="validation loss",
           title="Validation loss vs training time" + title_suffix)
    _finish(fig, ax, paths[0])

    fig, ax = plt.subplots(figsize=(9, 6))
    for name in result_arms(results):
        runs = _runs_to_draw(results[name])
        steps, val, train = _stack(runs, "step"), _stack(runs, "val_loss"), _stack(runs, "train_loss")
        if steps is None or val is None or train is None:
            continue
        x = steps[0]
        _band(ax, x, val, COLORS[name], _final_label(name, results))
        has_train = ~np.isnan(train).all(axis=0)
        _band(ax, x[has_train], train[:, has_train], COLORS[name], f"{_label(name, results)}: train loss (mean since last eval)", "--")
    ax.set(xlabel="optimizer step", ylabel="loss", title="Train and validation loss vs step" + title_suffix)
    _finish(fig, ax, paths[1])
    sweep = plot_lr_sweep(results, output_dir)
    return paths + ([sweep] if sweep is not None else [])


def plot_lr_sweep(results: dict[str, Any], output_dir: Path) -> Path | None:
    """Final tuning-set loss of each sweep run against its LR multiplier (log x), one line per arm, each
    arm's chosen multiplier starred; diverged runs and a choice at the grid's edge are named in the legend.
    None (no file) without a sweep."""
    sweep = results.get("lr_sweep") or {}
    if not sweep.get("tuned") or not sweep.get("arms"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, entry in sweep["arms"].items():
        done = [r for r in entry["runs"] if r["status"] == "completed" and r.get("tuning_loss") is not None
                and np.isfinite(r["tuning_loss"])]
        failed = [r["multiplier"] for r in entry["runs"] if r["status"] == "failed"]
        color = arm_color(name)
        label = _label(name, results) + (f" (best x{entry['best_multiplier']:g})" if entry.get("best_multiplier") else "")
        if failed:
            label += f"; diverged at {', '.join(f'x{m:g}' for m in failed)}"
        if entry.get("at_grid_edge"):
            label += f"; {entry.get('warning', '')}"
        ax.plot([r["multiplier"] for r in done], [r["tuning_loss"] for r in done], "-o", color=color, label=label,
                markersize=4)
        best = [r for r in done if r["multiplier"] == entry.get("best_multiplier")]
        if best:
            ax.plot([best[0]["multiplier"]], [best[0]["tuning_loss"]], "*", color=color, markersize=16,
                    markeredgecolor="black")
    ax.set_xscale("log")
    multipliers = sweep.get("multipliers") or []
    if multipliers:
        ax.set_xticks(multipliers, [f"{m:g}" for m in multipliers])
        ax.minorticks_off()
    ax.set(xlabel="LR multiplier (x muon_lr and adamw_lr; log scale)", ylabel="final loss on the tuning set",
           title=f"LR sweep: {sweep.get('steps')} steps, seed {sweep.get('seed')} (star: chosen)" + _title_suffix(results))
    path = output_dir / LR_SWEEP_PLOT
    _finish(fig, ax, path)
    return path
