"""Anti-entropy, the replica side: the live hash tree of one node and the ``rep.*`` answers.

Owns: keeping ``node.cluster.antientropy.HashTree`` in step with the version store (built
once at start by one scan, then XOR deltas from ``VersionStore.add_observer``, re-seals
included), and answering peers' anti-entropy requests. Must be built before the node
accepts writes: a change that lands between the observer's registration and the scan
would count twice.

Cost of the start-up build: one pass over the ``v/`` rows and the ``p/`` rows; a version
as written is recognised from its first four bytes (``storage.envelope.seal_epoch_of``),
only a re-sealed one has its header fields skipped through to its seal epoch; memory is
one digest per context plus one set entry per context in its leaf (~200 bytes per context
in CPython).

RPC methods (node certificates only, like every ``rep.*``; hashes travel as 16 bytes):

- ``rep.tree`` {partitions: [int], leaves: bool, summary: bool} -> {roots: [bytes]} aligned
  with ``partitions``; with ``summary`` {summary: bytes}, one hash over those roots in order
  (an idle pass asks only this); with ``leaves`` {leaves: [[[leaf, bytes], ...], ...]};
- ``rep.digests`` {segments: [[partition, leaf], ...]} -> {digests: [[context, bytes]]};
- ``rep.ids`` {contexts: [str]} -> {states: [[context, [version id], marker | null,
  [[version id, seal epoch], ...]]]}: the last item lists the re-sealed copies only (an
  answer without it, from an older node, means none);
- ``rep.fetch`` {context, ids} -> {envelopes: [bytes], more: [id]}: at most one
  ``batches_by_bytes`` batch per answer, ``more`` lists the ids still to ask for.

Bodies arrive parsed by ``node.cluster.requests`` (types, at most ``MAX_ITEMS`` items);
indexes outside this tree answer ``UCXL-400-INVALID_PAYLOAD`` naming the field.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from node.cluster.antientropy import (
    HASH_BYTES,
    HashTree,
    change_delta,
    context_digest,
)
from node.cluster.replication import batches_by_bytes
from node.rpc.transport import Peer
from node.rpc.wire import MAX_BATCH_BYTES
from storage.address import ContextName
from storage.errors import InvalidPayload
from storage.version_store import SetChange, VersionStore

Body = dict[str, Any]
Handler = Callable[[Peer, Body], Awaitable[Body]]
T = TypeVar("T")
BATCH_BUDGET = MAX_BATCH_BYTES


def hash_bytes(value: int) -> bytes:
    """A tree hash on the wire."""
    return value.to_bytes(HASH_BYTES, "big")


def hash_int(data: Any) -> int:
    """A tree hash from the wire.

    Raises:
        ValueError: not 16 bytes.
    """
    if not isinstance(data, bytes) or len(data) != HASH_BYTES:
        raise ValueError(f"a tree hash must be {HASH_BYTES} bytes")
    return int.from_bytes(data, "big")


class TreeKeeper:
    """The node's hash tree, safe to update from writer threads and read from trio."""

    def __init__(self, versions: VersionStore, partitions: int, leaves: int) -> None:
        self.versions = versions
        self._lock = threading.Lock()
        self.tree = HashTree(partitions, leaves)
        versions.add_observer(self._on_change)
        for ctx, ids, upto, epochs in versions.version_states():
            self.tree.apply(ctx, context_digest(ctx, ids, upto, epochs))
        self.changes = 0

    def _on_change(self, change: SetChange) -> None:
        delta = change_delta(
            change.ctx,
            change.added,
            change.removed,
            change.old_upto,
            change.new_upto,
            change.epochs,
            change.resealed,
        )
        with self._lock:
            self.tree.apply(change.ctx, delta)
            self.changes += 1

    def roots(self, partitions: Sequence[int]) -> dict[int, int]:
        """partition -> root (0 when empty)."""
        with self._lock:
            return {p: self.tree.root(p) for p in partitions}

    def summary(self, partitions: Sequence[int]) -> bytes:
        """One hash over the non-empty roots among ``partitions`` (equal sets, equal summary).

        Costs the smaller of the two sets: empty partitions contribute nothing.
        """
        wanted = set(partitions)
        with self._lock:
            roots = self.tree.nonzero_roots()
            if len(roots) <= len(wanted):
                picked = sorted((p, r) for p, r in roots.items() if p in wanted)
            else:
                picked = sorted((p, roots[p]) for p in wanted if p in roots)
        digest = hashlib.blake2b(digest_size=HASH_BYTES)
        for partition, root in picked:
            digest.update(partition.to_bytes(4, "big") + root.to_bytes(HASH_BYTES, "big"))
        return digest.digest()

    def leaf_hashes(self, partition: int) -> dict[int, int]:
        """The non-zero leaves of a partition."""
        with self._lock:
            return self.tree.leaf_hashes(partition)

    def contexts_in(self, partition: int, leaf: int) -> dict[bytes, int]:
        """ctx key -> digest for one leaf."""
        with self._lock:
            return self.tree.contexts_in(partition, leaf)

    def check_partition(self, partition: Any) -> int:
        """A partition index from the wire (ValueError when out of range)."""
        if isinstance(partition, bool) or not isinstance(partition, int):
            raise ValueError("a partition must be an integer")
        if not 0 <= partition < self.tree.partitions:
            raise ValueError(f"partition {partition} is outside 0..{self.tree.partitions - 1}")
        return partition

    def check_partitions(self, partitions: list[Any]) -> list[int]:
        """Partition indexes from the wire (ValueError when one is out of range)."""
        if not partitions:
            return partitions
        if set(map(type, partitions)) == {int} and (
            min(partitions) >= 0 and max(partitions) < self.tree.partitions
        ):
            return partitions
        return [self.check_partition(p) for p in partitions]  # names the bad one

    def check_leaf(self, leaf: Any) -> int:
        """A leaf index from the wire (ValueError when out of range)."""
        if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf < self.tree.leaves:
            raise ValueError(f"leaf {leaf!r} is outside 0..{self.tree.leaves - 1}")
        return leaf


