"""Export and import of plain records (issue 11): what a role may read, histories, bytes
content, provenance kept in metadata, and a bad file or record writes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from crypto.roles import DEFAULT_ROLES
from storage.context_store import ContextStore
from storage.errors import InvalidPayload
from storage.export import (
    EXPORT_FORMAT,
    ExportUnreadable,
    export_records,
    import_records,
    open_export,
    seal,
)
from storage.record import ContextRecord
from tests.storage.backup_helpers import address, rows
from tests.storage.conftest import FakeClock

ALL = "ucxl://any:any@chorus:auth/*^/"


@pytest.fixture
def other(tmp_path: Path, clock: FakeClock) -> Iterator[ContextStore]:
    root = tmp_path / "other"
    ContextStore.init(root, DEFAULT_ROLES)
    opened = ContextStore.open(root, clock_ms=clock)
    yield opened
    opened.close()


def test_history_export_round_trips_into_another_node(
    store: ContextStore, other: ContextStore
) -> None:
    store.store(address(1), ContextRecord.from_fields({"summary": "one", "content": b"\x00\xff"}))
    store.store(address(1), ContextRecord.from_fields({"summary": "two", "tags": ["x"]}))
    records, skipped = export_records(store, ALL, history=True)
    assert [r["summary"] for r in records] == ["one", "two"]
    assert skipped == 0
    assert {r["export"] for r in records} == {EXPORT_FORMAT}
    me = x25519.Identity.generate()
    opened = open_export(seal(records, [str(me.to_public())]), [me], None)
    assert opened == records
    with other:
        refs = import_records(other, opened)
        assert [ref.version for ref in refs] == [1, 2]
        first = other.retrieve(refs[0].address)
        assert first.fields["content"] == b"\x00\xff"
        source = first.fields["metadata"]["imported_from"]
        assert source["version_id"] == records[0]["version_id"]
        assert first.version_id != records[0]["version_id"]
        assert first.created_by.endswith("@" + other.keyring.node_id)
        assert other.retrieve(refs[1].address).tags == ("x",)


def test_latest_only_and_tombstones_skipped(store: ContextStore) -> None:
    store.store(address(1), ContextRecord.from_fields({"summary": "a"}))
    store.store(address(1), ContextRecord.from_fields({"summary": "b"}))
    store.store(address(2), ContextRecord.from_fields({"summary": "gone"}))
    store.delete(address(2))
    latest, skipped = export_records(store, ALL)
    assert [r["summary"] for r in latest] == ["b"]
    assert skipped == 0
    every, skipped = export_records(store, ALL, history=True)
    assert [r["summary"] for r in every] == ["a", "b", "gone"]
    assert skipped == 1


def test_a_bad_record_writes_nothing(store: ContextStore, other: ContextStore) -> None:
    store.store(address(1), ContextRecord.from_fields({"summary": "a"}))
    records, _ = export_records(store, ALL)
    bad = [*records, {**records[0], "confidence": 7}]
    with other:
        before = rows(other)
        with pytest.raises(InvalidPayload, match="record 2") as raised:
            import_records(other, bad)
        assert raised.value.field == "confidence"
        assert rows(other) == before


def test_a_file_for_someone_else_or_not_an_export_is_refused(store: ContextStore) -> None:
    me, stranger = x25519.Identity.generate(), x25519.Identity.generate()
    data = seal([], [str(stranger.to_public())])
    with pytest.raises(ExportUnreadable):
        open_export(data, [me], store.keyring)
    garbage = bytes(pyrage.encrypt(b'{"summary": "no format"}\n', [me.to_public()]))
    with pytest.raises(ExportUnreadable, match="line 1") as raised:
        open_export(garbage, [me], None)
    assert raised.value.field == "line 1"
