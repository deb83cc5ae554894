"""Where the text comes from: the Hugging Face Hub (when huggingface_hub can reach it), the user's own file,
or the offline corpus."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import ConfigError
from common.safe_json import JSONInputError, parse_json
from config.settings import ExperimentConfig

LOCAL_FORMATS = (".txt", ".jsonl", ".parquet")
JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
              list: "an array", dict: "an object"}  # every type json.loads returns


TRUE_WORDS = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub.constants._is_true takes as set


def hub_offline_variable() -> str | None:
    """The variable that puts the Hub libraries offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, as
    huggingface_hub reads them, or HF_DATASETS_OFFLINE, as datasets does), e.g. "HF_HUB_OFFLINE=1"; None if none."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").upper() in TRUE_WORDS:
            return f"{name}={os.environ[name]}"
    return None


def hub_unreachable_reason(timeout_s: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None when it answers.

    Decided as huggingface_hub itself connects, so that the answer holds for the downloads that follow:
    its offline variables first, then one HEAD request to HF_ENDPOINT (default https://huggingface.co)
    through huggingface_hub's own HTTP client (`get_session()`), which honours HTTPS_PROXY, HTTP_PROXY,
    ALL_PROXY and NO_PROXY, and the endpoint's scheme and port. Any answer below 500 means reachable.
    """
    offline = hub_offline_variable()
    if offline:
        return offline
    from huggingface_hub import get_session  # heavy import, only needed on this path

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        response = get_session().head(endpoint + "/", timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - no route, DNS, proxy refused, TLS, offline mode set at import ...
        return f"{endpoint}: {type(error).__name__}: {str(error)[:100]}"
    if response.status_code >= 500:
        return f"{endpoint} answered HTTP {response.status_code}"
    return None


def hub_documents(config: ExperimentConfig) -> list[str]:
    """The public experiment's data: the first num_documents documents of the streamed corpus (its
    config.text_field), each cut to max_chars_per_doc characters (0: whole)."""
    from datasets import load_dataset  # heavy import, only needed on this path

    stream = load_dataset(config.dataset_name, config.dataset_config, split="train", streaming=True)
    documents: list[str] = []
    for row in stream:
        if config.text_field not in row:
            raise ConfigError(f"--text-field {config.text_field}: the dataset {config.dataset_name} has no such field "
                              f"(its fields: {', '.join(map(str, row))})")
        documents.append(_cut(str(row[config.text_field]), config.max_chars_per_doc))
        if len(documents) == config.num_documents:
            break
    return documents


def _cut(text: str, max_chars: int) -> str:
    return text[:max_chars] if max_chars else text


def check_local_path(path: str) -> None:
    """Fail fast on a --data path that cannot be read or has an unknown format."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data {path}: no such file; give a .txt, .jsonl or .parquet file")
    if p.suffix.lower() not in LOCAL_FORMATS:
        raise ConfigError(f"--data {path}: unknown format {p.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"--data {path}: permission denied; make the file readable")
    if p.suffix.lower() == ".parquet":
        _import_pyarrow(path)


def _import_pyarrow(path: str) -> None:
    """pyarrow reads .parquet; it comes with datasets, but a user may have neither: one line, not a traceback."""
    try:
        import pyarrow.parquet  # noqa: F401 - only whether it imports
    except ImportError as error:
        raise ConfigError(f"--data {path}: reading a .parquet file needs pyarrow, which does not import here "
                          f"({type(error).__name__}: {str(error)[:80]}); `pip install pyarrow`, or give the text as "
                          ".jsonl or .txt") from None


def local_documents(path: str, config: ExperimentConfig) -> list[str]:
    """Documents from a local file (local_texts), capped by num_documents and max_chars_per_doc (0: no cap)."""
    return capped(local_texts(path, config.text_field), config)


def capped(texts: list[str], config: ExperimentConfig) -> list[str]:
    """The first num_documents texts, each cut to max_chars_per_doc characters (0: no cap)."""
    return [_cut(t, config.max_chars_per_doc) for t in texts[: config.num_documents or None]]


def local_texts(path: str, text_field: str = "text") -> list[str]:
    """Every document of a local file: .txt (blank-line separated), .jsonl or .parquet (the `text_field` field).

    The path was checked by check_local_path before any data work started. Every problem with the
    content is a ConfigError that names the file and, for text formats, the line, so the user gets
    one `error:` line instead of a traceback.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        texts = [t.strip() for t in _read_text(path).split("\n\n")]
    elif suffix == ".jsonl":
        texts = _jsonl_texts(path, text_field)
    else:
        texts = _parquet_texts(path, text_field)
    documents = [t for t in texts if t]
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


def _jsonl_texts(path: str, field: str = "text") -> list[str]:
    """The `field` of every non-blank line; lines are counted as an editor counts them (blank ones too)."""
    texts: list[str] = []
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)  # bounded: a line nested 100,000 deep or a 5,000-digit number is an error, not a crash
        except JSONInputError as error:
            raise ConfigError(f"--data {path}: line {line_no}: {error}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"--data {path}: line {line_no} is {_json_kind(row)}, not an object with a {field!r} field")
        if field not in row:
            raise ConfigError(f"--data {path}: line {line_no} has no {field!r} field (name the field with --text-field)")
        if not isinstance(row[field], str):
            raise ConfigError(f"--data {path}: line {line_no}: {field!r} is {_json_kind(row[field])}, not a string")
        texts.append(row[field])
    return texts


def _parquet_texts(path: str, field: str = "text") -> list[str]:
    """The non-null values of the `field` column; a corrupt file or a non-string column is a ConfigError."""
    _import_pyarrow(path)
    import pyarrow as pa  # installed with datasets
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as file:
            names = file.schema_arrow.names
            column = file.read(columns=[field]).column(field) if field in names else None
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ConfigError(f"--data {path}: not a readable parquet file ({type(error).__name__}: {str(error)[:120]})") from error
    if column is None:
        raise ConfigError(f"--data {path}: no {field!r} column (columns: {', '.join(names)}; name it with --text-field)")
    values = column.to_pylist()
    for row, value in enumerate(values, 1):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"--data {path}: the {field!r} column holds {column.type} values (row {row}: {value!r:.40}), "
                              f"not strings")
    return [v for v in values if v]
