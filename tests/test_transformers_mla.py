"""transformers' own DeepseekV3Attention with our MLA weights (inference/transformers_mla.py): it loads strictly,
from a live model or a saved model folder, and inside our LM with its own DynamicCache it decodes what our
absorbed latent cache decodes, step by step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from config.settings import ExperimentConfig, cpu_preset
from exp6_baseline_attention_model import BaselineAttentionModel
from exp6_flash_attention_model import FlashAttentionModel
from inference import decode_benchmark
from inference.transformers_mla import (
    TRANSFORMERS_MODE,
    TransformersCache,
    attention_state_dict,
    load_transformers_attention,
    transformers_attention,
    transformers_config,
    with_transformers_attention,
)
from models import checkpoint
from models.checkpoint import CheckpointError

CPU = torch.device("cpu")


def _mla_model(seed: int = 5, **changes: object) -> FlashAttentionModel:
    """The CPU-preset MLA model with O(1) activations (so greedy picks have clear margins), dropout off."""
    config = cpu_preset(ExperimentConfig(vocab_size=97)).replace(dropout=0.0, router_noise_std=0.0, **changes)
    model = FlashAttentionModel(config, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0, param.shape[1] ** -0.5, generator=torch.Generator().manual_seed(len(name)))
            else:
                param.uniform_(0.7, 1.3, generator=torch.Generator().manual_seed(len(name)))  # norm gains matter too
    return model.eval()


@pytest.mark.parametrize("q_lora_rank", [64, None], ids=["q_lora", "q_proj"])
def test_transformers_decoder_gives_our_logits_at_every_step(q_lora_rank: int | None) -> None:
    """Prefill, then single tokens, then a chunk after a past (the explicit mask): logits equal our latent
    cache's and the uncached forward's."""
    model = _mla_model(q_lora_rank=q_lora_rank)
    twin = with_transformers_attention(model)
    assert all(type(a).__name__ == "TransformersMLA" for a in twin.attention_modules())
    prompt = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    ours, theirs = model.new_caches("latent"), twin.new_caches(TRANSFORMERS_MODE)
    assert all(isinstance(c, TransformersCache) for c in theirs)
    ids = prompt
    with torch.no_grad():
        steps = [prompt, prompt[:, -1:], prompt[:, 3:4], prompt[:, :5]]
        for new in steps:
            got, _ = twin(new, theirs)
            expected, _ = model(new, ours)
            ids = ids if new is prompt else torch.cat([ids, new], dim=1)
            full, _ = model(ids)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, full[:, -new.shape[1]:], atol=1e-5, rtol=1e-5)
    assert [c.length for c in theirs] == [ids.shape[1]] * len(theirs)
    assert theirs[0].bytes_per_token() == ours[0].bytes_per_token()  # the same values cached, float32 both


def test_benchmark_decode_through_transformers_feeds_the_same_tokens() -> None:
    model = _mla_model(seed=8)
    twin = with_transformers_attention(model)
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    ours = decode_benchmark.greedy_decode(model, prompt, 8, "latent", CPU, "fp32")
    theirs = decode_benchmark.greedy_decode(twin, prompt, 8, TRANSFORMERS_MODE, CPU, "fp32")
    assert torch.equal(ours.tokens, theirs.tokens) and len(set(ours.tokens.flatten().tolist())) > 1
    assert theirs.caches[0].shapes() == {"latent": (2, 17, model.config.kv_lora_rank),
                                         "k_rope": (2, 17, model.config.qk_rope_head_dim)}


def test_bf16_twin_caches_bf16_like_ours() -> None:
    model = _mla_model()
    twin = with_transformers_attention(model, torch.bfloat16)
    run = decode_benchmark.greedy_decode(twin, torch.randint(0, 97, (1, 6)), 2, TRANSFORMERS_MODE, CPU, "bf16")
    assert {t.dtype for t in run.caches[0]._storage.values()} == {torch.bfloat16}
    assert run.caches[0].bytes_per_token() == 2 * (model.config.kv_lora_rank + model.config.qk_rope_head_dim)


def test_loading_is_strict() -> None:
    model = _mla_model()
    ours = model.attention_modules()[0]
    state = ours.state_dict()
    transformers_attention(model.config, state)  # every tensor, every name: loads
    with pytest.raises(RuntimeError, match="Missing key"):
        transformers_attention(model.config, {k: v for k, v in state.items() if k != "kv_b_proj.weight"})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        transformers_attention(model.config, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not MLA"):
        with_transformers_attention(BaselineAttentionModel(model.config))


def test_a_saved_models_attention_loads_into_transformers_layer_by_layer(tmp_path: Path) -> None:
    """The saved folder's `model.layers.{i}.self_attn.*` tensors are transformers' names: each layer's attention
    loads strictly and computes what our layer computes."""
    model = _mla_model(seed=11)
    directory = tmp_path / "deepseek-seed11"
    checkpoint.save_checkpoint(model, "deepseek", directory, {})
    x = torch.randn(2, 7, model.config.d_model, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(7).unsqueeze(0)
    rotary = DeepseekV3RotaryEmbedding(transformers_config(model.config))
    for layer, ours in enumerate(model.attention_modules()):
        theirs = load_transformers_attention(directory, layer)
        with torch.no_grad():
            out, _ = theirs(x, rotary(x, positions), None)
            torch.testing.assert_close(out, ours(x), atol=1e-5, rtol=1e-5)
    weights = checkpoint.checkpoint_state_dict(model)
    assert set(attention_state_dict(weights, 1)) == set(model.attention_modules()[1].state_dict())
    with pytest.raises(CheckpointError, match="no layer 5"):
        load_transformers_attention(directory, 5)
    baseline_dir = tmp_path / "baseline-seed11"
    checkpoint.save_checkpoint(BaselineAttentionModel(model.config, seed=11), "baseline", baseline_dir, {})
    with pytest.raises(CheckpointError, match="only the deepseek arm"):
        load_transformers_attention(baseline_dir, 0)

