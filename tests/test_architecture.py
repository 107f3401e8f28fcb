"""Import structure of `src/mistral_lm`: no module imports itself back, directly or through others.

The graph is built from the AST of every module, so imports inside functions (the usual way a
cycle is hidden) and `if TYPE_CHECKING:` imports count as much as top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mistral_lm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the mistral_lm modules it imports (a `from pkg import name` names pkg.name if it is a module)."""
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                    graph[name].update(_packages_run_first(target, name, files))
    return graph


def _packages_run_first(target: str, importer: str, files: dict) -> set[str]:
    """Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first, except packages the importer
    itself lives in (already initializing when it runs)."""
    parts = target.split(".")
    packages = {".".join(parts[:i]) for i in range(1, len(parts))}
    return {p for p in packages if p in files and not (importer == p or importer.startswith(p + "."))}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = _import_graph()
    assert "mistral_lm.errors" in graph["mistral_lm.config"]  # `from .errors import ...`
    assert "mistral_lm.tokenizer" in graph["mistral_lm.auto"]  # inside AutoTokenizer.from_pretrained
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    # importing a.b.c runs the packages a and a.b first, except the importer's own packages
    files = dict.fromkeys(["a", "a.b", "a.b.c", "a.d"])
    assert _packages_run_first("a.b.c", "x", files) == {"a", "a.b"}
    assert _packages_run_first("a.b.c", "a.d", files) == {"a.b"}


def test_no_import_cycles():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_checkpoints_never_import_the_tokenizer():
    def is_tokenizer(module: str) -> bool:
        return module == "mistral_lm.tokenizer" or module.startswith("mistral_lm.tokenizer.")

    offenders = {module: sorted(filter(is_tokenizer, targets)) for module, targets in _import_graph().items()
                 if module.startswith("mistral_lm.checkpoints") and any(map(is_tokenizer, targets))}
    assert not offenders, f"checkpoints/ must not import the tokenizer: {offenders}"
