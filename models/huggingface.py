"""What makes a saved folder a transformers model: config.json's keys and the modeling file, generated from our code.

`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` needs config.json to name a model type, the
classes (`auto_map`) and the architecture, and a modeling file beside the weights that defines those classes and
imports only what every transformers user has: torch, transformers and the standard library.

The modeling file is generated at every save from the project's own code, so no hand-kept copy exists to go
stale. `modeling_source(attention)` starts from the transformers wrapper (models/hf_model.py) and the arm's
attention (a class or a top-level function, as arms/<name>.py registers it), follows every name they use to its
definition in the project's modules (the shared LM, the MoE, RoPE, the kernels, the ExperimentConfig, the
checkpoint's names), and writes those definitions in dependency order, without the project's imports, under the
external imports they need; at the end it binds the wrapper's ATTENTION to the arm's attention. Only top-level
definitions are copied, each verbatim with the comment lines just above it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "exp6_moe_lm"  # config.json's model_type: the wrapper's, not one of transformers' own
MODELING_FILE = "modeling_exp6_moe.py"  # beside the weights; auto_map names its classes
CONFIG_CLASS = "Exp6MoEConfig"
MODEL_CLASS = "Exp6MoEForCausalLM"
WRAPPER_MODULE = "models.hf_model"
ALLOWED_PACKAGES = ("torch", "transformers")  # besides the standard library: what the modeling file may import
REPO = Path(__file__).resolve().parent.parent


class GenerationError(ValueError):
    """The modeling file cannot be generated from this code; the one-line message names the definition and the fix."""


def transformers_keys(eos_token_id: int | None = None) -> dict[str, Any]:
    """The keys config.json needs for AutoConfig and AutoModelForCausalLM (with trust_remote_code), and the end-of-text
    token generate stops at; the rest transformers reads is derived from the saved ExperimentConfig (hf_model.py)."""
    module = MODELING_FILE.removesuffix(".py")
    keys: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": [MODEL_CLASS],
        "auto_map": {"AutoConfig": f"{module}.{CONFIG_CLASS}", "AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"},
    }
    if eos_token_id is not None:
        keys["eos_token_id"] = eos_token_id
    return keys


@dataclass(frozen=True)
class Import:
    """One name an import statement binds: `import module [as alias]` (name None) or `from module import name [as alias]`."""

    module: str
    name: str | None
    alias: str

    def allowed(self) -> bool:
        return self.top == "__future__" or self.top in ALLOWED_PACKAGES or self.top in sys.stdlib_module_names

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def line(self) -> str:
        if self.name is not None:
            return f"from {self.module} import {self.name}" + (f" as {self.alias}" if self.alias != self.name else "")
        return f"import {self.module}" + (f" as {self.alias}" if self.alias != self.top else "")


@dataclass
class Module:
    """A project module's source, its top-level definitions (name -> statement) and the names its imports bind."""

    name: str
    path: Path
    lines: list[str]
    definitions: dict[str, ast.stmt] = field(default_factory=dict)
    imports: dict[str, Import] = field(default_factory=dict)

    def source_of(self, statement: ast.stmt) -> str:
        """The statement's lines, decorators and the comment lines just above it included."""
        decorators = getattr(statement, "decorator_list", [])
        start = min([statement.lineno] + [d.lineno for d in decorators])
        while start > 1 and self.lines[start - 2].startswith("#"):
            start -= 1
        assert statement.end_lineno is not None
        return "\n".join(self.lines[start - 1 : statement.end_lineno])


@functools.cache
def is_project_module(name: str) -> bool:
    """A module of this repository (not the standard library, not an installed package)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.has_location:  # a built-in or frozen module
        return False
    path = Path(spec.origin).resolve()
    return path.is_relative_to(REPO) and not {".venv", "venv", "site-packages"} & set(path.relative_to(REPO).parts)


def read_module(name: str) -> Module:
    """Parse a project module: its top-level definitions and imports (GenerationError for what cannot be copied)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin)
    lines, tree = parsed(str(path), path.stat().st_mtime_ns)
    module = Module(name, path, lines)
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                bound = alias.asname or alias.name.split(".")[0]
                module.imports[bound] = Import(alias.name, None, bound)
        elif isinstance(statement, ast.ImportFrom):
            if statement.level or statement.module is None:
                raise GenerationError(f"{path.name}: a relative import; the modeling file copies absolute imports only")
            for alias in statement.names:
                module.imports[alias.asname or alias.name] = Import(statement.module, alias.name, alias.asname or alias.name)
        else:
            for defined in defined_names(statement):
                module.definitions[defined] = statement
    return module


