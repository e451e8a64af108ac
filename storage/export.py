"""Export and import of plain records, for moving contexts between clusters or tools.

Owns the export format (``EXPORT_FORMAT``): an age file (to the recipients given) of JSON
lines, one record per line, each the ``get --json`` shape of one version
(``VersionView.to_json``: address, version, version_id, context, parent_version,
created_at, created_by, roles, tags, technologies, influences, influenced_by, expires_at,
read_as, and the decrypted fields) plus ``"export": EXPORT_FORMAT``.
Must not know: the CLI, how ciphertexts are sealed (records are read through
``ContextStore.retrieve``, which audits each read).

Invariants: an export holds only what ``as_role`` (or the least-privileged role held
here) may read; an import writes new versions through ``ContextStore.store_batch``
(signed by this node, readers by this node's defaults for the address's role) and keeps
the original address, version id, creation time and writer under
``metadata["imported_from"]``. Nothing of a bad import file is written: every line is
parsed and validated first.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyrage
from pyrage import x25519

from crypto.errors import DecryptionError
from crypto.keyring import Keyring
from storage.address import ContextName, Temporal, parse
from storage.context_store import ContextStore, WriteRequest
from storage.errors import Forbidden, InvalidPayload, NotFound, StorageError
from storage.record import KNOWN_FIELDS, ContextRecord
from storage.views import StoredRef

EXPORT_FORMAT = "slurp-export/1"
Progress = Callable[[int, int], None]


class ExportUnreadable(StorageError):
    """An import file that does not open or does not parse."""

    code = "UCXL-400-EXPORT_INVALID"


def export_records(
    store: ContextStore,
    pattern: str,
    *,
    history: bool = False,
    as_role: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """The records of the contexts matching ``pattern`` that the role may read.

    Returns:
        (records, skipped): the latest version of each live context (every put version
        with ``history``), and how many versions the role may not read (or tombstones).

    Raises:
        Forbidden: ``as_role`` is not a role of this node, or its identity is not here.
    """
    if as_role is not None and as_role not in store.keyring.role_set:
        raise Forbidden(f"unknown role {as_role!r}", field="role")
    if as_role is not None and not store.keyring.has_identity(as_role):
        raise Forbidden(f"this node does not hold the identity of role {as_role!r}", field="role")
    contexts = store.list_contexts(pattern, include_deleted=history)
    records: list[dict[str, Any]] = []
    skipped = 0
    for done, info in enumerate(contexts, start=1):
        ctx = ContextName.from_canonical(info.context)
        ranks = range(1, info.versions + 1) if history else [info.versions]
        for rank in ranks:
            address = ctx.address(Temporal("version", rank)).canonical()
            try:
                view = store.retrieve(address, as_role=as_role)
            except (Forbidden, NotFound):  # not readable by the role, or a tombstone
                skipped += 1
                continue
            records.append({**view.to_json(), "export": EXPORT_FORMAT})
        if progress is not None:
            progress(done, len(contexts))
    return records, skipped


def seal(records: Sequence[dict[str, Any]], recipients: Sequence[str]) -> bytes:
    """The age file of ``records`` as JSON lines.

    Raises:
        InvalidPayload: no recipient, or one that is not ``age1...``.
    """
    if not recipients:
        raise InvalidPayload("give at least one --recipient age1...", field="recipient")
    targets = []
    for text in recipients:
        try:
            targets.append(x25519.Recipient.from_str(text))
        except pyrage.RecipientError:
            raise InvalidPayload(
                f"{text[:80]!r} is not an age X25519 recipient", field="recipient"
            ) from None
    lines = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)
    return bytes(pyrage.encrypt(lines, targets))


def open_export(
    data: bytes, identities: Sequence[x25519.Identity], keyring: Keyring | None
) -> list[dict[str, Any]]:
    """Decrypt and parse an export file (identities first, then this node's roles).

    Raises:
        ExportUnreadable: it does not open, or a line is not a record.
    """
    plain: bytes | None = None
    if identities:
        try:
            plain = bytes(pyrage.decrypt(data, list(identities)))
        except pyrage.DecryptError:
            plain = None
    if plain is None and keyring is not None and keyring.held_roles():
        try:
            plain = keyring.decrypt_any(data)
        except DecryptionError:
            plain = None
    if plain is None:
        raise ExportUnreadable(
            "the export does not open with the identities given (--identity FILE) or this "
            "node's roles, or it is damaged",
            field="identity",
        )
    records = []
    for number, line in enumerate(plain.decode("utf-8", "replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("export") != EXPORT_FORMAT:
            raise ExportUnreadable(
                f"line {number} is not a {EXPORT_FORMAT} record", field=f"line {number}"
            )
        records.append(record)
    return records


def to_request(record: dict[str, Any], node_id: str, as_role: str | None) -> WriteRequest:
    """A new version of the record's context, keeping where it came from in metadata.

    Raises:
        InvalidPayload: the record's address or fields are not valid here.
    """
    try:
        ctx = parse(str(record["context"])).context()
    except (KeyError, StorageError):
        raise InvalidPayload("an imported record has no valid context", field="context") from None
    fields = {k: v for k, v in record.items() if k in KNOWN_FIELDS and k != "ttl"}
    if record.get("content_encoding") == "base64":
        try:
            fields["content"] = base64.b64decode(str(fields.get("content", "")), validate=True)
        except binascii.Error:
            raise InvalidPayload("content is not base64", field="content") from None
    metadata = dict(fields.get("metadata") or {})
    metadata["imported_from"] = {
        "address": record.get("address"),
        "version_id": record.get("version_id"),
        "created_at": record.get("created_at"),
        "created_by": record.get("created_by"),
    }
    fields["metadata"] = metadata
    address = ctx.address().canonical()
    role = as_role or ctx.role
    actor = f"{ctx.agent}/{role}@{node_id}"
    return WriteRequest(address, ContextRecord.from_fields(fields), None, actor)


def import_records(
    store: ContextStore,
    records: Sequence[dict[str, Any]],
    *,
    as_role: str | None = None,
    progress: Progress | None = None,
) -> list[StoredRef]:
    """Write ``records`` as new versions (all validated before the first write).

    Raises:
        Forbidden: ``as_role`` is not a role of this node.
        InvalidPayload: a record is not valid here (nothing is written).
    """
    if as_role is not None and as_role not in store.keyring.role_set:
        raise Forbidden(f"unknown role {as_role!r}", field="role")
    requests = []
    for number, record in enumerate(records, start=1):
        try:
            requests.append(to_request(record, store.keyring.node_id, as_role))
        except InvalidPayload as exc:
            raise InvalidPayload(f"record {number}: {exc.message}", field=exc.field) from None
    refs = store.store_batch(requests)  # one synced batch: all or none
    if progress is not None:
        progress(len(refs), len(requests))
    return refs


def read_file(path: Path) -> bytes:
    """The bytes of an export file.

    Raises:
        ExportUnreadable: it cannot be read.
    """
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ExportUnreadable(f"{path}: {exc.strerror}", field="file") from None
