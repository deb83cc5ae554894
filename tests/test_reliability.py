"""Nothing finished is ever lost, and no input reaches a traceback: one test per guarantee of the README's
Reliability section (the class test over every setting and flag is tests/test_hostile_inputs.py; the
torchrun cases are in tests/test_distributed.py)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import inference.decode_benchmark as decode_benchmark
import inference.generate as generate
import training.benchmark as training_benchmark
import training.experiment as experiment
import training.ledger as ledger
import training.preflight as preflight
import training.run_outputs as run_outputs
from arms.registry import arm_builders
from common import reporting
from common.atomic_files import atomic_directory
from common.errors import ConfigError
from common.hardware import memory_capacity
from config.settings import ExperimentConfig
from data.sources import local_documents
from data.tokenizer import TOKENIZER_FILE
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_trainer import main
from models.checkpoint import CONFIG_FILE
from models.memory import MemoryNeed, check_fits
from models.transformer import MoELanguageModel
from tests.conftest import tiny_config
from tests.fake_cuda import FAKE_TOTAL_MEMORY_BYTES, install_fake_cuda
from training.experiment import run_experiment
from training.memory_plan import experiment_memory
from training.results import RESULTS_FILE
from training.run_guard import LOCK_FILE, signals_deferred

REPO = Path(__file__).resolve().parent.parent

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5_000


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the module's runs: the offline tokenizer is trained once."""
    return tmp_path_factory.mktemp("cache")


def _one_arm(tmp_path: Path, cache: Path, **changes: Any) -> ExperimentConfig:
    """The smallest experiment: the baseline arm alone, two steps (each test stays a few seconds)."""
    settings: dict[str, Any] = {"arms": ("baseline",), "max_steps": 2, "eval_every": 2, "log_every": 1,
                                "sample_tokens": 4, "cache_dir": str(cache), **changes}
    return tiny_config(tmp_path, **settings)


def _config_file(config: ExperimentConfig, tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def _read(config: ExperimentConfig) -> dict[str, Any]:
    return json.loads((Path(config.output_dir) / RESULTS_FILE).read_text())


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-2000:]
    return errors[0]


class _StopsAtStep1(BaselineAttentionModel):
    """Ctrl-C at its 3rd training forward pass (the warm-up is the 1st): training step 1."""

    def forward(self, input_ids: torch.Tensor, caches: Any = None, last_only: bool = False) -> Any:
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                raise KeyboardInterrupt
        return super().forward(input_ids, caches, last_only)


# --- 2: the run is saved when training ends; sample and checkpoint are extras ---------------------------

def test_the_run_is_on_disk_when_training_ends_and_a_failing_sample_is_recorded(token_cache, tmp_path, monkeypatch):
    config = _one_arm(tmp_path, token_cache)
    on_disk: list[dict[str, Any]] = []

    def sample_fails(*args: Any) -> dict[str, Any]:
        on_disk.append(_read(config))  # what a crash right now would leave
        raise MemoryError("the sample does not fit")

    monkeypatch.setattr(run_outputs, "greedy_sample", sample_fails)
    lines: list[str] = []
    run_experiment(config, log=lines.append)
    before_extras = on_disk[0]["baseline"]["runs"][0]
    assert before_extras["status"] == "completed" and math.isfinite(before_extras["val_loss"])
    written = _read(config)
    run = written["baseline"]["runs"][0]
    assert written["experiment"]["status"] == "completed" and run["status"] == "completed"
    assert run["sample_error"] == "MemoryError: the sample does not fit" and "sample" not in run
    assert run["checkpoint"] is not None  # the next extra still ran
    assert any("greedy sample FAILED" in line for line in lines)


