"""Tokenizers: the experiment's Hub tokenizer, or a byte-level BPE trained offline on the corpus.

Either can be saved beside a model and loaded again by a later process (`save_tokenizer`,
`load_tokenizer`): the offline BPE as its own `tokenizer.json` (it exists nowhere else), the Hub
tokenizer as its name (loaded again from the local Hugging Face cache, or the Hub). Beside them go the
files transformers reads (`tokenizer_config.json`; a Hub tokenizer's own files), so that
`AutoTokenizer.from_pretrained(folder)` loads the tokenizer with no network, and so does our loader.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from common.atomic_files import write_atomic
from common.safe_json import read_text_file

TOKENIZER_FILE = "tokenizer.json"
TRANSFORMERS_CONFIG_FILE = "tokenizer_config.json"  # transformers' own file beside it (AutoTokenizer reads both)
OFFLINE_BPE = "offline-bpe"  # spec kinds: the offline BPE's JSON, or a Hub tokenizer's name
HUB = "hub"
EOS_TOKEN = "<|endoftext|>"


def _cannot_decode(ids: list[int]) -> str:
    raise NotImplementedError("this tokenizer has no decoder")


@dataclass
class TextTokenizer:
    name: str
    vocab_size: int
    encode: Callable[[str], list[int]]
    eos_token_id: int | None
    decode: Callable[[list[int]], str] = _cannot_decode  # special tokens (e.g. EOS) are kept in the text
    kind: str = "custom"  # OFFLINE_BPE, HUB, or anything else (e.g. a test's stand-in: not savable)
    tokenizer_json: str | None = None  # the offline BPE's whole definition (tokenizers' Tokenizer.to_str())
    hub_name: str | None = None  # the Hub tokenizer's name, as given to AutoTokenizer.from_pretrained
    transformers: Any = None  # a Hub tokenizer's transformers object, whose save_pretrained writes its files


class TokenizerError(ValueError):
    """A saved tokenizer that cannot be loaded; the message names the file or name and what to do."""


def hub_tokenizer(name: str, local_files_only: bool = False, source: str | None = None) -> TextTokenizer:
    """AutoTokenizer.from_pretrained(name); with local_files_only, only from the local Hugging Face cache.
    `source`: a folder holding the tokenizer's saved files, read instead of `name` (which it keeps)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source or name, local_files_only=local_files_only)
    return TextTokenizer(name, len(tok), lambda text: tok.encode(text, add_special_tokens=False), tok.eos_token_id,
                         decode=functools.partial(_decode_one, tok, name), kind=HUB, hub_name=name, transformers=tok)


def _decode_one(tok: Any, name: str, ids: list[int]) -> str:
    """A Hub tokenizer's text of one sequence."""
    text = tok.decode(ids, skip_special_tokens=False)
    if not isinstance(text, str):  # a list only for a batch of sequences, never for one
        raise TypeError(f"{name} decoded one sequence into {type(text).__name__}")
    return text


