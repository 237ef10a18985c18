"""The tree's layout rules, checked from the source with `ast` (nothing is imported):

- no import cycle between the parts of the tree: `vlm`'s subpackages and top-level modules (vlm.data, vlm.llm,
  vlm.train, vlm.towers, vlm.model, ...), `evals` and `data_tools`;
- no import cycle between modules;
- `vlm` never imports `evals` or `data_tools`;
- no module of vlm/, evals/ or data_tools/ is over 450 lines.

Imports count wherever they are written (module level or inside a function), except under `if TYPE_CHECKING:`,
which never runs. `from package import name` is an import of `package.name` when that is a module, else of
`package`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("vlm", "evals", "data_tools")
MAX_LINES = 450


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the top packages (a package is its __init__.py)."""
    out: dict[str, Path] = {}
    for top in TOP_PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, skipping `if TYPE_CHECKING:` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def imported_names(module: str, path: Path) -> dict[str, int]:
    """{dotted name: first line importing it} of a module (`from a.b import c` gives "a.b.c"), relative imports
    resolved."""
    is_package = path.name == "__init__.py"
    names: dict[str, int] = {}
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            found = [f"{base}.{alias.name}" for alias in node.names]
        for name in found:
            names[name] = min(names.get(name, node.lineno), node.lineno)
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported dotted name lives in: the longest known module that is a prefix of it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def module_graph() -> dict[str, dict[str, str]]:
    """{module: {imported module: "file:line imports it"}} over the modules of the top packages."""
    modules = module_files()
    graph: dict[str, dict[str, str]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in sorted(imported_names(module, path).items(), key=lambda item: item[1]):
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges.setdefault(target, f"{path.relative_to(ROOT)}:{line} imports {target}")
    return graph


def part_of(module: str) -> str:
    """The unit of the package-level rule: vlm's subpackage or top-level module, else the top package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "vlm" else parts[0]


def part_graph(graph: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The module graph collapsed onto parts: {part: {imported part: "file:line imports module"}}."""
    parts: dict[str, dict[str, str]] = {}
    for module in sorted(graph):
        src = part_of(module)
        out = parts.setdefault(src, {})
        for target, where in graph[module].items():
            dst = part_of(target)
            if dst != src and dst != "vlm":  # `vlm` itself (vlm/__init__.py) holds only the version
                out.setdefault(dst, where)
    return parts


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None; deterministic (nodes visited in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    steps = "\n".join(f"  {a} -> {b}: {graph[a][b]}" for a, b in zip(cycle, cycle[1:]))
    return f"import cycle {' -> '.join(cycle)}:\n{steps}"


# ---------------------------------------------------------------------------------------------- the checker itself
def test_find_cycle_names_the_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {}}) is None
    graph = {"a": {"b": "a.py"}, "b": {"c": "b.py"}, "c": {"b": "c.py"}}
    assert find_cycle(graph) == ["b", "c", "b"]
    assert describe_cycle(["b", "c", "b"], graph) == "import cycle b -> c -> b:\n  b -> c: b.py\n  c -> b: c.py"


def test_imports_are_read_at_every_depth_and_resolved_to_modules(tmp_path: Path) -> None:
    src = tmp_path / "__init__.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "import vlm.video.sampling\n"
        "from . import mvbench\n"
        "from ..llm.template import ChatTemplate\n"
        "if TYPE_CHECKING:\n    from vlm.model import VideoLLM\n"
        "def f():\n    from evals.mcq import run\n"
    )
    names = imported_names("vlm.data", src)
    assert names["evals.mcq.run"] == 8 and set(names) == {"typing.TYPE_CHECKING", "vlm.video.sampling", "vlm.data.mvbench", "vlm.llm.template.ChatTemplate",
                     "evals.mcq.run"}
    modules = module_files()
    assert _resolve("vlm.llm.template.ChatTemplate", modules) == "vlm.llm.template"
    assert _resolve("vlm.data.mvbench", modules) == "vlm.data.mvbench"
    assert _resolve("numpy.random", modules) is None


# ---------------------------------------------------------------------------------------------- the rules
def test_no_import_cycle_between_packages() -> None:
    parts = part_graph(module_graph())
    cycle = find_cycle(parts)
    assert cycle is None, describe_cycle(cycle, parts)


def test_no_import_cycle_between_modules() -> None:
    graph = module_graph()
    cycle = find_cycle(graph)
    assert cycle is None, describe_cycle(cycle, graph)


def test_vlm_imports_neither_evals_nor_data_tools() -> None:
    modules = module_files()
    offenders = sorted(
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in modules.items() if module.split(".")[0] == "vlm"
        for name, line in imported_names(module, path).items() if name.split(".")[0] in ("evals", "data_tools")
    )
    assert not offenders, "vlm must not import evals or data_tools:\n  " + "\n  ".join(offenders)


def test_no_module_is_over_the_line_limit() -> None:
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in module_files().values()}
    offenders = sorted(f"{path.relative_to(ROOT)}: {n} lines" for path, n in sizes.items() if n > MAX_LINES)
    assert not offenders, f"modules over {MAX_LINES} lines (split them along a real seam):\n  " + "\n  ".join(offenders)


@pytest.mark.parametrize("top", TOP_PACKAGES)
def test_every_top_package_has_modules(top: str) -> None:
    assert any(m.split(".")[0] == top for m in module_files()), f"{top}/ holds no module: the checks above saw nothing"
