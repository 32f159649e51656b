"""The house rules of docs/architecture.md, checked: module-level imports form no circle, and a
family is named only by its own module, its adapter and the registries."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loop_lens"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import outside function bodies (inside `if TYPE_CHECKING:` too)."""
    found: list[tuple[str, list[str]]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for module, names in _module_level_imports(ast.parse(path.read_text())):
            if not module.startswith("loop_lens"):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in files] or [module]
            for target in targets:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def test_module_level_imports_form_no_circle():
    graph = _import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert graph["loop_lens.cache"].isdisjoint({"loop_lens.model.looped"}), "the cache holds a run layout, not the model"


# family -> (words that name it, files besides its module and adapter allowed to: registration)
REGISTRIES = {"loop_lens/families/__init__.py", "loop_lens/adapters/__init__.py"}
FAMILIES = {
    "hrm": (r"\bhrm|l_cycles|low_blocks|low_view|low_cycle|LowStack",
            {"loop_lens/families/hrm.py", "loop_lens/adapters/hrm_text.py",
             "loop_lens/analysis/hierarchical.py",  # HRM's own analysis module
             "loop_lens/config.py",  # the `l_cycles` field of the saved loop_config.json
             "loop_lens/zoo/train.py"}),  # the khop-hrm zoo recipe
    "dory": (r"\bdory", {"loop_lens/families/dory.py", "loop_lens/adapters/dory.py",
                         "loop_lens/zoo/train.py"}),  # the khop-dory zoo recipe
    "parcae": (r"\bparcae", {"loop_lens/families/parcae.py", "loop_lens/adapters/parcae.py"}),
    "inkling2": (r"\binkling", {"loop_lens/families/inkling2.py", "loop_lens/adapters/inkling2.py"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_is_named_only_by_its_module_and_adapter(family):
    pattern, allowed = FAMILIES[family]
    named = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if rel in allowed or rel in REGISTRIES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(pattern, line, flags=re.IGNORECASE):
                named.append(f"{rel}:{number}: {line.strip()}")
    assert not named, f"{family} is named outside its module and adapter:\n" + "\n".join(named)
