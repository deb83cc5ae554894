"""The arms registry and the GQA/MQA arms: one place names every arm, --arms chooses them, a run with every arm
writes every arm's results, the paired comparisons, the matched-KV-budget line and both plots, and SDPA gets its
grouped-query flag on the pinned FlashAttention path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402 - after choosing the Agg backend
import pytest
import torch
import torch.nn.functional as F

import exp6_baseline_attention_model
from arms.registry import ARM_NAMES, ARMS, BUILT_IN, arm_builders, arm_label, check_arm_names
from common.errors import ConfigError
from config.cli import config_from_args
from config.settings import ExperimentConfig
from exp6_baseline_attention_model import GroupedQueryAttentionModel, MultiHeadAttention, MultiQueryAttentionModel
from exp6_trainer import build_parser, main
from models import attention_ops
from models.checkpoint import load_checkpoint, run_checkpoint_dir
from models.transformer import ModelBuilder, MoELanguageModel
from training import plots
from training import results as results_module
from training.experiment import run_experiment
from training.plots import LOSS_STEP_PLOT, VAL_TIME_PLOT
from training.results import RESULTS_FILE, comparison_pairs, format_table
from training.stats import paired_difference

PAIRS = ("deepseek - baseline", "gqa - baseline", "mqa - baseline", "deepseek - gqa", "deepseek - mqa")  # BUILT_IN's


# ------------------------------------------------------------------------------------------- registry

def test_one_registry_names_every_arm_and_everyone_reads_it():
    assert BUILT_IN == ("baseline", "deepseek", "gqa", "mqa")
    assert ARM_NAMES[:len(BUILT_IN)] == BUILT_IN  # the built-in arms first, in their order; any others by name
    assert list(ARM_NAMES[len(BUILT_IN):]) == sorted(set(ARM_NAMES) - set(BUILT_IN))
    assert [ARMS[a].label_for() for a in BUILT_IN] == ["Baseline (MHA)", "DeepSeek-V3 MLA", "GQA (2 KV heads)",
                                                 "MQA (1 KV head)"]
    assert len({arm.color for arm in ARMS.values()}) == len(ARMS)  # one colour per arm
    assert plots.COLORS == {name: arm.color for name, arm in ARMS.items()}
    assert plots.LABELS == {name: arm.label_for() for name, arm in ARMS.items()}
    assert ExperimentConfig().arms == ("baseline", "deepseek")
    assert arm_label("gqa", {"gqa_kv_heads": 1}) == "GQA (1 KV head)"
    assert arm_label("gqa", ExperimentConfig(n_heads=8, d_model=256, gqa_kv_heads=4)) == "GQA (4 KV heads)"


def test_the_pairs_are_every_arm_against_the_baseline_then_mla_against_gqa_and_mqa():
    assert [f"{a} - {b}" for a, b in comparison_pairs(BUILT_IN)] == list(PAIRS)
    assert comparison_pairs(("baseline", "mqa")) == [("mqa", "baseline")]
    assert comparison_pairs(("baseline",)) == []


def test_verdicts_name_the_arms_compared():
    better = paired_difference({1: 0.90, 2: 0.91, 3: 0.92}, {1: 1.00, 2: 1.00, 3: 1.01}, names=("gqa", "baseline"))
    assert better["verdict"].startswith("gqa is better")
    worse = paired_difference({1: 1.10, 2: 1.11, 3: 1.12}, {1: 1.00, 2: 1.00, 3: 1.01}, names=("deepseek", "mqa"))
    assert worse["verdict"].startswith("mqa is better")


# ------------------------------------------------------------------------------------ SDPA flags

def test_grouped_attention_passes_enable_gqa_to_sdpa_pinned_to_flash(monkeypatch, config):
    """On CUDA in bf16 the training path pins SDPA to the FlashAttention backend; the fake records that the
    grouped-query flag reaches SDPA inside that pin, with K/V at their own (fewer) heads."""
    calls: list[dict[str, Any]] = []
    real = F.scaled_dot_product_attention

    def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append({"q_heads": q.shape[1], "kv_heads": k.shape[1], "flash": torch.backends.cuda.flash_sdp_enabled(),
                      "math": torch.backends.cuda.math_sdp_enabled(), **kwargs})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention_ops.F, "scaled_dot_product_attention", fake)
    monkeypatch.setattr(exp6_baseline_attention_model, "half_precision_cuda", lambda *tensors: True)
    cfg = config.replace(vocab_size=50, n_heads=4)
    for model_cls, kv_heads in ((GroupedQueryAttentionModel, 2), (MultiQueryAttentionModel, 1)):
        calls.clear()
        model = model_cls(cfg)
        model(torch.randint(0, 50, (2, 6)))
        assert len(calls) == cfg.n_layers
        assert all(c["enable_gqa"] is True and c["is_causal"] is True and c["q_heads"] == 4
                   and c["kv_heads"] == kv_heads and c["flash"] and not c["math"] for c in calls), calls
        assert model.attention_backends() == ["sdpa[FLASH_ATTENTION]"]
    calls.clear()
    mha = MultiHeadAttention(cfg)
    mha(torch.randn(1, 5, cfg.d_model))
    assert calls[0]["enable_gqa"] is False and calls[0]["kv_heads"] == 4  # MHA: exactly today's call


def test_cached_grouped_attention_folds_queries_and_equals_repeated_kv():
    """Cached GQA attention (queries at the end of a longer key sequence) equals MHA over K/V repeated per group."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 8, generator=generator)
    k, v = torch.randn(2, 2, 7, 8, generator=generator), torch.randn(2, 2, 7, 8, generator=generator)
    for q_len in (1, 3):
        out = attention_ops.cached_causal_attention(q[:, :, :q_len], k, v, 0.3)
        expected = attention_ops.cached_causal_attention(q[:, :, :q_len], k.repeat_interleave(3, 1),
                                                         v.repeat_interleave(3, 1), 0.3)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ --arms

