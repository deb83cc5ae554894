"""A corpus that needs no network: the docstrings of the Python standard library on this machine.

It is English prose about programming that ships with every Python install, so nothing third-party
is committed and the text is the same wherever the same Python version runs. It is small and
narrow: results on it say that the pipeline works, not how the models compare on web text.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from pathlib import Path

SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
MIN_DOCUMENT_CHARS = 200  # a shorter piece of docstrings is not kept as a document


@functools.cache  # the standard library does not change while we run: each module is parsed once per process
def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(node, clean=True) for node in nodes)
    return "\n\n".join(d for d in docs if d and len(d) > 40)


def stdlib_documents(num_documents: int, max_chars: int) -> list[str]:
    """Standard-library docstrings (modules sorted by path), in documents of at most max_chars (0: a module's
    docstrings whole) and at least MIN_DOCUMENT_CHARS, the first num_documents of them (0: all)."""
    documents: list[str] = []
    if 0 < max_chars < MIN_DOCUMENT_CHARS:
        return documents  # every piece would be too short: none, at once rather than after parsing every module
    for path in stdlib_sources():
        text = _module_docstrings(path)
        size = max_chars or len(text) or 1  # 0: each module's docstrings whole
        for start in range(0, len(text), size):
            chunk = text[start : start + size]
            if len(chunk) >= MIN_DOCUMENT_CHARS:
                documents.append(chunk)
            if len(documents) == num_documents:
                return documents
    return documents


def stdlib_sources() -> list[Path]:
    """The standard library's .py files outside SKIPPED_PACKAGES, sorted by path (as pathlib sorts them). The
    skipped folders are never walked: site-packages alone can hold ten thousand files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_PACKAGES]
        found += [Path(folder, name) for name in files if name.endswith(".py")]
    return sorted(found)


def describe() -> str:
    return f"Python {sysconfig.get_python_version()} standard-library docstrings (offline corpus)"
