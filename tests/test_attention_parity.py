"""Numerical parity of the attention modules (CPU, float32).

1. Our DeepSeek-V3 MLA (deepseek_modeling.DeepseekV3Attention) against transformers' own
   DeepseekV3Attention with identical weights (interleaved rope, plain 1/sqrt(d_qk) scale).
2. The parity check can fail: a wrong rope layout or a wrong softmax scale is caught.
3. The baseline MultiHeadAttention against a plain-math float64 reference written here.
4. DeepseekV3FlashAttention2 (sdpa / eager / auto backends) against DeepseekV3Attention,
   outputs and input gradients, and the recorded backend_used.
5. Causality of every attention module: these, and every arm's of the registry.
"""

from __future__ import annotations

import math

import pytest
import torch

import deepseek_modeling
from arms.registry import ARM_NAMES, ARMS
from config.settings import ExperimentConfig
from deepseek_modeling import DeepseekV3Attention, DeepseekV3FlashAttention2
from exp6_baseline_attention_model import MultiHeadAttention
from models.rope import apply_rope_half

ATOL, RTOL = 1e-5, 1e-4
MUTATION_MIN_DIFF = 1e-3

# (batch, seq, n_heads, d_model, q_lora_rank, kv_lora_rank, qk_nope, qk_rope, v_head_dim, max_seq_len)
MLA_SHAPES = [
    pytest.param((2, 1, 4, 64, 32, 16, 8, 4, 12, 16), id="b2-s1-h4"),  # a single token
    pytest.param((3, 7, 2, 48, 24, 32, 16, 8, 16, 16), id="b3-s7-h2"),  # non-power-of-2 seq
    pytest.param((1, 33, 8, 128, 64, 64, 32, 16, 32, 40), id="b1-s33-h8"),  # odd seq, cpu-preset dims
    pytest.param((2, 64, 4, 96, 48, 40, 24, 8, 20, 64), id="b2-s64-h4-full-window"),  # seq == max_seq_len
]


def _mla_config(n_heads, d_model, q_lora_rank, kv_lora_rank, nope, rope, v_dim, max_seq_len, **extra) -> ExperimentConfig:
    return ExperimentConfig(
        d_model=d_model, n_heads=n_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_dim, max_seq_len=max_seq_len,
        vocab_size=100, **extra,
    )


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norm gains too (so a skipped norm gain would be noticed)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


# --------------------------------------------------------------------------------------------
# 1. Our MLA vs transformers' DeepseekV3Attention
# --------------------------------------------------------------------------------------------


def _hf():
    return pytest.importorskip(
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        reason="transformers.models.deepseek_v3 is not importable; the reference MLA implementation is needed",
    )


def _hf_attention(config: ExperimentConfig):
    """transformers' DeepseekV3Attention + rotary embedding configured like our module."""
    hf = _hf()
    from transformers.models.deepseek_v3 import DeepseekV3Config

    hf_config = DeepseekV3Config(
        hidden_size=config.d_model,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        max_position_embeddings=config.max_seq_len,
        # "default" rope: no yarn, so no mscale on the softmax scale and no attention_scaling on cos/sin
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        rms_norm_eps=deepseek_modeling.NORM_EPS,
    )
    hf_config._attn_implementation = "eager"
    attn = hf.DeepseekV3Attention(hf_config, layer_idx=0).eval()
    rotary = hf.DeepseekV3RotaryEmbedding(hf_config).eval()
    assert rotary.attention_scaling == 1.0
    assert attn.scaling == pytest.approx(1.0 / math.sqrt(config.qk_nope_head_dim + config.qk_rope_head_dim), rel=1e-12)
    return attn, rotary


def _hf_forward(attn, rotary, x: torch.Tensor) -> torch.Tensor:
    batch, seq, _ = x.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    cos, sin = rotary(x, position_ids)
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    mask = torch.zeros(seq, seq, dtype=x.dtype).masked_fill(future, torch.finfo(x.dtype).min)
    mask = mask.expand(batch, 1, seq, seq)
    out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)
    return out


def _paired_mla(shape, q_lora: bool, seed: int = 0):
    batch, seq, n_heads, d_model, q_rank, kv_rank, nope, rope, v_dim, max_seq = shape
    config = _mla_config(n_heads, d_model, q_rank if q_lora else None, kv_rank, nope, rope, v_dim, max_seq)
    hf_attn, rotary = _hf_attention(config)
    _randomize_(hf_attn, seed)
    ours = DeepseekV3Attention(config).eval()
    # Our parameter names are the checkpoint names and our rope tables are non-persistent buffers,
    # so the two state dicts have exactly the same keys and strict loading must succeed.
    assert set(ours.state_dict()) == set(hf_attn.state_dict())
    ours.load_state_dict(hf_attn.state_dict(), strict=True)
    x = torch.randn(batch, seq, d_model, generator=torch.Generator().manual_seed(seed + 1))
    return config, ours, hf_attn, rotary, x


