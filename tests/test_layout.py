"""The layout rules of ARCHITECTURE.md §1: import direction and where packages come from."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "storage", "crypto", "cli")

CLI_NODE_MODULES = ("node.client", "node.daemon.ops")
# package -> the first-party packages it may import
ALLOWED: dict[str, set[str]] = {
    "crypto": set(),
    "storage": {"crypto"},
    "node": {"storage", "crypto"},
    "cli": {"node", "storage", "crypto"},
}


def _first_party_imports(path: Path) -> set[tuple[str, str]]:
    """(top-level package, dotted module) for each first-party import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                found.add((top, name))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package: str) -> None:
    """No module imports a first-party package that ARCHITECTURE.md §1 forbids it."""
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for top, name in _first_party_imports(path):
            if top == package:
                continue
            # cli may use node only through the client SDK and the operator entry points
            # (node.daemon.ops: run a node, a local cluster); proposed for ARCHITECTURE.md §1
            cli_reaches_into_node = top == "node" and not name.startswith(CLI_NODE_MODULES)
            if top not in ALLOWED[package] or (package == "cli" and cli_reaches_into_node):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_come_from_this_repository(package: str) -> None:
    """The generic top-level names resolve to this checkout, not to something installed."""
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == ROOT / package


def test_scripts_are_not_imported_by_packages() -> None:
    """Nothing in the packages imports scripts/."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert "import scripts" not in path.read_text(encoding="utf-8"), path


def _module_graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (TYPE_CHECKING ones too)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker below is not vacuous: it reports a two-module and a three-module cycle."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "a"}, "f": set()}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_no_import_cycles() -> None:
    """No first-party module reaches itself through imports, TYPE_CHECKING imports included."""
    assert _cycles(_module_graph()) == []


# Pure sans-I/O cores (STYLE.md): add a module here, one line, to hold it to the rule.
PURE_CORES = (
    "node/rpc/wire.py",
    "node/cluster/ring.py",
    "node/cluster/replication.py",
    "node/cluster/coordinator.py",
    "node/cluster/answers.py",
    "node/cluster/requests.py",
    "node/cluster/antientropy.py",
    "node/cluster/handoff_plan.py",
    "node/cluster/status.py",
    "node/cluster/layout.py",
    "node/cluster/rebalance_plan.py",
    "node/cluster/inflight_writes.py",
    "node/control/raft_types.py",
    "node/control/cluster_backup_plan.py",
    "node/control/raft_log.py",
    "node/control/raft.py",
    "node/control/metadata.py",
    "node/control/metadata_types.py",
    "node/control/metadata_codec.py",
    "node/control/metadata_fields.py",
    "node/control/duties.py",
    "node/control/custody_plan.py",
    "node/control/membership_plan.py",
    "tests/sim/control_model.py",
    "tests/sim/model.py",
    "node/control/rotation_plan.py",
    "crypto/seal_format.py",
    "node/control/reshare_plan.py",
    "storage/backup.py",
    "storage/backup_manifest.py",
    "storage/backup_plan.py",
    "storage/index_queue.py",
)
IMPURE_MODULES = frozenset({"trio", "time", "random", "os", "socket"})


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("core", PURE_CORES)
def test_pure_cores_import_no_io(core: str) -> None:
    """A pure core imports none of trio, time, random, os, socket (plain or from-import)."""
    assert _top_level_imports(ROOT / core) & IMPURE_MODULES == set()
