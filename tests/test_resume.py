"""--resume: a run stopped at step k and resumed ends bit-identical to one never stopped; finished runs are
kept, new seeds train alone; a folder holding results is never replaced silently (--resume, --overwrite)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import training.trainer as trainer_module
from arms.registry import arm_builders
from common.errors import ConfigError
from data.dataset import prepare_data
from exp6_trainer import main
from models.transformer import MoELanguageModel
from tests.conftest import tiny_config
from tests.fake_cuda import CudaOnCpu, install_fake_cuda
from training.distributed import DATA, Distributed
from training.experiment import run_experiment
from training.metrics_log import METRICS_FILE
from training.results import RESULTS_FILE
from training.resume import move_aside, prepare_output_dir
from training.train_state import STATE_DIR, TrainingState
from training.trainer import new_run_record, train_model

TIMING = ("training_seconds",)


def _curve(record: dict[str, Any]) -> dict[str, list[Any]]:
    return {key: values for key, values in record["curve"].items() if key not in TIMING}


class StopAt:
    """An on_metrics callback that raises KeyboardInterrupt (Ctrl-C) when the run reports step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, point: dict[str, Any]) -> None:
        if point["step"] == self.step:
            raise KeyboardInterrupt


def test_a_run_stopped_at_step_k_and_resumed_is_bit_identical(config, tmp_path):
    """--optimizer adamw, stopped at step 4 with the state of the evaluation at step 3: AdamW's moments and step
    counts, the LR schedule and the dropout/router-noise stream continue exactly. (Muon, MLA's fused matrices and
    a state saved inside an evaluation window: the experiment-level test below.)"""
    arm, save_every, stop_at = "baseline", 0, 4
    config = config.replace(save_every=save_every, optimizer="adamw")
    data = prepare_data(config, lambda _: None)
    device = torch.device("cpu")

    def fresh() -> tuple[MoELanguageModel, dict[str, Any]]:
        model = arm_builders()[arm](config.replace(vocab_size=data.vocab_size), seed=42)
        return model, new_run_record(arm, model, 42)

    reference, ref_record = fresh()
    train_model(reference, data, config, 42, device, ref_record)

    state = TrainingState(tmp_path / "state.pt")
    stopped, record = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_model(stopped, data, config, 42, device, record, state=state, on_metrics=StopAt(stop_at))
    saved_step = torch.load(state.path, weights_only=True)["step"]
    assert saved_step == (3 if save_every == 0 else 2)

    resumed, record = fresh()
    train_model(resumed, data, config, 42, device, record, state=TrainingState(state.path, resume=True))
    for (name, ours), theirs in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name  # bit for bit
    assert _curve(record) == _curve(ref_record)
    assert record["resumed_at_steps"] == [saved_step] and record["val_loss"] == ref_record["val_loss"]