def _shape_values(param) -> tuple:
    (shape,) = param.values
    return shape


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "q_proj"])
@pytest.mark.parametrize("shape", MLA_SHAPES)
def test_mla_matches_transformers(shape, q_lora):
    config, ours, hf_attn, rotary, x = _paired_mla(shape, q_lora)
    assert hasattr(ours, "q_proj") != q_lora and hasattr(ours, "q_a_proj") == q_lora
    with torch.no_grad():
        expected = _hf_forward(hf_attn, rotary, x)
        got = ours(x)
    assert got.shape == expected.shape == x.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_mla_state_dict_roundtrip_ours_to_transformers():
    """Weights also load the other way round (ours -> transformers) with strict=True."""
    shape = _shape_values(MLA_SHAPES[1])
    batch, seq, n_heads, d_model, q_rank, kv_rank, nope, rope, v_dim, max_seq = shape
    config = _mla_config(n_heads, d_model, q_rank, kv_rank, nope, rope, v_dim, max_seq)
    ours = DeepseekV3Attention(config).eval()
    _randomize_(ours, 5)
    hf_attn, rotary = _hf_attention(config)
    hf_attn.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, seq, d_model, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _hf_forward(hf_attn, rotary, x), atol=ATOL, rtol=RTOL)


def test_mla_non_default_rope_base_matches_transformers():
    """rope_base is passed through: a non-default theta still agrees."""
    config = _mla_config(4, 64, 32, 16, 8, 8, 12, 32, rope_base=500.0)
    hf_attn, rotary = _hf_attention(config)
    _randomize_(hf_attn, 9)
    ours = DeepseekV3Attention(config).eval()
    ours.load_state_dict(hf_attn.state_dict(), strict=True)
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _hf_forward(hf_attn, rotary, x), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# 2. The parity test can fail
# --------------------------------------------------------------------------------------------

MUTATION_SHAPE = _shape_values(MLA_SHAPES[2])  # seq 33 > 1, so rope matters


def _max_diff_vs_transformers(q_lora: bool, mutate) -> tuple[float, float]:
    """(max |ours - hf| before the mutation, after it)."""
    _, ours, hf_attn, rotary, x = _paired_mla(MUTATION_SHAPE, q_lora, seed=3)
    with torch.no_grad():
        expected = _hf_forward(hf_attn, rotary, x)
        before = (ours(x) - expected).abs().max().item()
        mutate(ours)
        after = (ours(x) - expected).abs().max().item()
    return before, after


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "q_proj"])
def test_parity_detects_wrong_rope_layout(monkeypatch, q_lora):
    def mutate(_module):
        monkeypatch.setattr(deepseek_modeling, "apply_rope_interleaved", apply_rope_half)

    before, after = _max_diff_vs_transformers(q_lora, mutate)
    assert before <= ATOL * 10, f"unmutated module should agree, max diff {before}"
    assert after > MUTATION_MIN_DIFF, f"half-split rope went unnoticed: max diff {after}"


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "q_proj"])
def test_parity_detects_wrong_softmax_scale(q_lora):
    def mutate(module):
        module.softmax_scale = 1.0 / math.sqrt(module.qk_nope_head_dim)

    before, after = _max_diff_vs_transformers(q_lora, mutate)
    assert before <= ATOL * 10, f"unmutated module should agree, max diff {before}"
    assert after > MUTATION_MIN_DIFF, f"wrong softmax scale went unnoticed: max diff {after}"


def test_parity_detects_wrong_rope_base():
    """A rope table built with the wrong theta is caught too (the rope buffers are not in the state dict)."""
    def mutate(module):
        from models.rope import RotaryEmbedding

        module.rope = RotaryEmbedding(module.qk_rope_head_dim, module.rope.cos.shape[0], base=100.0)

    before, after = _max_diff_vs_transformers(True, mutate)
    assert before <= ATOL * 10
    assert after > MUTATION_MIN_DIFF, f"wrong rope base went unnoticed: max diff {after}"


# --------------------------------------------------------------------------------------------
# 3. Baseline MultiHeadAttention vs a plain-math reference
# --------------------------------------------------------------------------------------------


