"""The arrows of docs/design.md, read from the source (ast, so function-level imports count too):

- no import cycle among the project's modules;
- every package imports only the packages below it (sfa and data import no other package, models only
  sfa, training sfa/models/data, evaluation those and training), and nothing imports train.py or scripts/;
- an import inside a function says why it is lazy (`# lazy: <reason>` on its line, or on a comment line
  just above its block of imports): only optional or heavy dependencies are imported late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sfa", "models", "training", "data", "evaluation")
# What each part may import besides itself. train.py and scripts/ sit on top.
MAY_IMPORT = {
    "sfa": set(),
    "data": set(),
    "models": {"sfa"},
    "training": {"sfa", "models", "data"},
    "evaluation": {"sfa", "models", "data", "training"},
    "scripts": set(PACKAGES),
    "train": set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    files = {module_name(p): p for pkg in (*PACKAGES, "scripts") for p in (REPO / pkg).rglob("*.py")}
    files["train"] = REPO / "train.py"
    return files


def _resolve(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The project modules an import statement names (`from a import b` names a.b when that is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
    found = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    if isinstance(node, ast.ImportFrom) and len(found) > 1:  # `from a import b`: a.b if a module, else a
        found = [n for n in found if n != found[-1]] or found
    return sorted(set(found))


def says_why(lines: list[str], lineno: int) -> bool:
    """A `# lazy:` comment on the import's line, or on the comment line just above its block of imports."""
    for line in reversed(lines[:lineno]):
        text = line.strip()
        if "# lazy:" in text:
            return True
        if text and not text.startswith(("import ", "from ")):  # the block: imports and blank lines
            return False
    return False


def import_graph():
    """{module: {imported project module: (line, in a function, has a lazy comment)}}."""
    files = project_files()
    known = set(files)
    graph: dict[str, dict[str, tuple[int, bool, bool]]] = {}
    unexplained = []
    for module, path in sorted(files.items()):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        edges = graph.setdefault(module, {})
        scopes = [(tree, False)]
        while scopes:
            node, in_function = scopes.pop()
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    explained = says_why(lines, child.lineno)
                    if in_function and not explained:
                        unexplained.append(f"{path.relative_to(REPO)}:{child.lineno}: {lines[child.lineno - 1].strip()}")
                    for target in _resolve(child, module, path.name == "__init__.py", known):
                        edges.setdefault(target, (child.lineno, in_function, explained))
                scopes.append((child, nested))
    return graph, unexplained


def part(module: str) -> str:
    return module.split(".")[0]


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH, UNEXPLAINED = import_graph()


def test_the_graph_sees_module_and_function_level_imports():
    # The reader itself: a module-level and a function-level edge it must find (else every test below is vacuous).
    assert "sfa.topk" in GRAPH["sfa.reference"]
    assert GRAPH["train"]["training.checkpoint"][1] is False
    assert any(in_function for edges in GRAPH.values() for _, in_function, _ in edges.values())


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles (each line one cycle; function-level imports count):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_every_package_imports_only_downward():
    wrong = [
        f"{module} imports {target} (line {line}{', in a function' if in_function else ''})"
        for module, edges in sorted(GRAPH.items())
        for target, (line, in_function, _) in sorted(edges.items())
        if part(target) != part(module) and part(target) not in MAY_IMPORT[part(module)]
    ]
    assert not wrong, "imports against the arrows of docs/design.md:\n" + "\n".join(wrong)


def test_function_level_imports_say_why_they_are_lazy():
    assert not UNEXPLAINED, (
        "function-level imports without a `# lazy: <reason>` comment (import at the top unless the dependency is "
        "optional or heavy):\n" + "\n".join(UNEXPLAINED)
    )


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_the_layer_table_names_real_parts(layer):
    assert layer in {part(m) for m in GRAPH}
