"""Every ExperimentConfig setting as a command-line flag and as a key of a config file, generated from the dataclass.

Each field gets a flag (`--field-name`, or the name its `setting(flag=...)` metadata gives, with
`--field-name` kept as an alias) whose type, choices and number of values follow from the field's type,
and whose help is the field's trailing comment plus the defaults of both presets. A new field therefore
needs nothing here. The argparse groups are the dataclass's section comments.

A config file (`--config`) is JSON or TOML: a plain table of settings, a results JSON (its
experiment.config) or a saved model's config.json (its "config"). Settings it lacks come from the
preset (`--preset`, else the file's own `preset`, else the machine's: full with CUDA, cpu without);
flags override the file. `config_toml` writes the resolved config back as TOML (`--print-config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from common.errors import ConfigError
from common.safe_json import check_depth, read_json_file, read_text_file
from config.settings import MLA_SIZES, NONE_WORD, PRESETS, ExperimentConfig, mla_sizes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with tomli, tomllib's origin
    import tomli as tomllib

FULL_DEFAULTS = PRESETS["full"](ExperimentConfig())
CPU_DEFAULTS = PRESETS["cpu"](ExperimentConfig())
DATA_CAPS = ("num_documents", "max_chars_per_doc", "max_tokens")  # 0 (no cap) with --data, unless the user sets them
HINTS = typing.get_type_hints(ExperimentConfig)


# --- what the dataclass says about each field ------------------------------------------------------

@functools.lru_cache(maxsize=None)  # the source does not change while the process runs
def field_comments(cls: type = ExperimentConfig) -> tuple[dict[str, str], dict[str, str]]:
    """({field: its trailing comment}, {field: the comment line standing above its section}) read from
    the class's source; empty when the source cannot be read (the flags then have no help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}, {}
    names = {field.name for field in dataclasses.fields(cls)}
    helps: dict[str, str] = {}
    sections: dict[str, str] = {}
    section = ""
    body_indent: int | None = None
    after_break = True  # the class line or a blank line came last: a comment alone on its line here is a title
    line_tokens: list[tokenize.TokenInfo] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.NEWLINE, tokenize.NL):
            if token.type not in (tokenize.INDENT, tokenize.DEDENT):
                line_tokens.append(token)
            continue
        if not line_tokens:
            after_break = True
            continue
        first, comment = line_tokens[0], line_tokens[-1]
        if first.type == tokenize.COMMENT:  # a comment alone on its line, after a blank line: the title of what follows
            if after_break and (body_indent is None or first.start[1] == body_indent):
                section = first.string.lstrip("#").strip()
            line_tokens = []
            continue  # (a comment block directly under a field is a note on the next field, not a title)
        code = [t for t in line_tokens if t.type != tokenize.COMMENT]
        after_break = bool(code) and code[-1].string == ":"  # the class line: its body's first comment is a title
        if (first.type == tokenize.NAME and first.string in names and len(line_tokens) > 1
              and line_tokens[1].string == ":" and first.start[1] == (body_indent or first.start[1])):
            body_indent = first.start[1]
            sections[first.string] = section
            if comment.type == tokenize.COMMENT:
                helps[first.string] = comment.string.lstrip("#").strip()
        line_tokens = []
    return helps, sections


def cli_options(field: dataclasses.Field[Any]) -> dict[str, Any]:
    """The field's `setting(...)` command-line metadata ({} for a plain field)."""
    return dict(field.metadata.get("cli", {}))


def flag_names(field: dataclasses.Field[Any]) -> list[str]:
    """Its flags: the metadata's name first, then --field-name."""
    generated = "--" + field.name.replace("_", "-")
    primary = cli_options(field).get("flag", generated)
    return [primary] + ([generated] if generated != primary else [])


