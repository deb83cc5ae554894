"""Our LM as a transformers model: `from_pretrained`, `generate` and every tool built on transformers run it.

This module is the project's own code (typed, tested) and also the body of the modeling file every saved model
carries: models/huggingface.py copies it, with the model code it uses (the shared LM, the arm's attention, the
ExperimentConfig), into the folder's modeling file, and binds ATTENTION to the arm's attention there. So
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` runs exactly our model's code.

- `Exp6MoEConfig`: config.json as transformers reads it. The project's own keys stay as they are (`config` is the
  whole ExperimentConfig); the few keys transformers and its tools read (vocab_size, hidden_size, ...) are derived.
- `Exp6MoEForCausalLM`: the MoE LM under a PreTrainedModel with GenerationMixin. Weights keep the checkpoint's
  DeepSeek-V3 names on disk; from_pretrained maps them to ours through `checkpoint_name` and loads strictly.
- `ArmCache`: each layer's own KVCache (MLA's latent, GQA's and MQA's few K/V heads, MHA's K and V) behind
  transformers' Cache API, so `generate(use_cache=True)` decodes with the arm's cache. An arm with no cached decode
  path recomputes the prefix at every step and says so once.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from config.settings import ExperimentConfig
from models.attention import KVCache
from models.checkpoint import checkpoint_name
from models.huggingface import MODEL_TYPE
from models.rope import RotaryEmbedding
from models.transformer import AttentionFactory, MoELanguageModel

logger = logging.get_logger(__name__)

# The arm's attention: None here, bound to the arm's attention class (or top-level function) at the end of a saved
# model's modeling file. In the project, pass `attention=` instead.
ATTENTION: AttentionFactory | None = None
NO_CACHE_NOTE = ("this arm's attention has no cached decode path: every generated token recomputes the whole prefix "
                 "(use_cache ignored)")


class Exp6MoEConfig(PreTrainedConfig):
    """config.json of a saved model as transformers reads it: its own keys kept as they are (so the project's loader
    still reads a folder transformers wrote), the keys transformers' tools read derived from the ExperimentConfig."""

    model_type = MODEL_TYPE

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        experiment = ExperimentConfig.from_dict(config or {})
        self.config = experiment.to_dict()  # the project's key: the whole ExperimentConfig, as the experiment saved it
        kwargs.update(vocab_size=experiment.vocab_size, hidden_size=experiment.d_model,
                      num_hidden_layers=experiment.n_layers, num_attention_heads=experiment.n_heads,
                      max_position_embeddings=experiment.max_seq_len)  # the training length; RoPE extends past it
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    def experiment(self) -> ExperimentConfig:
        """The ExperimentConfig the model is built from."""
        return ExperimentConfig.from_dict(self.config or {})


