"""Saved models: DeepSeek-V3 names, exact round trips, strict loading, the tokenizer beside them, and the
experiment saving every completed run (or nothing, with --no-save)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch

from arms.registry import ARM_NAMES, arm_builders
from common.errors import ConfigError
from config.cli import config_from_args
from config.settings import ExperimentConfig
from data.dataset import prepare_data
from data.offline_corpus import stdlib_documents
from data.tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer, save_tokenizer, train_offline_tokenizer
from exp6_baseline_attention_model import (
    BaselineAttentionModel,
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
)
from exp6_flash_attention_model import FlashAttentionModel
from exp6_trainer import build_parser
from models.checkpoint import (
    CONFIG_FILE,
    NAME_TABLE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_name,
    checkpoint_state_dict,
    load_checkpoint,
    parameter_name,
    run_checkpoint_dir,
    save_checkpoint,
)
from models.huggingface import MODELING_FILE
from models.transformer import MoELanguageModel
from training.experiment import run_experiment
from training.model_card import CARD_FILE
from training.results import RESULTS_FILE
from training.run_guard import ExperimentFailed

ARM_CLASSES: dict[str, Callable[..., MoELanguageModel]] = arm_builders()  # every arm of the registry


def _trained_looking(config: ExperimentConfig, arm: str) -> MoELanguageModel:
    """A model whose every parameter (norm gains included) differs from what load_checkpoint's fresh model
    starts with, so equal logits after loading prove the weights were loaded."""
    model = ARM_CLASSES[arm](config, seed=config.seed + 1)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _logits(model: MoELanguageModel, vocab_size: int) -> torch.Tensor:
    tokens = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(tokens)[0]


@pytest.mark.parametrize("q_lora_rank", [16, None], ids=["q_lora", "q_proj"])
@pytest.mark.parametrize("arm", ARM_NAMES)
def test_save_then_load_gives_identical_weights_and_logits(config, tmp_path, arm, q_lora_rank):
    cfg = config.replace(vocab_size=64, q_lora_rank=q_lora_rank, n_heads=4)  # 4 query heads: GQA has 2 K/V heads
    model = _trained_looking(cfg, arm)
    saved = save_checkpoint(model, arm, tmp_path / "ckpt", {"seed": 7, "note": "test"})
    assert saved["files"] == {name: (tmp_path / "ckpt" / name).stat().st_size
                              for name in (WEIGHTS_FILE, MODELING_FILE, CONFIG_FILE)}
    assert saved["bytes"] == sum(saved["files"].values())

    loaded = load_checkpoint(tmp_path / "ckpt", arm_builders())
    assert loaded.arm == arm and type(loaded.model.attention_modules()[0]) is type(model.attention_modules()[0])
    assert loaded.config == cfg.replace(seeds=cfg.run_seeds) and loaded.extra == {"seed": 7, "note": "test"}
    assert not loaded.model.training
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert torch.equal(_logits(model, 64), _logits(loaded.model, 64))
    # the head is stored once and tied again: the very same parameter as the embedding
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()

    keys = set(safetensors.torch.load_file(tmp_path / "ckpt" / WEIGHTS_FILE))
    assert "lm_head.weight" not in keys and not any(key.startswith("blocks.") for key in keys)
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
            "model.layers.1.self_attn.o_proj.weight"} <= keys
    attention = {key.split("self_attn.")[1] for key in keys if key.startswith("model.layers.0.self_attn.")}
    assert attention == {name for name, _ in model.attention_modules()[0].named_parameters()}  # under its own names
    if type(model.attention_modules()[0]) in (MultiHeadAttention, GroupedQueryAttention, MultiQueryAttention):
        assert attention == {"qkv_proj.weight", "o_proj.weight"}
    if arm == "deepseek":  # DeepSeek-V3's own names
        query = {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"} if q_lora_rank else {"q_proj.weight"}
        assert attention == query | {"kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight",
                                     "o_proj.weight"}

    written = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert written["arm"] == arm and written["tie_word_embeddings"] is True and written["format_version"] == 2
    assert written["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert written["dtype"] == "float32" and written["config"]["q_lora_rank"] == q_lora_rank


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_a_gqa_checkpoint_is_rebuilt_with_its_saved_kv_heads(config, tmp_path, kv_heads):
    """The GQA arm's shape comes from the saved config's gqa_kv_heads, whatever today's default is."""
    cfg = config.replace(vocab_size=64, n_heads=4, gqa_kv_heads=kv_heads)
    model = _trained_looking(cfg, "gqa")
    save_checkpoint(model, "gqa", tmp_path / "gqa", {})
    loaded = load_checkpoint(tmp_path / "gqa", arm_builders())
    assert loaded.arm == "gqa" and loaded.config.gqa_kv_heads == kv_heads
    attention = loaded.model.attention_modules()[0]
    assert isinstance(attention, MultiHeadAttention) and attention.n_kv_heads == kv_heads
    head_dim = cfg.head_dim
    assert attention.qkv_proj.weight.shape == ((4 + 2 * kv_heads) * head_dim, cfg.d_model)
    assert torch.equal(_logits(model, 64), _logits(loaded.model, 64))
    assert json.loads((tmp_path / "gqa" / CONFIG_FILE).read_text())["config"]["gqa_kv_heads"] == kv_heads


