"""Runs that are stopped or run side by side keep a truthful record and lose nothing.

- One run at a time per output folder: a second one stops before loading data, naming the first one's pid.
- Ctrl-C and SIGTERM leave a JSON that says "interrupted" / "terminated" with finished_at set, and the run
  in progress is listed as interrupted, not failed.
- Plots are saved through temporary files of their own, so two runs saving into one folder do not collide.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import matplotlib
import matplotlib.image
import pytest
import torch
from matplotlib.figure import Figure

from arms.registry import arm_builders
from common.errors import ConfigError
from config.settings import ExperimentConfig
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_flash_attention_model import FlashAttentionModel
from exp6_trainer import main
from models.attention import KVCache
from models.transformer import ModelBuilder, MoELanguageModel
from training import plots
from training.experiment import run_experiment
from training.results import RESULTS_FILE, summarise_model
from training.run_guard import LOCK_FILE, RunTerminated

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parent.parent


def _read_results(config: ExperimentConfig) -> dict[str, Any]:
    return json.loads((Path(config.output_dir) / RESULTS_FILE).read_text())


def _lock_is_free(directory: Path) -> bool:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# --- seeds by outcome --------------------------------------------------------------------------------

def _record(seed: int, status: str) -> dict[str, Any]:
    return {"model_name": "deepseek", "seed": seed, "status": status, "val_loss": 1.0 if status == "completed" else None,
            "val_accuracy": 0.5 if status == "completed" else None, "val_perplexity": None}


def test_summary_lists_failed_and_interrupted_seeds_apart():
    runs = [_record(1, "completed"), _record(2, "failed"), _record(3, "interrupted"), _record(4, "terminated")]
    summary = summarise_model(runs, None)
    assert summary["seeds_completed"] == [1]
    assert summary["seeds_failed"] == [2]  # a NaN or a crash says something about the run
    assert summary["seeds_interrupted"] == [3, 4]  # Ctrl-C / SIGTERM say nothing about the model


# --- Ctrl-C and SIGTERM inside run_experiment --------------------------------------------------------

class _StopsTraining(FlashAttentionModel):
    """Stops the run from outside at its 5th training forward pass (the warm-up is the 1st), i.e. at step 3."""

    def stop(self) -> None:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().forward(input_ids, caches, last_only)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 5:
                self.stop()
        return out


class _CtrlC(_StopsTraining):
    def stop(self) -> None:
        raise KeyboardInterrupt


class _Sigterm(_StopsTraining):
    def stop(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this (the main) thread


def _check_stopped_run(config: ExperimentConfig, status: str) -> None:
    written = _read_results(config)
    experiment = written["experiment"]
    assert experiment["status"] == status and experiment["finished_at"] is not None
    baseline, deepseek = written["baseline"], written["deepseek"]
    assert baseline["runs"][0]["status"] == "completed" and baseline["seeds_completed"] == [config.seed]
    assert baseline["val_loss"] is not None  # what finished is kept
    assert deepseek["runs"][0]["status"] == status
    assert deepseek["runs"][0]["curve"]["step"] == [0, 3]  # the partial curve is kept too
    assert deepseek["seeds_interrupted"] == [config.seed] and deepseek["seeds_failed"] == []
    assert _lock_is_free(Path(config.output_dir))  # released on the way out


def test_ctrl_c_is_recorded_as_interrupted_not_failed(config):
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt) as stop:
        run_experiment(config, builders={**arm_builders(), "deepseek": _CtrlC}, log=lines.append)
    assert not isinstance(stop.value, RunTerminated)
    _check_stopped_run(config, "interrupted")
    assert any(line.startswith("Interrupted") and RESULTS_FILE in line for line in lines)


def test_sigterm_is_recorded_as_terminated_and_the_old_handler_comes_back(config):
    received: list[int] = []

    def outer_handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)  # reached only if run_experiment did not handle SIGTERM itself

    previous = signal.signal(signal.SIGTERM, outer_handler)
    try:
        lines: list[str] = []
        with pytest.raises(RunTerminated):
            run_experiment(config, builders={**arm_builders(), "deepseek": _Sigterm}, log=lines.append)
        assert received == []
        assert signal.getsignal(signal.SIGTERM) is outer_handler  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    _check_stopped_run(config, "terminated")
    assert any("SIGTERM" in line and RESULTS_FILE in line for line in lines)


@pytest.mark.parametrize("stop,code,words", [(KeyboardInterrupt(), 130, "Ctrl-C"), (RunTerminated(), 143, "SIGTERM")])
def test_main_exits_130_for_ctrl_c_and_143_for_sigterm_with_one_line(stop, code, words, monkeypatch, tmp_path, capsys):
    import training.experiment

    def stopped(config: ExperimentConfig, builders: object = None, **options: object) -> None:
        raise stop

    monkeypatch.setattr(training.experiment, "run_experiment", stopped)
    assert main(["--output-dir", str(tmp_path)]) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"Stopped by {words}."]  # nothing was saved here, so no line may claim results (the experiment
    # itself says what it saved: test_sigterm_is_recorded_as_terminated_and_the_old_handler_comes_back above)


def _cli(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "exp6_trainer.py", "--offline", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "out"), *args]


# one thread so that a busy machine slows the run down rather than stalling it
CLI_ENV = {"HF_HUB_OFFLINE": "1", "PATH": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_sigterm_to_the_real_cli_leaves_a_truthful_json(tmp_path):
    """`timeout` or a scheduler sends SIGTERM mid-training: exit 143, and the JSON says what happened."""
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    long_run = ("--steps", "400", "--seq-len", "32", "--batch-size", "4", "--max-tokens", "20000",
                "--num-documents", "40", "--seeds", "7")
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(_cli(tmp_path, *long_run), cwd=REPO, stdout=out, stderr=err, env=CLI_ENV)
    try:
        deadline = time.monotonic() + 90
        while "baseline (seed 7)" not in stderr.read_text():  # the progress bar: training has started
            assert process.poll() is None, f"the run ended before it could be stopped:\n{stderr.read_text()}"
            assert time.monotonic() < deadline, "training did not start within 90 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    err_text = stderr.read_text()
    assert code == 143, err_text
    assert "Traceback" not in err_text
    assert len([line for line in err_text.splitlines() if "Stopped by SIGTERM" in line]) == 1, err_text
    written = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert written["experiment"]["status"] == "terminated" and written["experiment"]["finished_at"] is not None
    baseline = written["baseline"]
    assert [r["status"] for r in baseline["runs"]] == ["terminated"]
    assert baseline["seeds_interrupted"] == [7] and baseline["seeds_failed"] == [] and baseline["seeds_completed"] == []
    assert "Terminated by SIGTERM" in stdout.read_text()


# --- one run per output folder -----------------------------------------------------------------------

def test_a_locked_output_dir_stops_a_second_process_at_once_naming_the_pid(tmp_path):
    """This test holds the folder's lock as a running experiment would; the CLI in another process must stop."""
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # the lock is on the folder itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (out / LOCK_FILE).write_text(f"{os.getpid()}\n")
        result = subprocess.run(_cli(tmp_path, "--steps", "2", "--seq-len", "32", "--max-tokens", "20000",
                                     "--num-documents", "40"),
                                cwd=REPO, capture_output=True, text=True, timeout=120, env=CLI_ENV)
        assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the holder's pid is not overwritten
    finally:
        os.close(fd)
    assert result.returncode == 2, result.stderr
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"pid {os.getpid()}" in err[0] and "--output-dir" in err[0] and "wait" in err[0]
    assert not (out / RESULTS_FILE).exists()
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []  # stopped before loading any data:
    assert "Data:" not in result.stdout and "Offline" not in result.stdout  # nothing cached, nothing said about it


