"""Saved models are transformers models: every arm's folder loads with AutoModelForCausalLM and AutoTokenizer offline,
computes our logits, generates our greedy tokens through its own KV cache, and still loads with our loader; the
modeling file beside the weights is generated from the current code and imports only torch, transformers and the
standard library."""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_imports

import inference.generate as generate
from arms import registry
from arms.arm import Arm
from common.errors import ConfigError
from data.offline_corpus import stdlib_documents
from data.tokenizer import TextTokenizer, load_tokenizer, save_tokenizer, train_offline_tokenizer
from exp6_baseline_attention_model import MultiHeadAttention
from inference.generate import generate_ids
from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint
from models import huggingface
from models.huggingface import (
    ALLOWED_PACKAGES,
    MODEL_TYPE,
    MODELING_FILE,
    REPO,
    foreign_imports,
    modeling_source,
    read_module,
)
from models.transformer import MoELanguageModel
from tests.conftest import tiny_config
from training.experiment import run_experiment
from training.results import RESULTS_FILE

PROMPT = "def load(path):"
NEW_TOKENS = 16


class NoCacheAttention(MultiHeadAttention):
    """An arm's attention with no cached decode path (the baseline's, declaring none)."""

    cache_modes = ()


@functools.cache
def tokenizer() -> TextTokenizer:
    return train_offline_tokenizer(stdlib_documents(20, 2000), 300)


def varied_model(arm: Arm, folder: Path) -> MoELanguageModel:
    """The arm's model (4 query heads: GQA has 2 K/V heads, MQA 1) with O(1) logits, of the first of 10 random draws
    whose greedy continuation of PROMPT is more than 3 distinct tokens: a comparison on a short cycle proves little."""
    config = tiny_config(folder, vocab_size=tokenizer().vocab_size, n_heads=4, dropout=0.0, router_noise_std=0.0)
    prompt = tokenizer().encode(PROMPT)
    for draw in range(10):
        model = arm.build(config, seed=5).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, param.shape[-1] ** -0.5, generator=torch.Generator().manual_seed(draw))
        if len(set(generate_ids(model, prompt, NEW_TOKENS, cache_mode="none"))) > 3:
            return model
    pytest.fail(f"{arm.name}: no draw of 10 continues the prompt with more than 3 distinct tokens")


def save(arm: Arm, folder: Path) -> MoELanguageModel:
    """Save as the experiment does (training/run_outputs.py): the tokenizer's files, then the model."""
    model = varied_model(arm, folder)
    folder.mkdir(parents=True)
    spec = save_tokenizer(tokenizer(), folder)
    save_checkpoint(model, arm.name, folder, {"seed": 5, "tokenizer": spec})
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, MoELanguageModel]]:
    """Every arm of the registry saved once: arm -> (folder, the model that was saved)."""
    root = tmp_path_factory.mktemp("saved")
    return {name: (root / name, save(arm, root / name)) for name, arm in registry.ARMS.items()}


@functools.cache
def from_pretrained(folder: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def prompt_ids(model: Any) -> torch.Tensor:
    return torch.tensor([tokenizer().encode(PROMPT)], device=model.device)


# --- loading --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arm", registry.ARM_NAMES)
def test_every_arm_loads_with_from_pretrained_and_computes_our_logits(saved, arm: str) -> None:
    folder, ours = saved[arm]
    written = json.loads((folder / CONFIG_FILE).read_text())
    assert written["model_type"] == MODEL_TYPE and written["architectures"] == ["Exp6MoEForCausalLM"]
    assert set(written["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"} and (folder / MODELING_FILE).is_file()
    assert written["format"] == "exp6-moe-lm" and written["format_version"] == 2 and written["arm"] == arm  # ours too

    model = from_pretrained(folder)
    assert not model.training and model.config.vocab_size == tokenizer().vocab_size
    assert model.lm.lm_head.weight is model.lm.embed.weight  # tied again
    tokens = torch.randint(0, tokenizer().vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)[0]
        assert torch.allclose(model(tokens).logits, expected, atol=1e-5, rtol=0)
        assert torch.allclose(model(tokens, logits_to_keep=1).logits, expected[:, -1:], atol=1e-5, rtol=0)
        loaded = load_checkpoint(folder, registry.arm_builders())  # our own loader reads the same folder
        assert loaded.arm == arm and torch.equal(loaded.model(tokens)[0], expected)


def test_the_tokenizer_loads_with_autotokenizer_offline(saved) -> None:
    folder, _ = saved["baseline"]
    auto = AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(json.loads((folder / CONFIG_FILE).read_text())["extra"]["tokenizer"], folder)
    text = 'def f(x):\n    """Return x."""  # naïve ✓<|endoftext|>'
    assert auto.encode(text, add_special_tokens=False) == ours.encode(text) == tokenizer().encode(text)
    assert auto.decode(ours.encode(text)) == text and auto.eos_token_id == tokenizer().eos_token_id is not None


def test_a_hub_tokenizer_is_saved_with_its_files(tmp_path: Path) -> None:
    """A Hub tokenizer's own files go into the folder: AutoTokenizer and our loader read them there, with the
    tokenizer neither in the cache nor reachable (a local folder stands in for a Hub name and is removed)."""
    hub = tmp_path / "hub-tokenizer"
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    raw = tokenizer().tokenizer_json
    assert raw is not None
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw), eos_token="<|endoftext|>").save_pretrained(hub)
    loaded = load_tokenizer({"kind": "hub", "name": str(hub)})
    folder = tmp_path / "model"
    folder.mkdir()
    spec = save_tokenizer(loaded, folder)
    assert spec == {"kind": "hub", "name": str(hub), "eos_token_id": tokenizer().eos_token_id}
    for file in hub.iterdir():
        file.unlink()
    hub.rmdir()
    again = load_tokenizer(spec, folder)
    assert again.encode(PROMPT) == tokenizer().encode(PROMPT) and again.hub_name == str(hub)
    assert AutoTokenizer.from_pretrained(folder).encode(PROMPT, add_special_tokens=False) == tokenizer().encode(PROMPT)


