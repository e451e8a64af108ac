"""``slurp ca``: the cluster certificate authority (argument parsing and rendering only)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.table import Table

from cli import render
from cli.common import JsonOpt, run
from crypto.ca import CertificateAuthority
from crypto.certs import IssuedCert
from crypto.signing import private_key_from_pem
from storage.errors import InvalidPayload


class Usage(StrEnum):
    """What a certificate is checked for."""

    node = "node"
    client = "client"


app = typer.Typer(help="The cluster CA: node and client certificates.", no_args_is_help=True)
DirOpt = Annotated[Path, typer.Option("--dir", help="The CA directory (ca.crt, ca.key, ...).")]


def cert_json(cert: IssuedCert) -> dict[str, Any]:
    """JSON form of an issued certificate."""
    return {
        "name": cert.name,
        "kind": cert.kind,
        "serial": str(cert.serial),
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "fingerprint_sha256": cert.fingerprint_sha256,
        "roles": list(cert.roles),
        "hosts": list(cert.hosts),
        "revoked": cert.revoked,
    }


def _show(cert: IssuedCert, directory: Path, as_json: bool) -> None:
    if as_json:
        render.print_json(
            {
                **cert_json(cert),
                "cert": str(directory / f"{cert.name}.crt"),
                "key": str(directory / f"{cert.name}.key"),
            }
        )
    else:
        render.out.print(
            f"{cert.kind} certificate {cert.name}: {directory / (cert.name + '.crt')} "
            f"(sha256 {cert.fingerprint_sha256[:16]}…, until {cert.not_after:%Y-%m-%d})",
            markup=False,
        )


@app.command("init")
def init(
    directory: DirOpt,
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "slurp cluster CA",
    days: Annotated[int, typer.Option(help="Validity in days.")] = 3650,
    as_json: JsonOpt = False,
) -> None:
    """Create an Ed25519 CA: DIR/ca.crt, DIR/ca.key (0600) and an empty CRL."""
    ca = run(as_json, lambda: CertificateAuthority.init(directory, name=name, valid_days=days))
    if as_json:
        render.print_json({"dir": str(directory), "cert": str(directory / "ca.crt")})
    else:
        render.out.print(f"created CA {name!r} in {ca.directory}", markup=False)


@app.command("issue-node")
def issue_node(
    name: str,
    directory: DirOpt,
    host: Annotated[list[str], typer.Option("--host", help="DNS name or IP (repeatable).")],
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    signing_key: Annotated[
        Path | None,
        typer.Option(help="The node's keys/node.ed25519: certify it (needed to join a cluster)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a node certificate (server and client auth) for the given hosts."""
    ca = run(as_json, lambda: CertificateAuthority.open(directory))
    key = None if signing_key is None else run(as_json, lambda: _signing_key(signing_key))
    cert = run(as_json, lambda: ca.issue_node(name, host, valid_days=days, key=key))
    _show(cert, directory, as_json)


def _signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidPayload(f"cannot read {path}: {exc.strerror}", field="signing_key") from None
    return private_key_from_pem(data, str(path))


@app.command("issue-client")
def issue_client(
    name: str,
    directory: DirOpt,
    role: Annotated[list[str], typer.Option("--role", help="A role the client acts as.")],
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    as_json: JsonOpt = False,
) -> None:
    """Issue a client certificate carrying the client's roles."""
    ca = run(as_json, lambda: CertificateAuthority.open(directory))
    cert = run(as_json, lambda: ca.issue_client(name, role, valid_days=days))
    _show(cert, directory, as_json)


@app.command("list")
def list_certs(directory: DirOpt, as_json: JsonOpt = False) -> None:
    """Every certificate the CA issued, with revocation status."""
    ca = run(as_json, lambda: CertificateAuthority.open(directory))
    certs = run(as_json, ca.list)
    if as_json:
        render.print_json([cert_json(cert) for cert in certs])
        return
    table = Table("name", "kind", "serial", "until", "roles / hosts", "state")
    for cert in certs:
        table.add_row(
            cert.name, cert.kind, str(cert.serial)[:12], f"{cert.not_after:%Y-%m-%d}",
            ", ".join(cert.roles or cert.hosts), "revoked" if cert.revoked else "valid",
        )  # fmt: skip
    render.out.print(table)


@app.command("revoke")
def revoke(name_or_serial: str, directory: DirOpt, as_json: JsonOpt = False) -> None:
    """Revoke a certificate (by name or serial) and rewrite the CRL."""
    ca = run(as_json, lambda: CertificateAuthority.open(directory))
    cert = run(as_json, lambda: ca.revoke(name_or_serial))
    if as_json:
        render.print_json(cert_json(cert))
    else:
        render.out.print(f"revoked {cert.name} (serial {cert.serial})", markup=False)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidPayload(f"cannot read {path}: {exc.strerror}", field="cert_file") from None


@app.command("verify")
def verify(
    cert_file: Path,
    directory: DirOpt,
    usage: Annotated[Usage | None, typer.Option(help="node or client.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a certificate against this CA: signature, validity, revocation, usage."""
    ca = run(as_json, lambda: CertificateAuthority.open(directory))
    kind: Literal["node", "client"] | None = None if usage is None else usage.value
    cert = run(as_json, lambda: ca.verify(_read(cert_file), usage=kind))
    if as_json:
        render.print_json({**cert_json(cert), "valid": True})
    else:
        render.out.print(f"{cert_file}: valid {cert.kind} certificate {cert.name}", markup=False)
