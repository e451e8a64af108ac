"""storage.admin_key: the names of a node's own admin share files, one per custody epoch."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.shamir import combine_identity, encrypt_share_to, split_identity
from storage.admin_key import (
    OWN_SHARE_FILE,
    gather_shares,
    share_epoch,
    share_epochs,
    share_file,
)
from storage.context_store import ContextStore


def test_epoch_0_keeps_the_name_existing_data_directories_have() -> None:
    assert share_file(0) == OWN_SHARE_FILE == "admin.share.age"
    assert share_file(7) == "admin.share.7.age"
    for epoch in (0, 1, 12, 2**40):
        assert share_epoch(share_file(epoch)) == epoch


@pytest.mark.parametrize(
    "name",
    ["admin.share.01.age", "admin.share..age", "admin.share.x.age", "admin.share.1.age.tmp",
     "admin.share.-1.age", "admin.share.١.age", "admin.key", "xadmin.share.1.age"],
)  # fmt: skip
def test_other_names_are_not_share_files(name: str) -> None:
    assert share_epoch(name) is None


def test_share_epochs_lists_the_share_files_only(tmp_path: Path) -> None:
    for name in ("admin.share.age", "admin.share.3.age", "admin.share.3.age.tmp", "node.key"):
        (tmp_path / name).write_bytes(b"x")
    assert share_epochs(tmp_path) == {0: tmp_path / OWN_SHARE_FILE, 3: tmp_path / share_file(3)}


def test_keys_combine_takes_the_newest_epochs_own_share(tmp_path: Path) -> None:
    ContextStore.init(tmp_path / "d", DEFAULT_ROLES)
    with ContextStore.open(tmp_path / "d") as store:
        keyring = store.keyring
        admin = str(keyring.current_identity(ADMIN_ROLE))
        old = split_identity(admin, 2, 2).shares
        new = split_identity(admin, 2, 2).shares
        (keyring.keys_dir / share_file(0)).write_bytes(
            encrypt_share_to(old[0], keyring.node_recipient)
        )
        (keyring.keys_dir / share_file(2)).write_bytes(
            encrypt_share_to(new[0], keyring.node_recipient)
        )
        found = gather_shares(store, [new[1]], [], [])
        assert found == [new[1], new[0]]
        with combine_identity(found, expected_recipient=keyring.recipient(ADMIN_ROLE)):
            pass
