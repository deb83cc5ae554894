"""The arms' models: same LM, same shared weights, causal, correct shapes; GQA/MQA are MHA with fewer K/V heads."""

from __future__ import annotations

import pytest
import torch

from arms.registry import ARM_NAMES, ARMS, BUILT_IN
from common.errors import ConfigError
from exp6_baseline_attention_model import BaselineAttentionModel, GroupedQueryAttentionModel, MultiHeadAttention
from models.transformer import MoELanguageModel, TransformerBlock


@pytest.fixture
def model_config(config):
    return config.replace(vocab_size=97, dropout=0.0, n_heads=4)  # 4 query heads: GQA has 2 K/V heads, MQA 1


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_forward_shapes_and_finite_aux(arm, model_config):
    model = ARMS[arm].build(model_config)
    ids = torch.randint(0, 97, (3, 11))
    logits, aux = model(ids)
    assert logits.shape == (3, 11, 97)
    assert aux.shape == () and torch.isfinite(aux)
    # Switch loss is >= 1 per layer with equality only at perfect balance; it is summed over layers.
    assert aux.item() >= model_config.n_layers * 0.999


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_changing_a_later_token_never_changes_earlier_logits(arm, model_config):
    model = ARMS[arm].build(model_config).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 97
    with torch.no_grad():
        before, _ = model(ids)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert (before[:, 9:] - after[:, 9:]).abs().max() > 1e-4  # the change is seen from position 9 on


@pytest.mark.parametrize("arm", [name for name in ARM_NAMES if name != "baseline"])
def test_models_differ_only_in_attention(model_config, arm):
    """Same block and LM classes; every parameter outside attention has the same name, shape and initial value."""
    baseline, other = BaselineAttentionModel(model_config, seed=7), ARMS[arm].build(model_config, seed=7)
    assert type(other) is MoELanguageModel and isinstance(baseline, MoELanguageModel)
    assert all(isinstance(b, TransformerBlock) for b in (*baseline.blocks, *other.blocks))
    assert type(baseline.blocks[0].attention) is MultiHeadAttention
    expected = type(ARMS[arm].attention(model_config, 0))
    assert all(type(b.attention) is expected for b in other.transformer_blocks())
    if arm in BUILT_IN:  # the built-in arms' attention is not the baseline's
        assert expected is not MultiHeadAttention
    shared_b = {n: p for n, p in baseline.named_parameters() if ".attention." not in n}
    shared_o = {n: p for n, p in other.named_parameters() if ".attention." not in n}
    assert shared_b.keys() == shared_o.keys()
    for name in shared_b:
        assert shared_b[name].shape == shared_o[name].shape, name
        assert torch.equal(shared_b[name], shared_o[name]), name
    assert any(".attention." in n for n, _ in other.named_parameters())


def _mha_family(model: MoELanguageModel, arm: str) -> MultiHeadAttention:
    """The arm's attention when it is MHA or one of its variants (fused QKV, n_kv_heads); skips any other arm."""
    attention = model.attention_modules()[0]
    if not isinstance(attention, MultiHeadAttention):
        pytest.skip(f"{arm}: {type(attention).__name__} is not a MultiHeadAttention (no fused QKV, no K/V heads)")
    return attention


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_kv_heads_set_the_fused_projection(model_config, arm):
    attention = _mha_family(ARMS[arm].build(model_config), arm)
    kv_heads = attention.n_kv_heads
    assert attention.n_heads == 4 and model_config.n_heads % kv_heads == 0
    assert attention.grouped is (kv_heads != 4)
    head_dim = model_config.head_dim
    assert attention.qkv_proj.weight.shape == ((4 + 2 * kv_heads) * head_dim, model_config.d_model)
    assert attention.o_proj.weight.shape == (model_config.d_model, model_config.d_model)
    assert attention.kv_cache_values_per_token() == 2 * kv_heads * head_dim


def test_gqa_with_as_many_kv_heads_as_heads_is_the_baseline_exactly(model_config):
    """gqa_kv_heads = n_heads: same parameter names and shapes, same initial values, the same logits bit for bit."""
    config = model_config.replace(gqa_kv_heads=model_config.n_heads)
    gqa, mha = GroupedQueryAttentionModel(config, seed=3).eval(), BaselineAttentionModel(config, seed=3).eval()
    gqa_params, mha_params = dict(gqa.named_parameters()), dict(mha.named_parameters())
    assert gqa_params.keys() == mha_params.keys()
    for name in gqa_params:
        assert torch.equal(gqa_params[name], mha_params[name]), name
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(gqa(ids)[0], mha(ids)[0])
    # a checkpoint of one loads into the other: the shapes are today's MHA
    mha.load_state_dict(gqa.state_dict())


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_grouped_attention_equals_mha_with_repeated_kv_heads(model_config, arm):
    """MHA and its variants (GQA/MQA: K/V heads shared, repeated per group, query head h using h // group): the
    eager reference (K/V repeated, plain math) and SDPA's enable_gqa agree."""
    model = ARMS[arm].build(model_config, seed=2).eval()
    _mha_family(model, arm)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused, _ = model(ids)
        for attention in model.attention_modules():
            attention.backend = "eager"
        eager, _ = model(ids)
    assert model.attention_backends() == ["eager"]
    torch.testing.assert_close(fused, eager, atol=ARMS[arm].tests.fp32_atol, rtol=0)


def test_gqa_kv_heads_must_divide_the_heads(model_config):
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        MultiHeadAttention(model_config, n_kv_heads=3)
    with pytest.raises(ConfigError, match="--gqa-kv-heads 3: must be at least 1 and divide n_heads=4"):
        model_config.replace(gqa_kv_heads=3).validate()
    with pytest.raises(ConfigError, match="--gqa-kv-heads 0"):
        model_config.replace(gqa_kv_heads=0).validate()


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_init_depends_on_seed_and_head_is_tied(model_config, arm):
    a, b = ARMS[arm].build(model_config, seed=1), ARMS[arm].build(model_config, seed=2)
    assert not torch.equal(a.embed.weight, b.embed.weight)
    attention_a, attention_b = (dict(m.attention_modules()[0].named_parameters()) for m in (a, b))
    assert any(not torch.equal(p, attention_b[n]) for n, p in attention_a.items())  # the attention's too
    assert a.lm_head.weight is a.embed.weight
    again = ARMS[arm].build(model_config, seed=1)
    for (name, p), q in zip(a.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_model_without_vocab_size_fails_clearly(config):
    with pytest.raises(ConfigError, match="vocab_size"):
        MoELanguageModel(config, MultiHeadAttention)


@pytest.mark.parametrize("arm", ARM_NAMES)
def test_backend_is_recorded_after_forward(model_config, arm):
    model = ARMS[arm].build(model_config)
    assert model.attention_backends() == ["not run yet"]
    model(torch.randint(0, 97, (1, 5)))
    backends = model.attention_backends()
    assert len(backends) == 1 and backends != ["not run yet"] and None not in {
        m.backend_used for m in model.attention_modules()}  # every layer recorded the one kernel that ran
    if arm in BUILT_IN:
        assert backends == ["sdpa[auto]"]  # CPU float32: plain SDPA
