"""A new attention is one file: an arm registered in arms/ is trained, saved, compared, costed and generated from
with nothing else changed, even one with no cached decode path; an attention that does not declare what the costs
need is refused before training; varying an existing arm is config only, and MLA's sizes follow the width."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference.generate as generate
from arms import registry
from arms.arm import Arm
from common.errors import ConfigError
from config.cli import config_from_args
from config.settings import MLA_SIZES, PRESETS, ExperimentConfig, mla_sizes
from exp6_baseline_attention_model import MultiHeadAttention
from exp6_trainer import build_parser
from models.checkpoint import load_checkpoint, run_checkpoint_dir
from models.costs import cost_report
from training.experiment import run_experiment
from training.results import RESULTS_FILE, format_table

REPO = Path(__file__).resolve().parent.parent
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                                    "exp6_results", "data_cache", "benchmark_results")


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Add your own attention\n") + 1:]
    return section[:section.index("\n## ", 1)]


def readme_example() -> tuple[str, str, str]:
    """(the file it belongs in, the arm it registers, its code): the section's one python block, whose first two
    lines are `# file: PATH` and `# arm: NAME`."""
    blocks = re.findall(r"```python\n(.*?)```", readme_section(), re.S)
    assert len(blocks) == 1, "the section holds one complete python example"
    file_line, arm_line = blocks[0].splitlines()[:2]
    assert file_line.startswith("# file: ") and arm_line.startswith("# arm: ")
    return file_line.removeprefix("# file: ").strip(), arm_line.removeprefix("# arm: ").strip(), blocks[0]


class NoCacheAttention(MultiHeadAttention):
    """The baseline's attention without a cached decode path: generation recomputes the prefix."""

    cache_modes = ()


class UndeclaredAttention(MultiHeadAttention):
    """An attention that forgot score_dims(), which the FLOP count needs."""

    def score_dims(self) -> tuple[int, int, int]:
        raise NotImplementedError("UndeclaredAttention does not declare score_dims()")


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    """Put an arm into the registry for one test, as a file in arms/ would."""
    def add(arm: Arm) -> None:
        monkeypatch.setitem(registry.ARMS, arm.name, arm)
        monkeypatch.setattr(registry, "ARM_NAMES", tuple(registry.ARMS))
    return add


def test_an_arm_without_a_cached_decode_path_is_trained_saved_compared_and_generated_from(config, register, capsys):
    register(Arm("nocache", "MHA, no cache", NoCacheAttention, color="tab:red"))
    cfg = config.replace(arms=("baseline", "nocache"), sample_tokens=4)
    lines: list[str] = []
    results = run_experiment(cfg, log=lines.append)
    written = json.loads((Path(cfg.output_dir) / RESULTS_FILE).read_text())
    assert written["experiment"]["status"] == "completed"
    run = written["nocache"]["runs"][0]
    assert run["status"] == "completed" and torch.isfinite(torch.tensor(run["val_loss"]))
    assert run["sample"]["decoding"] == "greedy, no cache (the arm has no cached decode path)"
    costs = written["nocache"]["costs"]
    assert costs["kv_cache_mode"] is None and costs["kv_cache_bytes_per_token_per_layer_bf16_measured"] is None
    assert "no cached decode path" in costs["kv_cache_note"]
    assert written["comparison"]["headline"]["pair"] == "nocache - baseline"
    assert list(written["comparison"]["pairs"]) == ["nocache - baseline"]
    table = format_table(results)
    assert "At decode time nocache has no cached decode path (it recomputes the prefix at every token); " in table
    assert "- (no cache)" in table

    folder = run_checkpoint_dir(Path(cfg.output_dir), "nocache", cfg.seed)
    loaded = load_checkpoint(folder, registry.arm_builders())
    assert loaded.arm == "nocache" and loaded.model.cache_modes() == ()
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(folder), "--prompt", "The", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if "no cached decode path" in line]
    assert notes == ["nocache: no cached decode path; every token recomputes the whole prefix (--cache auto ignored)"]
    assert any(line.startswith("== nocache (") and "cache none" in line for line in out)


def test_an_attention_that_does_not_declare_its_costs_is_refused_before_training(config, register):
    register(Arm("undeclared", "undeclared", UndeclaredAttention, color="tab:red"))
    with pytest.raises(ConfigError, match=r"^arm undeclared: UndeclaredAttention does not declare score_dims\(\); "):
        run_experiment(config.replace(arms=("baseline", "undeclared")), log=lambda line: None)
    assert not (Path(config.output_dir) / RESULTS_FILE).exists()  # refused in preflight: nothing written


def test_the_cost_report_of_an_arm_without_a_cache_counts_everything_else(config):
    model = Arm("nocache", "x", NoCacheAttention).build(config.replace(vocab_size=64))
    costs = cost_report(model)
    assert costs["kv_cache_bytes_per_token_per_layer_bf16"] is None and costs["kv_cache_mode"] is None
    baseline = cost_report(registry.ARMS["baseline"].build(config.replace(vocab_size=64)))
    for key in ("parameters_total", "training_flops_per_token", "attention_score_flops_per_token"):
        assert costs[key] == baseline[key], key  # the same module otherwise


