"""A fake slurp node for the client SDK and remote-CLI tests (no real daemon yet).

Serves the client methods of ``node/rpc/api.py`` from one embedded ``ContextStore`` (run
through ``trio.to_thread``), over the TLS ``RpcServer`` or the in-memory network. It
checks that each request body has exactly the keys of the contract, so a client that
drifts from ``node/rpc/api.py`` fails here. Not the real service: no replication, no
authorisation (every caller may do everything), ``w``/``r`` ignored, ``node.status``
made up. Several fakes may share one store: that is a fully replicated cluster.

Faults: ``stop()`` ends the node (its connections close; its port refuses afterwards);
a method in ``crash_on`` stops the node when it arrives, before anything is stored (the
server accepted the request, then closes); one in ``hang_on`` is never answered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any

import trio

from crypto.tls import TlsFiles
from node.errors import RemoteError
from node.rpc.memory_transport import MemoryNetwork
from node.rpc.transport import Peer, RpcServer
from storage.context_store import ContextStore, WriteRequest
from storage.record import ContextRecord
from storage.views import to_wire

REQUEST_KEYS: dict[str, frozenset[str]] = {
    "ctx.put": frozenset({"address", "record", "readers", "w"}),
    "ctx.put_batch": frozenset({"items", "w"}),
    "ctx.get": frozenset({"address", "as_role", "r"}),
    "ctx.get_batch": frozenset({"addresses", "as_role", "r"}),
    "ctx.history": frozenset({"address", "r", "from"}),
    "ctx.ls": frozenset({"pattern", "deleted"}),
    "ctx.search": frozenset({"query", "project", "task", "tags", "limit", "as_role"}),
    "ctx.delete": frozenset({"address", "w"}),
    "ctx.purge": frozenset({"address"}),
    "node.status": frozenset(),
}
ITEM_KEYS = frozenset({"address", "record", "readers"})
BAD_BODY = "UCXL-400-INVALID_PAYLOAD"


class FakeNode:
    """One fake node named ``name`` in front of ``store``; see the module docstring."""

    def __init__(self, store: ContextStore, name: str = "node-a") -> None:
        self.store = store
        self.name = name
        self.calls: list[str] = []  # methods received, in order
        self.crash_on: set[str] = set()
        self.hang_on: set[str] = set()
        self.history_page: int | None = None  # entries per ctx.history answer (None: all)
        self._scope = trio.CancelScope()
        self._actions: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ctx.put": self._put,
            "ctx.put_batch": self._put_batch,
            "ctx.get": self._get,
            "ctx.get_batch": self._get_batch,
            "ctx.history": self._history,
            "ctx.ls": self._ls,
            "ctx.search": self._search,
            "ctx.delete": self._delete,
            "ctx.purge": self._purge,
            "node.status": self._status,
        }

    async def serve_tls(
        self, tls: TlsFiles, port: int = 0, *, task_status: trio.TaskStatus[int]
    ) -> None:
        """Serve on 127.0.0.1:``port`` (0: any; the port is reported) until ``stop``."""
        with self._scope:
            await RpcServer(self.handle, tls, port=port).run(task_status=task_status)

    async def serve_memory(
        self, network: MemoryNetwork, *, task_status: trio.TaskStatus[str]
    ) -> None:
        """Serve as ``name`` on ``network`` until ``stop``."""
        with self._scope:
            await network.server(self.name, self.handle).run(task_status=task_status)

    def stop(self) -> None:
        """Stop serving (from the node's trio thread)."""
        self._scope.cancel()

    async def handle(self, peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """The RPC handler."""
        self.calls.append(method)
        if method in self.crash_on:
            self.stop()
        if method in self.crash_on | self.hang_on:
            await trio.sleep_forever()
        action = self._actions.get(method)
        if action is None:
            raise RemoteError(BAD_BODY, f"unknown method {method}", "method")
        if set(body) != REQUEST_KEYS[method]:
            raise RemoteError(BAD_BODY, f"{method} body has keys {sorted(body)}", "body")
        return await trio.to_thread.run_sync(action, body)

    def _put(self, body: dict[str, Any]) -> dict[str, Any]:
        record = ContextRecord.from_fields(body["record"])
        ref = self.store.store(body["address"], record, readers=body["readers"])
        return {"ref": to_wire(ref)}

    def _put_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        requests = []
        for item in body["items"]:
            if set(item) != ITEM_KEYS:
                raise RemoteError(BAD_BODY, f"item has keys {sorted(item)}", "items")
            readers = None if item["readers"] is None else tuple(item["readers"])
            record = ContextRecord.from_fields(item["record"])
            requests.append(WriteRequest(item["address"], record, readers))
        return {"refs": [to_wire(ref) for ref in self.store.store_batch(requests)]}

    def _get(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"version": to_wire(self.store.retrieve(body["address"], as_role=body["as_role"]))}

    def _get_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        results = self.store.retrieve_batch(body["addresses"], as_role=body["as_role"])
        return {
            "results": [
                {"version": to_wire(r)} if not isinstance(r, Exception) else {"error": r.to_dict()}
                for r in results
            ]
        }

    def _history(self, body: dict[str, Any]) -> dict[str, Any]:
        entries = self.store.history(body["address"])[body.get("from") or 0 :]
        page = entries if self.history_page is None else entries[: self.history_page]
        return {"history": [to_wire(e) for e in page], "more": len(page) < len(entries)}

    def _ls(self, body: dict[str, Any]) -> dict[str, Any]:
        found = self.store.list_contexts(body["pattern"], include_deleted=body["deleted"])
        return {"contexts": [to_wire(info) for info in found]}

    def _search(self, body: dict[str, Any]) -> dict[str, Any]:
        self.store.index.commit()  # searches see every write (a node refreshes periodically)
        hits = self.store.search(
            body["query"],
            project=body["project"],
            task=body["task"],
            tags=body["tags"],
            as_role=body["as_role"],
            limit=body["limit"],
        )
        return {"hits": [to_wire(hit) for hit in hits]}

    def _delete(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"ref": to_wire(self.store.delete(body["address"]))}

    def _purge(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"versions": self.store.purge(body["address"])}

    def _status(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.name,
            "node_id": self.store.keyring.node_id,
            "members": [{"name": self.name, "state": "alive"}],
            "ring": {"vnodes": 1},
            "quorum": {"n": 1, "w": 1, "r": 1},
        }


@contextmanager
def serving_in_thread(node: FakeNode, tls: TlsFiles) -> Iterator[int]:
    """Run ``node.serve_tls`` in a trio loop on a thread of its own; yields the port."""
    started: Future[tuple[int, trio.lowlevel.TrioToken]] = Future()

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(node.serve_tls, tls)
                started.set_result((port, trio.lowlevel.current_trio_token()))
        except BaseException as exc:
            if started.done():
                raise
            started.set_exception(exc)

    thread = threading.Thread(target=partial(trio.run, main), name=f"fake-{node.name}")
    thread.start()
    try:
        port, token = started.result()
    except BaseException:
        thread.join()
        raise
    try:
        yield port
    finally:
        with suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(node.stop, trio_token=token)
        thread.join()
