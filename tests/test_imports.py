"""The package's import graph: every module imports on its own in a fresh interpreter, no cycle among the
package's modules at import time, and the BIRD loader does not pull in the demo data."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "text2sql_ray"


def module_names() -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_time_edges(name: str, path: Path, modules: set[str]) -> set[str]:
    """Package modules `name` imports when it is imported: statements at module level (also inside a
    module-level if/try), not the imports inside functions or classes, which run later."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    root = base[: len(base) - node.level + 1]
                    target = ".".join(root + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # `from . import bird`
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "finalbody", []))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_package_modules():
    modules = module_names()
    graph = {name: import_time_edges(name, path, set(modules)) for name, path in modules.items()}
    assert "text2sql_ray.sqlexec" in graph["text2sql_ray.evaluate"]  # the walk sees relative imports
    assert "text2sql_ray.reports" in graph["text2sql_ray.evaluate"]  # and `from . import x`
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_every_module_imports_alone_in_a_fresh_interpreter_and_bird_leaves_the_demo_out():
    names = [n for n in module_names() if n != "text2sql_ray.__main__"]  # importing it runs the CLI
    code = (
        "import importlib, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        "print('DEMO' if 'text2sql_ray.demo' in sys.modules else 'NODEMO')\n"
    )
    procs = {n: subprocess.Popen([sys.executable, "-c", code, n], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for n in names}
    failed, demo_loaded = {}, {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=240)
        if p.returncode != 0:
            failed[n] = err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"
        demo_loaded[n] = out.strip().splitlines()[-1:] == ["DEMO"]
    assert failed == {}
    assert len(names) > 20 and "text2sql_ray.reports" in names and "text2sql_ray.download" in names
    assert not demo_loaded["text2sql_ray.bird"] and not demo_loaded["text2sql_ray.download"]
    assert demo_loaded["text2sql_ray.demo"]
