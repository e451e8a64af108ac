"""The trio client of a slurp cluster: ``open_client`` and ``AsyncClient``.

Owns: the request bodies of ``node/rpc/api.py`` (client side), decoding the answers into
``storage.views`` types, mapping error answers to ``storage.errors`` classes, and the
failover and retry policy described in ``node/client/__init__.py`` (read that first; import from
there, which re-exports this module's public names). Connections are held by tasks of the
client's nursery; a connection that fails is retired, and closed once the calls in flight
on it are done.

Must not know: how nodes store, replicate or authorise; threads (``node.client.Client``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from node.client.config import ClientConfig, Seed
from node.errors import FrameTooLarge, PeerUnavailable, RemoteError
from node.rpc.transport import Caller, Peer, open_rpc_client
from storage.address import parse
from storage.errors import (
    AlreadyInitialised,
    CorruptRecord,
    DataDirInUse,
    Forbidden,
    Internal,
    InvalidAddress,
    InvalidPayload,
    KeyringUnusable,
    NotFound,
    StorageError,
    TemporalInvalid,
    TemporalOutOfRange,
    Unavailable,
)
from storage.record import ContextRecord
from storage.views import (
    ContextInfo,
    HistoryEntry,
    SearchResult,
    StoredRef,
    VersionView,
    View,
    from_wire,
)

READ_METHODS = frozenset(
    {
        "ctx.get", "ctx.get_batch", "ctx.history", "ctx.ls", "ctx.search", "node.status",
        "backup.read",
    }
)  # fmt: skip
BACKUP_TIMEOUT_S = 3600.0  # backup.create: the leader reads every range before answering
_ERROR_CLASSES: tuple[type[StorageError], ...] = (
    InvalidAddress, TemporalInvalid, InvalidPayload, Forbidden, NotFound, TemporalOutOfRange,
    DataDirInUse, AlreadyInitialised, KeyringUnusable, Unavailable, CorruptRecord, Internal,
)  # fmt: skip
_BY_CODE: dict[str, type[StorageError]] = {cls.code: cls for cls in _ERROR_CLASSES}

_CODE = re.compile(r"UCXL-[0-9]{3}-[A-Z_]+")
Connector = Callable[[Seed], AbstractAsyncContextManager[Caller]]


# -- answers ------------------------------------------------------------------------------


def storage_error(code: str, message: str, field: str | None = None) -> StorageError:
    """The ``storage.errors`` exception for a UCXL code (``StorageError`` if unknown)."""
    if not _CODE.fullmatch(code):
        return Internal("the node answered an error without a valid code", field=field)
    cls = _BY_CODE.get(code)
    return (
        StorageError(message, field=field, code=code) if cls is None else cls(message, field=field)
    )


def _part(body: dict[str, Any], key: str, method: str) -> Any:
    if key not in body:
        raise Internal(f"{method}: the node's answer lacks {key!r}", field=key)
    return body[key]


def _parts(body: dict[str, Any], key: str, method: str) -> list[Any]:
    value = _part(body, key, method)
    if not isinstance(value, list):
        raise Internal(f"{method}: the node's answer has a malformed {key!r}", field=key)
    return value


def _view(cls: type[View], data: Any, method: str) -> View:
    try:
        return from_wire(cls, data)
    except (ValueError, TypeError):
        raise Internal(f"{method}: the node answered a malformed {cls.__name__}") from None


def _batch_item(item: Any) -> VersionView | StorageError:
    if isinstance(item, dict) and isinstance(item.get("error"), dict):
        error = item["error"]
        code, message, field = error.get("code"), error.get("message"), error.get("field")
        if isinstance(code, str) and isinstance(message, str):
            return storage_error(code, message, field if isinstance(field, str) else None)
    if isinstance(item, dict) and "version" in item:
        return _view(VersionView, item["version"], "ctx.get_batch")
    raise Internal("ctx.get_batch: the node answered a malformed result")


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PutItem:
    """One write of ``put_batch``: a ``*^`` address, record fields, optional reader roles."""

    address: str
    fields: Mapping[str, Any]
    readers: Sequence[str] | None = None


def _record(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` as sent, after the checks the node makes (nothing bad leaves)."""
    ContextRecord.from_fields(fields)
    record = dict(fields)
    try:
        msgpack.packb(record, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        raise InvalidPayload(
            "the record holds a value that cannot be sent", field="record"
        ) from None
    return record


def _put_body(item: PutItem | tuple[str, Mapping[str, Any]]) -> dict[str, Any]:
    address, fields, readers = (
        (item.address, item.fields, item.readers) if isinstance(item, PutItem) else (*item, None)
    )
    parse(address)
    return {
        "address": address,
        "record": _record(fields),
        "readers": None if readers is None else list(readers),
    }


# -- the async client ---------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    """One open connection, held by a task of the client's nursery until ``scope`` ends."""

    index: int
    caller: Caller
    scope: trio.CancelScope
    serial: int
    active: int = 0
    retired: bool = False


class AsyncClient:
    """A trio client of a slurp cluster; see the module docstring. Use ``open_client``."""

    def __init__(self, config: ClientConfig, nursery: trio.Nursery, connect: Connector) -> None:
        """Use ``open_client``."""
        self.config = config
        self._nursery = nursery
        self._connect = connect
        self._lock = trio.Lock()
        self._current: _Connection | None = None
        self._next_index = 0
        self._opened = 0
        self._closed = False

    @property
    def peer(self) -> Peer | None:
        """The node the client is connected to now, or None."""
        return None if self._current is None else self._current.caller.peer

    async def put(
        self,
        address: str,
        fields: Mapping[str, Any],
        *,
        readers: Sequence[str] | None = None,
        w: int | None = None,
    ) -> StoredRef:
        """Store a new version of the context ``address`` (temporal segment ``*^``) names.

        Args:
            address: A concrete address.
            fields: Record fields (``summary``, ``content``, ``tags``...).
            readers: Roles that may read it (default: the node's rule for the address role).
            w: Replicas that must confirm (default: the cluster's).

        Raises:
            InvalidAddress, InvalidPayload, Forbidden, Unavailable (see the module docstring).
        """
        body = await self._call("ctx.put", {**_put_body(PutItem(address, fields, readers)), "w": w})
        return _view(StoredRef, _part(body, "ref", "ctx.put"), "ctx.put")

    async def put_batch(
        self, items: Iterable[PutItem | tuple[str, Mapping[str, Any]]], *, w: int | None = None
    ) -> list[StoredRef]:
        """Store many versions at once, all or none; items are ``PutItem`` or (address, fields)."""
        body = {"items": [_put_body(item) for item in items], "w": w}
        refs = _parts(await self._call("ctx.put_batch", body), "refs", "ctx.put_batch")
        return [_view(StoredRef, ref, "ctx.put_batch") for ref in refs]

    async def get(
        self, address: str, *, as_role: str | None = None, r: int | None = None
    ) -> VersionView:
        """The version ``address`` selects (temporal segments and ``any`` wildcards work).

        Raises:
            NotFound, TemporalOutOfRange, Forbidden, InvalidAddress, Unavailable.
        """
        parse(address)
        body = await self._call("ctx.get", {"address": address, "as_role": as_role, "r": r})
        return _view(VersionView, _part(body, "version", "ctx.get"), "ctx.get")

    async def get_batch(
        self, addresses: Sequence[str], *, as_role: str | None = None, r: int | None = None
    ) -> list[VersionView | StorageError]:
        """Many ``get``s; each slot holds the version or the error for that address."""
        for address in addresses:
            parse(address)
        out: list[VersionView | StorageError] = []
        rest = list(addresses)
        while rest:  # the node answers a prefix that fits its answer budget, then "more"
            request = {"addresses": rest, "as_role": as_role, "r": r}
            answer = await self._call("ctx.get_batch", request)
            results = _parts(answer, "results", "ctx.get_batch")
            if not results or len(results) > len(rest):
                raise Internal("ctx.get_batch: the node answered a malformed result")
            out.extend(_batch_item(item) for item in results)
            rest = rest[len(results) :] if answer.get("more") else []
        return out

    async def history(self, address: str, *, r: int | None = None) -> list[HistoryEntry]:
        """Every version of the context, oldest first (nothing is decrypted)."""
        parse(address)
        out: list[HistoryEntry] = []
        while True:  # the node answers what fits its answer budget, then "more"
            body = await self._call("ctx.history", {"address": address, "r": r, "from": len(out)})
            page = _parts(body, "history", "ctx.history")
            out.extend(_view(HistoryEntry, e, "ctx.history") for e in page)
            if not body.get("more") or not page:
                return out

    async def ls(self, pattern: str, *, deleted: bool = False) -> list[ContextInfo]:
        """Contexts matching ``pattern`` (wildcards; its path matches as a prefix)."""
        parse(pattern)
        body = await self._call("ctx.ls", {"pattern": pattern, "deleted": deleted})
        return [_view(ContextInfo, c, "ctx.ls") for c in _parts(body, "contexts", "ctx.ls")]

    async def search(
        self,
        query: str,
        *,
        project: str | None = None,
        task: str | None = None,
        tags: Sequence[str] = (),
        limit: int = 20,
        as_role: str | None = None,
    ) -> list[SearchResult]:
        """Ranked full-text search over the latest version of every readable context."""
        request = {
            "query": query, "project": project, "task": task, "tags": list(tags),
            "limit": limit, "as_role": as_role,
        }  # fmt: skip
        body = await self._call("ctx.search", request)
        return [_view(SearchResult, h, "ctx.search") for h in _parts(body, "hits", "ctx.search")]

    async def delete(self, address: str, *, w: int | None = None) -> StoredRef:
        """Append a tombstone; the context then reads as not found (its history stays)."""
        parse(address)
        body = await self._call("ctx.delete", {"address": address, "w": w})
        return _view(StoredRef, _part(body, "ref", "ctx.delete"), "ctx.delete")

    async def purge(self, address: str) -> int:
        """Destroy every version of a context (needs ``admin``); how many were removed."""
        parse(address)
        body = await self._call("ctx.purge", {"address": address})
        versions = _part(body, "versions", "ctx.purge")
        if not isinstance(versions, int):
            raise Internal("ctx.purge: the node answered a malformed count", field="versions")
        return versions

    async def rotate_role(self, role: str) -> dict[str, Any]:
        """Start a cluster-wide rotation of ``role``'s key through the leader (needs
        ``admin``): ``{role, duty, started, ...}``; follow it in ``status()["rotation"]``."""
        return await self._call("keys.rotate", {"role": role})

    async def backup_create(
        self, recipients: list[str] | None = None, *, with_keys: bool = False,
        since: str | None = None, since_cluster: str | None = None,
        timeout_s: float = BACKUP_TIMEOUT_S,
    ) -> dict[str, Any]:  # fmt: skip
        """Have the leader take a cluster backup into its ``[backup] dir`` (needs ``admin``):
        ``{name, bytes, sha256, leader, manifest}``; download it with ``backup_read``.
        With ``since`` (an earlier backup's cut, and ``since_cluster`` its cluster id) an
        incremental continuing it. Not retried (it writes a file); it may run for minutes
        (``timeout_s``)."""
        body: dict[str, Any] = {"recipients": list(recipients or []), "with_keys": with_keys}
        if since is not None:
            body |= {"since": since, "since_cluster": since_cluster}
        return await self._call("backup.create", body, timeout_s=timeout_s)

    async def backup_read(
        self, name: str, offset: int, node: str | None = None
    ) -> tuple[bytes, bool]:
        """One page (at most 4 MiB) of backup ``name`` from ``offset`` on ``node``
        (``backup_create``'s ``leader``; None: the current leader): (data, eof)."""
        body = await self._call("backup.read", {"name": name, "offset": offset, "node": node})
        data, eof = body.get("data"), body.get("eof")
        if not isinstance(data, bytes) or not isinstance(eof, bool):
            raise Internal("backup.read: the node answered a malformed page", field="data")
        return data, eof

    async def restore_upload(self, data: bytes, offset: int, upload_id: str | None) -> str:
        """Send one chunk (<= 4 MiB) of a backup file to the leader (needs ``admin``);
        the upload's id (a new one when ``upload_id`` is None and ``offset`` is 0)."""
        body = {"upload_id": upload_id, "offset": offset, "data": data}
        answer = await self._call("restore.upload", body)
        found = _part(answer, "upload_id", "restore.upload")
        if not isinstance(found, str):
            raise Internal("restore.upload: the node answered a malformed id", field="upload_id")
        return found

    async def restore_apply(self, uploads: list[str], cursor: int) -> dict[str, Any]:
        """One step of merging uploaded backups into the cluster (needs ``admin``):
        ``{phase, cursor, done, ...}`` (node/rpc/api.py); call again from ``cursor``."""
        return await self._call("restore.apply", {"uploads": uploads, "cursor": cursor})

    async def status(self) -> dict[str, Any]:
        """The connected node's ``node.status``: name, node_id, members, ring, quorum."""
        return await self._call("node.status", {})

    async def member_add(
        self, name: str, node_id: str, recipient: str, signing_key: bytes, rpc_host: str,
        rpc_port: int,
    ) -> dict[str, Any]:  # fmt: skip
        """Propose a new member (needs ``admin``): it joins as "joining" and a Raft learner.

        Returns:
            {name, node_id, state, ring_epoch} as committed.
        """
        return await self._call("ctl.member_add", {
            "name": name, "node_id": node_id, "recipient": recipient,
            "signing_key": signing_key, "rpc_host": rpc_host, "rpc_port": rpc_port,
        })  # fmt: skip

    async def member_remove(self, name: str) -> dict[str, Any]:
        """Decommission a live member (needs ``admin``): it becomes "leaving" and is removed
        once its ranges have streamed away. Returns {name, node_id, state, ring_epoch}."""
        return await self._call("ctl.member_remove", {"name": name})

    async def member_forget(self, name: str) -> dict[str, Any]:
        """Drop a dead member at once (needs ``admin``; refused while it answers).
        Returns {name, node_id, state, ring_epoch}."""
        return await self._call("ctl.member_forget", {"name": name})

    async def _call(
        self, method: str, body: dict[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """``method`` with failover (module docstring); the answer's body.

        Raises:
            StorageError: The node's error answer, as its class; ``Unavailable`` when no
                seed answered, or a write's connection failed after it was sent.
            trio.ClosedResourceError: The client was closed.
        """
        retry = method in READ_METHODS
        tried: set[int] = set()
        opened_before = self._opened
        failure: str | None = None
        while True:
            conn = await self._connection(tried, failure)
            conn.active += 1
            try:
                budget = self.config.timeout_s if timeout_s is None else timeout_s
                return await conn.caller.call(method, body, timeout_s=budget)
            except RemoteError as exc:
                raise storage_error(exc.code, exc.message, exc.field) from None
            except FrameTooLarge:
                raise InvalidPayload(f"{method}: the request exceeds the frame limit") from None
            except (PeerUnavailable, trio.ClosedResourceError) as exc:
                failure = f"{self._seed_name(conn.index)}: {exc}"
            finally:
                conn.active -= 1
                if conn.retired and conn.active == 0:
                    conn.scope.cancel()
            self._retire(conn)
            if not retry:
                raise Unavailable(
                    f"{method} was sent but {failure}; it may or may not have taken effect "
                    "(writes are not retried)"
                )
            if conn.serial > opened_before:  # a connection this call opened: its seed had its try
                tried.add(conn.index)

    async def _connection(self, tried: set[int], failure: str | None) -> _Connection:
        """The current connection, or a new one to the first untried seed that accepts.

        Seeds that refuse are added to ``tried``.

        Raises:
            Unavailable: Every seed was tried.
            trio.ClosedResourceError: The client was closed.
        """
        async with self._lock:
            if self._closed:
                raise trio.ClosedResourceError("this client is closed")
            current = self._current
            if current is not None and current.index not in tried:
                return current
            if current is not None:
                self._retire(current)
            errors = [failure] if failure else []
            count = len(self.config.seeds)
            for index in [(self._next_index + step) % count for step in range(count)]:
                if index in tried:
                    continue
                try:
                    conn: _Connection = await self._nursery.start(self._hold, index)
                except (PeerUnavailable, RemoteError) as exc:
                    tried.add(index)
                    errors.append(f"{self._seed_name(index)}: {exc}")
                    continue
                self._current, self._next_index = conn, index
                return conn
            raise Unavailable("no node answered: " + "; ".join(errors or ["no seed left"]))

    async def _hold(self, index: int, *, task_status: trio.TaskStatus[_Connection]) -> None:
        """Open a connection to seed ``index``, report it, keep it until its scope ends."""
        with trio.CancelScope() as scope:
            async with self._connect(self.config.seeds[index]) as caller:
                self._opened += 1
                task_status.started(_Connection(index, caller, scope, self._opened))
                await trio.sleep_forever()

    def _retire(self, conn: _Connection) -> None:
        """Stop handing ``conn`` out; close it once its calls in flight are done."""
        if self._current is conn:
            self._current = None
            self._next_index = (conn.index + 1) % len(self.config.seeds)
        conn.retired = True
        if conn.active == 0:
            conn.scope.cancel()

    def _seed_name(self, index: int) -> str:
        host, port = self.config.seeds[index]
        return f"{host}:{port}"


def tls_connector(config: ClientConfig) -> Connector:
    """How ``open_client`` connects by default: mutual TLS with ``config.tls``."""

    def connect(seed: Seed) -> AbstractAsyncContextManager[Caller]:
        host, port = seed
        return open_rpc_client(host, port, config.tls, connect_timeout_s=config.connect_timeout_s)

    return connect


@asynccontextmanager
async def open_client(
    config: ClientConfig, *, connect: Connector | None = None
) -> AsyncIterator[AsyncClient]:
    """A client connected to the first seed that accepts; closed when the block exits.

    Args:
        config: Seeds, TLS files and timeouts.
        connect: How to open a connection to a seed (default ``tls_connector(config)``;
            tests pass the in-memory network's).

    Raises:
        Unavailable: No seed accepted a connection.
    """
    try:
        async with trio.open_nursery() as nursery:
            client = AsyncClient(config, nursery, connect or tls_connector(config))
            try:
                await client._connection(set(), None)
                yield client
            finally:
                client._closed = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # trio wraps the block's own exception in a group; give it back as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
