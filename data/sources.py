"""Where the text comes from: the Hugging Face Hub, the user's own file, or the offline corpus."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from experiment_config import ConfigError, ExperimentConfig

LOCAL_FORMATS = (".txt", ".jsonl", ".parquet")
JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
              list: "an array", dict: "an object"}  # every type json.loads returns


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of the Hub, so an offline machine does not sit through library retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_documents(config: ExperimentConfig) -> list[str]:
    """The public experiment's data: the first documents of the streamed corpus, each cut to max_chars."""
    from datasets import load_dataset  # heavy import, only needed on this path

    stream = load_dataset(config.dataset_name, config.dataset_config, split="train", streaming=True)
    documents: list[str] = []
    for row in stream:
        documents.append(row["text"][: config.max_chars_per_doc])
        if len(documents) == config.num_documents:
            break
    return documents


def check_local_path(path: str) -> None:
    """Fail fast on a --data path that cannot be read or has an unknown format."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data {path}: no such file; give a .txt, .jsonl or .parquet file")
    if p.suffix.lower() not in LOCAL_FORMATS:
        raise ConfigError(f"--data {path}: unknown format {p.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"--data {path}: permission denied; make the file readable")


def local_documents(path: str, config: ExperimentConfig) -> list[str]:
    """Documents from a local file: .txt (blank-line separated), .jsonl or .parquet (a 'text' field).

    The path was checked by check_local_path before any data work started. Every problem with the
    content is a ConfigError that names the file and, for text formats, the line, so the user gets
    one `error:` line instead of a traceback.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        texts = [t.strip() for t in _read_text(path).split("\n\n")]
    elif suffix == ".jsonl":
        texts = _jsonl_texts(path)
    else:
        texts = _parquet_texts(path)
    documents = [t[: config.max_chars_per_doc] for t in texts if t][: config.num_documents]
    if not documents:
        raise ConfigError(f"--data {path}: the file holds no text")
    return documents


def _read_text(path: str) -> str:
    """The file as UTF-8 text with newlines normalised; a binary or non-UTF-8 file is a ConfigError naming the line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"--data {path}: cannot read the file ({error.strerror or error})") from error
    try:
        text = raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of the first document
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"--data {path}: line {line} is not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                          f"is it a binary file? Save it as UTF-8 text") from error
    if "\x00" in text:  # valid UTF-8 can still be binary; NUL never occurs in text
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ConfigError(f"--data {path}: line {line} holds NUL bytes, so this is a binary file, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_kind(value: object) -> str:
    """JSON's own name for a decoded value's type, as the user wrote it in the file."""
    return JSON_KINDS.get(type(value), type(value).__name__)


def _jsonl_texts(path: str) -> list[str]:
    """The 'text' field of every non-blank line; lines are counted as an editor counts them (blank ones too)."""
    texts: list[str] = []
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:  # its own "line 1" is the line within this one line
            raise ConfigError(f"--data {path}: line {line_no} is not valid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(row, dict):
            raise ConfigError(f"--data {path}: line {line_no} is {_json_kind(row)}, not an object with a 'text' field")
        if "text" not in row:
            raise ConfigError(f"--data {path}: line {line_no} has no 'text' field")
        if not isinstance(row["text"], str):
            raise ConfigError(f"--data {path}: line {line_no}: 'text' is {_json_kind(row['text'])}, not a string")
        texts.append(row["text"])
    return texts


def _parquet_texts(path: str) -> list[str]:
    """The non-null values of the 'text' column; a corrupt file or a non-string column is a ConfigError."""
    import pyarrow as pa  # installed with datasets
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as file:
            names = file.schema_arrow.names
            column = file.read(columns=["text"]).column("text") if "text" in names else None
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ConfigError(f"--data {path}: not a readable parquet file ({type(error).__name__}: {str(error)[:120]})") from error
    if column is None:
        raise ConfigError(f"--data {path}: no 'text' column (columns: {', '.join(names)})")
    values = column.to_pylist()
    for row, value in enumerate(values, 1):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"--data {path}: the 'text' column holds {column.type} values (row {row}: {value!r:.40}), "
                              f"not strings")
    return [v for v in values if v]
