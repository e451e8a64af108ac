"""Damaged bytes on disk, and what must never be on disk.

A version row damaged anywhere (clear header, age ciphertext, signer key, signature) reads
as ``UCXL-500-CORRUPT_RECORD``; every other version and context stays readable, and the
history still lists every version (kind ``corrupt`` when the row no longer decodes).
The canary tests scan the raw LevelDB files for plaintext that must only exist encrypted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import plyvel
import pytest

from crypto.roles import DEFAULT_ROLES
from storage.address import parse
from storage.context_store import ContextStore
from storage.errors import CorruptRecord
from storage.record import ContextRecord
from storage.schema import version_key
from storage.views import StoredRef

A = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
B = "ucxl://gpt4:senior_software_architect@chorus:auth/*^/decisions/adr-7.md"
CORRUPT = "UCXL-500-CORRUPT_RECORD"

# The top-level items of a stored envelope, in order (storage/envelope.py, ENVELOPE_SCHEMA 1).
ENVELOPE_ITEMS = (
    "schema",
    "context",
    "version_id",
    "parent",
    "kind",
    "created_at_ms",
    "created_by",
    "readers",
    "tags",
    "technologies",
    "influences",
    "influenced_by",
    "expires_at_ms",
    "compression",
    "ciphertext",
    "signer",
    "signature",
)


def at(address: str, temporal: str) -> str:
    """``address`` with its ``*^`` temporal segment replaced by ``temporal``."""
    return address.replace("/*^", f"/{temporal}", 1)


def item_spans(row: bytes) -> dict[str, tuple[int, int]]:
    """The byte range [start, end) of each top-level item of a stored envelope."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(row)
    assert unpacker.read_array_header() == len(ENVELOPE_ITEMS)
    spans = {}
    for name in ENVELOPE_ITEMS:
        start = unpacker.tell()
        unpacker.skip()
        spans[name] = (start, unpacker.tell())
    assert spans["signature"][1] == len(row)
    return spans


def flipped(row: bytes, position: int, mask: int) -> bytes:
    """``row`` with the byte at ``position`` XOR ``mask``."""
    damaged = bytearray(row)
    damaged[position] ^= mask
    return bytes(damaged)


@dataclass(frozen=True)
class Node:
    """A data directory holding three versions of A and two of B."""

    root: Path
    a: list[StoredRef]
    b: list[StoredRef]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    root = tmp_path / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    with ContextStore.open(root) as store:
        a = [
            store.store(A, ContextRecord.from_fields({"summary": f"A-secret-{n}", "tags": ["t"]}))
            for n in (1, 2, 3)
        ]
        b = [
            store.store(B, ContextRecord.from_fields({"summary": f"B-secret-{n}"})) for n in (1, 2)
        ]
    return Node(root, a, b)


Pick = Callable[[dict[str, tuple[int, int]]], int]


def damage_row(root: Path, address: str, version_id: str, pick: Pick, mask: int) -> None:
    """Flip one byte of a version row directly in LevelDB (the store is closed)."""
    key = version_key(parse(address).context().key(), version_id)
    db = plyvel.DB(str(root / "db"))
    try:
        row = db.get(key)
        assert row is not None
        db.put(key, flipped(row, pick(item_spans(row)), mask), sync=True)
    finally:
        db.close()


def check_damaged(node: Node, version: int, kind: str) -> None:
    """Version ``version`` of A reads as corrupt; everything else reads as before."""
    with ContextStore.open(node.root) as store:
        damaged = at(A, f"*~{version}")
        for attempt in (
            lambda: store.retrieve(damaged),
            lambda: store.retrieve(damaged, as_role="admin"),
            lambda: store.retrieve_encrypted(damaged),
        ):
            with pytest.raises(CorruptRecord) as info:
                attempt()
            assert info.value.code == CORRUPT
            assert f"A-secret-{version}" not in info.value.message

        for n, ref in enumerate(node.a, start=1):
            if n != version:
                view = store.retrieve(at(A, f"*~{n}"))
                assert (view.version, view.version_id, view.summary) == (
                    n,
                    ref.version_id,
                    f"A-secret-{n}",
                )
        for n, ref in enumerate(node.b, start=1):
            view = store.retrieve(at(B, f"*~{n}"))
            assert (view.version_id, view.summary) == (ref.version_id, f"B-secret-{n}")
        assert store.retrieve(B).summary == "B-secret-2"

        history = store.history(A)
        assert [e.version_id for e in history] == [ref.version_id for ref in node.a]
        assert [e.version for e in history] == [1, 2, 3]
        expected_kinds = ["put"] * 3
        expected_kinds[version - 1] = kind
        assert [e.kind for e in history] == expected_kinds
        assert all(e.siblings == 0 for e in history)
        for entry in history:
            entry.to_json()  # what `slurp history --json` prints


