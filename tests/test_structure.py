"""Static checks of the code layout in pipeline/, stages/ and cache/ (``ast`` and
``tokenize`` only: no project module is imported, so a check cannot be hidden by an
import error and the whole file runs in well under a second).

Import graph (``test_no_import_cycles``): a node per project module (``pkg/__init__.py``
is the node ``pkg``). Every ``import`` / ``from ... import`` statement anywhere in a
module counts as an edge, at top level, inside functions and under ``if TYPE_CHECKING``
alike: a function-level import only postpones a cycle to the first call, and keeping the
graph acyclic is the rule, whatever the import happens to be wrapped in. Edges go to the
named module only, never to its parent packages:

- ``import a.b.c`` -> ``a.b.c``;
- ``from a.b import c`` -> ``a.b.c`` when ``c`` is a submodule, else ``a.b`` (``c`` is a
  name defined by ``a/b/__init__.py``); relative imports are resolved first.

Python does run ``a/__init__.py`` and ``a/b/__init__.py`` before ``a.b.c``, but that is
not a cycle hazard: by then ``a`` is already in ``sys.modules`` and a submodule loads
fine while its package's ``__init__`` is still running. So
``stages/models/__init__.py -> stages.models.classifier -> stages.models.registry`` is
no cycle; what is one is a submodule taking a name *from its package*
(``from stages.models import X`` inside ``stages/models/classifier.py`` while the package
``__init__`` imports ``classifier``), the case that fails with "partially initialized
module" depending on which module is imported first.

The other checks: no private name (one leading underscore, not a dunder) imported with
``from x import _y`` (a private name is not part of ``x``'s interface; make it public or
move it); files <= 400 lines and functions (``def`` line to last line, nested functions
and methods each counted) <= 60 lines; no comment or docstring naming an issue number
(``issue 13``, ``issue #13``, ``#13``): comments say why, and issue numbers rot.
"""
from __future__ import annotations

import ast
import io
import itertools
import re
import tokenize
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "cache")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
ISSUE_REF = re.compile(r"\bissues?[\s:#-]*\d+|(?<![\w&#])#\d+\b", re.IGNORECASE)


@dataclass(frozen=True)
class Source:
    path: str  # relative to the repository root, posix
    module: str
    is_package: bool
    text: str
    tree: ast.Module


@lru_cache(maxsize=1)
def sources() -> tuple[Source, ...]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            text = path.read_text(encoding="utf-8")
            out.append(Source(rel.as_posix(), ".".join(parts), is_package, text, ast.parse(text, str(rel))))
    return tuple(out)


def resolve_from(src: Source, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <module> import ...`` in ``src``."""
    if not node.level:
        return node.module or ""
    parts = src.module.split(".") if src.is_package else src.module.split(".")[:-1]
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def import_edges(src: Source, modules: set[str]) -> dict[str, int]:
    """Project modules ``src`` imports (see the module docstring), each with its first line."""
    edges: dict[str, int] = {}
    for node in ast.walk(src.tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(src, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            if target in modules and target != src.module:
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return edges


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
    return sorted(found)


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, allowed: set[str]) -> list[str]:
    """The shortest import chain start -> ... -> start inside ``allowed`` (BFS)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                chain = [v]
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return [*reversed(chain), start]
            if w in allowed and w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def import_cycles() -> list[str]:
    """One readable chain per cycle, enough chains to cover every module on a cycle."""
    srcs = {s.module: s for s in sources()}
    graph = {m: import_edges(s, set(srcs)) for m, s in srcs.items()}
    chains = []
    for component in strongly_connected(graph):
        covered: set[str] = set()
        for start in component:
            if start in covered:
                continue
            cycle = shortest_cycle(graph, start, set(component))
            covered.update(cycle)
            where = ", ".join(f"{srcs[a].path}:{graph[a][b]}" for a, b in itertools.pairwise(cycle))
            chains.append(f"{' -> '.join(cycle)}   [{where}]")
    return chains


def test_no_import_cycles() -> None:
    cycles = import_cycles()
    assert not cycles, (f"{len(cycles)} import cycle(s) between project modules (edge rule in "
                        "tests/test_structure.py's docstring):\n  " + "\n  ".join(cycles))


def test_no_private_names_imported() -> None:
    found = []
    for src in sources():
        for node in ast.walk(src.tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            private = [a.name for a in node.names
                       if a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))]
            if private:
                found.append(f"{src.path}:{node.lineno}: from {resolve_from(src, node)} import {', '.join(private)}")
    assert not found, (f"{len(found)} import(s) of private names from another module; make the name public "
                       "(no leading underscore) or move it where it is used:\n  " + "\n  ".join(found))


def long_functions() -> list[str]:
    found = []

    def walk(node: ast.AST, prefix: str, src: Source) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                n = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and n > MAX_FUNCTION_LINES:
                    found.append(f"{src.path}:{child.lineno} {name}: {n} lines")
                name += "."
            walk(child, name, src)

    for src in sources():
        walk(src.tree, "", src)
    return found


def test_files_at_most_400_lines() -> None:
    files = [f"{s.path}: {n} lines" for s in sources() if (n := len(s.text.splitlines())) > MAX_FILE_LINES]
    assert not files, (f"{len(files)} file(s) over {MAX_FILE_LINES} lines; split the file:\n  "
                       + "\n  ".join(files))


def test_functions_at_most_60_lines() -> None:
    functions = long_functions()
    assert not functions, (f"{len(functions)} function(s) over {MAX_FUNCTION_LINES} lines; split into named "
                           "helpers:\n  " + "\n  ".join(functions))


def issue_references(src: Source) -> list[str]:
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(src.text).readline):
        if tok.type == tokenize.COMMENT and ISSUE_REF.search(tok.string):
            found.append(f"{src.path}:{tok.start[0]}: {tok.string.strip()[:100]}")
    for node in ast.walk(src.tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if doc is None:
            continue
        first = node.body[0].lineno
        for k, line in enumerate(doc.splitlines()):
            if ISSUE_REF.search(line):
                found.append(f"{src.path}:{first + k}: (docstring) {line.strip()[:100]}")
    return found


def test_no_issue_numbers_in_comments_or_docstrings() -> None:
    found = [ref for src in sources() for ref in issue_references(src)]
    assert not found, (f"{len(found)} comment(s)/docstring line(s) name an issue number; say why the code is "
                       "so instead:\n  " + "\n  ".join(found))


def test_the_checks_see_the_project() -> None:
    """Guards the checks above against passing vacuously (wrong root, nothing parsed)."""
    mods = {s.module for s in sources()}
    assert {"pipeline", "stages", "cache", "stages.datasets.manifest"} <= mods
    src = Source("x/a.py", "x.a", False, "", ast.parse("from x import b, name\nimport x.c\nfrom . import d\n"))
    assert import_edges(src, {"x", "x.a", "x.b", "x.c", "x.d"}) == {"x.b": 1, "x": 1, "x.c": 2, "x.d": 3}
    graph: dict[str, dict[str, int]] = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert shortest_cycle(graph, "b", {"a", "b", "c"}) == ["b", "c", "a", "b"]
    assert ISSUE_REF.search("see issue #13") and ISSUE_REF.search("(#13)") and not ISSUE_REF.search("256 channels")
