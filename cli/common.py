"""What every ``slurp`` command module shares: global options, error reporting, opening.

Errors go to stderr as ``CODE: message``; exit 2 for bad input (4xx codes), 1 otherwise;
with ``--json`` the error is also printed on stdout as ``{"error": {code, message, field}}``.

Two modes: embedded (the data directory is opened by this process: ``opened``) and remote
(``--node``/``--profile``: a running node, through the client SDK). The data commands
take a ``backend`` and work in both; everything else is embedded-only and, in remote
mode, ``run`` and ``opened`` refuse it with ``UCXL-400-INVALID_PAYLOAD`` (field ``node``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer

from cli import render
from cli.backend import Backend, EmbeddedBackend, RemoteOptions, connect
from crypto.errors import CertificateError, CryptoError, KeyringError, ShamirError
from storage.context_store import ContextStore
from storage.errors import InvalidPayload, StorageError

T = TypeVar("T")
# exit status 2: the caller asked for something wrong (bad input, forbidden, not there);
# exit status 1: everything else (in use, keyring unusable, corrupt data, bugs)
BAD_INPUT_STATUSES = frozenset({400, 403, 404})
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


class State:
    """Options given before the command (set afresh by every invocation)."""

    data_dir: Path = Path()
    remote: RemoteOptions = RemoteOptions()
    refused: str | None = None  # an embedded-only command, run with remote options


STATE = State()


class CliError(StorageError):
    """A crypto-layer failure reported with a UCXL-style code."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, code=code)


def fail(exc: StorageError, as_json: bool) -> NoReturn:
    """Report ``exc`` the documented way and exit."""
    if as_json:
        render.print_json({"error": exc.to_dict()})
    print(f"{exc.code}: {exc.message}", file=sys.stderr)
    raise typer.Exit(2 if exc.status in BAD_INPUT_STATUSES else 1)


def translate(exc: CryptoError) -> StorageError:
    """The UCXL-style error for a crypto-layer failure."""
    if isinstance(exc, CertificateError):
        return CliError(f"UCXL-400-CERTIFICATE_{exc.reason.upper().replace('-', '_')}", str(exc))
    if isinstance(exc, ShamirError):
        return CliError("UCXL-400-SHARES_INVALID", str(exc), field="shares")
    if isinstance(exc, KeyringError):
        return InvalidPayload(str(exc), field="keys")
    return CliError("UCXL-500-CRYPTO", str(exc))


def embedded_only(what: str) -> InvalidPayload:
    """The error for an embedded-only command (``what``) run with --node or --profile."""
    return InvalidPayload(
        f"`slurp {what}` works on a local data directory only; "
        "it cannot be used with --node or --profile",
        field="node",
    )


def run(as_json: bool, action: Callable[[], T]) -> T:
    """Run ``action``, turning expected errors into the documented output.

    An embedded-only command run in remote mode fails here, before its first action.
    """
    if STATE.refused is not None:
        fail(embedded_only(STATE.refused), as_json)
    try:
        return action()
    except StorageError as exc:
        fail(exc, as_json)
    except CryptoError as exc:
        fail(translate(exc), as_json)


PASSPHRASE_ENV = "SLURP_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


def passphrase_source() -> str | Callable[[], str]:
    """``$SLURP_PASSPHRASE``, else a prompt on the terminal (asked only if a key is sealed)."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        return value

    def ask() -> str:
        if not sys.stdin.isatty():
            raise KeyringError(
                f"the keyring is passphrase-protected: set {PASSPHRASE_ENV} or run in a terminal"
            )
        return str(typer.prompt("keyring passphrase", hide_input=True))

    return ask


@contextmanager
def opened(as_json: bool, what: str | None = None) -> Iterator[ContextStore]:
    """The ContextStore of the data directory, closed afterwards (embedded mode only).

    ``what`` names the command in the error when remote options were given.
    """
    if STATE.remote.given:
        fail(embedded_only(what or STATE.refused or "this command"), as_json)
    source = passphrase_source()
    store = run(as_json, lambda: ContextStore.open(STATE.data_dir, passphrase=source))
    try:
        yield store
    finally:
        store.close()


@contextmanager
def backend(as_json: bool) -> Iterator[Backend]:
    """Where data commands go: the node of --node/--profile, else the data directory."""
    if not STATE.remote.given:
        with opened(as_json) as store:
            yield EmbeddedBackend(store)
        return
    remote = run(as_json, lambda: connect(STATE.remote))
    try:
        yield remote
    finally:
        remote.close()
