"""Token data for the experiment: build or load the cached token array, split it, serve batches.

The split is contiguous and disjoint: the first (1 - val_fraction) of the tokens train, the rest
validate. With --lr-sweep a third part, the tuning set, is carved from the end of the training part
(tuning_fraction of all tokens): the sweep selects on it alone, and without a sweep those tokens train,
so the default run is unchanged. Each part is its own tensor and every window is cut from one part only
(training windows from the training part, tuning and validation windows from theirs), so no window
crosses a boundary and no training window holds a tuning or validation token.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.atomic_files import write_atomic
from common.errors import ConfigError
from config.settings import ExperimentConfig
from data import offline_corpus
from data.sources import capped, check_local_path, hub_documents, hub_unreachable_reason, local_texts
from data.tokenizer import TextTokenizer, hub_tokenizer, offline_tokenizer_from_json, train_offline_tokenizer

CACHE_FORMAT = 4  # 2: documents counts only those that contributed tokens; documents_read added; 3: the offline tokenizer
# is cached too; 4: a --data file's own size (documents_in_file, tokens_in_file) and the text field


@dataclass
class TokenData:
    train: torch.Tensor  # int64, 1-D
    val: torch.Tensor  # int64, 1-D: the reported validation set
    vocab_size: int
    info: dict[str, Any] = field(default_factory=dict)
    # The tokenizer that made the tokens, also on a cache hit (the offline BPE is cached beside them); None
    # only for a Hub tokenizer that is not in the local Hugging Face cache (then only its name is known).
    tokenizer: TextTokenizer | None = None
    # The tuning set the LR sweep selects on (int64, 1-D): the tokens between train and val; empty without a sweep.
    tune: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def for_tuning(self) -> "TokenData":
        """The data a sweep run sees: the same training tokens, evaluated on the tuning set instead of the
        validation set (trainer.train_model evaluates on `val`), so selection never looks at validation text."""
        if len(self.tune) == 0:
            raise ValueError("no tuning set: the split has one only when config.lr_sweep is set")
        return replace(self, val=self.tune, tune=torch.zeros(0, dtype=torch.int64))


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
            key.update(dataset=config.dataset_name, dataset_config=config.dataset_config, text_field=config.text_field)
        elif self.corpus == "local":
            path = _data_path(config)
            stat = path.stat()
            key.update(path=str(path.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns, text_field=config.text_field)
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
    unreachable = hub_unreachable_reason()
    if unreachable:
        log(f"Offline: the Hugging Face Hub cannot be reached ({unreachable}), so this run uses {_offline_words(config)}.")
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
    whole: list[str] | None = None  # a --data file's every document, uncut
    if plan.corpus == "hub":
        documents = hub_documents(config)
    elif plan.corpus == "local":
        whole = local_texts(str(_data_path(config)), config.text_field)
        documents = capped(whole, config)
    else:
        documents = offline_corpus.stdlib_documents(config.num_documents, config.max_chars_per_doc)
    tokenizer = hub_tokenizer(config.tokenizer_name) if plan.tokenizer == "hub" else train_offline_tokenizer(
        documents, config.offline_vocab_size)
    ids, used = _joined(documents, tokenizer, config.max_tokens)
    tokens = np.asarray(ids[: config.max_tokens or None], dtype=np.int32)
    meta = {"corpus_description": plan.describe(config, used), "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "documents": used, "documents_read": len(documents), "offline": plan.offline,
            "documents_in_file": None, "tokens_in_file": None}
    if whole is not None:  # a --data file: how much of it the caps left out (its tokens counted only when cut)
        if whole != documents:  # cut by --num-documents or --max-chars-per-doc: count the file's own tokens
            in_file = _token_count(whole, tokenizer)
        else:  # cut by --max-tokens at most: the documents joined so far are counted already
            in_file = len(ids) + _token_count(whole[used:], tokenizer)
        meta.update(documents_in_file=len(whole), tokens_in_file=in_file)
    return tokens, meta, tokenizer


def _token_count(documents: list[str], tokenizer: TextTokenizer) -> int:
    """Tokens of `documents` as _tokenize joins them (EOS after each when the tokenizer has one)."""
    eos = 1 if tokenizer.eos_token_id is not None else 0
    return sum(len(tokenizer.encode(document)) + eos for document in documents)


def _joined(documents: list[str], tokenizer: TextTokenizer, max_tokens: int) -> tuple[list[int], int]:
    """The documents' tokens, each followed by EOS when the tokenizer has one, until max_tokens (0: all) are
    reached (the last document whole, so the list may run past it), and how many documents contributed."""
    ids: list[int] = []
    used = 0
    for document in documents:
        if max_tokens and len(ids) >= max_tokens:
            break
        ids.extend(tokenizer.encode(document))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        used += 1
    return ids, used


def _tokenize(documents: list[str], tokenizer: TextTokenizer, max_tokens: int) -> tuple[np.ndarray, int]:
    """Concatenate documents (separated by EOS when the tokenizer has one) up to max_tokens (0: all).

    Also returns how many documents contributed tokens, which is what the run reports: the
    documents read past the cut are not part of the data.
    """
    ids, used = _joined(documents, tokenizer, max_tokens)
    return np.asarray(ids[: max_tokens or None], dtype=np.int32), used


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
    without it the cache would be judged stale. A write that fails (a full disk) raises ConfigError; each
    file is whole or untouched (write_atomic), and without the new metadata the old cache stands or none does.
    """
    tokens_path, meta_path, key = _cache_paths(config, plan)
    if plan.tokenizer == "offline" and (tokenizer is None or tokenizer.tokenizer_json is None):
        raise ValueError("an offline-tokenizer cache needs the tokenizer's JSON (TextTokenizer.tokenizer_json)")
    meta.update(key=key, num_tokens=int(len(tokens)), sha256=hashlib.sha256(tokens.tobytes()).hexdigest(),
                cache_file=str(tokens_path))
    try:
        tokens_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(tokens_path, lambda file: np.save(file, tokens, allow_pickle=False))
        if tokenizer is not None and plan.tokenizer == "offline" and tokenizer.tokenizer_json is not None:
            text = tokenizer.tokenizer_json.encode("utf-8")
            write_atomic(_tokenizer_path(tokens_path), lambda file: file.write(text))
            meta.update(tokenizer_sha256=hashlib.sha256(text).hexdigest())
        write_atomic(meta_path, lambda file: json.dump(meta, file, indent=2), binary=False)
    except OSError as error:  # disk full, no permission: each file is whole or absent, and the run stops in one line
        raise ConfigError(f"cannot write the token cache to {tokens_path.parent} ({error.strerror or error}); "
                          "free some space or choose another --cache-dir") from None


