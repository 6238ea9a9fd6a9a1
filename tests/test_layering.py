"""The import rules of docs/architecture.md ("Layers and imports"), checked on the source tree.

The layers are only real while something fails when one is crossed. This reads every ``import``
in server/ and scripting/ with :mod:`ast` (top level, inside functions, under ``if
TYPE_CHECKING:``: a type-only import is still a dependency a reader and mypy must follow) and
checks four rules:

1. layers run downward: contract <- support <- core <- stores <- (frontends, ops) <- cli/daemon;
   a module imports its own layer or a lower one;
2. a front end imports only the contract (the core's ports are there), support and its own
   package: never the core's classes, another front end, ops, stores, scripting/, cli or daemon;
3. scripting/ imports from server/ only the contract (server/contract/), and in server/ only the
   composition root (cli, daemon) imports scripting/;
4. no import circles among our modules.

An import by name at run time (``importlib.import_module``) is not seen: only the composition
root does that (the daemon loads a front end only when its section is enabled).

``KNOWN_VIOLATIONS`` would list imports that break these rules, each with what removes it; it
is empty, and only shrinks: an entry whose import is gone fails the test too.
Run ``python tests/test_layering.py`` to print every violation, listed or not.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# source directory -> the package it is installed as (pyproject.toml [tool.setuptools] package-dir)
PACKAGE_DIRS: dict[str, str] = {"server": "scriptsftp.server", "scripting": "scriptsftp.scripting"}

SERVER = "scriptsftp.server"
SCRIPTING = "scriptsftp.scripting"

# Each layer of server/ and its rank: a module may import modules of its own rank or lower.
# `scriptsftp.server` itself (the package, its __version__) sits at the bottom with the contract.
LAYER_RANK: dict[str, int] = {
    "contract": 0,
    "support": 1,
    "core": 2,
    "stores": 3,
    "frontends": 4,
    "ops": 4,
    "composition": 5,
}
FRONTEND_MAY_IMPORT = {"contract", "support"}
COMPOSITION_ROOT = {f"{SERVER}.cli", f"{SERVER}.daemon"}

# (importer, imported) -> what removes it. Empty since issue 17 put every front end on the ports:
# every rule holds. Do not add to it to get a change in; fix the import instead.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One import statement's edge between two of our modules, with where it was written."""

    importer: str
    imported: str
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(path: Path, source_dir: Path, package: str) -> str:
    """``server/core/session.py`` -> ``scriptsftp.server.core.session`` (a package's
    ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(source_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def collect_modules(root: Path, package_dirs: dict[str, str]) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for directory, package in package_dirs.items():
        source_dir = root / directory
        for path in sorted(source_dir.rglob("*.py")):
            modules[module_name(path, source_dir, package)] = path
    return modules


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def collect_imports(root: Path, package_dirs: dict[str, str]) -> list[Import]:
    """Every edge importer -> imported between our own modules, from every import statement
    anywhere in a module (``from X import name`` counts as X.name when that is a module)."""
    modules = collect_modules(root, package_dirs)
    edges: list[Import] = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(root))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve_relative(importer, is_package, node.level, node.module)
                        if node.level else (node.module or ""))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                # `import a.b.c` depends on a.b.c; an unknown tail (a name, not a module) falls back
                # to the longest prefix that is one of our modules
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != importer:
                    edges.append(Import(importer, target, rel, node.lineno))
    return sorted(set(edges), key=lambda e: (e.path, e.line, e.imported))


def layer_of(module: str) -> str | None:
    """The layer of a server/ module (None for scripting/ and foreign modules)."""
    if module in COMPOSITION_ROOT:
        return "composition"
    if module == SERVER:
        return "contract"
    if not module.startswith(SERVER + "."):
        return None
    return module.split(".")[2]


def frontend_of(module: str) -> str | None:
    """``scriptsftp.server.frontends.ssh.sftp`` -> ``ssh``; the bare frontends package -> ``""``."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[2] == "frontends":
        return parts[3] if len(parts) > 3 else ""
    return None