def test_a_version_1_folder_still_loads_with_our_loader_and_an_unknown_version_is_one_line(saved, tmp_path) -> None:
    """Version 1 (before transformers could load a folder) has the same weights and project keys, without the
    transformers keys and the modeling file."""
    folder = tmp_path / "v1"
    folder.mkdir()
    for name in (WEIGHTS_FILE, "tokenizer.json"):
        (folder / name).write_bytes((saved["deepseek"][0] / name).read_bytes())
    meta = json.loads((saved["deepseek"][0] / CONFIG_FILE).read_text())
    for key in ("model_type", "architectures", "auto_map", "eos_token_id"):
        del meta[key]
    (folder / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    loaded = load_checkpoint(folder, registry.arm_builders())
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens)[0], saved["deepseek"][1](tokens)[0])

    # saved again with our code (docs/inference.md), it is version 2: transformers loads it
    spec = save_tokenizer(load_tokenizer(loaded.tokenizer_spec(), loaded.directory), loaded.directory)
    save_checkpoint(loaded.model, loaded.arm, loaded.directory, {**loaded.extra, "tokenizer": spec})
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, saved["deepseek"][1](tokens)[0], atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(folder).encode(PROMPT, add_special_tokens=False) == tokenizer().encode(PROMPT)

    (folder / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder, registry.arm_builders())
    assert "\n" not in str(error.value) and "format version 3; this code reads versions 1 and 2" in str(error.value)


def test_loading_is_strict(saved, tmp_path: Path) -> None:
    """A tensor missing from the weights is an error naming it, not a model with random weights."""
    import safetensors.torch

    folder = tmp_path / "damaged"
    folder.mkdir()
    for file in saved["baseline"][0].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    tensors = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    del tensors["model.norm.weight"]
    safetensors.torch.save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"\(missing lm\.norm\.weight\); save the model again$"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_save_pretrained_writes_the_checkpoint_names_again(saved, tmp_path: Path) -> None:
    """A model loaded through transformers and saved with save_pretrained keeps the DeepSeek-V3 names on disk (the
    name mapping runs backwards), so the new folder loads with transformers and with our loader."""
    model = from_pretrained(saved["deepseek"][0])
    model.save_pretrained(tmp_path / "resaved")
    tokens = torch.tensor([[5, 6, 7, 8]])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    ours = load_checkpoint(tmp_path / "resaved", registry.arm_builders()).model
    with torch.no_grad():
        expected = model(tokens).logits
        assert torch.equal(again(tokens).logits, expected)
        assert torch.allclose(ours(tokens)[0], expected, atol=1e-5, rtol=0)


# --- generation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arm", registry.ARM_NAMES)
def test_greedy_generate_gives_the_tokens_of_inference_generate(saved, arm: str, capsys) -> None:
    folder, _ = saved[arm]
    model = from_pretrained(folder)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = hf_tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    text = hf_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert isinstance(text, str)
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(folder), "--prompt", PROMPT, "--greedy",
                          "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out.split(") ==\n", 1)[1]
    assert printed == PROMPT + text + "\n\n"
    ours = load_checkpoint(folder, registry.arm_builders()).model
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == list(generate_ids(ours, tokenizer().encode(PROMPT), NEW_TOKENS))


def cached_arm_modes() -> list[tuple[str, str]]:
    return [(name, mode) for name, arm in registry.ARMS.items()
            for mode in arm.build(tiny_config(Path("."), vocab_size=8)).cache_modes()]


