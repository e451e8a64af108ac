"""Shamir splitting of an age X25519 identity (the admin identity) with SLIP-39.

Owns: turning an ``AGE-SECRET-KEY-1...`` identity into SLIP-39 mnemonic shares and back
(ARCHITECTURE.md §5), and wrapping a single share for the node that holds it. All field
arithmetic is the ``shamir_mnemonic`` reference implementation's; this module only decodes
the identity's bech32 to its 32 raw bytes, validates, and maps errors.

Must not know: who holds which share, leadership or terms (the node layer decides who may
collect shares), storage, or any other slurp package.

Invariants:
- Shares are SLIP-39 mnemonics of a single group (group threshold 1); the printable
  recovery shares are the same strings, so break-glass recovery works with any SLIP-39 tool
  that is then given the 32 bytes to re-encode (see ``crypto.bech32``).
- No error message contains a share, a word of a share, a passphrase or key material.
- A rebuilt identity lives in a ``WipeableIdentity``; its raw bytes are in one bytearray
  that ``wipe()`` zeroes. Python cannot promise more: building a pyrage ``Identity`` needs
  the bech32 *string*, and ``shamir_mnemonic`` returns the secret as immutable ``bytes``;
  neither copy can be zeroed and both live until the garbage collector reuses their memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import pyrage
from pyrage import x25519
from shamir_mnemonic import MnemonicError, Share, generate_mnemonics
from shamir_mnemonic.shamir import ShareGroup, recover_ems
from shamir_mnemonic.share import ShareCommonParameters

from crypto import bech32
from crypto.errors import CryptoError, DecryptionError, ShamirError

IDENTITY_HRP = "age-secret-key-"
IDENTITY_BYTES = 32
MAX_SHARES = 16  # SLIP-39: member index and member threshold are 4-bit fields
ITERATION_EXPONENT = 1  # SLIP-39 passphrase PBKDF2: 4 rounds of 2500 << e iterations


@dataclass(frozen=True)
class SplitResult:
    """The outcome of ``split_identity``.

    Attributes:
        admin_recipient: The ``age1...`` recipient of the identity that was split; record it
            so a rebuilt identity can be checked (``combine_identity(expected_recipient=)``).
        threshold: How many shares rebuild the identity.
        shares: The SLIP-39 mnemonics, one per holder. Kept out of ``repr``.
    """

    admin_recipient: str
    threshold: int
    shares: tuple[str, ...] = field(repr=False)


def _identity_bytes(identity: str) -> bytearray:
    """The 32 raw bytes of an ``AGE-SECRET-KEY-1...`` string."""
    try:
        hrp, data = bech32.decode(identity.strip())
    except ValueError:
        raise ShamirError("not an age X25519 identity (bad bech32)") from None
    if hrp != IDENTITY_HRP or len(data) != IDENTITY_BYTES:
        raise ShamirError("not an age X25519 identity")
    return bytearray(data)


def _check_passphrase(passphrase: bytes) -> None:
    if not all(32 <= c <= 126 for c in passphrase):
        raise ShamirError("a SLIP-39 passphrase must be printable ASCII")


def split_identity(
    identity: str, threshold: int = 3, shares: int = 5, *, passphrase: bytes = b""
) -> SplitResult:
    """Split an age X25519 identity into SLIP-39 shares, any ``threshold`` of which rebuild it.

    Args:
        identity: The ``AGE-SECRET-KEY-1...`` string.
        threshold: Shares needed to rebuild; ``1 <= threshold <= shares``.
        shares: Shares to make; at most 16. SLIP-39 forbids ``threshold == 1`` with more
            than one share (every share would be the secret itself).
        passphrase: Optional printable-ASCII SLIP-39 passphrase; the same one is needed to
            rebuild (a wrong one rebuilds a *different* identity, caught by
            ``expected_recipient``).

    Returns:
        The shares and the identity's recipient.

    Raises:
        ShamirError: Bad threshold/share counts, passphrase, or identity string.
    """
    if not 1 <= threshold <= shares <= MAX_SHARES:
        raise ShamirError(f"need 1 <= threshold <= shares <= {MAX_SHARES}")
    if threshold == 1 and shares > 1:
        raise ShamirError("SLIP-39 does not allow a threshold of 1 with more than one share")
    _check_passphrase(passphrase)
    secret = _identity_bytes(identity)
    with WipeableIdentity(secret) as rebuilt:
        recipient = rebuilt.recipient()
        try:
            (group,) = generate_mnemonics(
                1,
                [(threshold, shares)],
                bytes(secret),
                passphrase,
                extendable=True,
                iteration_exponent=ITERATION_EXPONENT,
            )
        except ValueError:
            raise ShamirError("SLIP-39 refused the split parameters") from None
    return SplitResult(recipient, threshold, tuple(group))


def _parse_shares(mnemonics: Sequence[str]) -> list[Share]:
    """Parse each mnemonic, naming the first bad one by position only."""
    parsed = []
    for position, mnemonic in enumerate(mnemonics, start=1):
        try:
            parsed.append(Share.from_mnemonic(mnemonic))
        except MnemonicError:
            raise ShamirError(f"share {position} is corrupted (bad SLIP-39 checksum)") from None
    return parsed


def _distinct_members(shares: list[Share]) -> list[Share]:
    """One share per member index, after checking they all come from one split."""
    common: set[ShareCommonParameters] = {s.common_parameters() for s in shares}
    thresholds = {s.member_threshold for s in shares}
    if len(common) != 1 or len(thresholds) != 1:
        raise ShamirError("shares come from different splits (identifier mismatch)")
    if next(iter(common)).group_count != 1:
        raise ShamirError("multi-group SLIP-39 share sets are not supported")
    by_index: dict[int, Share] = {}
    for share in shares:
        seen = by_index.setdefault(share.index, share)
        if seen.value != share.value:
            raise ShamirError(f"two different shares claim member index {share.index}")
    return list(by_index.values())


def combine_identity(
    mnemonics: Sequence[str], *, expected_recipient: str | None = None, passphrase: bytes = b""
) -> WipeableIdentity:
    """Rebuild an identity from SLIP-39 shares.

    Args:
        mnemonics: At least ``threshold`` distinct shares of one split (more are ignored;
            exact duplicates count once).
        expected_recipient: If given, the rebuilt identity must have this recipient.
        passphrase: The passphrase given to ``split_identity``.

    Returns:
        The identity, in memory only; use it as a context manager so it is wiped.

    Raises:
        ShamirError: Too few shares ("need 3 shares, got 2"), a corrupted share, shares of
            different splits, or a recipient that differs from ``expected_recipient``.
    """
    if not mnemonics:
        raise ShamirError("no shares given")
    _check_passphrase(passphrase)
    members = _distinct_members(_parse_shares(mnemonics))
    threshold = members[0].member_threshold
    if len(members) < threshold:
        raise ShamirError(f"need {threshold} shares, got {len(members)}")
    group = ShareGroup()
    for share in members[:threshold]:
        group.add(share)
    try:
        ems = recover_ems({members[0].group_index: group})
        secret = bytearray(ems.decrypt(passphrase))
    except MnemonicError:
        raise ShamirError("shares do not combine: at least one is corrupted") from None
    if len(secret) != IDENTITY_BYTES:
        raise ShamirError("shares do not hold an age X25519 identity")
    rebuilt = WipeableIdentity(secret)
    if expected_recipient is not None and rebuilt.recipient() != expected_recipient:
        rebuilt.wipe()
        raise ShamirError(
            "rebuilt identity does not match the recorded recipient (wrong shares or passphrase)"
        )
    return rebuilt


class WipeableIdentity:
    """An age X25519 identity held in memory only, wiped on ``wipe()`` or context exit.

    The 32 secret bytes live in one bytearray that ``wipe()`` zeroes in place. What cannot be
    wiped: the bech32 string built to make the pyrage ``Identity`` (Python strings are
    immutable) and whatever pyrage's Rust side keeps (age's keys are believed to zeroize on
    drop, but this is not relied on). ``wipe()`` drops this object's reference to the pyrage
    ``Identity``; references a caller kept stay usable, so keep none past ``wipe()``.
    """

    def __init__(self, secret: bytearray) -> None:
        """Take ownership of ``secret`` (32 raw bytes); the caller must not keep it."""
        if len(secret) != IDENTITY_BYTES:
            raise ShamirError("an age X25519 identity has 32 bytes")
        self._secret: bytearray | None = secret
        self._identity: x25519.Identity | None = None

    def identity(self) -> x25519.Identity:
        """The pyrage identity (built once, then cached until ``wipe()``).

        Raises:
            CryptoError: The identity was wiped.
        """
        if self._secret is None:
            raise CryptoError("identity was wiped")
        if self._identity is None:
            text = bech32.encode(IDENTITY_HRP, bytes(self._secret)).upper()
            self._identity = x25519.Identity.from_str(text)
        return self._identity

    def recipient(self) -> str:
        """The identity's ``age1...`` recipient.

        Raises:
            CryptoError: The identity was wiped.
        """
        return str(self.identity().to_public())

    @property
    def wiped(self) -> bool:
        """Whether ``wipe()`` has run."""
        return self._secret is None

    def wipe(self) -> None:
        """Zero the secret bytes and refuse further use. Idempotent."""
        if self._secret is not None:
            for i in range(len(self._secret)):
                self._secret[i] = 0
        self._secret = None
        self._identity = None

    def __enter__(self) -> WipeableIdentity:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"WipeableIdentity(wiped={self.wiped})"


def encrypt_share_to(mnemonic: str, recipient: str) -> bytes:
    """Encrypt one share to a node's age recipient.

    Args:
        mnemonic: A SLIP-39 share from ``split_identity``.
        recipient: The holder node's ``age1...`` recipient.

    Returns:
        Binary age ciphertext; ``age -d -i node.key`` decrypts it to the mnemonic.

    Raises:
        ShamirError: ``mnemonic`` is not a valid SLIP-39 share.
        CryptoError: ``recipient`` is not an age X25519 recipient.
    """
    _parse_shares([mnemonic])
    try:
        parsed = x25519.Recipient.from_str(recipient)
    except pyrage.RecipientError:
        raise CryptoError("not an age X25519 recipient") from None
    return bytes(pyrage.encrypt(mnemonic.encode("utf-8"), [parsed]))


def decrypt_share(data: bytes, identity: x25519.Identity) -> str:
    """Decrypt a share made by ``encrypt_share_to``.

    Args:
        data: The age ciphertext.
        identity: The holder node's identity.

    Returns:
        The SLIP-39 mnemonic.

    Raises:
        DecryptionError: Any decryption failure (wrong identity, tampered or truncated data).
        ShamirError: The plaintext is not a valid SLIP-39 share.
    """
    try:
        mnemonic = bytes(pyrage.decrypt(data, [identity])).decode("utf-8")
    except (pyrage.DecryptError, UnicodeDecodeError):
        raise DecryptionError("cannot decrypt") from None
    _parse_shares([mnemonic])
    return mnemonic
