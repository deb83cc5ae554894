"""Saved models: weights as safetensors under DeepSeek-V3 / Hugging Face names, the config beside them.

A checkpoint folder holds

- `model.safetensors`: every parameter once, named as DeepSeek-V3 checkpoints on the Hugging Face Hub
  name them (`model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight`, ...). Our parameter names map
  one to one through `NAME_TABLE`; only the attention tensors differ between the arms (the MLA
  modules already carry DeepSeek's own names; MHA, GQA and MQA keep `qkv_proj`/`o_proj`). The LM head
  is tied to the embedding, so it is stored once, as `model.embed_tokens.weight`, and tied again on load.
- `modeling_exp6_moe.py` (format version 2): the model's code for transformers, generated from ours at the save
  (models/huggingface.py), so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it.
- `config.json`: the arm, the whole ExperimentConfig, the format version, the parameter count,
  `tie_word_embeddings: true`, the weights file's size, and the caller's `extra` (seed, tokenizer spec,
  metrics); from version 2 also transformers' `model_type`, `auto_map` and `architectures`. It is written last,
  so a folder without it holds no finished save.

Version 1 folders (before transformers could load them) hold the same weights and project keys, so this loader
reads them too; any other version is refused in one line.

Loading is strict: a missing, unexpected or mis-shaped tensor, a missing or damaged file or an unknown
arm raises CheckpointError with one line naming it and what to do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch

from common.atomic_files import write_atomic
from common.errors import ConfigError
from common.safe_json import JSONInputError, read_json_file
from config.settings import ExperimentConfig
from models.costs import parameter_count
from models.huggingface import MODELING_FILE, GenerationError, modeling_source, transformers_keys
from models.transformer import ModelBuilder, MoELanguageModel

FORMAT = "exp6-moe-lm"
FORMAT_VERSION = 2  # 2: adds transformers' keys and the generated modeling file to version 1
READABLE_VERSIONS = (1, 2)  # what load_checkpoint reads: the weights and the project's keys are the same in both
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"  # a results folder keeps each run's model in checkpoints/<arm>-seed<seed>/


# (our parameter name, its name in the checkpoint), both directions. {layer} and {expert} are indices;
# {rest} is the attention module's own parameter name, kept as it is.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("blocks.{layer}.attn_norm.weight", "model.layers.{layer}.input_layernorm.weight"),
    ("blocks.{layer}.attention.{rest}", "model.layers.{layer}.self_attn.{rest}"),
    ("blocks.{layer}.moe_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"),
    ("blocks.{layer}.moe.router.gate.weight", "model.layers.{layer}.mlp.gate.weight"),
    ("blocks.{layer}.moe.experts.{expert}.up.weight", "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"),
    ("blocks.{layer}.moe.experts.{expert}.down.weight", "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
)
_FIELDS = {"layer": r"\d+", "expert": r"\d+", "rest": r"[A-Za-z_][\w.]*"}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
                              for i, part in enumerate(parts)))


_TO_CHECKPOINT = [(_pattern(ours), theirs) for ours, theirs in NAME_TABLE]
_FROM_CHECKPOINT = [(_pattern(theirs), ours) for ours, theirs in NAME_TABLE]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def checkpoint_name(name: str) -> str:
    """Our parameter name -> its DeepSeek-V3 / Hugging Face checkpoint name (ValueError if it has none)."""
    renamed = _rename(name, _TO_CHECKPOINT)
    if renamed is None:
        raise ValueError(f"parameter {name} has no checkpoint name; add it to models.checkpoint.NAME_TABLE")
    return renamed


def parameter_name(key: str) -> str:
    """A checkpoint name -> our parameter name (ValueError if it is not one of ours)."""
    renamed = _rename(key, _FROM_CHECKPOINT)
    if renamed is None:
        raise ValueError(f"checkpoint tensor {key} is not a parameter of this model family")
    return renamed


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded; the one-line message names the file or tensor and the fix."""


@dataclass
class LoadedCheckpoint:
    model: MoELanguageModel  # in eval mode, on the device asked for
    arm: str
    config: ExperimentConfig
    extra: dict[str, Any]  # what the saver added (the experiment: seed, tokenizer spec, metrics)
    directory: Path

    def tokenizer_spec(self) -> dict[str, Any]:
        """The tokenizer spec the experiment saved in config.json's extra["tokenizer"] (data/tokenizer.py
        loads it); CheckpointError when there is none, e.g. a model saved by other code."""
        spec = self.extra.get("tokenizer")
        if not isinstance(spec, dict):
            raise CheckpointError(f"{self.directory / CONFIG_FILE} names no tokenizer (no \"extra\": {{\"tokenizer\": ...}}); "
                                  "generation needs the tokenizer the model was trained with: save the model with "
                                  "exp6_trainer.py, which records it")
        return spec


def run_checkpoint_dir(output_dir: Path, arm: str, seed: int) -> Path:
    """Where the experiment saves the model of one run: OUTPUT_DIR/checkpoints/<arm>-seed<seed>/."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"{arm}-seed{seed}"


def _check_tied(model: MoELanguageModel) -> None:
    if model.lm_head.weight is not model.embed.weight:
        raise CheckpointError("the LM head is not tied to the embedding; this format stores the head once, as "
                              "model.embed_tokens.weight")


def checkpoint_state_dict(model: MoELanguageModel) -> dict[str, torch.Tensor]:
    """Every parameter once (the tied head is the embedding), under its checkpoint name; tensors detached,
    on the model's device and in its dtype."""
    _check_tied(model)
    return {checkpoint_name(name): param.detach() for name, param in model.named_parameters()}