def test_the_name_table_maps_every_parameter_both_ways(config):
    for arm, cls in ARM_CLASSES.items():
        model = cls(config.replace(vocab_size=64))
        names = [name for name, _ in model.named_parameters()]
        keys = [checkpoint_name(name) for name in names]
        assert len(set(keys)) == len(keys), arm
        assert [parameter_name(key) for key in keys] == names
        assert list(checkpoint_state_dict(model)) == keys
    assert len(NAME_TABLE) == 8
    with pytest.raises(ValueError, match="lm_head.weight has no checkpoint name"):
        checkpoint_name("lm_head.weight")


def _rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Change the tensors and keep config.json's recorded size right: a consistent checkpoint of the wrong model."""
    path = directory / WEIGHTS_FILE
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    safetensors.torch.save_file(tensors, path)
    _edit_config(directory, lambda meta: meta["weights"].update(bytes=path.stat().st_size))


def _edit_config(directory: Path, change: Callable[[dict[str, Any]], object]) -> None:
    path = directory / CONFIG_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


def _damage(directory: Path, how: str) -> None:
    weights, config_file = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if how == "missing_tensor":
        _rewrite_weights(directory, lambda tensors: tensors.pop(KV_B))
    elif how == "extra_tensor":
        _rewrite_weights(directory, lambda tensors: tensors.update({"lm_head.weight": torch.zeros(64, 32)}))
    elif how == "misshaped_tensor":
        _rewrite_weights(directory, lambda tensors: tensors.update({KV_B: torch.zeros(7, 16)}))
    elif how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage_weights":  # the recorded size matches: safetensors itself must refuse it
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    elif how == "missing_weights":
        weights.unlink()
    elif how == "corrupt_config":
        config_file.write_text('{"format": "exp6-moe-lm", "arm": ')
    elif how == "missing_config":
        config_file.unlink()
    elif how == "unknown_arm":
        _edit_config(directory, lambda meta: meta.update(arm="gpt2"))
    elif how == "unknown_config_key":
        _edit_config(directory, lambda meta: meta["config"].update(bogus_setting=1))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how,message", [
    ("missing_tensor", f"tensor {KV_B} is missing"),
    ("extra_tensor", "unexpected tensor lm_head.weight"),
    ("misshaped_tensor", rf"tensor {KV_B} has shape \(7, 16\) but the deepseek model of config.json needs \(32, 16\)"),
    ("truncated_weights", r"model.safetensors is [\d,]+ bytes but config.json records [\d,]+: the file is truncated"),
    ("garbage_weights", "model.safetensors is not a readable safetensors file"),
    ("missing_weights", "model.safetensors is missing"),
    ("corrupt_config", "config.json is not readable JSON"),
    ("missing_config", "config.json is missing"),
    ("unknown_arm", "unknown arm 'gpt2'; expected one of baseline, deepseek"),
    ("unknown_config_key", "unknown config key.* bogus_setting"),
])
def test_a_damaged_or_mismatched_checkpoint_is_a_clear_one_line_error(config, tmp_path, how, message):
    directory = tmp_path / "ckpt"
    save_checkpoint(_trained_looking(config.replace(vocab_size=64), "deepseek"), "deepseek", directory, {})
    load_checkpoint(directory, arm_builders())  # sound before the damage
    _damage(directory, how)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(directory, arm_builders())
    assert "\n" not in str(error.value)


def test_an_unknown_arm_does_not_load_and_an_untied_head_is_not_saved(config, tmp_path):
    model = FlashAttentionModel(config.replace(vocab_size=64))
    save_checkpoint(model, "mla", tmp_path / "mla", {})  # models/ knows no arms: the registry refuses the name on load
    with pytest.raises(CheckpointError, match="unknown arm 'mla'"):
        load_checkpoint(tmp_path / "mla", arm_builders())
    model.lm_head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    with pytest.raises(CheckpointError, match="not tied"):
        save_checkpoint(model, "deepseek", tmp_path / "untied", {})
    assert not (tmp_path / "untied").exists()  # nothing written