def _count_steps(monkeypatch: pytest.MonkeyPatch, stop_at_call: int | None = None) -> list[int]:
    """Count optimizer steps (and stop with Ctrl-C at the given one)."""
    calls: list[int] = []
    step = trainer_module.training_step

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == stop_at_call:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", counted)
    return calls


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_resume_keeps_finished_runs_continues_the_stopped_one_and_trains_only_new_seeds(tmp_path, monkeypatch):
    """Muon (with MLA's fused matrices split into blocks) and a state saved inside an evaluation window: 6 steps
    per run, evaluations at 3 and 6, states at 2 and 4."""
    config = tiny_config(tmp_path, sample_tokens=0, save_every=2)
    reference = run_experiment(config.replace(output_dir=str(tmp_path / "reference")), log=lambda _: None)

    lines: list[str] = []
    _count_steps(monkeypatch, stop_at_call=6 + 5)  # the second run (deepseek), at its 5th step: the state of step 4
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, log=lines.append)
    out = Path(config.output_dir)
    assert lines[-1] == (f"Interrupted: 1 completed run(s) are saved in {out / RESULTS_FILE}; "
                         "rerun with --resume to continue from the last training state")
    assert sorted(p.name for p in (out / STATE_DIR).iterdir()) == ["deepseek-seed42.pt"]  # the finished run's is gone

    calls = _count_steps(monkeypatch)
    resumed = run_experiment(config, log=lines.append, resume=True)
    assert len(calls) == 2  # baseline kept; deepseek's steps 5 and 6 only
    for arm in ("baseline", "deepseek"):
        ours, theirs = resumed[arm]["runs"][0], reference[arm]["runs"][0]
        assert _curve(ours) == _curve(theirs) and ours["val_loss"] == theirs["val_loss"], arm
        ours_w, theirs_w = (_weights(Path(d) / "checkpoints" / f"{arm}-seed42") for d in (out, tmp_path / "reference"))
        assert all(torch.equal(ours_w[name], theirs_w[name]) for name in theirs_w), arm
    assert resumed["experiment"]["status"] == "completed" and len(resumed["experiment"]["resumed_at"]) == 1
    assert not (out / STATE_DIR).exists()  # deleted once the run completed, and the folder with the last one
    logged = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    keys = [(line["arm"], line["kind"], line["step"]) for line in logged]
    assert len(keys) == len(set(keys))  # the steps logged before the stop, after the saved state, were dropped
    assert [line["val_loss"] for line in logged if line["arm"] == "deepseek" and line["kind"] == "eval"] == \
        resumed["deepseek"]["runs"][0]["curve"]["val_loss"]

    calls.clear()
    more = run_experiment(config.replace(seeds=(42, 43), keep_training_state=True), log=lines.append, resume=True)
    assert len(calls) == 2 * 6  # seed 43's two runs, nothing else
    kept = sorted((out / STATE_DIR).iterdir())
    assert [p.name for p in kept] == ["baseline-seed43.pt", "deepseek-seed43.pt"]  # --keep-training-state
    assert all(torch.load(p, weights_only=True)["step"] == 6 for p in kept)  # the state at the end
    assert more["baseline"]["seeds_completed"] == [42, 43]
    assert more["baseline"]["runs"][0] == resumed["baseline"]["runs"][0]


def test_a_stop_before_any_run_finished_says_so(tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path)
    _count_steps(monkeypatch, stop_at_call=2)
    code = main(["--config", _config_file(config, tmp_path), "--output-dir", config.output_dir])
    assert code == 130
    captured = capsys.readouterr()
    assert (f"Interrupted: no run had finished (the settings are saved in {Path(config.output_dir) / RESULTS_FILE}); "
            "rerun with --resume") in captured.out
    assert captured.err.strip().splitlines()[-1] == "Stopped by Ctrl-C."
    assert "runs that finished" not in captured.out + captured.err


def _config_file(config: Any, tmp_path: Path) -> str:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def _fake_results(directory: Path, config: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_FILE
    path.write_text(json.dumps({"experiment": {"config": config.to_dict(), "status": "completed"}}))
    return path


@pytest.mark.parametrize("how", ["rerun", "config of its own results"])
def test_a_folder_holding_results_is_refused_without_resume(tmp_path, capsys, how):
    config = tiny_config(tmp_path)
    results = _fake_results(Path(config.output_dir), config)
    before = results.read_text()
    args = (["--config", str(results)] if how == "config of its own results"  # its output_dir points back here
            else ["--config", _config_file(config, tmp_path), "--output-dir", config.output_dir])
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {config.output_dir} already holds results"), err
    assert "--resume" in err[0] and "fresh --output-dir" in err[0] and "--overwrite" in err[0]
    assert results.read_text() == before


def test_overwrite_moves_the_old_results_aside_and_deletes_nothing(tmp_path):
    folder = tmp_path / "out"
    _fake_results(folder, tiny_config(tmp_path))
    (folder / "checkpoints" / "baseline-seed42").mkdir(parents=True)
    (folder / "checkpoints" / "baseline-seed42" / "model.safetensors").write_bytes(b"weights")
    (folder / ".exp6.lock").write_text("")
    (folder / "notes.txt").write_text("mine")
    lines: list[str] = []
    assert prepare_output_dir(folder, resume=False, overwrite=True, log=lines.append) is None
    aside = next(p for p in tmp_path.iterdir() if p.name.startswith("out-old-"))
    assert (aside / RESULTS_FILE).is_file() and (aside / "checkpoints/baseline-seed42/model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in folder.iterdir()) == [".exp6.lock", "notes.txt"]  # the lock this run holds stays
    assert str(aside) in lines[0]
    assert move_aside(folder).name.startswith("out-old-")  # a second one in the same second gets its own name



@pytest.mark.parametrize("text, why", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                       ('{"experiment": {"config": 1' + "9" * 5_000 + "}}", "digits"),
                                       (b"\xff\xfe", "not UTF-8 text")])
def test_a_results_file_that_is_not_usable_json_is_refused_in_words(text, why, tmp_path):
    """--resume reads the folder's results JSON within safe_json's limits: hostile text is a ConfigError, not a traceback."""
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / RESULTS_FILE
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"^--resume: cannot read {re.escape(str(path))} \\(JSONInputError: .*{why}"):
        prepare_output_dir(folder, resume=True, overwrite=False, log=lambda _: None)

