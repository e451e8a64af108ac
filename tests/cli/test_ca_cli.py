"""``slurp ca``: init, issue node and client certificates, list, revoke, verify.

Every failure of ``ca verify`` names its reason in the code,
``UCXL-400-CERTIFICATE_<REASON>``; the certificates are plain X.509 that ``openssl`` reads.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crypto.certs import ROLES_OID
from tests.cli.conftest import Slurp

REVOKED = "UCXL-400-CERTIFICATE_REVOKED"
WRONG_USAGE = "UCXL-400-CERTIFICATE_WRONG_USAGE"
FOREIGN_CA = "UCXL-400-CERTIFICATE_FOREIGN_CA"
MALFORMED = "UCXL-400-CERTIFICATE_MALFORMED"
EXISTS = "UCXL-400-CERTIFICATE_EXISTS"
UNKNOWN = "UCXL-400-CERTIFICATE_UNKNOWN"
MISSING = "UCXL-400-CERTIFICATE_MISSING"
IS_CA = "UCXL-400-CERTIFICATE_IS_CA"
INVALID_PAYLOAD = "UCXL-400-INVALID_PAYLOAD"
CERT_FIELDS = {
    "name",
    "kind",
    "serial",
    "not_before",
    "not_after",
    "fingerprint_sha256",
    "roles",
    "hosts",
    "revoked",
}
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def cli(tmp_path: Path) -> Slurp:
    """The CLI (``ca`` commands use no data directory)."""
    return Slurp(tmp_path / "no-node", CliRunner())


@pytest.fixture
def ca_dir(cli: Slurp, tmp_path: Path) -> Path:
    """An initialised CA with node ``node-1`` and client ``alice``."""
    directory = tmp_path / "ca"
    cli.json("ca", "init", "--dir", str(directory))
    cli.json(
        "ca", "issue-node", "node-1", "--dir", str(directory),
        "--host", "node1.example", "--host", "10.0.0.7",
    )  # fmt: skip
    cli.json(
        "ca", "issue-client", "alice", "--dir", str(directory),
        "--role", "backend_developer", "--role", "observer",
    )  # fmt: skip
    return directory


def test_init_creates_the_ca_files(cli: Slurp, tmp_path: Path) -> None:
    directory = tmp_path / "fresh"
    assert cli.json("ca", "init", "--dir", str(directory)) == {
        "dir": str(directory),
        "cert": str(directory / "ca.crt"),
    }
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert (directory / "ca.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (directory / "ca.crl").read_text().startswith("-----BEGIN X509 CRL-----")
    (ca,) = cli.json("ca", "list", "--dir", str(directory))
    assert (ca["kind"], ca["name"], ca["revoked"]) == ("ca", "slurp cluster CA", False)

    before = (directory / "ca.key").read_bytes()
    cli.error("ca", "init", "--dir", str(directory), code=EXISTS, exit_code=2)
    assert (directory / "ca.key").read_bytes() == before


def test_init_text_output_and_custom_name(cli: Slurp, tmp_path: Path) -> None:
    directory = tmp_path / "named"
    out = cli.ok("ca", "init", "--dir", str(directory), "--name", "test CA").stdout
    assert out == f"created CA 'test CA' in {directory}\n"
    assert cli.json("ca", "list", "--dir", str(directory))[0]["name"] == "test CA"


def test_issue_node_and_client(cli: Slurp, tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    cli.json("ca", "init", "--dir", str(directory))
    node = cli.json(
        "ca", "issue-node", "node-1", "--dir", str(directory),
        "--host", "node1.example", "--host", "10.0.0.7", "--days", "30",
    )  # fmt: skip
    assert set(node) == {*CERT_FIELDS, "cert", "key"}
    assert (node["name"], node["kind"], node["revoked"]) == ("node-1", "node", False)
    assert node["hosts"] == ["node1.example", "10.0.0.7"]
    assert node["roles"] == []
    assert node["serial"].isdigit()
    assert len(node["fingerprint_sha256"]) == 64
    assert node["not_before"] < node["not_after"]
    assert (node["cert"], node["key"]) == (
        str(directory / "node-1.crt"),
        str(directory / "node-1.key"),
    )
    assert stat.S_IMODE((directory / "node-1.key").stat().st_mode) == 0o600

    client = cli.json(
        "ca", "issue-client", "alice", "--dir", str(directory),
        "--role", "backend_developer", "--role", "observer", "--role", "observer",
    )  # fmt: skip
    assert (client["name"], client["kind"]) == ("alice", "client")
    assert client["roles"] == ["backend_developer", "observer"]
    assert client["hosts"] == []
    assert client["serial"] != node["serial"]

    out = cli.ok("ca", "issue-client", "bob", "--dir", str(directory), "--role", "x").stdout
    assert out.startswith(f"client certificate bob: {directory / 'bob.crt'} (sha256 ")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["issue-node", "node-1", "--host", "other.example"], EXISTS),
        (["issue-client", "alice", "--role", "observer"], EXISTS),
        (["issue-node", "ca", "--host", "h.example"], "UCXL-400-CERTIFICATE_BAD_NAME"),
        (["issue-node", "bad/name", "--host", "h.example"], "UCXL-400-CERTIFICATE_BAD_NAME"),
        (["issue-node", "n2", "--host", "not a host"], "UCXL-400-CERTIFICATE_BAD_HOST"),
        (["issue-client", "c2", "--role", "bad role"], "UCXL-400-CERTIFICATE_BAD_ROLE"),
    ],
    ids=["node-exists", "client-exists", "name-ca", "name-slash", "bad-host", "bad-role"],
)
def test_issue_refuses_bad_requests(cli: Slurp, ca_dir: Path, args: list[str], code: str) -> None:
    before = sorted(p.name for p in ca_dir.iterdir())
    cli.error("ca", *args, "--dir", str(ca_dir), code=code, exit_code=2)
    assert sorted(p.name for p in ca_dir.iterdir()) == before


def test_commands_on_a_directory_without_a_ca(cli: Slurp, tmp_path: Path) -> None:
    empty = str(tmp_path / "empty")
    cli.error("ca", "list", "--dir", empty, code=MISSING, exit_code=2)
    cli.error("ca", "issue-client", "c", "--dir", empty, "--role", "r", code=MISSING, exit_code=2)


def test_list_and_revoke(cli: Slurp, ca_dir: Path) -> None:
    listed = cli.json("ca", "list", "--dir", str(ca_dir))
    assert [(c["kind"], c["name"]) for c in listed] == [
        ("ca", "slurp cluster CA"),
        ("client", "alice"),
        ("node", "node-1"),
    ]
    for cert in listed:
        assert set(cert) == CERT_FIELDS
        assert cert["revoked"] is False
    serials = {c["name"]: c["serial"] for c in listed}

    revoked = cli.json("ca", "revoke", "alice", "--dir", str(ca_dir))
    assert set(revoked) == CERT_FIELDS
    assert (revoked["name"], revoked["revoked"]) == ("alice", True)
    # by serial, and idempotent
    assert cli.json("ca", "revoke", serials["alice"], "--dir", str(ca_dir))["revoked"] is True
    out = cli.ok("ca", "revoke", serials["node-1"], "--dir", str(ca_dir)).stdout
    assert out == f"revoked node-1 (serial {serials['node-1']})\n"

    state = {c["name"]: c["revoked"] for c in cli.json("ca", "list", "--dir", str(ca_dir))}
    assert state == {"slurp cluster CA": False, "alice": True, "node-1": True}
    table = cli.ok("ca", "list", "--dir", str(ca_dir)).stdout
    assert "revoked" in table
    assert "valid" in table

    cli.error("ca", "revoke", "nobody", "--dir", str(ca_dir), code=UNKNOWN, exit_code=2)
    cli.error("ca", "revoke", "slurp cluster CA", "--dir", str(ca_dir), code=IS_CA, exit_code=2)


def test_verify_accepts_good_certificates(cli: Slurp, ca_dir: Path) -> None:
    node, client = str(ca_dir / "node-1.crt"), str(ca_dir / "alice.crt")
    for cert, usage in [(node, "node"), (node, "client"), (client, "client"), (client, None)]:
        args = ["ca", "verify", cert, "--dir", str(ca_dir)]
        result = cli.json(*args, *(["--usage", usage] if usage else []))
        assert result["valid"] is True
        assert result["revoked"] is False
    assert cli.json("ca", "verify", client, "--dir", str(ca_dir))["roles"] == [
        "backend_developer",
        "observer",
    ]
    out = cli.ok("ca", "verify", node, "--dir", str(ca_dir), "--usage", "node").stdout
    assert out == f"{node}: valid node certificate node-1\n"


def test_verify_failures_each_name_their_reason(cli: Slurp, ca_dir: Path, tmp_path: Path) -> None:
    foreign_dir = tmp_path / "foreign"
    cli.json("ca", "init", "--dir", str(foreign_dir))
    cli.json("ca", "issue-client", "mallory", "--dir", str(foreign_dir), "--role", "admin")
    cli.json("ca", "issue-client", "bob", "--dir", str(ca_dir), "--role", "observer")
    cli.json("ca", "revoke", "bob", "--dir", str(ca_dir))
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")

    cases = [
        (ca_dir / "bob.crt", None, REVOKED, "revoked"),
        (ca_dir / "alice.crt", "node", WRONG_USAGE, "client certificate used as node"),
        (ca_dir / "ca.crt", "client", WRONG_USAGE, "ca certificate used as client"),
        (foreign_dir / "mallory.crt", None, FOREIGN_CA, "another CA"),
        (foreign_dir / "mallory.crt", "client", FOREIGN_CA, "another CA"),
        (junk, None, MALFORMED, "not an X.509 certificate"),
    ]
    codes = set()
    for cert, usage, code, message in cases:
        args = ["ca", "verify", str(cert), "--dir", str(ca_dir)]
        error = cli.error(*args, *(["--usage", usage] if usage else []), code=code, exit_code=2)
        assert message in error["message"]
        codes.add(code)
    assert codes == {REVOKED, WRONG_USAGE, FOREIGN_CA, MALFORMED}

    # the foreign CA accepts its own certificate; ours still accepts alice
    foreign = ["ca", "verify", str(foreign_dir / "mallory.crt"), "--dir", str(foreign_dir)]
    assert cli.json(*foreign)["valid"] is True
    assert cli.json("ca", "verify", str(ca_dir / "alice.crt"), "--dir", str(ca_dir))["valid"]


def test_verify_a_missing_file_is_bad_input(cli: Slurp, ca_dir: Path) -> None:
    missing = ca_dir / "nobody.crt"
    error = cli.error(
        "ca", "verify", str(missing), "--dir", str(ca_dir), code=INVALID_PAYLOAD, exit_code=2
    )
    assert error["field"] == "cert_file"
    assert str(missing) in error["message"]


def test_verify_usage_must_be_node_or_client(cli: Slurp, ca_dir: Path) -> None:
    cert = str(ca_dir / "alice.crt")
    result = cli.run("ca", "verify", cert, "--dir", str(ca_dir), "--usage", "server")
    assert result.exit_code == 2
    assert "server" in result.stderr


# -- openssl -------------------------------------------------------------------------------


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )


@needs_openssl
def test_openssl_reads_the_issued_certificates(ca_dir: Path) -> None:
    node = openssl("x509", "-noout", "-text", "-in", str(ca_dir / "node-1.crt"))
    assert node.returncode == 0, node.stderr
    assert "Subject: CN = node-1" in node.stdout
    assert "Issuer: CN = slurp cluster CA" in node.stdout
    assert "X509v3 Subject Alternative Name" in node.stdout
    assert "DNS:node1.example, IP Address:10.0.0.7" in node.stdout
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in node.stdout

    client = openssl("x509", "-noout", "-text", "-in", str(ca_dir / "alice.crt"))
    assert client.returncode == 0, client.stderr
    assert f"{ROLES_OID.dotted_string}:" in client.stdout
    assert '["backend_developer","observer"]' in client.stdout
    assert "TLS Web Client Authentication" in client.stdout
    assert "Subject Alternative Name" not in client.stdout

    ca_file = str(ca_dir / "ca.crt")
    checked = openssl("verify", "-CAfile", ca_file, str(ca_dir / "node-1.crt"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip().endswith(": OK")
