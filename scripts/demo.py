"""The walk-through that ``scripts/run`` shows: slurp describing its own source modules.

Creates a node home under ``./.slurp-demo`` (wiped first), stores one context per module of
slurp's packages with a few versions each and several roles, then runs the ``slurp`` CLI
for a get, a history with temporal navigation, a search and stats, printing each command.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from crypto.roles import DEFAULT_ROLES
from storage.context_store import ContextStore, WriteRequest
from storage.record import ContextRecord

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".slurp-demo"
PACKAGES = {  # package -> (agent, role whose default readers apply)
    "storage": ("claude", "backend_developer"),
    "crypto": ("claude", "senior_software_architect"),
    "cli": ("gpt4", "backend_developer"),
    "node": ("gpt4", "backend_developer"),
}
KNOWN_TECH = {"plyvel", "pyrage", "tantivy", "whoosh", "trio", "msgpack", "zstandard",
              "cryptography", "typer", "rich", "cachetools", "shamir_mnemonic"}  # fmt: skip


def describe(path: Path) -> tuple[str, str, list[str], list[str]]:
    """(summary, purpose, public names, technologies) of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    doc = (ast.get_docstring(tree) or f"{path.stem} module").strip()
    summary, _, purpose = doc.partition("\n")
    names = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")
    ]
    tech = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tech.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            tech.add(node.module.split(".")[0])
    return summary, purpose.strip(), names, sorted(tech & KNOWN_TECH)


def requests() -> list[list[WriteRequest]]:
    """Three rounds of writes: a sketch, the documented module, its API listing."""
    rounds: list[list[WriteRequest]] = [[], [], []]
    for package, (agent, role) in PACKAGES.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            address = f"ucxl://{agent}:{role}@slurp:source/*^/{rel}"
            summary, purpose, names, tech = describe(path)
            tags = [package, "module"]
            readers = ("observer", "backend_developer") if package == "cli" else None
            rounds[0].append(WriteRequest(address, ContextRecord.from_fields(
                {"summary": f"sketch: {rel}", "tags": tags, "change_reason": "first sketch"}),
                readers))  # fmt: skip
            rounds[1].append(WriteRequest(address, ContextRecord.from_fields(
                {"summary": summary, "purpose": purpose, "tags": tags, "technologies": tech,
                 "change_reason": "documented"}), readers))  # fmt: skip
            rounds[2].append(WriteRequest(address, ContextRecord.from_fields(
                {"summary": summary, "purpose": purpose, "tags": tags, "technologies": tech,
                 "content": "public API: " + ", ".join(names), "insights": names[:5],
                 "change_reason": "API listed"}), readers))  # fmt: skip
    return rounds


def slurp(*args: str) -> None:
    """Run and show one CLI command."""
    shown = " ".join(f"'{a}'" if any(c in a for c in "*^~ ") else a for a in args)
    print(f"\n$ slurp --data-dir .slurp-demo {shown}", flush=True)
    exe = Path(sys.executable).with_name("slurp")
    subprocess.run([str(exe), "--data-dir", str(HOME), *args], check=False)


def main() -> None:
    """Build the demo node and walk through it."""
    if HOME.exists():
        shutil.rmtree(HOME)
    ContextStore.init(HOME, DEFAULT_ROLES)
    total = 0
    with ContextStore.open(HOME) as store:
        for batch in requests():
            total += len(store.store_batch(batch))
    print(f"stored {total} versions describing slurp's own modules in {HOME}")
    jwt = "ucxl://claude:backend_developer@slurp:source/*^/storage/context_store.py"
    slurp("get", jwt)
    slurp("history", jwt)
    slurp("get", jwt.replace("/*^/", "/~~1/"), "--json")
    slurp("get", jwt.replace("/*^/", "/*~1/"), "--as", "senior_software_architect")
    slurp("get", "ucxl://any:any@slurp:source/*^/crypto/keyring.py", "--as", "observer")
    slurp("search", "LevelDB", "--project", "slurp", "--limit", "5")
    slurp("ls", "ucxl://any:any@slurp:source/*^/crypto")
    slurp("stats")


if __name__ == "__main__":
    main()
