"""What the experiment and both benchmarks share to report results: strict JSON written whole or not
at all (to an --output checked before the first row), plain-text tables, and measurement rows that
turn a failure into an error row."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch

from common.atomic_files import write_atomic
from common.errors import ConfigError
from common.hardware import release_memory


def json_safe(value: Any) -> Any:
    """NaN/inf become None so the file is strict JSON any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def check_writable(directory: Path) -> None:
    """Raise OSError now, before any work, if files could not be written there (the folder is created)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
        pass


def check_output_file(text: str, flag: str = "--output") -> Path:
    """The JSON file a benchmark will write, checked before the first row: a .json name (a plot may go
    beside it as .png, so a .png name would be overwritten), not a folder, not a read-only file, in a
    folder that can be created and written. ConfigError naming the flag otherwise."""
    path = Path(text)
    if path.is_dir():
        raise ConfigError(f"{flag} {text}: is a folder; name a .json file in it")
    if path.suffix.lower() != ".json":
        raise ConfigError(f"{flag} {text}: must name a .json file (e.g. results.json); "
                          "a plot may be written beside it as .png")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {text}: the file is read-only; choose another --output")
    try:
        check_writable(path.parent)
    except OSError as error:
        raise ConfigError(f"{flag} {text}: cannot write in {path.parent} ({error.strerror or error}); "
                          "choose another --output") from None
    return path


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Strict JSON (NaN/inf become null), written whole or not at all (atomic_files.write_atomic)."""
    write_atomic(path, lambda file: json.dump(json_safe(payload), file, indent=2, allow_nan=False), binary=False)


def fmt(value: Any, spec: str) -> str:
    """format(value, spec), or "-" for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def times_fewer(ratio: float, what: str) -> str:
    """How a size compares with another, `ratio` = other / this: '4.0x fewer bytes than', '2.0x more bytes
    than' or 'as many bytes as', so that no sentence assumes which way it goes."""
    if ratio == 1:
        return f"as many {what} as"
    return f"{ratio:.1f}x fewer {what} than" if ratio > 1 else f"{1 / ratio:.1f}x more {what} than"


def render_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Header, rule and rows; the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers), "-" * (sum(widths) + 2 * (len(widths) - 1)), *(line(r) for r in rows)]


def guarded(build: Callable[[], dict[str, Any]], stub: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement; a failure (e.g. out of memory) becomes an error row and the benchmark goes on."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - reported in the row, the table and the exit code
        traceback.print_exc(file=sys.stderr)
        return {**stub, "error": f"{type(error).__name__}: {error}"}


@contextlib.contextmanager
def older_objects_frozen() -> Iterator[None]:
    """While inside, a garbage collection (release(), between measurements) scans only the objects made inside:
    everything older, the whole of torch among it, is frozen (gc.freeze), so a collection takes milliseconds, not
    the 170 ms it takes in a process that holds torch; thawed on the way out."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release(device: torch.device) -> None:
    """Free what the last measurement left (Python garbage, cached GPU blocks) before the next one."""
    gc.collect()
    release_memory(device)
