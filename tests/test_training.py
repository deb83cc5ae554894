"""Training: schedule, optimiser split, end-to-end results, determinism and failure handling."""

from __future__ import annotations

import json
import math
import statistics
import time
import types
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch

from arms.registry import ARM_NAMES, ARMS, arm_builders
from config.settings import ExperimentConfig
from data.dataset import prepare_data
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_flash_attention_model import FlashAttentionModel
from models.attention import KVCache
from models.transformer import AttentionFactory, ModelBuilder, MoELanguageModel
from tests.host_sync import HostSyncDetector, HostSyncError
from training import trainer
from training.experiment import run_experiment
from training.optim import build_optimizers, build_schedulers, lr_factor, split_parameters
from training.plots import LOSS_STEP_PLOT, VAL_TIME_PLOT
from training.results import RESULTS_FILE
from training.run_guard import ExperimentFailed
from training.stats import paired_difference
from training.trainer import new_run_record, train_model, training_step

PUBLIC_KEYS = ("val_loss", "val_accuracy", "val_perplexity", "model_name", "training_time_minutes",
               "parameter_count", "parameters_millions")
CPU = torch.device("cpu")


def test_lr_schedule_warms_up_then_reaches_ten_percent_at_the_last_step(config):
    cfg = config.replace(max_steps=1000)
    factors = [lr_factor(s, cfg) for s in range(cfg.max_steps)]
    assert cfg.warmup_steps == 50
    assert factors[0] == pytest.approx(1 / 50) and factors[49] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[50:], factors[51:]))  # monotone cosine decay
    assert factors[524] == pytest.approx(0.55, abs=0.01)  # halfway through the cosine


def test_each_optimizer_step_uses_the_scheduled_lr_of_that_step(config):
    """The LR applied at step s is base * lr_factor(s) for every s: a scheduler stepped twice per
    optimizer step, or not at all, shows up mid-run (the end of the cosine alone cannot tell)."""
    cfg = config.replace(vocab_size=50, max_steps=20)
    model = FlashAttentionModel(cfg)
    optimizers = build_optimizers(model, cfg, CPU)
    schedulers = build_schedulers(optimizers, cfg)
    x = torch.randint(0, 50, (2, 8))
    applied: list[tuple[float, float]] = []
    for _ in range(cfg.max_steps):
        applied.append((optimizers[0].param_groups[0]["lr"], optimizers[1].param_groups[0]["lr"]))
        training_step(model, optimizers, schedulers, x, x, cfg, CPU, "fp32")
    expected = [(cfg.muon_lr * lr_factor(s, cfg), cfg.adamw_lr * lr_factor(s, cfg)) for s in range(cfg.max_steps)]
    assert [lr for pair in applied for lr in pair] == pytest.approx([lr for pair in expected for lr in pair])
    assert applied[-1][1] == pytest.approx(cfg.adamw_lr * cfg.min_lr_ratio)  # the last step runs at the floor


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_muon_gets_exactly_the_block_matrices_and_adamw_the_rest(config, arm):
    model = ARMS[arm].build(config.replace(vocab_size=50))
    muon, adamw = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon}
    expected = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert muon_names == expected and len(expected) > 0
    assert any(".attention." in n for n in muon_names) and any(".experts." in n for n in muon_names)
    assert any(".router." in n for n in muon_names)
    adamw_names = {names[id(p)] for p in adamw}
    assert "embed.weight" in adamw_names and "norm.weight" in adamw_names
    assert all(p.ndim == 1 for n, p in model.named_parameters() if n in adamw_names and n != "embed.weight")
    assert muon_names.isdisjoint(adamw_names)
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
        records.append(train_model(model, data, cfg, 5, CPU, record))
    assert records[0]["curve"]["val_loss"] == records[1]["curve"]["val_loss"]
    assert records[0]["curve"]["train_loss"] == records[1]["curve"]["train_loss"]
    model = FlashAttentionModel(cfg, seed=6)
    other = train_model(model, data, cfg, 6, CPU, new_run_record("deepseek", model, 6))
    assert other["curve"]["val_loss"] != records[0]["curve"]["val_loss"]


def test_logging_time_is_not_training_time(config, monkeypatch):
    """The clock stops while a point is logged (metrics.jsonl, TensorBoard, W&B): a logger that takes an hour at
    every point, on the clock the trainer reads, adds nothing to training_seconds or to the points' times."""
    data = prepare_data(config, lambda _: None)
    cfg = config.replace(vocab_size=data.vocab_size, log_every=1)
    hours_logging = [0]
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + 3600.0 * hours_logging[0]))
    points: list[dict[str, Any]] = []

    def slow_logger(point: dict[str, Any]) -> None:
        points.append(point)
        hours_logging[0] += 1

    model = BaselineAttentionModel(cfg, seed=1)
    record = train_model(model, data, cfg, 1, CPU, new_run_record("baseline", model, 1), on_metrics=slow_logger)
    assert [point["step"] for point in points] == [0, 1, 2, 3, 4, 5, 6]  # step 0, then every step (log_every=1)
    assert 0 < record["training_seconds"] < 3600 and all(point["seconds"] < 3600 for point in points)
    assert record["curve"]["training_seconds"] == sorted(record["curve"]["training_seconds"])