@functools.lru_cache(maxsize=256)
def parsed(path: str, mtime_ns: int) -> tuple[list[str], ast.Module]:
    """A source file's lines and syntax tree, read once per version of the file (mtime_ns: the cache key)."""
    text = Path(path).read_text(encoding="utf-8")
    return text.splitlines(), ast.parse(text)


def defined_names(statement: ast.stmt) -> list[str]:
    """The module-level names a top-level statement defines (a class, a function, an assignment's names)."""
    if isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return [statement.name]
    targets: list[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign):
        targets = [statement.target]
    return [node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)]


@dataclass
class Closure:
    """The definitions the roots need, found by following names; and the external imports they use."""

    modules: dict[str, Module] = field(default_factory=dict)
    statements: dict[str, dict[int, ast.stmt]] = field(default_factory=dict)  # module -> {line: statement}
    external: set[Import] = field(default_factory=set)
    depends: dict[str, set[str]] = field(default_factory=dict)  # module -> the project modules it takes names from

    def module(self, name: str) -> Module:
        if name not in self.modules:
            self.modules[name] = read_module(name)
            self.statements[name], self.depends[name] = {}, set()
        return self.modules[name]

    def add(self, module_name: str, name: str) -> None:
        """Include `name` as `module_name` defines or imports it, and everything it refers to."""
        pending = [(module_name, name)]
        while pending:
            where, what = pending.pop()
            module = self.module(where)
            if what in module.imports:
                pending += self.follow_import(module, module.imports[what])
                continue
            statement = module.definitions.get(what)
            if statement is None:
                raise GenerationError(f"{module.path.name} defines no top-level {what!r}: the modeling file copies "
                                      "top-level classes, functions and assignments")
            if statement.lineno in self.statements[where]:
                continue
            self.statements[where][statement.lineno] = statement
            pending += [(where, used_name) for used_name in names_used(statement)
                        if used_name in module.definitions or used_name in module.imports]  # not locals, not builtins

    def follow_import(self, module: Module, imported: Import) -> list[tuple[str, str]]:
        """An imported name: a project definition to copy, or an external import to keep (refused unless allowed)."""
        if is_project_module(imported.module):
            if imported.name is None or imported.alias != imported.name:
                raise GenerationError(f"{module.path.name}: `import {imported.module}` or an `as` alias of a project "
                                      "name; the modeling file needs `from module import name`")
            self.depends[module.name].add(imported.module)
            return [(imported.module, imported.name)]
        if not imported.allowed():
            raise GenerationError(f"{module.path.name} imports {imported.module} for the model; a saved model's code may "
                                  f"import only {', '.join(ALLOWED_PACKAGES)} and the standard library (or import it "
                                  "inside a try, as an optional dependency)")
        self.external.add(imported)
        same_name = {i for i in self.external if i.alias == imported.alias}
        # `import a.b` and `import a` bind the same package a; any other two imports of one name conflict
        if len({i.top if i.name is None and i.alias == i.top else i.line() for i in same_name}) > 1:
            raise GenerationError(f"{imported.alias} is imported as {' and as '.join(sorted(i.line() for i in same_name))}; "
                                  "import it the same way everywhere")
        return []


def module_order(closure: Closure) -> list[str]:
    """The included modules, each after the project modules it takes names from (the layout has no import circle)."""
    order: list[str] = []
    remaining = {name: set(deps) for name, deps in closure.depends.items()}
    while remaining:
        ready = sorted(name for name, deps in remaining.items() if not deps & set(remaining))
        if not ready:
            raise GenerationError(f"an import circle among {', '.join(sorted(remaining))}")
        order += ready
        for name in ready:
            del remaining[name]
    return [name for name in order if closure.statements[name]]  # a module that only passed a name on has none


def import_lines(imports: set[Import]) -> list[str]:
    """The external imports as isort groups them: the standard library, then torch and transformers; in each group
    `import x` lines first, then one `from x import a, b` line per module."""
    groups = []
    for third_party in (False, True):
        chosen = [i for i in imports if (i.top in ALLOWED_PACKAGES) == third_party and i.top != "__future__"]
        plain = sorted({i.line() for i in chosen if i.name is None})
        grouped: dict[str, list[str]] = {}
        for i in chosen:
            if i.name is not None:
                grouped.setdefault(i.module, []).append(i.line().split(" import ", 1)[1])
        groups.append("\n".join(plain + [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(grouped.items())]))
    return groups


@functools.cache  # statements come from parsed(): one analysis per version of a file, not one per save or preflight
def names_used(statement: ast.stmt) -> tuple[str, ...]:
    """Every name `statement` refers to, sorted (locals and builtins included: the caller keeps the module's)."""
    return tuple(sorted({node.id for node in ast.walk(statement) if isinstance(node, ast.Name)}))


