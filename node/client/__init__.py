"""The client SDK: store, read, search and delete contexts on a slurp cluster over RPC.

The one module applications (and the ``slurp`` CLI) import. It owns the blocking
``Client`` (an ``AsyncClient`` in a trio loop on a thread of its own) and re-exports the
rest: ``ClientConfig`` and client profiles from ``node.client.config``; ``open_client``,
``AsyncClient`` and the error mapping from ``node.client.aio``. Results are
``storage.views`` types; errors are ``storage.errors`` classes chosen by the node's UCXL
code, so SDK users catch the same exceptions as users of the embedded ``ContextStore``.
Must not know: how a node stores, replicates or authorises (``node/cluster/service.py``).

Async (trio)::

    from node.client import load_profile, open_client

    async def main() -> None:
        async with open_client(load_profile(Path("client.toml"))) as client:
            ref = await client.put("ucxl://claude:backend_developer@chorus:auth/*^/jwt.py",
                                   {"summary": "JWT signing moves to Ed25519"})
            view = await client.get(ref.address)       # a VersionView
            hits = await client.search("Ed25519", project="chorus")

Blocking::

    from node.client import Client

    with Client.connect(["10.0.0.1:7000", "10.0.0.2:7000"],
                        cert="alice.crt", key="alice.key", ca="ca.crt") as client:
        print(client.get("ucxl://any:any@chorus:auth/*^/jwt.py").summary)

Failover and retries. The invariant: a write is never reported done when it may not have
been applied, and a write is never sent twice behind the caller's back.

- The client holds one connection, to the first seed (in order) that accepts it.
- Connecting is always safe to repeat: a seed that cannot be reached (``PeerUnavailable``:
  refused, unreachable, TLS refused, too slow) is skipped for the next, reads and writes alike.
- Reads (``get``, ``get_batch``, ``history``, ``ls``, ``search``, ``status``) whose
  connection fails during the call (lost, or no answer in ``timeout_s``) are retried once on
  each remaining seed, starting with the next one. A connection opened before the call (it
  may have died in between) does not use up its seed: that seed gets a fresh try, last.
- Writes (``put``, ``put_batch``, ``delete``, ``purge``) are not retried once the request was
  handed to a connection: a failure then raises ``Unavailable`` saying the write may or may
  not have taken effect (``history`` tells). The next call reconnects.
- An error answer from a node is never retried: it raises the ``storage.errors`` class of
  its code (``StorageError`` with that ``code`` for codes this version does not know); no
  seed reachable raises ``Unavailable``.
- Arguments are checked before anything is sent: a malformed address or record raises
  ``InvalidAddress`` / ``InvalidPayload`` and never leaves the process.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from node.client.aio import (
    READ_METHODS,
    AsyncClient,
    Connector,
    PutItem,
    open_client,
    storage_error,
    tls_connector,
)
from node.client.config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    ClientConfig,
    Seed,
    client_tls,
    load_profile,
    parse_seed,
)
from node.rpc.api import DEFAULT_TIMEOUT_S
from storage.errors import StorageError
from storage.views import ContextInfo, HistoryEntry, SearchResult, StoredRef, VersionView

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "READ_METHODS",
    "AsyncClient",
    "Client",
    "ClientConfig",
    "Connector",
    "PutItem",
    "Seed",
    "client_tls",
    "load_profile",
    "open_client",
    "parse_seed",
    "storage_error",
    "tls_connector",
]

T = TypeVar("T")


class Client:
    """A blocking client: an ``AsyncClient`` in a trio loop on a thread of its own.

    Methods are those of ``AsyncClient`` and block the calling thread; any thread may call
    them. ``close()`` (or leaving the ``with`` block) cancels the loop and joins the thread.
    """

    def __init__(self, config: ClientConfig) -> None:
        """Start the loop thread and connect.

        Raises:
            Unavailable: No seed accepted a connection (the thread is gone again).
        """
        self.config = config
        started: Future[tuple[trio.lowlevel.TrioToken, AsyncClient, trio.CancelScope]] = Future()
        self._thread = threading.Thread(
            target=trio.run, args=(self._loop, started), name="slurp-client", daemon=True
        )
        self._closed = False
        self._thread.start()
        try:
            self._token, self._client, self._scope = started.result()
        except BaseException:
            self._closed = True
            self._thread.join()
            raise

    @classmethod
    def connect(
        cls,
        seeds: Sequence[str | Seed],
        cert: str | Path,
        key: str | Path,
        ca: str | Path,
        *,
        crl: str | Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> Client:
        """A client of ``seeds`` (``"host:port"`` or tuples) with these TLS files.

        Raises:
            InvalidPayload: A bad seed or a missing file. Unavailable: no seed accepted.
        """
        tls = client_tls(Path(ca), Path(cert), Path(key), None if crl is None else Path(crl))
        return cls(
            ClientConfig(
                seeds=tuple(parse_seed(s) if isinstance(s, str) else s for s in seeds),
                tls=tls,
                timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s,
            )
        )

    @classmethod
    def from_profile(cls, path: str | Path) -> Client:
        """A client configured by the profile at ``path`` (see ``load_profile``)."""
        return cls(load_profile(Path(path)))

    async def _loop(
        self, started: Future[tuple[trio.lowlevel.TrioToken, AsyncClient, trio.CancelScope]]
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                async with open_client(self.config) as client:
                    started.set_result((trio.lowlevel.current_trio_token(), client, scope))
                    await trio.sleep_forever()
        except BaseException as exc:
            if started.done():
                raise
            started.set_exception(exc)

    def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise trio.ClosedResourceError("this client is closed")
        return trio.from_thread.run(call, trio_token=self._token)

    def close(self) -> None:
        """Close the connection, stop the loop and join its thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(
        self,
        address: str,
        fields: Mapping[str, Any],
        *,
        readers: Sequence[str] | None = None,
        w: int | None = None,
    ) -> StoredRef:
        """See ``AsyncClient.put``."""
        return self._run(partial(self._client.put, address, fields, readers=readers, w=w))

    def put_batch(
        self, items: Iterable[PutItem | tuple[str, Mapping[str, Any]]], *, w: int | None = None
    ) -> list[StoredRef]:
        """See ``AsyncClient.put_batch``."""
        return self._run(partial(self._client.put_batch, list(items), w=w))

    def get(self, address: str, *, as_role: str | None = None, r: int | None = None) -> VersionView:
        """See ``AsyncClient.get``."""
        return self._run(partial(self._client.get, address, as_role=as_role, r=r))

    def get_batch(
        self, addresses: Sequence[str], *, as_role: str | None = None, r: int | None = None
    ) -> list[VersionView | StorageError]:
        """See ``AsyncClient.get_batch``."""
        return self._run(partial(self._client.get_batch, addresses, as_role=as_role, r=r))

    def history(self, address: str, *, r: int | None = None) -> list[HistoryEntry]:
        """See ``AsyncClient.history``."""
        return self._run(partial(self._client.history, address, r=r))

    def ls(self, pattern: str, *, deleted: bool = False) -> list[ContextInfo]:
        """See ``AsyncClient.ls``."""
        return self._run(partial(self._client.ls, pattern, deleted=deleted))

    def search(
        self,
        query: str,
        *,
        project: str | None = None,
        task: str | None = None,
        tags: Sequence[str] = (),
        limit: int = 20,
        as_role: str | None = None,
    ) -> list[SearchResult]:
        """See ``AsyncClient.search``."""
        search = partial(
            self._client.search, query, project=project, task=task, tags=tags, limit=limit,
            as_role=as_role,
        )  # fmt: skip
        return self._run(search)

    def delete(self, address: str, *, w: int | None = None) -> StoredRef:
        """See ``AsyncClient.delete``."""
        return self._run(partial(self._client.delete, address, w=w))

    def purge(self, address: str) -> int:
        """See ``AsyncClient.purge``."""
        return self._run(partial(self._client.purge, address))

    def rotate_role(self, role: str) -> dict[str, Any]:
        """See ``AsyncClient.rotate_role``."""
        return self._run(partial(self._client.rotate_role, role))

    def backup_create(
        self,
        recipients: list[str] | None = None,
        *,
        with_keys: bool = False,
        since: str | None = None,
        since_cluster: str | None = None,
    ) -> dict[str, Any]:
        """See ``AsyncClient.backup_create``."""
        return self._run(partial(self._client.backup_create, recipients, with_keys=with_keys,
                                 since=since, since_cluster=since_cluster))  # fmt: skip

    def backup_read(self, name: str, offset: int, node: str | None = None) -> tuple[bytes, bool]:
        """See ``AsyncClient.backup_read``."""
        return self._run(partial(self._client.backup_read, name, offset, node))

    def restore_upload(self, data: bytes, offset: int, upload_id: str | None) -> str:
        """See ``AsyncClient.restore_upload``."""
        return self._run(partial(self._client.restore_upload, data, offset, upload_id))

    def restore_apply(self, uploads: list[str], cursor: int) -> dict[str, Any]:
        """See ``AsyncClient.restore_apply``."""
        return self._run(partial(self._client.restore_apply, uploads, cursor))

    def status(self) -> dict[str, Any]:
        """See ``AsyncClient.status``."""
        return self._run(self._client.status)

    def member_add(
        self, name: str, node_id: str, recipient: str, signing_key: bytes, rpc_host: str,
        rpc_port: int,
    ) -> dict[str, Any]:  # fmt: skip
        """See ``AsyncClient.member_add``."""
        add = partial(self._client.member_add, name, node_id, recipient, signing_key,
                      rpc_host, rpc_port)  # fmt: skip
        return self._run(add)

    def member_remove(self, name: str) -> dict[str, Any]:
        """See ``AsyncClient.member_remove``."""
        return self._run(partial(self._client.member_remove, name))

    def member_forget(self, name: str) -> dict[str, Any]:
        """See ``AsyncClient.member_forget``."""
        return self._run(partial(self._client.member_forget, name))
