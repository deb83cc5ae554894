"""A new user's broken --data file: one `error: --data PATH: ...` line naming the line, exit code 2, before training."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

import pytest

from common.errors import ConfigError
from data import dataset as dataset_module
from data.dataset import prepare_data
from data.tokenizer import TextTokenizer
from exp6_trainer import main


def _jsonl(*rows: str) -> bytes:
    return "\n".join(rows).encode()


def _parquet(values: list[object]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(values))), "text": values}), path)

    return write


GOOD = json.dumps({"text": "A good first document about gardens and the weather in spring."})

# file name, content (bytes, or a function that writes the file), what the one error line must say
BROKEN_FILES: list[tuple[str, bytes | Callable[[Path], None], str]] = [
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", r"line 1 is not UTF-8 text \(byte 0x89\)"),
    ("latin1.txt", "first document\n\nsecond one\n\ncaf\xe9 au lait".encode("latin-1"), r"line 5 is not UTF-8 text \(byte 0xe9\)"),
    ("nul.txt", b"some text\nmore text\n\x00\x00\x00\x00", r"line 3 holds NUL bytes, so this is a binary file"),
    ("latin1.jsonl", _jsonl(GOOD) + b'\n{"text": "caf\xe9"}', r"line 2 is not UTF-8 text"),
    ("malformed.jsonl", _jsonl(GOOD, "", '{"text": "trailing comma",}', GOOD), r"line 3: not valid JSON \(.* column 27\)"),
    ("array_row.jsonl", _jsonl(GOOD, '["a", "list"]'), r"line 2 is an array, not an object with a 'text' field"),
    ("string_row.jsonl", _jsonl(GOOD, GOOD, '"just a string"'), r"line 3 is a string, not an object"),
    ("number_text.jsonl", _jsonl(GOOD, '{"text": 42}'), r"line 2: 'text' is a number, not a string"),
    ("null_text.jsonl", _jsonl(GOOD, GOOD, GOOD, '{"text": null}'), r"line 4: 'text' is null, not a string"),
    ("list_text.jsonl", _jsonl('{"text": ["a", "b"]}'), r"line 1: 'text' is an array, not a string"),
    ("no_text.jsonl", _jsonl(GOOD, '{"body": "x"}'), r"line 2 has no 'text' field"),
    ("corrupt.parquet", b"PAR1 this was never a parquet file PAR1", r"not a readable parquet file"),
    ("ints.parquet", _parquet([1, 2, 3]), r"the 'text' column holds int64 values \(row 1: 1\), not strings"),
    ("lists.parquet", _parquet([["a"], ["b"]]), r"the 'text' column holds list<.*> values .*not strings"),
]


def _write(tmp_path: Path, name: str, content: bytes | Callable[[Path], None]) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)
    return path


@pytest.mark.parametrize("name,content,message", BROKEN_FILES, ids=[case[0] for case in BROKEN_FILES])
def test_a_broken_data_file_is_a_config_error_naming_file_and_line(config, tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(ConfigError) as raised:
        prepare_data(config.replace(data_path=str(path)), lambda _: None)
    text = str(raised.value)
    assert text.startswith(f"--data {path}: ") and re.search(message, text), text
    assert len(text.splitlines()) == 1
    if "line" in message:  # exactly one line number, the right one (json's own "line 1" must not leak)
        assert re.findall(r"line \d+", text) == re.findall(r"line \d+", message), text


@pytest.mark.parametrize("name,content,message", BROKEN_FILES, ids=[case[0] for case in BROKEN_FILES])
def test_a_broken_data_file_on_the_command_line_exits_2_with_one_error_line(tmp_path, capsys, name, content, message):
    path = _write(tmp_path, name, content)
    out = tmp_path / "out"
    code = main(["--offline", "--data", str(path), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --data {path}: ") and re.search(message, err[0]), err[0]
    assert not (out / "exp6_attention_comparison.json").exists()  # stopped before training


def test_a_parquet_file_without_pyarrow_is_one_error_line_with_the_fix(tmp_path, capsys, monkeypatch):
    """pyarrow comes with datasets, but a user may have neither: the fix, not an ImportError traceback."""
    path = _write(tmp_path, "corpus.parquet", b"PAR1 refused before it is read, so written without pyarrow PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: `import pyarrow` raises ImportError
    out = tmp_path / "out"
    code = main(["--offline", "--data", str(path), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --data {path}: reading a .parquet file needs pyarrow") and "`pip install pyarrow`" in err[0]
    assert not out.exists() or not (out / "exp6_attention_comparison.json").exists()


def test_a_broken_file_is_not_blamed_on_the_hub(config, tmp_path, monkeypatch):
    """With the Hub reachable, a bad --data file stops the run; it does not fall back to the offline tokenizer."""
    monkeypatch.setattr(dataset_module, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(dataset_module, "hub_tokenizer", lambda name: TextTokenizer("chars", 128, lambda t: [ord(c) % 128 for c in t], 0))
    path = _write(tmp_path, "malformed.jsonl", _jsonl(GOOD, GOOD, "{oops"))
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"line 3: not valid JSON"):
        prepare_data(config.replace(data_path=str(path), offline=False), lines.append)
    assert not any(line.startswith("Offline") for line in lines), lines


def test_blank_lines_count_and_windows_line_endings_are_read(config, tmp_path):
    path = _write(tmp_path, "crlf.jsonl", b"\r\n".join([GOOD.encode(), b"", GOOD.encode(), b"[1]"]))
    with pytest.raises(ConfigError, match=r"line 4 is an array"):
        prepare_data(config.replace(data_path=str(path)), lambda _: None)
    bom = _write(tmp_path, "bom.txt", b"\xef\xbb\xbfFirst document.\r\n\r\nSecond document.")
    from data.sources import local_documents

    assert local_documents(str(bom), config) == ["First document.", "Second document."]