def _optional_item(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, True) or (hint, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if len(options) == 1:
            return options[0], True
    return hint, False


def format_value(value: Any) -> str:
    """A setting's value as a user types it."""
    if value is None:
        return NONE_WORD
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(format_value(v) for v in value) if value else "empty"
    if isinstance(value, int):
        return f"{value:,}" if value >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def defaults_text(name: str) -> str:
    """'default 1000; CPU preset 300' or 'default 42, both presets', read from the two presets."""
    full, cpu = getattr(FULL_DEFAULTS, name), getattr(CPU_DEFAULTS, name)
    if full == cpu:
        return f"default {format_value(full)}, both presets"
    return f"default {format_value(full)}; CPU preset {format_value(cpu)}"


# --- flags ----------------------------------------------------------------------------------------

class _ParseAs:
    """argparse's `type` for one value of `kind`; "none" gives None for an optional setting."""

    def __init__(self, kind: Any, optional: bool) -> None:
        self.kind, self.optional = kind, optional
        self.__name__ = getattr(kind, "__name__", "value")  # argparse names it in "invalid int value"

    def __call__(self, text: str) -> Any:
        if self.optional and text.lower() == NONE_WORD:
            return None
        return self.kind(text)


def _parse_as(kind: Any, optional: bool) -> Callable[[str], Any]:
    return _ParseAs(kind, optional)


class Switch(argparse.Action):
    """A bool setting: its flags turn it on, those listed in `off` turn it off. With `values_into`, the flags
    also take optional values for another setting (--lr-sweep [M ...])."""

    def __init__(self, option_strings: Sequence[str], dest: str, off: Iterable[str] = (), values_into: str | None = None,
                 **kwargs: Any) -> None:
        self.off = set(off)
        self.values_into = values_into
        super().__init__(option_strings, dest, nargs="*" if values_into else 0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string not in self.off)
        if values and self.values_into:
            setattr(namespace, self.values_into, tuple(values))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ExperimentConfig field, grouped by the dataclass's sections; a flag not given leaves
    its field out of the namespace (argparse.SUPPRESS), so that config_from_args knows what was set."""
    helps, sections = field_comments()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(ExperimentConfig):
        options = cli_options(field)
        title = sections.get(field.name, "")
        if title not in groups:
            groups[title] = parser.add_argument_group(title or "settings")
        group = groups[title]
        hint, optional = _optional_item(HINTS[field.name])
        text = helps.get(field.name, field.name.replace("_", " "))
        if options.get("show_default", True):
            text += f" ({defaults_text(field.name)})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if hint is bool:
            on = flag_names(field)
            off = [f"--no-{name[2:]}" for name in on] + ([options["off_flag"]] if "off_flag" in options else [])
            into = options.get("values_into")
            if into:  # on flags that take values: the off flags are a flag of their own, left out of --help
                group.add_argument(*on, action=Switch, values_into=into, metavar=options.get("metavar", "X"),
                                   type=_parse_as(typing.get_args(HINTS[into])[0], False), **kwargs)
                group.add_argument(*off, action=Switch, off=off, **{**kwargs, "help": argparse.SUPPRESS})
            else:
                group.add_argument(*on, *off, action=Switch, off=off, **kwargs)
            continue
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            kwargs.update(nargs="+", type=_parse_as(item, False))
        else:
            item = hint
            kwargs.update(type=_parse_as(hint, optional))
        if "choices" in options:
            kwargs["choices"] = options["choices"]
        else:
            kwargs["metavar"] = options.get("metavar", {int: "N", float: "X"}.get(item, field.name.upper()))
        group.add_argument(*flag_names(field), **kwargs)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (every field the namespace holds)."""
    names = {field.name for field in dataclasses.fields(ExperimentConfig)}
    return {name: tuple(value) if isinstance(value, list) else value  # nargs gives lists; the fields are tuples
            for name, value in vars(args).items() if name in names}


# --- config files ---------------------------------------------------------------------------------

def read_config_file(path: str) -> dict[str, Any]:
    """The settings in a JSON or TOML file (TOML when it ends in .toml): a plain table of settings, a results
    JSON (its experiment.config) or a saved model's config.json (its "config")."""
    kind = "TOML" if path.lower().endswith(".toml") else "JSON"
    try:  # within bounds (safe_json): a file nested 100,000 deep or a 5,000-digit number is an error, not a crash
        if kind == "TOML":
            values: Any = check_depth(tomllib.loads(read_text_file(Path(path))))
        else:
            values = read_json_file(Path(path))
    except RecursionError:
        raise ConfigError(f"--config {path}: cannot read it as {kind} (nested too deeply)") from None
    except ValueError as error:  # JSONInputError, TOMLDecodeError and the int-size limit are ValueErrors
        raise ConfigError(f"--config {path}: cannot read it as {kind} ({error}); give a .toml or .json file of settings, "
                          "a results JSON or a saved model's config.json") from None
    if isinstance(values, dict) and isinstance(values.get("experiment"), dict):  # a results file
        values = values["experiment"].get("config")
    elif isinstance(values, dict) and isinstance(values.get("config"), dict):  # a saved model's config.json
        values = values["config"]
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a {kind} object of settings")
    return values


def config_from_args(args: argparse.Namespace, cuda_available: bool,
                     defaults: Mapping[str, Any] | None = None) -> tuple[ExperimentConfig, str | None]:
    """The config the arguments ask for (flags over --config file over a command's `defaults` over the preset), and
    a one-line notice for what the user should know (the CPU preset chosen for them, MLA's sizes following the
    width)."""
    flags = flag_values(args)
    config_path = getattr(args, "config", None)
    in_file = read_config_file(config_path) if config_path else {}
    device = str(flags.get("device", in_file.get("device", "auto")))
    preset = flags.get("preset") or (in_file.get("preset") if in_file.get("preset") in PRESETS else None)
    notice = None
    if preset is None:
        preset = "full" if device.startswith("cuda") or device == "auto" and cuda_available else "cpu"
        lacking = {field.name for field in dataclasses.fields(ExperimentConfig)} - set(in_file) - set(flags)
        if preset == "cpu" and lacking:
            notice = ("No CUDA GPU: " + ("settings the config file lacks come from the CPU preset" if in_file else
                                         "running the CPU preset (a scaled-down model, a few minutes)")
                      + "; the full experiment needs a GPU (force it with --preset full --device cpu).")
    try:
        config = ExperimentConfig.from_dict(in_file, base=PRESETS[preset](ExperimentConfig()).replace(**(defaults or {})))
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"--config {config_path}: {error}") from None
    config = config.replace(**flags)
    given = set(in_file) | set(flags)
    if "eval_every" not in given and "max_steps" in given:
        config = config.replace(eval_every=min(config.eval_every, config.max_steps))
    if config.data_path is not None:  # your own file is read whole unless you cap it
        config = config.replace(**{cap: 0 for cap in DATA_CAPS if cap not in given})
    config, scaled = mla_follows_width(config, given)
    return config, "\n".join(line for line in (notice, scaled) if line) or None


