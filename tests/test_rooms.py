"""The package's structure: no module imports itself through others (imports inside functions count: a
late import only hides a cycle), and the two stages meet only in shared rooms: the cache stage
(pipeline/cache/) never imports the train stage (pipeline/train/), nor the other way round."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports anywhere in its file (`from pipeline.x import y` counts as
    pipeline.x.y where that is a module, else pipeline.x)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found[found.index(found[-1]):]
    return None


def test_no_import_cycles():
    graph = _imports()
    assert len(graph) > 20  # the walk found the package
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_stages_import_only_shared_rooms():
    graph = _imports()
    for stage, other in (("pipeline.cache", "pipeline.train"), ("pipeline.train", "pipeline.cache")):
        for module, imported in graph.items():
            if module.startswith(stage + ".") or module == stage:
                assert not any(m == other or m.startswith(other + ".") for m in imported), (module, imported)


def test_the_checks_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