def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path):
    config = tiny_config(tmp_path)
    _fake_results(Path(config.output_dir), config)
    with pytest.raises(ConfigError) as error:
        run_experiment(config.replace(d_model=64, muon_lr=0.02, seeds=(42, 43)), resume=True, log=lambda _: None)
    message = str(error.value)
    assert "d_model: 32 saved, 64 now" in message and "muon_lr: 0.01 saved, 0.02 now" in message
    assert "seeds" not in message  # which runs there are may change


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert main(["--resume", "--overwrite", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--resume and --overwrite together" in capsys.readouterr().err


def test_the_resume_cli_continues_with_the_saved_settings(tmp_path):
    """`--resume` alone: the settings come from the folder's results, so nothing has to be repeated."""
    from exp6_trainer import build_parser, resolve_config

    config = tiny_config(tmp_path, seeds=(3, 4), max_steps=5)
    _fake_results(Path(config.output_dir), config)
    resumed, _ = resolve_config(build_parser().parse_args(["--resume", "--output-dir", config.output_dir]), False)
    assert resumed == config
    more, _ = resolve_config(build_parser().parse_args(["--resume", "--output-dir", config.output_dir, "--seeds", "3", "4", "5"]), False)
    assert more == config.replace(seeds=(3, 4, 5))


def test_the_cuda_random_stream_is_saved_and_restored(monkeypatch, config, tmp_path):
    calls = install_fake_cuda(monkeypatch)
    config = config.replace(device="cuda", max_steps=4, eval_every=2)
    data = prepare_data(config, lambda _: None)
    cuda = torch.device("cuda")
    with CudaOnCpu():
        model = arm_builders()["baseline"](config.replace(vocab_size=data.vocab_size), seed=1)
        state = TrainingState(tmp_path / "state.pt")
        with pytest.raises(KeyboardInterrupt):
            train_model(model, data, config, 1, cuda, new_run_record("baseline", model, 1), state=state, on_metrics=StopAt(4))
        assert calls.rng_reads == [cuda]  # saved at the evaluation of step 2
        model = arm_builders()["baseline"](config.replace(vocab_size=data.vocab_size), seed=1)
        train_model(model, data, config, 1, cuda, new_run_record("baseline", model, 1), state=TrainingState(state.path, True))
    (restored, device), = calls.rng_writes
    assert torch.equal(restored, torch.arange(16, dtype=torch.uint8)) and device == cuda


def test_data_parallel_ranks_keep_their_own_random_streams(monkeypatch, config, tmp_path):
    """Rank 0 writes one file holding every rank's stream; each rank restores its own."""
    streams = [{"cpu": torch.Generator().manual_seed(rank).get_state()} for rank in range(2)]
    monkeypatch.setattr(Distributed, "gather", lambda self, obj: list(streams))
    model = arm_builders()["baseline"](config.replace(vocab_size=64), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from training.train_state import ResumePoint

    point = ResumePoint(step=2, training_seconds=1.0, loss_sum=torch.tensor(0.5), steps_in_window=1)
    record = new_run_record("baseline", model, 0)
    for rank in (1, 0):  # rank 1 writes nothing
        TrainingState(tmp_path / "s.pt").save(point, model, [optimizer], [], record, "b", torch.device("cpu"),
                                              Distributed(rank=rank, world_size=2, mode=DATA))
        assert (tmp_path / "s.pt").exists() == (rank == 0)
    TrainingState(tmp_path / "s.pt", resume=True).restore(model, [optimizer], [], record, "b", torch.device("cpu"),
                                                          Distributed(rank=1, world_size=2, mode=DATA))
    assert torch.equal(torch.get_rng_state(), streams[1]["cpu"])
    with pytest.raises(ConfigError, match="written by 2 data-parallel rank"):
        TrainingState(tmp_path / "s.pt", resume=True).restore(model, [optimizer], [], record, "b", torch.device("cpu"))
