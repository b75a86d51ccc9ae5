"""The architecture's import rules (docs/ARCHITECTURE.md), checked on the source as it is.

1. import-linter (`lint-imports`, run as a subprocess on .importlinter): the front ends
   import only the facade and the core's types, Qt only under app.gui, crypto imports nothing
   of ours outside crypto, cloud never imports app, app.imaging stands alone.
2. The front-end contract names every module of app/core: each is either one the front ends
   may import (ALLOWED_CORE) or forbidden to them, so a new core module cannot slip past it.
3. The import graph of app, crypto and cloud, built here with ast from every import statement
   (module level, inside functions and under TYPE_CHECKING alike), has no cycle; a failure
   prints each cycle as a chain of modules.
"""

from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT / ".importlinter"
PACKAGES = ("app", "crypto", "cloud")
# The core modules the front ends (app.cli, app.gui) may import: the facade and plain types.
ALLOWED_CORE = {"app.core.client", "app.core.errors", "app.core.progress",
                "app.core.settings", "app.core.meta", "app.core.similarity", "app.core.studies",
                "app.core.keyword_search",
                "app.core.types"}


def _lint_imports() -> Path:
    script = Path(sys.executable).with_name("lint-imports")
    found = script if script.exists() else shutil.which("lint-imports")
    assert found, "lint-imports not found: install the dev extra (pip install -e '.[dev]')"
    return Path(found)


def test_import_linter_contracts_are_kept() -> None:
    result = subprocess.run([str(_lint_imports()), str(CONFIG), "--no-cache"],
                            cwd=PROJECT, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"import-linter contracts broken:\n{report}"
    assert "0 broken" in report, report
    assert "Contracts: 5 kept" in report, report


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path = PROJECT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {_module_name(root, path): path
            for package in packages for path in sorted((root / package).rglob("*.py"))}


def test_front_end_contract_names_every_core_module() -> None:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    section = parser["importlinter:contract:front-ends-use-the-facade"]
    forbidden = set(section["forbidden_modules"].split())
    core = {name for name in _modules() if name.startswith("app.core.")}
    unlisted = sorted(core - forbidden - ALLOWED_CORE)
    assert not unlisted, (
        f"{CONFIG.name}: core module(s) {unlisted} are neither allowed to the front ends "
        f"(ALLOWED_CORE in {Path(__file__).name}) nor in forbidden_modules of "
        "[importlinter:contract:front-ends-use-the-facade]; decide and add them")
    both = sorted(forbidden & ALLOWED_CORE)
    assert not both, f"{CONFIG.name}: {both} both allowed and forbidden"
    stale = sorted(name for name in forbidden
                   if name.startswith("app.core.") and name not in core)
    assert not stale, f"{CONFIG.name}: forbidden_modules names missing modules {stale}"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = PROJECT, packages: tuple[str, ...] = PACKAGES
                 ) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, from every import statement in the file."""
    modules = _modules(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def ours(name: str) -> str | None:
        # the longest prefix that is one of our modules ("app.core.client.Client" -> module)
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                return candidate
        return None

    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node)
                # "from pkg import mod" imports pkg.mod when it is a module, else pkg
                targets = [f"{source}.{alias.name}" for alias in node.names] or [source]
            for target in targets:
                module = ours(target)
                if module is not None and module != name:
                    graph[name].add(module)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each given
    as one cycle through it, first module repeated at the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:  # iterative: no recursion limit on deep graphs
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, set(component)) for component in sorted(components)]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def test_cycle_finder_finds_cycles_closed_inside_functions(tmp_path: Path) -> None:
    """The finder itself, on a small package written here: a cycle closed by an import
    inside a function, one closed by a relative import under TYPE_CHECKING, and an acyclic
    graph (so the test below can fail)."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import pkg.b\n",
        "b.py": "def later():\n    from pkg import a\n    return a\n",
        "c.py": "from pkg.sub.d import thing\n",
        "sub/__init__.py": "",
        "sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import c\n"
                    "thing = 1\n",
        "e.py": "import os\nfrom pkg import a\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.sub.d"] == {"pkg.c"}
    assert graph["pkg.e"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"],
                                  ["pkg.c", "pkg.sub.d", "pkg.c"]]


def test_no_import_cycles_in_app_crypto_cloud() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles)
