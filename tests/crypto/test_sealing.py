"""Envelope encryption in the keyring: records sealed under age-wrapped data keys.

Covers ``crypto.seal_format`` (layout, binding, tamper refusal), ``crypto.sealing`` (data
key rotation by count, age, reader set and key version; the bounded open-key cache) and
the keyring's ``seal`` / ``decrypt*`` / ``export_age`` entry points.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyrage
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.errors import DecryptionError, KeyringError
from crypto.keyring import Keyring, read_identity_file
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES, UnknownRole
from crypto.seal_format import (
    AGE_PREFIX,
    SealedRecord,
    age_file_of,
    associated_data,
    is_age,
    is_sealed,
    open_box,
    seal_box,
)
from crypto.sealing import DataKeyCache, PendingSeal, SealPolicy

BE = "backend_developer"
ARCH = "senior_software_architect"
CTX = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
VID = "018f00000001-000000-node"
HEADER = hashlib.sha256(b"the clear header").digest()
AD = associated_data(CTX, VID, HEADER)


class FakeMonotonic:
    """A settable monotonic clock in seconds."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return Keyring.create(tmp_path_factory.mktemp("ring") / "keys", DEFAULT_ROLES)


def sealed(ring: Keyring, payload: bytes, readers: tuple[str, ...] = (BE,)) -> bytes:
    return ring.seal(payload, readers).finish(CTX, VID, HEADER)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=3000),
    context=st.text(min_size=1, max_size=80),
    version_id=st.text(min_size=1, max_size=40),
)
def test_a_sealed_record_opens_for_every_reader_and_admin(
    ring: Keyring, payload: bytes, context: str, version_id: str
) -> None:
    """Whatever the payload and place, every reader and admin get the payload back."""
    data = ring.seal(payload, (BE, ARCH)).finish(context, version_id, HEADER)
    assert is_sealed(data)
    assert not is_age(data)
    ad = associated_data(context, version_id, HEADER)
    for role in (BE, ARCH, ADMIN_ROLE):
        assert ring.decrypt(data, role, associated=ad) == payload
    assert ring.decrypt_any(data, associated=ad) == payload