def _gated(other_done: threading.Event) -> dict[str, ModelBuilder]:
    """Builders that hold a run at its first model until the other contender has finished.

    With the lock, the other contender is refused at once and this waits for nothing. Without it,
    both runs would reach this point, wait out the timeout and then both train: the overlap that
    loses seeds, made certain instead of left to timing. The memory plan's shape-only builds (on the
    meta device, before the lock) pass at once.
    """
    def gate(builder: ModelBuilder) -> ModelBuilder:
        def build(config: ExperimentConfig, seed: int) -> MoELanguageModel:
            if torch.get_default_device().type != "meta":
                other_done.wait(timeout=5)
            return builder(config, seed=seed)
        return build

    return {"baseline": gate(BaselineAttentionModel), "deepseek": gate(FlashAttentionModel)}


def test_two_runs_on_one_folder_repeatedly_exactly_one_completes_and_keeps_all_its_seeds(config, tmp_path):
    base = config.replace(max_steps=2, eval_every=2, log_every=1)
    contenders = {"a": (11, 12), "b": (21, 22)}
    for round_ in range(4):
        config = base.replace(output_dir=str(tmp_path / "runs" / f"out{round_ % 2}"))  # a folder used before, too
        done = {name: threading.Event() for name in contenders}
        outcome: dict[str, str] = {}
        start = threading.Barrier(len(contenders))

        def contend(name: str, other: str) -> None:
            try:
                start.wait()
                run_experiment(config.replace(seeds=contenders[name]), builders=_gated(done[other]), log=lambda _: None,
                               overwrite=True)  # a folder used before holds results: the winner moves them aside
                outcome[name] = "completed"
            except ConfigError as error:
                outcome[name] = f"error: {error}"
            except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                outcome[name] = f"crashed: {type(error).__name__}: {error}"
            finally:
                done[name].set()

        threads = [threading.Thread(target=contend, args=pair) for pair in (("a", "b"), ("b", "a"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        winners = [name for name, result in outcome.items() if result == "completed"]
        assert len(winners) == 1, (round_, outcome)
        winner, loser = winners[0], next(name for name in contenders if name not in winners)
        assert outcome[loser].startswith("error: another run (pid ") and f"pid {os.getpid()}" in outcome[loser]
        assert "choose another --output-dir" in outcome[loser]
        written = _read_results(config)
        assert written["experiment"]["status"] == "completed"
        assert written["experiment"]["seeds"] == list(contenders[winner])
        for model in ("baseline", "deepseek"):
            assert written[model]["seeds_completed"] == list(contenders[winner]), (round_, model)
            assert sorted(r["seed"] for r in written[model]["runs"]) == list(contenders[winner])
        assert _lock_is_free(Path(config.output_dir))


# --- plots ---------------------------------------------------------------------------------------------

def _figure(size: tuple[float, float] = (3, 2)) -> tuple[Figure, Any]:
    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [3, 1, 2], label="curve")
    return fig, ax


def _leftovers(folder: Path, target: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p != target]


def test_two_runs_saving_one_plot_at_once_do_not_collide(tmp_path, monkeypatch):
    """Run A has written its temporary file and not yet renamed it when run B saves the same plot.

    The interleaving is forced, not left to timing: with one shared temporary name, B overwrites and
    renames A's file away and A's rename fails (FileNotFoundError); with a file each, both succeed.
    """
    target = tmp_path / plots.VAL_TIME_PLOT
    real_savefig = Figure.savefig
    a_has_saved, b_is_done = threading.Event(), threading.Event()

    def savefig(self: Figure, fname: Any, **kwargs: Any) -> None:
        real_savefig(self, fname, **kwargs)
        if threading.current_thread().name == "run A":
            a_has_saved.set()
            assert b_is_done.wait(timeout=30)

    monkeypatch.setattr(Figure, "savefig", savefig)
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            plots._finish(*_figure((3, 2)), target)
        except BaseException as error:  # noqa: BLE001 - asserted on below
            errors.append(error)
            a_has_saved.set()

    thread = threading.Thread(target=run_a, name="run A")
    thread.start()
    try:
        assert a_has_saved.wait(timeout=30)
        plots._finish(*_figure((4, 3)), target)  # run B
    finally:
        b_is_done.set()
        thread.join(timeout=30)
    assert errors == []
    assert matplotlib.image.imread(target).shape[:2] == (240, 360)  # a whole PNG: A's 3 x 2 in figure, renamed last
    assert _leftovers(tmp_path, target) == []  # no temporary file left behind


def test_a_failed_plot_save_keeps_the_old_plot_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / plots.LOSS_STEP_PLOT
    fig, ax = _figure()
    plots._finish(fig, ax, target)
    old = target.read_bytes()

    def disk_full(self: Figure, fname: Any, **kwargs: Any) -> None:
        fname.write(b"half a png")  # a file object: the temp file write_atomic opened
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    fig, ax = _figure()
    with pytest.raises(OSError, match="disk full"):
        plots._finish(fig, ax, target)
    assert target.read_bytes() == old
    assert _leftovers(tmp_path, target) == []


def _results_for_plots(data: dict[str, Any]) -> dict[str, Any]:
    run = {"model_name": "baseline", "seed": 1, "status": "completed", "val_loss": 2.0, "val_accuracy": 0.5,
           "val_perplexity": 7.4, "curve": {"step": [0, 3], "training_seconds": [0.0, 1.0], "tokens_seen": [0, 10],
                                            "train_loss": [None, 2.5], "val_loss": [3.0, 2.0], "val_accuracy": [0.1, 0.5]}}
    return {"experiment": {"config": {"preset": "cpu"}, "data": data},
            "baseline": summarise_model([run], None), "deepseek": summarise_model([{**run, "model_name": "deepseek"}], None)}


@pytest.mark.parametrize("data,expected,absent", [
    ({"offline": True, "source_label": "your file corpus.txt"}, " — cpu preset, your file corpus.txt", "offline corpus"),
    ({"offline": False, "source_label": "HuggingFaceTB/smollm-corpus"}, " — cpu preset, HuggingFaceTB/smollm-corpus", None),
    ({"offline": True}, " — cpu preset, offline corpus", None),  # older results without the label
])
def test_plot_titles_name_the_data_the_run_used(data, expected, absent, tmp_path, monkeypatch):
    titles: list[str] = []
    real_finish = plots._finish

    def record_title(fig: Figure, ax: Any, path: Path) -> None:
        titles.append(ax.get_title())
        real_finish(fig, ax, path)

    monkeypatch.setattr(plots, "_finish", record_title)
    paths = plots.plot_results(_results_for_plots(data), tmp_path)
    assert len(titles) == 2 and all(title.endswith(expected) for title in titles), titles
    assert absent is None or not any(absent in title for title in titles)
    assert all(p.exists() for p in paths)
