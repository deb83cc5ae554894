"""Token data for the experiment: build or load the cached token array, split it, serve batches.

The split is contiguous and disjoint: the first (1 - val_fraction) of the tokens train, the rest
validate. Training windows are drawn only from the training part and validation windows only from
the validation part, so no validation token ever appears in a training window.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from atomic_files import write_atomic
from data import offline_corpus
from data.sources import check_local_path, hub_documents, hub_reachable, local_documents
from data.tokenizer import TextTokenizer, hub_tokenizer, offline_tokenizer_from_json, train_offline_tokenizer
from experiment_config import ConfigError, ExperimentConfig

CACHE_FORMAT = 3  # 2: documents counts only those that contributed tokens; documents_read added; 3: the offline tokenizer is cached too


@dataclass
class TokenData:
    train: torch.Tensor  # int64, 1-D
    val: torch.Tensor  # int64, 1-D
    vocab_size: int
    info: dict[str, Any] = field(default_factory=dict)
    # The tokenizer that made the tokens, also on a cache hit (the offline BPE is cached beside them); None
    # only for a Hub tokenizer that is not in the local Hugging Face cache (then only its name is known).
    tokenizer: TextTokenizer | None = None


@dataclass(frozen=True)
class DataPlan:
    """Which corpus and which tokenizer; its settings key the cache."""

    corpus: str  # "hub", "local" or "offline"
    tokenizer: str  # "hub" or "offline"
    offline: bool

    def key(self, config: ExperimentConfig) -> dict[str, Any]:
        key: dict[str, Any] = {"format": CACHE_FORMAT, "corpus": self.corpus, "tokenizer": self.tokenizer,
                               "num_documents": config.num_documents, "max_chars_per_doc": config.max_chars_per_doc,
                               "max_tokens": config.max_tokens}
        if self.corpus == "hub":
            key.update(dataset=config.dataset_name, dataset_config=config.dataset_config)
        elif self.corpus == "local":
            path = _data_path(config)
            stat = path.stat()
            key.update(path=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        else:
            key.update(python=".".join(map(str, sys.version_info[:3])))
        key.update({"tokenizer_name": config.tokenizer_name} if self.tokenizer == "hub" else {"vocab": config.offline_vocab_size})
        return key

    def describe(self, config: ExperimentConfig, documents: int) -> str:
        """The corpus and how many of its documents made it into the tokens."""
        if self.corpus == "hub":
            return f"{config.dataset_name} ({config.dataset_config}), first {documents} documents"
        if self.corpus == "local":
            return f"local file {_data_path(config)}, {documents} documents"
        return f"{offline_corpus.describe()}, {documents} documents"

    def source_label(self, config: ExperimentConfig) -> str:
        """A short name of the text for plot titles."""
        if self.corpus == "hub":
            return config.dataset_name
        if self.corpus == "local":
            return f"your file {_data_path(config).name}"
        return "offline corpus"


def _data_path(config: ExperimentConfig) -> Path:
    """The --data file; only local-corpus plans ask, and those exist only when it was given."""
    if config.data_path is None:
        raise ValueError("a local-corpus plan needs config.data_path")
    return Path(config.data_path)


def prepare_data(config: ExperimentConfig, log: Callable[[str], None] = print) -> TokenData:
    """Tokens for the experiment, from the cache when a valid one exists, else built and cached.

    The offline corpus is used only with --offline or when the Hub cannot be used, and the run
    says so in one line; an online run never picks up an offline cache left by an earlier run.
    """
    if config.data_path:
        check_local_path(config.data_path)
    online_plan = DataPlan("local" if config.data_path else "hub", "hub", offline=False)
    offline_plan = DataPlan("local" if config.data_path else "offline", "offline", offline=True)
    if config.offline:
        log(f"Offline (--offline): using {_offline_words(config)}.")
        return _cached_or_built(config, offline_plan, log)

    tokens, meta, tokenizer = _load_cache(config, online_plan, log)  # a valid online cache needs no network
    if tokens is not None:
        return _token_data(tokens, meta, tokenizer, config, online_plan, log, cache_hit=True)
    if not hub_reachable():
        log(f"Offline: the Hugging Face Hub cannot be reached, so this run uses {_offline_words(config)}.")
        return _cached_or_built(config, offline_plan, log)
    try:
        tokens, meta, tokenizer = _build(config, online_plan)
    except ConfigError:
        raise  # the user's input is wrong: the offline corpus would not fix it
    except Exception as error:  # noqa: BLE001 - any Hub failure falls back to the offline corpus, said aloud
        log(f"Offline: loading from the Hub failed ({type(error).__name__}: {str(error)[:120]}), so this run uses {_offline_words(config)}.")
        return _cached_or_built(config, offline_plan, log)
    _save_cache(config, online_plan, tokens, meta, tokenizer)
    return _token_data(tokens, meta, tokenizer, config, online_plan, log, cache_hit=False)


def _cached_or_built(config: ExperimentConfig, plan: DataPlan, log: Callable[[str], None]) -> TokenData:
    tokens, meta, tokenizer = _load_cache(config, plan, log)
    if tokens is not None:
        return _token_data(tokens, meta, tokenizer, config, plan, log, cache_hit=True)
    tokens, meta, tokenizer = _build(config, plan)
    _save_cache(config, plan, tokens, meta, tokenizer)
    return _token_data(tokens, meta, tokenizer, config, plan, log, cache_hit=False)


def _offline_words(config: ExperimentConfig) -> str:
    if config.data_path:
        return f"your file {config.data_path} with a BPE tokenizer trained on it"
    return f"{offline_corpus.describe()} with a BPE tokenizer trained on it; results then test the pipeline, not web-text quality"


def _build(config: ExperimentConfig, plan: DataPlan) -> tuple[np.ndarray, dict[str, Any], TextTokenizer]:
    if plan.corpus == "hub":
        documents = hub_documents(config)
    elif plan.corpus == "local":
        documents = local_documents(str(_data_path(config)), config)
    else:
        documents = offline_corpus.stdlib_documents(config.num_documents, config.max_chars_per_doc)
    tokenizer = hub_tokenizer(config.tokenizer_name) if plan.tokenizer == "hub" else train_offline_tokenizer(
        documents, config.offline_vocab_size)
    tokens, used = _tokenize(documents, tokenizer, config.max_tokens)
    meta = {"corpus_description": plan.describe(config, used), "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "documents": used, "documents_read": len(documents), "offline": plan.offline}
    return tokens, meta, tokenizer


def _tokenize(documents: list[str], tokenizer: TextTokenizer, max_tokens: int) -> tuple[np.ndarray, int]:
    """Concatenate documents (separated by EOS when the tokenizer has one) up to max_tokens.

    Also returns how many documents contributed tokens, which is what the run reports: the
    documents read past the cut are not part of the data.
    """
    ids: list[int] = []
    used = 0
    for document in documents:
        if len(ids) >= max_tokens:
            break
        ids.extend(tokenizer.encode(document))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        used += 1
    return np.asarray(ids[:max_tokens], dtype=np.int32), used


def _cache_paths(config: ExperimentConfig, plan: DataPlan) -> tuple[Path, Path, dict[str, Any]]:
    key = plan.key(config)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(config.cache_dir)
    return directory / f"tokens-{digest}.npy", directory / f"tokens-{digest}.json", key


def _tokenizer_path(tokens_path: Path) -> Path:
    """The offline tokenizer's JSON beside its tokens: tokens-<digest>.tokenizer.json."""
    return tokens_path.with_suffix(".tokenizer.json")


