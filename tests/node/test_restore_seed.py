"""The founding keys of ``cluster up --restore`` (node.daemon.restore_seed): read from a
verified full backup made ``--with-keys``; anything else is refused before a write."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyrage import x25519

from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from node.daemon.restore_seed import founding_keys
from storage import backup_io
from storage.backup_io import BackupUnreadable
from storage.context_store import ContextStore, WriteRequest
from storage.errors import InvalidPayload
from storage.record import ContextRecord

ADDRESS = "ucxl://claude:backend_developer@chorus:seed/*^/a.md"


def _node(root: Path) -> tuple[ContextStore, x25519.Identity]:
    """A node with one version; its admin identity."""
    ContextStore.init(root, DEFAULT_ROLES)
    store = ContextStore.open(root)
    store.store_batch([WriteRequest(ADDRESS, ContextRecord.from_fields({"summary": "s"}))])
    return store, store.keyring.current_identity(ADMIN_ROLE)


def test_a_backup_with_keys_gives_every_role_identity_and_its_signer(tmp_path: Path) -> None:
    store, admin = _node(tmp_path / "node")
    with store:
        out = tmp_path / "full.slurp-backup.age"
        backup_io.create(store, out, cluster_id=store.keyring.node_id, with_keys=True)
        recipients = {r.name: store.keyring.recipient(r.name) for r in DEFAULT_ROLES}
        signer = store.keyring.signer.public_key
    found = founding_keys(out, [admin])
    assert found.admin_from == "backup"  # a node that still held admin.key
    assert {role: str(i.to_public()) for role, i in found.identities.items()} == recipients
    assert found.trusted_signers == (signer,)
    assert found.backup.manifest.counts["versions"] == 1


def test_the_admin_identity_comes_from_identity_when_the_backup_lacks_it(tmp_path: Path) -> None:
    store, admin = _node(tmp_path / "node")
    other = x25519.Identity.generate()
    with store:
        store.keyring.forget(ADMIN_ROLE)  # as on a cluster's leader: admin is split
        out = tmp_path / "full.slurp-backup.age"
        backup_io.create(store, out, cluster_id=store.keyring.node_id, with_keys=True,
                         recipients=[str(other.to_public())])  # fmt: skip
    with pytest.raises(InvalidPayload, match="no --identity is it") as refused:
        founding_keys(out, [other])
    assert refused.value.field == "identity"
    found = founding_keys(out, [other, admin])
    assert found.admin_from == "identity"
    assert str(found.identities[ADMIN_ROLE].to_public()) == str(admin.to_public())


def test_a_backup_without_keys_an_incremental_or_no_identity_is_refused(tmp_path: Path) -> None:
    store, admin = _node(tmp_path / "node")
    with store:
        plain = tmp_path / "plain.slurp-backup.age"
        backup_io.create(store, plain, cluster_id=store.keyring.node_id)
        incr = tmp_path / "incr.slurp-backup.age"
        backup_io.create(store, incr, cluster_id=store.keyring.node_id, since=plain,
                         with_keys=True)  # fmt: skip
    with pytest.raises(InvalidPayload, match="without --with-keys"):
        founding_keys(plain, [admin])
    with pytest.raises(InvalidPayload, match="incremental"):
        founding_keys(incr, [admin])
    with pytest.raises(InvalidPayload, match="needs --identity"):
        founding_keys(plain, [])
    with pytest.raises(BackupUnreadable, match="wrong key"):
        founding_keys(plain, [x25519.Identity.generate()])
