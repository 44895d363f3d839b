"""The dependency rules of DESIGN.md, read from the source: node -> matcher -> protocol,
devnet -> node; protocol and matcher pure; only node/p2p imports libp2p."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(package: str) -> dict[str, set[str]]:
    """Every module of `package` -> the top-level names it imports (absolute imports)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("protocol", {"node", "matcher", "devnet", "trio", "libp2p", "socket", "sqlite3", "time", "random", "secrets"}),
    ("matcher", {"node", "devnet", "trio", "libp2p", "socket", "sqlite3", "time", "random", "secrets"}),
    ("node", {"devnet"}),
])
def test_pure_packages_import_nothing_they_must_not(package, forbidden):
    offenders = {module: sorted(names & forbidden) for module, names in imports(package).items() if names & forbidden}
    assert offenders == {}


def test_only_node_p2p_imports_libp2p():
    # (tests/test_protocol.py cross-checks our peer ids against libp2p's: a test, not a user.)
    everywhere = {**imports("node"), **imports("devnet"), **imports("bench")}
    users = sorted(m for m, names in everywhere.items() if names & {"libp2p", "multiaddr"})
    assert all(m.startswith("node/p2p/") for m in users), users
