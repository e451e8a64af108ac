"""Request bodies, parsed into typed values before anything runs.

Owns: the shape checks of every request body of node/rpc/api.py. ``parse_request`` turns
a body into a typed request or raises ``InvalidPayload`` naming the offending field; after
that, a failure inside the service is the node's own bug (``UCXL-500-INTERNAL``), never
the caller's. Records and addresses are validated here too (``ContextRecord.from_fields``,
``storage.address.parse``), so a parsed write is a valid write.

Pure: no I/O, no trio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyrage
from pyrage import x25519

from node.cluster.antientropy import MAX_ITEMS
from node.control.cluster_backup_plan import parse as backup_request
from node.control.raft_types import MalformedRaftData, message_from_wire
from storage.address import Address, ContextName, parse
from storage.errors import AddressError, InvalidPayload
from storage.record import ContextRecord

MAX_BATCH_ITEMS = 1000  # items of a put_batch, addresses of a get_batch
MAX_SEARCH_LIMIT = 1000
MAX_TARGET_CHARS = 64  # a node name in rep.hint
MAX_RAFT_MESSAGES = 256  # messages of one raft.msg
MAX_PROPOSAL_BYTES = 1 << 20  # one control-plane command
MAX_TERM = 2**63 - 1  # a Raft term (fits a signed 64-bit integer, as etcd's uint64 mostly does)
MAX_ROLES = 64  # roles of a forwarded client
MAX_SEALED_IDENTITY_BYTES = 4096  # a role identity age-encrypted to a node (keys.install)
MAX_SEALED_SHARE_BYTES = 4096  # an admin share age-encrypted to a node (admin.reshare)
# client methods a node may forward to the leader in ``admin.forward``
FORWARDABLE_METHODS = frozenset(
    {"ctx.get", "ctx.get_batch", "ctx.history", "ctx.purge", "restore.upload", "restore.apply"}
)
# the operator's membership methods (admin clients; a follower forwards them as ctl.member)
MEMBER_METHODS = frozenset({"ctl.member_add", "ctl.member_remove", "ctl.member_forget"})
# cluster backups (node.control.cluster_backup)
BACKUP_METHODS = frozenset(
    {"backup.create", "backup.create_leader", "backup.read", "backup.read_leader"}
)
MAX_NODE_ID_CHARS = 128
MAX_RESTORE_CHUNK = 4 << 20  # bytes of one restore.upload (a backup file travels in chunks)
MAX_RESTORE_FILES = 1000  # files of one restore.apply (a full backup and its incrementals)
MAX_UPLOAD_ID_CHARS = 64
SIGNING_KEY_BYTES = 32  # a raw Ed25519 public key


@dataclass(frozen=True)
class WriteItem:
    """One write: a concrete address, its validated record, optional reader roles."""

    address: Address
    record: ContextRecord
    readers: tuple[str, ...] | None


@dataclass(frozen=True)
class Parsed:
    """A parsed request: the method and its typed arguments (``args``)."""

    method: str
    args: dict[str, Any]


def _opt_int(body: dict[str, Any], name: str, low: int = 1, high: int = 64) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidPayload(f"{name} must be a whole number from {low} to {high}", field=name)
    return value


def _str(body: dict[str, Any], name: str, *, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidPayload(f"{name} must be a string", field=name)
    return value


def _address(body: dict[str, Any], name: str = "address") -> Address:
    try:
        return parse(_str(body, name))
    except AddressError as exc:
        raise InvalidPayload(f"{name}: {exc.message}", field=name) from None


def _context(body: dict[str, Any], name: str = "context") -> ContextName:
    return _context_name(_str(body, name), name)


def _context_name(value: Any, name: str) -> ContextName:
    if not isinstance(value, str):
        raise InvalidPayload(f"{name} must be context names", field=name)
    try:
        return ContextName.from_canonical(value)
    except (AddressError, ValueError) as exc:
        raise InvalidPayload(f"{name}: not a context name: {exc}", field=name) from None


def _ints(values: list[Any], name: str, size: int = 1) -> list[Any]:
    """Whole numbers (``size`` 1) or lists of ``size`` whole numbers, as tuples."""
    if size == 1 and all(type(value) is int for value in values):
        return values  # the common case, checked at C speed (bool is not exactly int)
    out: list[Any] = []
    for value in values:
        parts = [value] if size == 1 else value
        if (
            not isinstance(parts, list | tuple)
            or len(parts) != size
            or not all(isinstance(part, int) and not isinstance(part, bool) for part in parts)
        ):
            kind = "whole numbers" if size == 1 else f"pairs of {size} whole numbers"
            raise InvalidPayload(f"{name} must be {kind}", field=name)
        out.append(value if size == 1 else tuple(parts))
    return out


def _term(body: dict[str, Any], *, optional: bool = False) -> int | None:
    value = body.get("term")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TERM:
        raise InvalidPayload(f"term must be a whole number from 0 to {MAX_TERM}", field="term")
    return value


def _epoch(body: dict[str, Any]) -> int:
    """A custody epoch: a whole number from 0 to MAX_TERM."""
    value = body.get("epoch")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TERM:
        raise InvalidPayload(f"epoch must be a whole number from 0 to {MAX_TERM}", field="epoch")
    return value


def _name(value: Any, name: str) -> str:
    """A printable ASCII name (a node, client or role name) of at most MAX_TARGET_CHARS."""
    if not (
        isinstance(value, str)
        and 0 < len(value) <= MAX_TARGET_CHARS
        and value.isascii()
        and value.isprintable()
    ):
        raise InvalidPayload(f"{name} must be a printable ASCII name", field=name)
    return value


def _recipient(body: dict[str, Any]) -> str:
    value = _str(body, "recipient")
    try:
        x25519.Recipient.from_str(value)
    except pyrage.RecipientError:
        raise InvalidPayload(
            "recipient must be an age X25519 recipient", field="recipient"
        ) from None
    return str(value)


def _forward(body: dict[str, Any]) -> dict[str, Any]:
    """``admin.forward {method, body, client: {name, roles}}``."""
    method = _str(body, "method")
    if method not in FORWARDABLE_METHODS:
        raise InvalidPayload(
            f"method {method!r} is not forwarded (only {sorted(FORWARDABLE_METHODS)})",
            field="method",
        )
    inner = body.get("body")
    if not isinstance(inner, dict):
        raise InvalidPayload("body must be a map", field="body")
    client = body.get("client")
    if not isinstance(client, dict):
        raise InvalidPayload("client must be a map {name, roles}", field="client")
    roles = client.get("roles")
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise InvalidPayload(f"client.roles must be a list of at most {MAX_ROLES}", field="client")
    return {
        "method": method,
        "body": inner,
        "client_name": _name(client.get("name"), "client"),
        "client_roles": tuple(_name(role, "client") for role in roles),
    }


def _target(body: dict[str, Any]) -> str:
    target = _str(body, "target")
    if not 0 < len(target) <= MAX_TARGET_CHARS or not (target.isascii() and target.isprintable()):
        raise InvalidPayload("rep.hint target must be a printable ASCII node name", field="target")
    return str(target)


def _list(body: dict[str, Any], name: str, limit: int = MAX_BATCH_ITEMS) -> list[Any]:
    value = body.get(name)
    if not isinstance(value, list):
        raise InvalidPayload(f"{name} must be a list", field=name)
    if len(value) > limit:
        raise InvalidPayload(f"{name} has more than {limit} items", field=name)
    return value


def _upload_id(value: Any) -> str:
    """An upload id the leader handed out: lowercase hex (it names a file there)."""
    if not (isinstance(value, str) and 0 < len(value) <= MAX_UPLOAD_ID_CHARS
            and all(c in "0123456789abcdef" for c in value)):  # fmt: skip
        raise InvalidPayload("upload_id must be an id restore.upload answered", field="upload_id")
    return value


def _bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidPayload(f"{name} must be bytes", field=name)
    return value


def write_item(item: Any) -> WriteItem:
    """One ``ctx.put`` body or ``ctx.put_batch`` item."""
    if not isinstance(item, dict):
        raise InvalidPayload("a write must be a map", field="items")
    address = _address(item)
    record = ContextRecord.from_fields(item.get("record") or {})
    readers = item.get("readers")
    if readers is not None and not (
        isinstance(readers, list) and all(isinstance(role, str) for role in readers)
    ):
        raise InvalidPayload("readers must be a list of role names", field="readers")
    return WriteItem(address, record, None if readers is None else tuple(readers))


def _search(body: dict[str, Any]) -> dict[str, Any]:
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise InvalidPayload("tags must be a list of strings", field="tags")
    return {
        "query": _str(body, "query", optional=True) or "",
        "project": _str(body, "project", optional=True),
        "task": _str(body, "task", optional=True),
        "tags": tags,
        "limit": _opt_int(body, "limit", 1, MAX_SEARCH_LIMIT) or 20,
        "as_role": _str(body, "as_role", optional=True),
    }


def parse_request(method: str, body: dict[str, Any]) -> Parsed:
    """The typed arguments of ``method``'s ``body``.

    Raises:
        InvalidPayload: a field is missing, of the wrong type or out of range (named).
    """
    args: dict[str, Any]
    if method == "ctx.put":
        args = {"items": [write_item(body)], "w": _opt_int(body, "w")}
    elif method == "ctx.put_batch":
        args = {"items": [write_item(i) for i in _list(body, "items")], "w": _opt_int(body, "w")}
    elif method in ("ctx.get", "ctx.history"):
        args = {"address": _address(body), "as_role": _str(body, "as_role", optional=True)}
        args["r"] = _opt_int(body, "r")
        if method == "ctx.history":
            args["from"] = _opt_int(body, "from", 0, 2**31) or 0
    elif method == "ctx.get_batch":
        addresses = _list(body, "addresses")
        if not all(isinstance(address, str) for address in addresses):
            raise InvalidPayload("addresses must be a list of strings", field="addresses")
        args = {"addresses": addresses, "as_role": _str(body, "as_role", optional=True)}
        args["r"] = _opt_int(body, "r")
    elif method in ("ctx.ls", "rep.heads"):
        args = {"pattern": _str(body, "pattern"), "deleted": bool(body.get("deleted"))}
    elif method in ("ctx.search", "rep.search"):
        args = _search(body)
    elif method in ("ctx.delete", "ctx.purge"):
        args = {"address": _address(body), "w": _opt_int(body, "w")}
    elif method == "rep.store":
        blobs = _list(body, "envelopes", 100_000)
        args = {"envelopes": [_bytes(blob, "envelopes") for blob in blobs]}
    elif method == "rep.versions":
        after = _str(body, "after", optional=True)
        args = {"context": _context(body), "after": after}
        args["max_bytes"] = _opt_int(body, "max_bytes", 1, 2**40)
    elif method == "rep.head":
        args = {"context": _context(body)}
    elif method == "rep.purge":
        args = {"context": _context(body), "marker": _bytes(body.get("marker"), "marker")}
        args["term"] = _term(body, optional=True)  # a leader's purge; absent: repair
    elif method in ("node.status", "rep.ping"):
        args = {}
    elif method == "rep.hint":
        blobs = _list(body, "envelopes", 100_000)
        args = {"target": _target(body), "context": _context(body)}
        args["envelopes"] = [_bytes(blob, "envelopes") for blob in blobs]
    elif method == "rep.tree":
        args = {"partitions": _ints(_list(body, "partitions", MAX_ITEMS), "partitions")}
        args.update(leaves=bool(body.get("leaves")), summary=bool(body.get("summary")))
    elif method == "rep.digests":
        args = {"segments": _ints(_list(body, "segments", MAX_ITEMS), "segments", size=2)}
    elif method == "rep.ids":
        names = _list(body, "contexts", MAX_ITEMS)
        args = {"contexts": [_context_name(name, "contexts") for name in names]}
    elif method == "rep.fetch":
        ids = _list(body, "ids", MAX_ITEMS)
        if not all(isinstance(vid, str) for vid in ids):
            raise InvalidPayload("ids must be version ids", field="ids")
        args = {"context": _context(body), "ids": ids}
    elif method == "raft.msg":
        args = {"msgs": _raft_messages(_list(body, "msgs", MAX_RAFT_MESSAGES))}
    elif method == "raft.propose":
        data = _bytes(body.get("data"), "data")
        if len(data) > MAX_PROPOSAL_BYTES:
            raise InvalidPayload(f"data: over {MAX_PROPOSAL_BYTES} bytes", field="data")
        args = {"data": data}
    elif method == "ctl.maintain":
        duty = _str(body, "duty")
        if duty not in ("ttl_sweep", "compaction"):
            raise InvalidPayload(f"duty: unknown duty {duty!r}", field="duty")
        term = body.get("term")
        if isinstance(term, bool) or not isinstance(term, int) or not 0 < term < 2**63:
            raise InvalidPayload("term must be a positive integer", field="term")
        args = {"duty": duty, "term": term}
    elif method in MEMBER_METHODS:
        args = _member_request(method, body)
    elif method == "ctl.member":
        inner = _str(body, "method")
        if inner not in MEMBER_METHODS:
            raise InvalidPayload(f"method must be one of {sorted(MEMBER_METHODS)}", field="method")
        request = body.get("body")
        if not isinstance(request, dict):
            raise InvalidPayload("body must be a map", field="body")
        args = {"method": inner, "request": _member_request(inner, request),
                "client_name": _name(body.get("client_name"), "client_name")}  # fmt: skip
    elif method in ("keys.rotate", "keys.rotate_leader"):
        args = {"role": _name(body.get("role"), "role")}
    elif method in ("keys.install", "keys.reseal", "keys.retire"):
        args = {"term": _term(body), "role": _name(body.get("role"), "role")}
        version = body.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 2**31:
            raise InvalidPayload("version must be a positive integer", field="version")
        args["version"] = version
        if method == "keys.install":
            identity = _bytes(body.get("identity"), "identity")
            if len(identity) > MAX_SEALED_IDENTITY_BYTES:
                raise InvalidPayload("identity: too large", field="identity")
            args["identity"] = identity
    elif method == "admin.share":
        args = {"term": _term(body), "recipient": _recipient(body)}
        if body.get("epoch") is not None:
            args["epoch"] = _epoch(body)
    elif method == "admin.reshare":
        share = _bytes(body.get("share"), "share")
        if not share or len(share) > MAX_SEALED_SHARE_BYTES:
            raise InvalidPayload(
                f"share: 1 to {MAX_SEALED_SHARE_BYTES} bytes of age ciphertext", field="share"
            )
        args = {"term": _term(body), "epoch": _epoch(body), "share": share}
    elif method == "admin.forward":
        args = _forward(body)
    elif method in BACKUP_METHODS:
        args = backup_request(method, body)
    elif method == "restore.upload":
        data = _bytes(body.get("data"), "data")
        if len(data) > MAX_RESTORE_CHUNK:
            raise InvalidPayload(f"data: over {MAX_RESTORE_CHUNK} bytes", field="data")
        upload = body.get("upload_id")
        offset = body.get("offset")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**62:
            raise InvalidPayload("offset must be a byte offset (an integer >= 0)", field="offset")
        args = {"upload_id": None if upload is None else _upload_id(upload),
                "data": data, "offset": offset}  # fmt: skip
    elif method == "restore.apply":
        uploads = _list(body, "uploads", MAX_RESTORE_FILES)
        if not uploads:
            raise InvalidPayload("uploads: give at least one uploaded file", field="uploads")
        cursor = body.get("cursor", 0)
        if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor < 2**62:
            raise InvalidPayload("cursor must be an integer >= 0", field="cursor")
        args = {"uploads": [_upload_id(item) for item in uploads], "cursor": cursor}
    else:
        raise InvalidPayload(f"unknown method {method!r}", field="method")
    return Parsed(method, args)


def _raft_messages(items: list[Any]) -> list[Any]:
    """The Raft messages of a ``raft.msg`` body (node/control/raft_types.py's wire form)."""
    messages = []
    for number, item in enumerate(items):
        try:
            messages.append(message_from_wire(item))
        except MalformedRaftData as exc:
            raise InvalidPayload(f"msgs[{number}].{exc}", field="msgs") from None
    return messages


def _member_request(method: str, body: dict[str, Any]) -> dict[str, Any]:
    """``ctl.member_add {name, node_id, recipient, signing_key, rpc_host, rpc_port}``;
    ``ctl.member_remove {name}``; ``ctl.member_forget {name}``."""
    args: dict[str, Any] = {"name": _name(body.get("name"), "name")}
    if method != "ctl.member_add":
        return args
    node_id = body.get("node_id")
    if not (isinstance(node_id, str) and 0 < len(node_id) <= MAX_NODE_ID_CHARS
            and node_id.isascii() and node_id.isprintable()):  # fmt: skip
        raise InvalidPayload(
            f"node_id must be printable ASCII of 1 to {MAX_NODE_ID_CHARS} characters",
            field="node_id",
        )
    key = _bytes(body.get("signing_key"), "signing_key")
    if len(key) != SIGNING_KEY_BYTES:
        raise InvalidPayload(
            f"signing_key must be a raw Ed25519 public key ({SIGNING_KEY_BYTES} bytes)",
            field="signing_key",
        )
    port = body.get("rpc_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidPayload("rpc_port must be a port number from 1 to 65535", field="rpc_port")
    args.update(
        node_id=node_id, recipient=_recipient(body), signing_key=key,
        rpc_host=_name(body.get("rpc_host"), "rpc_host"), rpc_port=port,
    )  # fmt: skip
    return args
