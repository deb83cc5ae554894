"""The class test: every setting and every flag, through a table of hostile values, never reaches a traceback.

Each field of ExperimentConfig (through a --config file, the one way every field can be set) and each flag of
the four command lines (found by walking dataclasses.fields and the parsers' argparse actions, so a setting or
flag added tomorrow is covered the day it is added) gets every value of the table. The outcome is one of two:

- accepted: the run was planned, and the memory estimate it was planned with fits this machine; or
- refused: exit code 2, exactly one line that says `error:`, no traceback.

Each program is stopped where its work would begin (the experiment's data loading, generation, the first
benchmark row), so the whole table takes seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import exp6_trainer
import inference.decode_benchmark as decode_benchmark
import inference.generate as generate
import training.benchmark as training_benchmark
import training.experiment as experiment
import training.preflight as preflight
from common.hardware import memory_capacity
from config.settings import ExperimentConfig
from models.memory import MemoryNeed
from tests.conftest import tiny_config

HOSTILE_VALUES: list[Any] = [0, -1, 2**62, 2**63, 10**12, 10**30, math.nan, math.inf, -math.inf, "", "\x00"]
HOSTILE_FLAG_VALUES = ["0", "-1", str(2**62), str(2**63), str(10**12), str(10**30), "1e308", "nan", "inf", "-inf", "",
                       "not-a-number", "x.png"]


def _wrong_type(hint: Any) -> Any:
    """A value of another JSON type than the field's."""
    if typing.get_origin(hint) is tuple:
        return {"a": 1}
    if hint is str or (isinstance(hint, types.UnionType) and str in typing.get_args(hint)):
        return 7
    return "seven" if hint is not bool else 1


def _field_values(hint: Any) -> list[Any]:
    values = HOSTILE_VALUES + [_wrong_type(hint)]
    if typing.get_origin(hint) is tuple:  # every hostile value as an element too, and none at all
        values += [[value] for value in HOSTILE_VALUES] + [[]]
    return values


class Outcomes:
    """Records each case's outcome; the test fails listing every case that broke the rule."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.needs: list[tuple[MemoryNeed, torch.device]] = []
        self.broken: list[str] = []
        self.accepted = self.refused = 0
        self.started = False  # whether the program reached its work (where the test stops it)

    def stop(self, result: Any) -> Callable[..., Any]:
        """A stand-in for the program's work: notes that it was reached and returns `result`."""
        def reached(*args: Any, **kwargs: Any) -> Any:
            self.started = True
            return result
        return reached

    def exit_here(self, *args: Any, **kwargs: Any) -> Any:
        """A stand-in for the experiment's work after preflight: notes that it was reached and exits 0."""
        self.started = True
        raise SystemExit(0)

    def record_fits(self, real: Callable[..., None]) -> Callable[..., None]:
        def recording(need: MemoryNeed, device: torch.device, *args: Any, **kwargs: Any) -> None:
            real(need, device, *args, **kwargs)  # raises when it does not fit
            self.needs.append((need, device))
        return recording

    def check(self, case: str, call: Callable[[], int | None]) -> None:
        self.needs.clear()
        self.started = False
        try:
            code = call()
        except SystemExit as stop:  # argparse, and the benchmarks' parser.error
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException as error:  # noqa: BLE001 - a traceback: the very thing this test forbids
            self.capsys.readouterr()
            self.broken.append(f"{case}: raised {type(error).__name__}: {str(error)[:200]}")
            return
        err = self.capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        error_lines = [line for line in lines if "error:" in line]
        if code == 0:
            self.accepted += 1
            fits = [sum(part for _, parts in need.on(device) for part in parts.values())
                    <= min(memory_capacity(device)[0], memory_capacity(torch.device("cpu"))[0])
                    for need, device in self.needs]
            if self.started and (not fits or not all(fits)) or "Traceback" in err:  # --print-config starts no work
                self.broken.append(f"{case}: accepted without a memory plan that fits ({len(fits)} checked)")
        elif code == 2 and len(error_lines) == 1 and lines[-1] == error_lines[0] and "Traceback" not in err:
            self.refused += 1
        else:
            self.broken.append(f"{case}: exit {code}, stderr {lines[-3:]}")

    def assert_clean(self) -> None:
        assert self.broken == [], "\n".join(self.broken[:40])