class ArmCacheLayer(CacheLayerMixin):
    """One layer's KVCache (whatever the arm's attention keeps) as a transformers cache layer.

    Our attention modules fill the KVCache themselves (KVCache.update); transformers only asks for lengths and
    reorders sequences (beam search), which this layer answers from the KVCache."""

    is_croppable = True
    supports_early_init = False  # its tensors are shaped by the attention module, not as (batch, heads, tokens, dim)

    def __init__(self, kv: KVCache) -> None:
        super().__init__()
        self.kv = kv
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("an ArmCacheLayer is filled by the arm's attention module (KVCache.update), not by update()")

    def get_seq_length(self) -> int:
        return self.kv.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.length + query_length, 0

    def get_max_length(self) -> int:
        return -1  # grows as needed

    def reset(self) -> None:
        self.kv.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of tokens to remove")
        self.kv.length = max(0, self.kv.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.kv.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.kv.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.kv.select(torch.arange(self.kv.batch_size()).repeat_interleave(repeats))


class ArmCache(Cache):
    """The arm's own per-layer KV caches (models/attention.py KVCache) behind transformers' Cache API."""

    def __init__(self, caches: list[KVCache]) -> None:
        super().__init__(layers=[ArmCacheLayer(kv) for kv in caches])
        self.caches = caches


class Exp6MoEForCausalLM(PreTrainedModel, GenerationMixin):
    """The experiment's MoE LM (models/transformer.py) with the arm's attention, as a transformers causal LM."""

    config_class = Exp6MoEConfig
    base_model_prefix = "lm"
    _tied_weights_keys = {"lm.lm_head.weight": "lm.embed.weight"}
    _no_split_modules = ["TransformerBlock"]
    config: Exp6MoEConfig

    def __init__(self, config: Exp6MoEConfig, attention: AttentionFactory | None = None,
                 lm: MoELanguageModel | None = None) -> None:
        super().__init__(config)
        if lm is None:
            factory = attention or ATTENTION
            if factory is None:
                raise ValueError("no attention: load a saved model's folder (its modeling file names the arm's "
                                 "attention), or pass attention= or lm=")
            lm = MoELanguageModel(config.experiment(), factory)
        self.lm = lm
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' from_pretrained with the checkpoint's names mapped to ours (`key_mapping`, from
        checkpoint_name) and strict loading: a missing, unexpected or mis-shaped tensor raises in one line."""
        if ATTENTION is None:
            raise ValueError("no attention: load a saved model's folder with AutoModelForCausalLM (its modeling file "
                             "names the arm's attention)")
        config = kwargs.get("config")
        if not isinstance(config, Exp6MoEConfig):
            config = Exp6MoEConfig.from_pretrained(*args[:1], **_config_kwargs(kwargs))
            kwargs["config"] = config
        kwargs.setdefault("key_mapping", key_mapping(config, ATTENTION))
        wants_info = kwargs.pop("output_loading_info", False)
        loaded: Any = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model, info = loaded
        problems = [f"{what} {', '.join(sorted(keys))}" for what, keys in
                    (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
                     ("mis-shaped", [str(item[0]) for item in info["mismatched_keys"]])) if keys]
        if problems:
            raise ValueError(f"{args[0] if args else 'the folder'}: the weights do not match the model its config.json "
                             f"describes ({'; '.join(problems)[:300]}); save the model again")
        return (model, info) if wants_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to draw: a built model is initialised by the LM itself (init_parameters, from the seed) and a
        loaded one by its weights. Only the RoPE tables, buffers no checkpoint holds, are computed again here."""
        if isinstance(module, RotaryEmbedding):
            module.reset_tables()

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.lm_head

    def new_cache(self, mode: str | None = None) -> ArmCache:
        """An empty cache of the arm's own kind (mode None: its default, e.g. MLA's latent cache); pass it as
        generate(cache=...) to choose another mode (MLA's "expanded")."""
        return ArmCache(self.lm.new_caches(mode))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits (the last `logits_to_keep` positions; 0: all), the loss against `labels` (the next-token
        cross-entropy, -100 ignored) and the cache. With a cache, input_ids are the tokens after the cached ones."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask holds padding, which this model does not support (its attention has no "
                             "padding mask): give prompts of equal length, or one prompt at a time")
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        ours = self._arm_cache(cache) if use_cache else None
        logits, _ = self.lm(input_ids, None if ours is None else ours.caches, last_only=logits_to_keep == 1)
        if logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=ours)

    def _arm_cache(self, cache: Cache | None) -> ArmCache | None:
        """The arm's own cache to decode with: the one given, else a new one in place of an empty cache of another
        kind (the DynamicCache generate makes; generate then carries ours on from outputs.cache). None for an arm
        with no cached decode path."""
        if not self.lm.cache_modes():
            logger.warning_once(NO_CACHE_NOTE)
            return None
        if isinstance(cache, ArmCache):
            return cache
        if cache is None or cache.get_seq_length() == 0:
            return self.new_cache()
        raise ValueError(f"a {type(cache).__name__} holding {cache.get_seq_length()} tokens: this model decodes only "
                         "with its own cache (model.new_cache(), or none: generate makes one)")

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: Cache | None = None, **kwargs: Any) -> dict[str, Any]:
        """transformers' own, except for an arm with no cached decode path: every step then gets the whole
        sequence and no cache, as `use_cache=False` does."""
        if not self.lm.cache_modes():
            if kwargs.get("use_cache"):
                logger.warning_once(NO_CACHE_NOTE)
            next_sequence_length, cache, kwargs["use_cache"] = None, None, False
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, cache=cache,
                                                     **kwargs)


def as_transformers_model(lm: MoELanguageModel) -> Exp6MoEForCausalLM:
    """Our LM (built, trained or loaded by our loader) under the transformers wrapper, sharing its weights and
    modules: what generate() drives in the decode benchmark."""
    return Exp6MoEForCausalLM(Exp6MoEConfig(config=lm.config.to_dict()), lm=lm)


def key_mapping(config: Exp6MoEConfig, attention: AttentionFactory) -> dict[str, str]:
    """Each checkpoint tensor name (models/checkpoint.py NAME_TABLE: DeepSeek-V3 names) -> our parameter name under
    this wrapper, as from_pretrained's key_mapping: one exact pattern per parameter of a shape-only model."""
    with torch.device("meta"):
        shapes = MoELanguageModel(config.experiment(), attention)
    return {f"^{re.escape(checkpoint_name(name))}(?!.)": f"lm.{name}" for name, _ in shapes.named_parameters()}


def _config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The from_pretrained arguments that locating config.json needs (cache folder, revision, offline, ...)."""
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")
    return {key: kwargs[key] for key in keys if key in kwargs}
