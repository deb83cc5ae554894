"""The error every layer raises for a setting or an input that cannot work: one line that says what is wrong
and how to fix it, which the command-line tools print as `error: ...` and exit 2."""

from __future__ import annotations


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines too) made one space: an error is one line."""
    return " ".join(str(text).split())


class ConfigError(ValueError):
    """A setting that cannot work; the message, always one line, says what is wrong and how to fix it."""

    def __init__(self, message: object) -> None:
        super().__init__(one_line(message))
