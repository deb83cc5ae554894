"""transformers' own DeepseekV3Attention, loaded strictly with our MLA weights, and run inside our LM.

Our MLA module (deepseek_modeling.DeepseekV3Attention) carries DeepSeek-V3's parameter names, and a saved
model folder (models/checkpoint.py, the project's own format) stores each layer's attention tensors as
`model.layers.{i}.self_attn.{name}`, the names of transformers' DeepseekV3 models. So every layer's attention
loads strictly into transformers' DeepseekV3Attention (`attention_state_dict`, `load_transformers_attention`).
Only the attention does: the MoE is the experiment's own (SiLU experts without a gate projection, a softmax over
the top-k router logits), not DeepSeek-V3's (gated experts, sigmoid scores with a bias-corrected group-limited
top-k, shared experts), so `from_pretrained` cannot load a whole saved model.

What transformers 5.24's DeepseekV3Attention caches (models/deepseek_v3/modeling_deepseek_v3.py): the
normalised latent and the rotated rotary key, one shared "head" each (`cache.update(kv_nope, k_rot, ...)`),
the same values as our latent cache. At every step it then re-expands per-head K and V for every cached token
through kv_b_proj (`expand_kv`) and runs ordinary multi-head attention: no absorption. `TransformersMLA` puts
that module, with its own DynamicCache, in place of our MLA in a copy of our LM (`with_transformers_attention`),
so the decode benchmark times its re-expanding decoder against our absorbed one on the same weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.models.deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention as HFDeepseekV3Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from config.settings import ExperimentConfig
from deepseek_modeling import NORM_EPS, DeepseekV3Attention
from models.attention import CausalSelfAttention, KVCache
from models.attention_ops import CACHED_ATTENTION_KERNELS, cached_attention_kernels
from models.checkpoint import WEIGHTS_FILE, CheckpointError, read_config
from models.transformer import MoELanguageModel

TRANSFORMERS_MODE = "transformers"  # the cache mode (and benchmark label) of transformers' own MLA decoder
ATTENTION_PREFIX = "model.layers.{layer}.self_attn."  # where a saved model keeps a layer's attention tensors


def transformers_config(config: ExperimentConfig, attn_implementation: str = "sdpa") -> DeepseekV3Config:
    """transformers' DeepseekV3Config for our MLA shapes: interleaved RoPE with our base and no YaRN (so its
    softmax scale is 1/sqrt(d_nope + d_rope), as ours), no attention bias, our norm epsilon."""
    hf_config = DeepseekV3Config(
        hidden_size=config.d_model, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        max_position_embeddings=config.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        rope_interleave=True, attention_bias=False, attention_dropout=0.0, rms_norm_eps=NORM_EPS,
    )
    hf_config._attn_implementation = attn_implementation
    return hf_config


def attention_state_dict(weights: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """Layer `layer`'s attention tensors of a saved model's weights (checkpoint names), under the names of
    transformers' DeepseekV3Attention: the `model.layers.{layer}.self_attn.` prefix dropped, nothing renamed."""
    prefix = ATTENTION_PREFIX.format(layer=layer)
    return {key.removeprefix(prefix): tensor for key, tensor in weights.items() if key.startswith(prefix)}


def transformers_attention(config: ExperimentConfig, state_dict: Mapping[str, torch.Tensor], layer_idx: int = 0,
                           attn_implementation: str = "sdpa") -> HFDeepseekV3Attention:
    """transformers' DeepseekV3Attention for `config`, loaded strictly (a missing, extra or mis-shaped tensor
    raises) from `state_dict` (our module's, or attention_state_dict of a saved model); in eval mode."""
    attention = HFDeepseekV3Attention(transformers_config(config, attn_implementation), layer_idx=layer_idx)
    attention.load_state_dict(dict(state_dict), strict=True)
    return attention.eval()


def load_transformers_attention(directory: Path, layer: int, attn_implementation: str = "sdpa"
                                ) -> HFDeepseekV3Attention:
    """Layer `layer`'s attention of the MLA model saved in `directory`, as transformers' DeepseekV3Attention,
    loaded strictly. CheckpointError when the folder holds no MLA model (or no such layer)."""
    directory = Path(directory)
    meta = read_config(directory)
    config = ExperimentConfig.from_dict(meta["config"])
    if meta.get("arm") != "deepseek":
        raise CheckpointError(f"{directory}: a {meta.get('arm')} model; only the deepseek arm's attention is "
                              "transformers' DeepseekV3Attention")
    if not 0 <= layer < config.n_layers:
        raise CheckpointError(f"{directory}: no layer {layer}; the model has {config.n_layers}")
    weights = safetensors.torch.load_file(directory / WEIGHTS_FILE, device="cpu")
    return transformers_attention(config, attention_state_dict(weights, layer), layer, attn_implementation)


