"""The frame limit fits every record validation accepts (node/rpc/wire.py's arithmetic)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.roles import DEFAULT_ROLES
from node.cluster.replication import batches_by_bytes
from node.rpc.wire import MAX_BATCH_BYTES, MAX_FRAME_BYTES, Request, Response, encode
from storage.context_store import ContextStore, WriteRequest
from storage.envelope import MAX_DECOMPRESSED_BYTES
from storage.errors import InvalidPayload
from storage.record import MAX_SECRET_BYTES, ContextRecord
from storage.views import to_wire
from tests.node.largest_records import BUILDERS, everything

ADDRESS = "ucxl://claude:observer@chorus:limits/*^/big.bin"
READERS = tuple(role.name for role in DEFAULT_ROLES)
SEED = 20261130


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContextStore]:
    root: Path = tmp_path_factory.mktemp("limits") / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    opened = ContextStore.open(root)
    yield opened
    opened.close()


def test_the_secret_limit_is_what_a_reader_may_decompress() -> None:
    assert MAX_SECRET_BYTES == MAX_DECOMPRESSED_BYTES
    assert MAX_BATCH_BYTES < MAX_FRAME_BYTES


@pytest.mark.parametrize("limit", sorted(BUILDERS))
def test_the_largest_record_at_each_limit_fits_every_frame_that_carries_it(
    store: ContextStore, limit: str
) -> None:
    """A put request, a rep.store batch and a get answer of it all encode under the limit."""
    fields = BUILDERS[limit](random.Random(SEED))
    record = ContextRecord.from_fields(fields)
    put = {"address": ADDRESS, "record": fields, "readers": list(READERS), "w": None}
    assert len(encode(Request(1, "ctx.put", 1000, put))) <= MAX_FRAME_BYTES
    prepared = store.prepare(WriteRequest(ADDRESS, record, READERS))
    (env,) = store.seal_prepared([prepared], lambda _ctx: None)
    blobs = [env.encode()] * 3
    for batch in batches_by_bytes(blobs, MAX_BATCH_BYTES):
        assert len(encode(Request(2, "rep.store", 1000, {"envelopes": batch}))) <= MAX_FRAME_BYTES
    store.store(ADDRESS, record, readers=READERS)
    view = store.retrieve(ADDRESS, as_role="admin")
    assert view.content == record.content
    assert len(encode(Response(3, {"version": to_wire(view)}))) <= MAX_FRAME_BYTES


def test_the_largest_envelope_leaves_margin_under_the_frame_limit(store: ContextStore) -> None:
    """The all-limits record's envelope is below the documented 9.5 MiB bound."""
    record = ContextRecord.from_fields(everything(random.Random(SEED)))
    assert len(record.encode_secret()) > MAX_SECRET_BYTES - 64
    (env,) = store.seal_prepared(
        [store.prepare(WriteRequest(ADDRESS, record, READERS))], lambda _ctx: None
    )
    assert len(env.encode()) < 9.5 * 1024 * 1024 < MAX_FRAME_BYTES


def test_a_record_over_the_secret_limit_is_refused_naming_the_record() -> None:
    fields = everything(random.Random(SEED))
    fields["content"] = bytes(len(fields["content"]) + 64)
    with pytest.raises(InvalidPayload) as caught:
        ContextRecord.from_fields(fields)
    assert caught.value.field == "record"
