"""The admin identity around a Shamir split: split, forget, rebuild (ARCHITECTURE.md §5).

Owns the node-side procedure: splitting the admin role's identity into SLIP-39 shares
(``crypto.shamir``), writing shares age-encrypted to holders, keeping this node's own share
(``keys/admin.share.age``, encrypted to the node's identity; after the cluster re-shared
the admin key, ``keys/admin.share.<epoch>.age``: ``share_file``), forgetting the identity, and
rebuilding it in memory for one operation. Records the split (threshold, share count,
admin recipient, time) in LevelDB meta ``m/admin_split``. Every step is audited.

Invariant: a rebuilt identity is checked against the admin recipient on record, lives in
memory only, and is wiped (and released from the keyring) when the operation ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from pyrage import x25519

from crypto.errors import DecryptionError, ShamirError
from crypto.keyfiles import write_secret_file
from crypto.roles import ADMIN_ROLE
from crypto.shamir import (
    WipeableIdentity,
    combine_identity,
    decrypt_share,
    encrypt_share_to,
    split_identity,
)
from storage.context_store import ContextStore
from storage.errors import InvalidPayload

META_ADMIN_SPLIT = b"m/admin_split"
OWN_SHARE_FILE = "admin.share.age"  # epoch 0: the split ``cluster up`` / ``keys split`` made
_SHARE_PREFIX, _SHARE_SUFFIX = "admin.share.", ".age"


def share_file(epoch: int) -> str:
    """The name of this node's own share file of custody ``epoch`` (under ``keys/``)."""
    return OWN_SHARE_FILE if epoch == 0 else f"{_SHARE_PREFIX}{epoch}{_SHARE_SUFFIX}"


def share_epoch(name: str) -> int | None:
    """The custody epoch of share file ``name`` (None: not a share file name)."""
    if name == OWN_SHARE_FILE:
        return 0
    middle = name.removeprefix(_SHARE_PREFIX).removesuffix(_SHARE_SUFFIX)
    if len(middle) + len(_SHARE_PREFIX) + len(_SHARE_SUFFIX) != len(name):
        return None
    if not middle.isdigit() or middle.startswith("0") or not middle.isascii():
        return None
    return int(middle)


def share_epochs(keys_dir: Path) -> dict[int, Path]:
    """epoch -> path of every own share file in ``keys_dir``."""
    found = {}
    for path in keys_dir.iterdir():
        epoch = share_epoch(path.name)
        if epoch is not None:
            found[epoch] = path
    return found


@dataclass(frozen=True)
class SplitOutcome:
    """What ``split_admin`` did."""

    admin_recipient: str
    threshold: int
    shares: tuple[str, ...]
    files: tuple[str, ...]
    forgot_admin: bool

    def to_json(self) -> dict[str, Any]:
        """``{"admin_recipient", "shares", "threshold", "files", "forgot_admin"}``."""
        return {
            "admin_recipient": self.admin_recipient,
            "threshold": self.threshold,
            "shares": list(self.shares),
            "files": list(self.files),
            "forgot_admin": self.forgot_admin,
        }