def inside(item: str, where: float = 0.5) -> Pick:
    """A byte ``where`` of the way into ``item``."""

    def pick(spans: dict[str, tuple[int, int]]) -> int:
        start, end = spans[item]
        return min(end - 1, start + int((end - start) * where))

    return pick


def last_of(item: str) -> Pick:
    """The last byte of ``item``."""
    return lambda spans: spans[item][1] - 1


# (what is damaged, which byte, XOR mask, the history kind afterwards)
DAMAGE = [
    ("array-header", lambda spans: 0, 0x01, "corrupt"),
    ("schema-number", inside("schema"), 0xFF, "corrupt"),
    ("context", inside("context"), 0x01, "put"),
    ("version-id", last_of("version_id"), 0x01, "put"),
    ("parent-hex-digit", inside("parent", 0.1), 0x01, "put"),  # a wall-clock digit: stays hex
    ("parent-not-an-id", inside("parent", 0.3), 0x40, "corrupt"),
    ("kind", last_of("kind"), 0x01, "corrupt"),
    ("created-by", inside("created_by"), 0x01, "put"),
    ("readers", inside("readers"), 0x01, "put"),
    ("tags", last_of("tags"), 0x01, "put"),
    ("compression", last_of("compression"), 0x01, "corrupt"),
    ("ciphertext-age-header", inside("ciphertext", 0.05), 0x01, "put"),
    ("ciphertext-middle", inside("ciphertext"), 0x01, "put"),
    ("ciphertext-last-byte", last_of("ciphertext"), 0x80, "put"),
    ("ciphertext-length", inside("ciphertext", 0.0), 0x01, "corrupt"),
    ("signer", inside("signer"), 0x01, "put"),
    ("signature-first-byte", inside("signature", 0.1), 0x01, "put"),
    ("signature-last-byte", last_of("signature"), 0x80, "put"),
]


@pytest.mark.parametrize(
    ("pick", "mask", "kind"),
    [case[1:] for case in DAMAGE],
    ids=[case[0] for case in DAMAGE],
)
def test_a_damaged_middle_version_is_corrupt_and_the_rest_intact(
    node: Node, pick: Pick, mask: int, kind: str
) -> None:
    damage_row(node.root, A, node.a[1].version_id, pick, mask)
    check_damaged(node, 2, kind)


@pytest.mark.parametrize(
    ("pick", "mask", "kind"),
    [
        (lambda spans: 0, 0x01, "corrupt"),
        (inside("ciphertext"), 0x01, "put"),
        (last_of("signature"), 0x80, "put"),
    ],
    ids=["array-header", "ciphertext", "signature"],
)
def test_a_damaged_latest_version_is_corrupt_and_the_rest_intact(
    node: Node, pick: Pick, mask: int, kind: str
) -> None:
    damage_row(node.root, A, node.a[2].version_id, pick, mask)
    check_damaged(node, 3, kind)
    with ContextStore.open(node.root) as store, pytest.raises(CorruptRecord):
        store.retrieve(A)


def test_a_damaged_first_version_does_not_shift_instant_navigation(node: Node) -> None:
    damage_row(node.root, A, node.a[0].version_id, lambda spans: 0, 0x01)
    check_damaged(node, 1, "corrupt")
    with ContextStore.open(node.root) as store:
        with pytest.raises(CorruptRecord):
            store.retrieve(at(A, "*~"))
        assert store.retrieve(at(A, "^^1")).summary == "A-secret-2"
        assert store.retrieve(at(A, "9999-12-31T23:59:59Z")).summary == "A-secret-3"
        with pytest.raises(CorruptRecord):
            store.retrieve(at(A, "~~2"))


