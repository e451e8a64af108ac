"""Helpers of the real-tier cluster tests: certificates, one RPC call, a node's status,
a node's holdings.

A node's holdings are read with ``rep.versions`` under a node certificate (``node1``'s),
straight from its store: no client read, so no read repair is triggered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from crypto.tls import TlsFiles
from node.daemon.ops import LocalNode
from node.errors import NodeError
from node.rpc.transport import open_rpc_client
from storage.address import parse
from storage.errors import StorageError


def tls(root: Path, name: str) -> TlsFiles:
    """The certificate files of ``name`` (a node or ``client``) in cluster directory ``root``."""
    ca = root / "ca"
    return TlsFiles(
        ca_cert=ca / "ca.crt", cert=ca / f"{name}.crt", key=ca / f"{name}.key", crl=ca / "ca.crl"
    )


async def call(
    port: int, files: TlsFiles, method: str, body: dict[str, Any], *, node: str | None = None
) -> dict[str, Any]:
    """One request to the node listening on ``port`` (``node``: the caller's node name)."""
    async with open_rpc_client("127.0.0.1", port, files, node=node, connect_timeout_s=10) as c:
        return await c.call(method, body, timeout_s=20)


async def node_status(root: Path, member: LocalNode) -> dict[str, Any] | None:
    """``member``'s ``node.status`` as the client sees it, or None while it does not answer."""
    try:
        return await call(member.rpc_port, tls(root, "client"), "node.status", {})
    except (NodeError, StorageError, OSError):
        return None


async def versions_held(
    root: Path, member: LocalNode, addresses: list[str]
) -> list[tuple[str, bytes]]:
    """Every (version id, envelope) ``member`` holds locally of the contexts of
    ``addresses``, page by page."""
    out: list[tuple[str, bytes]] = []
    for addr in addresses:
        after: str | None = None
        while True:
            body = {"context": parse(addr).context().canonical(), "after": after}
            answer = await call(
                member.rpc_port, tls(root, "node1"), "rep.versions", body, node="node1"
            )
            page = [(str(vid), bytes(data)) for vid, data in answer["envelopes"]]
            out += page
            if not answer.get("more") or not page:
                break
            after = max(vid for vid, _ in page)
    return out


async def held_by(root: Path, member: LocalNode, addresses: list[str]) -> set[str]:
    """Every version id ``member`` holds locally of the contexts of ``addresses``."""
    return {vid for vid, _ in await versions_held(root, member, addresses)}


async def call_until_ok(
    port: int, root: Path, method: str, body: dict[str, Any], timeout_s: float = 120
) -> dict[str, Any]:
    """``method`` as the test client until it succeeds (a purge waits for the leader's
    admin identity); AssertionError naming the last failure after ``timeout_s``."""
    last: Exception | None = None
    with trio.move_on_after(timeout_s):
        while True:
            try:
                return await call(port, tls(root, "client"), method, body)
            except (NodeError, StorageError) as exc:
                last = exc
                await trio.sleep(1.0)
    raise AssertionError(f"{method} never succeeded: {last}")