def train_offline_tokenizer(documents: list[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE trained on the documents themselves; needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return offline_tokenizer_from_json(tok.to_str())


def offline_tokenizer_from_json(tokenizer_json: str) -> TextTokenizer:
    """The offline BPE from its JSON definition (as `Tokenizer.to_str()` wrote it); ValueError if it is not one."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(tokenizer_json)
    except Exception as error:  # tokenizers raises its own Exception subclass on malformed JSON
        raise ValueError(f"not a tokenizers JSON definition ({str(error)[:120]})") from error
    return TextTokenizer(
        f"byte-level BPE ({tok.get_vocab_size()} tokens) trained offline on the corpus",
        tok.get_vocab_size(),
        lambda text: tok.encode(text).ids,
        tok.token_to_id(EOS_TOKEN),
        decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
        kind=OFFLINE_BPE,
        tokenizer_json=tokenizer_json,
    )


def save_tokenizer(tokenizer: TextTokenizer | str, directory: Path) -> dict[str, Any]:
    """Save what rebuilds `tokenizer` into `directory` and return its spec (JSON-serialisable).

    Offline BPE: writes tokenizer.json (atomically) and transformers' tokenizer_config.json, and returns
    {"kind": "offline-bpe", "file": "tokenizer.json", "eos_token_id": ..., ...}.
    Hub tokenizer: writes its own files (save_pretrained) and returns {"kind": "hub", "name": ..., "eos_token_id": ...}.
    A str (the name of a Hub tokenizer that could not be loaded here): writes nothing (a stale tokenizer.json there
    is removed) and returns {"kind": "hub", "name": ...}; AutoTokenizer cannot load that folder offline.
    """
    if isinstance(tokenizer, str) or tokenizer.kind == HUB:
        name = tokenizer if isinstance(tokenizer, str) else tokenizer.hub_name or tokenizer.name
        (directory / TOKENIZER_FILE).unlink(missing_ok=True)
        if isinstance(tokenizer, str) or tokenizer.transformers is None:
            return {"kind": HUB, "name": name}
        tokenizer.transformers.save_pretrained(directory)
        return {"kind": HUB, "name": name, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.kind == OFFLINE_BPE and tokenizer.tokenizer_json is not None:
        text = tokenizer.tokenizer_json
        write_atomic(directory / TOKENIZER_FILE, lambda file: file.write(text), binary=False)
        save_transformers_config(text, directory)
        return {"kind": OFFLINE_BPE, "file": TOKENIZER_FILE, "vocab_size": tokenizer.vocab_size,
                "eos_token_id": tokenizer.eos_token_id}
    raise ValueError(f"tokenizer {tokenizer.name!r} (kind {tokenizer.kind!r}) cannot be saved: only the offline BPE "
                     "and Hub tokenizers can")


def save_transformers_config(tokenizer_json: str, directory: Path) -> None:
    """The files besides tokenizer.json that AutoTokenizer reads for the offline BPE (tokenizer_config.json: its class
    and end-of-text token), as transformers itself writes them; our tokenizer.json is kept byte for byte."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token=EOS_TOKEN)
    with tempfile.TemporaryDirectory() as staging:
        fast.save_pretrained(staging)
        for written in Path(staging).iterdir():
            if written.name != TOKENIZER_FILE:
                shutil.copyfile(written, directory / written.name)


def load_tokenizer(source: Path | Mapping[str, Any], directory: Path | None = None) -> TextTokenizer:
    """The tokenizer that save_tokenizer saved.

    `source` is either a spec returned by save_tokenizer (its file, if any, is read from `directory`),
    or a folder holding a tokenizer.json (a saved model's folder keeps the spec in its config.json's
    extra["tokenizer"]; pass that for a Hub tokenizer). A Hub tokenizer is loaded from its files in `directory` when
    the model was saved with them, else by name from the local Hugging Face cache, then from the Hub. Raises TokenizerError naming the file or name when it cannot be loaded; a spec's
    file must lie inside `directory` (a link or `..` that leads out of it is refused).
    """
    if isinstance(source, Path):
        spec: Mapping[str, Any] = {"kind": OFFLINE_BPE, "file": TOKENIZER_FILE}
        directory = source
    else:
        spec = source
    kind = spec.get("kind")
    if kind == OFFLINE_BPE:
        if directory is None:
            raise TokenizerError("an offline-bpe tokenizer spec needs the folder that holds its file")
        file = spec.get("file", TOKENIZER_FILE)
        path = directory / str(file)
        inside = isinstance(file, str) and file and "\x00" not in file and path.resolve().is_relative_to(directory.resolve())
        if not inside:
            raise TokenizerError(f"tokenizer file {file!r} is not a file inside {directory}; a saved model's tokenizer "
                                 "must be in its own folder: save the model again")
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} is missing; save the model again (a Hub tokenizer is "
                                 "saved as its name: pass the spec save_tokenizer returned)")
        try:  # read within safe_json's size bound; its JSONInputError is a ValueError
            return offline_tokenizer_from_json(read_text_file(path))
        except ValueError as error:
            raise TokenizerError(f"tokenizer file {path} cannot be read ({error}); save the model again or copy "
                                 "its tokenizer.json back") from error
    if kind == HUB and isinstance(spec.get("name"), str):
        name: str = spec["name"]
        if directory is not None and (directory / TRANSFORMERS_CONFIG_FILE).is_file():
            try:  # its files saved beside the model: no cache and no network needed
                return hub_tokenizer(name, local_files_only=True, source=str(directory))
            except Exception:  # noqa: BLE001 - damaged files: the cache and the Hub below
                pass
        try:
            return hub_tokenizer(name, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local cache: try the Hub itself below
            pass
        try:
            return hub_tokenizer(name)
        except Exception as error:  # noqa: BLE001 - transformers/huggingface_hub raise many kinds
            raise TokenizerError(f"Hub tokenizer {name!r} is neither in the local Hugging Face cache nor reachable "
                                 f"({type(error).__name__}); connect once to download it") from error
    raise TokenizerError(f"unknown tokenizer spec {json.dumps(dict(spec))}: expected kind {OFFLINE_BPE!r} or {HUB!r}")