@pytest.fixture
def outcomes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Outcomes:
    monkeypatch.chdir(tmp_path)  # relative paths among the hostile values land here
    recorder = Outcomes(capsys)
    for module in (preflight, generate, decode_benchmark, training_benchmark):
        monkeypatch.setattr(module, "check_fits", recorder.record_fits(module.check_fits))
    return recorder


# --- every field of ExperimentConfig ------------------------------------------------------------------

@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ExperimentConfig)])
def test_every_setting_with_every_hostile_value_is_planned_or_refused_in_one_line(field, outcomes, monkeypatch,
                                                                                  tmp_path):
    monkeypatch.setattr(experiment, "on_device", outcomes.exit_here)  # planned (preflight passed); no data, no training
    hint = typing.get_type_hints(ExperimentConfig)[field]
    base = tiny_config(tmp_path).to_dict()
    for value in _field_values(hint):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**base, field: value}))  # NaN and infinity as Python's json writes them
        outcomes.check(f"{field}={value!r:.30}", lambda: exp6_trainer.main(["--config", str(path)]))
    outcomes.assert_clean()


# --- every flag of the four command lines -------------------------------------------------------------

def _flag_cases(parser: argparse.ArgumentParser) -> list[tuple[str, list[str]]]:
    """(flag, its arguments) for every optional argument: a switch alone, else each hostile value."""
    cases: list[tuple[str, list[str]]] = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:
            cases.append((flag, [flag]))
        else:
            cases += [(flag, [flag, value]) for value in HOSTILE_FLAG_VALUES]
    return cases


def _run_flags(outcomes: Outcomes, parser: argparse.ArgumentParser, base: list[str],
               main: Callable[[list[str]], int | None]) -> None:
    cases = _flag_cases(parser)
    assert len(cases) > 5  # the walk found the flags
    for flag, arguments in cases:
        outcomes.check(" ".join(arguments)[:60], lambda: main(base + arguments))
    outcomes.assert_clean()
    assert outcomes.accepted and outcomes.refused  # the table holds both kinds for every program


def test_every_flag_of_the_experiment(outcomes, monkeypatch, tmp_path):
    monkeypatch.setattr(experiment, "on_device", outcomes.exit_here)  # planned (preflight passed); no data, no training
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(tmp_path).to_dict()))
    _run_flags(outcomes, exp6_trainer.build_parser(), ["--config", str(config)], exp6_trainer.main)


def test_every_flag_of_generate(outcomes, monkeypatch, saved_model):
    monkeypatch.setattr(generate, "generate_text", outcomes.stop(("", [])))  # stop before generating
    _run_flags(outcomes, generate.build_parser(), ["--checkpoint", str(saved_model), "--prompt", "The"], generate.main)


def test_every_flag_of_the_decode_benchmark(outcomes, monkeypatch, tmp_path):
    monkeypatch.setattr(decode_benchmark, "measure", outcomes.stop({"failures": []}))  # stop before the first row
    base = ["--device", "cpu", "--contexts", "8", "--batch-sizes", "1", "--new-tokens", "1",
            "--output", str(tmp_path / "d.json")]
    _run_flags(outcomes, decode_benchmark.build_parser(), base, decode_benchmark.main)


def test_every_flag_of_the_training_benchmark(outcomes, monkeypatch, tmp_path):
    monkeypatch.setattr(training_benchmark, "measure", outcomes.stop({"failed": []}))  # stop before the first row
    base = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--seq-lens", "16", "--output", str(tmp_path / "b.json")]
    _run_flags(outcomes, training_benchmark.build_parser(), base, training_benchmark.main)
