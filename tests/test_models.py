"""The two models: same LM, same shared weights, causal, correct shapes."""

from __future__ import annotations

import pytest
import torch

from exp6_baseline_attention_model import BaselineAttentionModel, MultiHeadAttention
from exp6_flash_attention_model import FlashAttentionModel
from deepseek_modeling import DeepseekV3FlashAttention2
from models.transformer import MoELanguageModel, TransformerBlock
from experiment_config import ConfigError

MODELS = [BaselineAttentionModel, FlashAttentionModel]


@pytest.fixture
def model_config(config):
    return config.replace(vocab_size=97, dropout=0.0)


@pytest.mark.parametrize("model_cls", MODELS)
def test_forward_shapes_and_finite_aux(model_cls, model_config):
    model = model_cls(model_config)
    ids = torch.randint(0, 97, (3, 11))
    logits, aux = model(ids)
    assert logits.shape == (3, 11, 97)
    assert aux.shape == () and torch.isfinite(aux)
    # Switch loss is >= 1 per layer with equality only at perfect balance; it is summed over layers.
    assert aux.item() >= model_config.n_layers * 0.999


@pytest.mark.parametrize("model_cls", MODELS)
def test_changing_a_later_token_never_changes_earlier_logits(model_cls, model_config):
    model = model_cls(model_config).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 97
    with torch.no_grad():
        before, _ = model(ids)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert (before[:, 9:] - after[:, 9:]).abs().max() > 1e-4  # the change is seen from position 9 on


def test_models_differ_only_in_attention(model_config):
    """Same block and LM classes; every parameter outside attention has the same name and value."""
    baseline, deepseek = BaselineAttentionModel(model_config, seed=7), FlashAttentionModel(model_config, seed=7)
    assert all(isinstance(b, TransformerBlock) for b in (*baseline.blocks, *deepseek.blocks))
    assert isinstance(baseline.blocks[0].attention, MultiHeadAttention)
    assert isinstance(deepseek.blocks[0].attention, DeepseekV3FlashAttention2)
    shared_b = {n: p for n, p in baseline.named_parameters() if ".attention." not in n}
    shared_d = {n: p for n, p in deepseek.named_parameters() if ".attention." not in n}
    assert shared_b.keys() == shared_d.keys()
    for name in shared_b:
        assert torch.equal(shared_b[name], shared_d[name]), name


def test_init_depends_on_seed_and_head_is_tied(model_config):
    a, b = FlashAttentionModel(model_config, seed=1), FlashAttentionModel(model_config, seed=2)
    assert not torch.equal(a.embed.weight, b.embed.weight)
    assert a.lm_head.weight is a.embed.weight
    again = FlashAttentionModel(model_config, seed=1)
    for (name, p), q in zip(a.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_model_without_vocab_size_fails_clearly(config):
    with pytest.raises(ConfigError, match="vocab_size"):
        MoELanguageModel(config, MultiHeadAttention)


def test_backend_is_recorded_after_forward(model_config):
    model = FlashAttentionModel(model_config)
    assert model.attention_backends() == ["not run yet"]
    model(torch.randint(0, 97, (1, 5)))
    assert model.attention_backends() == ["sdpa[auto]"]  # CPU float32: plain SDPA