class _FailingModel(FlashAttentionModel):
    """Injects a fault at the n-th training forward pass."""

    fail_at_call = 5  # the untimed warm-up pass is call 1, so this is training step 3 (0-based)
    fault = "nan"

    def forward(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux = super().forward(input_ids, caches, last_only)
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.fail_at_call:
                if self.fault == "interrupt":
                    raise KeyboardInterrupt
                logits = logits * float("nan")
        return logits, aux


def test_nan_at_a_step_fails_that_run_only_and_is_recorded(config):
    """The NaN fails its run only: the other arm trains and is kept. An arm left with no completed run
    leaves nothing to compare, so the experiment ends "failed" (a non-zero exit in the CLI)."""
    builders = {**arm_builders(), "deepseek": _FailingModel}
    lines: list[str] = []
    with pytest.raises(ExperimentFailed, match="no run of deepseek completed"):
        run_experiment(config, builders=builders, log=lines.append)
    written = _read_results(config)
    failed = written["deepseek"]["runs"][0]
    assert failed["status"] == "failed" and failed["failed_at_step"] == 3
    assert "non-finite" in failed["failure"]
    assert written["baseline"]["runs"][0]["status"] == "completed"
    assert written["experiment"]["status"] == "failed" and written["experiment"]["finished_at"] is not None
    assert written["deepseek"]["val_loss"] is None and written["deepseek"]["seeds_failed"] == [config.seed]
    assert any("FAILED" in line for line in lines)
    assert written["comparison"]["verdict"] == (f"no seed finished for both models; seed {config.seed} excluded: "
                                                "deepseek failed at step 3 (non-finite loss)")
    assert written["comparison"]["n"] == 0
    assert written["comparison"]["excluded_seeds"] == [
        {"seed": config.seed, "reason": "deepseek failed at step 3 (non-finite loss)"}]


def test_an_arm_with_one_completed_seed_keeps_the_experiment_completed(config):
    class FailsFirstSeedOnly(_FailingModel):
        def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
            super().__init__(config, seed=seed)
            self.fail_at_call = 5 if seed == 1 else -1

    run_experiment(config.replace(seeds=(1, 2), save_checkpoints=False, sample_tokens=0),
                   builders={**arm_builders(), "deepseek": FailsFirstSeedOnly}, log=lambda line: None)
    written = _read_results(config)
    assert written["experiment"]["status"] == "completed"
    assert written["deepseek"]["seeds_failed"] == [1] and written["deepseek"]["seeds_completed"] == [2]


def test_ctrl_c_keeps_what_finished_and_says_where(config):
    class Interrupting(_FailingModel):
        fault = "interrupt"

    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, builders={**arm_builders(), "deepseek": Interrupting}, log=lines.append)
    written = _read_results(config)
    assert written["experiment"]["status"] == "interrupted"
    assert written["baseline"]["runs"][0]["status"] == "completed"
    assert written["baseline"]["val_loss"] is not None
    assert written["deepseek"]["runs"][0]["status"] == "interrupted"
    assert written["deepseek"]["runs"][0]["curve"]["step"] == [0, 3]  # the partial curve is kept
    assert any("Interrupted" in line and RESULTS_FILE in line for line in lines)


