"""--lr-sweep: each arm's LR multiplier is picked by a short sweep, and the comparison trains at it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
from torch import nn

import training.lr_sweep
import training.runs
import training.trainer
from arms.registry import ARMS
from common.errors import ConfigError
from config.cli import config_from_args
from config.settings import ExperimentConfig
from exp6_trainer import build_parser, main
from models.attention import CausalSelfAttention
from training.experiment import run_experiment
from training.lr_sweep import EDGE_NOTE, UNTUNED_NOTE, at_grid_edge, best_multiplier, sweep_config, sweep_steps
from training.plots import LR_SWEEP_PLOT
from training.results import RESULTS_FILE

MULTIPLIERS = (0.5, 2.0, 1e4)  # x1e4 (muon_lr 100, adamw_lr 10) diverges


def _read(cfg: ExperimentConfig) -> dict[str, Any]:
    return json.loads((Path(cfg.output_dir) / RESULTS_FILE).read_text())


def _arm_of(model: nn.Module) -> str:
    attention = next(module for module in model.modules() if isinstance(module, CausalSelfAttention))
    return next(name for name, arm in ARMS.items() if type(attention) is arm.attention)


def _capture_optimizer_lrs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, float, float]]:
    """(arm, steps of the run, Muon base LR, AdamW base LR) handed to the optimizer builder by every train_model
    call: the LRs that run trained at (the schedule scales them per step)."""
    built: list[tuple[str, int, float, float]] = []
    real = training.trainer.build_optimizers

    def capturing(model: nn.Module, config: ExperimentConfig, device: torch.device) -> list[torch.optim.Optimizer]:
        optimizers = real(model, config, device)
        built.append((_arm_of(model), config.max_steps, config.muon_lr, config.adamw_lr))
        return optimizers

    monkeypatch.setattr(training.trainer, "build_optimizers", capturing)
    return built


def test_sweep_picks_each_arms_best_multiplier_and_the_comparison_trains_at_it(config, monkeypatch):
    cfg = config.replace(lr_sweep=True, lr_sweep_multipliers=MULTIPLIERS, lr_sweep_steps=3, sample_tokens=4)
    built = _capture_optimizer_lrs(monkeypatch)
    lines: list[str] = []
    run_experiment(cfg, log=lines.append)
    written = _read(cfg)
    sweep = written["lr_sweep"]
    assert sweep["tuned"] is True and "note" not in sweep
    assert sweep["multipliers"] == list(MULTIPLIERS) and sweep["steps"] == 3
    assert sweep["seed"] == cfg.sweep_seed and sweep["seed"] not in cfg.run_seeds  # never a reported seed
    assert list(sweep["arms"]) == list(cfg.arms)
    for name in cfg.arms:
        entry = sweep["arms"][name]
        assert [r["multiplier"] for r in entry["runs"]] == list(MULTIPLIERS)
        for run in entry["runs"]:
            assert run["muon_lr"] == pytest.approx(cfg.muon_lr * run["multiplier"])
            assert run["adamw_lr"] == pytest.approx(cfg.adamw_lr * run["multiplier"])
            assert set(run) >= {"multiplier", "muon_lr", "adamw_lr", "tuning_loss", "status"}
        diverged = entry["runs"][-1]
        assert diverged["status"] == "failed" and "diverged" in diverged["failure"]
        assert all(r["status"] == "completed" and math.isfinite(r["tuning_loss"]) for r in entry["runs"][:-1])
        # the best is the argmin of the recorded losses, a failed run counting as +inf
        losses = {r["multiplier"]: (r["tuning_loss"] if r["status"] == "completed" else math.inf) for r in entry["runs"]}
        assert entry["best_multiplier"] == min(losses, key=lambda m: (losses[m], m)) != 1e4
        edge = entry["best_multiplier"] == min(MULTIPLIERS)
        assert entry["at_grid_edge"] is edge and (entry.get("warning") == EDGE_NOTE) is edge
        assert entry["muon_lr"] == pytest.approx(cfg.muon_lr * entry["best_multiplier"])
        assert entry["adamw_lr"] == pytest.approx(cfg.adamw_lr * entry["best_multiplier"])
        # every sweep run really used its LRs, on the short horizon, from the first seed
        sweep_lrs = [(muon, adamw) for arm, steps, muon, adamw in built if arm == name and steps == 3]
        assert sweep_lrs == [(r["muon_lr"], r["adamw_lr"]) for r in entry["runs"]]
        # the comparison's run of this arm was built with exactly the best multiplier's LRs, and says so
        main_lrs = [(muon, adamw) for arm, steps, muon, adamw in built if arm == name and steps == cfg.max_steps]
        assert main_lrs == [(entry["muon_lr"], entry["adamw_lr"])]
        summary = written[name]
        assert (summary["muon_lr"], summary["adamw_lr"], summary["lr_multiplier"]) == \
            pytest.approx((entry["muon_lr"], entry["adamw_lr"], entry["best_multiplier"]))
        assert summary["runs"][0]["muon_lr"] == pytest.approx(entry["muon_lr"])
        assert len(summary["runs"]) == 1 and summary["runs"][0]["curve"]["step"][-1] == cfg.max_steps
        sweep_lines = [line for line in lines if line.startswith(f"LR sweep {name} x")]
        assert len(sweep_lines) == len(MULTIPLIERS)
        best_lines = [line for line in lines if line.startswith(f"LR sweep {name}: best multiplier x{entry['best_multiplier']:g}")]
        assert len(best_lines) == 1 and best_lines[0].endswith(f"WARNING: {EDGE_NOTE}") is edge
    assert len(built) == len(cfg.arms) * (len(MULTIPLIERS) + 1)
    # sweep runs save no model: only the comparison's runs have checkpoints
    saved = sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir())
    assert saved == sorted(f"{name}-seed{cfg.seed}" for name in cfg.arms)
    image = matplotlib.image.imread(Path(cfg.output_dir) / LR_SWEEP_PLOT)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert any(line.startswith("LR tuned per arm (--lr-sweep): baseline x") for line in lines)


def test_without_the_flag_the_json_says_the_lrs_were_not_tuned(config, monkeypatch):
    cfg = config.replace(save_checkpoints=False, sample_tokens=0)
    built = _capture_optimizer_lrs(monkeypatch)
    lines: list[str] = []
    run_experiment(cfg, log=lines.append)
    written = _read(cfg)
    assert written["lr_sweep"] == {"tuned": False, "note": UNTUNED_NOTE}
    assert [line for line in lines if "not tuned" in line] == [f"LR: {UNTUNED_NOTE}."]
    assert not (Path(cfg.output_dir) / LR_SWEEP_PLOT).exists()
    assert [(muon, adamw) for _, _, muon, adamw in built] == [(cfg.muon_lr, cfg.adamw_lr)] * len(cfg.arms)
    for name in cfg.arms:
        assert written[name]["muon_lr"] == cfg.muon_lr and written[name]["lr_multiplier"] == 1.0


def test_an_interrupted_sweep_keeps_the_runs_that_finished(config, monkeypatch):
    cfg = config.replace(lr_sweep=True, lr_sweep_multipliers=(0.5, 1.0), lr_sweep_steps=2, save_checkpoints=False)
    real = training.lr_sweep.train_model
    calls = []

    def interrupt_second(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training.lr_sweep, "train_model", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, log=lambda _: None)
    written = _read(cfg)
    assert written["experiment"]["status"] == "interrupted"
    runs = written["lr_sweep"]["arms"]["baseline"]["runs"]
    assert [r["status"] for r in runs] == ["completed", "interrupted"] and math.isfinite(runs[0]["tuning_loss"])
    assert written["baseline"]["runs"] == []  # the comparison never started


def test_best_multiplier_ignores_failed_runs_and_breaks_ties_towards_the_smaller():
    def run(m: float, loss: float | None, status: str = "completed") -> dict[str, Any]:
        return {"multiplier": m, "tuning_loss": loss, "status": status}

    assert best_multiplier([run(0.5, 3.0), run(1.0, 2.0), run(2.0, 2.5)]) == 1.0
    assert best_multiplier([run(2.0, 2.0), run(0.5, 2.0), run(1.0, 2.0)]) == 0.5  # ties: the smaller
    assert best_multiplier([run(1.0, 3.0), run(4.0, 1.0, "failed")]) == 1.0  # a failed run counts as +inf
    assert best_multiplier([run(1.0, math.nan), run(2.0, 3.0)]) == 2.0
    assert best_multiplier([run(2.0, None, "failed"), run(1.0, math.inf, "failed")]) is None  # all failed: none chosen
    assert best_multiplier([]) is None


def test_sweep_horizon_defaults_to_a_quarter_of_the_steps(config):
    assert sweep_steps(config.replace(max_steps=300)) == 75
    assert sweep_steps(config.replace(max_steps=3)) == 1  # at least one step
    assert sweep_steps(config.replace(max_steps=300, lr_sweep_steps=20)) == 20
    short = sweep_config(config.replace(max_steps=300, eval_every=50, lr_sweep_steps=20))
    assert (short.max_steps, short.eval_every, short.warmup_steps) == (20, 20, 1)


def test_cli_flags_reach_the_config():
    def parse(*argv: str) -> ExperimentConfig:
        return config_from_args(build_parser().parse_args(list(argv)), cuda_available=False)[0]

    plain = parse()
    assert plain.lr_sweep is False and plain.lr_sweep_multipliers == (0.25, 0.5, 1.0, 2.0, 4.0)
    bare = parse("--lr-sweep")
    assert bare.lr_sweep is True and bare.lr_sweep_multipliers == plain.lr_sweep_multipliers and bare.lr_sweep_steps == 0
    chosen = parse("--lr-sweep", "0.5", "2", "--lr-sweep-steps", "7")
    assert (chosen.lr_sweep, chosen.lr_sweep_multipliers, chosen.lr_sweep_steps) == (True, (0.5, 2.0), 7)
    assert "--lr-sweep" in build_parser().format_help() and "--lr-sweep-steps" in build_parser().format_help()
    seeded = parse("--lr-sweep", "--lr-sweep-seed", "7", "--tuning-fraction", "0.2")
    assert (seeded.lr_sweep_seed, seeded.sweep_seed, seeded.tuning_fraction) == (7, 7, 0.2)
    assert plain.lr_sweep_seed is None and plain.sweep_seed == max(plain.run_seeds) + 1


@pytest.mark.parametrize("args,flag", [
    (["--lr-sweep", "0"], "--lr-sweep"),
    (["--lr-sweep", "1", "1"], "--lr-sweep"),
    (["--lr-sweep", "--lr-sweep-steps", "-1"], "--lr-sweep-steps -1"),
    (["--lr-sweep", "--seeds", "42", "43", "--lr-sweep-seed", "43"], "--lr-sweep-seed 43"),
    (["--lr-sweep", "--tuning-fraction", "0"], "--tuning-fraction 0"),
])
def test_bad_sweep_flags_are_named_in_one_line(args, flag, tmp_path, capsys):
    code = main(["--offline", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "out"), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag}"), err


def test_multipliers_round_trip_through_json():
    cfg = ExperimentConfig(seeds=(42,), lr_sweep=True, lr_sweep_multipliers=(0.1, 1.0, 10.0), lr_sweep_steps=5)
    again = ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.lr_sweep_multipliers, tuple)
    assert ExperimentConfig.from_dict({"lr_sweep_multipliers": [1, 2]}).lr_sweep_multipliers == (1.0, 2.0)
    with pytest.raises(ConfigError, match="lr_sweep_multipliers"):
        ExperimentConfig.from_dict({"lr_sweep_multipliers": ["fast"]})


def test_the_sweep_never_sees_a_validation_token_and_no_training_window_a_tuning_or_validation_one(config,
                                                                                                    monkeypatch):
    """Every token is replaced by its position in the corpus (the real split's part lengths kept), so the values
    of every window the trainer evaluates or trains on say where in the corpus it came from."""
    import data.dataset
    import training.experiment

    real_prepare = training.experiment.prepare_data

    def positional(cfg: ExperimentConfig, log: Any = print) -> data.dataset.TokenData:
        loaded = real_prepare(cfg, log)
        ends = [len(loaded.train), len(loaded.train) + len(loaded.tune), len(loaded.train) + len(loaded.tune) + len(loaded.val)]
        return data.dataset.TokenData(train=torch.arange(0, ends[0]), tune=torch.arange(ends[0], ends[1]),
                                      val=torch.arange(ends[1], ends[2]), vocab_size=ends[2], info=loaded.info)

    phase = {"now": ""}
    evaluated: dict[str, list[torch.Tensor]] = {"sweep": [], "comparison": []}
    trained: list[torch.Tensor] = []

    def in_phase(name: str, train: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase["now"] = name
            return train(*args, **kwargs)
        return wrapped

    real_evaluate, real_batch = training.trainer.evaluate, training.trainer.training_batch

    def recording_evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *args: Any, **kwargs: Any):
        evaluated[phase["now"]].append(torch.cat([inputs.flatten(), targets.flatten()]))
        return real_evaluate(model, inputs, targets, *args, **kwargs)

    def recording_batch(train: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = real_batch(train, starts, seq_len)
        trained.append(torch.cat([x.flatten(), y.flatten()]))
        return x, y

    monkeypatch.setattr(training.experiment, "prepare_data", positional)
    monkeypatch.setattr(training.lr_sweep, "train_model", in_phase("sweep", training.lr_sweep.train_model))
    monkeypatch.setattr(training.runs, "train_model", in_phase("comparison", training.runs.train_model))
    monkeypatch.setattr(training.trainer, "evaluate", recording_evaluate)
    monkeypatch.setattr(training.trainer, "training_batch", recording_batch)
    cfg = config.replace(lr_sweep=True, lr_sweep_multipliers=(1.0,), lr_sweep_steps=2, max_steps=3, eval_every=3,
                         save_checkpoints=False, sample_tokens=0)
    results = run_experiment(cfg, log=lambda _: None)

    info = results["experiment"]["data"]
    train_end = info["train_tokens"]
    tune_end = train_end + info["tuning_tokens"]
    assert info["tuning_tokens"] > cfg.max_seq_len and tune_end + info["val_tokens"] == info["total_tokens"]
    sweep_seen = torch.cat(evaluated["sweep"])
    comparison_seen = torch.cat(evaluated["comparison"])
    assert len(evaluated["sweep"]) == len(cfg.arms) * 2  # every sweep run: step 0 and its end
    assert train_end <= int(sweep_seen.min()) and int(sweep_seen.max()) < tune_end  # tuning tokens only
    assert int(comparison_seen.min()) >= tune_end  # the comparison reports on validation tokens only
    assert int(torch.cat(trained).max()) < train_end  # no training window reaches the tuning or validation set
    assert results["lr_sweep"]["seed"] not in cfg.run_seeds


def test_a_winner_at_the_grids_edge_is_flagged():
    assert at_grid_edge(0.25, (0.25, 1.0, 4.0)) and at_grid_edge(4.0, (0.25, 1.0, 4.0))
    assert not at_grid_edge(1.0, (0.25, 1.0, 4.0))
    assert at_grid_edge(1.0, (1.0,))  # a one-point grid has nothing either side


def test_sweep_seed_is_never_a_reported_seed():
    assert ExperimentConfig(seeds=(42, 43, 44)).sweep_seed == 45
    assert ExperimentConfig(seeds=(7,), lr_sweep_seed=3).sweep_seed == 3
    with pytest.raises(ConfigError, match="--lr-sweep-seed 43: is one of the reported --seeds 42 43"):
        ExperimentConfig(seeds=(42, 43), lr_sweep_seed=43).validate()
    with pytest.raises(ConfigError, match="--tuning-fraction 0.9"):
        ExperimentConfig(tuning_fraction=0.9).validate()
    with pytest.raises(ConfigError, match="training, tuning and validation window"):
        ExperimentConfig(lr_sweep=True, max_tokens=2570, tuning_fraction=0.05).validate()
    ExperimentConfig(max_tokens=2570, tuning_fraction=0.05).validate()  # without a sweep the tuning part trains


def test_the_plot_names_a_winner_at_the_grids_edge(tmp_path, monkeypatch):
    import training.plots

    legends: list[list[str]] = []

    def capture(fig: Any, ax: Any, path: Path) -> None:
        ax.legend()
        legends.append([text.get_text() for text in ax.get_legend().get_texts()])

    monkeypatch.setattr(training.plots, "_finish", capture)
    runs = [{"multiplier": m, "tuning_loss": loss, "status": "completed"} for m, loss in ((0.5, 3.0), (1.0, 3.2))]
    results = {"experiment": {"config": {"preset": "test"}},
               "lr_sweep": {"tuned": True, "multipliers": [0.5, 1.0], "steps": 2, "seed": 43, "arms": {
                   "baseline": {"runs": runs, "best_multiplier": 0.5, "at_grid_edge": True, "warning": EDGE_NOTE},
                   "deepseek": {"runs": runs, "best_multiplier": 1.0, "at_grid_edge": False}}}}
    training.plots.plot_lr_sweep(results, tmp_path)
    (labels,) = legends
    assert labels[0].endswith(f"; {EDGE_NOTE}") and EDGE_NOTE not in labels[1]


def test_when_every_multiplier_diverges_the_sweep_is_saved_and_nothing_trains_at_a_diverged_lr(config, monkeypatch):
    cfg = config.replace(lr_sweep=True, lr_sweep_multipliers=(1e4, 2e4), lr_sweep_steps=3, sample_tokens=0)
    built = _capture_optimizer_lrs(monkeypatch)
    with pytest.raises(ConfigError, match=r"every multiplier \(10000 20000\) diverged for .*try smaller multipliers"):
        run_experiment(cfg, log=lambda line: None)
    written = _read(cfg)
    assert written["experiment"]["status"] == "failed"
    for name in cfg.arms:
        entry = written["lr_sweep"]["arms"][name]
        assert [run["status"] for run in entry["runs"]] == ["failed", "failed"]
        assert entry["note"] == "every sweep run diverged: no multiplier chosen" and entry["best_multiplier"] is None
        assert written[name]["runs"] == [] or all(run["status"] != "completed" for run in written[name]["runs"])
    assert all(steps == 3 for _, steps, _, _ in built)  # only sweep runs: the comparison never trained