def _flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.floats(min_value=0, max_value=1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_anywhere_is_refused_as_undecryptable(
    ring: Keyring, where: float, bit: int
) -> None:
    """Any one-bit change of a sealed record (magic, key id, lengths, wrapped key, nonce,
    box, tag) gives the one opaque DecryptionError, never another exception."""
    data = sealed(ring, b"a secret payload" * 8)
    damaged = _flip(data, int(where * len(data)), bit)
    with pytest.raises(DecryptionError):
        ring.decrypt(damaged, BE, associated=AD)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.floats(min_value=0, max_value=1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_of_the_associated_data_is_refused(
    ring: Keyring, where: float, bit: int
) -> None:
    """The box opens only with the exact binding it was sealed with."""
    data = sealed(ring, b"bound to its place")
    with pytest.raises(DecryptionError):
        ring.decrypt(data, BE, associated=_flip(AD, int(where * len(AD)), bit))


def test_a_tampered_wrapped_key_with_a_matching_key_id_is_refused_by_age(ring: Keyring) -> None:
    """Even with the key id recomputed, a changed age file does not unwrap (its MAC)."""
    record = SealedRecord.parse(sealed(ring, b"x"))
    wrapped = _flip(record.wrapped_key, len(record.wrapped_key) - 40, 0)
    forged = SealedRecord(hashlib.sha256(wrapped).digest()[:16], wrapped, record.nonce, record.box)
    fresh = Keyring.open(ring.keys_dir)  # no cached unwraps
    with pytest.raises(DecryptionError):
        fresh.decrypt(forged.encode(), BE, associated=AD)


def test_a_box_moved_to_another_place_does_not_open(ring: Keyring) -> None:
    data = sealed(ring, b"stay here")
    for moved in (
        associated_data(CTX + "x", VID, HEADER),
        associated_data(CTX, VID.replace("1", "2", 1), HEADER),
        associated_data(CTX, VID, hashlib.sha256(b"another header").digest()),
        b"",
    ):
        with pytest.raises(DecryptionError):
            ring.decrypt(data, BE, associated=moved)


def test_a_role_outside_the_reader_set_cannot_open_it_even_after_a_reader_did(
    ring: Keyring,
) -> None:
    data = sealed(ring, b"for backend only")
    assert ring.decrypt(data, BE, associated=AD) == b"for backend only"  # DEK now cached
    with pytest.raises(DecryptionError):
        ring.decrypt(data, "observer", associated=AD)
    fresh = Keyring.open(ring.keys_dir)
    with pytest.raises(DecryptionError):
        fresh.decrypt(data, "observer", associated=AD)
    assert fresh.decrypt(data, ADMIN_ROLE, associated=AD) == b"for backend only"


def test_truncated_and_foreign_bytes_are_refused(ring: Keyring) -> None:
    data = sealed(ring, b"whole")
    for bad in (b"", b"SLRPSEAL", data[:30], data[:-1], b"not a record at all", b"\x00" * 64):
        with pytest.raises(DecryptionError):
            ring.decrypt(bad, BE, associated=AD)


def test_data_keys_rotate_after_k_records_and_after_t(tmp_path: Path) -> None:
    ring = Keyring.create(tmp_path / "keys", DEFAULT_ROLES)
    clock = FakeMonotonic()
    ring.configure_sealing(SealPolicy(max_records=3, max_age_s=60.0), clock)
    ids = [SealedRecord.parse(sealed(ring, b"r")).key_id for _ in range(7)]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert ids[3] == ids[4] == ids[5] != ids[6]
    assert ring.sealing_stats()["data_keys_issued"] == 3
    clock.now += 59.0
    assert SealedRecord.parse(sealed(ring, b"r")).key_id == ids[6]
    clock.now += 1.0
    assert SealedRecord.parse(sealed(ring, b"r")).key_id != ids[6]
    assert ring.sealing_stats()["data_keys_issued"] == 4


def test_a_new_data_key_for_another_reader_set_and_after_a_key_rotation(tmp_path: Path) -> None:
    ring = Keyring.create(tmp_path / "keys", DEFAULT_ROLES)

    def kid(readers: tuple[str, ...]) -> bytes:
        return SealedRecord.parse(sealed(ring, b"r", readers)).key_id

    be = kid((BE,))
    assert kid((BE,)) == be
    assert kid((BE, ADMIN_ROLE)) == be  # admin is always a reader: the same set
    arch = kid((BE, ARCH))
    assert arch != be
    assert kid((ARCH, BE)) == arch  # order does not make a set
    ring.begin_rotation(BE)
    after = sealed(ring, b"after", (BE,))
    assert SealedRecord.parse(after).key_id not in (be, arch)
    assert ring.decrypt_version(after, BE, 2, associated=AD) == b"after"
    with pytest.raises(DecryptionError):
        ring.decrypt_version(after, BE, 1, associated=AD)


def test_a_record_sealed_before_a_rotation_opens_until_its_key_retires(tmp_path: Path) -> None:
    ring = Keyring.create(tmp_path / "keys", DEFAULT_ROLES)
    before = sealed(ring, b"before")
    ring.begin_rotation(BE)
    assert ring.decrypt(before, BE, associated=AD) == b"before"
    ring.finish_rotation(BE)
    with pytest.raises(DecryptionError):  # the cached DEK went with the old identity
        ring.decrypt(before, BE, associated=AD)
    assert ring.decrypt(before, ADMIN_ROLE, associated=AD) == b"before"


def test_a_plain_age_record_still_opens(ring: Keyring) -> None:
    """Records written before sealing are plain age files to readers plus admin."""
    old = ring.encrypt(b"written by an older slurp", [BE])
    assert old.startswith(AGE_PREFIX)
    assert ring.decrypt(old, BE) == b"written by an older slurp"
    assert ring.decrypt(old, BE, associated=AD) == b"written by an older slurp"  # ignored
    assert ring.export_age(old, [BE], AD) == old
    with pytest.raises(DecryptionError):
        ring.decrypt(old, "observer")


def test_export_age_is_a_fresh_age_file_for_the_readers(ring: Keyring) -> None:
    data = sealed(ring, b"export me", (BE,))
    exported = ring.export_age(data, [BE], AD)
    assert exported.startswith(AGE_PREFIX)
    for role in (BE, ADMIN_ROLE):
        assert pyrage.decrypt(exported, [ring.current_identity(role)]) == b"export me"
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(exported, [ring.current_identity("observer")])
    with pytest.raises(DecryptionError):
        ring.export_age(data, [BE], b"moved")


def test_the_wrapped_key_is_an_age_file_of_a_32_byte_key(ring: Keyring) -> None:
    data = sealed(ring, b"payload")
    wrapped = age_file_of(data)
    key = pyrage.decrypt(wrapped, [ring.current_identity(BE)])
    assert len(key) == 32
    assert open_box(SealedRecord.parse(data), key, AD) == b"payload"
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(wrapped, [ring.current_identity("observer")])


def test_seal_box_and_layout_round_trip() -> None:
    key, nonce = bytes(range(32)), bytes(12)
    wrapped = AGE_PREFIX + b"stand-in"
    record = seal_box(key, wrapped, nonce, b"hello", b"ad")
    assert SealedRecord.parse(record.encode()) == SealedRecord(
        record.key_id, wrapped, nonce, record.box, hashlib.sha256(wrapped).digest()
    )
    assert open_box(SealedRecord.parse(record.encode()), key, b"ad") == b"hello"
    with pytest.raises(ValueError, match="size"):
        seal_box(key[:16], wrapped, nonce, b"hello", b"ad")
    with pytest.raises(DecryptionError):
        open_box(record, key[:16], b"ad")


def test_the_open_key_cache_is_bounded(tmp_path: Path) -> None:
    ring = Keyring.create(tmp_path / "keys", DEFAULT_ROLES)
    ring.configure_sealing(SealPolicy(max_records=1, open_keys=4))
    for _ in range(10):
        data = sealed(ring, b"r")
        assert ring.decrypt(data, BE, associated=AD) == b"r"
    assert ring.sealing_stats()["open_keys"] <= 4
    cache = DataKeyCache(2)
    for i in range(5):
        cache.store("s", bytes([i]), b"k")
    assert len(cache) == 2


def test_unknown_readers_and_missing_identities_are_named(ring: Keyring, tmp_path: Path) -> None:
    with pytest.raises(UnknownRole):
        ring.seal(b"x", ("nobody",))
    data = sealed(ring, b"x")
    keys = tmp_path / "keys"
    other = Keyring.create(keys, DEFAULT_ROLES)
    (keys / f"{BE}.key").unlink()
    with pytest.raises(KeyringError):
        Keyring.open(keys).decrypt(data, BE, associated=AD)
    with pytest.raises(DecryptionError):  # other keys entirely: nothing opens
        other.decrypt_any(data, associated=AD)


def test_a_pending_seal_holds_no_bytes_and_cannot_be_mistaken_for_a_record(ring: Keyring) -> None:
    pending = ring.seal(b"plaintext must not leak", (BE,))
    assert isinstance(pending, PendingSeal)
    assert bytes(pending) == b""
    assert "plaintext" not in repr(pending)
    with pytest.raises(DecryptionError):
        ring.decrypt(pending, BE, associated=AD)


def test_holding_or_wiping_one_identity_keeps_the_other_data_keys(tmp_path: Path) -> None:
    """Custody holding and wiping the admin identity drops only what admin's identities
    unwrapped: another role's unwrapped data keys and the writer's data keys stay."""
    writer = Keyring.create(tmp_path / "keys", DEFAULT_ROLES)
    admin = read_identity_file(writer.identity_path(ADMIN_ROLE))
    data = sealed(writer, b"payload")
    reader = Keyring.open(tmp_path / "keys")  # another node: it must unwrap
    assert reader.decrypt(data, BE, associated=AD) == b"payload"
    assert reader.decrypt(data, ADMIN_ROLE, associated=AD) == b"payload"
    before = reader.sealing_stats()
    assert before["open_key_misses"] == 2  # one unwrap per role
    for node in (reader, writer):
        node.hold_in_memory(ADMIN_ROLE, admin)
        node.release(ADMIN_ROLE)
    assert reader.decrypt(data, BE, associated=AD) == b"payload"
    assert reader.sealing_stats()["open_key_misses"] == 2  # still unwrapped for BE
    assert reader.decrypt(data, ADMIN_ROLE, associated=AD) == b"payload"  # from its file
    assert reader.sealing_stats()["open_key_misses"] == 3  # admin's unwrap was dropped
    sealed(writer, b"more")
    assert writer.sealing_stats()["data_keys_issued"] == 1  # the writer kept its data key
