"""The secret files of a ``keys/`` directory: format, permissions, atomic writes, sealing.

Owns how one secret file sits on disk. A file is either *plain* (an identity file in
``age-keygen``'s format, a PKCS#8 PEM key, JSON) or *sealed*: the ASCII-armored age
passphrase encryption (scrypt) of the plain bytes. A sealed identity file therefore opens
with the standard tools: ``age -d keys/x.key`` prints the plain identity file after asking
for the passphrase, and age >= 1.1 accepts it directly as ``age -d -i keys/x.key``.

Cost: age's scrypt work factor is not chosen by the caller; rage calibrates it when it
encrypts (about one second of scrypt on the sealing machine, log2 N = 18 or 19 here), and
every unseal pays the same. So files are unsealed lazily, one at a time, and the plain
bytes are kept in memory for the life of the ``SecretFiles`` object.

Must not know about roles, key versions or ``keyring.json`` (``crypto.keyring`` does).
Invariants: every file is created 0600 and checked to be no looser before it is read; a
replaced file is written to a temporary name, fsynced and renamed (then the directory is
fsynced), so a crash leaves the old or the new file, never a torn one. No error message
contains a passphrase or plain bytes.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyrage
from pyrage import x25519

from crypto.errors import KeyringError

SECRET_MODE = 0o600
ARMOR_BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
TMP_SUFFIX = ".tmp"
PassphraseSource = str | Callable[[], str]


def identity_file_text(identity: x25519.Identity, created_at: str) -> str:
    """An identity file in ``age-keygen``'s format."""
    return f"# created: {created_at}\n# public key: {identity.to_public()}\n{identity}\n"


def parse_identity(text: str, where: str) -> x25519.Identity:
    """The one age X25519 identity in identity-file text (comments allowed).

    Raises:
        KeyringError: not exactly one well-formed identity (``where`` names the file).
    """
    lines = text.splitlines()
    secrets = [line.strip() for line in lines if line.strip().startswith("AGE-SECRET-KEY-")]
    if len(secrets) != 1:
        raise KeyringError(f"{where} does not hold exactly one age X25519 identity")
    try:
        return x25519.Identity.from_str(secrets[0])
    except pyrage.IdentityError:
        raise KeyringError(f"{where} holds a malformed age identity") from None