def test_arms_and_kv_heads_reach_the_config():
    args = build_parser().parse_args(["--arms", "baseline", "deepseek", "gqa", "mqa", "--gqa-kv-heads", "1"])
    c, _ = config_from_args(args, cuda_available=False)
    assert c.arms == BUILT_IN and c.gqa_kv_heads == 1
    c.validate()
    default, _ = config_from_args(build_parser().parse_args([]), cuda_available=False)
    assert default.arms == ("baseline", "deepseek") and default.gqa_kv_heads == 2


@pytest.mark.parametrize("arms, message", [
    (("baseline", "gqa", "gqa"), "--arms baseline gqa gqa: an arm is repeated"),
    (("deepseek", "gqa"), "--arms deepseek gqa: must include baseline"),
])
def test_bad_arms_are_config_errors_naming_the_flag(arms, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig(arms=arms).validate()


def test_an_arm_the_registry_lacks_is_named_with_every_arm_it_has():
    with pytest.raises(ConfigError, match=f"--arms baseline mla: unknown arm 'mla'; choose from {', '.join(ARM_NAMES)}$"):
        check_arm_names(("baseline", "mla"))


@pytest.mark.parametrize("args, flag", [
    (["--arms", "baseline", "gpt"], "--arms baseline gpt"),
    (["--arms", "baseline", "baseline"], "--arms baseline baseline"),
    (["--arms", "mqa"], "--arms mqa"),
    (["--gqa-kv-heads", "3"], "--gqa-kv-heads 3"),
])
def test_bad_arms_on_the_command_line_exit_2_with_one_line(args, flag, tmp_path, capsys):
    code = main(["--offline", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "out"), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag}"), err
    assert not (tmp_path / "out" / RESULTS_FILE).exists()


def test_saved_configs_round_trip_the_arms():
    config = ExperimentConfig(arms=ARM_NAMES, gqa_kv_heads=1)
    again = ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.arms == ARM_NAMES and again.gqa_kv_heads == 1
    old = config.to_dict()
    del old["arms"], old["gqa_kv_heads"]  # a config.json written before the arms existed
    assert ExperimentConfig.from_dict(old).arms == ("baseline", "deepseek")


# ------------------------------------------------------------------------------------ a run with every arm

TRAINED: dict[str, MoELanguageModel] = {}


def _kept(name: str) -> ModelBuilder:
    """The registry's builder for `name`, keeping the model it builds so the test can compare it with its save."""
    def build(config: ExperimentConfig, seed: int | None = None) -> MoELanguageModel:
        model = ARMS[name].build(config, seed=seed)
        TRAINED[name] = model
        return model
    return build


def test_a_tiny_run_with_every_arm_writes_every_arm_pairs_budget_and_plots(config):
    cfg = config.replace(arms=ARM_NAMES, n_heads=4)  # 4 query heads: GQA 2 K/V heads, MQA 1
    lines: list[str] = []
    TRAINED.clear()
    results = run_experiment(cfg, builders={name: _kept(name) for name in ARM_NAMES}, log=lines.append)
    path = Path(cfg.output_dir) / RESULTS_FILE
    written = json.loads(path.read_text())
    assert "NaN" not in path.read_text() and written["experiment"]["status"] == "completed"
    assert written["experiment"]["config"]["arms"] == list(ARM_NAMES)
    assert [key for key in written if key in ARMS] == list(ARM_NAMES)
    for name in ARM_NAMES:
        summary = written[name]
        for key in ("val_loss", "val_accuracy", "val_perplexity", "model_name", "training_time_minutes",
                    "parameter_count", "parameters_millions"):
            assert summary[key] is not None, (name, key)
        assert summary["model_name"] == name and summary["seeds_completed"] == [cfg.seed]
        assert summary["costs"]["parameters_total"] == summary["parameter_count"]
    head_dim = cfg.d_model // 4
    measured = {name: written[name]["costs"]["kv_cache_bytes_per_token_per_layer_bf16_measured"] for name in ARM_NAMES}
    assert {name: measured[name] for name in BUILT_IN} == {
        "baseline": 2 * 4 * head_dim * 2, "deepseek": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2,
        "gqa": 2 * 2 * head_dim * 2, "mqa": 2 * 1 * head_dim * 2}
    for name in ARM_NAMES:  # every arm's measured cache is what its attention declares (bf16: 2 bytes a value)
        attention = TRAINED[name].attention_modules()[0]
        declared = attention.kv_cache_values_per_token(attention.cache_modes[0]) * 2 if attention.cache_modes else None
        assert measured[name] == declared, name

    comparison = written["comparison"]
    pairs = [f"{first} - {second}" for first, second in comparison_pairs(ARM_NAMES)]
    assert list(comparison["pairs"]) == pairs
    assert [pair for pair in pairs if set(pair.split(" - ")) <= set(BUILT_IN)] == list(PAIRS)
    for pair, values in comparison["pairs"].items():
        assert set(values) == {"val_loss", "val_accuracy", "val_perplexity", "verdict", "n", "excluded_seeds",
                               "p_value", "p_holm", "verdict_holm"}, pair
        assert values["n"] == 1 and values["excluded_seeds"] == [] and values["p_holm"] is None
        first, second = pair.split(" - ")
        assert values["val_loss"]["differences"] == pytest.approx(
            [written[first]["runs"][0]["val_loss"] - written[second]["runs"][0]["val_loss"]])
        assert values["verdict"].startswith("single seed")
        assert values["verdict_holm"] == "not tested: a single seed"
    assert comparison["val_loss"] == comparison["pairs"]["deepseek - baseline"]["val_loss"]  # the published shape
    assert comparison["verdict"] == comparison["pairs"]["deepseek - baseline"]["verdict"]
    budget = comparison["matched_kv_budget"]
    assert budget["budget_bytes_per_token_per_layer_bf16"] == measured["deepseek"]
    assert budget["within_budget"] == [name for name in ARM_NAMES  # an arm with no cache has no place in it
                                       if measured[name] is not None and measured[name] <= measured["deepseek"]]
    assert budget["arms"]["mqa"]["val_loss"] == written["mqa"]["val_loss"]

    table = format_table(results)
    assert table in "\n".join(lines)
    header = table.splitlines()[0]
    assert all(arm_label(name, written["experiment"]["config"]) in header for name in ARM_NAMES)
    assert all(label in header for label in ("Baseline (MHA)", "DeepSeek-V3 MLA", "GQA (2 KV heads)", "MQA (1 KV head)"))
    matched = next(line for line in table.splitlines() if line.startswith("Matched KV budget"))
    assert f"<= MLA's {measured['deepseek']:,.0f} B/token/layer" in matched
    for name in budget["within_budget"]:
        assert f"{arm_label(name, written['experiment']['config'])} {measured[name]:,.0f} B, val loss " \
               f"{written[name]['val_loss']:.4f}" in matched
    assert all(f"Val loss, {pair}: " in table for pair in pairs)

    for plot in (VAL_TIME_PLOT, LOSS_STEP_PLOT):
        image = matplotlib.image.imread(Path(cfg.output_dir) / plot)
        assert image.shape[0] > 100 and image.shape[1] > 100

    for name in ARM_NAMES:  # every arm's saved model loads back with the trained logits
        loaded = load_checkpoint(run_checkpoint_dir(Path(cfg.output_dir), name, cfg.seed), arm_builders())
        assert loaded.arm == name and type(loaded.model.attention_modules()[0]) is type(TRAINED[name].attention_modules()[0])
        assert loaded.config.gqa_kv_heads == 2 and loaded.config.n_heads == 4
        ids = torch.randint(0, loaded.config.vocab_size or 0, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(loaded.model(ids)[0], TRAINED[name].eval()(ids)[0])


def test_plots_draw_one_line_colour_per_arm(tmp_path, monkeypatch):
    """Every arm in the results is drawn, each in its registry colour."""
    drawn: list[tuple[str, str]] = []
    real_band = plots._band

    def record(ax: Any, x: Any, values: Any, color: str, label: str, style: str = "-") -> None:
        drawn.append((color, label))
        real_band(ax, x, values, color, label, style)

    monkeypatch.setattr(plots, "_band", record)
    run = {"seed": 1, "status": "completed", "val_loss": 2.0, "val_accuracy": 0.5, "val_perplexity": 7.4,
           "curve": {"step": [0, 3], "training_seconds": [0.0, 1.0], "tokens_seen": [0, 10],
                     "train_loss": [None, 2.5], "val_loss": [3.0, 2.0], "val_accuracy": [0.1, 0.5]}}
    results: dict[str, Any] = {"experiment": {"config": {"preset": "cpu", "gqa_kv_heads": 2}, "data": {}}}
    for name in ARM_NAMES:
        results[name] = results_module.summarise_model([{**run, "model_name": name}], None)
    plots.plot_results(results, tmp_path)
    colors = {color for color, _ in drawn}
    assert colors == {ARMS[name].color for name in ARM_NAMES}
    assert any(label.startswith("MQA (1 KV head): final val loss") for _, label in drawn)