def caps_line(meta: dict[str, Any], tokens: int, config: ExperimentConfig) -> str | None:
    """The one line that says how much of a --data file the caps left out; None when it is used whole."""
    in_file, tokens_in_file = meta.get("documents_in_file"), meta.get("tokens_in_file")
    if in_file is None or tokens_in_file is None or (meta["documents"] == in_file and tokens == tokens_in_file):
        return None
    caps = [f"{flag} {value:,}" for flag, value in (("--num-documents", config.num_documents),
                                                    ("--max-chars-per-doc", config.max_chars_per_doc),
                                                    ("--max-tokens", config.max_tokens)) if value]
    return (f"Data: your caps ({', '.join(caps)}) cut {config.data_path}: used {meta['documents']:,} of {in_file:,} "
            f"documents and {tokens:,} of {tokens_in_file:,} tokens; set them to 0 to use the whole file.")


def split_tokens(tokens: torch.Tensor, val_fraction: float,
                 tuning_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, tune, val), contiguous: the last val_fraction of the tokens validate, the tuning_fraction of
    all tokens before them tune, the rest train. With tuning_fraction 0 the tuning part is empty and train is
    exactly the first (1 - val_fraction): what a run without --lr-sweep trains on."""
    n_before_val = int(len(tokens) * (1 - val_fraction))
    n_tune = int(len(tokens) * tuning_fraction)
    n_train = n_before_val - n_tune
    return tokens[:n_train], tokens[n_train:n_before_val], tokens[n_before_val:]


def documents_touched(tokens: torch.Tensor, eos_token_id: int | None) -> int | None:
    """How many documents have at least one token in `tokens` (a contiguous part of the corpus, where every
    document is followed by EOS): one more than the EOS tokens before its last position. None without EOS."""
    if eos_token_id is None or len(tokens) == 0:
        return None
    return 1 + int((tokens[:-1] == eos_token_id).sum())


def _token_data(tokens: np.ndarray, meta: dict[str, Any], tokenizer: TextTokenizer | None, config: ExperimentConfig,
                plan: DataPlan, log: Callable[[str], None], cache_hit: bool) -> TokenData:
    """Say what the data is (tokenizer and any shortfall included), then split it."""
    origin = "from cache" if cache_hit else "cached in"
    log(f"Data: {meta['corpus_description']}, {len(tokens):,} tokens, tokenizer {meta['tokenizer']} ({origin} {meta['cache_file']})")
    cut = caps_line(meta, len(tokens), config)
    if cut:
        log(cut)
    shortfall = max(0, config.max_tokens - len(tokens)) if config.max_tokens else 0
    if shortfall:
        remedy = (f"raise --num-documents (now {config.num_documents:,}) or use a larger corpus"
                  if config.num_documents and meta["documents_read"] >= config.num_documents else
                  f"all {meta['documents_read']:,} documents it holds were used: use a larger corpus")
        log(f"Data: the corpus holds only {len(tokens):,} tokens, fewer than --max-tokens {config.max_tokens:,}; {remedy}")
    tuning_fraction = config.tuning_fraction if config.lr_sweep else 0.0  # no sweep: the tuning tokens train
    train, tune, val = split_tokens(torch.from_numpy(tokens.astype(np.int64)), config.val_fraction, tuning_fraction)
    window = config.max_seq_len + 1
    if len(train) < window or len(val) < window or (config.lr_sweep and len(tune) < window):
        tuning = f" / {len(tune):,} tuning" if config.lr_sweep else ""
        raise ConfigError(
            f"the corpus gave {len(tokens):,} tokens: {len(train):,} train{tuning} / {len(val):,} validation, fewer "
            f"than one window of {window} in a part; raise --max-tokens or --num-documents, or lower --seq-len"
        )
    info = {key: meta[key] for key in ("corpus_description", "tokenizer", "vocab_size", "documents", "documents_read",
                                       "documents_in_file", "tokens_in_file", "offline", "cache_file")}
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    info.update(source_label=plan.source_label(config), total_tokens=len(tokens), max_tokens_shortfall=shortfall,
                train_tokens=len(train), tuning_tokens=len(tune), val_tokens=len(val), cache_hit=cache_hit,
                val_documents=documents_touched(val, eos), tuning_documents=documents_touched(tune, eos),
                split=split_description(config))
    return TokenData(train=train, val=val, vocab_size=int(meta["vocab_size"]), info=info, tokenizer=tokenizer, tune=tune)


def split_description(config: ExperimentConfig) -> str:
    """The split in words, for the JSON and the README's terms."""
    val = f"last {config.val_fraction:.0%} validate (the reported set)"
    if not config.lr_sweep:
        return f"contiguous: first {1 - config.val_fraction:.0%} of tokens train, {val}"
    train = 1 - config.val_fraction - config.tuning_fraction
    return (f"contiguous: first {train:.0%} of tokens train, the next {config.tuning_fraction:.0%} are the tuning set "
            f"(the LR sweep selects on it alone; nothing trains on it), {val}")


