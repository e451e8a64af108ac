"""Cluster-wide rotation, the storage side: the seal epoch and its convergence rule, the
keyring installing a given identity, re-sealing one context and stepping the walk."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pyrage
import pytest
from pyrage import x25519

from crypto.errors import KeyringError
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.seal_format import age_file_of
from storage.address import parse
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.errors import CorruptRecord
from storage.record import ContextRecord
from storage.replica import Replica
from storage.rotation import reseal_context, reseal_step, retire_old_version
from storage.schema import VERSION_PREFIX
from tests.storage.conftest import FakeClock

BE = "backend_developer"


def _address(i: int, role: str = BE) -> str:
    return f"ucxl://agent{i}:{role}@chorus:task{i % 3}/*^/src/file{i}.py"


@pytest.fixture
def pair(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[ContextStore, ContextStore]]:
    """Two stores sharing role identities and trusting each other's signing keys."""
    ContextStore.init(tmp_path / "a", DEFAULT_ROLES)
    a = ContextStore.open(tmp_path / "a", clock_ms=clock)
    identities = {r.name: a.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
    ContextStore.init(tmp_path / "b", DEFAULT_ROLES, role_identities=identities)
    b = ContextStore.open(tmp_path / "b", clock_ms=clock)
    a.trust_signer(b.keyring.signer.public_key)
    b.trust_signer(a.keyring.signer.public_key)
    yield a, b
    a.close()
    b.close()


def _rows(store: ContextStore) -> dict[bytes, Envelope]:
    return {k: Envelope.decode(v) for k, v in store.kv.scan(VERSION_PREFIX)}


def _install_everywhere(stores: tuple[ContextStore, ...], role: str) -> x25519.Identity:
    identity = x25519.Identity.generate()
    for store in stores:
        store.keyring.install_rotation(role, identity, 2)
    return identity


def _copy_all(src: ContextStore, dst: ContextStore) -> None:
    rows = [data for _, data in src.kv.scan(VERSION_PREFIX)]
    Replica(dst).apply(rows)


# -- the envelope's seal epoch ----------------------------------------------------------


def _env(store: ContextStore) -> Envelope:
    store.store(_address(1), ContextRecord.from_fields({"summary": "s"}))
    return next(iter(_rows(store).values()))


def test_a_written_version_keeps_schema_1_and_a_reseal_round_trips(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, _ = pair
    env = _env(a)
    assert env.seal_epoch == 0
    assert msgpack.unpackb(env.encode())[0] == 1  # schema 1: the pre-rotation bytes
    resealed = replace(env, seal_epoch=5).sealed(a.keyring.signer)
    decoded = Envelope.decode(resealed.encode())
    assert decoded == resealed
    decoded.check_signature()
    # the seal epoch is signed: changing it breaks the signature
    with pytest.raises(CorruptRecord):
        replace(decoded, seal_epoch=6).check_signature()


def test_the_convergence_rule_is_the_higher_seal_epoch(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    env = _env(pair[0])
    low, high = replace(env, seal_epoch=3), replace(env, seal_epoch=4)
    assert high.supersedes(low)
    assert high.supersedes(env)
    assert not low.supersedes(high)
    assert not low.supersedes(replace(env, seal_epoch=3, ciphertext=b"other"))  # equal: keep
    assert not env.supersedes(env)


def test_a_reseal_with_a_zero_seal_epoch_in_schema_2_is_refused(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    env = replace(_env(pair[0]), seal_epoch=1)
    data = bytearray(env.encode())
    row = Envelope.decode(bytes(data))
    assert row.seal_epoch == 1
    fields = msgpack.unpackb(bytes(data), raw=False)
    fields[-4] = 0
    with pytest.raises(CorruptRecord):
        Envelope.decode(msgpack.packb(fields, use_bin_type=True))


# -- the keyring installs a given identity ----------------------------------------------


def test_install_rotation_is_idempotent_and_checks_the_version(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, _ = pair
    identity = x25519.Identity.generate()
    installed = a.keyring.install_rotation(BE, identity, 2)
    assert installed.version == 2
    assert a.keyring.recipient(BE) == str(identity.to_public())
    assert a.keyring.rotation_in_progress(BE) is not None
    assert a.keyring.install_rotation(BE, identity, 2) == installed  # a retried install
    with pytest.raises(KeyringError):
        a.keyring.install_rotation(BE, identity, 3)
    with pytest.raises(KeyringError):  # another rotation is in progress
        a.keyring.install_rotation(BE, x25519.Identity.generate(), 3)
    other = x25519.Identity.generate()
    with pytest.raises(KeyringError):
        a.keyring.install_rotation("observer", other, 3)  # observer's next version is 2


def test_an_installed_identity_survives_a_reopen(tmp_path: Path, clock: FakeClock) -> None:
    ContextStore.init(tmp_path / "n", DEFAULT_ROLES)
    store = ContextStore.open(tmp_path / "n", clock_ms=clock)
    identity = x25519.Identity.generate()
    store.keyring.install_rotation(BE, identity, 2)
    store.close()
    store = ContextStore.open(tmp_path / "n", clock_ms=clock)
    try:
        assert store.keyring.current_identity(BE).to_public().__str__() == str(identity.to_public())
        assert store.keyring.rotation_in_progress(BE) is not None
    finally:
        store.close()


# -- re-sealing ------------------------------------------------------------------------


def test_reseal_context_rewrites_rows_signed_by_a_trusted_peer(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, b = pair
    a.store(_address(1), ContextRecord.from_fields({"summary": "one"}))
    a.store(_address(1), ContextRecord.from_fields({"summary": "two"}))
    a.store(_address(2, "observer"), ContextRecord.from_fields({"summary": "not BE's"}))
    _copy_all(a, b)  # b holds rows signed by a
    identity = _install_everywhere((a, b), BE)
    ctx = parse(_address(1)).context()
    rewritten, skipped = reseal_context(
        b, ctx, BE, 2, trusted=lambda key: key == a.keyring.signer.public_key
    )
    assert (rewritten, skipped) == (2, 0)
    for env in (e for e in _rows(b).values() if e.context == ctx.canonical()):
        env.check_signature()
        assert env.signer == b.keyring.signer.public_key
        assert env.seal_epoch > 0
        pyrage.decrypt(age_file_of(env.ciphertext), [identity])
    # an untrusted signer's rows are never re-signed
    c_rewritten, c_skipped = reseal_context(a, ctx, BE, 2, trusted=lambda key: False)
    assert (c_rewritten, c_skipped) == (2, 0)  # a's own rows: always re-sealable
    again = reseal_context(b, ctx, BE, 2, trusted=lambda key: False)
    assert again == (0, 0)  # b's copies now open with the new key: nothing to do


def test_replicas_converge_on_the_reseal_and_never_take_the_old_copy_back(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, b = pair
    a.store(_address(1), ContextRecord.from_fields({"summary": "one"}))
    old_rows = [data for _, data in a.kv.scan(VERSION_PREFIX)]
    _copy_all(a, b)
    identity = _install_everywhere((a, b), BE)
    report = reseal_step(a, BE, 2, trusted=lambda key: True)
    assert report.done
    assert report.rewritten == 1
    # b holds the old copy: the re-seal arriving from a replaces it
    _copy_all(a, b)
    (b_env,) = _rows(b).values()
    assert b_env.seal_epoch > 0
    pyrage.decrypt(age_file_of(b_env.ciphertext), [identity])
    # the old copy arriving again (a lagging replica, a hint) is not taken back
    flags, _ = Replica(b).apply(old_rows)
    assert flags == [False]
    (still,) = _rows(b).values()
    assert still == b_env
    assert b.retrieve(_address(1), as_role=BE).summary == "one"


def test_reseal_step_resumes_from_its_cursor_and_retirement_deletes_the_old_key(
    pair: tuple[ContextStore, ContextStore], clock: FakeClock
) -> None:
    a, b = pair
    for i in range(12):
        a.store(_address(i), ContextRecord.from_fields({"summary": f"s{i}"}))
        clock.advance(10)
    clock.advance(120_000)
    _copy_all(a, b)
    identity = _install_everywhere((a, b), BE)
    first = reseal_step(b, BE, 2, trusted=lambda key: True, batch_size=5, max_batches=1)
    assert not first.done
    assert first.scanned == 5
    assert first.total == 12
    second = reseal_step(b, BE, 2, trusted=lambda key: True, batch_size=5)
    assert second.done
    assert second.scanned == 12
    assert second.rewritten == 7
    assert reseal_step(b, BE, 2, trusted=lambda key: True).rewritten == 0  # asked again
    for env in _rows(b).values():
        pyrage.decrypt(age_file_of(env.ciphertext), [identity])
    old_file = b.keyring.keys_dir / f"{BE}.v1.key"
    assert old_file.exists()
    assert retire_old_version(b, BE, 1) is True
    assert not old_file.exists()
    assert retire_old_version(b, BE, 1) is False  # idempotent
    assert b.retrieve(_address(3), as_role=BE).summary == "s3"
    with pytest.raises(KeyringError):
        reseal_step(b, BE, 2, trusted=lambda key: True)  # no rotation in progress any more


def test_admin_rotation_seals_every_row(pair: tuple[ContextStore, ContextStore]) -> None:
    a, _ = pair
    a.store(_address(1, "observer"), ContextRecord.from_fields({"summary": "o"}))
    identity = x25519.Identity.generate()
    a.keyring.install_rotation(ADMIN_ROLE, identity, 2)
    assert reseal_step(a, ADMIN_ROLE, 2, trusted=lambda key: False).rewritten == 1
    (env,) = _rows(a).values()
    pyrage.decrypt(age_file_of(env.ciphertext), [identity])