class TransformersCache(KVCache):
    """One layer's transformers DynamicCache behind our KVCache interface, so that the decode benchmark measures
    it like ours: `_storage` holds views of the latent and rotary-key tensors the DynamicCache keeps."""

    def __init__(self, capacity: int = 256) -> None:
        super().__init__(TRANSFORMERS_MODE, capacity)  # capacity unused: a DynamicCache grows by concatenation
        self.cache = DynamicCache()

    def update(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        raise TypeError("a TransformersCache is filled by transformers' DeepseekV3Attention, not by update()")

    def observe(self) -> None:
        """Take the cached tensors, (batch, 1, tokens, d) each, as (batch, tokens, d) views, and their length."""
        layer = self.cache.layers[0]
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        self._storage = {"latent": layer.keys.squeeze(1), "k_rope": layer.values.squeeze(1)}
        self.length = self.cache.get_seq_length()


class TransformersMLA(CausalSelfAttention):
    """transformers' DeepseekV3Attention (and its rotary embedding) in place of our MLA: same weights, loaded
    strictly; positions, the causal mask and its own DynamicCache handled as transformers' model does.

    `dtype`: the dtype its weights and activations run in, as a transformers model loaded in that dtype runs
    (bf16 under the benchmark's bf16 autocast, so that its cache holds bf16 values like ours)."""

    cache_modes = (TRANSFORMERS_MODE,)

    def __init__(self, ours: DeepseekV3Attention, config: ExperimentConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # layer 0 of its own one-layer cache: each of our layers has its own cache object
        self.attention = transformers_attention(config, ours.state_dict(), layer_idx=0).to(dtype)
        self.rotary = DeepseekV3RotaryEmbedding(self.attention.config)
        self.kv_values = ours.kv_cache_values_per_token("latent")
        self.dims = ours.score_dims()
        self.dtype = dtype
        self.backend = "sdpa"

    def new_cache(self, mode: str | None = None, capacity: int = 256) -> KVCache:
        super().new_cache(mode, capacity)  # checks the mode
        return TransformersCache(capacity)

    def kv_cache_values_per_token(self, mode: str | None = None) -> int:
        """The normalised latent and the rotary key, as transformers 5.24 caches them (the same as our latent cache)."""
        return self.kv_values

    def score_dims(self) -> tuple[int, int, int]:
        return self.dims

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None and not isinstance(cache, TransformersCache):
            raise TypeError("TransformersMLA decodes only with its own cache (new_cache())")
        batch, seq, _ = x.shape
        past = cache.length if cache is not None else 0
        hidden = x.to(self.dtype)
        positions = torch.arange(past, past + seq, device=x.device).unsqueeze(0)
        cos, sin = self.rotary(hidden, positions)
        mask = None  # one new token sees every cached one; a prompt without a past: SDPA's is_causal
        if seq > 1 and past > 0:  # new tokens after cached ones: query i sees keys up to past + i
            keys = torch.arange(past + seq, device=x.device)
            mask = (keys[None, :] <= past + torch.arange(seq, device=x.device)[:, None]).expand(batch, 1, seq, past + seq)
        with cached_attention_kernels():  # the same SDPA backend choice as our cached rows
            out, _ = self.attention(hidden, (cos, sin), mask, cache=cache.cache if cache is not None else None)
        if cache is not None:
            cache.observe()
        self.backend_used = f"transformers DeepseekV3Attention ({CACHED_ATTENTION_KERNELS}), latent cache re-expanded every step"
        return out.to(x.dtype)


def with_transformers_attention(model: MoELanguageModel, dtype: torch.dtype = torch.float32) -> MoELanguageModel:
    """A copy of the MLA model `model` whose attention modules are transformers' DeepseekV3Attention, each loaded
    strictly with the original's weights; everything else (embedding, norms, MoE, head) is the same copy.
    ValueError when `model` is not an MLA model."""
    twin = copy.deepcopy(model)
    for layer, block in enumerate(twin.transformer_blocks()):
        ours = block.attention
        if not isinstance(ours, DeepseekV3Attention):
            raise ValueError(f"layer {layer} holds {type(ours).__name__}, not MLA: only MLA has transformers' "
                             "DeepseekV3Attention")
        block.attention = TransformersMLA(ours, model.config, dtype).to(next(ours.parameters()).device)
    return twin.eval()