def test_a_checkpoint_save_cut_short_leaves_no_half_folder(token_cache, tmp_path, monkeypatch):
    config = _one_arm(tmp_path, token_cache)

    def cut_short(model: MoELanguageModel, arm: str, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
        assert (directory / TOKENIZER_FILE).is_file()  # the tokenizer is already in the folder being built
        raise KeyboardInterrupt

    monkeypatch.setattr(run_outputs, "save_checkpoint", cut_short)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, log=lambda line: None)
    assert list((Path(config.output_dir) / "checkpoints").iterdir()) == []  # neither the folder nor its staging copy
    written = _read(config)
    assert written["experiment"]["status"] == "interrupted"
    assert written["baseline"]["runs"][0]["status"] == "completed"  # saved before the extras began


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("first")
    with pytest.raises(OSError):
        with atomic_directory(target) as staging:
            (staging / "a").write_text("second, cut short")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "a").read_text() == "first"
    with atomic_directory(target) as staging:
        (staging / "b").write_text("third")
    assert [p.name for p in target.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["model"]



def test_a_stop_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Ctrl-C after the old folder was moved aside and before the new one took its place: the old save stays."""
    from common import atomic_files
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("first")
    real_replace, calls = os.replace, []

    def replace_then_stop(source, destination):
        calls.append(source)
        if len(calls) == 2:  # the first moved the old folder aside; the second would put the new one in place
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(atomic_files.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as staging:
            (staging / "a").write_text("second")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "a").read_text() == "first"

# --- 3: a full disk --------------------------------------------------------------------------------------

def test_a_full_disk_for_the_results_prints_them_and_stops_in_one_line(token_cache, tmp_path, monkeypatch, capsys):
    config = _one_arm(tmp_path, token_cache)
    real_write = reporting.write_atomic
    writes: list[Path] = []

    def disk_full_for_results(path: Path, write: Callable[[Any], object], binary: bool = True) -> None:
        if path.name == RESULTS_FILE:
            writes.append(path)
        if len(writes) < 2:  # the settings, saved at the start, fit; the disk is full when the first run ends
            return real_write(path, write, binary)

        def half(file: Any) -> None:
            file.write('{"experiment": {"half')
            raise OSError(errno.ENOSPC, "No space left on device")

        return real_write(path, half, binary)

    monkeypatch.setattr(reporting, "write_atomic", disk_full_for_results)
    assert main(["--config", _config_file(config, tmp_path)]) == 1
    captured = capsys.readouterr()
    error = _one_error_line(captured.err)
    assert error.startswith(f"error: cannot write the results to {Path(config.output_dir) / RESULTS_FILE} "
                            "(No space left on device); the results so far are printed above")
    printed = json.loads(captured.out[captured.out.index('{\n  "experiment"'):])
    assert printed["baseline"]["runs"][0]["status"] == "completed"  # the finished run is not lost
    left = {p.name for p in Path(config.output_dir).iterdir()}
    assert not any(name.endswith(".tmp") for name in left)  # no partial or temporary file
    assert json.loads((Path(config.output_dir) / RESULTS_FILE).read_text())["baseline"]["runs"] == []  # the last whole file


def test_a_full_disk_for_the_token_cache_stops_in_one_line(tmp_path, monkeypatch, capsys):
    config = _one_arm(tmp_path, tmp_path / "cache")  # a cache of its own: it must be written

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    assert main(["--config", _config_file(config, tmp_path)]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert "cannot write the token cache" in error and "No space left on device" in error and "--cache-dir" in error
    assert list(Path(config.cache_dir).iterdir()) == []  # no partial file, no temp file


# --- 4: the lock ------------------------------------------------------------------------------------------

def test_deleting_the_lock_file_does_not_let_a_second_run_in(token_cache, tmp_path, capsys):
    """Run A trains; its .exp6.lock is deleted; run B on the same folder must still be refused."""
    config = _one_arm(tmp_path, token_cache, seeds=(1,))
    a_is_training, b_has_tried = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def gated(config: ExperimentConfig, seed: int) -> MoELanguageModel:
        model = BaselineAttentionModel(config, seed=seed)
        if not model.embed.weight.is_meta:  # the model A trains (not the shapes its memory plan measured)
            a_is_training.set()
            assert b_has_tried.wait(timeout=60)
        return model

    def run_a() -> None:
        try:
            outcome["a"] = run_experiment(config, builders={"baseline": gated}, log=lambda line: None)
        except BaseException as error:  # noqa: BLE001 - asserted on below
            outcome["a"] = error

    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        assert a_is_training.wait(timeout=60)
        (Path(config.output_dir) / LOCK_FILE).unlink()
        code = main(["--config", _config_file(config.replace(seeds=(2,)), tmp_path)])
        err = capsys.readouterr().err  # before A goes on (its progress bar shares stderr)
    finally:
        b_has_tried.set()
        thread.join(timeout=120)
    assert code == 2
    assert "another run (pid unknown) is writing results to" in _one_error_line(err)
    assert isinstance(outcome["a"], dict)  # A finished, with its own seed only
    assert _read(config)["baseline"]["seeds_completed"] == [1]


# --- 5: a second Ctrl-C during the final save --------------------------------------------------------------

def test_a_second_ctrl_c_during_the_final_save_does_not_cut_it_short(token_cache, tmp_path, monkeypatch):
    config = _one_arm(tmp_path, token_cache)
    real_save = ledger.write_json_atomic
    seconds: list[str] = []

    def second_ctrl_c(path: Path, payload: dict[str, Any]) -> None:
        if payload["experiment"]["status"] == "interrupted":
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C, as the final save begins
            time.sleep(0.05)
            seconds.append("sent")
        real_save(path, payload)

    monkeypatch.setattr(ledger, "write_json_atomic", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, builders={"baseline": _StopsAtStep1}, log=lambda line: None)
    assert seconds == ["sent"]
    written = _read(config)
    assert written["experiment"]["status"] == "interrupted" and written["experiment"]["finished_at"] is not None
    assert written["baseline"]["runs"][0]["status"] == "interrupted"  # the stopped run is recorded
    assert written["baseline"]["seeds_interrupted"] == [config.seed]


def test_a_signal_during_a_deferred_save_is_raised_after_it():
    # Python's own Ctrl-C handler, whatever an earlier test in this worker left installed (a library's import may
    # put its own): the redelivered signal then raises KeyboardInterrupt, as in the trainer's process
    signal.signal(signal.SIGINT, signal.default_int_handler)
    done: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("saved")  # not cut short
    assert done == ["saved"]
    with signals_deferred(redeliver=False):  # the stop handler's own save: already stopping, the signal is dropped
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- 8, 9: sense and size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"rope_base": 0.0}, "rope_base=0.0 must be greater than 1"),
    ({"rope_base": math.nan}, "rope_base=nan: must be a finite number"),
    ({"muon_lr": math.inf}, "muon_lr=inf: must be a finite number"),
    ({"load_balancing_weight": math.nan}, "load_balancing_weight=nan: must be a finite number"),
    ({"router_noise_std": math.inf}, "router_noise_std=inf: must be a finite number"),
    ({"offline_vocab_size": 0}, "offline_vocab_size=0: must be at least 257"),
    ({"dist_timeout_minutes": 1e308}, r"--dist-timeout 1e\+308: must be a positive number of minutes, at most 43200"),
    ({"seeds": (42, 2**63)}, "out of range"),
    ({"seeds": (42, 2**63 - 1), "seed": -1}, "seed -1: a seed must be between 0 and 2\\*\\*63 - 1"),
    ({"data_path": ""}, "data_path='': must be a non-empty string"),
    ({"output_dir": ""}, "output_dir='': must be a non-empty string"),
    ({"num_experts": 100_000, "expert_top_k": 1}, "at most 100,000 expert modules"),
])
def test_settings_without_sense_are_refused(change, words):
    with pytest.raises(ConfigError, match=words):
        ExperimentConfig(**change).validate()


@pytest.mark.parametrize("flags", [["--data", ""], ["--output-dir", ""], ["--dist-timeout", "1e308"]])
def test_empty_and_odd_flags_exit_2_in_one_line(token_cache, flags, tmp_path, capsys):
    assert main(["--config", _config_file(_one_arm(tmp_path, token_cache), tmp_path), *flags]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith("error: ")


def test_an_arm_without_a_completed_run_fails_the_experiment_with_a_nonzero_exit(token_cache, tmp_path, capsys):
    config = _one_arm(tmp_path, token_cache, load_balancing_weight=1e39)  # finite, yet above float32: every loss is inf
    assert main(["--config", _config_file(config, tmp_path)]) == 1
    assert "no run of baseline completed" in _one_error_line(capsys.readouterr().err)
    assert _read(config)["experiment"]["status"] == "failed"


def test_a_run_larger_than_the_machine_is_refused_before_anything_is_allocated(tmp_path, capsys):
    config = _one_arm(tmp_path, tmp_path / "cache")
    assert main(["--config", _config_file(config, tmp_path), "--batch-size", "100000000"]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert error.startswith("error: needs ~") and ", this machine has " in error and "(available RAM): activations" in error
    assert not Path(tmp_path / "cache").exists()  # nothing loaded, nothing cached


def test_the_published_experiment_fits_its_reference_card(monkeypatch):
    """The estimate must not refuse what it is for: the full experiment on an RTX 4090 (24 GiB, tests/fake_cuda.py)."""
    install_fake_cuda(monkeypatch)
    need = experiment_memory(ExperimentConfig(), arm_builders())
    assert sum(need.device.values()) < FAKE_TOTAL_MEMORY_BYTES



class _PastTheMemoryCheck(Exception):
    """Raised where the experiment header is built: the run got past its memory checks (nothing is trained)."""


@pytest.mark.parametrize("planned_vocab, estimates", [(None, 1), (10, 2)])
def test_the_memory_is_estimated_again_only_for_a_larger_vocabulary(planned_vocab, estimates, token_cache, tmp_path,
                                                                    monkeypatch):
    """Preflight plans for the largest vocabulary the tokenizer could have; once the data is loaded the estimate
    (which counts that data again) runs again only when the real vocabulary is larger: here the offline
    tokenizer's, at most its planned 300, unless the plan is made smaller (10)."""
    configs: list[ExperimentConfig] = []

    def counted(config: ExperimentConfig, *args: Any) -> MemoryNeed:
        configs.append(config)
        return experiment_memory(config, *args)

    def stop(*args: Any) -> None:
        raise _PastTheMemoryCheck

    monkeypatch.setattr(preflight, "experiment_memory", counted)
    monkeypatch.setattr(experiment, "experiment_header", stop)
    if planned_vocab is not None:
        monkeypatch.setattr(experiment, "planned_vocab_size", lambda config: planned_vocab)
    config = _one_arm(tmp_path, token_cache)
    with pytest.raises(_PastTheMemoryCheck):
        run_experiment(config, log=lambda line: None)
    assert len(configs) == estimates and configs[0].vocab_size is None  # preflight's, before the tokenizer
    if estimates == 2:
        assert configs[1].vocab_size is not None and 10 < configs[1].vocab_size <= config.offline_vocab_size

def test_on_cuda_the_card_and_the_ram_are_checked_apart(monkeypatch):
    """The CUDA branch of the memory check, driven on the CPU: device parts against the card, host parts against RAM."""
    install_fake_cuda(monkeypatch, name="NVIDIA GeForce RTX 4090")
    cuda = torch.device("cuda")
    assert memory_capacity(cuda) == (FAKE_TOTAL_MEMORY_BYTES, "NVIDIA GeForce RTX 4090's memory")
    check_fits(MemoryNeed(device={"activations": 20 * 10**9}, host={"documents": 10**6}), cuda, "advice")
    with pytest.raises(ConfigError, match=r"^needs ~30.0 GB, this machine has 25.8 GB \(NVIDIA GeForce RTX 4090's "
                                          r"memory\): activations 30.0 GB; lower it$"):
        check_fits(MemoryNeed(device={"activations": 30 * 10**9}), cuda, "lower it")
    with pytest.raises(ConfigError, match=r"\(available RAM\): documents"):
        check_fits(MemoryNeed(device={"activations": 1}, host={"documents": 10**18}), cuda, "lower it")


MEASURE_A_STEP = """
import json, sys
from pathlib import Path
import torch
sys.path[:0] = ["tests", "."]
from conftest import tiny_config
from exp6_baseline_attention_model import BaselineAttentionModel
from models.memory import shape_only_model, training_activation_bytes
from training.optim import build_optimizers, build_schedulers
from training.trainer import prepare_model, training_step

def kib(key):
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(key)).split()[1]) * 1024

config = tiny_config(Path("."), vocab_size=4096, d_model=64, d_ff=256, n_layers=1, batch_size=8, max_seq_len=128)
cpu = torch.device("cpu")
model = BaselineAttentionModel(config, seed=0)
prepare_model(model, config, cpu, "fp32")
optimizers = build_optimizers(model, config, cpu)
schedulers = build_schedulers(optimizers, config)
x = torch.randint(0, 4096, (8, 128))
training_step(model, optimizers, schedulers, x, x, config, cpu, "fp32")  # optimizer state and caches exist
Path("/proc/self/clear_refs").write_text("5")  # the peak back to the current resident size
before = kib("VmRSS")
training_step(model, optimizers, schedulers, x, x, config, cpu, "fp32")
print(json.dumps({"added": kib("VmHWM") - before,
                  "estimate": training_activation_bytes(shape_only_model(BaselineAttentionModel, config), 8, 128)}))
"""


def test_the_estimate_covers_a_measured_training_step():
    """On the CPU, the activation estimate is at least what a training step really adds to the process's
    resident memory at its peak (Linux: VmHWM, reset through /proc/self/clear_refs): it may refuse too much,
    never too little. Measured in a fresh process: a test worker's heap, warm from earlier tests, reuses freed
    pages, so its peak need not rise at all."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    done = subprocess.run([sys.executable, "-c", MEASURE_A_STEP], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["added"] > 0
    assert measured["estimate"] >= measured["added"]


# --- 10: hostile files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, words", [(DEEP, "nested too deeply"), ('{"d_model": ' + HUGE_INT + "}", "5,000 digits")])
def test_a_hostile_config_file_is_one_error_line(content, words, tmp_path, capsys):
    path = tmp_path / "hostile.json"
    path.write_text(content)
    assert main(["--config", str(path)]) == 2
    assert words in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("line, words", [('{"text": ' + DEEP + "}", "line 2: nested too deeply"),
                                         ('{"text": "x", "id": ' + HUGE_INT + "}", "line 2: a number with 5,000 digits")])
def test_a_hostile_data_line_names_the_file_and_line(line, words, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=words):
        local_documents(str(path), ExperimentConfig())


def _copy(saved_model: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(saved_model, folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    edited = edit(meta)
    (folder / CONFIG_FILE).write_text(edited if isinstance(edited, str) else json.dumps(meta))
    return folder


@pytest.mark.parametrize("edit, words", [
    (lambda meta: DEEP, "nested too deeply"),
    (lambda meta: meta["config"].update(d_model=int(HUGE_INT[:90])), "out of range"),
    (lambda meta: meta["extra"].pop("tokenizer"), "names no tokenizer"),
    (lambda meta: meta["extra"]["tokenizer"].update(file="../../../etc/passwd"), "is not a file inside"),
])
def test_a_hostile_checkpoint_is_one_error_line(edit, words, saved_model, tmp_path, capsys):
    folder = _copy(saved_model, tmp_path, edit)
    assert generate.main(["--checkpoint", str(folder), "--prompt", "The", "--max-new-tokens", "2"]) == 2
    assert words in _one_error_line(capsys.readouterr().err)


def test_a_tokenizer_link_that_leads_out_of_the_folder_is_refused(saved_model, tmp_path, capsys):
    folder = _copy(saved_model, tmp_path, lambda meta: None)
    outside = tmp_path / "someone_elses_tokenizer.json"
    (folder / TOKENIZER_FILE).rename(outside)
    (folder / TOKENIZER_FILE).symlink_to(outside)
    assert generate.main(["--checkpoint", str(folder), "--prompt", "The", "--max-new-tokens", "2"]) == 2
    assert "is not a file inside" in _one_error_line(capsys.readouterr().err)


# --- 11: empty and odd values in the other command lines ----------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--prompt", ""], "--prompt '': must be non-empty"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["--seed", "1" * 23], "--seed 11111111111111111111111: out of range"),
    (["--max-new-tokens", str(10**12)], "needs ~"),
])
def test_generate_refuses_odd_values_in_one_line(flags, words, saved_model, capsys):
    assert generate.main(["--checkpoint", str(saved_model), "--prompt", "The", *flags]) == 2
    assert words in _one_error_line(capsys.readouterr().err)


def _never_measure(plan: Any) -> dict[str, Any]:
    raise AssertionError("the arguments should have been refused before the first row")


@pytest.mark.parametrize("flags, words", [
    (["--memory-budget-gb", "inf"], "--memory-budget-gb inf: must be a finite number"),
    (["--seed", "1" * 23], "out of range"),
    (["--output", "{folder}"], "is a folder"),
    (["--output", "{blocker}/d.json"], "cannot write in"),  # a path no one can write: under a plain file
    (["--output", "{folder}/res.png"], "must name a .json file"),
])
def test_the_decode_benchmark_checks_its_arguments_before_the_first_row(flags, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decode_benchmark, "measure", _never_measure)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    flags = [flag.format(folder=tmp_path, blocker=blocker) for flag in flags]
    with pytest.raises(SystemExit) as stop:
        decode_benchmark.main(["--device", "cpu", *flags])
    assert stop.value.code == 2 and words in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, words", [
    (["--peak-tflops", "-1"], "--peak-tflops -1.0: must be a positive finite number"),
    (["--peak-tflops", "nan"], "--peak-tflops nan: must be a finite number"),
    (["--device", "tpu"], "--device tpu"),
    (["--output", "x.png"], "must name a .json file"),
])
def test_the_training_benchmark_exits_2_for_bad_arguments(flags, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training_benchmark, "measure", _never_measure)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        training_benchmark.main(flags)
    assert stop.value.code == 2 and words in _one_error_line(capsys.readouterr().err)
