"""Training: schedule, optimiser split, end-to-end results, determinism and failure handling."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from data.dataset import prepare_data
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_flash_attention_model import FlashAttentionModel
from training.experiment import MODEL_BUILDERS, run_experiment
from training.optim import build_optimizers, build_schedulers, lr_factor, split_parameters
from training.plots import LOSS_STEP_PLOT, VAL_TIME_PLOT
from training.results import RESULTS_FILE
from training.stats import paired_difference
from training.trainer import new_run_record, train_model, training_step

PUBLIC_KEYS = ("val_loss", "val_accuracy", "val_perplexity", "model_name", "training_time_minutes",
               "parameter_count", "parameters_millions")
REPO = Path(__file__).resolve().parent.parent


def test_lr_schedule_warms_up_then_reaches_ten_percent_at_the_last_step(config):
    cfg = config.replace(max_steps=1000)
    factors = [lr_factor(s, cfg) for s in range(cfg.max_steps)]
    assert cfg.warmup_steps == 50
    assert factors[0] == pytest.approx(1 / 50) and factors[49] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[50:], factors[51:]))  # monotone cosine decay
    assert factors[524] == pytest.approx(0.55, abs=0.01)  # halfway through the cosine


def test_schedulers_step_once_per_optimizer_step(config):
    cfg = config.replace(vocab_size=50, max_steps=20)
    model = FlashAttentionModel(cfg)
    optimizers = build_optimizers(model, cfg)
    schedulers = build_schedulers(optimizers, cfg)
    x = torch.randint(0, 50, (2, 8))
    for _ in range(cfg.max_steps):
        training_step(model, optimizers, schedulers, x, x, cfg)
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(cfg.muon_lr * lr_factor(cfg.max_steps, cfg))
    assert optimizers[1].param_groups[0]["lr"] == pytest.approx(cfg.adamw_lr * cfg.min_lr_ratio)


def test_muon_gets_block_matrices_and_adamw_the_rest(config):
    model = BaselineAttentionModel(config.replace(vocab_size=50))
    muon, adamw = split_parameters(model)
    assert all(p.ndim == 2 for p in muon)
    assert any(p is model.embed.weight for p in adamw)
    assert not any(p is model.embed.weight for p in muon)
    assert sum(p.numel() for p in muon + adamw) == sum(p.numel() for p in model.parameters())


def _read_results(cfg) -> dict:
    path = Path(cfg.output_dir) / RESULTS_FILE
    return json.loads(path.read_text())  # strict JSON: json would accept NaN, so check below


def test_tiny_end_to_end_run_writes_valid_json_and_plots(config):
    results = run_experiment(config, log=lambda _: None)
    written = _read_results(config)
    assert "NaN" not in (Path(config.output_dir) / RESULTS_FILE).read_text()
    assert written["experiment"]["status"] == "completed"
    assert written["experiment"]["config"]["d_model"] == config.d_model
    assert written["experiment"]["data"]["offline"] is True
    for name in ("baseline", "deepseek"):
        summary = written[name]
        for key in PUBLIC_KEYS:
            assert summary[key] is not None, (name, key)
        assert math.isfinite(summary["val_loss"]) and 0 <= summary["val_accuracy"] <= 1
        assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
        run = summary["runs"][0]
        curve = run["curve"]
        assert curve["step"] == [0, 3, 6] and curve["training_seconds"][0] == 0.0
        assert curve["tokens_seen"][-1] == config.max_steps * config.batch_size * config.max_seq_len
        assert all(math.isfinite(v) for v in curve["val_loss"])
        assert curve["val_loss"][-1] < curve["val_loss"][0]  # it learned something
        assert summary["costs"]["parameters_total"] == summary["parameter_count"]
        assert summary["attention_backend"] == ["sdpa[auto]"]
    assert written["deepseek"]["costs"]["kv_cache_bytes_per_token_per_layer_bf16"] < \
        written["baseline"]["costs"]["kv_cache_bytes_per_token_per_layer_bf16"]
    for plot in (VAL_TIME_PLOT, LOSS_STEP_PLOT):
        image = matplotlib.image.imread(Path(config.output_dir) / plot)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert results["comparison"]["verdict"].startswith("single seed")


def test_same_seed_twice_gives_identical_metrics_on_cpu(config):
    data = prepare_data(config, lambda _: None)
    cfg = config.replace(vocab_size=data.vocab_size)
    records = []
    for _ in range(2):
        model = FlashAttentionModel(cfg, seed=5)
        record = new_run_record("deepseek", model, 5)
        records.append(train_model(model, data, cfg, 5, torch.device("cpu"), record))
    assert records[0]["curve"]["val_loss"] == records[1]["curve"]["val_loss"]
    assert records[0]["curve"]["train_loss"] == records[1]["curve"]["train_loss"]
    model = FlashAttentionModel(cfg, seed=6)
    other = train_model(model, data, cfg, 6, torch.device("cpu"), new_run_record("deepseek", model, 6))
    assert other["curve"]["val_loss"] != records[0]["curve"]["val_loss"]


class _FailingModel(FlashAttentionModel):
    """Injects a fault at the n-th training forward pass."""

    fail_at_call = 5  # the untimed warm-up pass is call 1, so this is training step 3 (0-based)
    fault = "nan"

    def forward(self, input_ids):
        logits, aux = super().forward(input_ids)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.fail_at_call:
                if self.fault == "interrupt":
                    raise KeyboardInterrupt
                logits = logits * float("nan")
        return logits, aux


def test_nan_at_a_step_fails_that_run_only_and_is_recorded(config):
    builders = {**MODEL_BUILDERS, "deepseek": _FailingModel}
    lines: list[str] = []
    results = run_experiment(config, builders=builders, log=lines.append)
    written = _read_results(config)
    failed = written["deepseek"]["runs"][0]
    assert failed["status"] == "failed" and failed["failed_at_step"] == 3
    assert "non-finite" in failed["failure"]
    assert written["baseline"]["runs"][0]["status"] == "completed"
    assert written["experiment"]["status"] == "completed"
    assert written["deepseek"]["val_loss"] is None and written["deepseek"]["seeds_failed"] == [config.seed]
    assert any("FAILED" in line for line in lines)
    assert results["comparison"]["verdict"] == "no seed finished for both models"


def test_ctrl_c_keeps_what_finished_and_says_where(config):
    class Interrupting(_FailingModel):
        fault = "interrupt"

    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, builders={**MODEL_BUILDERS, "deepseek": Interrupting}, log=lines.append)
    written = _read_results(config)
    assert written["experiment"]["status"] == "interrupted"
    assert written["baseline"]["runs"][0]["status"] == "completed"
    assert written["baseline"]["val_loss"] is not None
    assert written["deepseek"]["runs"][0]["status"] == "interrupted"
    assert written["deepseek"]["runs"][0]["curve"]["step"] == [0, 3]  # the partial curve is kept
    assert any("Interrupted" in line and RESULTS_FILE in line for line in lines)


def test_results_file_is_replaced_atomically(config, monkeypatch):
    """A crash while writing leaves the previous results file intact."""
    import training.results as results_module

    path = Path(config.output_dir) / RESULTS_FILE
    results_module.write_json_atomic(path, {"old": 1})

    def broken_dump(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(results_module.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        results_module.write_json_atomic(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert list(path.parent.glob("*.tmp")) == []


def test_three_seeds_give_spread_and_paired_interval(config):
    cfg = config.replace(seeds=(1, 2, 3), max_steps=3, eval_every=3)
    results = run_experiment(cfg, log=lambda _: None)
    for name in ("baseline", "deepseek"):
        assert [r["seed"] for r in results[name]["runs"]] == [1, 2, 3]
        assert results[name]["val_loss_std"] is not None and results[name]["val_loss_std"] > 0
    diff = results["comparison"]["val_loss"]
    assert diff["seeds"] == [1, 2, 3] and len(diff["differences"]) == 3
    low, high = diff["ci95"]
    assert low <= diff["mean"] <= high
    assert results["comparison"]["verdict"]


def test_paired_interval_and_verdict():
    same = paired_difference({1: 1.00, 2: 1.02, 3: 0.99}, {1: 1.01, 2: 1.00, 3: 1.00})
    assert same["verdict"].startswith("no significant difference")
    better = paired_difference({1: 0.90, 2: 0.91, 3: 0.92}, {1: 1.00, 2: 1.00, 3: 1.01})
    assert better["verdict"].startswith("deepseek is better")
    # t(0.975, 2) = 4.303: half-width = 4.303 * sd / sqrt(3)
    diffs = [-0.10, -0.09, -0.09]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert better["ci95"][1] - better["mean"] == pytest.approx(4.303 * sd / math.sqrt(3))


def test_training_step_does_not_read_tensors_back_to_the_host(config, monkeypatch):
    """CPU proxy for 'no host sync per step': our code calls no .item()/.tolist()/bool()/int() on tensors."""
    cfg = config.replace(vocab_size=50)
    model = FlashAttentionModel(cfg)
    optimizers, x = build_optimizers(model, cfg), torch.randint(0, 50, (2, 8))
    schedulers = build_schedulers(optimizers, cfg)
    training_step(model, optimizers, schedulers, x, x, cfg)  # first step creates optimizer state

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if REPO in caller.parents and ".venv" not in caller.parts:
                raise AssertionError(f"host read-back {name} in {caller.name}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        forbid(name)
    loss = training_step(model, optimizers, schedulers, x, x, cfg)
    monkeypatch.undo()
    assert math.isfinite(loss.item())


def test_both_models_see_the_same_batches_in_the_same_order(config):
    seen: dict[str, list[torch.Tensor]] = {"baseline": [], "deepseek": []}

    def recording(cls, name):
        class Recording(cls):
            def forward(self, input_ids):
                if self.training:
                    seen[name].append(input_ids.clone())
                return super().forward(input_ids)
        return Recording

    builders = {"baseline": recording(BaselineAttentionModel, "baseline"),
                "deepseek": recording(FlashAttentionModel, "deepseek")}
    run_experiment(config, builders=builders, log=lambda _: None)
    assert len(seen["baseline"]) == len(seen["deepseek"]) == config.max_steps + 1  # + the untimed warm-up pass
    for a, b in zip(seen["baseline"], seen["deepseek"], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(seen["baseline"][1], seen["baseline"][2])  # and the batches do change