@pytest.mark.parametrize("arm, mode", cached_arm_modes())
def test_generate_with_the_arms_own_cache_equals_no_cache(saved, arm: str, mode: str) -> None:
    """generate(use_cache=True) decodes through the arm's own KVCache per layer (its default mode: MLA's latent, GQA's
    and MQA's few heads), behind transformers' Cache API; any other mode is a cache passed in. Both give the tokens
    of recomputing the whole prefix, for a batch of two prompts."""
    folder, ours = saved[arm]
    model = from_pretrained(folder)
    first, second = tokenizer().encode(PROMPT), tokenizer().encode("class Path(object):")
    length = min(len(first), len(second))  # equal lengths: the model takes no padding
    prompts = torch.tensor([first[:length], second[:length]])
    reference = model.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    default = mode == ours.cache_modes()[0]
    cache = None if default else model.new_cache(mode)
    out = model.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, cache=cache,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference)
    kv = out.cache.caches
    assert type(out.cache).__name__ == "ArmCache" and [c.mode for c in kv] == [mode] * ours.config.n_layers
    assert out.cache.get_seq_length() == prompts.shape[1] + NEW_TOKENS - 1 == kv[0].length
    per_token = ours.attention_modules()[0].kv_cache_values_per_token(mode) * 4  # fp32
    assert all(c.bytes_per_token() == per_token for c in kv)


@pytest.mark.parametrize("arm", sorted({name for name, _ in cached_arm_modes()}))
def test_beam_search_reorders_the_arms_own_cache(saved, arm: str) -> None:
    """Beam search reorders the cached sequences at every step (ArmCacheLayer.reorder_cache -> KVCache.select)."""
    model = from_pretrained(saved[arm][0])
    ids = prompt_ids(model)
    beams = {use_cache: model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=3,
                                       num_return_sequences=2, use_cache=use_cache) for use_cache in (True, False)}
    assert torch.equal(beams[True], beams[False]) and beams[True].shape[0] == 2


def test_an_arm_without_a_cached_decode_path_generates_and_says_so(tmp_path: Path, caplog) -> None:
    arm = Arm("nocache", "MHA, no cache", NoCacheAttention)
    folder = tmp_path / "nocache"
    save(arm, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = prompt_ids(model)
    reference = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    with caplog.at_level(logging.WARNING):
        cached = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    assert torch.equal(cached, reference)
    assert "no cached decode path: every generated token recomputes the whole prefix" in caplog.text


def test_padding_is_refused_in_one_line(saved) -> None:
    model = from_pretrained(saved["baseline"][0])
    with pytest.raises(ValueError, match="^attention_mask holds padding, which this model does not support"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))


# --- the modeling file ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arm", registry.ARM_NAMES)
def test_the_modeling_file_imports_only_torch_transformers_and_the_standard_library(saved, arm: str) -> None:
    path = saved[arm][0] / MODELING_FILE
    allowed = set(ALLOWED_PACKAGES) | set(sys.stdlib_module_names)
    assert set(get_imports(path)) <= allowed  # what transformers checks before it runs the file
    assert foreign_imports(ast.parse(path.read_text())) == ()
    optional = {alias.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} - allowed - {"__future__"}
    assert optional <= {"flash_attn"}  # imported inside a try, when asked for on a GPU


@pytest.mark.parametrize("arm", registry.ARM_NAMES)
def test_the_modeling_file_is_the_current_code_copied_verbatim(saved, arm: str) -> None:
    """Every class, function and assignment in it is the text of a top-level definition of a project module, as that
    module reads now; the only other lines are the header, the imports, the section comments and the binding of
    ATTENTION. So no hand-kept copy exists, and a save always writes the code as it stands."""
    folder, model = saved[arm]
    text = (folder / MODELING_FILE).read_text()
    assert text == modeling_source(model.attention_factory, arm)
    sources = {path: read_module(".".join(path.relative_to(REPO).with_suffix("").parts)) for path in
               [REPO / line.split(" ", 2)[2].split(" (")[0] for line in text.splitlines() if line.startswith("# ---- ")]}
    copied = {module.source_of(statement) for module in sources.values() for statement in module.definitions.values()}
    body = ast.parse(text).body
    lines = text.splitlines()
    for statement in body[2:-1]:  # after the docstring and the __future__ import, before ATTENTION's binding
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            continue
        own = "\n".join(lines[min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])]) - 1:
                              statement.end_lineno])
        assert any(own in definition for definition in copied), own[:200]
    assert ast.unparse(body[-1]) == f"ATTENTION = {registry.ARMS[arm].attention.__name__}"
    assert not list(REPO.glob(f"**/{MODELING_FILE}")), "no committed or stray copy of a generated file"


