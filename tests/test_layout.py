"""The layout shows the layers: only the public experiment's four files at the top level, every other module in a
folder named for its layer, no import circle, and no layer importing one above it (imports inside functions
count too: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PUBLIC_FILES = {"exp6_trainer.py", "exp6_baseline_attention_model.py", "exp6_flash_attention_model.py",
                "deepseek_modeling.py"}
# lowest first; a module may import its own layer and those below it, never one above
LAYERS: tuple[tuple[str, ...], ...] = (
    ("common",),  # errors, atomic files, bounded JSON, device facts, report helpers
    ("config",),  # the one config dataclass, its flags and files, value checks
    ("data", "models"),  # text and tokens; the shared LM and what an attention module is
    ("deepseek_modeling", "exp6_baseline_attention_model", "exp6_flash_attention_model"),  # the attentions
    ("arms",),  # the registry: one file per arm
    ("inference",),  # generation and decoding from saved models
    ("training",),  # the experiment, its trainer, results, benchmark
    ("exp6_trainer", "scripts"),  # the command line and the GPU check
)
LAYER_OF = {top: level for level, tops in enumerate(LAYERS) for top in tops}


def project_modules() -> dict[str, Path]:
    """Every module of the product (tests aside), by dotted name."""
    modules = {}
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO)
        if relative.parts[0] in ("tests", ".venv", "venv") or relative.parts[0].startswith("."):
            continue
        name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_top_level_holds_only_the_public_experiments_files():
    assert {path.name for path in REPO.glob("*.py")} == PUBLIC_FILES
    folders = {path.parent.relative_to(REPO).parts[0] for path in project_modules().values() if path.parent != REPO}
    assert folders <= set(LAYER_OF), f"a folder with no layer: {folders - set(LAYER_OF)}"


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_walk_sees_a_circle_and_a_lazy_import():
    """The checks above can fail: a made-up circle is found, and an import inside a function is an import."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "arms.registry" in graph["training.experiment"]
    assert "training.experiment" in graph["training.command"]  # imported inside run(), after argparse


def test_no_layer_imports_a_layer_above_it():
    upward = [f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
              if LAYER_OF[target.split(".")[0]] > LAYER_OF[module.split(".")[0]]]
    assert upward == []


MAX_FUNCTION_LINES = 80
CONTROL_FLOW = (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.Match, ast.AsyncFor, ast.AsyncWith)


def long_functions_and_closures(path: Path, root: Path = REPO) -> list[str]:
    """Functions longer than MAX_FUNCTION_LINES, and functions nested in a function that hold control flow (an
    if, a loop, a try, a with): such logic belongs in a named function or method of its own."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        where = f"{path.relative_to(root)}:{node.lineno} {node.name}"
        if node.end_lineno is not None and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            problems.append(f"{where} is {node.end_lineno - node.lineno + 1} lines")
        for inner in ast.walk(node):
            if inner is not node and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(isinstance(statement, CONTROL_FLOW) for statement in ast.walk(inner)):
                    problems.append(f"{where} holds control flow in its nested function {inner.name}")
    return problems


def test_no_long_function_and_no_control_flow_in_closures():
    problems = [problem for path in project_modules().values() for problem in long_functions_and_closures(path)]
    assert problems == []


def test_the_function_check_sees_a_long_function_and_a_closure(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("def outer():\n    def inner(x):\n        if x:\n            return 1\n    return inner\n"
                      + "def long():\n" + "    pass\n" * MAX_FUNCTION_LINES)
    assert long_functions_and_closures(source, tmp_path) == [
        "sample.py:1 outer holds control flow in its nested function inner", f"sample.py:6 long is {MAX_FUNCTION_LINES + 1} lines"]