@functools.cache  # as names_used
def foreign_imports(tree: ast.AST) -> tuple[str, ...]:
    """Every import in `tree` of something other than torch, transformers and the standard library, outside a try
    (an optional dependency); transformers requires the rest to be installed before it runs a saved model's code."""
    found: list[str] = []
    for node in imports_outside_try(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if not Import(alias.name, None, alias.name).allowed()]
        elif not Import(node.module or "", None, "").allowed():
            found.append(f"{'.' * node.level}{node.module or ''}")
    return tuple(found)


def imports_outside_try(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements anywhere under `node`, except inside a try (transformers' check skips those too)."""
    if isinstance(node, ast.Try):
        return []
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [node]
    return [found for child in ast.iter_child_nodes(node) for found in imports_outside_try(child)]


def join_definitions(statements: list[ast.stmt], texts: list[str]) -> str:
    """Definitions as PEP 8 spaces them: two blank lines around a class or function, none between assignments."""
    out = texts[0] if texts else ""
    for before, after, text in zip(statements, statements[1:], texts[1:]):
        simple = not isinstance(before, DEFINITIONS) and not isinstance(after, DEFINITIONS)
        out += ("\n" if simple else "\n\n\n") + text
    return out


DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def attention_root(attention: Callable[..., Any]) -> tuple[str, str]:
    """(module, name) of the arm's attention: a class or a function defined at the top level of a project module."""
    module, name = getattr(attention, "__module__", None), getattr(attention, "__qualname__", "")
    if not isinstance(module, str) or not name.isidentifier() or not is_project_module(module):
        raise GenerationError(f"the arm's attention {attention!r} is not a class or function defined at the top level of "
                              "a project module (a lambda, a partial or a nested function has no source to copy); "
                              "define it in arms/<name>.py or beside the other attention modules")
    return module, name


def modeling_source(attention: Callable[..., Any], arm: str) -> str:
    """The self-contained modeling file for a model of `arm` whose blocks get `attention` (its attention_factory)."""
    closure = Closure()
    for root in (CONFIG_CLASS, MODEL_CLASS):
        closure.add(WRAPPER_MODULE, root)
    attention_module, attention_name = attention_root(attention)
    closure.add(attention_module, attention_name)
    foreign = [name for statements in closure.statements.values() for statement in statements.values()
               for name in foreign_imports(statement)]  # imports inside the copied functions; the rest are checked
    if foreign:
        raise GenerationError(f"the modeling file would import {', '.join(sorted(set(foreign)))}; a saved model's code "
                              f"may import only {', '.join(ALLOWED_PACKAGES)} and the standard library")
    sources = ", ".join(str(closure.modules[m].path.resolve().relative_to(REPO)) for m in module_order(closure))
    header = (f'"""The {arm} arm\'s model as a transformers model: AutoModelForCausalLM.from_pretrained(folder, '
              f"trust_remote_code=True).\n\nGenerated by models/huggingface.py from the project's own code, at the "
              f"save of this model; do not edit.\nCopied from: {sources}.\n" + '"""')
    tail = (f"# The {arm} arm's attention, every block's ({attention_module}.{attention_name}).\n"
            f"ATTENTION = {attention_name}")
    return "\n\n".join([header, "from __future__ import annotations", *import_lines(closure.external),
                         "\n\n\n".join(definition_blocks(closure)) + "\n", tail]) + "\n"


def definition_blocks(closure: Closure) -> list[str]:
    """Per module, in dependency order: a comment naming its file, then its definitions the model uses, verbatim.
    A definition two modules share word for word (NORM_EPS = 1e-6) is copied once; a name two modules define
    differently (or that an import binds too) would make one shadow the other: GenerationError."""
    blocks: list[str] = []
    defined_by: dict[str, str] = {}  # name -> the source that defines it
    imported = {i.alias for i in closure.external}
    for module_name in module_order(closure):
        module = closure.modules[module_name]
        parts: list[ast.stmt] = []
        texts: list[str] = []
        for line, statement in sorted(closure.statements[module_name].items()):
            source, names = module.source_of(statement), defined_names(statement)
            earlier = {defined_by[n] for n in names if n in defined_by}
            if earlier == {source}:
                continue
            if earlier or set(names) & imported:
                raise GenerationError(f"{module.path.name}:{line} defines {', '.join(names)} differently from another "
                                      "module the model uses; rename one of them")
            defined_by.update(dict.fromkeys(names, source))
            parts.append(statement)
            texts.append(source)
        relative = module.path.resolve().relative_to(REPO)
        blocks.append(f"# ---- {relative} ({len(texts)} of its definitions) ----\n\n" + join_definitions(parts, texts))
    return blocks