# --- varying an arm through the config; MLA's sizes follow the width -------------------------------

@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_follows_the_stated_mla_proportions(preset):
    config = PRESETS[preset](ExperimentConfig())
    assert {name: getattr(config, name) for name in MLA_SIZES} == mla_sizes(config.d_model, config.n_heads)


def test_a_wider_model_scales_mla_and_says_so_in_one_line():
    config, notice = config_from_args(build_parser().parse_args(["--preset", "cpu", "--d-model", "256"]), False)
    assert (config.kv_lora_rank, config.q_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
            config.v_head_dim) == (128, 128, 64, 32, 64)  # the full preset's sizes at the full preset's width
    assert notice is not None and len(notice.splitlines()) == 1 and notice.startswith("MLA's sizes follow d_model 256")


def test_mla_sizes_given_with_the_width_are_kept():
    args = ["--preset", "cpu", "--d-model", "256", "--kv-lora-rank", "32"]
    config, notice = config_from_args(build_parser().parse_args(args), False)
    assert config.kv_lora_rank == 32 and config.q_lora_rank == PRESETS["cpu"](ExperimentConfig()).q_lora_rank
    assert notice is None


def test_a_latent_rank_is_varied_through_the_config_alone(config):
    cfg = config.replace(vocab_size=64)
    small, large = (cost_report(registry.ARMS["deepseek"].build(cfg.replace(kv_lora_rank=rank))) for rank in (8, 32))
    measured = "kv_cache_bytes_per_token_per_layer_bf16_measured"
    assert (small[measured], large[measured]) == ((8 + cfg.qk_rope_head_dim) * 2, (32 + cfg.qk_rope_head_dim) * 2)


# --- the README's example, copied verbatim -----------------------------------------------------------

def test_the_readme_example_is_one_new_file_that_trains_against_the_baseline(tmp_path):
    """The block is copied as it stands into a fresh copy of the project, as its one new file, and the new arm
    trains against the baseline through the command line, with its own line in the JSON, the headline and a
    saved model that transformers loads."""
    path, arm, code = readme_example()
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=NOT_COPIED)
    assert path.startswith("arms/") and not (checkout / path).exists()  # a new file, not an edit
    (checkout / path).write_text(code)
    out = tmp_path / "out"
    command = [sys.executable, "exp6_trainer.py", "--preset", "tiny", "--arms", "baseline", arm, "--steps", "4",
               "--eval-every", "2", "--offline", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((out / RESULTS_FILE).read_text())
    assert written["experiment"]["status"] == "completed" and written["experiment"]["config"]["arms"] == ["baseline", arm]
    assert [run["status"] for run in written[arm]["runs"]] == ["completed"] and math.isfinite(written[arm]["val_loss"])
    assert written["comparison"]["headline"]["pair"] == f"{arm} - baseline"
    assert written[arm]["costs"]["parameters_total"] > written["baseline"]["costs"]["parameters_total"]  # its norms
    assert (out / "checkpoints" / f"{arm}-seed42" / "config.json").is_file()
    assert f"{arm} (seed 42): val loss " in done.stdout

    # its saved folder is a transformers model too, computing what our loader's model computes
    check = ("import torch\nfrom transformers import AutoModelForCausalLM\nfrom arms.registry import arm_builders\n"
             "from models.checkpoint import load_checkpoint\n"
             f"folder = {str(out / 'checkpoints' / f'{arm}-seed42')!r}\n"
             "theirs = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
             "ours = load_checkpoint(folder, arm_builders()).model\n"
             "ids = torch.tensor([[1, 2, 3, 4, 5]])\n"
             "with torch.no_grad():\n"
             "    assert torch.allclose(theirs(ids).logits, ours(ids)[0], atol=1e-5, rtol=0)\n")
    loaded = subprocess.run([sys.executable, "-c", check], cwd=checkout, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert loaded.returncode == 0, loaded.stderr[-3000:]


def test_the_readme_varies_mla_through_settings_alone():
    """The section's second example is a command line that changes MLA's latent rank and nothing else."""
    commands = [line for line in re.findall(r"```bash\n(.*?)```", readme_section(), re.S)[0].splitlines()
                if line.startswith("python exp6_trainer.py")]
    assert len(commands) == 1
    words = shlex.split(commands[0])[2:]
    config, notice = config_from_args(build_parser().parse_args(words), cuda_available=True)
    default, _ = config_from_args(build_parser().parse_args([]), cuda_available=True)
    changed = {name for name, value in config.to_dict().items() if value != default.to_dict()[name]}
    assert changed == {"kv_lora_rank", "output_dir"} and config.kv_lora_rank != default.kv_lora_rank
    assert config.arms == ("baseline", "deepseek") and notice is None
