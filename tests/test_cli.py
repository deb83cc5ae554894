"""The command line: defaults, presets, and bad input that fails fast with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from config.cli import config_from_args
from config.settings import PRESETS, ExperimentConfig, mla_sizes
from exp6_trainer import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_experiment():
    c = ExperimentConfig()
    assert (c.d_model, c.n_heads, c.n_layers, c.d_ff, c.num_experts, c.expert_top_k) == (256, 4, 3, 1024, 8, 2)
    assert (c.max_seq_len, c.batch_size, c.max_steps, c.eval_every) == (256, 64, 1000, 100)
    assert (c.num_documents, c.max_tokens, c.dropout, c.weight_decay, c.grad_clip, c.muon_lr) == (1000, 100_000, 0.1, 0.1, 1.0, 0.01)
    assert (c.load_balancing_weight, c.seed) == (0.01, 42)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 128, 64, 32, 64)
    c.validate()


def test_no_arguments_runs_full_on_cuda_and_the_labelled_cpu_preset_without():
    args = build_parser().parse_args([])
    full, notice = config_from_args(args, cuda_available=True)
    assert full.preset == "full" and full.max_steps == 1000 and notice is None
    cpu, notice = config_from_args(args, cuda_available=False)
    assert cpu.preset == "cpu" and notice is not None and "CPU preset" in notice and cpu.max_steps < full.max_steps
    forced, _ = config_from_args(build_parser().parse_args(["--preset", "full", "--device", "cpu"]), cuda_available=False)
    assert forced.preset == "full"


def test_options_reach_the_config():
    args = build_parser().parse_args(["--steps", "7", "--batch-size", "3", "--seeds", "1", "2", "--attention-backend",
                                      "eager", "--output-dir", "x", "--offline", "--max-tokens", "5000"])
    c, _ = config_from_args(args, cuda_available=False)
    assert (c.max_steps, c.batch_size, c.run_seeds, c.attention_backend, c.output_dir, c.offline, c.max_tokens) == \
        (7, 3, (1, 2), "eager", "x", True, 5000)
    assert c.eval_every == 7  # never more than the number of steps


@pytest.mark.parametrize("change,message", [
    ({"n_heads": 3}, "not divisible by n_heads"),
    ({"expert_top_k": 9}, "expert_top_k=9"),
    ({"max_steps": 0}, "--steps 0: must be at least 1"),
    ({"batch_size": -1}, "--batch-size -1"),
    ({"max_tokens": 100}, "--max-tokens 100: too few"),
    ({"qk_nope_head_dim": 0}, "shares one rotary key"),
    ({"attention_backend": "magic"}, "--attention-backend magic"),
    ({"precision": "fp8"}, "--precision fp8"),
    ({"moe_dispatch": "magic"}, "--moe-dispatch magic"),
])
def test_impossible_configs_fail_validation(change, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig(**change).validate()


def _run_cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "exp6_trainer.py", "--offline", "--cache-dir", str(tmp_path / "c"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


BAD_INPUT = [
    (["--steps", "0"], "--steps 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--attention-backend", "flash-attn"], "flash-attn needs a CUDA GPU"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--data", "/nonexistent/corpus.txt"], "no such file"),
    (["--compile", "--device", "cpu"], "--compile needs bf16"),  # fp32 on CPU; --precision bf16 allows it
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_nonzero_with_one_line_before_training(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--offline", "--cache-dir", str(tmp_path / "c"), *args, "--output-dir", str(out)])
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and message in error_lines[0], error_lines
    assert not (out / "exp6_attention_comparison.json").exists()


def test_the_real_process_exits_2_with_that_one_line(tmp_path):
    """The table above, run as a user runs it (imports, warnings, interpreter exit), for one case: the rest share
    its path from main() on."""
    args, message = BAD_INPUT[3]
    out = tmp_path / "out"
    result = _run_cli(*args, "--output-dir", str(out), tmp_path=tmp_path)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and message in error_lines[0], result.stderr
    assert not (out / "exp6_attention_comparison.json").exists()


def test_unwritable_output_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["--offline", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(blocker / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--output-dir" in err[0]


def test_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    import training.experiment

    def interrupted(config, builders=None, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.experiment, "run_experiment", interrupted)
    assert main(["--output-dir", str(tmp_path)]) == 130


def test_help_names_every_option():
    text = build_parser().format_help()
    for option in ("--preset", "--steps", "--batch-size", "--device", "--attention-backend", "--data", "--output-dir", "--seeds"):
        assert option in text


def _option_help(option: str) -> str:
    """The help text --help prints for one option, on one line (argparse wraps it over several)."""
    lines = build_parser().format_help().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"  {option} ") or line == f"  {option}":
            block = [line]
            for more in lines[i + 1:]:
                if not more.startswith(" " * 6):  # the next option (2 spaces) or the end of the list
                    break
                block.append(more)
            return " ".join(" ".join(block).split())
    raise AssertionError(f"{option} is not in --help")


@pytest.mark.parametrize("option,field", [
    ("--steps", "max_steps"), ("--eval-every", "eval_every"), ("--max-tokens", "max_tokens"),
    ("--batch-size", "batch_size"), ("--seq-len", "max_seq_len"),
])
def test_help_shows_the_default_and_the_cpu_presets_value(option, field):
    full, cpu = PRESETS["full"](ExperimentConfig()), PRESETS["cpu"](ExperimentConfig())
    assert getattr(full, field) != getattr(cpu, field)  # otherwise this test would not tell them apart
    text = _option_help(option)

    def number(value: int) -> str:
        return f"{value:,}" if value >= 10_000 else str(value)

    assert f"default {number(getattr(full, field))}; CPU preset {number(getattr(cpu, field))}" in text, text


def test_help_defaults_are_the_published_values():
    """The numbers a user reads in --help: the experiment's and the CPU preset's."""
    assert "default 1000; CPU preset 300" in _option_help("--steps")
    assert "default 100; CPU preset 50" in _option_help("--eval-every")
    assert "default 100,000; CPU preset 300,000" in _option_help("--max-tokens")
    assert "default 1000" in _option_help("--num-documents")
    assert "default 42" in _option_help("--seed")


@pytest.mark.parametrize("args,flag", [
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-3"], "--steps -3"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--seq-len", "1"], "--seq-len 1"),
    (["--max-tokens", "50"], "--max-tokens 50"),
    (["--num-documents", "-1"], "--num-documents -1"),
    (["--seeds", "1", "1"], "--seeds 1 1"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cudax"], "--device cudax"),
])
def test_each_bad_flag_is_named_in_its_error(args, flag, tmp_path, capsys):
    code = main(["--offline", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "out"), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag}"), err
    for field in ("max_steps", "eval_every", "batch_size", "max_seq_len", "max_tokens", "num_documents"):
        assert field not in err[0]  # the flag to change, not the internal name
    assert not (tmp_path / "out" / "exp6_attention_comparison.json").exists()


@pytest.mark.parametrize("flag", ["--attention-backend", "--precision", "--moe-dispatch", "--parallel"])
def test_an_unknown_choice_is_refused_by_its_flag(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([flag, "magic"])
    assert stop.value.code == 2 and f"argument {flag}: invalid choice" in capsys.readouterr().err


def test_config_file_from_a_results_json_a_checkpoint_or_plain_settings(tmp_path):
    """--config reruns an experiment from what it wrote; flags still override it."""
    import json

    from tests.conftest import tiny_config

    original = tiny_config(tmp_path, seeds=(5, 6), arms=("baseline", "deepseek", "mqa"), parallel="data")
    shapes = {
        "results.json": {"experiment": {"config": original.to_dict(), "status": "completed"}},
        "config.json": {"arm": "deepseek", "config": original.to_dict()},  # a saved model's
        "plain.json": original.to_dict(),
    }
    for name, content in shapes.items():
        (tmp_path / name).write_text(json.dumps(content))
        config, notice = config_from_args(build_parser().parse_args(["--config", str(tmp_path / name)]), cuda_available=False)
        assert config == original and notice is None, name
    overridden, _ = config_from_args(build_parser().parse_args(["--config", str(tmp_path / "plain.json"), "--steps", "9",
                                                               "--parallel", "seeds"]), cuda_available=True)
    assert (overridden.max_steps, overridden.parallel, overridden.d_model) == (9, "seeds", original.d_model)


@pytest.mark.parametrize("content, words", [
    ("{not json", "cannot read it as JSON"),
    ('{"d_model": 32, "no_such_setting": 1}', "unknown config key(s) no_such_setting"),
    ('{"d_model": "wide"}', "config key d_model='wide': expected int"),
    ("[1, 2]", "expected a JSON object of settings"),
])
def test_a_bad_config_file_is_one_error_line(tmp_path, capsys, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: --config {path}: ") and words in err[0], err


def test_a_partial_config_file_fills_the_rest_from_the_preset(tmp_path):
    """--config with --preset: the file's settings over the chosen preset; without --preset, the machine's."""
    path = tmp_path / "partial.toml"
    path.write_text('d_model = 64\nmuon_lr = 0.02\n')
    cpu, notice = config_from_args(build_parser().parse_args(["--config", str(path)]), cuda_available=False)
    cpu_preset = PRESETS["cpu"](ExperimentConfig())  # a width set alone: MLA's sizes follow it (mla_sizes)
    assert cpu == cpu_preset.replace(d_model=64, muon_lr=0.02, **mla_sizes(64, cpu_preset.n_heads))
    assert notice is not None and "CPU preset" in notice
    full, _ = config_from_args(build_parser().parse_args(["--config", str(path), "--preset", "full"]), cuda_available=False)
    assert full == ExperimentConfig().replace(d_model=64, muon_lr=0.02, **mla_sizes(64, ExperimentConfig().n_heads))
    flagged, _ = config_from_args(build_parser().parse_args(["--config", str(path), "--d-model", "96"]), cuda_available=True)
    assert (flagged.d_model, flagged.muon_lr, flagged.batch_size) == (96, 0.02, 64)  # flags > file > preset