def check_secret_mode(path: Path) -> None:
    """Refuse a secret file that group or others may read or write.

    Raises:
        KeyringError: the file is missing or its permissions are looser than 0600.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise KeyringError(f"missing key file {path}") from None
    if mode & 0o077:
        raise KeyringError(
            f"key file {path} has permissions {mode:04o}; it must be 0600 (chmod 600 {path})"
        )


def write_secret_file(path: Path, data: str | bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data`` (refuses to overwrite)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())


def replace_secret_file(path: Path, data: bytes) -> None:
    """Atomically create or replace ``path`` (0600): tmp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    write_secret_file(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` is an armored age file (a sealed secret file)."""
    return data.lstrip().startswith(ARMOR_BEGIN)


def seal(plain: bytes, passphrase: str) -> bytes:
    """The armored age passphrase encryption of ``plain`` (one scrypt, about a second)."""
    return bytes(pyrage.passphrase.encrypt(plain, passphrase, armored=True))


UNSEAL_ATTEMPTS = 3
UNSEAL_RETRY_PAUSE_S = 1.0


def unseal(sealed: bytes, passphrase: str, where: str) -> bytes:
    """Undo ``seal`` (one scrypt).

    rage picks the scrypt work factor when it seals, by timing the machine, and when it
    opens a file it refuses work factors far above what it measures *then* (a guard
    against files that would take hours). A file sealed on an idle machine can therefore
    be refused on a busy one; the refusal is the same error as a wrong passphrase, so a
    failure is retried (``UNSEAL_ATTEMPTS``) after a pause. A wrong passphrase costs
    those attempts before it is reported.

    Raises:
        KeyringError: the passphrase is wrong or the file is damaged (one opaque error).
    """
    for attempt in range(UNSEAL_ATTEMPTS):
        try:
            return bytes(pyrage.passphrase.decrypt(sealed, passphrase))
        except pyrage.DecryptError:
            if attempt + 1 < UNSEAL_ATTEMPTS:
                time.sleep(UNSEAL_RETRY_PAUSE_S)
    raise KeyringError(f"cannot unlock {where}: wrong passphrase or damaged file")


class Passphrase:
    """A keyring passphrase, given as text or as a callable asked once, when first needed."""

    def __init__(self, source: PassphraseSource) -> None:
        self._source = source
        self._value: str | None = source if isinstance(source, str) else None
        if self._value is not None:
            _check_passphrase(self._value)

    def get(self) -> str:
        """The passphrase (calls the callable the first time only).

        Raises:
            KeyringError: it is empty or not text.
        """
        if self._value is None:
            assert callable(self._source)
            self._value = _check_passphrase(self._source())
        return self._value


def _check_passphrase(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise KeyringError("the keyring passphrase must be a non-empty string")
    return value


class SecretFiles:
    """The secret files of one directory, read through an optional passphrase, cached.

    Thread-safe: a file is unsealed at most once even when several threads ask for it.
    """

    def __init__(self, root: Path, passphrase: Passphrase | None) -> None:
        self.root = root
        self.passphrase = passphrase
        self._plain: dict[str, bytes] = {}
        self._lock = threading.RLock()

    def path(self, name: str) -> Path:
        """The path of the file called ``name``."""
        return self.root / name

    def exists(self, name: str) -> bool:
        """Whether the file exists."""
        return self.path(name).exists()

    def sealed_on_disk(self, name: str) -> bool:
        """Whether the file on disk is sealed (checks its permissions first).

        Raises:
            KeyringError: missing or too loosely permitted.
        """
        path = self.path(name)
        check_secret_mode(path)
        return is_sealed(path.read_bytes())

    def read(self, name: str) -> bytes:
        """The plain bytes of a file, unsealing it (once) if it is sealed.

        Raises:
            KeyringError: missing, too loosely permitted, sealed without a passphrase
                here, or the passphrase does not open it.
        """
        with self._lock:
            found = self._plain.get(name)
            if found is not None:
                return found
            path = self.path(name)
            check_secret_mode(path)
            data = path.read_bytes()
            if is_sealed(data):
                if self.passphrase is None:
                    raise KeyringError(
                        f"{path} is passphrase-protected: set SLURP_PASSPHRASE or pass --passphrase"
                    )
                data = unseal(data, self.passphrase.get(), str(path))
            self._plain[name] = data
            return data

    def write(self, name: str, plain: bytes, *, sealed: bool, exclusive: bool = False) -> None:
        """Write ``plain`` (sealed with the passphrase when ``sealed``), atomically.

        ``exclusive`` refuses to replace an existing file.

        Raises:
            KeyringError: ``sealed`` without a passphrase.
        """
        with self._lock:
            data = plain
            if sealed:
                if self.passphrase is None:
                    raise KeyringError("sealing a key file needs the keyring passphrase")
                data = seal(plain, self.passphrase.get())
            if exclusive:
                write_secret_file(self.path(name), data)
                fsync_dir(self.root)
            else:
                replace_secret_file(self.path(name), data)
            self._plain[name] = plain

    def reseal(self, name: str, *, sealed: bool) -> bool:
        """Rewrite one file sealed or plain; False when it already was (no scrypt then).

        Raises:
            KeyringError: as ``read`` and ``write``.
        """
        with self._lock:
            if self.sealed_on_disk(name) == sealed:
                if sealed:
                    self.read(name)  # an earlier, interrupted run: prove it is our passphrase
                return False
            self.write(name, self.read(name), sealed=sealed)
            return True

    def link(self, source: str, target: str) -> None:
        """Make ``target`` a second name of ``source`` (atomic; replaces ``target``)."""
        with self._lock:
            tmp = self.path(target + TMP_SUFFIX)
            tmp.unlink(missing_ok=True)
            os.link(self.path(source), tmp)
            os.replace(tmp, self.path(target))
            fsync_dir(self.root)
            if source in self._plain:
                self._plain[target] = self._plain[source]

    def rename(self, source: str, target: str) -> None:
        """Atomically rename ``source`` onto ``target``.

        When both are names of the same file, ``rename(2)`` does nothing; ``source`` is
        then removed instead, which leaves the same result.
        """
        with self._lock:
            src, dst = self.path(source), self.path(target)
            if dst.exists() and os.path.samefile(src, dst):
                src.unlink()
            else:
                os.replace(src, dst)
            fsync_dir(self.root)
            found = self._plain.pop(source, None)
            if found is None:
                self._plain.pop(target, None)
            else:
                self._plain[target] = found

    def remove(self, name: str) -> None:
        """Delete a file (no error when it is already gone) and forget its plain bytes."""
        with self._lock:
            self._plain.pop(name, None)
            self.path(name).unlink(missing_ok=True)
            fsync_dir(self.root)
