"""Where the text comes from: the Hugging Face Hub, the user's own file, or the offline corpus."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from experiment_config import ConfigError, ExperimentConfig

LOCAL_FORMATS = (".txt", ".jsonl", ".parquet")


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


def local_documents(path: str, config: ExperimentConfig) -> list[str]:
    """Documents from a local file: .txt (blank-line separated), .jsonl or .parquet (a 'text' field).

    The path was checked by check_local_path before any data work started.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        texts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n")]
    elif suffix == ".jsonl":
        texts = []
        for line_no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise ConfigError(f"--data {path}: line {line_no} has no 'text' field")
                texts.append(row["text"])
    else:
        import pyarrow.parquet as pq  # installed with datasets

        table = pq.read_table(p)
        if "text" not in table.column_names:
            raise ConfigError(f"--data {path}: no 'text' column (columns: {', '.join(table.column_names)})")
        texts = [t for t in table.column("text").to_pylist() if t]
    documents = [t[: config.max_chars_per_doc] for t in texts if t][: config.num_documents]
    if not documents:
        raise ConfigError(f"--data {path}: the file holds no text")
    return documents
