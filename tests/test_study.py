"""The studies: the frontier's points and the ladder's sizes follow their stated rules, the frontier's cache bytes are
the cost table's measured bytes, the fit recovers known parameters and refuses to draw what it cannot tell, the
gap's trend is a verdict, the plan comes first (--dry-run stops there), and a stopped study resumes without
retraining a finished point."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from arms.registry import ARMS, arm_builders
from config.settings import BASELINE, ExperimentConfig, mla_sizes
from models.costs import cost_report, non_embedding_parameters
from models.checkpoint import load_checkpoint, run_checkpoint_dir
from models.memory import shape_only_model
from models.transformer import MoELanguageModel
from training.command import main
from training.experiment import run_experiment
from training.lineup import FRONTIER, LADDER, frontier_ranks, ladder_config, lineup_of
from training.results import RESULTS_FILE
from training.scaling import MIN_SIZES, fit_power_law, gap_trend, pareto_front, scaling_law
from training.study import REFERENCE_MFU, STUDY, reference_gpu_line

MEASURED = "kv_cache_bytes_per_token_per_layer_bf16_measured"


def _study(config: ExperimentConfig, *studies: str, **changes: Any) -> ExperimentConfig:
    """A study small enough for a test: two seeds, a couple of steps per point."""
    settings: dict[str, Any] = dict(studies=studies, seeds=(1, 2), max_steps=2, eval_every=2, save_checkpoints=False,
                                    sample_tokens=0, n_heads=4, frontier_kv_ranks=(4, 16), ladder_sizes=4,
                                    ladder_head_dim=4, tokens_per_parameter=0.05)
    return config.replace(**{**settings, **changes})


# --- the rules ---------------------------------------------------------------------------------------------

def test_the_frontier_holds_every_attention_at_one_size_paired_with_mha(config):
    study = _study(config, FRONTIER).replace(n_heads=4, frontier_kv_ranks=())
    lineup = lineup_of(study)
    names = lineup.names
    assert names == ["baseline", "gqa-kv2", "mqa"] + [f"deepseek-r{rank}" for rank in frontier_ranks(study)]
    assert frontier_ranks(study) == (2, 4, 8, 16, 32)  # d_model 32: /16, /8, /4, /2 and d_model
    assert lineup.pairs == tuple((name, BASELINE) for name in names if name != BASELINE)
    for entry in lineup.entries:  # one size; only the attention's own setting varies
        assert (entry.config.d_model, entry.config.n_layers, entry.config.max_steps) == (32, 2, 2)
        assert (entry.config.q_lora_rank, entry.config.qk_rope_head_dim) == (study.q_lora_rank, study.qk_rope_head_dim)
    assert lineup.entry("gqa-kv2").config.gqa_kv_heads == 2 and lineup.entry("deepseek-r8").config.kv_lora_rank == 8


def test_the_ladder_follows_its_stated_rule(config):
    study = _study(config, LADDER, tokens_per_parameter=3.0, d_ff=64, d_model=32)
    entries = lineup_of(study).entries
    assert [entry.name for entry in entries] == [f"{arm}-s{size}" for size in range(1, 5) for arm in ("baseline", "deepseek")]
    previous = 0
    for size in range(1, 5):
        baseline, deepseek = (entry.config for entry in entries if entry.size == size)
        heads = 2 * size
        assert (baseline.n_heads, baseline.d_model, baseline.n_layers) == (heads, heads * 4, size)
        assert baseline.d_ff == 2 * baseline.d_model  # the config's d_ff / d_model
        assert {name: getattr(baseline, name) for name in mla_sizes(heads * 4, heads)} == mla_sizes(heads * 4, heads)
        n = non_embedding_parameters(shape_only_model(ARMS[BASELINE].build, baseline.replace(vocab_size=2)))
        tokens_per_step = baseline.batch_size * baseline.max_seq_len
        assert baseline.max_steps == math.ceil(3.0 * n / tokens_per_step)  # tokens in proportion to MHA's N
        assert deepseek == baseline  # every arm of a size trains the same steps: only the attention differs
        assert n > previous
        previous = n
    assert ladder_config(study, 2) == entries[2].config.replace(max_steps=study.max_steps, eval_every=study.eval_every)


# --- the statistics ----------------------------------------------------------------------------------------

def test_the_fit_recovers_known_parameters_from_synthetic_losses():
    sizes = [1e4, 8e4, 2.7e5, 6.4e5, 1.25e6]
    e, a, alpha = 2.1, 35.0, 0.32
    exact = fit_power_law(sizes, [e + a * n ** -alpha for n in sizes])
    assert exact is not None and np.allclose(exact, (e, a, alpha), rtol=1e-4)
    rng = np.random.default_rng(0)
    per_size = [[e + a * n ** -alpha + rng.normal(0, 0.002) for _ in range(8)] for n in sizes]
    law = scaling_law(sizes, per_size, resamples=199)  # fewer resamples than the study's 999: a test's time
    assert law["fitted"] and abs(law["alpha"] - alpha) < 0.02 and abs(law["E"] - e) < 0.05
    low, high = law["ci95"]["alpha"]
    assert low < law["alpha"] < high


def test_a_law_from_too_few_sizes_or_too_wide_an_interval_is_not_drawn():
    sizes = [1e4, 1e5, 1e6]
    assert MIN_SIZES == 4
    few = scaling_law(sizes, [[3.0, 3.1], [2.5, 2.6], [2.2, 2.3]], resamples=99)
    assert not few["fitted"] and "needs at least 4" in few["note"] and "alpha" not in few
    rng = np.random.default_rng(1)  # noise alone: no power of N to find
    noisy = scaling_law([1e4, 2e4, 4e4, 8e4], [[2.5 + rng.normal(0, 0.3) for _ in range(3)] for _ in range(4)],
                        resamples=99)
    assert not noisy["fitted"] and "not drawn" in noisy["note"]
    rng = np.random.default_rng(3)  # a real law under seed noise far larger than what the sizes change
    wide = scaling_law([1e4, 2e4, 4e4, 8e4], [[2.0 + 5 * n ** -0.3 + rng.normal(0, 0.2) for _ in range(3)]
                                              for n in (1e4, 2e4, 4e4, 8e4)], resamples=99)
    assert not wide["fitted"] and "not drawn" in wide["note"]


@pytest.mark.parametrize("slope, words", [(-0.02, "grows"), (0.02, "shrinks"), (0.0, "no evidence")])
def test_the_gap_trend_is_a_verdict(slope, words):
    rng = np.random.default_rng(2)
    sizes = [1e4, 1e5, 1e6, 1e7]
    gaps = [[-0.05 + slope * math.log10(n / 1e4) + rng.normal(0, 0.001) for _ in range(4)] for n in sizes]
    trend = gap_trend(sizes, gaps, ("deepseek", "baseline"))
    assert trend["verdict"].startswith(f"the gap deepseek - baseline {words}" if words != "no evidence" else "no evidence")
    if slope:
        assert trend["per_tenfold_N"] == pytest.approx(slope, abs=0.002)


def test_the_pareto_front_keeps_the_points_nothing_beats():
    points = [("mha", 512, 5.00), ("gqa", 256, 5.01), ("mqa", 128, 5.06), ("mla-small", 96, 5.20), ("mla", 160, 5.00),
              ("worse", 600, 5.30)]
    assert pareto_front(points) == ["mla-small", "mqa", "mla"]


# --- the studies end to end ---------------------------------------------------------------------------------

def test_a_frontier_study_reports_each_points_measured_cache_and_its_holm_verdict(config):
    study = _study(config, FRONTIER)
    results = run_experiment(study, log=lambda line: None)
    written = json.loads((Path(study.output_dir) / RESULTS_FILE).read_text())
    assert written["experiment"]["status"] == "completed" and "study" in written
    frontier = written["study"][FRONTIER]
    lineup = lineup_of(study.replace(vocab_size=written["experiment"]["config"]["vocab_size"]))
    for entry in lineup.entries:
        point = frontier["points"][entry.name]
        model = ARMS[entry.arm].build(entry.config.replace(vocab_size=written["experiment"]["config"]["vocab_size"]))
        assert point[MEASURED] == written[entry.name]["costs"][MEASURED] == cost_report(model)[MEASURED]
        assert point["seeds"] == 2 and point["val_loss"] == pytest.approx(written[entry.name]["val_loss"])
        if entry.name != BASELINE:
            assert point["vs_mha"]["verdict_holm"] == written["comparison"]["pairs"][f"{entry.name} - baseline"]["verdict_holm"]
    assert written["comparison"]["multiple_comparisons"]["pairs"] == len(lineup.entries) - 1  # the frontier's family
    assert set(frontier["pareto_front"]) <= set(frontier["points"]) and frontier["pareto_front"]
    assert (Path(study.output_dir) / "exp6_study_frontier.png").stat().st_size > 1000
    assert results["study"] == written["study"]


class _Interrupts:
    """Builders that count the models built and stop the study (Ctrl-C) when the second run starts."""

    def __init__(self, stop_at: int | None) -> None:
        self.built: list[str] = []
        self.stop_at = stop_at

    def builders(self) -> dict[str, Any]:
        return {name: self.counted(name) for name in arm_builders()}

    def counted(self, name: str) -> Any:
        def build(config: ExperimentConfig, seed: int | None = None) -> MoELanguageModel:
            if torch.empty(0).device.type == "meta":  # the memory plan's shape-only models: not trained
                return arm_builders()[name](config, seed=seed)
            self.built.append(f"{name}:{config.d_model}:{config.kv_lora_rank}:{config.gqa_kv_heads}:{seed}")
            if self.stop_at is not None and len(self.built) == self.stop_at:
                raise KeyboardInterrupt
            return arm_builders()[name](config, seed=seed)
        return build


def test_a_study_stopped_after_its_first_point_resumes_without_retraining_it(config):
    study = _study(config, LADDER, ladder_sizes=2, seeds=(1,))
    first = _Interrupts(stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(study, builders=first.builders(), log=lambda line: None)
    stopped = json.loads((Path(study.output_dir) / RESULTS_FILE).read_text())
    assert stopped["baseline-s1"]["runs"][0]["status"] == "completed"
    again = _Interrupts(stop_at=None)
    results = run_experiment(study, builders=again.builders(), log=lambda line: None, resume=True)
    assert first.built[0] not in again.built and len(again.built) == 3  # the finished point is kept, the rest train
    assert results["experiment"]["status"] == "completed" and set(results["study"][LADDER]["laws"]) == {"baseline",
                                                                                                        "deepseek"}


def test_the_plan_comes_first_and_dry_run_stops_there(config, capsys):
    args = ["--preset", "tiny", "--studies", "ladder", "--ladder-sizes", "2", "--ladder-head-dim", "4",
            "--tokens-per-parameter", "0.5", "--seeds", "7", "--offline", "--output-dir", config.output_dir,
            "--cache-dir", config.cache_dir, "--dry-run"]
    assert main(args, command=STUDY) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Plan: 4 points x 1 seed(s) = 4 runs, on cpu")
    assert [line.split(":")[0].split()[-1] for line in out[1:5]] == ["baseline-s1", "deepseek-s1", "baseline-s2",
                                                                     "deepseek-s2"]
    assert all("ms/step" in line and "tokens" in line for line in out[1:5]) and out[5].startswith("Plan total: ")
    assert out[6].startswith("On a GPU (estimated from FLOPs") and "RTX 4090 ~" in out[6] and "H200 ~" in out[6]
    assert len(out) == 7  # 40,000 tokens of data: no point repeats them
    assert not (Path(config.output_dir) / RESULTS_FILE).exists()
    assert main([*args, "--max-tokens", "2000"], command=STUDY) == 0
    data_line = capsys.readouterr().out.splitlines()[-1]
    assert data_line.startswith("Data: at most 1,800 training tokens (--max-tokens 2,000)") and "raise --max-tokens" in data_line


def test_the_reference_gpu_estimate_is_flops_over_a_share_of_the_peak():
    two_hours_at_the_low_share = 165.2e12 * REFERENCE_MFU[0] * 7200  # an RTX 4090's dense bf16 peak
    line = reference_gpu_line(two_hours_at_the_low_share)
    assert "RTX 4090 ~60.0 min-2.0 h" in line and "not measured" in line


def test_every_study_setting_is_a_flag_and_a_toml_key(tmp_path, capsys):
    args = ["--preset", "tiny", "--studies", "frontier", "--frontier-kv-ranks", "8", "16", "--ladder-arms", "baseline",
            "gqa", "--ladder-sizes", "5", "--ladder-head-dim", "6", "--tokens-per-parameter", "4"]
    assert main([*args, "--print-config"], command=STUDY) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "study.toml"
    path.write_text(printed)
    assert main(["--config", str(path), "--print-config"], command=STUDY) == 0
    assert capsys.readouterr().out == printed
    for line in ('studies = [\n    "frontier",\n]', "frontier_kv_ranks = [\n    8,\n    16,\n]", "ladder_sizes = 5",
                 "ladder_head_dim = 6", "tokens_per_parameter = 4.0", 'output_dir = "exp6_study"'):
        assert line in printed


def test_a_saved_study_point_records_its_arm_and_loads_again(config):
    """A point's saved model is named for the point (deepseek-r4-seed1) but records its arm, so our loader and
    its card know what it is."""
    study = _study(config, FRONTIER, seeds=(1,), frontier_kv_ranks=(4,), save_checkpoints=True)
    run_experiment(study, log=lambda line: None)
    folder = run_checkpoint_dir(Path(study.output_dir), "deepseek-r4", 1)
    loaded = load_checkpoint(folder, arm_builders())
    assert loaded.arm == "deepseek" and loaded.config.kv_lora_rank == 4
