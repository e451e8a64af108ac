"""The walk-through that ``scripts/run`` shows: slurp describing its own source modules.

Starts a local 3-node cluster under ``./.slurp-demo`` (wiped first), stores one context per
module of slurp's packages (a few versions each, several roles) through node1 with the
SDK, reads them back through node2, navigates history through node3, searches, prints the
cluster status, then keeps the cluster running until Ctrl-C (``--once`` stops at once).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
import time
from pathlib import Path

from node.client import Client, PutItem
from node.daemon.ops import LocalNode, cluster_down, cluster_up
from storage.context_store import WriteRequest
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
    """Run and show one CLI command against the cluster (through the client profile)."""
    shown = " ".join(f"'{a}'" if any(c in a for c in "*^~ ") else a for a in args)
    print(f"\n$ slurp --profile .slurp-demo/client.toml {shown}", flush=True)
    exe = Path(sys.executable).with_name("slurp")
    subprocess.run([str(exe), "--profile", str(HOME / "client.toml"), *args], check=False)


def client_for(node: LocalNode) -> Client:
    """A blocking SDK client talking to one node only."""
    ca = HOME / "ca"
    return Client.connect(
        [f"127.0.0.1:{node.rpc_port}"], cert=ca / "client.crt", key=ca / "client.key",
        ca=ca / "ca.crt",
    )  # fmt: skip


def walk_through(nodes: list[LocalNode]) -> None:
    """Write via node1, read via node2, history via node3, search, status."""
    jwt = "ucxl://claude:backend_developer@slurp:source/*^/storage/context_store.py"
    with (
        client_for(nodes[0]) as first,
        client_for(nodes[1]) as second,
        client_for(nodes[-1]) as last,
    ):
        total = 0
        for batch in requests():
            items = [PutItem(r.address, record_fields(r.record), r.readers) for r in batch]
            total += len(first.put_batch(items))
        print(f"stored {total} versions describing slurp's own modules, through {nodes[0].name}")
        view = second.get(jwt)
        print(f"\n{nodes[1].name} reads {view.address}: {view.summary} (as {view.read_as})")
        older = last.get(jwt.replace("/*^/", "/~~1/"))
        reason = older.fields["change_reason"]
        print(f"{nodes[-1].name} reads one version back, {older.address}: {reason}")
        print(f"\nhistory through {nodes[-1].name}:")
        for entry in last.history(jwt):
            parent = entry.parent or "-"
            print(f"  v{entry.version} {entry.version_id} {entry.kind} parent {parent}")
        time.sleep(1.5)  # the index refresh bound (1 s)
        print(f"\nsearch 'LevelDB' through {nodes[1].name}:")
        for hit in second.search("LevelDB", project="slurp", limit=5):
            print(f"  {hit.score:6.3f}  {hit.address}")
        status = second.status()
        print(f"\n{status['name']} sees: " + ", ".join(
            f"{m['name']} {'up' if m['up'] else 'down'}" for m in status["members"]
        ) + f"; ring ownership {status['ring']['ownership']}")  # fmt: skip
    slurp("get", jwt.replace("/*^/", "/*~1/"), "--as", "senior_software_architect")
    slurp("ls", "ucxl://any:any@slurp:source/*^/crypto")


def record_fields(record: ContextRecord) -> dict[str, object]:
    """The fields of a record as the SDK sends them."""
    fields: dict[str, object] = dict(record.secret_fields())
    fields["tags"] = list(record.tags)
    fields["technologies"] = list(record.technologies)
    return {k: v for k, v in fields.items() if v not in (None, "", [], {})}


def main() -> None:
    """Start a local 3-node cluster, walk through it, keep it up until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="stop after the walk-through")
    args = parser.parse_args()
    if (HOME / "cluster.json").exists():
        cluster_down(HOME)
    if HOME.exists():
        shutil.rmtree(HOME)
    print("starting a local 3-node cluster in .slurp-demo ...", flush=True)
    nodes = cluster_up(HOME, 3)
    try:
        walk_through(nodes)
        slurp("status")
        print("\n$ slurp cluster status --dir .slurp-demo", flush=True)
        subprocess.run([str(Path(sys.executable).with_name("slurp")), "cluster", "status",
                        "--dir", str(HOME)], check=False)  # fmt: skip
        if not args.once:
            print("\nthe cluster keeps running; Ctrl-C stops it", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stopped = cluster_down(HOME)
        print(f"\nstopped {', '.join(stopped)}")


if __name__ == "__main__":
    main()
