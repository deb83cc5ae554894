"""Generation: every cache gives the greedy tokens of full recomputation; sampling is seeded; text streams."""

from __future__ import annotations

import re

import pytest
import torch

from arms.registry import ARM_NAMES, ARMS
from data.tokenizer import TextTokenizer
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_flash_attention_model import FlashAttentionModel
from inference.generate import Sampling, cache_mode_for, generate_ids, generate_text
from models.transformer import ModelBuilder, MoELanguageModel

PROMPT = [3, 14, 15, 9, 2]


def _model(config, model_cls: ModelBuilder, draw: int = 0) -> MoELanguageModel:
    model = model_cls(config.replace(vocab_size=61, dropout=0.0, router_noise_std=0.0), seed=5)
    with torch.no_grad():  # O(1) logits, so that greedy choices are not near-ties
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=torch.Generator().manual_seed(len(name) + 1000 * draw))
    # an untied head: with the tied one, a random model's greedy choice is mostly its input token again
    model.lm_head.weight = torch.nn.Parameter(torch.randn(61, model.config.d_model, generator=torch.Generator().manual_seed(1)))
    return model


def _real_sequence_model(config, arm: str) -> tuple[MoELanguageModel, list[int]]:
    """The arm's model, 4 query heads (GQA has 2 K/V heads, MQA 1), of the first of 10 random draws whose greedy
    continuation of PROMPT (recomputing the prefix) is a real sequence, not one or two tokens repeated; and that
    continuation. Random models often fall into a short cycle, and a comparison on one would prove little."""
    for draw in range(10):
        model = _model(config.replace(n_heads=4), ARMS[arm].build, draw)
        tokens = list(generate_ids(model, PROMPT, 24, cache_mode="none"))
        assert len(tokens) == 24 and all(0 <= t < 61 for t in tokens)
        if len(set(tokens)) > 3:
            return model, tokens
    pytest.fail(f"{arm}: no draw of 10 continues the prompt greedily with more than 3 distinct tokens")


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_every_arm_generates_a_real_sequence_recomputing_the_prefix(config, arm):
    """--cache none, the reference, and the only way an arm with no cached decode path generates."""
    _, recomputed = _real_sequence_model(config, arm)
    assert len(set(recomputed)) > 3


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_greedy_tokens_are_identical_with_every_cache(config, arm):
    if not ARMS[arm].build(config.replace(vocab_size=61)).cache_modes():
        pytest.skip(f"{arm} declares no cached decode path (cache_modes == ())")
    model, recomputed = _real_sequence_model(config, arm)
    for mode in model.cache_modes():
        assert list(generate_ids(model, PROMPT, 24, cache_mode=mode)) == recomputed, mode


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_every_arm_decodes_with_the_cache_it_declares(config, arm):
    """auto is the arm's own first cache, a cache it has is taken as asked, none is none; an arm with no cached
    decode path always decodes with none."""
    model = _model(config, ARMS[arm].build)
    modes = model.cache_modes()
    assert cache_mode_for(model, "none") == "none"
    assert cache_mode_for(model, "auto") == (modes[0] if modes else "none")
    for mode in modes:
        assert cache_mode_for(model, mode) == mode
    for requested in ("kv", "expanded", "latent"):
        assert cache_mode_for(model, requested) in (modes or ("none",))
    if not modes:
        with pytest.raises(ValueError, match="no cached decode path"):
            model.new_caches()


def test_cache_mode_per_arm(config):
    mha, mla = _model(config, BaselineAttentionModel), _model(config, FlashAttentionModel)
    assert [cache_mode_for(mha, m) for m in ("auto", "none", "kv", "expanded", "latent")] == ["kv", "none", "kv", "kv", "kv"]
    assert [cache_mode_for(mla, m) for m in ("auto", "none", "kv", "expanded", "latent")] == \
        ["latent", "none", "expanded", "expanded", "latent"]


def test_sampling_is_seeded_and_respects_top_k(config):
    model = _model(config, FlashAttentionModel)
    sampling = Sampling(temperature=1.0, top_k=3)
    first = list(generate_ids(model, [1, 2], 16, sampling=sampling, seed=7))
    assert first == list(generate_ids(model, [1, 2], 16, sampling=sampling, seed=7))
    assert first != list(generate_ids(model, [1, 2], 16, sampling=sampling, seed=8))
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    picks = {int(Sampling(1.0, top_k=2).pick(logits, torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {1, 2}


def test_generate_text_streams_and_stops_at_eos(config):
    model = _model(config, BaselineAttentionModel)
    greedy = list(generate_ids(model, [5, 6, 7], 10))
    eos = greedy[4]
    tokenizer = TextTokenizer(name="letters", vocab_size=61, encode=lambda text: [5, 6, 7],
                              decode=lambda ids: "".join(chr(65 + i % 26) for i in ids), eos_token_id=eos)
    pieces: list[str] = []
    text, ids = generate_text(model, tokenizer, "x", 10, on_text=pieces.append)
    assert ids == greedy[: greedy.index(eos) + 1]  # stops at the first end-of-text token
    assert "".join(pieces) == text == tokenizer.decode(ids) and len(pieces) == len(ids)


def test_cli_on_a_results_folder_reproduces_each_models_greedy_sample(config, capsys):
    """Train both tiny models, then generate from the results folder: each model's greedy text equals the
    sample the run put in its JSON, with every cache mode."""
    from inference.generate import main
    from training.experiment import run_experiment

    results = run_experiment(config.replace(sample_tokens=12), log=lambda _: None)
    samples = {name: results[name]["runs"][0]["sample"] for name in ("baseline", "deepseek")}
    assert all(s["prompt"] == "The" and isinstance(s["text"], str) and s["tokens"] >= 1 for s in samples.values())
    for cache in ("auto", "none", "kv", "latent"):
        assert main(["--checkpoint", config.output_dir, "--prompt", "The", "--greedy", "--max-new-tokens", "12",
                     "--cache", cache]) == 0
        out = capsys.readouterr().out
        parts = re.split(r"^== (baseline|deepseek) \(.*\) ==\n", out, flags=re.MULTILINE)[1:]  # name, text, name, text
        assert parts[0::2] == ["baseline", "deepseek"]
        for name, text in zip(parts[0::2], parts[1::2], strict=True):
            assert text == "The" + samples[name]["text"] + "\n\n", (cache, name)  # the CLI ends each with a blank line


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from inference.generate import main

    assert main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --checkpoint") and "no config.json" in err[0]
    assert main(["--checkpoint", str(tmp_path), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0" in capsys.readouterr().err
