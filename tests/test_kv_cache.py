"""Decoding with a KV cache gives the logits of a full forward pass, for every attention and cache mode;
the measured cache sizes are the analytic ones; MLA's latent cache never forms per-head keys or values."""

from __future__ import annotations

import pytest
import torch

from config.settings import ExperimentConfig
from deepseek_modeling import DeepseekV3FlashAttention2
from exp6_baseline_attention_model import (
    BaselineAttentionModel,
    GroupedQueryAttentionModel,
    MultiHeadAttention,
    MultiQueryAttentionModel,
)
from exp6_flash_attention_model import FlashAttentionModel
from models.transformer import ModelBuilder, MoELanguageModel

ARMS = [(BaselineAttentionModel, "kv"), (FlashAttentionModel, "expanded"), (FlashAttentionModel, "latent"),
        (GroupedQueryAttentionModel, "kv"), (MultiQueryAttentionModel, "kv")]
ATOL = 1e-5


def _model(config: ExperimentConfig, model_cls: ModelBuilder, **changes: object) -> MoELanguageModel:
    """A small model with O(1) activations (the default init gives near-zero logits, which would hide errors)."""
    model = model_cls(config.replace(vocab_size=61, dropout=0.0, router_noise_std=0.0, **changes), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("prompt_len", [1, 5])
@pytest.mark.parametrize("model_cls,mode", ARMS)
def test_cached_decoding_equals_the_full_forward_at_every_step(config, model_cls, mode, prompt_len, q_lora_rank):
    model = _model(config, model_cls, q_lora_rank=q_lora_rank, n_heads=4)  # GQA: 2 K/V heads for 4 query heads
    total = config.max_seq_len + 6  # past the trained length: RoPE extends on the fly
    ids = torch.randint(0, 61, (2, total), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full, _ = model(ids)
        caches = model.new_caches(mode, capacity=4)  # small, so the cache grows while decoding
        logits, _ = model(ids[:, :prompt_len], caches)
        torch.testing.assert_close(logits, full[:, :prompt_len], atol=ATOL, rtol=0)
        position = prompt_len
        while position < total:
            step = 3 if position == prompt_len + 2 else 1  # one 3-token chunk after a cached prefix: the masked path
            logits, _ = model(ids[:, position : position + step], caches)
            torch.testing.assert_close(logits, full[:, position : position + step], atol=ATOL, rtol=0,
                                       msg=f"{mode} cache, position {position}")
            position += step
    assert all(cache.length == total and cache.mode == mode for cache in caches)
    assert full.abs().max() > 1.0  # the comparison is not between near-zero logits


def test_long_latent_prefill_in_query_chunks_equals_the_full_forward(config, monkeypatch):
    """A prefill longer than LATENT_QUERY_CHUNK runs in chunks of queries, each over all keys so far."""
    import deepseek_modeling

    monkeypatch.setattr(deepseek_modeling, "LATENT_QUERY_CHUNK", 3)
    model = _model(config, FlashAttentionModel)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full, _ = model(ids)
        caches = model.new_caches("latent")
        first, _ = model(ids[:, :11], caches)  # 4 chunks from an empty cache
        second, _ = model(ids[:, 11:], caches)  # 3 chunks after 11 cached tokens
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=ATOL, rtol=0)


def test_latent_cache_holds_only_latent_and_rope_key_and_never_expands(config):
    model = _model(config, FlashAttentionModel)
    attention = model.attention_modules()[0]
    assert isinstance(attention, DeepseekV3FlashAttention2)

    def expanded(*_: object) -> None:
        raise AssertionError("kv_b_proj ran: per-head keys and values were formed")

    hooks = [m.kv_b_proj.register_forward_hook(expanded) for m in model.attention_modules()
             if isinstance(m, DeepseekV3FlashAttention2)]
    caches = model.new_caches("latent")
    with torch.no_grad():
        model(torch.randint(0, 61, (3, 7)), caches)
        model(torch.randint(0, 61, (3, 1)), caches)
    for hook in hooks:
        hook.remove()
    width = attention.kv_lora_rank + attention.qk_rope_head_dim
    assert caches[0].shapes() == {"latent_rope": (3, 8, width)}


def test_measured_cache_bytes_match_the_analytic_ones_at_the_default_sizes():
    """bf16, per token per layer: MLA latent 320 B < MHA 1024 B < MLA expanded 1280 B (per-head K/V)."""
    config = ExperimentConfig(vocab_size=100)
    modules = {"kv": MultiHeadAttention(config), "expanded": DeepseekV3FlashAttention2(config),
               "latent": DeepseekV3FlashAttention2(config)}
    measured = {}
    for mode, module in modules.items():
        cache = module.new_cache(mode)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            module(torch.randn(2, 5, config.d_model), cache)
            module(torch.randn(2, 1, config.d_model), cache)
        measured[mode] = cache.bytes_per_token()
        assert measured[mode] == module.kv_cache_values_per_token(mode) * 2, mode
    assert measured == {"latent": 320, "kv": 1024, "expanded": 1280}


@pytest.mark.parametrize("model_cls, expected", [(BaselineAttentionModel, 1024), (GroupedQueryAttentionModel, 512),
                                                 (FlashAttentionModel, 320), (MultiQueryAttentionModel, 256)])
def test_every_arms_measured_cache_bytes_at_the_default_sizes(model_cls, expected):
    """bf16, per token per layer, measured from the cache tensors of each arm (the table of issue 9):
    MHA 1024 B, GQA with 2 K/V heads 512 B, MLA latent 320 B, MQA 256 B."""
    from models.costs import cost_report

    costs = cost_report(model_cls(ExperimentConfig(vocab_size=100)))
    assert costs["kv_cache_bytes_per_token_per_layer_bf16_measured"] == expected
    assert costs["kv_cache_bytes_per_token_per_layer_bf16"] == expected


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_cache_stores_only_the_kv_heads(config, kv_heads):
    model = _model(config, GroupedQueryAttentionModel, n_heads=4, gqa_kv_heads=kv_heads)
    caches = model.new_caches()
    with torch.no_grad():
        model(torch.randint(0, 61, (3, 5)), caches)
        model(torch.randint(0, 61, (3, 1)), caches)
    head_dim = 32 // 4
    assert caches[0].shapes() == {"k": (3, 6, kv_heads, head_dim), "v": (3, 6, kv_heads, head_dim)}


def test_unknown_cache_mode_is_refused(config):
    model = _model(config, BaselineAttentionModel)
    with pytest.raises(ValueError, match="no 'latent' cache"):
        model.new_caches("latent")


def test_cost_report_records_measured_and_analytic_cache_bytes_for_every_mode(config):
    from models.costs import cost_report

    baseline = cost_report(BaselineAttentionModel(ExperimentConfig(vocab_size=100)))
    deepseek = cost_report(FlashAttentionModel(ExperimentConfig(vocab_size=100)))
    assert baseline["kv_cache_bytes_per_token_per_layer_bf16_by_mode"] == {"kv": {"analytic": 1024, "measured": 1024}}
    assert deepseek["kv_cache_bytes_per_token_per_layer_bf16_by_mode"] == {
        "latent": {"analytic": 320, "measured": 320}, "expanded": {"analytic": 1280, "measured": 1280}}
    assert deepseek["kv_cache_mode"] == "latent" and deepseek["kv_cache_bytes_per_token_per_layer_bf16_measured"] == 320


@pytest.mark.parametrize("model_cls,mode", ARMS + [(None, "transformers")])
def test_prefill_and_decode_attention_run_under_the_pinned_backend_list(config, model_cls, mode, monkeypatch):
    """Every SDPA call of a cached prefill or decode step runs inside sdpa_kernel(CACHED_ATTENTION_BACKENDS)
    (no cuDNN, whose per-shape plans would be rebuilt at every decode length), for every cache mode and for
    transformers' own DeepseekV3Attention in the decode benchmark; the module records that choice."""
    from torch.nn.attention import SDPBackend

    import models.attention_ops as attention_ops

    entered: list[list[SDPBackend]] = []
    active: list[list[SDPBackend]] = []
    real_kernel, real_sdpa = attention_ops.sdpa_kernel, attention_ops.F.scaled_dot_product_attention
    sdpa_calls_under: list[list[SDPBackend] | None] = []

    def recording_kernel(backends, *args, **kwargs):
        entered.append(list(backends))
        context = real_kernel(backends, *args, **kwargs)

        class Recorded:
            def __enter__(self):
                active.append(list(backends))
                return context.__enter__()

            def __exit__(self, *exc):
                active.pop()
                return context.__exit__(*exc)

        return Recorded()

    def recording_sdpa(*args, **kwargs):
        sdpa_calls_under.append(active[-1] if active else None)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "sdpa_kernel", recording_kernel)
    monkeypatch.setattr(attention_ops.F, "scaled_dot_product_attention", recording_sdpa)
    if model_cls is None:  # the decode benchmark's transformers row
        from inference.transformers_mla import with_transformers_attention

        model = with_transformers_attention(_model(config, FlashAttentionModel, n_heads=4))
    else:
        model = _model(config, model_cls, n_heads=4)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = model.new_caches(mode)
        model(ids[:, :5], caches)  # prefill
        model(ids[:, 5:6], caches)  # one decode step
        model(ids[:, 6:9], caches)  # a 3-token chunk after a cached prefix (masked)
    expected = list(attention_ops.CACHED_ATTENTION_BACKENDS)
    assert SDPBackend.CUDNN_ATTENTION not in expected
    assert entered and all(backends == expected for backends in entered)
    assert sdpa_calls_under and all(under == expected for under in sdpa_calls_under), sdpa_calls_under
    assert attention_ops.CACHED_ATTENTION_KERNELS in model.attention_backends()[0]


def test_readme_quotes_the_cost_models_training_flops_figure():
    """The docs' MLA training-FLOPs figure (docs/model.md, linked from the README) is the one the results table
    prints at the full sizes (49,152-token vocabulary), quoted exactly."""
    from pathlib import Path

    from models.costs import cost_report
    from training.results import _cost_sentence

    config = ExperimentConfig(vocab_size=49152)
    sentence = _cost_sentence(cost_report(BaselineAttentionModel(config)), cost_report(FlashAttentionModel(config)))
    flops = sentence[sentence.index("in training it costs"):sentence.index(" with ")]
    doc = " ".join((Path(__file__).resolve().parent.parent / "docs" / "model.md").read_text().split())
    assert flops == "in training it costs +0.15% FLOPs per token (100,460,160 vs 100,311,552)"
    assert f'"{flops}"' in doc
