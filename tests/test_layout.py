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
    "version": 0, "config": 0, "allocator": 0, "cache": 0,
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


# ====================================================================================== adapter kinds
# Where a kind may be named by its type: its own module files, the config classes, the registry.
KIND_HOMES = ("loramix.modules", "loramix.config")
# Kind branches left in files others own, with the reason; the test fails on any other and on a stale entry.
KIND_BRANCHES_LEFT: dict[str, str] = {}


def kind_names() -> tuple[set[str], set[str]]:
    """(class names of every registered kind: its config class and its adapter modules; the kinds' names)."""
    from loramix.modules import AdapterModule, registered_kinds

    classes, stack = set(), [AdapterModule]
    while stack:
        cls = stack.pop()
        classes.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    classes.discard("AdapterModule")  # "is an adapter module" asks no kind
    kinds = registered_kinds()
    return classes | {k.config_class.__name__ for k in kinds}, {k.name for k in kinds}


def _names_in(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))}


def kind_branches(source: str, classes: set[str], kinds: set[str]) -> list[int]:
    """Lines that test an adapter's kind: ``isinstance(x, <kind class>)``, a table keyed by a kind class, or a
    comparison of a ``kind`` with a kind's name (``meta.get("kind") == "more"``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2 and _names_in(node.args[1]) & classes):
            lines.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(k is not None and _names_in(k) & classes for k in node.keys):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = {c.value for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant)}
            if named & kinds and any("kind" in _names_in(side) or "kind" in named for side in sides):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_the_kind_walker_sees_branches():
    classes, kinds = {"MoreConfig", "LoraLinear"}, {"more"}
    source = ("if isinstance(config, MoreConfig): pass\nok = isinstance(m, (nn.Linear, modules.LoraLinear))\n"
              "if meta.get('kind') == 'more': pass\nSIZES = {MoreConfig: 1}\nif config.kind in ('more',): pass\n"
              "if kind.per_task: pass\nif isinstance(m, AdapterModule): pass\n")
    assert kind_branches(source, classes, kinds) == [1, 2, 3, 4, 5]


def test_no_kind_branch_outside_the_kinds():
    """Only a kind's own files (modules/), the config classes and the registry name a kind by its type or name:
    everything else asks the kind (``modules/kinds.py``), so a new kind touches its own files only."""
    classes, kinds = kind_names()
    found = {f"{path.relative_to(SRC)}:{line}" for module, path in module_files().items()
             if not module.startswith(KIND_HOMES) for line in kind_branches(path.read_text(), classes, kinds)}
    left = {hit for hit in found if hit.partition(":")[0] in KIND_BRANCHES_LEFT}
    assert not found - left, ("kind branches outside modules/, config/ and the kind registry (ask the kind):\n"
                              + "\n".join(sorted(found - left)))
    stale = set(KIND_BRANCHES_LEFT) - {hit.partition(":")[0] for hit in left}
    assert not stale, f"KIND_BRANCHES_LEFT lists files without a kind branch now: remove {sorted(stale)}"


# ====================================================================================== private names
# Private attributes of other libraries that loramix sets and reads (transformers' PretrainedConfig._name_or_path).
FOREIGN_PRIVATE = {"_name_or_path"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """``from loramix.x import _name`` in ``module`` (another module's private name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        source = ".".join(base + ([node.module] if node.module else []))
        if source.startswith("loramix"):
            found += [f"{module}:{node.lineno} imports {source}.{a.name}" for a in node.names if _is_private(a.name)]
    return found


def owned_private_attributes(tree: ast.AST) -> set[str]:
    """The private attributes a file sets (``x._name = ...``) or defines (``def _name`` in a class)."""
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and _is_private(t.attr):
                    names.add(t.attr)
        if isinstance(node, ast.ClassDef):
            names |= {f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and _is_private(f.name)}
    return names


def reach_ins(source: str, own: set[str], others: set[str]) -> list[tuple[int, str]]:
    """(line, name) where ``source`` reads another loramix file's private attribute on an object not ``self``:
    ``module._base_module``, ``getattr(module, "_original_ffn", None)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
        else:
            continue
        if _is_private(name) and name in others and name not in own and name not in FOREIGN_PRIVATE:
            found.append((node.lineno, name))
    return sorted(found)


def test_the_private_walkers_can_fail():
    assert reach_ins("x = module._base_module[0]\ny = getattr(m, '_original_ffn', None)\nz = self._base_module",
                     set(), {"_base_module", "_original_ffn"}) == [(1, "_base_module"), (2, "_original_ffn")]
    owned = owned_private_attributes(ast.parse("class A:\n    def _f(self): self._x = 1\n"))
    assert owned == {"_f", "_x"}


def test_no_private_import_or_reach_in_across_modules():
    """A module uses another's public surface: no ``from x import _name``, no ``obj._attr`` that another loramix
    file owns (the replaced module is ``AdapterModule.replaced``, not ``_base_module[0]``)."""
    modules = module_files()
    found = [hit for name, path in modules.items() for hit in private_imports(name, path, modules)]
    owned = {name: owned_private_attributes(ast.parse(path.read_text())) for name, path in modules.items()}
    for name, path in modules.items():
        others = set().union(*(names for other, names in owned.items() if other != name))
        found += [f"{name}:{line} reads {attr}" for line, attr in reach_ins(path.read_text(), owned[name], others)]
    assert not found, "private names used across modules (make them public or ask the owner):\n" + "\n".join(found)


# ====================================================================================== torch internals
def torch_private_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) where ``source`` uses a private name of torch (``torch._C._current_graph_task_id``,
    ``from torch._C import x``, ``getattr(torch._C, "_name")``): such names change without notice between
    torch releases, so loramix uses torch's public API only."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                                               and node.func.id in ("getattr", "hasattr") and len(node.args) > 1):
            parts, root = [], node
            if isinstance(node, ast.Call):
                name = node.args[1].value if isinstance(node.args[1], ast.Constant) else ""
                parts, root = [str(name)], node.args[0]
            while isinstance(root, ast.Attribute):
                parts.insert(0, root.attr)
                root = root.value
            dotted = ["torch", *parts]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
            dotted, root = [*node.module.split("."), *(a.name for a in node.names)], None
        elif isinstance(node, ast.Import):
            dotted, root = next((a.name.split(".") for a in node.names if a.name.split(".")[0] == "torch"), []), None
        else:
            continue
        if (root is None or (isinstance(root, ast.Name) and root.id == "torch")) and any(map(_is_private, dotted)):
            found.add((node.lineno, ".".join(dotted[: 1 + next(i for i, p in enumerate(dotted) if _is_private(p))])))
    return sorted(found)


def test_the_torch_private_walker_can_fail():
    source = ("import torch\nok = torch.nn.functional.pad, torch.__version__, x._y, torch.autograd.graph.Node\n"
              "t = torch._C._current_graph_task_id()\nfrom torch._C import _get_tracing_state\n"
              "g = getattr(torch._C, '_current_graph_task_id', None)\nh = getattr(torch, '_C')\nimport torch._dynamo\n"
              "from torch.utils import _pytree\n")
    assert torch_private_uses(source) == [(3, "torch._C"), (4, "torch._C"), (5, "torch._C"), (6, "torch._C"),
                                          (7, "torch._dynamo"), (8, "torch.utils._pytree")]


def test_no_torch_private_in_src():
    """No ``torch._C._...`` or other private torch name anywhere in ``src/loramix`` (``modules/auxiliary.py`` tells a
    checkpoint's recompute from a forward by its own collector, not by the autograd engine's private state)."""
    found = [f"{path.relative_to(SRC)}:{line} uses {name}" for path in sorted(SRC.rglob("*.py"))
             for line, name in torch_private_uses(path.read_text())]
    assert not found, "private torch names (use torch's public API):\n" + "\n".join(found)