def _load_cache(config: ExperimentConfig, plan: DataPlan, log: Callable[[str], None]
                ) -> tuple[np.ndarray | None, dict[str, Any], TextTokenizer | None]:
    """The cached tokens and their tokenizer when the files exist, match the settings and pass their
    checksums; else (None, {}, None).

    The metadata is written last, so without it there is no cache (at most an interrupted write).
    Tokens, tokenizer and metadata from different writes fail a checksum and are rebuilt, never trusted.
    An offline tokenizer that is missing or unreadable makes the cache stale; a Hub tokenizer is loaded
    again from the local Hugging Face cache, and is None (not an error) when it is not there.
    """
    tokens_path, meta_path, key = _cache_paths(config, plan)
    if not meta_path.exists():
        return None, {}, None
    tokenizer: TextTokenizer | None = None
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(tokens_path, allow_pickle=False)
        problems = [
            (meta.get("key") != key, "settings differ"),
            (tokens.ndim != 1 or tokens.dtype != np.int32, "wrong array shape or type"),
            (len(tokens) != meta.get("num_tokens"), "wrong length"),
            (hashlib.sha256(tokens.tobytes()).hexdigest() != meta.get("sha256"), "checksum mismatch"),
            (len(tokens) > 0 and (tokens.min() < 0 or tokens.max() >= meta.get("vocab_size", 0)), "token ids out of range"),
        ]
        reason = next((why for bad, why in problems if bad), None)
        if reason is None and plan.tokenizer == "offline":
            tokenizer, reason = _cached_offline_tokenizer(_tokenizer_path(tokens_path), meta)
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt
        reason, meta, tokens = f"unreadable ({type(error).__name__})", {}, None
    if reason:
        log(f"Data cache {tokens_path} is damaged or stale ({reason}); rebuilding it.")
        return None, {}, None
    if plan.tokenizer == "hub":
        tokenizer = _local_hub_tokenizer(config.tokenizer_name)
    return tokens, meta, tokenizer


