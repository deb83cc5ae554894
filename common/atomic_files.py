"""Files (and folders) written whole or not at all: the token cache, the results JSON, the plots, saved models.

Each write goes to a temporary file of its own (a unique name from mkstemp) in the target's folder
and is then renamed over the target. Readers see the whole old file or the whole new one, two
runs writing the same file never share a temporary file, and a failed write leaves no temporary
file behind. Used by data/ and training/ alike, so it depends on neither.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Callable


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import, not while threads write files
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK  # ordinary, shareable files (mkstemp would make them private)


def write_atomic(path: Path, write: Callable[[IO[Any]], object], binary: bool = True) -> None:
    """Call write(file) on a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to fill; on a clean exit it is renamed to `path`
    (a folder already there is replaced), on any exception (Ctrl-C included) it is removed.

    So `path` holds a whole save or none: never the first files of one that was cut short.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    retired: Path | None = None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_UMASK)
        if path.exists():  # rename cannot replace a non-empty folder: move the old one aside, then drop it
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, retired / path.name)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and not path.exists() and (retired / path.name).exists():
            os.replace(retired / path.name, path)  # stopped between the two renames: the old save goes back
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
