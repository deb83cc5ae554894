"""Data: disjoint split, real loading code on local files, a cache that is checked before it is trusted."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from config.settings import ExperimentConfig
from data import dataset as dataset_module
from data.dataset import (
    DataPlan,
    _load_cache,
    _save_cache,
    _tokenize,
    batch_starts,
    prepare_data,
    split_tokens,
    training_batch,
    validation_windows,
)
from data.offline_corpus import stdlib_documents
from data.sources import hub_documents, local_documents
from data.tokenizer import TextTokenizer, hub_tokenizer, offline_tokenizer_from_json, train_offline_tokenizer


def test_split_is_contiguous_and_no_validation_token_is_in_any_training_window(config):
    tokens = torch.arange(1000)  # each position has a unique id, so overlap is detectable
    train, tune, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(tune) == 0 and len(val) == 100
    assert torch.equal(torch.cat([train, val]), tokens)
    cfg = config.replace(max_steps=50, batch_size=8)
    starts = batch_starts(len(train), cfg, seed=3)
    seen = set()
    for step in range(cfg.max_steps):
        x, y = training_batch(train, starts[step], cfg.max_seq_len)
        seen.update(x.flatten().tolist())
        seen.update(y.flatten().tolist())
    val_x, val_y = validation_windows(val, cfg.max_seq_len)
    val_ids = set(val_x.flatten().tolist()) | set(val_y.flatten().tolist())
    assert seen and val_ids and seen.isdisjoint(val_ids)
    assert int(starts.max()) <= len(train) - (cfg.max_seq_len + 1)  # windows end inside the training part


def test_three_way_split_carves_the_tuning_set_from_the_end_of_training():
    tokens = torch.arange(1003)
    train, tune, val = split_tokens(tokens, 0.1, 0.15)
    assert torch.equal(torch.cat([train, tune, val]), tokens)  # contiguous, disjoint, nothing lost
    assert (len(tune), len(val)) == (int(1003 * 0.15), 1003 - int(1003 * 0.9))
    plain_train, plain_tune, plain_val = split_tokens(tokens, 0.1)
    assert torch.equal(plain_val, val) and len(plain_tune) == 0
    assert torch.equal(plain_train, torch.cat([train, tune]))  # without a sweep the tuning tokens train


def test_without_a_sweep_the_data_and_batches_are_those_of_the_two_way_split(config):
    """The default run is unchanged by the tuning set: the tokens it trains and validates on, and so every
    batch, are exactly the first int(n * (1 - val_fraction)) tokens and the rest, as before the third part."""
    plain = prepare_data(config, log=lambda _: None)
    swept = prepare_data(config.replace(lr_sweep=True), log=lambda _: None)
    n = plain.info["total_tokens"]
    assert len(plain.train) == int(n * (1 - config.val_fraction)) and len(plain.tune) == 0
    assert torch.equal(plain.train, torch.cat([swept.train, swept.tune])) and torch.equal(plain.val, swept.val)
    assert len(swept.tune) == int(n * config.tuning_fraction) and swept.info["tuning_tokens"] == len(swept.tune)
    assert torch.equal(batch_starts(len(plain.train), config, 42),
                       batch_starts(int(n * (1 - config.val_fraction)), config, 42))
    with pytest.raises(ValueError, match="no tuning set"):
        plain.for_tuning()
    tuning = swept.for_tuning()
    assert tuning.val is swept.tune and tuning.train is swept.train


def test_documents_touched_counts_the_documents_in_a_part():
    eos = 0
    assert dataset_module.documents_touched(torch.tensor([5, 6, 0, 7, 0, 8]), eos) == 3
    assert dataset_module.documents_touched(torch.tensor([5, 6, 0]), eos) == 1  # the last EOS ends the only one
    assert dataset_module.documents_touched(torch.tensor([5, 6]), None) is None


def test_batches_are_shifted_by_one_and_fixed_by_seed(config):
    train = torch.arange(500)
    starts = batch_starts(len(train), config, seed=1)
    assert torch.equal(starts, batch_starts(len(train), config, seed=1))
    assert not torch.equal(starts, batch_starts(len(train), config, seed=2))
    x, y = training_batch(train, starts[0], config.max_seq_len)
    assert x.shape == (config.batch_size, config.max_seq_len)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_validation_windows_do_not_overlap(config):
    val = torch.arange(100)
    x, y = validation_windows(val, 16)
    assert x.shape == (6, 16)
    assert torch.equal(y, x + 1)
    assert len(set(x.flatten().tolist())) == x.numel()


def test_offline_corpus_and_tokenizer_need_no_network():
    docs = stdlib_documents(20, 500)
    assert len(docs) == 20 and all(0 < len(d) <= 500 for d in docs)
    tok = train_offline_tokenizer(docs, 300)
    assert tok.vocab_size <= 300
    ids = tok.encode(docs[0])
    assert ids and max(ids) < tok.vocab_size


def test_unreachable_hub_says_offline_on_build_and_on_cache_hit(config):
    for attempt in ("build", "cache hit"):
        lines: list[str] = []
        data = prepare_data(config.replace(offline=False), lines.append)  # HF_HUB_OFFLINE=1 in tests
        offline_lines = [line for line in lines if line.startswith("Offline")]
        assert len(offline_lines) == 1 and "cannot be reached" in offline_lines[0], (attempt, lines)
        assert lines.index(offline_lines[0]) == 0, "said before the data is used"
        assert data.info["offline"] is True and data.info["cache_hit"] == (attempt == "cache hit")
        assert len(data.train) + len(data.val) == config.max_tokens


def test_offline_flag_is_said_once_and_the_data_line_names_the_tokenizer(config):
    for attempt in ("build", "cache hit"):
        lines: list[str] = []
        data = prepare_data(config, lines.append)
        assert [line for line in lines if line.startswith("Offline")] == [
            f"Offline (--offline): using {offline_words()}."], attempt
        data_line = next(line for line in lines if line.startswith("Data: "))
        assert f"tokenizer {data.info['tokenizer']}" in data_line and data.info["tokenizer"].startswith("byte-level BPE")
        assert ("from cache" if attempt == "cache hit" else "cached in") in data_line


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "stale_meta", "no_tokenizer", "bad_tokenizer"])
def test_damaged_cache_is_detected_and_rebuilt(config, damage):
    first = prepare_data(config, lambda _: None)
    npy = next(Path(config.cache_dir).glob("tokens-*.npy"))
    meta = npy.with_suffix(".json")
    tokenizer_file = npy.with_suffix(".tokenizer.json")
    if damage == "no_tokenizer":
        tokenizer_file.unlink()
    elif damage == "bad_tokenizer":
        tokenizer_file.write_text("{not json")
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:100])
    elif damage == "garbage":
        npy.write_bytes(b"not a numpy file")
    elif damage == "flip":  # a valid array whose content no longer matches its checksum
        arr = np.load(npy)
        arr[5] = (arr[5] + 1) % 50
        np.save(npy, arr)
    else:
        info = json.loads(meta.read_text())
        info["key"]["max_tokens"] = 1
        meta.write_text(json.dumps(info))
    lines: list[str] = []
    rebuilt = prepare_data(config, lines.append)
    assert any("damaged or stale" in line for line in lines)
    assert not rebuilt.info["cache_hit"]
    assert torch.equal(rebuilt.train, first.train) and torch.equal(rebuilt.val, first.val)
    assert rebuilt.tokenizer is not None and tokenizer_file.exists()


def test_local_text_jsonl_and_parquet_files(config, tmp_path):
    texts = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20 for i in range(30)]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(texts))
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    for path in (txt, jsonl, parquet):
        docs = local_documents(str(path), config.replace(max_chars_per_doc=50, num_documents=10))
        assert docs == [t[:50] for t in texts[:10]], path.suffix
    data = prepare_data(config.replace(data_path=str(jsonl), max_tokens=1500), lambda _: None)
    assert "local file" in data.info["corpus_description"]
    assert data.info["source_label"] == "your file corpus.jsonl"


def test_bad_local_path_fails_with_a_clear_message(config, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        prepare_data(config.replace(data_path=str(tmp_path / "missing.txt")), lambda _: None)
    bad = tmp_path / "data.csv"
    bad.write_text("a,b")
    with pytest.raises(ConfigError, match="unknown format"):
        prepare_data(config.replace(data_path=str(bad)), lambda _: None)


def test_too_few_tokens_for_one_window_fails_before_training(config):
    with pytest.raises(ConfigError, match="fewer than one window"):
        prepare_data(config.replace(num_documents=1, max_chars_per_doc=60, max_tokens=3000), lambda _: None)


def test_hub_loading_code_on_a_local_copy(config, tmp_path, monkeypatch):
    """The real Hub path (datasets streaming + AutoTokenizer) run on a local dataset and tokenizer folder."""
    pytest.importorskip("datasets", reason="the Hub path streams with `datasets`, not installed here "
                                           "(requirements.txt installs it; CI runs this test)")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import PreTrainedTokenizerFast

    repo = tmp_path / "smollm-corpus"
    (repo / "cosmopedia-v2").mkdir(parents=True)
    texts = [f"Lesson {i}. " + "Plants make food from light, water and air. " * 80 for i in range(40)]
    pq.write_table(pa.table({"text": texts}), repo / "cosmopedia-v2" / "train-00000.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: cosmopedia-v2\n  data_files:\n  - split: train\n    path: cosmopedia-v2/*.parquet\n---\n")
    tok_dir = tmp_path / "tokenizer"
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tok_dir)

    cfg = config.replace(offline=False, dataset_name=str(repo), dataset_config="cosmopedia-v2",
                         tokenizer_name=str(tok_dir), num_documents=12, max_chars_per_doc=3000, max_tokens=4000)
    docs = hub_documents(cfg)
    assert docs == [t[:3000] for t in texts[:12]]
    assert hub_tokenizer(str(tok_dir)).vocab_size == raw.get_vocab_size()
    monkeypatch.setattr(dataset_module, "hub_unreachable_reason", lambda: None)
    lines: list[str] = []
    data = prepare_data(cfg, lines.append)
    assert data.info["offline"] is False and not any(line.startswith("Offline") for line in lines)
    assert str(repo) in data.info["corpus_description"]
    assert data.info["total_tokens"] == 4000


def test_without_datasets_the_hub_test_is_skipped_with_its_reason():
    """On a machine without `datasets` (the GPU check's, or a torch-floor environment that left it out) the Hub
    test says why it did not run, instead of failing with ModuleNotFoundError."""
    block = ("import sys; sys.modules['datasets'] = None; import pytest; "  # as if not installed
             "sys.exit(pytest.main(['-q', '-rs', '-o', 'addopts=', '-p', 'no:cacheprovider', "
             "'tests/test_data.py::test_hub_loading_code_on_a_local_copy']))")
    result = subprocess.run([sys.executable, "-c", block], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout + result.stderr
    assert "the Hub path streams with `datasets`, not installed here" in result.stdout


def offline_words() -> str:
    from data.offline_corpus import describe

    return f"{describe()} with a BPE tokenizer trained on it; results then test the pipeline, not web-text quality"


FAKE_DOCUMENTS = [chr(ord("a") + i % 26) * 99 for i in range(50)]  # 99 characters + EOS = 100 tokens each


@pytest.fixture
def fake_hub(monkeypatch) -> list[str]:
    """A reachable Hub serving FAKE_DOCUMENTS and a character tokenizer; returns the calls it received."""
    calls: list[str] = []

    def documents(config: ExperimentConfig) -> list[str]:
        calls.append("documents")
        return FAKE_DOCUMENTS[: config.num_documents]

    def tokenizer(name: str, local_files_only: bool = False) -> TextTokenizer:
        calls.append("tokenizer")
        return TextTokenizer("fake-characters", 128, lambda text: [ord(c) for c in text], 0)

    monkeypatch.setattr(dataset_module, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(dataset_module, "hub_documents", documents)
    monkeypatch.setattr(dataset_module, "hub_tokenizer", tokenizer)
    return calls


def test_a_reachable_hub_never_uses_an_offline_cache(config, fake_hub):
    offline = prepare_data(config, lambda _: None)  # an earlier --offline run leaves its cache
    assert offline.info["offline"] and not fake_hub
    lines: list[str] = []
    online = prepare_data(config.replace(offline=False), lines.append)
    assert fake_hub == ["documents", "tokenizer"]
    assert online.info["offline"] is False and not online.info["cache_hit"]
    assert online.info["tokenizer"] == "fake-characters" and online.info["source_label"] == config.dataset_name
    assert not any(line.startswith("Offline") for line in lines), lines


def test_an_online_cache_needs_no_network(config, fake_hub, monkeypatch):
    online = config.replace(offline=False)
    prepare_data(online, lambda _: None)

    def no_probe() -> str | None:
        raise AssertionError("a valid online cache must not probe the Hub")

    monkeypatch.setattr(dataset_module, "hub_unreachable_reason", no_probe)
    lines: list[str] = []
    again = prepare_data(online, lines.append)
    assert again.info["cache_hit"] and again.info["offline"] is False
    assert again.tokenizer is not None and again.tokenizer.name == "fake-characters"  # reloaded from the local cache
    assert len(lines) == 1 and "tokenizer fake-characters (from cache" in lines[0]


def test_a_hub_failure_falls_back_to_the_offline_corpus_aloud(config, fake_hub, monkeypatch):
    def broken(config: ExperimentConfig) -> list[str]:
        raise ConnectionError("stream reset")

    monkeypatch.setattr(dataset_module, "hub_documents", broken)
    prepare_data(config, lambda _: None)  # an offline cache exists: the fallback may use it, but says so
    lines: list[str] = []
    data = prepare_data(config.replace(offline=False), lines.append)
    assert data.info["offline"] is True and data.info["cache_hit"] is True
    assert lines[0] == f"Offline: loading from the Hub failed (ConnectionError: stream reset), so this run uses {offline_words()}."


def test_documents_counts_only_those_whose_tokens_were_used(config, fake_hub):
    data = prepare_data(config.replace(offline=False, max_tokens=3050), lambda _: None)  # 30 whole documents + part of one
    assert data.info["documents"] == 31 and data.info["documents_read"] == 50
    assert data.info["corpus_description"].endswith("first 31 documents")
    hit = prepare_data(config.replace(offline=False, max_tokens=3050), lambda _: None)
    assert hit.info["cache_hit"] and hit.info["documents"] == 31


@pytest.mark.parametrize("max_tokens", [1, 99, 100, 101, 250])
def test_tokenize_counts_contributing_documents(max_tokens):
    tokenizer = TextTokenizer("chars", 128, lambda text: [ord(c) for c in text], 0)
    tokens, used = _tokenize(FAKE_DOCUMENTS[:5], tokenizer, max_tokens)
    assert len(tokens) == max_tokens
    assert used == (max_tokens + 99) // 100  # each document is 100 tokens with its EOS
    assert int((tokens == 0).sum()) in (used, used - 1)  # an EOS per used document, bar a cut last one


@pytest.mark.parametrize("num_documents,remedy", [(10, "raise --num-documents (now 10) or use a larger corpus"),
                                                  (60, "all 50 documents it holds were used: use a larger corpus")])
def test_a_shortfall_against_max_tokens_is_reported(config, fake_hub, num_documents, remedy):
    lines: list[str] = []
    data = prepare_data(config.replace(offline=False, num_documents=num_documents, max_tokens=6000), lines.append)
    held = 100 * min(num_documents, 50)
    assert data.info["total_tokens"] == held and data.info["max_tokens_shortfall"] == 6000 - held
    assert f"Data: the corpus holds only {held:,} tokens, fewer than --max-tokens 6,000; {remedy}" in lines


def test_no_shortfall_is_zero_and_silent(config):
    lines: list[str] = []
    data = prepare_data(config, lines.append)
    assert data.info["max_tokens_shortfall"] == 0 and not any("fewer than --max-tokens" in line for line in lines)


def test_wording_names_the_users_file_and_only_the_builtin_corpus_is_called_a_pipeline_test(config, tmp_path):
    corpus = tmp_path / "my notes.txt"
    corpus.write_text("\n\n".join(f"Note {i}. " + "Tomatoes need sun and water every day. " * 15 for i in range(40)))
    lines: list[str] = []
    mine = prepare_data(config.replace(data_path=str(corpus), offline=False), lines.append)
    assert lines[0] == f"Offline: the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE=1), so this run uses your file {corpus} with a BPE tokenizer trained on it."
    assert not any("web-text" in line or "offline corpus" in line for line in lines), lines
    assert mine.info["source_label"] == "your file my notes.txt"
    builtin = prepare_data(config, lambda _: None)
    assert builtin.info["source_label"] == "offline corpus"


CACHE_WRITERS, CACHE_ROUNDS = 4, 60


def _writer_tokens(writer: int) -> np.ndarray:
    return (np.arange(4000, dtype=np.int32) * (writer + 1)) % 997  # a different array per writer


def _writer_tokenizer(writer: int) -> TextTokenizer:
    """A different 997-token tokenizer per writer (a word-level one: no training needed)."""
    from tokenizers import Tokenizer, models

    vocab = {f"w{writer}t{i}": i for i in range(997)}
    return offline_tokenizer_from_json(Tokenizer(models.WordLevel(vocab, unk_token=f"w{writer}t0")).to_str())


def _hammer_cache(cache_dir: str, writer: int) -> int:
    """Save this writer's tokens and load whatever is there, over and over; returns valid loads."""
    config = ExperimentConfig(cache_dir=cache_dir, offline=True)
    plan = DataPlan("offline", "offline", offline=True)
    valid = 0
    for _ in range(CACHE_ROUNDS):
        _save_cache(config, plan, _writer_tokens(writer), {"vocab_size": 997, "writer": writer}, _writer_tokenizer(writer))
        tokens, meta, tokenizer = _load_cache(config, plan, lambda _: None)
        if tokens is not None:  # never torn: tokens and tokenizer are those of the writer its metadata names
            assert np.array_equal(tokens, _writer_tokens(meta["writer"]))
            assert tokenizer is not None and tokenizer.tokenizer_json == _writer_tokenizer(meta["writer"]).tokenizer_json
            valid += 1
    return valid


def test_concurrent_runs_sharing_a_cache_never_crash_or_read_a_torn_cache(tmp_path):
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(CACHE_WRITERS) as pool:  # a worker's exception re-raises here
        valid = pool.starmap(_hammer_cache, [(str(tmp_path), writer) for writer in range(CACHE_WRITERS)])
    assert sum(valid) > 0
    config = ExperimentConfig(cache_dir=str(tmp_path), offline=True)
    plan = DataPlan("offline", "offline", offline=True)
    # The writers' last renames may interleave (X's tokens, Y's tokens, Y's metadata, X's metadata): then the
    # files left belong to different writes, and the checksum must catch it. Whole, or refused: never torn.
    tokens, meta, _ = _load_cache(config, plan, lambda line: None)
    assert tokens is None or np.array_equal(tokens, _writer_tokens(meta["writer"]))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [name.split(".", 1)[1] for name in names] == ["json", "npy", "tokenizer.json"], "no temp file is left behind"
    assert time.perf_counter() - started < 60


def test_a_failed_cache_write_leaves_the_old_cache_and_no_temp_file(config, monkeypatch):
    first = prepare_data(config, lambda _: None)
    before = {p.name: p.read_bytes() for p in Path(config.cache_dir).iterdir()}

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(ConfigError, match=r"cannot write the token cache to .*\(No space left on device\); .*--cache-dir"):
        _save_cache(config, DataPlan("offline", "offline", offline=True), first.train.numpy().astype(np.int32), {},
                    first.tokenizer)
    assert {p.name: p.read_bytes() for p in Path(config.cache_dir).iterdir()} == before