def rule_broken(edge: Import) -> str | None:
    """Which rule this import breaks, in words, or None."""
    src, dst = edge.importer, edge.imported
    src_scripting, dst_scripting = src.startswith(SCRIPTING), dst.startswith(SCRIPTING)
    if src_scripting and dst_scripting:
        return None
    if src_scripting:
        if layer_of(dst) == "contract":
            return None
        return "scripting/ imports from server/ only the contract (server/contract/)"
    if dst_scripting:
        if src in COMPOSITION_ROOT:
            return None
        return "in server/ only the composition root (cli, daemon) imports scripting/"
    src_layer, dst_layer = layer_of(src), layer_of(dst)
    if src_layer not in LAYER_RANK or dst_layer not in LAYER_RANK:
        return f"module outside the known layers ({src_layer or src} -> {dst_layer or dst}): place it in docs/architecture.md and here"
    src_front, dst_front = frontend_of(src), frontend_of(dst)
    if src_front is not None:
        if dst_front is not None:
            if dst_front in ("", src_front):
                return None
            return f"front ends never import each other ({src_front} -> {dst_front})"
        if dst_layer not in FRONTEND_MAY_IMPORT:
            return f"a front end imports only the contract (its ports) and support, not {dst_layer}"
    if LAYER_RANK[dst_layer] > LAYER_RANK[src_layer]:
        return f"layers run downward: {src_layer} may not import {dst_layer}"
    if src_layer == "ops" and dst_front is not None:
        return "ops never imports a front end (they are peers; the daemon wires both)"
    return None


def cycles(edges: list[Import]) -> list[list[str]]:
    """The import circles: each strongly connected component of more than one module (Tarjan),
    modules sorted; a module importing itself is no circle."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def violations(edges: list[Import], allowed: dict[tuple[str, str], str]) -> list[str]:
    """Every broken rule, one readable line each (file:line, the import, the rule); imports in
    ``allowed`` are skipped, and left out of the circle search."""
    problems: list[str] = []
    kept = [e for e in edges if (e.importer, e.imported) not in allowed]
    for e in kept:
        rule = rule_broken(e)
        if rule:
            problems.append(f"{e.where()}: {e.importer} imports {e.imported}: {rule}")
    for circle in cycles(kept):
        inside = set(circle)
        links = [f"{e.importer} -> {e.imported} ({e.where()})"
                 for e in kept if e.importer in inside and e.imported in inside]
        problems.append("import circle among " + ", ".join(circle) + ":\n    " + "\n    ".join(links))
    return problems


def stale_entries(edges: list[Import], allowed: dict[tuple[str, str], str]) -> list[str]:
    """Allowed imports that break nothing any more: gone, or now within the rules and in no
    circle (the other end of a circle may have gone)."""
    in_circle: set[tuple[str, str]] = set()
    for circle in cycles(edges):
        inside = set(circle)
        in_circle |= {(e.importer, e.imported) for e in edges if e.importer in inside and e.imported in inside}
    still_bad = {(e.importer, e.imported) for e in edges
                 if rule_broken(e) or (e.importer, e.imported) in in_circle}
    return [f"{a} -> {b}" for (a, b) in allowed if (a, b) not in still_bad]


# --- the real tree --------------------------------------------------------------------------


@functools.cache
def _tree_imports() -> tuple[Import, ...]:
    return tuple(collect_imports(REPO, PACKAGE_DIRS))


def test_the_source_tree_keeps_the_import_rules() -> None:
    problems = violations(list(_tree_imports()), KNOWN_VIOLATIONS)
    assert not problems, "imports that break docs/architecture.md's layering:\n" + "\n".join(problems)


def test_the_known_violations_list_only_shrinks() -> None:
    stale = stale_entries(list(_tree_imports()), KNOWN_VIOLATIONS)
    assert not stale, ("fixed, so take them off KNOWN_VIOLATIONS in tests/test_layering.py:\n"
                       + "\n".join(stale))


def test_every_server_module_has_a_layer() -> None:
    """A new top-level package in server/ must be placed in the layers before it is used."""
    unplaced = [m for m in collect_modules(REPO, PACKAGE_DIRS)
                if m.startswith(SERVER) and layer_of(m) not in LAYER_RANK]
    assert not unplaced, unplaced


def test_rule_citations_resolve() -> None:
    """Code and docs cite the rules as "docs/architecture.md rule N": every N cited is one of the
    document's numbered rules, and nothing cites the old outside file any more."""
    import re

    doc = (REPO / "docs" / "architecture.md").read_text()
    rules_part = doc[doc.index("## The rules of the house"):]
    rules_part = rules_part[:rules_part.index("\n## ", 1)]
    numbered = {int(n) for n in re.findall(r"^(\d+)\. \*\*", rules_part, re.M)}
    assert numbered == set(range(1, 13)), numbered
    citation = re.compile(r"(architecture|DESIGN)\.md,? rules? (\d+(?:(?:,| and| to|-)\s*\d+)*)")
    wrong: list[str] = []
    for top in ("server", "scripting", "tests", "docs", "bench", "tools"):
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix not in (".py", ".md", ".sh", ".toml") or path == Path(__file__).resolve():
                continue
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for m in citation.finditer(line):
                    cited = {int(n) for n in re.findall(r"\d+", m.group(2))}
                    where = f"{path.relative_to(REPO)}:{lineno}"
                    if m.group(1) == "DESIGN":
                        wrong.append(f"{where}: cites DESIGN.md (now docs/architecture.md)")
                    elif not cited <= numbered:
                        wrong.append(f"{where}: cites rule(s) {sorted(cited - numbered)}, not in docs/architecture.md")
    assert not wrong, "\n".join(wrong)


