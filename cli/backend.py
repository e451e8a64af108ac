"""Where the data commands of ``slurp`` go: the local data directory, or a running node.

Owns: the ``Backend`` protocol (what ``put``, ``get``, ``history``, ``ls``, ``search``,
``delete``, ``purge`` and ``stats`` need), its two implementations (``EmbeddedBackend``
on a ``ContextStore``, ``RemoteBackend`` on a ``node.client.Client``) and turning the
remote options (``--node``, ``--profile``, ``--ca/--cert/--key``) into a client config.
Must not know: argument parsing, rendering. Invariant: both backends return the same
``storage.views`` types and raise the same ``StorageError`` classes, so every command
prints the same output and exits the same way in both modes.

``node.client`` (and trio with it) is imported only when a remote backend is opened, so
the embedded commands start as fast as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from storage.context_store import ContextStore
from storage.errors import InvalidPayload
from storage.record import ContextRecord
from storage.views import ContextInfo, HistoryEntry, SearchResult, StoredRef, VersionView

if TYPE_CHECKING:
    from node.client import Client, ClientConfig


class Backend(Protocol):
    """What the data commands call; the same errors in both modes."""

    def put(
        self, address: str, fields: Mapping[str, Any], readers: Sequence[str] | None
    ) -> StoredRef:
        """Store a new version."""
        ...

    def get(self, address: str, as_role: str | None) -> VersionView:
        """The version an address selects."""
        ...

    def history(self, address: str) -> list[HistoryEntry]:
        """Every version of a context, oldest first."""
        ...

    def ls(self, pattern: str, deleted: bool) -> list[ContextInfo]:
        """Contexts matching a pattern."""
        ...

    def search(
        self,
        query: str,
        project: str | None,
        task: str | None,
        tags: Sequence[str],
        limit: int,
        as_role: str | None,
    ) -> list[SearchResult]:
        """Ranked full-text hits."""
        ...

    def delete(self, address: str) -> StoredRef:
        """Append a tombstone."""
        ...

    def purge(self, address: str) -> int:
        """Destroy every version; how many."""
        ...

    def stats(self) -> dict[str, Any]:
        """The store's counters (embedded) or the node's status (remote)."""
        ...


class EmbeddedBackend:
    """The data directory's ``ContextStore``, opened by this process."""

    def __init__(self, store: ContextStore) -> None:
        """Args: the opened store (the caller closes it)."""
        self.store = store

    def put(
        self, address: str, fields: Mapping[str, Any], readers: Sequence[str] | None
    ) -> StoredRef:
        """See ``ContextStore.store``."""
        return self.store.store(address, ContextRecord.from_fields(fields), readers=readers)

    def get(self, address: str, as_role: str | None) -> VersionView:
        """See ``ContextStore.retrieve``."""
        return self.store.retrieve(address, as_role=as_role)

    def history(self, address: str) -> list[HistoryEntry]:
        """See ``ContextStore.history``."""
        return self.store.history(address)

    def ls(self, pattern: str, deleted: bool) -> list[ContextInfo]:
        """See ``ContextStore.list_contexts``."""
        return self.store.list_contexts(pattern, include_deleted=deleted)

    def search(
        self,
        query: str,
        project: str | None,
        task: str | None,
        tags: Sequence[str],
        limit: int,
        as_role: str | None,
    ) -> list[SearchResult]:
        """See ``ContextStore.search``."""
        return self.store.search(
            query, project=project, task=task, tags=tags, as_role=as_role, limit=limit
        )

    def delete(self, address: str) -> StoredRef:
        """See ``ContextStore.delete``."""
        return self.store.delete(address)

    def purge(self, address: str) -> int:
        """See ``ContextStore.purge``."""
        return self.store.purge(address)

    def stats(self) -> dict[str, Any]:
        """See ``ContextStore.stats``."""
        return self.store.stats()


class RemoteBackend:
    """A running node, through the blocking client SDK."""

    def __init__(self, client: Client) -> None:
        """Args: the connected client (the caller closes it)."""
        self.client = client

    def put(
        self, address: str, fields: Mapping[str, Any], readers: Sequence[str] | None
    ) -> StoredRef:
        """See ``Client.put``."""
        return self.client.put(address, fields, readers=readers)

    def get(self, address: str, as_role: str | None) -> VersionView:
        """See ``Client.get``."""
        return self.client.get(address, as_role=as_role)

    def history(self, address: str) -> list[HistoryEntry]:
        """See ``Client.history``."""
        return self.client.history(address)

    def ls(self, pattern: str, deleted: bool) -> list[ContextInfo]:
        """See ``Client.ls``."""
        return self.client.ls(pattern, deleted=deleted)

    def search(
        self,
        query: str,
        project: str | None,
        task: str | None,
        tags: Sequence[str],
        limit: int,
        as_role: str | None,
    ) -> list[SearchResult]:
        """See ``Client.search``."""
        return self.client.search(
            query, project=project, task=task, tags=tags, limit=limit, as_role=as_role
        )

    def delete(self, address: str) -> StoredRef:
        """See ``Client.delete``."""
        return self.client.delete(address)

    def purge(self, address: str) -> int:
        """See ``Client.purge``."""
        return self.client.purge(address)

    def stats(self) -> dict[str, Any]:
        """The node's ``node.status``."""
        return self.client.status()

    def close(self) -> None:
        """Close the client (its connection and loop thread)."""
        self.client.close()


@dataclass(frozen=True)
class RemoteOptions:
    """The global options that select remote mode, as given."""

    node: str | None = None
    profile: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def given(self) -> bool:
        """Whether any of them was given (then every data command goes to a node)."""
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))


def client_config(options: RemoteOptions) -> ClientConfig:
    """The client config the remote options describe.

    ``--profile`` gives seeds and TLS files; ``--node`` replaces its seeds with that one
    node; ``--ca/--cert/--key`` replace its files. Without a profile, ``--node`` needs all
    three files.

    Raises:
        InvalidPayload: A missing or bad option (``field`` names it: ``node``, ``cert``...)
            or a bad profile (``field`` names its key).
    """
    from node.client import ClientConfig, client_tls, load_profile, parse_seed

    seeds = None if options.node is None else (parse_seed(options.node, field="node"),)
    if options.profile is not None:
        config = load_profile(options.profile)
        tls = config.tls
        if options.ca or options.cert or options.key:
            tls = client_tls(
                options.ca or tls.ca_cert,
                options.cert or tls.cert,
                options.key or tls.key,
                None if options.ca else tls.crl,
                field_prefix="",
            )
        return dataclasses.replace(config, seeds=seeds or config.seeds, tls=tls)
    if seeds is None:
        raise InvalidPayload("--ca, --cert and --key need --node or --profile", field="node")
    for name in ("ca", "cert", "key"):
        if getattr(options, name) is None:
            raise InvalidPayload(f"--node needs --{name} (or a --profile)", field=name)
    assert options.ca is not None
    assert options.cert is not None
    assert options.key is not None
    return ClientConfig(
        seeds=seeds, tls=client_tls(options.ca, options.cert, options.key, field_prefix="")
    )


def connect(options: RemoteOptions) -> RemoteBackend:
    """A remote backend connected as ``options`` say.

    Raises:
        InvalidPayload: Bad options (see ``client_config``). Unavailable: no node answered.
    """
    from node.client import Client

    return RemoteBackend(Client(client_config(options)))
