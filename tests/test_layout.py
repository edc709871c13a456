"""The layout of ``src/loramix`` shows its architecture: read from the source (ast), never imported.

- No import cycle between loramix's modules (imports inside functions count: a lazy import that
  only hides a cycle is still one; ``if TYPE_CHECKING:`` blocks do not, they never run, and neither
  do ``if __name__ == "__main__":`` blocks: they run only as a command, ``python -m`` of that module).
- No import from a higher layer. The layers, lowest first (each imports only its own layer and those
  below it; see design.md, "Layers of the code"):

      0  version, config        settings and the version
      1  modules                pure torch
      2  models, hub            model families, inject, model loading
      3  adapters               adapter files and exports
      4  data, evaluate, train, integrations, bench, serve, report, compare   what runs a model
      5  cli, every */command.py, demo, __main__, the package root      commands

- No module over 600 lines.
- Every ``loramix`` command lives in a module named ``command.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "loramix"
MAX_LINES = 600
LAYERS = {
    "version": 0, "config": 0,
    "modules": 1,
    "models": 2, "hub": 2,
    "adapters": 3,
    "data": 4, "evaluate": 4, "train": 4, "integrations": 4, "bench": 4, "serve": 4, "report": 4, "compare": 4,
    "cli": 5, "demo": 5, "__main__": 5, "__init__": 5,
}
COMMANDS_LAYER = 5


def module_files() -> dict[str, Path]:
    """Dotted module name (``loramix.adapters.io``; a package is its ``__init__``) → file."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("loramix",) + path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str, path: Path) -> int:
    """The layer of a module: ``command.py`` files are commands, the rest go by their first name."""
    if path.stem == "command":
        return COMMANDS_LAYER
    first = module.split(".")[1] if "." in module else "__init__"
    assert first in LAYERS, f"{path}: top-level name '{first}' has no layer in test_layout.LAYERS; give it one"
    return LAYERS[first]


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only) and under
    ``if __name__ == "__main__":`` (a command, layer 5, that never runs when the module is imported)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.unparse(node.test)
                                         or ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The loramix modules that ``module`` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # ``import loramix.x.y as z`` names a module; trim attributes
                name = name.rpartition(".")[0]
            if name.startswith("loramix") and name != module:
                targets.add(name)
    return targets


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walker_sees_lazy_imports_and_cycles():
    """The checks can fail: a function-level import is an edge, and a cycle through it is found."""
    modules = module_files()
    assert "loramix.hub" in imports_of("loramix.adapters.folder", modules["loramix.adapters.folder"], modules)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_no_upward_import(graph):
    files = module_files()
    upward = [f"{a} (layer {layer_of(a, files[a])}) imports {b} (layer {layer_of(b, files[b])})"
              for a, targets in sorted(graph.items()) for b in sorted(targets)
              if layer_of(b, files[b]) > layer_of(a, files[a])]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_module_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_every_command_lives_in_a_command_module():
    from loramix.cli import COMMANDS

    files = module_files()
    for name, (module, _) in COMMANDS.items():
        assert module in files and files[module].name == "command.py", f"loramix {name}: {module} is not a command.py"
