"""What one run of the experiment needs in memory, estimated from its config before anything is allocated.

The arms train one after another, so the model part is the largest arm's. The data part follows from
the corpus settings: the text read (a --data file's size, or num_documents x max_chars_per_doc
characters; 0 means no cap), its tokens (a byte-level tokenizer makes at most one per byte, plus an
end-of-text token per document; at most max_tokens) as the Python list, NumPy and torch arrays the
pipeline builds, and the batch offsets of every step (max_steps x batch_size, or the LR sweep's). The
greedy sample's KV cache covers the prompt and sample_tokens. The uncapped offline corpus (the standard
library's docstrings, a few MB) is not counted. models/memory.py holds the model estimates and the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from config.settings import ExperimentConfig
from models.costs import parameter_count
from models.memory import (
    TRAINING_BYTES_PER_PARAMETER,
    MemoryNeed,
    decode_cache_bytes,
    shape_only_model,
    training_activation_bytes,
)
from models.transformer import ModelBuilder
from training.lineup import lineup_of
from training.lr_sweep import sweep_steps

HUB_VOCAB_ESTIMATE = 49_152  # the SmolLM-135M tokenizer's; a larger real one is checked again once it is loaded
TEXT_COPIES = 3  # the bytes read, the decoded string, the documents split from it
UTF8_BYTES_PER_CHAR = 4  # at most
HOST_BYTES_PER_TOKEN = 36 + 4 + 8 + 24  # list of ints while tokenizing, the int32 cache array, int64 tensor, exposure counts
DEVICE_BYTES_PER_TOKEN = 8 + 8  # the train and validation tokens on the device, and the validation windows
BYTES_PER_BATCH_OFFSET = 8  # int64 start of one window
HOST_OFFSET_COPIES = 3  # the exposure report's offsets, their flat copy and the +1/-1 counts it scatters


def planned_vocab_size(config: ExperimentConfig) -> int:
    """The vocabulary to plan for before the tokenizer is loaded: the configured one, or the largest the
    tokenizer could have (the offline BPE's size, or the Hub tokenizer's unless the run is offline)."""
    if config.vocab_size is not None:
        return config.vocab_size
    return config.offline_vocab_size if config.offline else max(config.offline_vocab_size, HUB_VOCAB_ESTIMATE)


def max_text_bytes(config: ExperimentConfig) -> int:
    """At most how many bytes of text the run reads: a --data file's size, num_documents x max_chars_per_doc
    characters of UTF-8 when both are capped (whichever is smaller), 0 when unknown before reading."""
    capped = config.num_documents * config.max_chars_per_doc * UTF8_BYTES_PER_CHAR
    if config.data_path:
        try:
            size = Path(config.data_path).stat().st_size
        except OSError:  # a missing file is its own error (check_local_path)
            size = 0
        return min(size, capped) if capped else size
    return capped


def max_corpus_tokens(config: ExperimentConfig) -> int:
    """An upper bound on the tokens the corpus yields: one per byte of text and one end-of-text token per
    document (a byte-level tokenizer), at most max_tokens (0: no cap)."""
    text = max_text_bytes(config)
    tokens = 2 * text if text else 0  # every document at least one byte: no more EOS tokens than bytes
    return min(config.max_tokens, tokens) if config.max_tokens and tokens else config.max_tokens or tokens


def experiment_memory(config: ExperimentConfig, builders: Mapping[str, ModelBuilder], batch_shards: int = 1) -> MemoryNeed:
    """The estimate for one process: the largest entry's training step (its share of each batch under
    data-parallel: `batch_shards` ranks), the data, and the greedy sample's cache. The entries are the arms, or a
    study's points (training/lineup.py), each at its own config."""
    entries = lineup_of(config).entries
    models = [shape_only_model(builders[entry.arm], entry.config.replace(vocab_size=planned_vocab_size(config)))
              for entry in entries]
    batch = max(1, config.batch_size // batch_shards)
    weights = max(parameter_count(model) for model in models) * TRAINING_BYTES_PER_PARAMETER
    activations = max(training_activation_bytes(model, batch, config.max_seq_len) for model in models)
    sample_tokens = len(config.sample_prompt.encode("utf-8")) + 1 + config.sample_tokens if config.sample_tokens else 0
    sample_cache = max(decode_cache_bytes(model, None, sample_tokens) for model in models)
    tokens = max_corpus_tokens(config)
    steps = max(max(entry.config.max_steps for entry in entries), sweep_steps(config) if config.lr_sweep else 0)
    offsets = steps * config.batch_size * BYTES_PER_BATCH_OFFSET  # one run's offsets at a time
    return MemoryNeed(
        device={"parameters and optimizer state": weights, "activations": activations,
                "greedy sample's KV cache": sample_cache,
                "token arrays and batch offsets": tokens * DEVICE_BYTES_PER_TOKEN + offsets},
        host={"documents": max_text_bytes(config) * TEXT_COPIES,
              "tokenizing": tokens * HOST_BYTES_PER_TOKEN, "exposure report": HOST_OFFSET_COPIES * offsets},
    )


ADVICE = ("lower the largest part (--batch-size and --seq-len for activations; d_model, d_ff, n_layers, num_experts and "
          "the vocabulary for parameters; --steps, --max-tokens and --num-documents for data; sample_tokens for the "
          "sample's cache)")