@pytest.mark.slow
def test_every_single_byte_flip_of_a_version_is_detected(tmp_path: Path) -> None:
    """Flipping any one byte of a stored version makes that version (alone) unreadable."""
    root = tmp_path / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    with ContextStore.open(root) as store:
        refs = [
            store.store(A, ContextRecord.from_fields({"summary": f"A-secret-{n}", "tags": ["t"]}))
            for n in (1, 2, 3)
        ]
        key = version_key(parse(A).context().key(), refs[1].version_id)
        row = store.kv.get(key)
        assert row is not None
        # a tampered expiry hides the version instead: see test_a_tampered_expiry_is_detected
        skip = range(*item_spans(row)["expires_at_ms"])
        missed = []
        for position in range(len(row)):
            if position in skip:
                continue
            for mask in (0x01, 0xFF):
                store.kv.write([(key, flipped(row, position, mask))], sync=False)
                try:
                    view = store.retrieve(at(A, "*~2"))
                    missed.append((position, mask, view.version, view.summary))
                except CorruptRecord:
                    pass
                assert [e.version_id for e in store.history(A)] == [r.version_id for r in refs]
                assert store.retrieve(at(A, "*~1")).summary == "A-secret-1"
                assert store.retrieve(at(A, "*~3")).summary == "A-secret-3"
        store.kv.write([(key, row)])
        assert store.retrieve(at(A, "*~2")).summary == "A-secret-2"
    assert missed == []


def test_a_tampered_expiry_is_detected(node: Node) -> None:
    # None (0xc0) XOR 0x80 is the positive fixint 64: "expired at 64 ms after the epoch"
    damage_row(node.root, A, node.a[1].version_id, inside("expires_at_ms"), 0x80)
    check_damaged(node, 2, "corrupt")  # an expiry that fails the signature marks the row


def test_a_tampered_creation_time_still_lists(node: Node) -> None:
    damage_row(node.root, A, node.a[1].version_id, inside("created_at_ms", 0.2), 0x01)
    check_damaged(node, 2, "put")


# -- canaries ----------------------------------------------------------------------------


CANARIES = {
    "summary": "canary-summary-Zq8Xw3Pe",
    "purpose": "canary-purpose-Ke4Bn7Vu",
    "content": "canary-content-Jm2Kp9Ra",
    "insight": "canary-insight-Hv5Tn1Yo",
    "change_reason": "canary-reason-Wd3Gs8Li",
    "metadata-key": "canary-metakey-Rb7Yc4Ma",
    "metadata-value": "canary-metavalue-Lf6Ud2Si",
    "large-content": "canary-large-Px1Qe5Ko",
}
CLEAR_TAG = "cleartag-Qx9WvTm"
CLEAR_TECH = "cleartech-Nf4JhBz"


def raw_files(directory: Path) -> Iterator[tuple[Path, bytes]]:
    """Every file under ``directory`` with its bytes."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes()


def found_in(directory: Path, needle: str) -> list[str]:
    """The names of the files under ``directory`` whose raw bytes hold ``needle``."""
    return [path.name for path, data in raw_files(directory) if needle.encode() in data]


def test_no_secret_field_reaches_the_database_files(tmp_path: Path) -> None:
    root = tmp_path / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    small = {
        "summary": CANARIES["summary"],
        "purpose": CANARIES["purpose"],
        "content": CANARIES["content"],
        "insights": [CANARIES["insight"]],
        "change_reason": CANARIES["change_reason"],
        "metadata": {CANARIES["metadata-key"]: CANARIES["metadata-value"]},
        "tags": [CLEAR_TAG],
        "technologies": [CLEAR_TECH],
    }
    # larger than the compression threshold: compressed, then encrypted
    large = {"content": CANARIES["large-content"] + " filler" * 2000, "tags": [CLEAR_TAG]}
    with ContextStore.open(root) as store:
        store.store(A, ContextRecord.from_fields(small))
        store.store(A, ContextRecord.from_fields(large))
        store.store(B, ContextRecord.from_fields(small))

    db = root / "db"
    assert found_in(db, CLEAR_TAG)  # the scan sees what is stored in clear
    assert found_in(db, CLEAR_TECH)
    assert {name: found_in(db, canary) for name, canary in CANARIES.items()} == {
        name: [] for name in CANARIES
    }

    with ContextStore.open(root) as store:
        store.compact()
    assert any(path.suffix == ".ldb" for path, _ in raw_files(db))
    assert found_in(db, CLEAR_TAG)
    assert {name: found_in(db, canary) for name, canary in CANARIES.items()} == {
        name: [] for name in CANARIES
    }
    with ContextStore.open(root) as store:  # and it all still reads back
        assert store.retrieve(at(A, "*~1")).fields["metadata"] == small["metadata"]
        assert str(store.retrieve(A).content).startswith(CANARIES["large-content"])