def mla_follows_width(config: ExperimentConfig, given: set[str]) -> tuple[ExperimentConfig, str | None]:
    """A width or head count set without any of MLA's sizes: MLA's sizes follow it by the presets' proportions
    (mla_sizes), said in one line, so that widening the model does not leave MLA at the preset's ranks."""
    sizes = mla_sizes(config.d_model, config.n_heads)
    if not {"d_model", "n_heads"} & given or set(MLA_SIZES) & given or config.n_heads <= 0 or config.d_model <= 0:
        return config, None
    if all(getattr(config, name) == value for name, value in sizes.items()):
        return config, None
    words = ", ".join(f"{name} {value}" for name, value in sizes.items())
    return config.replace(**sizes), (f"MLA's sizes follow d_model {config.d_model} and {config.n_heads} heads by the "
                                     f"presets' proportions: {words} (set any of them to choose them yourself).")


def config_toml(config: ExperimentConfig) -> str:
    """The whole config as TOML, every setting with its help as a comment; fed back through --config it gives
    this config again (None is written "none", since TOML has no null)."""
    helps, sections = field_comments()
    lines = ["# ExperimentConfig, every setting (python exp6_trainer.py --print-config).",
             "# Run it with: python exp6_trainer.py --config THIS_FILE  (flags given with it override it)"]
    section = None
    for field in dataclasses.fields(config):
        if sections.get(field.name) != section:
            section = sections.get(field.name)
            lines += ["", f"# --- {section} ---"] if section else [""]
        value = getattr(config, field.name)
        if field.name in helps:
            lines.append(f"# {helps[field.name]}")
        lines.append(tomli_w.dumps({field.name: NONE_WORD if value is None else value}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def options_markdown(parser: argparse.ArgumentParser) -> str:
    """The README's table of options, one row per flag of `parser` (its --help without the wrapping)."""
    rows = ["| option | meaning |", "| --- | --- |"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        names = list(action.option_strings)
        if action.metavar is not None:
            metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
        elif action.choices is not None:
            metavar = "|".join(map(str, action.choices))
        else:
            metavar = ""
        if metavar and action.nargs in ("+", "*"):
            metavar = f"{metavar} ..." if action.nargs == "+" else f"[{metavar} ...]"
        first = f"`{names[0]} {metavar}`" if metavar else f"`{names[0]}`"
        cell = ", ".join([first] + [f"`{name}`" for name in names[1:]])
        meaning = (action.help or "").replace("%%", "%").replace("|", "\\|")
        cell = cell.replace("|", "\\|")  # a table cell ends at any |, even inside `code`
        rows.append(f"| {cell} | {meaning} |")
    return "\n".join(rows)
