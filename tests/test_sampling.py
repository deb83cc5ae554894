"""Epoch sampling (every training token an input once per epoch, phase and order moving between epochs),
exact exposure numbers in the header, and the arm order rotating per seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from arms.registry import arm_builders
from config.settings import ExperimentConfig
from data.dataset import batch_starts, exposure_line, exposure_summary, prepare_data, token_exposures, training_batch
from models.transformer import ModelBuilder, MoELanguageModel
from training.experiment import run_experiment
from training.results import RESULTS_FILE

SEQ = 16


def _sampling(config: ExperimentConfig, steps: int, batch: int) -> ExperimentConfig:
    return config.replace(max_seq_len=SEQ, max_steps=steps, batch_size=batch)


def _uniform_starts(num_train_tokens: int, config: ExperimentConfig, seed: int) -> torch.Tensor:
    """The sampler this replaced: starts drawn uniformly with replacement."""
    generator = torch.Generator().manual_seed(seed)
    highest_start = num_train_tokens - (config.max_seq_len + 1)
    return torch.randint(0, highest_start + 1, (config.max_steps, config.batch_size), generator=generator)


def _inner(exposures: torch.Tensor) -> torch.Tensor:
    """Positions SEQ - 1 .. N - SEQ - 1: an input in every complete epoch whatever its phase."""
    return exposures[SEQ - 1: len(exposures) - SEQ]


def test_token_exposures_counts_inputs_like_a_brute_force_count():
    starts = torch.tensor([[0, 5], [5, 29], [14, 0]])  # 29: the last start whose target 39 is in
    expected = torch.zeros(40, dtype=torch.int64)
    for start in starts.flatten().tolist():
        expected[start:start + 10] += 1  # inputs s .. s + 9; s + 10 is a target only
    assert torch.equal(token_exposures(starts, 40, 10), expected)
    with pytest.raises(ValueError, match="ends past"):
        token_exposures(torch.tensor([30]), 40, 10)  # would need token 40 as its last target


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_whole_epochs_make_every_token_away_from_the_edges_an_input_exactly_e_times(config, seed):
    # N = 20 * SEQ tokens: every phase p gives (N - 1 - p) // SEQ = 19 windows, so 3 epochs are 57 windows
    n, epochs = 20 * SEQ, 3
    cfg = _sampling(config, steps=19, batch=3)
    starts = batch_starts(n, cfg, seed)
    exposures = token_exposures(starts, n, SEQ)
    assert torch.equal(_inner(exposures), torch.full((n - 2 * SEQ + 1,), epochs))  # positions 15 .. 303
    # the edges: the first SEQ - 1 tokens (before a phase) and the last SEQ (after the last window of a
    # phase) are inputs in at most every epoch; the last token is only ever a target
    assert int(exposures[:SEQ - 1].max()) <= epochs and int(exposures[n - SEQ:].max()) <= epochs
    assert int(exposures[-1]) == 0
    assert int(exposures.sum()) == cfg.max_steps * cfg.batch_size * SEQ
    for epoch in starts.flatten().view(epochs, 19):  # each epoch: all windows of one phase, each once
        phase = int(epoch[0]) % SEQ
        assert torch.equal(epoch.sort().values, phase + SEQ * torch.arange(19))
    # the uniform sampler with replacement breaks this: some tokens are never seen, others many times
    old = _inner(token_exposures(_uniform_starts(n, cfg, seed), n, SEQ))
    assert (old != epochs).any() and int(old.max()) - int(old.min()) > 1


@pytest.mark.parametrize("n", [20 * SEQ + 7, 21 * SEQ])
def test_a_fractional_epoch_leaves_exposures_differing_by_at_most_one(config, n):
    cfg = _sampling(config, steps=10, batch=5)  # 50 windows: 2 to 3 epochs
    for seed in range(5):
        inner = _inner(token_exposures(batch_starts(n, cfg, seed), n, SEQ))
        assert int(inner.max()) - int(inner.min()) <= 1 and int(inner.min()) >= 2
        old = _inner(token_exposures(_uniform_starts(n, cfg, seed), n, SEQ))
        assert int(old.max()) - int(old.min()) > 1


def test_phase_and_order_change_between_epochs_and_seeds_and_a_seed_repeats_its_tensor(config):
    n, per_epoch, epochs = 20 * SEQ, 19, 8
    cfg = _sampling(config, steps=per_epoch, batch=epochs)
    starts = batch_starts(n, cfg, seed=3)
    assert torch.equal(starts, batch_starts(n, cfg, seed=3))
    by_epoch = starts.flatten().view(epochs, per_epoch)
    phases = by_epoch % SEQ
    assert (phases == phases[:, :1]).all()  # one phase per epoch ...
    assert len(set(phases[:, 0].tolist())) > 1  # ... that moves between epochs
    orders = [tuple((epoch // SEQ).tolist()) for epoch in by_epoch]
    assert len(set(orders)) == epochs  # a new order every epoch
    other = batch_starts(n, cfg, seed=4).flatten().view(epochs, per_epoch)
    assert [tuple((epoch // SEQ).tolist()) for epoch in other] != orders
    assert not torch.equal(other, by_epoch)


@pytest.mark.parametrize("n", [SEQ + 1, SEQ + 5, 2 * SEQ, 2 * SEQ + 1, 7 * SEQ + 3, 100 * SEQ])
def test_no_window_ends_past_the_training_tokens(config, n):
    cfg = _sampling(config, steps=7, batch=9)
    for seed in range(10):
        starts = batch_starts(n, cfg, seed)
        assert starts.shape == (7, 9)
        assert int(starts.min()) >= 0 and int(starts.max()) + SEQ <= n - 1  # the last target is token n - 1 at most
    x, y = training_batch(torch.arange(n), batch_starts(n, cfg, 0)[0], SEQ)  # gathers without an index error
    assert int(y.max()) <= n - 1 and torch.equal(x[:, 1:], y[:, :-1])


def test_one_epoch_has_no_repetition_only_with_a_windows_worth_of_phase_slack(config):
    """No repetition needs (steps * batch + 1) * seq_len training tokens: the phase may drop a window."""
    cfg = _sampling(config, steps=5, batch=4)
    enough = (cfg.max_steps * cfg.batch_size + 1) * SEQ
    assert all(int(token_exposures(batch_starts(enough, cfg, seed), enough, SEQ).max()) == 1 for seed in range(50))
    short = enough - 1
    assert any(int(token_exposures(batch_starts(short, cfg, seed), short, SEQ).max()) == 2 for seed in range(50))
    # the default full run: 18,204,729 tokens give (1000 * 64 + 1) * 256 training tokens, one fewer does not
    full = ExperimentConfig()
    needed = (full.max_steps * full.batch_size + 1) * full.max_seq_len
    assert needed == 16_384_256
    assert int(18_204_729 * (1 - full.val_fraction)) == needed > int(18_204_728 * (1 - full.val_fraction))


def test_exposure_line_says_at_most_once_or_the_exact_counts():
    once = {"exposures_max": 1, "fraction_of_training_tokens_seen": 0.25}
    assert exposure_line(once, SEQ) == ("Each training token is seen at most once (25.0% of training tokens once, "
                                        "the rest never): no repetition.")
    repeated = {"exposures_min": 0, "exposures_max": 3, "exposures_min_away_from_edges": 2,
                "exposures_max_away_from_edges": 3, "epochs_over_training_tokens": 2.3}
    assert exposure_line(repeated, 256).startswith(
        "Each training token is seen 2.3 times on average (min 2, max 3; the first 255 and last 256 training tokens, "
        "where the window phase moves, 0 to 3 times): ")


def test_header_numbers_are_a_recount_and_arm_order_rotates_per_seed(config):
    cfg = config.replace(seeds=(1, 2, 3), max_steps=3, eval_every=3, save_checkpoints=False, sample_tokens=0)
    events: list[tuple[str, str, int]] = []

    def recording(name: str, base: ModelBuilder) -> ModelBuilder:
        def build(config: ExperimentConfig, seed: int) -> MoELanguageModel:
            model = base(config, seed=seed)
            if model.embed.weight.is_meta:  # the memory plan's shapes (models/memory.py), not a run
                return model
            events.append(("build", name, seed))

            def note_training(module: torch.nn.Module, args: Any) -> None:
                if module.training and events[-1] != ("train", name, seed):
                    events.append(("train", name, seed))
            model.register_forward_pre_hook(note_training)
            return model
        return build

    lines: list[str] = []
    run_experiment(cfg, builders={name: recording(name, arm_builders()[name]) for name in ("baseline", "deepseek")},
                   log=lines.append)
    order = [["baseline", "deepseek"], ["deepseek", "baseline"], ["baseline", "deepseek"]]
    expected = [(kind, name, seed) for seed, names in zip((1, 2, 3), order) for name in names for kind in ("build", "train")]
    assert events == expected
    written = json.loads((Path(cfg.output_dir) / RESULTS_FILE).read_text())
    header = written["experiment"]
    assert header["arm_order"] == {"1": order[0], "2": order[1], "3": order[2]}

    n = len(prepare_data(cfg, lambda _: None).train)
    recounts = {str(seed): token_exposures(batch_starts(n, cfg, seed), n, cfg.max_seq_len) for seed in (1, 2, 3)}
    data = header["data"]
    assert data["tokens_trained_per_model"] == cfg.max_steps * cfg.batch_size * cfg.max_seq_len
    for seed, exposures in recounts.items():
        inner = exposures[cfg.max_seq_len - 1: n - cfg.max_seq_len]
        assert data["exposures_per_seed"][seed] == {
            "epochs_over_training_tokens": int(exposures.sum()) / n,
            "fraction_of_training_tokens_seen": int((exposures > 0).sum()) / n,
            "exposures_min": int(exposures.min()), "exposures_max": int(exposures.max()),
            "exposures_min_away_from_edges": int(inner.min()), "exposures_max_away_from_edges": int(inner.max()),
        }
        assert data["exposures_per_seed"][seed] == exposure_summary(batch_starts(n, cfg, int(seed)), n, cfg.max_seq_len)
    everything = torch.stack(list(recounts.values()))
    assert data["epochs_over_training_tokens"] == pytest.approx(data["tokens_trained_per_model"] / n)
    assert data["fraction_of_training_tokens_seen"] == min(int((e > 0).sum()) / n for e in everything)
    assert data["exposures_min"] == int(everything.min()) and data["exposures_max"] == int(everything.max())
    assert exposure_line(data, cfg.max_seq_len) in lines
