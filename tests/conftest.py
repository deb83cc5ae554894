"""Shared fixtures: a tiny configuration that exercises every code path in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

# Before any test module is collected: huggingface_hub reads these once, when it is first imported (a
# test module importing transformers at collection time would otherwise fix "online" for the whole
# session, and a Hub lookup would then wait about 50 s on a machine without network).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Under pytest-xdist each worker (and every process a test starts) computes on one thread: two workers of two
# threads each on two cores spin against each other, and every test ran two to five times slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

from config.settings import ExperimentConfig


def tiny_config(tmp_path, **changes) -> ExperimentConfig:
    base = ExperimentConfig(
        d_model=32, n_heads=2, n_layers=2, d_ff=64, num_experts=4, expert_top_k=2, max_seq_len=16,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        batch_size=4, max_steps=6, eval_every=3, log_every=2, num_documents=60, max_tokens=3000,
        offline=True, offline_vocab_size=300, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"),
        preset="cpu",
    )
    return base.replace(**changes)


@pytest.fixture
def config(tmp_path) -> ExperimentConfig:
    return tiny_config(tmp_path)


@pytest.fixture(autouse=True)
def hermetic(monkeypatch):
    """Tests never touch the network and always start from the same RNG state."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder as the experiment saves one: weights, config.json and its offline tokenizer."""
    from data.offline_corpus import stdlib_documents
    from data.tokenizer import save_tokenizer, train_offline_tokenizer
    from exp6_baseline_attention_model import BaselineAttentionModel
    from models.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("model")
    tokenizer = train_offline_tokenizer(stdlib_documents(20, 2000), 300)
    spec = save_tokenizer(tokenizer, folder)
    config = tiny_config(folder, vocab_size=tokenizer.vocab_size)
    save_checkpoint(BaselineAttentionModel(config, seed=1), "baseline", folder, {"tokenizer": spec})
    return folder