def split_admin(
    store: ContextStore,
    *,
    threshold: int,
    shares: int,
    to: Sequence[str] = (),
    out_dir: Path | None = None,
    forget: bool = False,
) -> SplitOutcome:
    """Split the admin identity; optionally encrypt shares to holders and forget it.

    Args:
        store: the open node.
        threshold: shares needed to rebuild.
        shares: shares made.
        to: one ``age1...`` recipient per share (empty: no share files are written).
        out_dir: where share files go (default ``DATA_DIR/backups/admin-shares``).
        forget: delete ``keys/admin.key`` afterwards, keeping share 1 for this node.

    Raises:
        InvalidPayload: ``to`` does not name one recipient per share.
        KeyringError, ShamirError: the identity is not held, or bad threshold/shares.
    """
    keyring = store.keyring
    identity = keyring.current_identity(ADMIN_ROLE)
    if to and len(to) != shares:
        raise InvalidPayload(f"--to must name one recipient per share ({shares})", field="to")
    result = split_identity(str(identity), threshold, shares)
    files: list[str] = []
    if to:
        target = out_dir or store.data_dir.backups / "admin-shares"
        target.mkdir(parents=True, exist_ok=True)
        for number, (mnemonic, recipient) in enumerate(zip(result.shares, to, strict=True), 1):
            path = target / f"share-{number}.age"
            path.unlink(missing_ok=True)
            write_secret_file(path, encrypt_share_to(mnemonic, recipient))
            files.append(str(path))
    if forget:
        own = keyring.keys_dir / OWN_SHARE_FILE
        own.unlink(missing_ok=True)
        write_secret_file(own, encrypt_share_to(result.shares[0], keyring.node_recipient))
        keyring.forget(ADMIN_ROLE)
    record = {
        "threshold": threshold,
        "shares": shares,
        "admin_recipient": result.admin_recipient,
        "split_ms": store.clock_ms(),
        "forgot_admin": forget,
    }
    store.kv.write([(META_ADMIN_SPLIT, msgpack.packb(record))], sync=True)
    store.audit_event("keys.split", None, "ok")
    return SplitOutcome(result.admin_recipient, threshold, result.shares, tuple(files), forget)


def gather_shares(
    store: ContextStore,
    mnemonics: Sequence[str],
    share_files: Sequence[Path],
    identities: Sequence[x25519.Identity],
) -> list[str]:
    """Mnemonics from text, from age-encrypted share files, and this node's own share (of
    the newest custody epoch it has a file of).

    Share files are decrypted with this node's identity or any of ``identities``.

    Raises:
        InvalidPayload: a share file cannot be read.
        ShamirError: a share file no key opens, or that does not hold a share.
    """
    keys = [store.keyring.node_identity(), *identities]
    found = [line.strip() for line in mnemonics if line.strip()]
    own_files = share_epochs(store.keyring.keys_dir)  # the newest epoch's (see docs/control.md)
    own = [own_files[max(own_files)]] if own_files else []
    for path in [*share_files, *own]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidPayload(
                f"cannot read share file {path}: {exc.strerror}", field="share_file"
            ) from None
        found.append(_decrypt_with_any(path, data, keys))
    return found


def _decrypt_with_any(path: Path, data: bytes, keys: Sequence[x25519.Identity]) -> str:
    """The share in ``data``; ShamirError if no key opens it (wrong holder, or corrupted)."""
    for key in keys:
        try:
            return decrypt_share(data, key)
        except DecryptionError:
            continue
    raise ShamirError(
        f"share file {path} does not open with this node's identity or any --identity given "
        "(another holder's file, or corrupted)"
    )


def combine_admin(store: ContextStore, mnemonics: Sequence[str]) -> WipeableIdentity:
    """Rebuild the admin identity from shares, checked against the recipient on record.

    Raises:
        ShamirError: too few, corrupted or mixed shares, or a mismatch.
    """
    try:
        rebuilt = combine_identity(
            mnemonics, expected_recipient=store.keyring.recipient(ADMIN_ROLE)
        )
    except Exception:
        store.audit_event("keys.combine", None, "failed")
        raise
    store.audit_event("keys.combine", None, "ok")
    return rebuilt


@contextmanager
def admin_in_memory(store: ContextStore, mnemonics: Sequence[str]) -> Iterator[None]:
    """Hold the rebuilt admin identity for the duration of the block, then wipe it."""
    with combine_admin(store, mnemonics) as rebuilt:
        store.keyring.hold_in_memory(ADMIN_ROLE, rebuilt.identity())
        try:
            yield
        finally:
            store.keyring.release(ADMIN_ROLE)


def split_record(store: ContextStore) -> dict[str, Any] | None:
    """The recorded split, if any."""
    data = store.kv.get(META_ADMIN_SPLIT)
    if data is None:
        return None
    record = msgpack.unpackb(data, raw=False)
    return record if isinstance(record, dict) else None