def _reference_mha(module: MultiHeadAttention, x: torch.Tensor, base: float) -> torch.Tensor:
    """Written out in float64 from the module's weights; RoPE computed here, half-split layout."""
    x = x.double()
    batch, seq, d_model = x.shape
    h, hd = module.n_heads, module.head_dim
    w = module.qkv_proj.weight.detach().double()
    w_q, w_k, w_v = w[:d_model], w[d_model: 2 * d_model], w[2 * d_model:]

    def heads(t):  # (batch, seq, d_model) -> (batch, heads, seq, hd)
        return t.view(batch, seq, h, hd).transpose(1, 2)

    q, k, v = heads(x @ w_q.T), heads(x @ w_k.T), heads(x @ w_v.T)

    half = hd // 2
    i = torch.arange(half, dtype=torch.float64)
    pos = torch.arange(seq, dtype=torch.float64)
    angle = pos[:, None] * base ** (-2.0 * i / hd)[None, :]  # (seq, hd/2)
    cos, sin = angle.cos(), angle.sin()

    def rope(t):
        a, b = t[..., :half], t[..., half:]  # pair (t[i], t[i + hd/2])
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(dim=-1) @ v
    out = out.transpose(1, 2).reshape(batch, seq, d_model)
    return out @ module.o_proj.weight.detach().double().T


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "batch,seq,n_heads,d_model,rope_base",
    [(2, 1, 4, 64, 10000.0), (3, 13, 2, 48, 10000.0), (1, 40, 8, 128, 500.0)],
)
def test_baseline_mha_matches_plain_math(batch, seq, n_heads, d_model, rope_base, backend):
    config = ExperimentConfig(d_model=d_model, n_heads=n_heads, max_seq_len=64, rope_base=rope_base, vocab_size=100)
    module = MultiHeadAttention(config).eval()
    _randomize_(module, 11)
    module.backend = backend
    x = torch.randn(batch, seq, d_model, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        got = module(x)
    expected = _reference_mha(module, x, rope_base).float()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert module.backend_used == ("eager" if backend == "eager" else "sdpa[auto]")


# --------------------------------------------------------------------------------------------
# 4. DeepseekV3FlashAttention2 vs DeepseekV3Attention
# --------------------------------------------------------------------------------------------


def _flash_pair(attention_backend: str, q_lora: bool = True, seed: int = 21):
    config = _mla_config(4, 64, 32 if q_lora else None, 24, 16, 8, 12, 32, attention_backend=attention_backend)
    eager = DeepseekV3Attention(config).eval()
    _randomize_(eager, seed)
    flash = DeepseekV3FlashAttention2(config).eval()
    flash.load_state_dict(eager.state_dict(), strict=True)
    return eager, flash


EXPECTED_BACKEND_CPU = {"sdpa": "sdpa[auto]", "auto": "sdpa[auto]", "eager": "eager"}


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "q_proj"])
@pytest.mark.parametrize("attention_backend", ["sdpa", "eager", "auto"])
def test_flash_class_matches_eager(attention_backend, q_lora):
    eager, flash = _flash_pair(attention_backend, q_lora)
    assert flash.backend_used is None
    for seq in (1, 11, 32):
        x = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            expected = eager(x)
            got = flash(x)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        assert eager.backend_used == "eager"
        assert flash.backend_used == EXPECTED_BACKEND_CPU[attention_backend]


def test_flash_attn_backend_refuses_cpu_float32():
    _, flash = _flash_pair("flash-attn")
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        flash(torch.randn(1, 4, 64))


def test_sdpa_and_eager_gradients_agree():
    eager, sdpa = _flash_pair("sdpa")
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(5))
    grads = {}
    for name, module in (("eager", eager), ("sdpa", sdpa)):
        xi = x.clone().requires_grad_(True)
        (module(xi) * upstream).sum().backward()
        grads[name] = (xi.grad, {n: p.grad for n, p in module.named_parameters()})
    assert sdpa.backend_used == "sdpa[auto]"
    torch.testing.assert_close(grads["sdpa"][0], grads["eager"][0], atol=ATOL, rtol=RTOL)
    eager_input_grad = grads["eager"][0]
    assert eager_input_grad is not None and eager_input_grad.abs().max() > 0
    for n, g in grads["eager"][1].items():
        torch.testing.assert_close(grads["sdpa"][1][n], g, atol=ATOL, rtol=RTOL, msg=f"grad of {n}")


# --------------------------------------------------------------------------------------------
# 5. Causality
# --------------------------------------------------------------------------------------------


def _causal_modules():
    mla_config = _mla_config(4, 64, 32, 24, 16, 8, 12, 32)
    mha_config = ExperimentConfig(d_model=64, n_heads=4, max_seq_len=32, vocab_size=100)
    yield "mla-eager", DeepseekV3Attention(mla_config)
    for backend in ("sdpa", "eager", "auto"):
        yield f"mla-flash2-{backend}", DeepseekV3FlashAttention2(mla_config.replace(attention_backend=backend))
    yield "mha-sdpa", MultiHeadAttention(mha_config, backend="sdpa")
    yield "mha-eager", MultiHeadAttention(mha_config, backend="eager")
    for arm in ARM_NAMES:  # every arm's own attention, as its model builds it
        yield f"arm-{arm}", ARMS[arm].attention(mla_config, 0)


@pytest.mark.parametrize("name", [name for name, _ in _causal_modules()])
@pytest.mark.parametrize("t", [0, 5, 18])
def test_attention_is_causal(name, t):
    module = dict(_causal_modules())[name].eval()
    _randomize_(module, 31)
    seq = 19
    x = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(32))
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 64, generator=torch.Generator().manual_seed(33))
    with torch.no_grad():
        out, out2 = module(x), module(x2)
    torch.testing.assert_close(out2[:, :t], out[:, :t], atol=1e-6, rtol=0)
    assert (out2[:, t] - out[:, t]).abs().max() > 1e-3
