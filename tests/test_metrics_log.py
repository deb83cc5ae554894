"""Live curves: metrics.jsonl, TensorBoard event files and Weights & Biases get the values the results JSON holds."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from exp6_trainer import main
from tests.conftest import tiny_config
from training.experiment import run_experiment
from training.metrics_log import METRICS_FILE, TENSORBOARD_DIR, MetricsLog


class RecordedRun:
    """What one wandb run was told: its init arguments, every log call, whether it finished."""

    def __init__(self, init: dict[str, Any]) -> None:
        self.init = init
        self.logs: list[tuple[int, dict[str, Any]]] = []
        self.finished = False

    def log(self, values: dict[str, Any], step: int) -> None:
        self.logs.append((step, values))

    def finish(self) -> None:
        self.finished = True


class WandbRecorder:
    """Stands in for the wandb client (wandb.init returns a run with log and finish)."""

    def __init__(self) -> None:
        self.runs: list[RecordedRun] = []

    def init(self, **kwargs: Any) -> RecordedRun:
        self.runs.append(RecordedRun(kwargs))
        return self.runs[-1]


def _fake_wandb(monkeypatch: pytest.MonkeyPatch) -> WandbRecorder:
    recorder = WandbRecorder()
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = recorder.init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return recorder


def _lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


def test_jsonl_tensorboard_and_wandb_hold_the_jsons_curves(tmp_path, monkeypatch):
    recorder = _fake_wandb(monkeypatch)
    config = tiny_config(tmp_path, tensorboard=True, wandb_project="exp6-test", save_checkpoints=False, sample_tokens=0)
    results = run_experiment(config, log=lambda _: None)
    out = Path(config.output_dir)
    lines = _lines(out)
    assert len(recorder.runs) == 2 and all(run.finished for run in recorder.runs)
    for arm in ("baseline", "deepseek"):
        curve = results[arm]["runs"][0]["curve"]
        evals = [line for line in lines if line["arm"] == arm and line["kind"] == "eval"]
        assert [e["step"] for e in evals] == curve["step"] == [0, 3, 6]
        assert [e["val_loss"] for e in evals] == curve["val_loss"] and [e["train_loss"] for e in evals] == curve["train_loss"]
        assert [e["tokens"] for e in evals] == curve["tokens_seen"] and [e["seconds"] for e in evals] == curve["training_seconds"]
        steps = [line for line in lines if line["arm"] == arm and line["kind"] == "step"]
        assert [s["step"] for s in steps] == [2, 4] and all(s["val_loss"] is None and s["seed"] == 42 for s in steps)

        events = EventAccumulator(str(out / TENSORBOARD_DIR / f"{arm}-seed42"))
        events.Reload()
        val = events.Scalars("loss/val")
        assert [e.step for e in val] == curve["step"]
        assert [e.value for e in val] == pytest.approx(curve["val_loss"], rel=1e-6)  # stored as float32
        by_time = events.Scalars("loss_vs_training_ms/val")
        assert [e.step for e in by_time] == [round(s * 1000) for s in curve["training_seconds"]]
        train = {e.step: e.value for e in events.Scalars("loss/train")}
        assert sorted(train) == [2, 3, 4, 6]  # logged steps and evaluations (step 0 has no train loss)
        assert train[6] == pytest.approx(curve["train_loss"][-1], rel=1e-6)
        assert any(tag.startswith("config") for tag in events.Tags()["tensors"])  # the config as text

        recorded = next(r for r in recorder.runs if r.init["name"] == f"{arm}-seed42")
        assert recorded.init["project"] == "exp6-test" and recorded.init["config"]["d_model"] == config.d_model
        logged = {step: values for step, values in recorded.logs if "loss/val" in values}
        assert sorted(logged) == curve["step"] and [logged[s]["loss/val"] for s in curve["step"]] == curve["val_loss"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed here (the recorder test covers the calls)")
def test_wandb_offline_writes_one_run_per_arm_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tiny_config(tmp_path, wandb_project="exp6-test"), tmp_path)
    for seed in (1, 2):
        run = log.run("baseline", seed)
        run({"step": 0, "tokens": 0, "seconds": 0.0, "train_loss": None, "val_loss": 5.5, "val_accuracy": 0.1})
        run({"step": 2, "tokens": 128, "seconds": 0.5, "train_loss": 5.0})
        run.close()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 2 and all(path.stat().st_size > 0 for path in offline_runs)


def test_wandb_not_installed_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as without the package
    out = tmp_path / "out"
    code = main(["--offline", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(out), "--wandb", "proj"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --wandb proj: wandb is not installed"), err
    assert not (out / METRICS_FILE).exists()


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Lines written after the last saved state, before a stop, give way to the resumed run's."""
    config = tiny_config(tmp_path)
    log = MetricsLog(config, tmp_path)
    first = log.run("baseline", 42)
    for step in (0, 2, 3, 4):
        first({"step": step, "tokens": step, "seconds": step / 10, "train_loss": 1.0, **({"val_loss": 2.0} if step in (0, 3) else {})})
    first.close()  # stopped at step 4; the state saved at step 3
    other = log.run("deepseek", 42)
    other({"step": 4, "tokens": 4, "seconds": 0.4, "train_loss": 1.0})
    other.close()
    again = log.run("baseline", 42)
    for step in (4, 6):
        again({"step": step, "tokens": step, "seconds": step / 10, "train_loss": 0.5, **({"val_loss": 1.5} if step == 6 else {})})
    again.close()
    steps = [(line["arm"], line["step"], line["train_loss"]) for line in _lines(tmp_path)]
    assert steps == [("baseline", 0, 1.0), ("baseline", 2, 1.0), ("baseline", 3, 1.0), ("deepseek", 4, 1.0),
                     ("baseline", 4, 0.5), ("baseline", 6, 0.5)]