def test_config_from_dict_is_the_inverse_of_to_dict_and_names_unknown_keys():
    config = ExperimentConfig(vocab_size=300, seeds=(1, 2), q_lora_rank=None)
    again = ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.seeds, tuple)
    with pytest.raises(ConfigError, match="unknown config key.*colour, flavour"):
        ExperimentConfig.from_dict({**config.to_dict(), "flavour": 1, "colour": 2})
    with pytest.raises(ConfigError, match="d_model='wide'"):
        ExperimentConfig.from_dict({"d_model": "wide"})
    assert ExperimentConfig.from_dict({"d_model": 64}) == ExperimentConfig(d_model=64)  # absent keys: defaults


# --- the tokenizer -------------------------------------------------------------------------------------------

TEXT = "def load(path):\n    \"\"\"Return the object stored at path.\"\"\"  # naïve ✓"


def test_the_offline_tokenizer_round_trips_through_its_json(tmp_path):
    tokenizer = train_offline_tokenizer(stdlib_documents(40, 800), 300)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    spec = save_tokenizer(tokenizer, tmp_path)
    assert spec["kind"] == "offline-bpe" and spec["file"] == TOKENIZER_FILE and (tmp_path / TOKENIZER_FILE).is_file()
    for again in (load_tokenizer(spec, tmp_path), load_tokenizer(tmp_path)):
        assert again.encode(TEXT) == ids and again.decode(ids) == TEXT
        assert (again.vocab_size, again.eos_token_id, again.name) == (tokenizer.vocab_size, tokenizer.eos_token_id,
                                                                      tokenizer.name)
    assert tokenizer.eos_token_id is not None
    assert tokenizer.decode([tokenizer.eos_token_id]) == "<|endoftext|>"  # special tokens stay visible


def test_a_hub_tokenizer_is_saved_as_its_name_and_files_and_loaded_again(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(stdlib_documents(40, 800), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hub_dir = tmp_path / "hub-tokenizer"  # a local folder stands in for a Hub name (AutoTokenizer takes both)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(hub_dir)

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / TOKENIZER_FILE).write_text("stale")
    assert save_tokenizer(str(hub_dir), checkpoint) == {"kind": "hub", "name": str(hub_dir)}
    assert not (checkpoint / TOKENIZER_FILE).exists()  # a name alone (not loadable here): no stale file is left
    tokenizer = load_tokenizer({"kind": "hub", "name": str(hub_dir)})
    assert tokenizer.encode(TEXT) == raw.encode(TEXT).ids and tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    spec = save_tokenizer(tokenizer, checkpoint)  # loaded: its name, and its files for transformers
    assert spec == {"kind": "hub", "name": str(hub_dir), "eos_token_id": raw.token_to_id("<|endoftext|>")}
    assert {TOKENIZER_FILE, "tokenizer_config.json"} <= {path.name for path in checkpoint.iterdir()}


def test_a_tokenizer_that_cannot_be_loaded_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json cannot be read"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="'no-such/tokenizer' is neither in the local Hugging Face cache"):
        load_tokenizer({"kind": "hub", "name": "no-such/tokenizer"})  # HF_HUB_OFFLINE=1 in tests
    with pytest.raises(TokenizerError, match="unknown tokenizer spec"):
        load_tokenizer({"kind": "sentencepiece"})


def test_a_token_cache_hit_still_has_its_tokenizer(config):
    built = prepare_data(config, lambda _: None)
    hit = prepare_data(config, lambda _: None)
    assert not built.info["cache_hit"] and hit.info["cache_hit"]
    assert built.tokenizer is not None and hit.tokenizer is not None
    assert hit.tokenizer.tokenizer_json == built.tokenizer.tokenizer_json
    assert hit.tokenizer.encode(TEXT) == built.tokenizer.encode(TEXT)
    assert hit.tokenizer.vocab_size == hit.vocab_size == built.vocab_size


# --- the experiment -------------------------------------------------------------------------------------------

TRAINED: dict[str, MoELanguageModel] = {}


class KeptBaseline(BaselineAttentionModel):
    """The baseline arm, kept after training so the test can compare it with what was saved."""

    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, seed=seed)
        TRAINED["baseline"] = self


