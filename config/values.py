"""Checks every command-line tool applies to every value it parsed, whatever the flag.

argparse checks a value's type (an int flag refuses "abc"), not its sense: "nan" and "inf" are floats,
a 30-digit number is an int, "" is a string. `check_parsed_values` walks the parsed namespace, so a flag
added tomorrow is checked too: integers must lie within +-2**63 (what tensors, generators and NumPy
hold), floats must be finite, strings non-empty and free of NUL bytes. Each tool then checks the range
that means something for its own flags. Used by inference/ and training/ alike, so it depends on neither.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, TypeVar

from common.errors import ConfigError
from config.settings import INT64_LIMIT

Plan = TypeVar("Plan")


def _problem(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) and not -INT64_LIMIT <= value < INT64_LIMIT:
        return "out of range (integers must lie within +-2**63)"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, str) and (not value or "\x00" in value):
        return "must be non-empty text without NUL bytes"
    return None


def check_parsed_values(args: argparse.Namespace) -> None:
    """ConfigError naming the first flag (--dest-name) whose value, or one of its values, no setting could use."""
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            problem = _problem(item)
            if problem is not None:
                shown = repr(item) if isinstance(item, str) else str(item)
                raise ConfigError(f"--{dest.replace('_', '-')} {shown[:40]}: {problem}")


def parse_and_plan(parser: argparse.ArgumentParser, args_list: list[str] | None,
                   plan: Callable[[argparse.Namespace], Plan]) -> Plan:
    """Parse the arguments and check them into a plan; a ConfigError exits 2 through the parser's own error."""
    args = parser.parse_args(args_list)
    try:
        return plan(args)
    except ConfigError as error:
        parser.error(str(error))