def in_range(check: Callable[[Any], T], value: Any, field: str) -> T:
    """``check(value)``, with an index outside the tree answered as the caller's fault."""
    try:
        return check(value)
    except ValueError as exc:
        raise InvalidPayload(str(exc), field=field) from None


def replica_handlers(
    keeper: TreeKeeper, blocking: Callable[[Callable[[], Any]], Awaitable[Any]]
) -> dict[str, Handler]:
    """The ``rep.*`` methods anti-entropy adds to the node service."""
    versions = keeper.versions

    async def tree(peer: Peer, body: Body) -> Body:
        parts = in_range(keeper.check_partitions, body["partitions"], "partitions")
        if body.get("leaves"):
            return {
                "leaves": [
                    [[leaf, hash_bytes(h)] for leaf, h in sorted(keeper.leaf_hashes(p).items())]
                    for p in parts
                ]
            }
        if body.get("summary"):
            return {"summary": keeper.summary(parts)}
        roots = keeper.roots(parts)
        return {"roots": [hash_bytes(roots[p]) for p in parts]}

    async def digests(peer: Peer, body: Body) -> Body:
        out: list[list[Any]] = []
        for partition, leaf in body["segments"]:
            found = keeper.contexts_in(
                in_range(keeper.check_partition, partition, "segments"),
                in_range(keeper.check_leaf, leaf, "segments"),
            )
            for ctx, digest in sorted(found.items()):
                out.append([ContextName.from_key(ctx).canonical(), hash_bytes(digest)])
        return {"digests": out}

    async def ids(peer: Peer, body: Body) -> Body:
        names: list[ContextName] = body["contexts"]

        def read() -> Body:
            states = []
            for ctx in names:
                marker = versions.purge_marker(ctx)
                states.append(
                    [
                        ctx.canonical(),
                        versions.version_ids(ctx),
                        None if marker is None else marker.encode(),
                        sorted([vid, e] for vid, e in versions.seal_epochs(ctx).items()),
                    ]
                )
            return {"states": states}

        result: Body = await blocking(read)
        return result

    async def fetch(peer: Peer, body: Body) -> Body:
        ctx: ContextName = body["context"]
        wanted: list[str] = body["ids"]

        def read() -> Body:
            found: list[tuple[str, bytes]] = []
            for vid in wanted:
                data = versions.version(ctx, vid)
                if data is not None:
                    found.append((vid, data))
            first = next(batches_by_bytes([data for _, data in found], BATCH_BUDGET), [])
            sent = {vid for vid, _ in found[: len(first)]}
            more = [vid for vid, _ in found[len(first) :]]
            return {"envelopes": first, "more": more, "sent": len(sent)}

        result: Body = await blocking(read)
        return result

    return {"rep.tree": tree, "rep.digests": digests, "rep.ids": ids, "rep.fetch": fetch}
