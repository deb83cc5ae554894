"""JSON (and a TOML file's text) from files the user hands us (--config, --data lines, a checkpoint's
config.json), read within limits.

Python's json module turns hostile input into exceptions that are not decoding errors: a value
nested 100,000 deep raises RecursionError, an integer of 5,000 digits ValueError (the interpreter's
int-conversion limit), and a 10 GB file is read whole before anything is checked. Here each of
these is a JSONInputError whose message says what is wrong, so a caller turns it into one `error:`
line. Used by data/, models/ and the CLI alike, so it depends on none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_DEPTH = 64  # results JSON nests about 6 deep; nothing the project writes comes near this
MAX_INT_DIGITS = 100  # far above any count or seed (< 2**63: 19 digits), far below the interpreter's 4,300
MAX_FILE_BYTES = 256 * 2**20  # a results JSON with long curves is a few MB


class JSONInputError(ValueError):
    """Input that is not JSON this project can use; the message says why (and where, for a syntax error)."""


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONInputError(f"a number with {len(digits.lstrip('-')):,} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(digits)


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads(text) with nesting and integer size bounded; JSONInputError for anything unusable."""
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}" if "\n" in text.rstrip("\n") else f"column {error.colno}"
        raise JSONInputError(f"not valid JSON ({error.msg} at {where})") from None
    except RecursionError:
        raise JSONInputError(f"nested too deeply (at most {max_depth} levels of lists and objects)") from None
    except JSONInputError:
        raise
    except ValueError as error:  # e.g. a float literal the interpreter refuses
        raise JSONInputError(f"not usable JSON ({error})") from None
    return check_depth(value, max_depth)


def read_text_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of `path`, refused without reading it when it is larger than max_bytes; OSError and
    UnicodeDecodeError become JSONInputError (the message says which)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise JSONInputError(f"{size:,} bytes, more than the {max_bytes:,} accepted")
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise JSONInputError(f"cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise JSONInputError(f"not UTF-8 text (byte {error.start})") from None


def read_json_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """The JSON in `path` (read_text_file, then parse_json)."""
    return parse_json(read_text_file(path, max_bytes))


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> Any:
    """`value` (parsed from any format, e.g. TOML), or JSONInputError when lists and tables nest deeper than max_depth."""
    if _depth(value) > max_depth:
        raise JSONInputError(f"nested too deeply (at most {max_depth} levels of lists and objects)")
    return value