def batch_starts(num_train_tokens: int, config: ExperimentConfig, seed: int) -> torch.Tensor:
    """Start offsets of every training window, (max_steps, batch_size), fixed by the seed: epochs of
    non-overlapping windows, each epoch with a new phase and a new order.

    A window starting at s reads tokens s .. s + max_seq_len (inputs s .. s + max_seq_len - 1, targets
    one later). Each epoch draws a phase p in 0 .. max_seq_len - 1 (fewer when the training part is
    shorter than two windows, so that at least one window fits) and cuts the training tokens into the
    windows p, p + max_seq_len, p + 2 * max_seq_len, ...: consecutive windows share only the boundary
    token (a target of one, the first input of the next), so each token in the epoch's span is an input
    exactly once. Windows are kept only while they end inside the training part: the tokens before p
    and the last partial window left by the phase (fewer than max_seq_len + 1 tokens) are dropped from
    that epoch, so an epoch has (num_train_tokens - 1 - p) // max_seq_len windows (exactly
    num_train_tokens // max_seq_len - 1 for every phase when num_train_tokens is a multiple of
    max_seq_len). The epoch's windows are shuffled by a seeded permutation, the epochs' orders are
    concatenated and cut into consecutive batches, so an epoch may end inside a batch. The phase moves
    the window boundaries between epochs; positions max_seq_len - 1 .. num_train_tokens - max_seq_len - 1
    are inputs in every complete epoch whatever the phase (see token_exposures).

    The result depends only on (num_train_tokens, max_seq_len, batch_size, max_steps, seed), so every
    arm is given this same tensor: the same batches in the same order.
    """
    seq_len = config.max_seq_len
    highest_phase = min(seq_len - 1, num_train_tokens - 1 - seq_len)  # every phase leaves at least one window
    if highest_phase < 0:
        raise ValueError(f"{num_train_tokens} training tokens hold no window of {seq_len + 1} tokens")
    generator = torch.Generator().manual_seed(seed)
    needed = config.max_steps * config.batch_size
    epochs: list[torch.Tensor] = []
    drawn = 0
    while drawn < needed:
        phase = int(torch.randint(0, highest_phase + 1, (1,), generator=generator))
        windows = (num_train_tokens - 1 - phase) // seq_len  # the last partial window is dropped
        epochs.append(phase + seq_len * torch.randperm(windows, generator=generator))
        drawn += windows
    return torch.cat(epochs)[:needed].view(config.max_steps, config.batch_size)