class KeptDeepseek(FlashAttentionModel):
    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, seed=seed)
        TRAINED["deepseek"] = self


class DivergingDeepseek(FlashAttentionModel):
    """NaN from the first step: the run fails."""

    def __init__(self, config: ExperimentConfig, seed: int | None = None) -> None:
        super().__init__(config, seed=seed)
        with torch.no_grad():
            self.norm.weight.fill_(float("nan"))


def test_every_completed_run_saves_a_loadable_model(config):
    lines: list[str] = []
    TRAINED.clear()
    results = run_experiment(config, builders={"baseline": KeptBaseline, "deepseek": KeptDeepseek}, log=lines.append)
    written = json.loads((Path(config.output_dir) / RESULTS_FILE).read_text())
    directories = []
    for arm in ("baseline", "deepseek"):
        record = results[arm]["runs"][0]
        directory = run_checkpoint_dir(Path(config.output_dir), arm, config.seed)
        assert record["checkpoint"]["directory"] == str(directory) and directory.is_dir()
        assert written[arm]["runs"][0]["checkpoint"] == record["checkpoint"]  # in the JSON as well
        files = {path.name: path.stat().st_size for path in directory.iterdir()}
        assert files == record["checkpoint"]["files"]
        assert set(files) == {WEIGHTS_FILE, MODELING_FILE, CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json", CARD_FILE}
        assert record["checkpoint"]["bytes"] == sum(files.values())
        directories.append(str(directory))

        loaded = load_checkpoint(directory, arm_builders())
        assert loaded.arm == arm and loaded.extra["seed"] == config.seed
        assert loaded.extra["val_loss"] == record["val_loss"]
        assert torch.equal(_logits(loaded.model, loaded.config.vocab_size or 0),
                           _logits(TRAINED[arm], loaded.config.vocab_size or 0))  # the trained weights, exactly
        tokenizer = load_tokenizer(loaded.extra["tokenizer"], directory)
        assert tokenizer.vocab_size == loaded.config.vocab_size
        assert any(line == f"{arm} (seed {config.seed}): model saved to {directory} "
                           f"({record['checkpoint']['bytes'] / 1e6:.1f} MB)" for line in lines), lines
    assert f"Models saved: {', '.join(directories)}" in lines


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")  # the plot of a curve that is NaN from step 0
def test_no_save_writes_nothing_and_a_failed_run_saves_nothing(config):
    lines: list[str] = []
    cfg = config.replace(save_checkpoints=False, max_steps=2, eval_every=2)
    results = run_experiment(cfg, log=lines.append)
    assert [results[arm]["runs"][0]["checkpoint"] for arm in ("baseline", "deepseek")] == [None, None]
    assert not (Path(cfg.output_dir) / "checkpoints").exists()
    assert "Models not saved (--no-save)." in lines

    failing = config.replace(max_steps=2, eval_every=2, output_dir=str(Path(config.output_dir) / "failing"))
    with pytest.raises(ExperimentFailed):  # deepseek has no completed run: nothing to compare
        run_experiment(failing, builders={"baseline": BaselineAttentionModel, "deepseek": DivergingDeepseek},
                       log=lambda _: None)
    results = json.loads((Path(failing.output_dir) / RESULTS_FILE).read_text())
    assert results["deepseek"]["runs"][0]["status"] == "failed" and results["deepseek"]["runs"][0]["checkpoint"] is None
    assert [path.name for path in (Path(failing.output_dir) / "checkpoints").iterdir()] == [f"baseline-seed{config.seed}"]


def test_a_failed_save_keeps_the_results_and_says_so(config, monkeypatch):
    import training.run_outputs

    def disk_full(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.run_outputs, "save_checkpoint", disk_full)
    lines: list[str] = []
    results = run_experiment(config.replace(max_steps=2, eval_every=2), log=lines.append)
    assert results["experiment"]["status"] == "completed"
    for arm in ("baseline", "deepseek"):
        record = results[arm]["runs"][0]
        assert record["status"] == "completed" and record["checkpoint"] is None
        assert "No space left on device" in record["checkpoint_error"]
        assert any(line.startswith(f"{arm} (seed {config.seed}): saving the model to") and "FAILED" in line
                   for line in lines)


def test_no_save_flag_reaches_the_config():
    parser = build_parser()
    assert config_from_args(parser.parse_args([]), cuda_available=False)[0].save_checkpoints is True
    assert config_from_args(parser.parse_args(["--no-save"]), cuda_available=False)[0].save_checkpoints is False
    assert "--no-save" in parser.format_help()