def save_checkpoint(model: MoELanguageModel, arm: str, directory: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Write model.safetensors, the generated modeling file, then config.json, into `directory`, each atomically.

    Tensors are written contiguous, on the CPU, in the model's dtype. An arm whose attention has no source to copy
    (a lambda) raises CheckpointError before anything is written. Returns
    {"directory": str, "files": {file name: bytes}, "bytes": total}.
    """
    tensors = {key: tensor.to("cpu").contiguous() for key, tensor in checkpoint_state_dict(model).items()}
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors.values()})
    weights = safetensors.torch.save(tensors, metadata={"format": "pt"})
    try:
        modeling = modeling_source(model.attention_factory, arm).encode("utf-8")
    except GenerationError as error:
        raise CheckpointError(f"{arm}: the saved model's code for transformers cannot be generated: {error}") from None
    tokenizer = extra.get("tokenizer")
    eos_token_id = tokenizer.get("eos_token_id") if isinstance(tokenizer, dict) else None
    config_text = json.dumps({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arm": arm,
        "model_class": type(model).__name__,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "parameter_count": parameter_count(model),
        "tie_word_embeddings": True,
        "weights": {"file": WEIGHTS_FILE, "bytes": len(weights), "tensors": len(tensors)},
        "config": model.config.to_dict(),
        "extra": extra,
        **transformers_keys(eos_token_id if isinstance(eos_token_id, int) else None),
    }, indent=2, allow_nan=False) + "\n"  # serialised before anything is written: a bad `extra` writes nothing
    config_bytes = config_text.encode("utf-8")
    write_atomic(directory / WEIGHTS_FILE, lambda file: file.write(weights))
    write_atomic(directory / MODELING_FILE, lambda file: file.write(modeling))
    write_atomic(directory / CONFIG_FILE, lambda file: file.write(config_bytes))
    files = {WEIGHTS_FILE: len(weights), MODELING_FILE: len(modeling), CONFIG_FILE: len(config_bytes)}
    return {"directory": str(directory), "files": files, "bytes": sum(files.values())}


def _and_more(names: list[str]) -> str:
    return f"{names[0]} (and {len(names) - 1} more)" if len(names) > 1 else names[0]


def read_config(directory: Path) -> dict[str, Any]:
    """A saved model's config.json, checked to be this format's (CheckpointError naming the problem otherwise)."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder; give the folder a model was saved to")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} holds no finished save; save the model again")
    try:
        meta = read_json_file(path)
    except JSONInputError as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}); the file is damaged: save the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not the config of a saved {FORMAT} model (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')!r}; this code reads versions "
                              f"{' and '.join(map(str, READABLE_VERSIONS))}: use the matching version of the code")
    return meta


def load_checkpoint(directory: Path, builders: Mapping[str, ModelBuilder],
                    device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """The model saved in `directory`, rebuilt from its config.json and loaded strictly, in eval mode on `device`.

    `builders` maps arm names to the functions that build their models (arms/registry.py: arm_builders()); a
    model's shape comes from the saved config (e.g. the GQA arm's gqa_kv_heads).
    """
    directory = Path(directory)
    meta = read_config(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    arm = meta.get("arm")
    if not isinstance(arm, str) or arm not in builders:
        raise CheckpointError(f"{config_path}: unknown arm {arm!r}; expected one of {', '.join(builders)}")
    try:
        config = ExperimentConfig.from_dict(meta["config"]).validate()
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{config_path}: its \"config\" is not a usable ExperimentConfig ({error}); "
                              "save the model again") from None
    if config.vocab_size is None:
        raise CheckpointError(f"{config_path}: config.vocab_size is null; a saved model needs its vocabulary size")
    extra = meta.get("extra") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{config_path}: \"extra\" is {type(extra).__name__}, not an object; save the model again")

    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; save the model again")
    recorded = (meta.get("weights") or {}).get("bytes")
    size = weights_path.stat().st_size
    if isinstance(recorded, int) and size != recorded:
        raise CheckpointError(f"{weights_path} is {size:,} bytes but {CONFIG_FILE} records {recorded:,}: the file is "
                              "truncated or from another save; save the model again")
    try:
        tensors = safetensors.torch.load_file(weights_path, device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({str(error)[:160]}); "
                              "the file is damaged: save the model again") from None

    model = builders[arm](config)
    expected = {checkpoint_name(name): param for name, param in model.named_parameters()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{weights_path}: tensor {_and_more(missing)} is missing; the file does not hold a whole "
                              f"{arm} model as {CONFIG_FILE} describes it: save the model again")
    if unexpected:
        raise CheckpointError(f"{weights_path}: unexpected tensor {_and_more(unexpected)}; the {arm} model that "
                              f"{CONFIG_FILE} describes has no such parameter (is it another model's file?)")
    for key, param in expected.items():
        if tensors[key].shape != param.shape:
            raise CheckpointError(f"{weights_path}: tensor {key} has shape {tuple(tensors[key].shape)} but the {arm} "
                                  f"model of {CONFIG_FILE} needs {tuple(param.shape)}; the weights and {CONFIG_FILE} "
                                  "are from different models: save the model again")
        if not tensors[key].is_floating_point():
            raise CheckpointError(f"{weights_path}: tensor {key} is {tensors[key].dtype}, not floating point")
    dtypes = {tensor.dtype for tensor in tensors.values()}
    if len(dtypes) == 1:
        model.to(dtype=dtypes.pop())  # the saved dtype (float32 for every model the experiment trains)
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    model.lm_head.weight = model.embed.weight  # stored once: tie the head again
    model.to(device).eval()
    return LoadedCheckpoint(model=model, arm=arm, config=config, extra=dict(extra), directory=directory)