def token_exposures(starts: torch.Tensor, num_train_tokens: int, seq_len: int) -> torch.Tensor:
    """How many times each training token is an input of a window starting at `starts` (any shape):
    an int64 tensor of num_train_tokens counts, on the CPU. Token s + seq_len of a window is its last
    target only, so the last training token is never an input."""
    flat = starts.detach().flatten().cpu().to(torch.int64)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) + seq_len >= num_train_tokens):
        raise ValueError("a window starts before or ends past the training tokens")
    edges = torch.zeros(num_train_tokens + 1, dtype=torch.int64)
    edges.index_add_(0, flat, torch.ones_like(flat))
    edges.index_add_(0, flat + seq_len, -torch.ones_like(flat))
    return edges.cumsum(0)[:num_train_tokens]


def exposure_summary(starts: torch.Tensor, num_train_tokens: int, seq_len: int) -> dict[str, Any]:
    """Exact exposure numbers of one seed's windows, recounted from its starts (token_exposures).

    `*_away_from_edges` covers positions seq_len - 1 .. num_train_tokens - seq_len - 1, the tokens that
    are an input in every complete epoch whatever its phase (None when the training part is shorter
    than two windows); the first seq_len - 1 and the last seq_len tokens depend on the phases drawn.
    """
    exposures = token_exposures(starts, num_train_tokens, seq_len)
    inner = exposures[seq_len - 1: num_train_tokens - seq_len]
    return {
        "epochs_over_training_tokens": int(exposures.sum()) / num_train_tokens,
        "fraction_of_training_tokens_seen": int((exposures > 0).sum()) / num_train_tokens,
        "exposures_min": int(exposures.min()),
        "exposures_max": int(exposures.max()),
        "exposures_min_away_from_edges": int(inner.min()) if len(inner) else None,
        "exposures_max_away_from_edges": int(inner.max()) if len(inner) else None,
    }


def exposure_report(num_train_tokens: int, config: ExperimentConfig) -> dict[str, Any]:
    """What the experiment header records about sampling: tokens trained per model, then the exposure
    numbers of every seed's batch_starts (`exposures_per_seed`) and over all seeds together (mean
    epochs, the smallest fraction of tokens seen, the lowest min and the highest max)."""
    per_seed = {str(seed): exposure_summary(batch_starts(num_train_tokens, config, seed), num_train_tokens,
                                            config.max_seq_len) for seed in config.run_seeds}
    summaries = list(per_seed.values())

    def lowest(key: str) -> Any:
        values = [summary[key] for summary in summaries if summary[key] is not None]
        return min(values) if values else None

    def highest(key: str) -> Any:
        values = [summary[key] for summary in summaries if summary[key] is not None]
        return max(values) if values else None

    return {
        "sampling": (f"epochs of non-overlapping {config.max_seq_len}-token windows (+1 target token) over the training "
                     f"tokens, a seeded random phase (0..{config.max_seq_len - 1}) and order per epoch; the last partial "
                     "window of an epoch is dropped; the same batches for every arm of a seed"),
        "tokens_trained_per_model": config.max_steps * config.batch_size * config.max_seq_len,
        "epochs_over_training_tokens": summaries[0]["epochs_over_training_tokens"],  # the same for every seed
        "fraction_of_training_tokens_seen": lowest("fraction_of_training_tokens_seen"),
        "exposures_min": lowest("exposures_min"),
        "exposures_max": highest("exposures_max"),
        "exposures_min_away_from_edges": lowest("exposures_min_away_from_edges"),
        "exposures_max_away_from_edges": highest("exposures_max_away_from_edges"),
        "exposures_per_seed": per_seed,
    }


def exposure_line(report: dict[str, Any], seq_len: int) -> str:
    """The log line for an exposure_report: how often each training token is seen, exactly."""
    if report["exposures_max"] <= 1:
        return (f"Each training token is seen at most once ({report['fraction_of_training_tokens_seen']:.1%} of "
                "training tokens once, the rest never): no repetition.")
    low, high = report["exposures_min"], report["exposures_max"]
    edges = ""
    if report["exposures_min_away_from_edges"] is not None:
        inner = report["exposures_min_away_from_edges"], report["exposures_max_away_from_edges"]
        if inner != (low, high):
            edges = (f"; the first {seq_len - 1} and last {seq_len} training tokens, where the window phase moves, "
                     f"{low} to {high} times")
            low, high = inner
    return (f"Each training token is seen {report['epochs_over_training_tokens']:.1f} times on average (min {low}, "
            f"max {high}{edges}): validation loss then measures generalisation from a repeated set "
            "(raise --max-tokens to train without repetition).")


def training_batch(train: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `starts` (gathered on train's device)."""
    windows = train[starts.unsqueeze(1) + torch.arange(seq_len + 1, device=starts.device)]
    return windows[:, :-1], windows[:, 1:]


def validation_windows(val: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows of the validation tokens: the fixed validation set."""
    n = (len(val) - 1) // seq_len
    return val[: n * seq_len].view(n, seq_len), val[1 : n * seq_len + 1].view(n, seq_len)