def test_the_generator_follows_names_across_modules_and_refuses_what_it_cannot_copy(tmp_path: Path, monkeypatch) -> None:
    """On a made-up project: a name passed on by a module that defines nothing still orders its source first; a
    constant defined the same way in two modules is copied once, and the copy runs; a name two modules define
    differently, an import outside torch, transformers and the standard library, and one name imported two ways
    are refused in one line."""
    package = tmp_path / "userpkg"
    package.mkdir()
    files = {
        "__init__.py": "",
        "base.py": "import torch\n\nEPS = 1e-6\n\n\nclass Base(torch.nn.Module):\n    eps = EPS\n",
        "relay.py": "from userpkg.base import Base\n",  # passes Base on, defines nothing the arm needs
        "arm.py": "from userpkg.relay import Base\n\nEPS = 1e-6\n\n\nclass Mine(Base):\n    also = EPS\n",
        "other_eps.py": "from userpkg.base import Base\n\nEPS = 1e-5\n\n\nclass Mine(Base):\n    also = EPS\n",
        "numpy_arm.py": "import numpy\n\n\nclass Mine:\n    table = numpy.zeros(3)\n",
        "twice.py": ("from collections.abc import Callable\nfrom userpkg.other import Hook\n\n\n"
                     "class Mine:\n    run: Callable\n    hook = Hook\n"),
        "other.py": "from typing import Callable\n\nHook = Callable[[int], int]\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(huggingface, "REPO", tmp_path)
    huggingface.is_project_module.cache_clear()
    try:
        closure = huggingface.Closure()
        closure.add("userpkg.arm", "Mine")
        assert huggingface.module_order(closure) == ["userpkg.base", "userpkg.arm"]  # relay only passed Base on
        assert {i.line() for i in closure.external} == {"import torch"}
        code = "\n\n".join(huggingface.definition_blocks(closure))
        assert code.count("EPS = 1e-6") == 1  # the same in both modules: copied once
        namespace: dict[str, Any] = {}
        exec(compile("import torch\n" + code, "generated", "exec"), namespace)
        assert namespace["Mine"].also == namespace["Mine"].eps == 1e-6
        differing = huggingface.Closure()
        differing.add("userpkg.other_eps", "Mine")
        with pytest.raises(huggingface.GenerationError, match=r"other_eps.py:3 defines EPS differently"):
            huggingface.definition_blocks(differing)
        with pytest.raises(huggingface.GenerationError, match="numpy_arm.py imports numpy for the model; "):
            huggingface.Closure().add("userpkg.numpy_arm", "Mine")
        with pytest.raises(huggingface.GenerationError, match="Callable is imported as from collections.abc import "
                                                              "Callable and as from typing import Callable"):
            huggingface.Closure().add("userpkg.twice", "Mine")
    finally:
        huggingface.is_project_module.cache_clear()


def test_an_attention_with_no_source_to_copy_is_refused_before_training_and_when_saved(config, monkeypatch) -> None:
    """A lambda has no source to copy into the modeling file: preflight says so before anything trains, and a save
    that gets one anyway writes nothing."""
    attention = lambda config, layer: MultiHeadAttention(config, layer)  # noqa: E731 - the point of the test
    monkeypatch.setitem(registry.ARMS, "lambda", Arm("lambda", "MHA by a lambda", attention))
    monkeypatch.setattr(registry, "ARM_NAMES", tuple(registry.ARMS))
    with pytest.raises(ConfigError, match=r"^arm lambda: a saved model carries its code, which cannot be generated: "
                                          r".* is not a class or function defined at the top level"):
        run_experiment(config.replace(arms=("baseline", "lambda")), log=lambda line: None)
    assert not Path(config.output_dir, RESULTS_FILE).exists()
    model = MoELanguageModel(config.replace(vocab_size=8), attention)
    folder = Path(config.output_dir) / "x"
    with pytest.raises(CheckpointError, match="is not a class or function defined at the top level"):
        save_checkpoint(model, "lambda", folder, {})
    assert not folder.exists()


def test_the_folder_loads_in_a_python_that_cannot_import_the_project(saved, tmp_path: Path) -> None:
    """In a fresh interpreter outside the repository (no project module importable), as a user of the folder runs it."""
    folder, ours = saved["deepseek"]
    script = ("import json, sys, torch\n"
              "from transformers import AutoModelForCausalLM\n"
              f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
              "assert not any(m.split('.')[0] in ('models', 'config', 'common', 'deepseek_modeling') for m in sys.modules)\n"
              "ids = torch.tensor([[1, 2, 3, 4]])\n"
              "print(json.dumps(model(ids).logits[0, -1].tolist()))\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = ours(torch.tensor([[1, 2, 3, 4]]))[0][0, -1]
    assert torch.allclose(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), expected, atol=1e-5, rtol=0)