def test_results_file_is_replaced_atomically(config, monkeypatch):
    """A crash while writing leaves the previous results file intact."""
    from common import reporting

    path = Path(config.output_dir) / RESULTS_FILE
    reporting.write_json_atomic(path, {"old": 1})

    def broken_dump(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reporting.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        reporting.write_json_atomic(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert list(path.parent.glob("*.tmp")) == []


def test_three_seeds_give_spread_and_paired_interval(config):
    """The interval is recomputed here from the per-seed run records, independently of training.stats."""
    cfg = config.replace(seeds=(1, 2, 3), max_steps=3, eval_every=3)
    results = run_experiment(cfg, log=lambda _: None)
    losses = {}
    for name in ("baseline", "deepseek"):
        assert [r["seed"] for r in results[name]["runs"]] == [1, 2, 3]
        losses[name] = [r["val_loss"] for r in results[name]["runs"]]
        assert results[name]["val_loss"] == pytest.approx(sum(losses[name]) / 3)
        assert results[name]["val_loss_std"] == pytest.approx(statistics.stdev(losses[name]))
    differences = [d - b for d, b in zip(losses["deepseek"], losses["baseline"], strict=True)]
    diff = results["comparison"]["val_loss"]
    assert diff["seeds"] == [1, 2, 3] and diff["differences"] == pytest.approx(differences)
    mean, half = statistics.mean(differences), 4.302653 * statistics.stdev(differences) / math.sqrt(3)
    assert diff["ci95"] == pytest.approx([mean - half, mean + half])
    significant = not (mean - half <= 0 <= mean + half)
    assert results["comparison"]["verdict"].startswith(
        ("deepseek is better", "baseline is better") if significant else ("no significant difference",))


def test_paired_interval_and_verdict():
    same = paired_difference({1: 1.00, 2: 1.02, 3: 0.99}, {1: 1.01, 2: 1.00, 3: 1.00})
    assert same["verdict"].startswith("no significant difference")
    better = paired_difference({1: 0.90, 2: 0.91, 3: 0.92}, {1: 1.00, 2: 1.00, 3: 1.01})
    assert better["verdict"].startswith("deepseek is better")
    # t(0.975, 2) = 4.302653 (published tables): half-width = t * sd / sqrt(3)
    diffs = [-0.10, -0.09, -0.09]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert better["ci95"][1] - better["mean"] == pytest.approx(4.302653 * sd / math.sqrt(3))


@pytest.mark.parametrize("arm", ARM_NAMES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_need_no_host_sync(config, arm, precision):
    """Outside logging steps the loop makes no host sync: no value read back, no data-dependent shape."""
    cfg = config.replace(vocab_size=50, n_heads=4)
    model = ARMS[arm].build(cfg)
    model.plan_moe_dispatch(CPU, torch.bfloat16 if precision == "bf16" else torch.float32)
    # the optimizers as built for CUDA (fused AdamW keeps its step count on the device; the CPU
    # default reads it back with .item(), which is host memory there, not a sync)
    optimizers, x = build_optimizers(model, cfg, torch.device("cuda")), torch.randint(0, 50, (2, 8))
    schedulers = build_schedulers(optimizers, cfg)
    training_step(model, optimizers, schedulers, x, x, cfg, CPU, precision)  # creates the optimizer state
    with HostSyncDetector():
        losses = [training_step(model, optimizers, schedulers, x, x, cfg, CPU, precision) for _ in range(2)]
    assert all(math.isfinite(loss.item()) for loss in losses)


@pytest.mark.parametrize("dispatch,caught", [("loop", "nonzero"), ("sorted", "tolist")])
def test_host_sync_detector_catches_syncing_moe_paths(config, dispatch, caught):
    """The detector can fail: the public loop (nonzero per expert) and the sorted split (.tolist()) sync."""
    cfg = config.replace(vocab_size=50, moe_dispatch=dispatch)
    model = FlashAttentionModel(cfg)
    x = torch.randint(0, 50, (2, 8))
    with pytest.raises(HostSyncError, match=caught), HostSyncDetector():
        model(x)


def test_host_sync_detector_catches_bincount(config, monkeypatch):
    """torch.bincount sizes its output from the data (a sync on CUDA); the MoE's counts must not use it."""
    import models.moe

    monkeypatch.setattr(models.moe, "expert_counts", lambda ids, n: torch.bincount(ids.flatten(), minlength=n))
    model = FlashAttentionModel(config.replace(vocab_size=50))
    with pytest.raises(HostSyncError, match="bincount"), HostSyncDetector():
        model(torch.randint(0, 50, (2, 8)))


def test_every_arm_sees_the_same_batches_in_the_same_order(config):
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in ARM_NAMES}

    def recording(name: str, attention: AttentionFactory) -> ModelBuilder:
        class Recording(MoELanguageModel):
            def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
                super().__init__(config, attention, seed=seed)

            def forward(self, input_ids: torch.Tensor,
                        caches: list[KVCache] | None = None,
                        last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
                if self.training:
                    seen[name].append(input_ids.clone())
                return super().forward(input_ids, caches, last_only)
        return Recording

    builders = {name: recording(name, arm.attention) for name, arm in ARMS.items()}
    run_experiment(config.replace(arms=ARM_NAMES, sample_tokens=0), builders=builders, log=lambda _: None)
    for name in ARM_NAMES:
        assert len(seen[name]) == config.max_steps + 1, name  # + the untimed warm-up pass
        for a, b in zip(seen["baseline"], seen[name], strict=True):
            assert torch.equal(a, b), name
    assert not torch.equal(seen["baseline"][1], seen["baseline"][2])  # and the batches do change