# --- the checker catches what it must (a checker that cannot fail is worthless) --------------


def _plant(root: Path, files: dict[str, str]) -> list[Import]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in ("server", "scripting"):
        (root / directory).mkdir(exist_ok=True)
        for sub in (root / directory).rglob("*"):
            if sub.is_dir() and not (sub / "__init__.py").exists():
                (sub / "__init__.py").write_text("")
        if not (root / directory / "__init__.py").exists():
            (root / directory / "__init__.py").write_text("")
    return collect_imports(root, PACKAGE_DIRS)


def test_a_planted_upward_import_is_caught(tmp_path: Path) -> None:
    edges = _plant(tmp_path, {
        "server/core/session.py": "def f():\n    from scriptsftp.server.ops.defender import Defender\n",
        "server/ops/defender.py": "Defender = object\n",
    })
    problems = violations(edges, {})
    assert problems == [
        "server/core/session.py:2: scriptsftp.server.core.session imports scriptsftp.server.ops.defender:"
        " layers run downward: core may not import ops"
    ]


def test_a_planted_type_only_circle_is_caught(tmp_path: Path) -> None:
    edges = _plant(tmp_path, {
        "server/core/publish.py": "from scriptsftp.server.core import session\n",
        "server/core/session.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from .publish import Publisher\n"),
    })
    problems = violations(edges, {})
    assert len(problems) == 1 and problems[0].startswith(
        "import circle among scriptsftp.server.core.publish, scriptsftp.server.core.session")
    assert "server/core/session.py:3" in problems[0] and "server/core/publish.py:1" in problems[0]
    # the allow-list silences exactly the listed import, and the circle goes with it
    assert violations(edges, {("scriptsftp.server.core.session", "scriptsftp.server.core.publish"): "x"}) == []


def test_planted_cross_front_end_and_scripting_imports_are_caught(tmp_path: Path) -> None:
    edges = _plant(tmp_path, {
        "server/frontends/ftp/server.py": "import scriptsftp.server.frontends.http.util\nimport scriptsftp.server.daemon\n",
        "server/frontends/http/util.py": "",
        "server/daemon.py": "import scriptsftp.scripting.engine\n",
        "server/contract/events.py": "",
        "server/support/config.py": "",
        "scripting/engine.py": "from scriptsftp.server.contract import events\nfrom scriptsftp.server.support.config import X\n",
    })
    problems = violations(edges, {})
    assert problems == [
        "scripting/engine.py:2: scriptsftp.scripting.engine imports scriptsftp.server.support.config:"
        " scripting/ imports from server/ only the contract (server/contract/)",
        "server/frontends/ftp/server.py:1: scriptsftp.server.frontends.ftp.server imports"
        " scriptsftp.server.frontends.http.util: front ends never import each other (ftp -> http)",
        "server/frontends/ftp/server.py:2: scriptsftp.server.frontends.ftp.server imports"
        " scriptsftp.server.daemon: a front end imports only the contract (its ports) and support, not composition",
    ]


def test_a_fixed_violation_left_on_the_list_is_reported(tmp_path: Path) -> None:
    edges = _plant(tmp_path, {
        "server/core/session.py": "",  # no longer imports ops.defender
        "server/core/publish.py": "from scriptsftp.server.core import session\n",  # session no longer imports publish
    })
    listed = {("scriptsftp.server.core.session", "scriptsftp.server.ops.defender"): "x",
              ("scriptsftp.server.core.publish", "scriptsftp.server.core.session"): "x"}
    assert stale_entries(edges, listed) == [
        "scriptsftp.server.core.session -> scriptsftp.server.ops.defender",
        "scriptsftp.server.core.publish -> scriptsftp.server.core.session",
    ]


if __name__ == "__main__":
    all_edges = collect_imports(REPO, PACKAGE_DIRS)
    found = violations(all_edges, {})
    print("\n".join(found) or "no violations")
    print()
    print(f"{len(found)} violations, {len(KNOWN_VIOLATIONS)} on the known list", file=sys.stderr)
