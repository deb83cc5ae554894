"""Data: disjoint split, real loading code on local files, a cache that is checked before it is trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data import dataset as dataset_module
from data.dataset import batch_starts, prepare_data, split_tokens, training_batch, validation_windows
from data.offline_corpus import stdlib_documents
from data.sources import hub_documents, local_documents
from data.tokenizer import hub_tokenizer, train_offline_tokenizer
from experiment_config import ConfigError


def test_split_is_contiguous_and_no_validation_token_is_in_any_training_window(config):
    tokens = torch.arange(1000)  # each position has a unique id, so overlap is detectable
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
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


def test_prepare_data_offline_says_so_and_caches(config):
    lines: list[str] = []
    data = prepare_data(config.replace(offline=False), lines.append)  # HF_HUB_OFFLINE=1 in tests
    assert any(line.startswith("Offline:") for line in lines)
    assert data.info["offline"] is True and not data.info["cache_hit"]
    assert len(data.train) + len(data.val) == config.max_tokens
    again = prepare_data(config.replace(offline=False), lines.append)
    assert again.info["cache_hit"] and torch.equal(again.train, data.train)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "stale_meta"])
def test_damaged_cache_is_detected_and_rebuilt(config, damage):
    first = prepare_data(config, lambda _: None)
    npy = next(Path(config.cache_dir).glob("tokens-*.npy"))
    meta = npy.with_suffix(".json")
    if damage == "truncate":
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
    monkeypatch.setattr(dataset_module, "hub_reachable", lambda: True)
    lines: list[str] = []
    data = prepare_data(cfg, lines.append)
    assert data.info["offline"] is False and not any(line.startswith("Offline") for line in lines)
    assert str(repo) in data.info["corpus_description"]
    assert data.info["total_tokens"] == 4000