def _cached_offline_tokenizer(path: Path, meta: dict[str, Any]) -> tuple[TextTokenizer | None, str | None]:
    """(the tokenizer, None) when its file is there and is the one the metadata names; else (None, why not)."""
    if not path.exists():
        return None, "tokenizer file missing"
    text = path.read_bytes()
    if hashlib.sha256(text).hexdigest() != meta.get("tokenizer_sha256"):
        return None, "tokenizer checksum mismatch"
    try:
        tokenizer = offline_tokenizer_from_json(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "tokenizer file unreadable"
    if tokenizer.vocab_size != meta.get("vocab_size"):
        return None, "tokenizer vocabulary differs"
    return tokenizer, None


def _local_hub_tokenizer(name: str) -> TextTokenizer | None:
    """The Hub tokenizer from the local Hugging Face cache only (a cache hit needs no network); None if absent."""
    try:
        return hub_tokenizer(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached locally (or unreadable): the name alone is kept
        return None


def _save_cache(config: ExperimentConfig, plan: DataPlan, tokens: np.ndarray, meta: dict[str, Any],
                tokenizer: TextTokenizer | None = None) -> None:
    """Write tokens, the offline tokenizer's JSON, then metadata, each through a unique temp file and an
    atomic rename.

    Concurrent runs sharing a cache then never trip over each other's temp files, and a reader
    sees either a whole old file or a whole new one. A plan with an offline tokenizer needs it here:
    without it the cache would be judged stale.
    """
    tokens_path, meta_path, key = _cache_paths(config, plan)
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    meta.update(key=key, num_tokens=int(len(tokens)), sha256=hashlib.sha256(tokens.tobytes()).hexdigest(),
                cache_file=str(tokens_path))
    write_atomic(tokens_path, lambda file: np.save(file, tokens, allow_pickle=False))
    if plan.tokenizer == "offline":
        if tokenizer is None or tokenizer.tokenizer_json is None:
            raise ValueError("an offline-tokenizer cache needs the tokenizer's JSON (TextTokenizer.tokenizer_json)")
        text = tokenizer.tokenizer_json.encode("utf-8")
        write_atomic(_tokenizer_path(tokens_path), lambda file: file.write(text))
        meta.update(tokenizer_sha256=hashlib.sha256(text).hexdigest())
    write_atomic(meta_path, lambda file: json.dump(meta, file, indent=2), binary=False)


def split_tokens(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_fraction) of the tokens for training, the contiguous rest for validation."""
    n_train = int(len(tokens) * (1 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


def _token_data(tokens: np.ndarray, meta: dict[str, Any], tokenizer: TextTokenizer | None, config: ExperimentConfig,
                plan: DataPlan, log: Callable[[str], None], cache_hit: bool) -> TokenData:
    """Say what the data is (tokenizer and any shortfall included), then split it."""
    origin = "from cache" if cache_hit else "cached in"
    log(f"Data: {meta['corpus_description']}, {len(tokens):,} tokens, tokenizer {meta['tokenizer']} ({origin} {meta['cache_file']})")
    shortfall = max(0, config.max_tokens - len(tokens))
    if shortfall:
        remedy = (f"raise --num-documents (now {config.num_documents:,}) or use a larger corpus"
                  if meta["documents_read"] >= config.num_documents else
                  f"all {meta['documents_read']:,} documents it holds were used: use a larger corpus")
        log(f"Data: the corpus holds only {len(tokens):,} tokens, fewer than --max-tokens {config.max_tokens:,}; {remedy}")
    train, val = split_tokens(torch.from_numpy(tokens.astype(np.int64)), config.val_fraction)
    window = config.max_seq_len + 1
    if len(train) < window or len(val) < window:
        raise ConfigError(
            f"the corpus gave {len(tokens):,} tokens: {len(train):,} train / {len(val):,} validation, fewer than one "
            f"window of {window}; raise --max-tokens or --num-documents, or lower --seq-len"
        )
    info = {key: meta[key] for key in ("corpus_description", "tokenizer", "vocab_size", "documents", "documents_read",
                                       "offline", "cache_file")}
    info.update(source_label=plan.source_label(config), total_tokens=len(tokens), max_tokens_shortfall=shortfall,
                train_tokens=len(train), val_tokens=len(val), cache_hit=cache_hit,
                split=f"contiguous: first {1 - config.val_fraction:.0%} of tokens train, last {config.val_fraction:.0%} validate")
    return TokenData(train=train, val=val, vocab_size=int(meta["vocab_size"]), info=info, tokenizer=tokenizer)


def batch_starts(num_train_tokens: int, config: ExperimentConfig, seed: int) -> torch.Tensor:
    """Start offsets of every training window, (max_steps, batch_size), fixed by the seed.

    Both models are given this same tensor, so they see the same batches in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    highest_start = num_train_tokens - (config.max_seq_len + 1)
    return torch.randint(0, highest_start + 1, (config.max_steps, config.batch_size), generator=generator)


def training_batch(train: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `starts` (gathered on train's device)."""
    windows = train[starts.unsqueeze(1) + torch.arange(seq_len + 1, device=starts.device)]
    return windows[:, :-1], windows[:, 1:]


def validation_windows(val: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows of the validation tokens: the fixed validation set."""
    n = (len(val) - 1) // seq_len
    return val[: n * seq_len].view(n, seq_len), val[1 : n * seq_len + 1].view(n, seq_len)
